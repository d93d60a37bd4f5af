"""``--bf16`` trains in bfloat16 on CUDA and CPU instead of asking for a TPU.

fairseq's ``options.parse_args_and_arch`` (fairseq main up to the 0.12.3 builds, ``options.py``: "if
args.bf16: args.tpu = True") turns every ``--bf16`` run into a TPU run, from the time bfloat16 was a TPU
feature. The trainer then asks for ``torch_xla`` and dies before training on the GPUs where users train
in bfloat16 today (A100, H100, H200). Where ``torch_xla`` is not installed, no TPU run is possible anyway,
so the flag is put back and the trainer takes its own bfloat16 branch (model and batches cast to
bfloat16, ``FP16Optimizer`` keeping float32 master weights). With ``torch_xla`` installed nothing changes.

Proved by ``tests/test_half_precision.py::test_bf16_student_trains`` (CPU, in CI) and by the CUDA
tests in ``tests/test_cuda.py``.
"""
import importlib.util
import logging

from omegaconf import open_dict

logger = logging.getLogger(__name__)


def xla_available() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


def repair_bf16_without_xla(cfg) -> bool:
    """Undo fairseq's ``--bf16`` ⇒ ``--tpu`` where there can be no TPU; returns whether ``cfg`` changed."""
    common = cfg.common
    if not (getattr(common, "bf16", False) and getattr(common, "tpu", False)) or xla_available():
        return False
    with open_dict(common):
        common.tpu = False
    logger.info("--bf16 without torch_xla: training in bfloat16 on %s, not on a TPU (fairseq's --bf16 implies "
                "--tpu)", "CPU" if common.cpu else "the GPU")
    return True
