"""``python -m fairseq_imitkd.seqkd``: the same as ``imitkd-seqkd``."""
import sys

from .cli import main

sys.exit(main())
