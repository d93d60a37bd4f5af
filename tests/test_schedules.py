import math

import pytest

from fairseq_imitkd.schedules import SCHEDULES, AgreementClock, BetaSchedule, beta, shape

N = 1000


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_the_criterion_offers_starts_at_1_and_stays_in_range(name):
    from fairseq_imitkd.criterions.imitkd import ImitKDConfig

    offered = list(ImitKDConfig.__dataclass_fields__["imitkd_beta_schedule"].type)
    assert name in offered and len(offered) == len(SCHEDULES)
    values = [beta(name, t, N, base=10.0, constant=0.3) for t in range(0, N + 1, 50)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values[0] == (0.3 if name == "constant" else pytest.approx(1.0, abs=1e-12))
    assert all(a >= b for a, b in zip(values, values[1:]))  # never rises


@pytest.mark.parametrize("base", [200.0, 2.0])
def test_exponential_exact_values(base):
    assert beta("exponential", 0, N, base=base) == 1.0
    assert beta("exponential", N // 2, N, base=base) == pytest.approx(base ** -0.5, rel=1e-12)
    assert beta("exponential", N, N, base=base) == pytest.approx(1.0 / base, rel=1e-12)
    assert beta("exponential", 250, N, base=base) == pytest.approx(base ** -0.25, rel=1e-12)


def test_paper_default_base_is_200():
    assert beta("exponential", N, N) == pytest.approx(1.0 / 200.0)


def test_linear_exact_values():
    assert beta("linear", 0, N) == 1.0
    assert beta("linear", N // 2, N) == 0.5
    assert beta("linear", 250, N) == 0.75
    assert beta("linear", N, N) == 0.0


@pytest.mark.parametrize("base", [200.0, 10.0, 1.5])
def test_reverse_sigmoid_exact_values(base):
    assert beta("reverse_sigmoid", 0, N, base=base) == pytest.approx(1.0, abs=1e-12)
    assert beta("reverse_sigmoid", N // 2, N, base=base) == pytest.approx(0.5, abs=1e-12)
    assert beta("reverse_sigmoid", N, N, base=base) == pytest.approx(0.0, abs=1e-12)
    # analytic value at t = N/4: logistic at log-odds ln(base)/2, rescaled
    s = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    L = math.log(base)
    expected = (s(L / 2) - s(-L)) / (s(L) - s(-L))
    assert beta("reverse_sigmoid", N // 4, N, base=base) == pytest.approx(expected, rel=1e-12)


def test_reverse_sigmoid_is_symmetric_and_s_shaped():
    for t in range(0, N + 1, 50):
        assert beta("reverse_sigmoid", t, N) + beta("reverse_sigmoid", N - t, N) == pytest.approx(1.0)
    # stays above linear in the first half (slow start), below it in the second
    assert beta("reverse_sigmoid", N // 4, N) > beta("linear", N // 4, N)
    assert beta("reverse_sigmoid", 3 * N // 4, N) < beta("linear", 3 * N // 4, N)


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0])
def test_constant(value):
    for t in (0, 5, 10**9):
        assert beta("constant", t, N, constant=value) == value
    # no horizon needed
    assert beta("constant", 7, 0, constant=value) == value


@pytest.mark.parametrize("schedule", ["exponential", "linear", "reverse_sigmoid"])
def test_monotone_bounded_and_constant_after_horizon(schedule):
    values = [beta(schedule, t, N) for t in range(0, N + 1, 10)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a > b for a, b in zip(values, values[1:]))
    end = beta(schedule, N, N)
    assert beta(schedule, N + 1, N) == end
    assert beta(schedule, 100 * N, N) == end


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError) as err:
        beta("cosine", 0, N)
    for name in SCHEDULES:
        assert name in str(err.value)


@pytest.mark.parametrize("schedule", ["exponential", "linear", "reverse_sigmoid"])
@pytest.mark.parametrize("horizon", [0, -5, None])
def test_decaying_schedule_needs_horizon(schedule, horizon):
    with pytest.raises(ValueError, match="needs a horizon: set --imitkd-beta-updates or --max-update"):
        beta(schedule, 0, horizon)


@pytest.mark.parametrize("schedule", ["exponential", "reverse_sigmoid"])
@pytest.mark.parametrize("base", [1.0, 0.5, 0.0, -2.0])
def test_base_must_exceed_one(schedule, base):
    with pytest.raises(ValueError, match="base > 1"):
        beta(schedule, 0, N, base=base)


def test_linear_ignores_base():
    assert beta("linear", 10, N, base=0.5) == beta("linear", 10, N)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_constant_out_of_range(value):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        beta("constant", 0, N, constant=value)


def test_negative_update_rejected():
    with pytest.raises(ValueError, match="update_num"):
        beta("linear", -1, N)


def test_schedule_accepts_valid_configs():
    BetaSchedule("exponential", N, base=2.0)
    BetaSchedule("constant", 0, constant=1.0)
    BetaSchedule("linear", None, warmup=5, clock=AgreementClock())  # the clock needs no horizon


# --- warm-up -------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["exponential", "linear", "reverse_sigmoid"])
def test_warmup_holds_beta_at_one_then_runs_the_schedule_over_the_rest(schedule):
    H = 400  # of N = 1000: the schedule then runs over 600 updates
    for t in (0, 1, 200, H - 1):
        assert beta(schedule, t, N, base=200.0, warmup=H) == 1.0
    for t in (H, 550, 700, 850, N):
        x = (t - H) / (N - H)
        assert beta(schedule, t, N, base=200.0, warmup=H) == pytest.approx(shape(schedule, x, base=200.0), abs=1e-12)
    assert beta("exponential", 700, N, base=200.0, warmup=H) == pytest.approx(200 ** -0.5, rel=1e-12)
    assert beta("linear", 550, N, warmup=H) == pytest.approx(0.75, rel=1e-12)
    assert beta(schedule, 5 * N, N, base=200.0, warmup=H) == beta(schedule, N, N, base=200.0, warmup=H)


def test_no_warmup_is_the_paper():
    for t in range(0, N + 1, 125):
        assert beta("exponential", t, N, warmup=0) == 200 ** (-t / N)


def test_constant_with_warmup():
    assert beta("constant", 3, N, constant=0.2, warmup=5) == 1.0
    assert beta("constant", 5, N, constant=0.2, warmup=5) == 0.2


@pytest.mark.parametrize("warmup", [N, N + 1])
def test_warmup_must_end_before_the_horizon(warmup):
    with pytest.raises(ValueError, match="warmup-updates"):
        beta("linear", 0, N, warmup=warmup)


def test_negative_warmup_rejected():
    with pytest.raises(ValueError, match="warmup-updates"):
        BetaSchedule("linear", N, warmup=-1)


def test_shape_is_the_paper_curve_at_t_over_n():
    for t in range(0, N + 1, 100):
        for schedule in ("exponential", "linear", "reverse_sigmoid"):
            assert shape(schedule, t / N, base=200.0) == beta(schedule, t, N, base=200.0)
    assert shape("linear", -0.5) == 1.0 and shape("linear", 1.5) == 0.0


# --- the agreement clock ------------------------------------------------------------------------

def test_agreement_clock_on_a_scripted_signal():
    clock = AgreementClock(low=0.4, high=0.6, momentum=0.5)
    assert clock.progress == 0.0 and clock.ema is None
    clock.observe(30, 100)  # first update sets the average: 0.3, below low
    assert clock.ema == pytest.approx(0.3) and clock.progress == 0.0
    clock.observe(70, 100)  # ema = 0.5*0.3 + 0.5*0.7 = 0.5 -> progress (0.5-0.4)/0.2 = 0.5
    assert clock.ema == pytest.approx(0.5) and clock.progress == pytest.approx(0.5)
    clock.observe(20, 100)  # ema = 0.35: below low, but the ratchet keeps progress at 0.5
    assert clock.ema == pytest.approx(0.35) and clock.progress == pytest.approx(0.5)
    clock.observe(0, 0)  # an update that scored nothing changes nothing
    assert clock.ema == pytest.approx(0.35) and clock.observations == 3
    for _ in range(10):
        clock.observe(95, 100)  # ema -> 0.95, past high: progress saturates at 1
    assert clock.progress == 1.0
    assert shape("exponential", clock.progress, base=200.0) == pytest.approx(1 / 200)
    assert shape("linear", clock.progress) == 0.0


def test_agreement_clock_state_round_trip_continues_exactly():
    a = AgreementClock(0.3, 0.6, 0.9)
    signal = [(12, 40), (20, 40), (25, 40), (31, 50), (3, 10)]
    for n, d in signal[:3]:
        a.observe(n, d)
    b = AgreementClock(0.3, 0.6, 0.9)
    b.load_state_dict(a.state_dict())
    for n, d in signal[3:]:
        a.observe(n, d)
        b.observe(n, d)
        assert (a.ema, a.progress, a.observations) == (b.ema, b.progress, b.observations)


@pytest.mark.parametrize("low,high,momentum", [(0.6, 0.6, 0.9), (0.7, 0.2, 0.9), (-0.1, 0.5, 0.9),
                                               (0.1, 1.5, 0.9), (0.1, 0.5, 1.0), (0.1, 0.5, -0.1)])
def test_agreement_clock_bad_settings(low, high, momentum):
    with pytest.raises(ValueError, match="agreement clock"):
        AgreementClock(low, high, momentum)


# --- the schedule object --------------------------------------------------------------------------

def _flags(**overrides):
    from types import SimpleNamespace
    flags = dict(imitkd_beta_schedule="exponential", imitkd_beta_base=200.0, imitkd_beta=0.0, imitkd_beta_updates=0,
                 imitkd_beta_warmup_updates=0, imitkd_beta_clock="updates", imitkd_agree_low=0.45,
                 imitkd_agree_high=0.6, imitkd_agree_momentum=0.95, max_update=N)
    flags.update(overrides)
    return SimpleNamespace(**flags)


def test_schedule_from_flags_takes_max_update_as_horizon_unless_given():
    assert BetaSchedule.from_config(_flags()).beta(N // 2) == pytest.approx(200 ** -0.5)
    assert BetaSchedule.from_config(_flags(imitkd_beta_updates=N // 2)).beta(N // 2) == pytest.approx(1 / 200)
    with pytest.raises(ValueError, match="--imitkd-beta-updates must be >= 0"):
        BetaSchedule.from_config(_flags(imitkd_beta_updates=-1))


def test_schedule_with_the_agreement_clock_follows_it_and_its_state_round_trips():
    a = BetaSchedule.from_config(_flags(imitkd_beta_clock="agreement", imitkd_beta_schedule="linear",
                                        imitkd_agree_low=0.2, imitkd_agree_high=0.6, imitkd_agree_momentum=0.5,
                                        imitkd_beta_warmup_updates=2, max_update=None))
    assert a.state_dict() == {"ema": None, "progress": 0.0, "observations": 0}
    a.observe(40, 100)  # ema 0.4: progress (0.4 - 0.2) / 0.4 = 0.5
    assert a.beta(1) == 1.0  # the warm-up holds β whatever the clock says
    assert a.beta(2) == pytest.approx(0.5) and a.progress == pytest.approx(0.5)
    b = BetaSchedule.from_config(_flags(imitkd_beta_clock="agreement", imitkd_beta_schedule="linear",
                                        imitkd_agree_low=0.2, imitkd_agree_high=0.6, imitkd_agree_momentum=0.5))
    b.load_state_dict(a.state_dict())
    for s in (a, b):
        s.observe(60, 100)
    assert a.beta(5) == b.beta(5) == pytest.approx(1.0 - (0.5 - 0.2) / 0.4)


def test_updates_clock_has_no_state_and_ignores_observations():
    s = BetaSchedule.from_config(_flags(imitkd_beta_schedule="linear"))
    s.observe(99, 100)
    assert s.state_dict() is None and s.progress is None and s.beta(N // 4) == 0.75


@pytest.mark.parametrize("flag,value", [("imitkd_beta", 1.5), ("imitkd_beta_base", 1.0),
                                        ("imitkd_agree_low", 0.7), ("imitkd_agree_momentum", 1.0)])
def test_schedule_flag_errors_name_the_flag(flag, value):
    with pytest.raises(ValueError, match="--" + flag.replace("_", "-")):
        BetaSchedule.from_config(_flags(imitkd_beta_clock="agreement", **{flag: value}))
