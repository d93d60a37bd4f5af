"""fairseq-train's launch, through the plugin: config repairs, the CPU launch guard, one-line errors, and
no prefetch thread left running at exit.

fairseq calls no plugin code between parsing fairseq-train's options and launching its workers
(``fairseq_cli/train.py: cli_main`` hands the config straight to ``distributed_utils.call_main``,
``fairseq/distributed/utils.py``, ve-fairseq 0.12.3). So the repairs that must act on the config before
launch cannot be reached any other way: importing the plugin replaces ``call_main`` with
:func:`guarded_call_main` (:func:`install`, from ``fairseq_imitkd/__init__.py``). It applies the config
repairs (:func:`fairseq_imitkd.repairs.apply_to_config`), makes a CPU launch work or refuses it
(:mod:`~fairseq_imitkd.repairs.cpu_launch`), prints this package's bad-input errors
(:class:`~fairseq_imitkd.errors.ImitKDError`) as one line instead of fairseq's traceback, and ends
fairseq's prefetch threads when ``main`` returns, in this process or in each one fairseq spawns
(:mod:`~fairseq_imitkd.repairs.prefetch_threads`).

Proved by ``tests/test_distributed.py::test_fairseq_train_refuses_a_cpu_launch_in_one_line`` (a refused
launch, one line), ``tests/test_teacher_checks.py::test_a_data_dir_without_the_split_is_one_line`` (an
error inside ``main``, one line) and
``tests/test_prefetch.py::test_each_process_fairseq_spawns_ends_its_prefetch_threads``.
"""
import functools

from ..errors import ImitKDError
from . import apply_to_config as repair_config
from .cpu_launch import check_launch
from .prefetch_threads import stop_prefetch_threads


def guarded_call_main(cfg, main, **kwargs):
    """fairseq's ``call_main``, after the config repairs (:func:`~fairseq_imitkd.repairs.apply_to_config`) and
    :func:`~fairseq_imitkd.repairs.cpu_launch.check_launch`; this package's errors end the run in one line,
    and no prefetch thread is left to abort a training process at exit."""
    try:
        repair_config(cfg)
        check_launch(cfg)
        # main runs in this process, or in each process fairseq spawns (one per GPU): a picklable wrapper
        return _fairseq_call_main(cfg, functools.partial(main_then_stop_prefetch, main), **kwargs)
    except ImitKDError as e:
        raise SystemExit(f"{type(e).__name__}: {e}") from None


def main_then_stop_prefetch(main, *args, **kwargs):
    """``main(*args, **kwargs)``, then :func:`~fairseq_imitkd.repairs.prefetch_threads.stop_prefetch_threads`."""
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
