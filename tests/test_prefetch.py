"""fairseq's prefetch threads end before exit, however far the epoch got (see fairseq_imitkd/prefetch.py)."""
import threading
import time

import pytest
from fairseq.data.iterators import BackgroundConsumer, BufferedIterator

from fairseq_imitkd.prefetch import stop_prefetch_threads


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
