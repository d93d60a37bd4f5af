"""Multi-process training with fairseq's own DDP, and a guard on how ``fairseq-train`` is launched.

Distillation runs are where users outgrow one machine first, and fairseq's distributed training is
what they use. On GPUs it needs nothing from this package. On CPU (and on any machine without CUDA)
fairseq's launcher gets every route but one wrong, without saying so:

- ``--distributed-world-size N`` alone asserts "world size is N but have 0 available devices";
- with ``--distributed-init-method`` it spawns one process per GPU, i.e. none, and exits 0 having
  trained nothing;
- under ``torchrun`` it divides the rank by the GPU count (``ZeroDivisionError``);
- ``--ddp-backend pytorch_ddp`` (the default) passes ``device_ids``, which CPU DDP rejects, and the
  default ``--distributed-backend nccl`` needs GPUs.

The route that works is one process per rank started by ``torchrun``, with gloo and fairseq's
``legacy_ddp``. Under torchrun on CPU, this module takes the rank and world size from torchrun's
environment, as fairseq does on GPUs, so that one command line serves every rank; every other CPU
route is refused before anything starts, with a message that names the working one.

``fairseq-train`` reaches this through :func:`guarded_call_main`, which replaces
``fairseq.distributed.utils.call_main`` when the plugin is imported (:func:`install`). That is the
only thing importing the plugin changes beyond registration: fairseq calls no plugin code before it
launches its workers, so nothing else could stop a launch that trains nothing. The same wrapper prints
this package's own bad-input errors (:class:`~fairseq_imitkd.errors.ImitKDError`) as one line, and
ends fairseq's prefetch threads when training returns (:mod:`~fairseq_imitkd.prefetch`).
"""
import functools
import logging
import os
from typing import Mapping, Optional

import torch
from omegaconf import open_dict

from .errors import ImitKDError
from .prefetch import stop_prefetch_threads
from .repairs import apply_to_config as repair_config

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


def guarded_call_main(cfg, main, **kwargs):
    """fairseq's ``call_main``, after the config repairs (:mod:`~fairseq_imitkd.repairs`) and
    :func:`check_launch`; this package's errors end the run in one line,
    and no prefetch thread is left to abort a training process at exit (:mod:`~fairseq_imitkd.prefetch`)."""
    try:
        repair_config(cfg)
        check_launch(cfg)
        # main runs in this process, or in each process fairseq spawns (one per GPU): a picklable wrapper
        return _fairseq_call_main(cfg, functools.partial(main_then_stop_prefetch, main), **kwargs)
    except ImitKDError as e:
        raise SystemExit(f"{type(e).__name__}: {e}") from None


def main_then_stop_prefetch(main, *args, **kwargs):
    """``main(*args, **kwargs)``, then :func:`~fairseq_imitkd.prefetch.stop_prefetch_threads`."""
    try:
        return main(*args, **kwargs)
    finally:
        stop_prefetch_threads()


_fairseq_call_main = None


def install() -> None:
    """Route ``fairseq.distributed.utils.call_main`` through :func:`guarded_call_main` (once)."""
    global _fairseq_call_main
    from fairseq.distributed import utils as distributed_utils

    if getattr(distributed_utils.call_main, "__wrapped_by_imitkd__", False):
        return
    _fairseq_call_main = distributed_utils.call_main
    guarded_call_main.__wrapped_by_imitkd__ = True
    distributed_utils.call_main = guarded_call_main
