"""ImitKD (Lin et al., EMNLP 2020): distillation as imitation learning, on the student's own prefixes.

Each update rolls the student out (no grad, dropout off), mixes its prefixes with the data under a
decaying β, and trains it to take the teacher's action (``argmax``: ImitKD) or to match the teacher's
whole next-token distribution (``full``: ImitKD+Full) at every position of those prefixes. Training
on its own prefixes is what removes the exposure bias of teacher forcing. ImitKD* is this criterion
run over a sequence-level KD corpus (the teacher's beam outputs as the "data").
"""
import functools
from dataclasses import dataclass, field

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from omegaconf import II

from .. import rollout as rollouts
from .. import schedules
from ..errors import OptionError
from ..losses import IMITKD_TARGETS, imitkd_loss
from ..rollout import rollout
from ..schedules import AgreementClock, check_schedule, shape
from ..schedules import beta as beta_at
from ..scoring import length_groups, scored_log_probs
from .kd_criterion import KDCriterion, KDDivergenceConfig, check_range, summed

#: what ``--imitkd-mix`` chooses between: whole rows (the paper) or single steps (DAgger-style)
MIXES = ("sequence", "token")
# each choice list comes from the module that implements it
TARGETS = ChoiceEnum(list(IMITKD_TARGETS))
MIX_CHOICES = ChoiceEnum(list(MIXES))
SCHEDULES = ChoiceEnum(list(schedules.SCHEDULES))
CLOCK_CHOICES = ChoiceEnum(list(schedules.CLOCKS))
SAMPLINGS = ChoiceEnum(list(rollouts.STRATEGIES))
ENGINES = ChoiceEnum(list(rollouts.ENGINES))


@dataclass
class ImitKDConfig(KDDivergenceConfig):
    imitkd_target: TARGETS = field(
        default="argmax",
        metadata={"help": "argmax: the teacher's argmax on student prefixes, gold on data prefixes (ImitKD); "
                  "full: the teacher's whole distribution on every prefix (ImitKD+Full)"},
    )
    imitkd_mix: MIX_CHOICES = field(
        default="sequence",
        metadata={"help": "sequence: each row keeps its data prefix with probability β, else the student's "
                  "rollout (the paper); token: at each step the teacher picks the token with probability β "
                  "(DAgger-style), and its per-step distributions serve as targets"},
    )
    imitkd_beta_schedule: SCHEDULES = field(
        default="exponential", metadata={"help": "β schedule over updates: exponential base^(-t/N), linear, "
                                         "reverse_sigmoid, or constant (--imitkd-beta)"}
    )
    imitkd_beta_base: float = field(
        default=200.0, metadata={"help": "base of the exponential (and steepness of reverse_sigmoid) schedule; "
                                 "paper: 200 IWSLT, 10 CNN/DM, 2 for ImitKD* on WMT"}
    )
    imitkd_beta: float = field(default=0.0, metadata={"help": "β of the constant schedule, in [0, 1]"})
    imitkd_beta_updates: int = field(
        default=0, metadata={"help": "horizon N of the β schedule in updates; 0 means --max-update"}
    )
    imitkd_beta_warmup_updates: int = field(
        default=0, metadata={"help": "β = 1 (data prefixes only) for the first H updates; the schedule then runs "
                             "over the rest of the horizon (updates clock) or starts from the student's "
                             "competence (agreement clock)"}
    )
    imitkd_beta_clock: CLOCK_CHOICES = field(
        default="updates", metadata={"help": "what drives the schedule: updates (t/N, the paper) or agreement "
                                     "(the student's running argmax agreement with the teacher, between "
                                     "--imitkd-agree-low and --imitkd-agree-high; needs no horizon)"}
    )
    imitkd_agree_low: float = field(
        default=0.45, metadata={"help": "agreement clock: at or below this running agreement the schedule is at its "
                               "start (β = 1)"}
    )
    imitkd_agree_high: float = field(
        default=0.6, metadata={"help": "agreement clock: at or above this running agreement the schedule is at its "
                               "end"}
    )
    imitkd_agree_momentum: float = field(
        default=0.95, metadata={"help": "agreement clock: momentum of the moving average of per-update agreement, "
                                "in [0, 1)"}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "label smoothing ε of the one-hot targets (gold and teacher argmax, "
                               "--imitkd-target argmax); the teacher's full distribution is never smoothed"}
    )
    imitkd_sampling: SAMPLINGS = field(
        default="topk", metadata={"help": "how the student rolls out: greedy, or top-k sampling (paper's base "
                                  "IWSLT config: top-5 at temperature 1; greedy in its _full configs)"}
    )
    imitkd_topk: int = field(default=5, metadata={"help": "k of top-k sampling (0: the full distribution)"})
    imitkd_temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollout, > 0"})
    imitkd_teacher_sample: bool = field(
        default=False, metadata={"help": "token mixing: the teacher's action is a sample, not its argmax"}
    )
    imitkd_max_len_a: float = field(
        default=1.2, metadata={"help": "rollouts have at most a·src_len + b tokens (the paper used a=0, b=125)"}
    )
    imitkd_max_len_b: int = field(default=10, metadata={"help": "see --imitkd-max-len-a"})
    imitkd_rollout_engine: ENGINES = field(
        default="auto", metadata={"help": "exact: fairseq's incremental decoding, finished rows dropped; static: "
                                  "fixed shapes, a preallocated K/V cache and CUDA graphs (transformer models; "
                                  "others fall back to exact); auto: static on CUDA, exact on CPU"}
    )
    sentence_avg: bool = II("optimization.sentence_avg")
    max_update: int = II("optimization.max_update")


