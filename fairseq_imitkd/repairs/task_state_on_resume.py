"""The task state that a checkpoint holds, read back when fairseq-train resumes from it.

fairseq's ``Trainer.state_dict`` (``fairseq/trainer.py``, ve-fairseq 0.12.3) saves ``task.state_dict()`` under
``task_state`` in every checkpoint, but ``Trainer.load_checkpoint`` never hands it back to the task when
training resumes: only ``checkpoint_utils.load_model_ensemble_and_task`` (loading a model for inference)
calls ``task.load_state_dict``. A task whose state must survive a restart (the ``distillation`` task's β
schedule state, e.g. ImitKD's agreement clock) reads it itself, at its first training step, from the
checkpoint that fairseq resumed from (:func:`resume_path`, fairseq's own rule in
``checkpoint_utils.load_checkpoint``), and only where that checkpoint was saved at the update the run
resumes at (:func:`saved_task_state`); its tensors stay on disk.

Proved by ``tests/test_imitkd.py::test_resume_continues_exactly`` (``[agreement]``: β after a resume follows
the clock restored from ``task_state``) and ``tests/test_killed_runs.py::test_a_killed_run_resumes_exactly``
(``[imitkd]``: the same β and agreement at every update after a SIGKILL and a restart).
"""
import os
from typing import Tuple

from .checkpoint_loading import read_checkpoint_lazily


def resume_path(cfg) -> str:
    """The checkpoint fairseq-train resumes from, for a task config holding fairseq's ``save_dir``,
    ``restore_file`` and ``checkpoint_suffix`` (fairseq's rule in ``checkpoint_utils.load_checkpoint``)."""
    suffix = cfg.checkpoint_suffix or ""
    if cfg.restore_file == "checkpoint_last.pt":
        return os.path.join(cfg.save_dir, f"checkpoint_last{suffix}.pt")
    return cfg.restore_file.replace(".pt", suffix + ".pt") if suffix else cfg.restore_file


def saved_task_state(cfg, update_num: int) -> Tuple[str, dict]:
    """The checkpoint fairseq-train resumed from, and the task state it saved at ``update_num``: ``{}`` where
    that file does not exist or was saved at another update."""
    path = resume_path(cfg)
    state = read_checkpoint_lazily(path) if os.path.isfile(path) else {}  # the weights stay on disk
    saved_updates = state.get("optimizer_history", [{}])[-1].get("num_updates")
    if saved_updates != update_num:
        return path, {}
    return path, state.get("task_state", {})
