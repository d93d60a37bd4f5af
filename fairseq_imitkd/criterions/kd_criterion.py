"""What every distillation criterion shares: the teacher, the update counter, the KD divergence and metrics."""
import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from ..errors import OptionError
from ..flags import flag
from ..losses import DIVERGENCES, check_divergence
from ..tasks.distillation import DistillationTask
from ..teacher import RowKeys, TeacherBase
from ..teacher_cache import CachedTeacher, TeacherCache


DIVERGENCE_CHOICES = ChoiceEnum(list(DIVERGENCES))


@dataclass
class KDDivergenceConfig(FairseqDataclass):
    """The divergence of the teacher's and the student's distributions, for every criterion that uses the
    teacher's whole distribution (word_kd's KD term, imitkd --imitkd-target full)."""

    kd_divergence: DIVERGENCE_CHOICES = flag("forward_kl", "forward_kl (the soft cross-entropy, as always), "
                                                           "reverse_kl, jsd (generalized, --kd-jsd-beta), tvd, or "
                                                           "atkd (adaptive teaching: easy and hard tokens apart, "
                                                           "--kd-atkd-alpha)")
    kd_jsd_beta: float = flag(0.5, "jsd: weight β of the teacher in the mixture, in [0, 1] (0: forward KL, 1: "
                                   "reverse KL)")
    kd_atkd_alpha: float = flag(0.2, "atkd: weight α of the easy tokens' NCKD against the hard tokens' TCKD + NCKD, "
                                     "in [0, 1]")
    kd_teacher_topk: int = flag(0, "compare the distributions on the teacher's K most likely tokens and one tail "
                                   "bucket with the rest of the mass (0: the whole vocabulary); not with atkd")
    kd_teacher_cache: Optional[str] = flag(None, "a directory written by imitkd-teacher-cache: the teacher's top-k "
                                                 "log-probs of the train (and valid) split, read instead of a "
                                                 "teacher pass on gold prefixes; implies --kd-teacher-topk K of the "
                                                 "cache")
    train_subset: str = II("dataset.train_subset")
    valid_subset: str = II("dataset.valid_subset")


def summed(logging_outputs, key):
    """A logging key summed over workers and batches (absent counts as 0)."""
    return sum(log.get(key, 0) for log in logging_outputs)


class KDCriterion(FairseqCriterion):
    """Base class: needs the ``distillation`` task, sees ``update_num``, logs KD metrics.

    Logging outputs (all plain sums, so they add up across workers): ``loss``, ``nll_loss`` and
    ``ntokens`` as in fairseq; ``kd_loss`` summed over ``n_scored`` positions; ``n_agree``, the
    positions where the student's argmax equals the teacher's.
    """

    needs_teacher = True

    def __init__(self, task):
        super().__init__(task)
        if not isinstance(task, DistillationTask):
            raise OptionError(
                f"criterion {type(self).__name__} needs the teacher of --task distillation, "
                f"not --task {getattr(task.cfg, '_name', type(task).__name__)}"
            )
        self.update_num = 0

    def set_divergence(self, kd_divergence: str, kd_jsd_beta: float, kd_atkd_alpha: float,
                       kd_teacher_topk: int = 0, kd_teacher_cache: Optional[str] = None,
                       train_subset: str = "train", valid_subset: str = "valid") -> None:
        """Check and keep the KD divergence and its settings, and open the teacher cache (KDDivergenceConfig)."""
        self.divergence = str(kd_divergence)
        check_divergence(self.divergence, kd_jsd_beta, kd_atkd_alpha, kd_teacher_topk)
        self.divergence_args = {"jsd_beta": kd_jsd_beta, "atkd_alpha": kd_atkd_alpha,
                                "teacher_topk": kd_teacher_topk}
        self.subsets = {True: train_subset, False: valid_subset}
        self.cached_teacher: Optional[CachedTeacher] = None
        if kd_teacher_cache:
            self._open_cache(kd_teacher_cache, kd_teacher_topk)

    def _open_cache(self, directory: str, topk: int) -> None:
        """The cache answers for the teacher on the gold prefixes of the splits it holds; it must be the one
        this run would compute."""
        if self.divergence == "atkd":
            raise OptionError("--kd-teacher-cache keeps the teacher's top k only; --kd-divergence atkd needs the "
                              "probability of every next token")
        if not os.path.isdir(directory):
            raise OptionError(f"--kd-teacher-cache {directory} does not exist")
        cache = TeacherCache(directory, self.task.source_dictionary, self.task.target_dictionary,
                             self.task.cfg.teacher_path)
        if topk not in (0, cache.k):
            raise OptionError(f"--kd-teacher-topk {topk}, but the teacher cache {directory} holds the top "
                              f"{cache.k}: pass --kd-teacher-topk {cache.k} (or nothing)")
        self.divergence_args["teacher_topk"] = cache.k
        if not cache.has(self.subsets[True]):
            raise OptionError(f"the teacher cache {directory} holds no {self.subsets[True]!r} split")
        # through self.task at each call: whatever task the criterion holds then
        self.cached_teacher = CachedTeacher(cache, lambda split: self.task.dataset(split),
                                            lambda device: self.task.teacher(device))

    def check_split(self, name: str, dataset) -> None:
        """Called by the task when it loads a split: a cache of that split is opened and checked against it
        now (sentences, lengths, array shapes), not at the first update, after fairseq has written crash.pt."""
        if self.cached_teacher is not None and self.cached_teacher.cache.has(name):
            self.cached_teacher.cache.split(name, dataset)

    def set_update_num(self, update_num: int) -> None:
        """Called by ``DistillationTask.train_step`` before every forward pass."""
        self.update_num = update_num

    def teacher_for(self, model) -> TeacherBase:
        """The teacher on the student's device: the cache where one is given (it calls on the live teacher
        for what it does not hold), else the task's."""
        device = next(model.parameters()).device
        if self.cached_teacher is not None:
            return self.cached_teacher.to(device)
        return self.task.teacher(device)

    def row_keys(self, sample, training: bool, gold=None) -> Optional[RowKeys]:
        """What a precomputed teacher looks this batch's rows up by (``gold``: rows on their own target's
        prefix; default every row)."""
        ids = sample.get("id")
        if ids is None:
            return None
        return RowKeys(self.subsets[training], ids, ids.new_ones(ids.shape, dtype=torch.bool) if gold is None else gold)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        total = functools.partial(summed, logging_outputs)
        sample_size = total("sample_size")
        ntokens = total("ntokens")
        n_scored = total("n_scored")
        metrics.log_scalar("loss", total("loss") / max(sample_size, 1) / math.log(2), sample_size, round=3)
        if any("nll_loss" in log for log in logging_outputs):
            metrics.log_scalar("nll_loss", total("nll_loss") / max(ntokens, 1) / math.log(2), ntokens, round=3)
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        if n_scored > 0:
            metrics.log_scalar("kd_loss", total("kd_loss") / n_scored / math.log(2), n_scored, round=3)
            metrics.log_scalar("kd_agree", total("n_agree") / n_scored, n_scored, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
