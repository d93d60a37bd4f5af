"""Analytic tests of the pure loss functions."""
import math

import pytest
import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from fairseq_imitkd.losses import (
    agreement,
    hard_cross_entropy,
    imitkd_loss,
    imitkd_targets,
    soft_cross_entropy,
    word_kd_loss,
)


def _lprobs(n=7, v=11, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return F.log_softmax(scale * torch.randn(n, v, generator=g, dtype=torch.float64), dim=-1)


def test_soft_ce_of_identical_distributions_is_teacher_entropy():
    t = _lprobs()
    entropy = -(t.exp() * t).sum(-1)
    torch.testing.assert_close(soft_cross_entropy(t, t), entropy)


def test_soft_ce_is_kl_plus_entropy_and_minimised_at_teacher():
    s, t = _lprobs(seed=1), _lprobs(seed=2)
    kl = (t.exp() * (t - s)).sum(-1)
    entropy = -(t.exp() * t).sum(-1)
    torch.testing.assert_close(soft_cross_entropy(s, t), kl + entropy)
    assert (soft_cross_entropy(s, t) >= soft_cross_entropy(t, t) - 1e-12).all()


def test_soft_ce_gradient_is_student_minus_teacher_probs():
    logits = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    t = _lprobs(5, 9, seed=3)
    soft_cross_entropy(F.log_softmax(logits, -1), t).sum().backward()
    torch.testing.assert_close(logits.grad, logits.softmax(-1).detach() - t.exp())


def test_temperature_softens_both_sides():
    s, t = _lprobs(seed=4), _lprobs(seed=5)
    T = 2.5
    expected = -(F.softmax(t / T, -1) * F.log_softmax(s / T, -1)).sum(-1)
    torch.testing.assert_close(soft_cross_entropy(s, t, temperature=T), expected)
    # logits and log-probs give the same tempered distributions (the normaliser is a shift)
    z = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(
        soft_cross_entropy(F.log_softmax(z, -1), F.log_softmax(z, -1), T),
        soft_cross_entropy(z, z, T),
    )


def test_hard_ce_picks_the_target():
    s = _lprobs()
    y = torch.tensor([0, 3, 10, 2, 2, 5, 1])
    torch.testing.assert_close(hard_cross_entropy(s, y), -s[torch.arange(7), y])


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_word_kd_alpha_zero_is_label_smoothed_nll(eps):
    s, t = _lprobs(seed=6), _lprobs(seed=7)
    y = torch.randint(0, 11, (7,), generator=torch.Generator().manual_seed(0))
    loss, nll, _ = word_kd_loss(s, t, y, alpha=0.0, epsilon=eps)
    ref_loss, ref_nll = label_smoothed_nll_loss(s, y, eps)
    assert loss.item() == ref_loss.item()
    assert nll.item() == ref_nll.item()


def test_word_kd_alpha_one_is_pure_kd_with_t_squared():
    s, t = _lprobs(seed=8), _lprobs(seed=9)
    y = torch.zeros(7, dtype=torch.long)
    T = 3.0
    loss, _, kd = word_kd_loss(s, t, y, alpha=1.0, temperature=T)
    torch.testing.assert_close(kd, soft_cross_entropy(s, t, T).sum())
    assert math.isclose(loss.item(), T * T * kd.item(), rel_tol=1e-6)


def test_word_kd_interpolates():
    s, t = _lprobs(seed=10), _lprobs(seed=11)
    y = torch.arange(7)
    a = 0.3
    loss, nll, kd = word_kd_loss(s, t, y, alpha=a, epsilon=0.0)
    assert math.isclose(loss.item(), (1 - a) * nll.item() + a * kd.item(), rel_tol=1e-6)


def test_agreement_counts_equal_argmaxes():
    t = _lprobs(seed=12)
    assert agreement(t, t).item() == 7
    flipped = t.clone()
    flipped[0] = t[0].flip(-1)  # reversing a row with a unique max moves the argmax
    assert agreement(flipped, t).item() == 6


def test_length_groups_split_where_it_saves_cells():
    from fairseq_imitkd.scoring import length_groups

    lengths = torch.tensor([3, 30, 4, 2, 29, 3])
    groups = length_groups(lengths)
    assert [w for _, w in groups] == [4, 30]
    assert sorted(groups[0][0].tolist()) == [0, 2, 3, 5] and sorted(groups[1][0].tolist()) == [1, 4]
    # 4*4 + 2*30 = 76 cells instead of 6*30 = 180; every row in exactly one group
    assert sorted(torch.cat([g for g, _ in groups]).tolist()) == list(range(6))
    # lengths that are nearly equal are not worth a second pass
    assert length_groups(torch.tensor([10, 11, 12, 12])) == [(None, 12)]
    assert length_groups(torch.tensor([5])) == [(None, 5)]


def test_imitkd_targets_take_the_teachers_action_on_student_prefixes_only():
    gold = torch.tensor([3, 4, 5, 6])
    argmax = torch.tensor([7, 4, 8, 9])
    on_policy = torch.tensor([True, True, False, False])
    assert imitkd_targets(gold, argmax, on_policy).tolist() == [7, 4, 5, 6]
    assert imitkd_targets(gold, argmax, torch.ones(4, dtype=torch.bool)).tolist() == argmax.tolist()  # token mixing


def test_imitkd_argmax_loss_is_the_nll_of_the_mixed_targets():
    s = _lprobs(4, 11, seed=20)
    gold, argmax = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 6, 7, 8])
    on_policy = torch.tensor([True, False, True, False])
    expected = -(s[0, 5] + s[1, 1] + s[2, 7] + s[3, 3])
    got = imitkd_loss(s, "argmax", teacher_argmax=argmax, gold=gold, on_policy=on_policy)
    torch.testing.assert_close(got, expected)
    # smoothed as fairseq smooths: (1 - ε - ε/(V-1))·nll + ε/(V-1)·Σ_v -log p(v)
    eps, V = 0.1, 11
    smooth = -s.sum()
    torch.testing.assert_close(
        imitkd_loss(s, "argmax", teacher_argmax=argmax, gold=gold, on_policy=on_policy, epsilon=eps),
        (1 - eps - eps / (V - 1)) * expected + eps / (V - 1) * smooth)


