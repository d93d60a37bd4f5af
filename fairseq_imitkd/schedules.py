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
"""

import math
from typing import Optional

from .errors import OptionError

SCHEDULES = ("exponential", "linear", "reverse_sigmoid", "constant")


CLOCKS = ("updates", "agreement")


def check_schedule(
    schedule: str,
    total_updates: int,
    base: float = 200.0,
    constant: float = 0.0,
    warmup: int = 0,
) -> None:
    """Raise ``ValueError`` for an unusable configuration.

    Separate from :func:`beta` so that a criterion can fail when it is built rather
    than at its first update, possibly hours into a job.
    """
    if schedule not in SCHEDULES:
        raise OptionError(
            f"unknown beta schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}"
        )
    if warmup < 0:
        raise OptionError(f"--imitkd-beta-warmup-updates must be >= 0, got {warmup}")
    if schedule == "constant":
        if not 0.0 <= constant <= 1.0:
            raise OptionError(f"constant beta must lie in [0, 1], got {constant}")
        return
    if total_updates is not None and 0 < total_updates <= warmup:
        raise OptionError(
            f"--imitkd-beta-warmup-updates ({warmup}) must be smaller than the schedule's horizon "
            f"({total_updates} updates)"
        )
    if total_updates is None or total_updates <= 0:
        raise OptionError(
            f"the {schedule!r} beta schedule needs a horizon: set --imitkd-beta-updates "
            f"or --max-update to a positive number of updates (got {total_updates})"
        )
    if schedule in ("exponential", "reverse_sigmoid") and not base > 1.0:
        raise OptionError(f"the {schedule!r} beta schedule needs base > 1, got {base}")


def beta(
    schedule: str,
    update_num: int,
    total_updates: int,
    base: float = 200.0,
    constant: float = 0.0,
    warmup: int = 0,
) -> float:
    """Probability of taking the teacher's (or the data's) token at update ``update_num``.

    β = 1 for the first ``warmup`` updates; after that the schedule runs over the rest of the
    horizon, at progress ``x = min(t - H, N - H) / (N - H)`` (``H = warmup``; ``H = 0`` is the paper).
    ``constant`` ignores the warm-up's progress but not its β = 1. See :func:`shape` for the curves.
    """
    check_schedule(schedule, total_updates, base=base, constant=constant, warmup=warmup)
    if update_num < 0:
        raise OptionError(f"update_num must be >= 0, got {update_num}")
    if update_num < warmup:
        return 1.0
    if schedule == "constant":
        return float(constant)
    progress = min(update_num - warmup, total_updates - warmup) / (total_updates - warmup)
    return shape(schedule, progress, base=base, constant=constant)


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
        raise OptionError(f"unknown beta schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
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
            raise OptionError(f"the agreement clock needs 0 <= low < high <= 1, got low={low}, high={high}")
        if not 0.0 <= momentum < 1.0:
            raise OptionError(f"the agreement clock's momentum must be in [0, 1), got {momentum}")
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