@register_criterion("imitkd", dataclass=ImitKDConfig)
class ImitKDCriterion(KDCriterion):
    """Train on β-mixed student/data prefixes against the teacher's targets.

    Per update: one rollout (no grad), one teacher pass over the final prefixes (no grad; skipped with
    token mixing, whose rollout already holds the teacher's distributions) and one student pass with
    grad. Validation scores gold prefixes only (β=1), which keeps the validation loss deterministic;
    select checkpoints by ``--eval-bleu`` all the same.
    """

    def __init__(
        self, task, imitkd_target, imitkd_mix, imitkd_beta_schedule, imitkd_beta_base, imitkd_beta,
        imitkd_beta_updates, imitkd_beta_warmup_updates, imitkd_beta_clock, imitkd_agree_low, imitkd_agree_high,
        imitkd_agree_momentum, label_smoothing, imitkd_sampling, imitkd_topk, imitkd_temperature,
        imitkd_teacher_sample, imitkd_max_len_a, imitkd_max_len_b, sentence_avg, max_update,
        imitkd_rollout_engine="auto",
        kd_divergence="forward_kl", kd_jsd_beta=0.5, kd_atkd_alpha=0.2, kd_teacher_topk=0,
    ):
        super().__init__(task)
        self.set_divergence(kd_divergence, kd_jsd_beta, kd_atkd_alpha, kd_teacher_topk)
        if (self.divergence != "forward_kl" or kd_teacher_topk) and str(imitkd_target) != "full":
            raise OptionError("--kd-divergence and --kd-teacher-topk compare whole distributions: they need "
                             "--imitkd-target full (argmax targets are one-hot)")
        self.target = str(imitkd_target)
        self.mix = str(imitkd_mix)
        self.schedule = str(imitkd_beta_schedule)
        self.base = imitkd_beta_base
        self.constant = imitkd_beta
        self.horizon = imitkd_beta_updates or max_update
        check_range("imitkd-beta", imitkd_beta, 0.0, 1.0)
        check_range("imitkd-temperature", imitkd_temperature, 0.0, float("inf"), low_open=True, high_open=True)
        check_range("imitkd-topk", imitkd_topk, 0, float("inf"), high_open=True)
        check_range("imitkd-max-len-a", imitkd_max_len_a, 0.0, float("inf"), high_open=True)
        check_range("label-smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        if imitkd_beta_updates < 0:
            raise OptionError(f"--imitkd-beta-updates must be >= 0, got {imitkd_beta_updates}")
        if imitkd_beta_warmup_updates < 0:
            raise OptionError(f"--imitkd-beta-warmup-updates must be >= 0, got {imitkd_beta_warmup_updates}")
        if self.schedule in ("exponential", "reverse_sigmoid"):
            check_range("imitkd-beta-base", imitkd_beta_base, 1.0, float("inf"), low_open=True, high_open=True)
        self.warmup = imitkd_beta_warmup_updates
        self.clock = None
        if str(imitkd_beta_clock) == "agreement":
            check_range("imitkd-agree-low", imitkd_agree_low, 0.0, 1.0, high_open=True)
            check_range("imitkd-agree-high", imitkd_agree_high, 0.0, 1.0, low_open=True)
            check_range("imitkd-agree-momentum", imitkd_agree_momentum, 0.0, 1.0, high_open=True)
            if not imitkd_agree_low < imitkd_agree_high:
                raise OptionError(f"--imitkd-agree-low ({imitkd_agree_low}) must be below --imitkd-agree-high "
                                 f"({imitkd_agree_high})")
            self.clock = AgreementClock(imitkd_agree_low, imitkd_agree_high, imitkd_agree_momentum)
            check_schedule(self.schedule, 1, self.base, self.constant)  # progress replaces t/N: no horizon
        else:
            check_schedule(self.schedule, self.horizon, self.base, self.constant, self.warmup)
        self.eps = label_smoothing
        self.rollout_args = dict(
            max_len_a=imitkd_max_len_a, max_len_b=imitkd_max_len_b, sampling=str(imitkd_sampling),
            topk=imitkd_topk, temperature=imitkd_temperature, engine=str(imitkd_rollout_engine),
        )
        self.teacher_sample = imitkd_teacher_sample
        self.sentence_avg = sentence_avg

    def current_beta(self) -> float:
        if self.clock is None:
            return beta_at(self.schedule, self.update_num, self.horizon, self.base, self.constant, self.warmup)
        if self.update_num < self.warmup:
            return 1.0
        return shape(self.schedule, self.clock.progress, self.base, self.constant)

    # The agreement clock's state: the task feeds it the all-reduced sums of every training update and
    # checkpoints it (DistillationTask.state_dict), so that every worker and a resumed run see the same β.
    def observe_update(self, logging_outputs) -> None:
        if self.clock is not None:
            self.clock.observe(summed(logging_outputs, "train_agree"), summed(logging_outputs, "train_scored"))

    def schedule_state(self):
        return None if self.clock is None else self.clock.state_dict()

    def load_schedule_state(self, state) -> None:
        if self.clock is not None and state is not None:
            self.clock.load_state_dict(state)

    def forward(self, model, sample, reduce=True):
        teacher = self.teacher_for(model)
        net_input = sample["net_input"]
        src_tokens, src_lengths = net_input["src_tokens"], net_input["src_lengths"]
        beta = self.current_beta() if model.training else 1.0
        token_mixed = model.training and self.mix == "token"
        if token_mixed:
            # the rollout already holds the teacher's distributions: no second teacher pass
            prev, target, ro, stats = self._token_mixed(model, teacher, sample, beta)
        else:
            prev, target, on_policy, stats = self._sequence_mixed(model, sample, beta)
        full_mask = target.ne(self.padding_idx)
        # Teacher and student passes run per length group (scoring.length_groups): the same sum over the
        # same positions, over fewer padded cells. The loss is a sum over positions, so it is summed group by
        # group: the groups' (N, V) log-probs are never concatenated (a copy of each, and of its gradient).
        ids = sample.get("id")
        loss, n_agree = 0.0, 0
        batch_level = self.divergence == "atkd"  # a median and group means over the whole batch
        parts = []
        for rows, width in length_groups(full_mask.sum(1)):
            pick = (lambda x: x[:, :width]) if rows is None else (lambda x, rows=rows: x[rows, :width])
            src, src_len = (src_tokens, src_lengths) if rows is None else (src_tokens[rows], src_lengths[rows])
            mask = pick(full_mask)
            if token_mixed:
                g_teacher = ro.teacher_lprobs_at(rows) if ro.teacher_lprobs is not None else None
                g_argmax = pick(ro.teacher_argmax)[mask]
                g_on_policy = torch.ones_like(g_argmax, dtype=torch.bool)
            else:
                g_ids = ids if ids is None or rows is None else ids[rows]
                g_teacher = teacher.log_probs(src, src_len, pick(prev), mask, ids=g_ids)
                g_argmax = g_teacher.argmax(-1)
                g_on_policy = (on_policy if rows is None else on_policy[rows]).unsqueeze(1).expand_as(mask)[mask]
            g_student = scored_log_probs(model, src, src_len, pick(prev), mask)
            # the token that comes next at each position: what ATKD splits the distributions by
            g_next = pick(ro.tokens)[mask] if token_mixed else pick(target)[mask]
            g = dict(teacher_lprobs=g_teacher, teacher_argmax=g_argmax, gold=pick(target)[mask],
                     on_policy=g_on_policy, next_tokens=g_next)
            if batch_level:
                parts.append((g_student, g))
            else:
                loss = loss + imitkd_loss(g_student, self.target, epsilon=self.eps, divergence=self.divergence,
                                          **g, **self.divergence_args)
            n_agree = n_agree + (g_student.argmax(-1) == g_argmax).sum().data
        if batch_level:
            joined = {k: torch.cat([g[k] for _, g in parts]) for k in parts[0][1]}
            loss = imitkd_loss(torch.cat([p for p, _ in parts]), self.target, epsilon=self.eps,
                               divergence=self.divergence, **joined, **self.divergence_args)

        n_scored = int(full_mask.sum())
        nsentences = src_tokens.size(0)
        sample_size = nsentences if self.sentence_avg else n_scored
        logging_output = {
            "loss": loss.data,
            "kd_loss": loss.data,
            "n_agree": n_agree,
            "n_scored": n_scored,
            "ntokens": sample["ntokens"],
            "nsentences": nsentences,
            "sample_size": sample_size,
            "beta_x_sents": beta * nsentences,
            **stats,
        }
        if model.training:  # what the agreement clock reads (validation must not move it)
            logging_output.update(train_agree=n_agree, train_scored=n_scored)
            if self.clock is not None:
                logging_output["progress_x_sents"] = self.clock.progress * nsentences
        return loss, sample_size, logging_output

    def _sequence_mixed(self, model, sample, beta):
        """Each row keeps its data prefix with probability β, else takes the student's rollout."""
        gold_prev = sample["net_input"]["prev_output_tokens"]
        gold = sample["target"]
        bsz = gold.size(0)
        if beta >= 1.0:
            return gold_prev, gold, gold.new_zeros(bsz, dtype=torch.bool), {"n_on_policy": 0, "rollout_tokens": 0}
        # torch's global RNG: fairseq reseeds it every update, so a resumed run draws the same rows
        on_policy = torch.rand(bsz, device=gold.device) >= beta
        rows = on_policy.nonzero().squeeze(1)
        if rows.numel() == 0:
            return gold_prev, gold, on_policy, {"n_on_policy": 0, "rollout_tokens": 0}
        ro = rollout(
            model, sample["net_input"]["src_tokens"][rows], sample["net_input"]["src_lengths"][rows],
            **self.rollout_args,
        )
        data = ~on_policy
        has_data = bool(data.any())
        # no wider than the rows actually kept: padding costs a full pass of teacher and student
        width = max(ro.tokens.size(1), gold.size(1) if has_data else 0)
        prev = gold_prev.new_full((bsz, width), self.padding_idx)
        target = gold.new_full((bsz, width), self.padding_idx)
        if has_data:
            prev[data, : gold.size(1)] = gold_prev[data]
            target[data, : gold.size(1)] = gold[data]
        prev[rows, : ro.tokens.size(1)] = ro.prev_output_tokens
        target[rows, : ro.tokens.size(1)] = ro.tokens  # only its pad pattern is used for student rows
        stats = {"n_on_policy": int(rows.numel()), "rollout_tokens": int(ro.lengths.sum())}
        return prev, target, on_policy, stats

    def _token_mixed(self, model, teacher, sample, beta):
        """Teacher and student decode side by side; the teacher acts with probability β at each step."""
        ro = rollout(
            model, sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"], teacher=teacher,
            teacher_prob=beta, teacher_sample=self.teacher_sample, keep_teacher_lprobs=self.target == "full",
            **self.rollout_args,
        )
        mask = ro.tokens.ne(self.padding_idx)
        target = ro.teacher_argmax.masked_fill(~mask, self.padding_idx)
        n_tokens = int(ro.lengths.sum())
        stats = {
            "n_on_policy_tokens": n_tokens - int(ro.teacher_tokens),
            "rollout_tokens": n_tokens,
            "n_rollouts": ro.tokens.size(0),
        }
        return ro.prev_output_tokens, target, ro, stats

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        total = functools.partial(summed, logging_outputs)
        nsentences = total("nsentences")
        if nsentences > 0 and any("beta_x_sents" in log for log in logging_outputs):
            metrics.log_scalar("beta", total("beta_x_sents") / nsentences, nsentences, round=4)
        if nsentences > 0 and any("progress_x_sents" in log for log in logging_outputs):
            metrics.log_scalar("beta_progress", total("progress_x_sents") / nsentences, nsentences, round=4)
        if any("n_on_policy" in log for log in logging_outputs):  # sequence mixing: fraction of rows
            metrics.log_scalar("on_policy", total("n_on_policy") / max(nsentences, 1), nsentences, round=3)
            n_rolled = total("n_on_policy")
            if n_rolled > 0:
                metrics.log_scalar("rollout_len", total("rollout_tokens") / n_rolled, n_rolled, round=2)
        if any("n_on_policy_tokens" in log for log in logging_outputs):  # token mixing: fraction of tokens
            n_tokens = total("rollout_tokens")
            metrics.log_scalar("on_policy", total("n_on_policy_tokens") / max(n_tokens, 1), n_tokens, round=3)
            metrics.log_scalar("rollout_len", n_tokens / max(total("n_rollouts"), 1), total("n_rollouts"), round=2)
