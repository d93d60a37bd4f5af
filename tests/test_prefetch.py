"""fairseq's prefetch threads end before exit, however far the epoch got (see fairseq_imitkd/repairs/prefetch_threads.py)."""
import atexit
import functools
import os
import socket
import threading
import time

import pytest
import torch
from fairseq import options
from fairseq.data.iterators import BackgroundConsumer, BufferedIterator
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.distributed import utils as distributed_utils

from fairseq_imitkd.repairs import call_main
from fairseq_imitkd.repairs.prefetch_threads import stop_prefetch_threads


class SlowBatches:
    """Batches that take a while to make, like collation inside torch."""

    def __init__(self, n, seconds):
        self.n, self.seconds, self.made = n, seconds, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        for i in range(self.n):
            time.sleep(self.seconds)
            self.made += 1
            yield i


def _consumers():
    return [t for t in threading.enumerate() if isinstance(t, BackgroundConsumer) and t.is_alive()]


@pytest.mark.parametrize("seconds", [0.0, 0.02])  # blocked on a full queue; busy making the next batch
def test_training_that_stopped_mid_epoch_leaves_no_prefetch_thread(seconds):
    source = SlowBatches(1000, seconds)
    itr = BufferedIterator(2, source)
    assert next(itr) == 0 and next(itr) == 1  # training took two batches, then stopped
    time.sleep(0.1)
    assert _consumers(), "the consumer should still be running mid-epoch"
    assert stop_prefetch_threads(timeout=5.0) == 0
    assert not _consumers()
    assert source.made < 20  # it stopped where it was, without making the rest of the epoch


def test_a_finished_epoch_is_left_as_it_was():
    itr = BufferedIterator(4, SlowBatches(3, 0.0))
    assert list(itr) == [0, 1, 2]
    assert stop_prefetch_threads(timeout=5.0) == 0 and not _consumers()


def _train_stopped_mid_epoch(cfg):
    """A training ``main`` that returns while its prefetch thread is still collating the epoch."""
    itr = BufferedIterator(2, SlowBatches(1000, 0.005))
    next(itr)
    atexit.register(_exit_3_if_still_prefetching)  # runs after main, before the interpreter finalizes


def _exit_3_if_still_prefetching():
    if _consumers():
        os._exit(3)


def test_each_process_fairseq_spawns_ends_its_prefetch_threads():
    """fairseq's route for several GPUs: call_main spawns one process per device, each running
    distributed_main, which calls main; here one CPU process with gloo (the route itself needs GPUs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    args = options.parse_args_and_arch(options.get_training_parser(), [
        "unused-data-dir", "--arch", "transformer", "--cpu", "--distributed-backend", "gloo",
        "--distributed-world-size", "1", "--distributed-init-method", init])
    cfg = convert_namespace_to_omegaconf(args)  # as fairseq-train makes it
    main = functools.partial(call_main.main_then_stop_prefetch, _train_stopped_mid_epoch)
    torch.multiprocessing.spawn(fn=distributed_utils.distributed_main, args=(main, cfg, {}), nprocs=1)
