"""Word-level knowledge distillation (Hinton et al. 2015; Kim & Rush 2016) on gold prefixes."""
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.criterions import register_criterion
from omegaconf import II

from ..errors import OptionError
from ..losses import agreement, word_kd_loss
from ..scoring import scored_log_probs
from ..teacher_cache import TeacherCache
from .kd_criterion import KDCriterion, KDDivergenceConfig, check_range


@dataclass
class WordKDConfig(KDDivergenceConfig):
    kd_alpha: float = field(
        default=0.5, metadata={"help": "weight α of the KD term: (1-α)·NLL(gold) + α·KD, in [0, 1]"}
    )
    kd_temperature: float = field(
        default=1.0, metadata={"help": "softmax temperature T > 0 of teacher and student in the KD term (scaled by T²)"}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "label smoothing ε of the gold NLL term, in [0, 1)"}
    )
    kd_teacher_cache: Optional[str] = field(
        default=None, metadata={"help": "a directory written by imitkd-teacher-cache: the teacher's top-k "
                                "log-probs of the train (and valid) split, used instead of a teacher pass; "
                                "implies --kd-teacher-topk K of the cache"}
    )
    sentence_avg: bool = II("optimization.sentence_avg")
    train_subset: str = II("dataset.train_subset")
    valid_subset: str = II("dataset.valid_subset")


@register_criterion("word_kd", dataclass=WordKDConfig)
class WordKDCriterion(KDCriterion):
    """``(1-α)·LS-NLL(gold) + α·T²·D(p_T, p_S)`` at every non-pad gold position; D is ``--kd-divergence``
    (default the cross-entropy to the teacher, whose gradient is forward KL's)."""

    def __init__(self, task, kd_alpha, kd_temperature, label_smoothing, sentence_avg, kd_divergence="forward_kl",
                 kd_jsd_beta=0.5, kd_atkd_alpha=0.2, kd_teacher_topk=0, kd_teacher_cache=None,
                 train_subset="train", valid_subset="valid"):
        super().__init__(task)
        self.set_divergence(kd_divergence, kd_jsd_beta, kd_atkd_alpha, kd_teacher_topk)
        check_range("kd-alpha", kd_alpha, 0.0, 1.0)
        check_range("kd-temperature", kd_temperature, 0.0, float("inf"), low_open=True, high_open=True)
        check_range("label-smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        self.alpha = kd_alpha
        self.temperature = kd_temperature
        self.eps = label_smoothing
        self.sentence_avg = sentence_avg
        self.subsets = {True: train_subset, False: valid_subset}
        self.cache = None
        if kd_teacher_cache:
            self._open_cache(kd_teacher_cache, kd_teacher_topk)

    def _open_cache(self, directory: str, topk: int) -> None:
        """The cache replaces the teacher on the splits it holds; it must be the one this run would compute."""
        if self.divergence == "atkd":
            raise OptionError("--kd-teacher-cache keeps the teacher's top k only; --kd-divergence atkd needs the "
                              "probability of every next token")
        if self.temperature != 1.0:
            raise OptionError(f"--kd-teacher-cache holds log-probs at temperature 1; --kd-temperature "
                              f"{self.temperature} would need the whole distribution")
        if not os.path.isdir(directory):
            raise OptionError(f"--kd-teacher-cache {directory} does not exist")
        self.cache = TeacherCache(directory, self.task.source_dictionary, self.task.target_dictionary,
                                  self.task.cfg.teacher_path)
        if topk not in (0, self.cache.k):
            raise OptionError(f"--kd-teacher-topk {topk}, but the teacher cache {directory} holds the top "
                              f"{self.cache.k}: pass --kd-teacher-topk {self.cache.k} (or nothing)")
        self.divergence_args["teacher_topk"] = self.cache.k
        if not self.cache.has(self.subsets[True]):
            raise OptionError(f"the teacher cache {directory} holds no {self.subsets[True]!r} split")
        if not self.cache.has(self.subsets[False]) and not self.task.cfg.teacher_path:
            raise OptionError(f"the teacher cache {directory} holds no {self.subsets[False]!r} split to validate "
                              "on: build it with --splits train,valid, or pass --teacher-path")
        self.needs_teacher = not self.cache.has(self.subsets[False])  # the task checks the teacher's files if so

    def check_split(self, name: str, dataset) -> None:
        """Called by the task when it loads a split: a cache of that split is opened and checked against it
        now (sentences, lengths, array shapes), not at the first update, after fairseq has written crash.pt."""
        if self.cache is not None and self.cache.has(name):
            self.cache.split(name, dataset)

    def _teacher_log_probs(self, model, sample, inputs, mask):
        """The teacher's ``(N, V)`` log-probs at the scored positions, or, from a cache, its ``(N, K+1)`` top-k
        and tail buckets with the ``(N, K)`` tokens they belong to."""
        split = self.subsets[model.training]
        if self.cache is not None and self.cache.has(split):
            values, index, tail = self.cache.split(split, self.task.dataset(split)).rows(sample["id"], mask.sum(1))
            device = mask.device
            values, index, tail = values.to(device), index.to(device), tail.to(device)
            return torch.cat([values, tail.unsqueeze(-1)], -1), index  # buckets: no (N, V) teacher
        return self.teacher_for(model).log_probs(*inputs, mask, ids=sample.get("id")), None

    def forward(self, model, sample, reduce=True):
        net_input = sample["net_input"]
        inputs = (net_input["src_tokens"], net_input["src_lengths"], net_input["prev_output_tokens"])
        target = sample["target"]
        mask = target.ne(self.padding_idx)
        student = scored_log_probs(model, *inputs, mask)
        teacher, index = self._teacher_log_probs(model, sample, inputs, mask)
        loss, nll, kd = word_kd_loss(student, teacher, target[mask], self.alpha, self.temperature, self.eps,
                                     self.divergence, teacher_index=index, **self.divergence_args)
        n_scored = int(mask.sum())
        sample_size = sample["target"].size(0) if self.sentence_avg else n_scored
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll.data,
            "kd_loss": kd.data,
            # a cache's top tokens are sorted: its first is the teacher's argmax
            "n_agree": (agreement(student, teacher) if index is None else
                        (student.argmax(-1) == index[:, 0]).sum()).data,
            "n_scored": n_scored,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        return loss, sample_size, logging_output
