"""The ``distillation`` task: fairseq's translation task plus a lazily loaded, frozen teacher.

Beyond the teacher, the task holds the criterion's schedule state (β) in its checkpoint state, without
knowing what is in it. The fairseq behaviour it repairs on the way (resumed batches, the task state on
resume, the start checkpoint's dictionaries, a split's load errors) lives in :mod:`fairseq_imitkd.repairs`,
one file per repair; the methods here only call into it.
"""
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II

from ..errors import OptionError
from ..flags import flag
from ..repairs import resume_batches, split_errors, start_checkpoint, task_state_on_resume
from ..repairs.start_checkpoint import DICTIONARIES
from ..teacher import (TeacherBase, check_teacher_files, check_teacher_paths, dictionary_fingerprint,
                       load_teacher)

logger = logging.getLogger(__name__)


@dataclass
class DistillationConfig(TranslationConfig):
    teacher_path: Optional[str] = flag(None, "teacher checkpoint(s) written by fairseq; several separated by ':' form "
                                             "an ensemble averaged in probability space. Needed only by KD criterions, "
                                             "and loaded the first time one needs it")
    teacher_data: Optional[str] = flag(None, "directory holding the teacher's own dict.{src,tgt}.txt (checkpoints hold "
                                             "no dictionaries). Default: the data directory recorded in the teacher "
                                             "checkpoint, else the checkpoint's folder")
    teacher_fp16: bool = flag(False, "hold the teacher in float16")
    teacher_bf16: bool = flag(False, "hold the teacher in bfloat16")
    # where fairseq-train resumes from (repairs/task_state_on_resume.py, repairs/start_checkpoint.py)
    save_dir: str = II("checkpoint.save_dir")
    restore_file: str = II("checkpoint.restore_file")
    finetune_from_model: Optional[str] = II("checkpoint.finetune_from_model")
    checkpoint_suffix: str = II("checkpoint.checkpoint_suffix")

SCHEDULE_STATE = "kd_schedule"


