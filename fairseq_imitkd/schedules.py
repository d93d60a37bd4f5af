"""Mixing-rate (beta) schedules for ImitKD.

ImitKD (Lin et al., 2020) rolls out a mixture of the teacher (or the data) and the
student: with probability ``beta_t`` the next token comes from the teacher, otherwise
from the student.  Training starts close to teacher forcing (``beta = 1``) and moves
towards fully on-policy student rollouts (``beta -> 0``) as the update number ``t``
approaches the horizon ``N``.

The paper's schedules are pure functions of ``(t, N)``: a resumed run recomputes exactly the same
value from the restored update number. Their weakness is the clock: with a short budget ``N``, β falls
while the student is still incompetent, and most updates then train on near-random prefixes. Two
additions make β transfer across budgets:

* a warm-up: β = 1 for the first ``H`` updates, then the schedule over the rest of the horizon;
* :class:`AgreementClock`, which replaces ``t / N`` by the student's measured competence (its running
  argmax agreement with the teacher). It is the one piece of schedule state, and it is checkpointed.

:class:`BetaSchedule` holds all of it (curve, horizon, warm-up, clock), built from the flags of
:class:`BetaScheduleConfig`: the criterion asks it for β, the task checkpoints its ``state_dict``.
"""

import math
from dataclasses import dataclass
from typing import Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from .errors import OptionError
from .flags import check_range, flag

SCHEDULES = ("exponential", "linear", "reverse_sigmoid", "constant")
CLOCKS = ("updates", "agreement")
SCHEDULE_CHOICES = ChoiceEnum(list(SCHEDULES))
CLOCK_CHOICES = ChoiceEnum(list(CLOCKS))


@dataclass
class BetaScheduleConfig(FairseqDataclass):
    """The flags of ImitKD's β, read by :meth:`BetaSchedule.from_config`."""

    imitkd_beta_schedule: SCHEDULE_CHOICES = flag("exponential", "β schedule over updates: exponential base^(-t/N), "
                                                                 "linear, reverse_sigmoid, or constant "
                                                                 "(--imitkd-beta)")
    imitkd_beta_base: float = flag(200.0, "base of the exponential (and steepness of reverse_sigmoid) schedule; "
                                          "paper: 200 IWSLT, 10 CNN/DM, 2 for ImitKD* on WMT")
    imitkd_beta: float = flag(0.0, "β of the constant schedule, in [0, 1]")
    imitkd_beta_updates: int = flag(0, "horizon N of the β schedule in updates; 0 means --max-update")
    imitkd_beta_warmup_updates: int = flag(0, "β = 1 (data prefixes only) for the first H updates; the schedule then "
                                              "runs over the rest of the horizon (updates clock) or starts from the "
                                              "student's competence (agreement clock)")
    imitkd_beta_clock: CLOCK_CHOICES = flag("updates", "what drives the schedule: updates (t/N, the paper) or "
                                                       "agreement (the student's running argmax agreement with the "
                                                       "teacher, between --imitkd-agree-low and --imitkd-agree-high; "
                                                       "needs no horizon)")
    imitkd_agree_low: float = flag(0.45, "agreement clock: at or below this running agreement the schedule is at its "
                                         "start (β = 1)")
    imitkd_agree_high: float = flag(0.6, "agreement clock: at or above this running agreement the schedule is at its "
                                         "end")
    imitkd_agree_momentum: float = flag(0.95, "agreement clock: momentum of the moving average of per-update "
                                              "agreement, in [0, 1)")
    max_update: int = II("optimization.max_update")


def _check_curve(name: str) -> None:
    if name not in SCHEDULES:
        raise OptionError(f"--imitkd-beta-schedule: unknown beta schedule {name!r}; valid schedules: "
                          f"{', '.join(SCHEDULES)}")