def test_imitkd_full_loss_ignores_the_prefix_kind_and_is_never_smoothed():
    s, t = _lprobs(5, 9, seed=21), _lprobs(5, 9, seed=22)
    expected = -(t.exp() * s).sum()
    for on_policy in (torch.zeros(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool)):
        got = imitkd_loss(s, "full", teacher_lprobs=t, teacher_argmax=t.argmax(-1), gold=torch.zeros(5).long(),
                          on_policy=on_policy, epsilon=0.1)
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="argmax, full"):
        imitkd_loss(s, "both", teacher_lprobs=t)


@pytest.mark.parametrize("case", ["huge logits", "-inf where the teacher has no mass", "-inf on both"])
def test_kd_losses_stay_finite_at_extreme_logits(case):
    """±1e4 logits and masked (-inf) entries: finite losses and finite gradients for every KD loss."""
    g = torch.Generator().manual_seed(30)
    s_logits = (1e4 * torch.randn(6, 9, generator=g)).requires_grad_(True)
    t_logits = 1e4 * torch.randn(6, 9, generator=g)
    if case != "huge logits":
        t_logits[:, :3] = -math.inf  # the teacher rules tokens 0-2 out
    if case == "-inf on both":
        mask = torch.zeros(6, 9, dtype=torch.bool)
        mask[:, :2] = True
        s_logits = s_logits.masked_fill(mask, -math.inf)  # the student too, on two of them
    s, t = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
    target = t.argmax(-1)
    losses = {
        "soft": soft_cross_entropy(s, t).sum(),
        "soft T=2": soft_cross_entropy(s, t, 2.0).sum(),
        # label smoothing spreads mass on every token, so it is infinite where the student rules one out,
        # in fairseq's own label-smoothed CE as well: the gold term is unsmoothed where the student has -inf
        "word_kd": word_kd_loss(s, t, target, 0.5, 1.0, 0.0 if case == "-inf on both" else 0.1)[0],
        "imitkd full": imitkd_loss(s, "full", teacher_lprobs=t),
        "imitkd argmax": imitkd_loss(s, "argmax", teacher_argmax=target, gold=target,
                                     on_policy=torch.ones(6, dtype=torch.bool)),
    }
    for name, loss in losses.items():
        assert torch.isfinite(loss), (name, loss)
        (grad,) = torch.autograd.grad(loss, s_logits, retain_graph=True)
        assert torch.isfinite(grad).all(), name
