"""A resumed run trains on the batches of the run it continues.

fairseq's ``FairseqTask.get_batch_iterator`` (``fairseq/tasks/fairseq_task.py``, ve-fairseq 0.12.3) builds a
run's training batches once, shuffled with ``numpy_seed(seed + epoch)`` for the epoch its iterator is
created in, and reuses them for every later epoch (``can_reuse_epoch_itr``): epoch 1 in an uninterrupted run,
the epoch it resumes in after a restart (``checkpoint_utils.load_checkpoint`` asks for the saved epoch). A
run resumed after its first epoch then trained on other batches than the run it continues, and its
mid-epoch offset skipped some sentences and repeated others. Here the batches are always the ones an
uninterrupted run builds (seeded as at epoch 1), and the iterator starts at the requested epoch, whose batch
order fairseq shuffles as usual. Sharded data and ``--rebuild-batches`` build per epoch anyway and are left
to fairseq.

Proved by ``tests/test_killed_runs.py::test_a_killed_run_resumes_exactly`` (``word_kd`` and ``imitkd`` runs
killed with SIGKILL mid-epoch and started again match an uninterrupted run at every update and in their
final weights).
"""


def get_batch_iterator(task, fairseq_get_batch_iterator, dataset, **kwargs):
    """``task``'s batch iterator over ``dataset``, with the batches of epoch 1 at any epoch;
    ``fairseq_get_batch_iterator`` is fairseq's own (the task's parent's method, bound)."""
    epoch = kwargs.get("epoch", 1)
    if (epoch == 1 or getattr(task.cfg, "rebuild_batches", False) or task.has_sharded_data("train")
            or not task.can_reuse_epoch_itr(dataset) or dataset in task.dataset_to_epoch_iter
            or kwargs.get("update_epoch_batch_itr") or kwargs.get("disable_iterator_cache")):
        return fairseq_get_batch_iterator(dataset, **kwargs)
    epoch_itr = fairseq_get_batch_iterator(dataset, **dict(kwargs, epoch=1))
    epoch_itr.epoch = epoch
    dataset.set_epoch(epoch)
    return epoch_itr
