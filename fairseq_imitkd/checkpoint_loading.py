"""Let torch >= 2.6 load fairseq checkpoints with ``weights_only=True`` still on.

The fairseq builds we support call ``torch.load`` without ``weights_only``, so torch's safe unpickler
rejects the ``argparse.Namespace`` that fairseq stores under ``state["args"]`` (and that older
checkpoints use for their whole config), and the numpy arrays of ``--eval-bleu``'s meters. Allow-listing exactly the globals fairseq writes keeps the
protection against arbitrary code in a checkpoint, which ``weights_only=False`` would throw away.
"""
import argparse

import numpy as np
import torch

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


allow_fairseq_checkpoints()
