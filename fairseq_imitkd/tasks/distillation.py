"""The ``distillation`` task: fairseq's translation task plus a lazily loaded, frozen teacher."""
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from ..teacher import (
    Teacher,
    TeacherError,
    check_same_dictionary,
    load_teacher,
    resolve_teacher_data,
    split_teacher_paths,
)

logger = logging.getLogger(__name__)


@dataclass
class DistillationConfig(TranslationConfig):
    teacher_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "teacher checkpoint(s) written by fairseq; several separated by ':' form an ensemble "
            "averaged in probability space. Needed only by KD criterions, and loaded the first time one needs it"
        },
    )
    teacher_data: Optional[str] = field(
        default=None,
        metadata={
            "help": "directory holding the teacher's own dict.{src,tgt}.txt (checkpoints hold no dictionaries). "
            "Default: the data directory recorded in the teacher checkpoint, else the checkpoint's folder"
        },
    )
    teacher_fp16: bool = field(default=False, metadata={"help": "hold the teacher in float16"})
    teacher_bf16: bool = field(default=False, metadata={"help": "hold the teacher in bfloat16"})


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
            raise ValueError("--teacher-fp16 and --teacher-bf16 are exclusive")
        self._teacher: Optional[Teacher] = None

    @property
    def teacher_dtype(self) -> torch.dtype:
        if self.cfg.teacher_fp16:
            return torch.float16
        if self.cfg.teacher_bf16:
            return torch.bfloat16
        return torch.float32

    def check_teacher_files(self) -> None:
        """Fail fast, before any data is loaded, on a missing teacher or mismatched dictionaries."""
        paths = split_teacher_paths(self.cfg.teacher_path)
        if not paths:
            raise TeacherError("this criterion distils from a teacher: pass --teacher-path CHECKPOINT")
        langs = (self.cfg.source_lang, self.cfg.target_lang)
        for path in paths:
            if not os.path.isfile(path):
                raise TeacherError(f"--teacher-path: no such file: {path}")
            data = resolve_teacher_data(path, self.cfg.teacher_data, langs)
            for role, ours, lang in (("source", self.src_dict, langs[0]), ("target", self.tgt_dict, langs[1])):
                theirs = self.load_dictionary(os.path.join(data, f"dict.{lang}.txt"))
                check_same_dictionary(role, ours, theirs, data)

    def build_criterion(self, cfg, from_checkpoint=False):
        criterion = super().build_criterion(cfg, from_checkpoint)
        if getattr(criterion, "needs_teacher", False):
            self.check_teacher_files()
        return criterion

    def teacher(self, device: torch.device) -> Teacher:
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

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        # fairseq hands update_num to the task only; schedules (ImitKD's β) read it from the criterion.
        # It is restored from the checkpoint on resume, so a schedule continues exactly.
        if hasattr(criterion, "set_update_num"):
            criterion.set_update_num(update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
