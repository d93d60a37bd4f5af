"""Repairs of fairseq behaviour that this package depends on, one file per repair.

Each file names the fairseq behaviour it repairs and the test that proves the repair:

- ``checkpoint_loading``: torch's safe loading of fairseq checkpoints (allow-list), read lazily;
- ``call_main``: fairseq-train's launch, through which the config repairs, the launch guard and the
  prefetch stop run (installed when the plugin is imported);
- ``bf16_without_xla``: ``--bf16`` without a TPU (a config repair, :func:`apply_to_config`);
- ``cpu_launch``: CPU multi-process training through torchrun, other CPU launches refused;
- ``prefetch_threads``: fairseq's prefetch threads ended before exit;
- ``split_errors``: a missing or uneven binarized split named in one line;
- ``resume_batches``: a resumed run trains on the batches of the run it continues;
- ``task_state_on_resume``: the task state read back when training resumes;
- ``start_checkpoint``: a start checkpoint trained with other dictionaries refused.

The config repairs are applied to fairseq-train's config before launch (:func:`apply_to_config`, called
from :func:`fairseq_imitkd.repairs.call_main.guarded_call_main`); the task's repairs are called from
``fairseq_imitkd/tasks/distillation.py``.
"""
from .bf16_without_xla import repair_bf16_without_xla


def apply_to_config(cfg) -> None:
    """Every config-level repair, in place, before fairseq launches training."""
    repair_bf16_without_xla(cfg)
