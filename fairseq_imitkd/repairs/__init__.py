"""Repairs of fairseq behaviour that this package depends on, one file per repair.

Each file names the fairseq behaviour it repairs and the test that proves the repair. They are applied
to fairseq-train's config before launch (:func:`apply_to_config`, called from
:func:`fairseq_imitkd.distributed.guarded_call_main`).
"""
from .bf16_without_xla import repair_bf16_without_xla


def apply_to_config(cfg) -> None:
    """Every config-level repair, in place, before fairseq launches training."""
    repair_bf16_without_xla(cfg)
