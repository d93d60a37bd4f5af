"""CPU multi-process training through ``torchrun`` works, and every CPU launch that cannot work is refused.

Distillation runs are where users outgrow one machine first, and fairseq's distributed training is
what they use. On GPUs it needs nothing from this package. On CPU (and on any machine without CUDA)
fairseq's launcher (``fairseq/distributed/utils.py``, ve-fairseq 0.12.3) gets every route but one wrong,
without saying so:

- ``--distributed-world-size N`` alone: ``infer_init_method`` asserts "world size is N but have 0
  available devices";
- with ``--distributed-init-method``: ``call_main`` spawns ``min(torch.cuda.device_count(), N)``
  processes, i.e. none, and exits 0 having trained nothing;
- under ``torchrun``: ``_infer_torch_distributed_launch_init`` takes the rank modulo the GPU count
  (``ZeroDivisionError``);
- ``--ddp-backend pytorch_ddp`` (the default): ``DistributedFairseqModel``
  (``fairseq/models/distributed_fairseq_model.py``) passes ``device_ids``, which CPU DDP rejects, and the
  default ``--distributed-backend nccl`` needs GPUs.

The route that works is one process per rank started by ``torchrun``, with gloo and fairseq's
``legacy_ddp``. Under torchrun on CPU, :func:`check_launch` takes the rank and world size from torchrun's
environment, as fairseq does on GPUs, so that one command line serves every rank; every other CPU route is
refused before anything starts (:class:`LaunchError`), with a message that names the working one. It runs
in fairseq-train's ``call_main`` (:mod:`~fairseq_imitkd.repairs.call_main`): fairseq calls no plugin code
before it launches its workers, so nothing else could stop a launch that trains nothing.

Proved by ``tests/test_distributed.py::test_cpu_launches_that_cannot_work_are_refused``,
``::test_torchrun_on_cpu_takes_rank_and_world_size_from_its_environment``,
``::test_fairseq_train_refuses_a_cpu_launch_in_one_line`` and ``::test_two_ranks_train_one_model``.
"""
import logging
import os
from typing import Mapping, Optional

import torch
from omegaconf import open_dict

from ..errors import ImitKDError

logger = logging.getLogger(__name__)

TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
CPU_DDP_BACKENDS = ("legacy_ddp", "no_c10d")
CPU_ROUTE = ("torchrun --nproc_per_node N $(which fairseq-train) ... --cpu --ddp-backend legacy_ddp "
             "--distributed-backend gloo")


def under_torchrun(env: Mapping[str, str]) -> bool:
    """Whether this process was started by torchrun (or torch.distributed.launch)."""
    return all(k in env for k in TORCHRUN_ENV)


def adopt_torchrun(dt, env: Mapping[str, str]) -> bool:
    """On CPU under torchrun, take rank and world size from its environment (fairseq's own GPU rule,
    without its division by the GPU count). Returns whether ``dt`` was changed."""
    if not under_torchrun(env):
        return False
    if dt.distributed_init_method not in (None, "env://"):
        return False
    with open_dict(dt):
        dt.distributed_init_method = "env://"
        dt.distributed_world_size = int(env["WORLD_SIZE"])
        dt.distributed_rank = int(env["RANK"])
        dt.device_id = 0
        dt.distributed_no_spawn = True
    return True


def cpu_route_problem(dt) -> Optional[str]:
    """Why fairseq would fail, hang or train nothing on CPU with these settings (``dt``: fairseq's
    ``distributed_training`` config, after :func:`adopt_torchrun`); None when the route works."""
    world = dt.distributed_world_size
    if world <= 1 and dt.distributed_init_method is None:
        return None
    if dt.distributed_init_method is None:
        return (f"--distributed-world-size {world} on CPU: fairseq starts one process per GPU and there is none; "
                f"start one process per rank with {CPU_ROUTE}")
    if not dt.distributed_no_spawn:
        return (f"--distributed-init-method on CPU: fairseq would spawn one worker per GPU, i.e. none, and train "
                f"nothing; start one process per rank with {CPU_ROUTE}")
    if dt.ddp_backend not in CPU_DDP_BACKENDS:
        return (f"--ddp-backend {dt.ddp_backend} passes GPU device ids, which DDP on CPU rejects; use "
                f"--ddp-backend legacy_ddp ({CPU_ROUTE})")
    if dt.distributed_backend != "gloo":
        return (f"--distributed-backend {dt.distributed_backend} needs GPUs; use --distributed-backend gloo "
                f"({CPU_ROUTE})")
    return None


def check_launch(cfg, env: Mapping[str, str] = None, cuda_devices: int = None) -> None:
    """Make a CPU launch work or refuse it (:class:`LaunchError`); GPU launches are left to fairseq."""
    env = os.environ if env is None else env
    cuda_devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if not (cfg.common.cpu or cuda_devices == 0):
        return
    dt = cfg.distributed_training
    if adopt_torchrun(dt, env):
        logger.info("torchrun on CPU: rank %d of %d", dt.distributed_rank, dt.distributed_world_size)
    problem = cpu_route_problem(dt)
    if problem:
        raise LaunchError(problem)


class LaunchError(ImitKDError):
    """A distributed launch that cannot work; the message names the route that does."""
