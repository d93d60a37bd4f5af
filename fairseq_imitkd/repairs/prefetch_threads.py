"""fairseq's batch-prefetch threads, ended before the interpreter exits.

fairseq's ``BufferedIterator`` (``fairseq/data/iterators.py``, ve-fairseq 0.12.3) fills a queue of batches
from a daemon thread (``BackgroundConsumer``) that nothing ever stops. When training stops mid-epoch
(``--max-update``), that thread goes on collating the rest of the epoch. If it is still inside torch
(collating a batch) when Python finalizes, CPython ends it from within a C++ frame that must not unwind,
and the process aborts with "terminate called without an active exception" (exit 134) after training has
finished and saved: a ``set -e`` recipe then stops. Asking each thread to stop after the batch in hand,
and emptying its queue so that it is not left waiting on a full one, lets it return normally first. The
batches dropped were never going to be used. fairseq-train calls :func:`stop_prefetch_threads` when its
``main`` returns, through :func:`fairseq_imitkd.repairs.call_main.main_then_stop_prefetch`.

Proved by ``tests/test_prefetch.py::test_training_that_stopped_mid_epoch_leaves_no_prefetch_thread``,
``::test_a_finished_epoch_is_left_as_it_was`` and
``::test_each_process_fairseq_spawns_ends_its_prefetch_threads``.
"""
import logging
import queue
import threading
import time

logger = logging.getLogger(__name__)


def stop_prefetch_threads(timeout: float = 10.0) -> int:
    """End every live fairseq prefetch thread of this process; return how many were still running after
    ``timeout`` seconds (0 unless one is stuck in its data source)."""
    from fairseq.data.iterators import BackgroundConsumer

    consumers = [t for t in threading.enumerate() if isinstance(t, BackgroundConsumer) and t.is_alive()]
    for consumer in consumers:
        consumer._max_len = 0  # its loop breaks after the next put, then puts its end marker
    deadline = time.monotonic() + timeout
    for consumer in consumers:
        while consumer.is_alive() and time.monotonic() < deadline:
            try:
                while True:
                    consumer._queue.get_nowait()
            except queue.Empty:
                pass
            consumer.join(0.01)
    left = sum(c.is_alive() for c in consumers)
    if left:
        logger.warning("%d fairseq prefetch thread(s) still running at exit", left)
    return left
