"""What every distillation criterion shares: the teacher, the update counter, the KD divergence and metrics."""
import functools
import math
from dataclasses import dataclass, field

from fairseq import utils
from fairseq.criterions import FairseqCriterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics

from ..errors import OptionError
from ..losses import DIVERGENCES
from ..tasks.distillation import DistillationTask


@dataclass
class KDDivergenceConfig(FairseqDataclass):
    """The divergence of the teacher's and the student's distributions, for every criterion that uses the
    teacher's whole distribution (word_kd's KD term, imitkd --imitkd-target full)."""

    kd_divergence: ChoiceEnum(list(DIVERGENCES)) = field(
        default="forward_kl",
        metadata={"help": "forward_kl (the soft cross-entropy, as always), reverse_kl, jsd (generalized, "
                  "--kd-jsd-beta), tvd, or atkd (adaptive teaching: easy and hard tokens apart, --kd-atkd-alpha)"},
    )
    kd_jsd_beta: float = field(
        default=0.5, metadata={"help": "jsd: weight β of the teacher in the mixture, in [0, 1] (0: forward KL, "
                               "1: reverse KL)"}
    )
    kd_atkd_alpha: float = field(
        default=0.2, metadata={"help": "atkd: weight α of the easy tokens' NCKD against the hard tokens' TCKD + "
                               "NCKD, in [0, 1]"}
    )
    kd_teacher_topk: int = field(
        default=0, metadata={"help": "compare the distributions on the teacher's K most likely tokens and one "
                             "tail bucket with the rest of the mass (0: the whole vocabulary); not with atkd"}
    )


def check_range(name: str, value: float, low: float, high: float, low_open=False, high_open=False) -> None:
    """Raise an OptionError naming the flag when ``value`` is outside its range."""
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise OptionError(f"--{name} must be in {lo}{low}, {high}{hi}, got {value}")


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
                       kd_teacher_topk: int = 0) -> None:
        """Check and keep the KD divergence and its settings (KDDivergenceConfig)."""
        check_range("kd-jsd-beta", kd_jsd_beta, 0.0, 1.0)
        check_range("kd-atkd-alpha", kd_atkd_alpha, 0.0, 1.0)
        check_range("kd-teacher-topk", kd_teacher_topk, 0, float("inf"), high_open=True)
        self.divergence = str(kd_divergence)
        if kd_teacher_topk and self.divergence == "atkd":
            raise OptionError("--kd-teacher-topk does not apply to --kd-divergence atkd")
        self.divergence_args = {"jsd_beta": kd_jsd_beta, "atkd_alpha": kd_atkd_alpha,
                                "teacher_topk": kd_teacher_topk}

    def set_update_num(self, update_num: int) -> None:
        """Called by ``DistillationTask.train_step`` before every forward pass."""
        self.update_num = update_num

    def teacher_for(self, model):
        return self.task.teacher(next(model.parameters()).device)

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
