import math

import pytest

from fairseq_imitkd.schedules import SCHEDULES, beta, check_schedule

N = 1000


def test_names():
    assert set(SCHEDULES) == {"exponential", "linear", "reverse_sigmoid", "constant"}


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


def test_check_schedule_accepts_valid_configs():
    check_schedule("exponential", N, base=2.0)
    check_schedule("constant", 0, constant=1.0)
