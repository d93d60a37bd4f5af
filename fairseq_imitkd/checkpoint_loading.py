"""Let torch >= 2.6 load fairseq checkpoints with ``weights_only=True`` still on.

The fairseq builds we support call ``torch.load`` without ``weights_only``, so torch's safe unpickler
rejects the ``argparse.Namespace`` that fairseq stores under ``state["args"]`` (and that older
checkpoints use for their whole config). Allow-listing exactly the globals fairseq writes keeps the
protection against arbitrary code in a checkpoint, which ``weights_only=False`` would throw away.
"""
import argparse
import logging

import torch

logger = logging.getLogger(__name__)

#: Globals that fairseq itself pickles into checkpoints (checked with
#: ``torch.serialization.get_unsafe_globals_in_checkpoint`` on checkpoints written by fairseq-train).
FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace]


def allow_fairseq_checkpoints() -> None:
    """Add fairseq's checkpoint globals to torch's safe-loading allow-list (idempotent)."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:  # torch < 2.4 loads everything anyway
        return
    add(FAIRSEQ_CHECKPOINT_GLOBALS)


allow_fairseq_checkpoints()
