"""Mixing-rate (beta) schedules for ImitKD.

ImitKD (Lin et al., 2020) rolls out a mixture of the teacher (or the data) and the
student: with probability ``beta_t`` the next token comes from the teacher, otherwise
from the student.  Training starts close to teacher forcing (``beta = 1``) and moves
towards fully on-policy student rollouts (``beta -> 0``) as the update number ``t``
approaches the horizon ``N``.

All schedules are pure functions of ``(t, N)``, so a resumed run recomputes exactly
the same value from the restored update number; no schedule state is checkpointed.
"""

import math

SCHEDULES = ("exponential", "linear", "reverse_sigmoid", "constant")

#: Schedules whose value depends on the horizon ``N``.
DECAYING_SCHEDULES = ("exponential", "linear", "reverse_sigmoid")


def check_schedule(
    schedule: str,
    total_updates: int,
    base: float = 200.0,
    constant: float = 0.0,
) -> None:
    """Raise ``ValueError`` for an unusable configuration.

    Separate from :func:`beta` so that a criterion can fail when it is built rather
    than at its first update, possibly hours into a job.
    """
    if schedule not in SCHEDULES:
        raise ValueError(
            f"unknown beta schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}"
        )
    if schedule == "constant":
        if not 0.0 <= constant <= 1.0:
            raise ValueError(f"constant beta must lie in [0, 1], got {constant}")
        return
    if total_updates is None or total_updates <= 0:
        raise ValueError(
            f"the {schedule!r} beta schedule needs a horizon: set --imitkd-beta-updates "
            f"or --max-update to a positive number of updates (got {total_updates})"
        )
    if schedule in ("exponential", "reverse_sigmoid") and not base > 1.0:
        raise ValueError(f"the {schedule!r} beta schedule needs base > 1, got {base}")


def beta(
    schedule: str,
    update_num: int,
    total_updates: int,
    base: float = 200.0,
    constant: float = 0.0,
) -> float:
    """Probability of taking the teacher's token at update ``update_num``.

    With ``t = min(update_num, total_updates)`` and ``N = total_updates``:

    * ``exponential``: ``base ** (-t / N)``; 1 at ``t = 0`` and ``1 / base`` at
      ``t = N``.  The paper uses ``base = 200``; its ImitKD* WMT runs use 2.
    * ``linear``: ``1 - t / N``; from 1 to 0.
    * ``reverse_sigmoid``: a logistic curve whose log-odds fall linearly from
      ``+ln(base)`` to ``-ln(base)`` over ``[0, N]``, rescaled so that it is exactly
      1 at ``t = 0``, exactly 0 at ``t = N`` and 0.5 at ``t = N / 2``.  ``base`` sets
      the steepness: it is the odds ``beta / (1 - beta)`` of the un-rescaled curve at
      ``t = 0`` (200 -> log-odds from +5.3 to -5.3, a pronounced S; close to 1 the
      curve tends to the straight line of ``linear``).  Compared to ``linear`` it
      stays near teacher forcing longer and reaches on-policy sooner.
    * ``constant``: ``constant`` for every update (0: fully on-policy; 1: teacher /
      data only).  Needs no horizon.

    Updates past the horizon keep the value at ``t = N``.  The result is clamped to
    ``[0, 1]``.
    """
    check_schedule(schedule, total_updates, base=base, constant=constant)
    if update_num < 0:
        raise ValueError(f"update_num must be >= 0, got {update_num}")
    if schedule == "constant":
        return float(constant)

    frac = min(update_num, total_updates) / total_updates
    if schedule == "exponential":
        value = base ** (-frac)
    elif schedule == "linear":
        value = 1.0 - frac
    else:  # reverse_sigmoid
        def curve(x: float) -> float:
            # logistic with log-odds ln(base) * (1 - 2x), written via tanh for stability
            return 0.5 * (1.0 + math.tanh(0.5 * math.log(base) * (1.0 - 2.0 * x)))

        start, end = curve(0.0), curve(1.0)
        value = (curve(frac) - end) / (start - end)
    return min(1.0, max(0.0, float(value)))
