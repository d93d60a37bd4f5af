"""The ``distillation`` task: fairseq's translation task plus a lazily loaded, frozen teacher."""
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II

from ..checkpoint_loading import read_checkpoint_lazily
from ..errors import ImitKDError, OptionError
from ..splits import explained_split_errors
from ..teacher import (TeacherBase, check_teacher_files, check_teacher_paths, dictionary_fingerprint,
                       load_teacher)

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
    # where fairseq-train resumes from: the task restores its own state from there (see _resume_state)
    save_dir: str = II("checkpoint.save_dir")
    restore_file: str = II("checkpoint.restore_file")
    finetune_from_model: Optional[str] = II("checkpoint.finetune_from_model")
    checkpoint_suffix: str = II("checkpoint.checkpoint_suffix")

SCHEDULE_STATE = "kd_schedule"
DICTIONARIES = "dictionaries"


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
            if getattr(criterion, "cache", None) is None:  # else it names the teacher the cache is checked against
                logger.warning("--teacher-path %s is unused: criterion %s uses no teacher", self.cfg.teacher_path,
                               getattr(cfg, "_name", type(criterion).__name__))
        self._criterion = criterion
        for split in list(self.datasets):  # fairseq-train loads the valid splits before building the criterion
            self._check_split_for_criterion(split)
        return criterion

    # Schedule state (ImitKD's agreement clock) lives in the checkpoint's task_state. This fairseq build's
    # trainer saves task.state_dict() but never loads it back when training resumes, so the task reads
    # it itself from the checkpoint that fairseq resumed from, at the first training step.
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

    def _resume_path(self) -> str:
        """The checkpoint fairseq-train resumes from (its own rule in checkpoint_utils.load_checkpoint)."""
        suffix = self.cfg.checkpoint_suffix or ""
        if self.cfg.restore_file == "checkpoint_last.pt":
            return os.path.join(self.cfg.save_dir, f"checkpoint_last{suffix}.pt")
        return self.cfg.restore_file.replace(".pt", suffix + ".pt") if suffix else self.cfg.restore_file

    def _resume_state(self, criterion, update_num: int) -> None:
        self._resume_checked = True
        if update_num == 0 or criterion.schedule_state() is None:
            return  # a fresh run (or one whose optimizer was reset): the schedule starts fresh too
        path = self._resume_path()
        state = read_checkpoint_lazily(path) if os.path.isfile(path) else {}  # the weights stay on disk
        saved_updates = state.get("optimizer_history", [{}])[-1].get("num_updates")
        schedule = state.get("task_state", {}).get(SCHEDULE_STATE)
        if schedule is None or saved_updates != update_num:
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
        """A run that resumes or continues (``--finetune-from-model``) a student trained on data binarized
        with other dictionaries would load its embeddings against the wrong symbols: silently when the
        sizes agree, else with fairseq's "please ensure that the architectures match". Compare first, with
        the fingerprints this task saves, or the embedding sizes where a checkpoint has none."""
        path = self._resume_path()
        if not os.path.isfile(path):
            path = self.cfg.finetune_from_model
        if not path or not os.path.isfile(path):
            return
        state = read_checkpoint_lazily(path)
        saved = (state.get("task_state") or {}).get(DICTIONARIES, {})
        weights = state.get("model", {})
        for side, name, key in (("source", "src", "encoder.embed_tokens.weight"),
                                ("target", "tgt", "decoder.embed_tokens.weight")):
            here = self._dictionaries[name]
            there = saved.get(name) or ({"size": weights[key].shape[0]} if key in weights else None)
            if there is None or all(there[k] == here[k] for k in there):
                continue
            what = (f"a {side} dictionary of {there['size']} symbols, but {self.cfg.data} has {here['size']}"
                    if there["size"] != here["size"] else
                    f"another {side} dictionary than {self.cfg.data} (the same size, other symbols or order)")
            raise ImitKDError(
                f"{path} was trained with {what}: binarize the data with the dictionaries that model was trained "
                "with (fairseq-preprocess --srcdict/--tgtdict; fairseq checkpoints hold none)")

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
        """fairseq's, with its traceback for a split that is missing or whose two sides differ in length (a
        seq-KD corpus written by hand or cut short) turned into one error naming the split; the criterion
        then checks what it holds for this split (a teacher cache), before any training step."""
        with explained_split_errors(self, split, "binarize it with fairseq-preprocess, or name the splits to use "
                                    "with --train-subset/--valid-subset"):
            super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        self._check_split_for_criterion(split)

    def _check_split_for_criterion(self, split) -> None:
        check = getattr(self._criterion, "check_split", None)
        if check is not None and split in self.datasets:
            check(split, self.datasets[split])

    def get_batch_iterator(self, dataset, **kwargs):
        """fairseq builds a run's training batches once, seeded by the epoch its iterator is created in:
        epoch 1 in an uninterrupted run, the epoch it resumes in after a restart. A run resumed after its
        first epoch then trained on other batches than the run it continues, and its mid-epoch offset
        skipped some sentences and repeated others. Here the batches are always the ones an uninterrupted
        run builds (seeded as at epoch 1), and the iterator starts at the requested epoch, whose batch
        order fairseq shuffles as usual. Sharded data and ``--rebuild-batches`` build per epoch anyway."""
        epoch = kwargs.get("epoch", 1)
        if (epoch == 1 or getattr(self.cfg, "rebuild_batches", False) or self.has_sharded_data("train")
                or not self.can_reuse_epoch_itr(dataset) or dataset in self.dataset_to_epoch_iter
                or kwargs.get("update_epoch_batch_itr") or kwargs.get("disable_iterator_cache")):
            return super().get_batch_iterator(dataset, **kwargs)
        epoch_itr = super().get_batch_iterator(dataset, **dict(kwargs, epoch=1))
        epoch_itr.epoch = epoch
        dataset.set_epoch(epoch)
        return epoch_itr

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