class BetaSchedule:
    """ImitKD's β at every update: the curve, its warm-up, its clock, their checks and their state.

    One object so that a criterion asks only ``beta(update_num)`` and a task checkpoints ``state_dict()``
    without knowing which clock runs. Every check happens here, when the criterion is built, not at its
    first update hours into a job; messages name the flags.
    """

    def __init__(self, curve: str = "exponential", horizon: Optional[int] = None, base: float = 200.0,
                 constant: float = 0.0, warmup: int = 0, clock: Optional["AgreementClock"] = None):
        _check_curve(curve)
        if warmup < 0:
            raise OptionError(f"--imitkd-beta-warmup-updates must be >= 0, got {warmup}")
        check_range("imitkd-beta", constant, 0, 1)  # whatever the curve: a value given out of range is a mistake
        if curve in ("exponential", "reverse_sigmoid") and not base > 1.0:
            raise OptionError(f"the {curve!r} beta schedule needs base > 1 (--imitkd-beta-base), got {base}")
        if curve != "constant" and clock is None:  # the updates clock: progress is (t - H) / (N - H)
            if horizon is None or horizon <= 0:
                raise OptionError(f"the {curve!r} beta schedule needs a horizon: set --imitkd-beta-updates or "
                                  f"--max-update to a positive number of updates (got {horizon})")
            if horizon <= warmup:
                raise OptionError(f"--imitkd-beta-warmup-updates ({warmup}) must be smaller than the schedule's "
                                  f"horizon ({horizon} updates)")
        self.curve, self.horizon, self.base, self.constant, self.warmup = curve, horizon, base, constant, warmup
        self.clock = clock

    @classmethod
    def from_config(cls, cfg) -> "BetaSchedule":
        """From the :class:`BetaScheduleConfig` fields of a criterion's config."""
        if cfg.imitkd_beta_updates < 0:
            raise OptionError(f"--imitkd-beta-updates must be >= 0, got {cfg.imitkd_beta_updates}")
        clock = None
        if str(cfg.imitkd_beta_clock) == "agreement":
            clock = AgreementClock(cfg.imitkd_agree_low, cfg.imitkd_agree_high, cfg.imitkd_agree_momentum)
        return cls(str(cfg.imitkd_beta_schedule), cfg.imitkd_beta_updates or cfg.max_update, cfg.imitkd_beta_base,
                   cfg.imitkd_beta, cfg.imitkd_beta_warmup_updates, clock)

    @property
    def progress(self) -> Optional[float]:
        """The agreement clock's progress in [0, 1] (None with the updates clock), for the logs."""
        return None if self.clock is None else self.clock.progress

    def beta(self, update_num: int) -> float:
        """Probability of taking the teacher's (or the data's) token at update ``update_num``.

        β = 1 for the first ``warmup`` updates; after that the curve runs at progress
        ``x = min(t - H, N - H) / (N - H)`` (``H = warmup``; ``H = 0`` is the paper), or at the agreement
        clock's progress. ``constant`` ignores the progress but not the warm-up's β = 1.
        """
        if update_num < 0:
            raise OptionError(f"update_num must be >= 0, got {update_num}")
        if update_num < self.warmup:
            return 1.0
        if self.clock is not None:
            return shape(self.curve, self.clock.progress, self.base, self.constant)
        if self.curve == "constant":
            return float(self.constant)
        span = self.horizon - self.warmup
        return shape(self.curve, min(update_num - self.warmup, span) / span, self.base, self.constant)

    def observe(self, n_agree: float, n_scored: float) -> None:
        """One update's all-reduced agreement counts: they move the agreement clock (nothing else)."""
        if self.clock is not None:
            self.clock.observe(n_agree, n_scored)

    def state_dict(self) -> Optional[dict]:
        """What a resumed run needs to continue with the same β (None: β is a function of the update)."""
        return None if self.clock is None else self.clock.state_dict()

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.clock is not None and state is not None:
            self.clock.load_state_dict(state)


def beta(schedule: str, update_num: int, total_updates: int, base: float = 200.0, constant: float = 0.0,
         warmup: int = 0) -> float:
    """β of the paper's clock at update ``update_num`` of ``total_updates`` (:meth:`BetaSchedule.beta`)."""
    return BetaSchedule(schedule, total_updates, base, constant, warmup).beta(update_num)