@register_task("distillation", dataclass=DistillationConfig)
class DistillationTask(TranslationTask):
    """Translation with a frozen teacher for the KD criterions.

    The teacher lives here as a plain attribute, so it is never saved in a checkpoint, never seen by
    the optimizer or DDP, and never halved by ``--fp16``. It is not loaded in ``setup_task``: hub-style
    loading and CTranslate2's converter rebuild this task from a student checkpoint where no teacher
    file exists.
    """

    cfg: DistillationConfig

    def __init__(self, cfg: DistillationConfig, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        if cfg.teacher_fp16 and cfg.teacher_bf16:
            raise OptionError("--teacher-fp16 and --teacher-bf16 are exclusive")
        self._teacher: Optional[TeacherBase] = None
        self._criterion = None
        # what checkpoints record of the dictionaries, and what a start checkpoint is compared with
        self._dictionaries = {"src": dictionary_fingerprint(src_dict), "tgt": dictionary_fingerprint(tgt_dict)}
        self._resume_checked = False

    @property
    def teacher_dtype(self) -> torch.dtype:
        if self.cfg.teacher_fp16:
            return torch.float16
        if self.cfg.teacher_bf16:
            return torch.bfloat16
        return torch.float32

    def check_teacher_files(self) -> None:
        """Fail fast, before any data is loaded, on a missing teacher or mismatched dictionaries."""
        check_teacher_files(self.cfg.teacher_path, self.cfg.teacher_data, self.cfg.source_lang, self.cfg.target_lang,
                            self.src_dict, self.tgt_dict, data=self.cfg.data)

    def build_criterion(self, cfg, from_checkpoint=False):
        criterion = super().build_criterion(cfg, from_checkpoint)
        if getattr(criterion, "needs_teacher", False):
            self.check_teacher_files()
        elif self.cfg.teacher_path:
            check_teacher_paths(self.cfg.teacher_path)  # a file that does not exist never passes silently
            if getattr(criterion, "cached_teacher", None) is None:  # else it names the teacher a cache is checked against
                logger.warning("--teacher-path %s is unused: criterion %s uses no teacher", self.cfg.teacher_path,
                               getattr(cfg, "_name", type(criterion).__name__))
        self._criterion = criterion
        for split in list(self.datasets):  # fairseq-train loads the valid splits before building the criterion
            self._check_split_for_criterion(split)
        return criterion

    # Schedule state (ImitKD's agreement clock) lives in the checkpoint's task_state. fairseq's trainer saves
    # task.state_dict() but never loads it back when training resumes, so the task reads it itself from the
    # checkpoint that fairseq resumed from, at the first training step (repairs/task_state_on_resume.py).
    def state_dict(self):
        state = dict(super().state_dict())
        state[DICTIONARIES] = self._dictionaries
        schedule = getattr(self._criterion, "schedule_state", lambda: None)()
        if schedule is not None:
            state[SCHEDULE_STATE] = schedule
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        schedule = state_dict.pop(SCHEDULE_STATE, None)
        state_dict.pop(DICTIONARIES, None)
        super().load_state_dict(state_dict)
        # fairseq calls this only when it loads a model for inference (no criterion); a caller that built
        # the criterion first gets the state handed on
        if schedule is not None and hasattr(self._criterion, "load_schedule_state"):
            self._criterion.load_schedule_state(schedule)
            self._resume_checked = True

    def _resume_state(self, criterion, update_num: int) -> None:
        self._resume_checked = True
        if update_num == 0 or criterion.schedule_state() is None:
            return  # a fresh run (or one whose optimizer was reset): the schedule starts fresh too
        path, task_state = task_state_on_resume.saved_task_state(self.cfg, update_num)
        schedule = task_state.get(SCHEDULE_STATE)
        if schedule is None:
            logger.warning(
                "resuming at update %d but %s holds no schedule state for that update: the agreement clock "
                "starts afresh", update_num, path,
            )
            return
        criterion.load_schedule_state(schedule)
        logger.info("restored the β schedule state from %s: %s", path, schedule)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if not from_checkpoint:
            self.check_start_checkpoint()
        return model

    def check_start_checkpoint(self) -> None:
        """Refuse a start checkpoint trained with other dictionaries (repairs/start_checkpoint.py)."""
        start_checkpoint.check_start_checkpoint(self.cfg, self._dictionaries)

    def teacher(self, device: torch.device) -> TeacherBase:
        """The frozen teacher on ``device``, loaded on first use."""
        if self._teacher is None:
            self._teacher = load_teacher(
                self.cfg.teacher_path,
                self.cfg.teacher_data,
                self.cfg.source_lang,
                self.cfg.target_lang,
                self.src_dict,
                self.tgt_dict,
            )
        if self._teacher.device != device or self._teacher.dtype != self.teacher_dtype:
            self._teacher.to(device=device, dtype=self.teacher_dtype)
        return self._teacher

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        """fairseq's, with a missing or uneven split named in one line (repairs/split_errors.py); the criterion
        then checks what it holds for this split (a teacher cache), before any training step."""
        hint = "binarize it with fairseq-preprocess, or name the splits to use with --train-subset/--valid-subset"
        with split_errors.explained_split_errors(self, split, hint):
            super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        self._check_split_for_criterion(split)

    def _check_split_for_criterion(self, split) -> None:
        check = getattr(self._criterion, "check_split", None)
        if check is not None and split in self.datasets:
            check(split, self.datasets[split])

    def get_batch_iterator(self, dataset, **kwargs):
        """fairseq's, with a resumed run's batches those of the run it continues (repairs/resume_batches.py)."""
        return resume_batches.get_batch_iterator(self, super().get_batch_iterator, dataset, **kwargs)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        # fairseq hands update_num to the task only; schedules (ImitKD's β) read it from the criterion.
        # It is restored from the checkpoint on resume, so a schedule continues exactly.
        if hasattr(criterion, "set_update_num"):
            criterion.set_update_num(update_num)
        if not self._resume_checked and hasattr(criterion, "schedule_state"):
            self._resume_state(criterion, update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        # once per update, with the sums of every worker: the agreement clock moves the same everywhere
        if hasattr(criterion, "observe_update"):
            criterion.observe_update(logging_outputs)
