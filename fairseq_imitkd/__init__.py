"""fairseq-imitkd: knowledge distillation for fairseq seq2seq models.

Load with ``fairseq-train --user-dir "$(imitkd-user-dir)"``. Importing the package registers the
``distillation`` task, the KD criterions and the student architectures, allow-lists what fairseq
checkpoints need for torch's safe loading, and routes fairseq-train's launch through a guard that makes
CPU multi-process training work or refuses it in one line (``repairs/call_main.py``). Imports are relative
so that fairseq can import this folder under its basename from a source checkout or from site-packages.
"""
from .repairs import checkpoint_loading  # noqa: F401  (allow-list first: everything below may load checkpoints)
from . import criterions, models, tasks  # noqa: F401
from .repairs import call_main

call_main.install()  # fairseq-train's launch guard and one-line errors (see repairs/call_main.py)

__version__ = "0.1.0"
