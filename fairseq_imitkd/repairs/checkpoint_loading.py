"""fairseq checkpoints load with torch >= 2.6's ``weights_only=True`` still on, and are read lazily.

fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` (``checkpoint_utils.py``, ve-fairseq 0.12.3) calls
``torch.load(f, map_location=...)`` without ``weights_only``, so torch's safe unpickler rejects the
``argparse.Namespace`` that fairseq stores under ``state["args"]`` (and that older checkpoints use for their
whole config), and the numpy arrays of ``--eval-bleu``'s meters. Allow-listing exactly the globals fairseq
writes keeps the protection against arbitrary code in a checkpoint, which ``weights_only=False`` would throw
away. The allow-list is added when this module is imported, which ``fairseq_imitkd/__init__.py`` does first.
The plugin's own reads of a checkpoint (a teacher's config, a start checkpoint's dictionaries, the task
state on resume) memory-map its tensors instead of reading them (:func:`read_checkpoint_lazily`), and name a
missing, unreadable or unsafe file in one line (:func:`read_fairseq_checkpoint`).

Proved by ``tests/test_loading.py::test_torch_load_needs_the_allow_list``,
``::test_torch_load_with_the_plugin`` and ``::test_checkpoints_hold_only_allow_listed_globals``, and for
unreadable files by ``tests/test_teacher_checks.py::test_a_teacher_file_that_is_no_readable_checkpoint_is_named``.
"""
import argparse
import re
from typing import Type

import numpy as np
import torch

from ..errors import ImitKDError


def _numpy_globals():
    """What pickling numpy arrays and scalars writes: the reconstructors, ``ndarray``, and the dtypes.

    fairseq-train with ``--eval-bleu`` saves its BLEU meters' n-gram counts as numpy arrays in
    ``extra_state["metrics"]``. These globals rebuild plain numeric data only; object arrays
    would need pickle itself and stay refused.
    """
    numeric = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
               np.float16, np.float32, np.float64]
    return [np.ndarray(0).__reduce__()[0], np.float64(0).__reduce__()[0], np.ndarray, np.dtype] + [
        type(np.dtype(t)) for t in numeric
    ]


#: Globals that fairseq itself pickles into checkpoints (checked with
#: ``torch.serialization.get_unsafe_globals_in_checkpoint`` on checkpoints written by fairseq-train,
#: with and without ``--eval-bleu``).
FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace] + _numpy_globals()


def allow_fairseq_checkpoints() -> None:
    """Add fairseq's checkpoint globals to torch's safe-loading allow-list (idempotent)."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:  # torch < 2.4 loads everything anyway
        return
    add(FAIRSEQ_CHECKPOINT_GLOBALS)


def read_checkpoint_lazily(path: str) -> dict:
    """A checkpoint's state with its tensors memory-mapped, not read: for its config and small entries."""
    try:
        return torch.load(path, map_location="cpu", mmap=True)
    except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
        return torch.load(path, map_location="cpu")


def config_value(section, key):
    """A key of a checkpoint's config section, whether a dict, a DictConfig or (legacy models) a Namespace."""
    return section.get(key) if hasattr(section, "get") else getattr(section, key, None)


def unreadable_checkpoint(path: str, error: Exception, role: str, error_cls: Type[ImitKDError]) -> ImitKDError:
    """A checkpoint torch cannot load, named with torch's own reason in one line (for a pickled global that
    safe loading refuses, the global: it is never executed)."""
    text = str(error)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return error_cls(f"{role} {path} holds a pickled global that safe loading refuses, {refused.group(1)}; "
                         "nothing was executed. Load only checkpoints you trust")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0] if lines else type(error).__name__
    return error_cls(f"{role} {path} cannot be read ({type(error).__name__}: {reason[:200]}): a truncated file, "
                     "or not a checkpoint written by torch.save")


def read_fairseq_checkpoint(path: str, role: str = "checkpoint", error_cls: Type[ImitKDError] = ImitKDError) -> dict:
    """A fairseq checkpoint's state, its tensors memory-mapped; a missing, unreadable, unsafe or foreign file is
    one ``error_cls`` line that starts with ``role`` and the path."""
    try:
        state = read_checkpoint_lazily(path)
    except FileNotFoundError as e:
        raise error_cls(f"{role} {path} does not exist") from e
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file; each becomes one line
        raise unreadable_checkpoint(path, e, role, error_cls) from e
    if not isinstance(state, dict):
        raise error_cls(f"{role} {path} holds a {type(state).__name__}, not a fairseq checkpoint")
    if state.get("cfg") is None and state.get("args") is None:
        raise error_cls(f"{role} {path} holds neither 'cfg' nor 'args': not a fairseq checkpoint")
    return state


allow_fairseq_checkpoints()
