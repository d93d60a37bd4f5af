"""ImitKD (Lin et al., EMNLP 2020): distillation as imitation learning, on the student's own prefixes.

Each update rolls the student out (no grad, dropout off), mixes its prefixes with the data under a
decaying β, and trains it to take the teacher's action (``argmax``: ImitKD) or to match the teacher's
whole next-token distribution (``full``: ImitKD+Full) at every position of those prefixes. Training
on its own prefixes is what removes the exposure bias of teacher forcing. ImitKD* is this criterion
run over a sequence-level KD corpus (the teacher's beam outputs as the "data").
"""
import functools
from dataclasses import dataclass
from typing import Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from omegaconf import II

from .. import rollout as rollouts
from ..errors import OptionError
from ..flags import check_range, flag
from ..losses import IMITKD_TARGETS, imitkd_loss
from ..rollout import Rollout, rollout
from ..schedules import BetaSchedule, BetaScheduleConfig
from ..scoring import length_groups, scored_log_probs
from ..teacher import TeacherScores
from .kd_criterion import KDCriterion, KDDivergenceConfig, summed

#: what ``--imitkd-mix`` chooses between: whole rows (the paper) or single steps (DAgger-style)
MIXES = ("sequence", "token")
# each choice list comes from the module that implements it
TARGETS = ChoiceEnum(list(IMITKD_TARGETS))
MIX_CHOICES = ChoiceEnum(list(MIXES))
SAMPLINGS = ChoiceEnum(list(rollouts.STRATEGIES))
ENGINES = ChoiceEnum(list(rollouts.ENGINES))


@dataclass
class ImitKDConfig(BetaScheduleConfig, KDDivergenceConfig):
    imitkd_target: TARGETS = flag("argmax", "argmax: the teacher's argmax on student prefixes, gold on data prefixes "
                                            "(ImitKD); full: the teacher's whole distribution on every prefix "
                                            "(ImitKD+Full)")
    imitkd_mix: MIX_CHOICES = flag("sequence", "sequence: each row keeps its data prefix with probability β, else "
                                               "the student's rollout (the paper); token: at each step the teacher "
                                               "picks the token with probability β (DAgger-style), and its per-step "
                                               "distributions serve as targets")
    label_smoothing: float = flag(0.0, "label smoothing ε of the one-hot targets (gold and teacher argmax, "
                                       "--imitkd-target argmax); the teacher's full distribution is never smoothed")
    imitkd_sampling: SAMPLINGS = flag("topk", "how the student rolls out: greedy, or top-k sampling (paper's base "
                                              "IWSLT config: top-5 at temperature 1; greedy in its _full configs)")
    imitkd_topk: int = flag(5, "k of top-k sampling (0: the full distribution)")
    imitkd_temperature: float = flag(1.0, "sampling temperature of the rollout, > 0")
    imitkd_teacher_sample: bool = flag(False, "token mixing: the teacher's action is a sample, not its argmax")
    imitkd_max_len_a: float = flag(1.2, "rollouts have at most a·src_len + b tokens (the paper used a=0, b=125)")
    imitkd_max_len_b: int = flag(10, "see --imitkd-max-len-a")
    imitkd_rollout_engine: ENGINES = flag("auto", "exact: fairseq's incremental decoding, finished rows dropped; "
                                                  "static: fixed shapes, a preallocated K/V cache and CUDA graphs "
                                                  "(transformer models; others fall back to exact); auto: static on "
                                                  "CUDA, exact on CPU")
    sentence_avg: bool = II("optimization.sentence_avg")


