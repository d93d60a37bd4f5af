"""Word-level knowledge distillation (Hinton et al. 2015; Kim & Rush 2016) on gold prefixes."""
from dataclasses import dataclass

from fairseq.criterions import register_criterion
from omegaconf import II

from ..errors import OptionError
from ..flags import check_range, flag
from ..losses import word_kd_loss
from ..scoring import scored_log_probs
from .kd_criterion import KDCriterion, KDDivergenceConfig


@dataclass
class WordKDConfig(KDDivergenceConfig):
    kd_alpha: float = flag(0.5, "weight α of the KD term: (1-α)·NLL(gold) + α·KD, in [0, 1]")
    kd_temperature: float = flag(1.0, "softmax temperature T > 0 of teacher and student in the KD term (scaled by "
                                      "T²)")
    label_smoothing: float = flag(0.0, "label smoothing ε of the gold NLL term, in [0, 1)")
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion("word_kd", dataclass=WordKDConfig)
class WordKDCriterion(KDCriterion):
    """``(1-α)·LS-NLL(gold) + α·T²·D(p_T, p_S)`` at every non-pad gold position; D is ``--kd-divergence``
    (default the cross-entropy to the teacher, whose gradient is forward KL's)."""

    def __init__(self, task, kd_alpha, kd_temperature, label_smoothing, sentence_avg, kd_divergence="forward_kl",
                 kd_jsd_beta=0.5, kd_atkd_alpha=0.2, kd_teacher_topk=0, kd_teacher_cache=None,
                 train_subset="train", valid_subset="valid"):
        super().__init__(task)
        check_range("kd-alpha", kd_alpha, 0.0, 1.0)
        check_range("kd-temperature", kd_temperature, 0.0, float("inf"), low_open=True, high_open=True)
        check_range("label-smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        if kd_teacher_cache and kd_temperature != 1.0:
            raise OptionError(f"--kd-teacher-cache holds log-probs at temperature 1; --kd-temperature "
                              f"{kd_temperature} would need the whole distribution")
        self.alpha = kd_alpha
        self.temperature = kd_temperature
        self.eps = label_smoothing
        self.sentence_avg = sentence_avg
        self.set_divergence(kd_divergence, kd_jsd_beta, kd_atkd_alpha, kd_teacher_topk, kd_teacher_cache,
                            train_subset, valid_subset)
        if self.cached_teacher is not None:  # the live teacher answers for a split the cache lacks
            cache = self.cached_teacher.cache
            if not cache.has(valid_subset) and not task.cfg.teacher_path:
                raise OptionError(f"the teacher cache {kd_teacher_cache} holds no {valid_subset!r} split to validate "
                                  "on: build it with --splits train,valid, or pass --teacher-path")
            self.needs_teacher = not cache.has(valid_subset)  # the task checks the teacher's files if so

    def forward(self, model, sample, reduce=True):
        net_input = sample["net_input"]
        inputs = (net_input["src_tokens"], net_input["src_lengths"], net_input["prev_output_tokens"])
        target = sample["target"]
        mask = target.ne(self.padding_idx)
        student = scored_log_probs(model, *inputs, mask)
        teacher = self.teacher_for(model).scores(*inputs, mask, self.row_keys(sample, model.training))
        loss, nll, kd = word_kd_loss(student, teacher.lprobs, target[mask], self.alpha, self.temperature, self.eps,
                                     self.divergence, teacher_index=teacher.index, **self.divergence_args)
        n_scored = int(mask.sum())
        sample_size = sample["target"].size(0) if self.sentence_avg else n_scored
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll.data,
            "kd_loss": kd.data,
            "n_agree": (student.argmax(-1) == teacher.argmax).sum().data,
            "n_scored": n_scored,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        return loss, sample_size, logging_output