def shape(schedule: str, progress: float, base: float = 200.0, constant: float = 0.0) -> float:
    """β at ``progress`` x in [0, 1] (x = t / N for the paper's clock).

    * ``exponential``: ``base ** (-x)``; 1 at ``x = 0`` and ``1 / base`` at ``x = 1``.  The paper
      uses ``base = 200`` (IWSLT), 10 (CNN/DM) and 2 (its ImitKD* WMT runs).
    * ``linear``: ``1 - x``; from 1 to 0.
    * ``reverse_sigmoid``: a logistic curve whose log-odds fall linearly from ``+ln(base)`` to
      ``-ln(base)`` over ``[0, 1]``, rescaled so that it is exactly 1 at ``x = 0``, exactly 0 at
      ``x = 1`` and 0.5 at ``x = 1/2``.  ``base`` sets the steepness: it is the odds
      ``beta / (1 - beta)`` of the un-rescaled curve at ``x = 0`` (200 -> log-odds from +5.3 to -5.3,
      a pronounced S; close to 1 the curve tends to the straight line of ``linear``).  Compared to
      ``linear`` it stays near teacher forcing longer and reaches on-policy sooner.
    * ``constant``: ``constant`` at every x (0: fully on-policy; 1: teacher / data only).

    Progress past 1 keeps the value at 1.  The result is clamped to ``[0, 1]``.
    """
    if schedule == "constant":
        return float(constant)
    frac = min(max(float(progress), 0.0), 1.0)
    if schedule == "exponential":
        value = base ** (-frac)
    elif schedule == "linear":
        value = 1.0 - frac
    elif schedule == "reverse_sigmoid":
        def curve(x: float) -> float:
            # logistic with log-odds ln(base) * (1 - 2x), written via tanh for stability
            return 0.5 * (1.0 + math.tanh(0.5 * math.log(base) * (1.0 - 2.0 * x)))

        start, end = curve(0.0), curve(1.0)
        value = (curve(frac) - end) / (start - end)
    else:
        _check_curve(schedule)
    return min(1.0, max(0.0, float(value)))


class AgreementClock:
    """Schedule progress that follows the student's competence instead of the update count.

    The signal is the fraction of scored positions where the student's argmax equals the teacher's,
    which the criterion computes anyway (``kd_agree`` in the logs): on gold prefixes it is the
    student's token accuracy against the teacher, on its own rollouts whether the teacher would
    continue them as the student does. Each update adds its agreement to an exponential moving
    average (the first update sets it), and

        progress = max(progress so far, clamp((ema - low) / (high - low), 0, 1))

    feeds :func:`shape` in place of ``t / N``. Why so:

    * agreement, not validation BLEU: it exists at every update at no cost and is the same on every
      data-parallel worker (it is computed from the all-reduced logging sums), so all workers draw
      with the same β;
    * a moving average: one batch's agreement is noisy (short sentences, easy batches);
    * a ratchet (progress never falls): as β falls, more positions lie on the student's own
      prefixes, where agreement is lower at first. Without the ratchet that dip would raise β again
      and the schedule could oscillate; with it, β falls monotonically, as in the paper;
    * ``low`` and ``high`` in agreement units: a student past ``high`` is taken to be competent
      (fully on the schedule's end value), one below ``low`` is trained on data only.

    The state (ema, progress, observations) is checkpointed through the task, so a resumed run
    continues with exactly the β the uninterrupted run would have used.
    """

    def __init__(self, low: float = 0.45, high: float = 0.6, momentum: float = 0.95):
        if not 0.0 <= low < high <= 1.0:
            raise OptionError(f"--imitkd-agree-low/--imitkd-agree-high: the agreement clock needs "
                              f"0 <= low < high <= 1, got low={low}, high={high}")
        if not 0.0 <= momentum < 1.0:
            raise OptionError(f"--imitkd-agree-momentum: the agreement clock's momentum must be in [0, 1), "
                              f"got {momentum}")
        self.low, self.high, self.momentum = low, high, momentum
        self.ema: Optional[float] = None
        self.progress = 0.0
        self.observations = 0

    def observe(self, n_agree: float, n_scored: float) -> None:
        """Add one update's counts; an update that scored nothing leaves the clock as it is."""
        if n_scored <= 0:
            return
        value = float(n_agree) / float(n_scored)
        self.ema = value if self.ema is None else self.momentum * self.ema + (1.0 - self.momentum) * value
        self.observations += 1
        reached = (self.ema - self.low) / (self.high - self.low)
        self.progress = max(self.progress, min(1.0, max(0.0, reached)))

    def state_dict(self) -> dict:
        return {"ema": self.ema, "progress": self.progress, "observations": self.observations}

    def load_state_dict(self, state: dict) -> None:
        self.ema = None if state.get("ema") is None else float(state["ema"])
        self.progress = float(state["progress"])
        self.observations = int(state["observations"])