def _take(x: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """The rows ``rows`` of ``x`` (None: all of them, uncopied), as ``scoring.length_groups`` names them."""
    return x if rows is None else x[rows]


@dataclass
class PrefixGroup:
    """The scored positions of some rows of :class:`Prefixes`, flattened in row-major order."""

    prev: torch.Tensor  # (b, width) what the student (and teacher) are fed
    mask: torch.Tensor  # (b, width) the scored positions
    next_tokens: torch.Tensor  # (n,) the token that comes next at each: gold on data rows, rolled out elsewhere
    on_policy: torch.Tensor  # (n,) whether its prefix is (partly) the student's own

    def at(self, per_row: torch.Tensor) -> torch.Tensor:
        """A ``(b, >= width)`` tensor at this group's scored positions."""
        return per_row[:, : self.mask.size(1)][self.mask]


@dataclass
class Prefixes:
    """What one update trains on, from either mixing mode: the prefixes, the next token at each position
    (pad where nothing is scored), which rows are the student's own, and the rollout when it holds the
    teacher's targets (token mixing)."""

    prev: torch.Tensor  # (B, T)
    next_tokens: torch.Tensor  # (B, T), pad after each row's end
    on_policy: torch.Tensor  # (B,)
    pad: int
    stats: dict
    rollout: Optional[Rollout] = None

    @property
    def mask(self) -> torch.Tensor:
        return self.next_tokens.ne(self.pad)

    def group(self, rows: Optional[torch.Tensor], width: int) -> PrefixGroup:
        """The rows ``rows`` (None: all), cut to ``width``."""
        pick = (lambda x: x[:, :width]) if rows is None else (lambda x: x[rows, :width])
        mask = pick(self.mask)
        on_policy = _take(self.on_policy, rows)
        return PrefixGroup(pick(self.prev), mask, pick(self.next_tokens)[mask],
                           on_policy.unsqueeze(1).expand_as(mask)[mask])

    @staticmethod
    def cat_positions(groups) -> PrefixGroup:
        """Several groups' positions as one (for a batch-level loss, which reads only the flat fields)."""
        return PrefixGroup(None, None, torch.cat([g.next_tokens for g in groups]),
                           torch.cat([g.on_policy for g in groups]))


@register_criterion("imitkd", dataclass=ImitKDConfig)
class ImitKDCriterion(KDCriterion):
    """Train on β-mixed student/data prefixes against the teacher's targets.

    Per update: one rollout (no grad), one teacher pass over the final prefixes (no grad; skipped with
    token mixing, whose rollout already holds the teacher's distributions) and one student pass with
    grad. Validation scores gold prefixes only (β=1), which keeps the validation loss deterministic;
    select checkpoints by ``--eval-bleu`` all the same.
    """

    def __init__(self, task, cfg: ImitKDConfig):
        super().__init__(task)
        self.target = str(cfg.imitkd_target)
        self.mix = str(cfg.imitkd_mix)
        if cfg.kd_teacher_cache and self.mix == "token":
            raise OptionError("--kd-teacher-cache holds the teacher on gold prefixes; --imitkd-mix token decodes with "
                              "the live teacher at every step and would never read it (use --imitkd-mix sequence)")
        self.set_divergence(cfg.kd_divergence, cfg.kd_jsd_beta, cfg.kd_atkd_alpha, cfg.kd_teacher_topk,
                            cfg.kd_teacher_cache, cfg.train_subset, cfg.valid_subset)
        if (self.divergence != "forward_kl" or self.divergence_args["teacher_topk"]) and self.target != "full":
            raise OptionError("--kd-divergence, --kd-teacher-topk and --kd-teacher-cache compare whole distributions: "
                              "they need --imitkd-target full (argmax targets are one-hot)")
        check_range("imitkd-temperature", cfg.imitkd_temperature, 0.0, float("inf"), low_open=True, high_open=True)
        check_range("imitkd-topk", cfg.imitkd_topk, 0, float("inf"), high_open=True)
        check_range("imitkd-max-len-a", cfg.imitkd_max_len_a, 0.0, float("inf"), high_open=True)
        check_range("label-smoothing", cfg.label_smoothing, 0.0, 1.0, high_open=True)
        self.schedule = BetaSchedule.from_config(cfg)
        self.eps = cfg.label_smoothing
        self.rollout_args = dict(
            max_len_a=cfg.imitkd_max_len_a, max_len_b=cfg.imitkd_max_len_b, sampling=str(cfg.imitkd_sampling),
            topk=cfg.imitkd_topk, temperature=cfg.imitkd_temperature, engine=str(cfg.imitkd_rollout_engine),
        )
        self.teacher_sample = cfg.imitkd_teacher_sample
        self.sentence_avg = cfg.sentence_avg

    # The β schedule's state: the task feeds it the all-reduced sums of every training update and checkpoints
    # it (DistillationTask.state_dict), so that every worker and a resumed run see the same β.
    def current_beta(self) -> float:
        return self.schedule.beta(self.update_num)

    def observe_update(self, logging_outputs) -> None:
        self.schedule.observe(summed(logging_outputs, "train_agree"), summed(logging_outputs, "train_scored"))

    def schedule_state(self):
        return self.schedule.state_dict()

    def load_schedule_state(self, state) -> None:
        self.schedule.load_state_dict(state)

    def forward(self, model, sample, reduce=True):
        """Mix the prefixes, then score every group of them against the teacher's targets."""
        beta = self.current_beta() if model.training else 1.0
        teacher = self.teacher_for(model)
        if model.training and self.mix == "token":
            prefixes = self.token_mixed_prefixes(model, teacher, sample, beta)
        else:
            prefixes = self.sequence_mixed_prefixes(model, sample, beta)
        loss, n_agree = self.score(model, teacher, sample, prefixes)
        return self.logged(model, sample, prefixes, beta, loss, n_agree)

    def score(self, model, teacher, sample, prefixes: "Prefixes"):
        """The loss and the student's agreement with the teacher's argmax, summed over the scored positions.

        Teacher and student passes run per length group (scoring.length_groups): the same sum over the same
        positions, over fewer padded cells. The groups' ``(N, V)`` log-probs are never concatenated (a copy of
        each, and of its gradient), except for ATKD, a loss over the whole batch (a median and group means).
        """
        net_input = sample["net_input"]
        keys = self.row_keys(sample, model.training, gold=~prefixes.on_policy)
        loss, n_agree, parts = 0.0, 0, []
        for rows, width in length_groups(prefixes.mask.sum(1)):
            group = prefixes.group(rows, width)
            src, src_len = _take(net_input["src_tokens"], rows), _take(net_input["src_lengths"], rows)
            if prefixes.rollout is not None:  # token mixing: the rollout holds the teacher's targets
                ro = prefixes.rollout
                targets = TeacherScores(ro.teacher_lprobs_at(rows) if ro.teacher_lprobs is not None else None,
                                        actions=group.at(_take(ro.teacher_argmax, rows)))
            else:
                targets = teacher.scores(src, src_len, group.prev, group.mask, keys and keys[rows])
            student = scored_log_probs(model, src, src_len, group.prev, group.mask)
            n_agree = n_agree + (student.argmax(-1) == targets.argmax).sum().data
            if self.divergence == "atkd":
                parts.append((student, targets, group))
            else:
                loss = loss + self.loss(student, targets, group)
        if parts:
            loss = self.loss(torch.cat([p[0] for p in parts]), TeacherScores.cat([p[1] for p in parts]),
                             Prefixes.cat_positions([p[2] for p in parts]))
        return loss, n_agree

    def loss(self, student, targets: TeacherScores, group: "PrefixGroup"):
        return imitkd_loss(student, self.target, teacher_lprobs=targets.lprobs, teacher_index=targets.index,
                           teacher_argmax=targets.argmax, gold=group.next_tokens, on_policy=group.on_policy,
                           next_tokens=group.next_tokens, epsilon=self.eps, divergence=self.divergence,
                           **self.divergence_args)

    def logged(self, model, sample, prefixes: "Prefixes", beta: float, loss, n_agree):
        n_scored = int(prefixes.mask.sum())
        nsentences = sample["net_input"]["src_tokens"].size(0)
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
            **prefixes.stats,
        }
        if model.training:  # what the agreement clock reads (validation must not move it)
            logging_output.update(train_agree=n_agree, train_scored=n_scored)
            if self.schedule.progress is not None:
                logging_output["progress_x_sents"] = self.schedule.progress * nsentences
        return loss, sample_size, logging_output

    def sequence_mixed_prefixes(self, model, sample, beta) -> "Prefixes":
        """Each row keeps its data prefix with probability β, else takes the student's rollout."""
        gold_prev = sample["net_input"]["prev_output_tokens"]
        gold = sample["target"]
        bsz = gold.size(0)
        # torch's global RNG: fairseq reseeds it every update, so a resumed run draws the same rows
        on_policy = (torch.rand(bsz, device=gold.device) >= beta if beta < 1.0
                     else gold.new_zeros(bsz, dtype=torch.bool))
        rows = on_policy.nonzero().squeeze(1)
        if rows.numel() == 0:
            return Prefixes(gold_prev, gold, on_policy, self.padding_idx, {"n_on_policy": 0, "rollout_tokens": 0})
        ro = rollout(
            model, sample["net_input"]["src_tokens"][rows], sample["net_input"]["src_lengths"][rows],
            **self.rollout_args,
        )
        data = ~on_policy
        has_data = bool(data.any())
        # no wider than the rows actually kept: padding costs a full pass of teacher and student
        width = max(ro.tokens.size(1), gold.size(1) if has_data else 0)
        prev = gold_prev.new_full((bsz, width), self.padding_idx)
        next_tokens = gold.new_full((bsz, width), self.padding_idx)
        if has_data:
            prev[data, : gold.size(1)] = gold_prev[data]
            next_tokens[data, : gold.size(1)] = gold[data]
        prev[rows, : ro.tokens.size(1)] = ro.prev_output_tokens
        next_tokens[rows, : ro.tokens.size(1)] = ro.tokens
        stats = {"n_on_policy": int(rows.numel()), "rollout_tokens": int(ro.lengths.sum())}
        return Prefixes(prev, next_tokens, on_policy, self.padding_idx, stats)

    def token_mixed_prefixes(self, model, teacher, sample, beta) -> "Prefixes":
        """Teacher and student decode side by side; the teacher acts with probability β at each step, and its
        per-step distributions are kept as the targets (no second teacher pass)."""
        ro = rollout(
            model, sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"], teacher=teacher,
            teacher_prob=beta, teacher_sample=self.teacher_sample, keep_teacher_lprobs=self.target == "full",
            **self.rollout_args,
        )
        n_tokens = int(ro.lengths.sum())
        stats = {
            "n_on_policy_tokens": n_tokens - int(ro.teacher_tokens),
            "rollout_tokens": n_tokens,
            "n_rollouts": ro.tokens.size(0),
        }
        # every prefix is (partly) rolled out: every target is the teacher's action
        on_policy = ro.tokens.new_ones(ro.tokens.size(0), dtype=torch.bool)
        return Prefixes(ro.prev_output_tokens, ro.tokens, on_policy, self.padding_idx, stats, rollout=ro)

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
