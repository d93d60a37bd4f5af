"""Analytic tests of the pure loss functions."""
import math

import pytest
import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from fairseq_imitkd.losses import (
    agreement,
    atkd,
    forward_kl,
    hard_cross_entropy,
    imitkd_loss,
    imitkd_targets,
    jsd,
    kd_divergence,
    reverse_kl,
    soft_cross_entropy,
    topk_with_tail,
    tvd,
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


# --- the divergence family ------------------------------------------------------------------------------

def _as_lprobs(rows):
    return torch.tensor(rows, dtype=torch.float64).log()


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_each_divergence_is_zero_on_identical_inputs_and_positive_otherwise(name):
    fn = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "tvd": tvd}[name]
    t = _lprobs(seed=40)
    torch.testing.assert_close(fn(t, t), torch.zeros(t.size(0), dtype=t.dtype), atol=1e-12, rtol=0)
    s = _lprobs(seed=41)
    assert (fn(s, t) > 0).all()


def test_divergences_on_a_hand_made_distribution():
    p_s, p_t = [[0.5, 0.5]], [[0.25, 0.75]]
    s, t = _as_lprobs(p_s), _as_lprobs(p_t)
    fwd = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    rev = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert forward_kl(s, t).item() == pytest.approx(fwd, rel=1e-12)
    assert reverse_kl(s, t).item() == pytest.approx(rev, rel=1e-12)
    assert tvd(s, t).item() == pytest.approx(0.25, rel=1e-12)
    m = [0.5 * a + 0.5 * b for a, b in zip(p_s[0], p_t[0])]  # β = 0.5: M = (0.375, 0.625)
    expected = 0.5 * sum(b * math.log(b / x) for b, x in zip(p_t[0], m)) \
        + 0.5 * sum(a * math.log(a / x) for a, x in zip(p_s[0], m))
    assert jsd(s, t, 0.5).item() == pytest.approx(expected, rel=1e-12)


def test_jsd_endpoints_are_the_two_kls_exactly():
    s, t = _lprobs(seed=42), _lprobs(seed=43)
    assert torch.equal(jsd(s, t, 0.0), forward_kl(s, t))
    assert torch.equal(jsd(s, t, 1.0), reverse_kl(s, t))
    with pytest.raises(ValueError, match="kd-jsd-beta"):
        jsd(s, t, 1.5)


def test_forward_kl_default_is_the_soft_cross_entropy_bit_for_bit():
    s, t = _lprobs(seed=44), _lprobs(seed=45)
    assert torch.equal(kd_divergence("forward_kl", s, t), soft_cross_entropy(s, t).sum())
    assert torch.equal(kd_divergence("forward_kl", s, t, temperature=2.0), soft_cross_entropy(s, t, 2.0).sum())
    # it differs from the KL by the teacher's entropy only
    entropy = -(t.exp() * t).sum()
    torch.testing.assert_close(kd_divergence("forward_kl", s, t), forward_kl(s, t).sum() + entropy)


def test_atkd_on_four_positions_worked_out_by_hand():
    """Vocabulary of 3, target token 0 at every position. The teacher's non-target mass (uncertainty) is
    0.1, 0.2, 0.4, 0.6: torch.median of four values is the lower middle one, 0.2, so position 0 is easy
    and positions 1-3 (>= 0.2) are hard."""
    teacher = [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.4, 0.3, 0.3]]
    student = [[0.5, 0.25, 0.25], [0.6, 0.2, 0.2], [0.5, 0.25, 0.25], [0.7, 0.1, 0.2]]
    target = torch.zeros(4, dtype=torch.long)

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)

    def tckd(i):
        pt, ps = teacher[i][0], student[i][0]
        return kl([pt, 1 - pt], [ps, 1 - ps])

    def nckd(i):
        rt, rs = sum(teacher[i][1:]), sum(student[i][1:])
        return kl([x / rt for x in teacher[i][1:]], [x / rs for x in student[i][1:]])

    alpha = 0.2
    easy_nckd = nckd(0)
    hard = [1, 2, 3]
    expected = alpha * easy_nckd + (1 - alpha) * (sum(map(tckd, hard)) / 3 + sum(map(nckd, hard)) / 3)
    got = atkd(_as_lprobs(student), _as_lprobs(teacher), target, alpha)
    assert got.item() == pytest.approx(4 * expected, rel=1e-10)  # scaled by N: fairseq divides by 4
    assert atkd(_as_lprobs(teacher), _as_lprobs(teacher), target, alpha).item() == pytest.approx(0.0, abs=1e-12)
    assert kd_divergence("atkd", _as_lprobs(student), _as_lprobs(teacher), next_tokens=target,
                         atkd_alpha=alpha).item() == pytest.approx(4 * expected, rel=1e-10)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd", "atkd"])
def test_every_divergence_has_finite_gradients_at_extreme_and_masked_logits(name):
    g = torch.Generator().manual_seed(46)
    s_logits = (1e4 * torch.randn(6, 9, generator=g)).requires_grad_(True)
    t_logits = 1e4 * torch.randn(6, 9, generator=g)
    masked = torch.zeros(6, 9, dtype=torch.bool)
    masked[:, 7:] = True  # a masked part of the vocabulary: -inf in both models
    s = F.log_softmax(s_logits.masked_fill(masked, -math.inf), -1)
    t = F.log_softmax(t_logits.masked_fill(masked, -math.inf), -1)
    loss = kd_divergence(name, s, t, next_tokens=t.argmax(-1))
    assert torch.isfinite(loss), loss
    (grad,) = torch.autograd.grad(loss, s_logits)
    assert torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd, tvd, atkd"):
        kd_divergence("kl", s, t)


def test_topk_targets_with_the_whole_vocabulary_change_nothing():
    s, t = _lprobs(5, 11, seed=50), _lprobs(5, 11, seed=51)
    s_k, t_k = topk_with_tail(s, t, 11)
    assert s_k.shape == (5, 12) and torch.isneginf(s_k[:, -1]).all() and torch.isneginf(t_k[:, -1]).all()
    for name in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        torch.testing.assert_close(kd_divergence(name, s, t, teacher_topk=11), kd_divergence(name, s, t))


def test_topk_targets_keep_the_teachers_best_tokens_and_the_rest_of_both_masses():
    s = _as_lprobs([[0.1, 0.2, 0.3, 0.4]])
    t = _as_lprobs([[0.5, 0.1, 0.3, 0.1]])
    s_k, t_k = topk_with_tail(s, t, 2)  # the teacher's best: tokens 0 and 2
    torch.testing.assert_close(s_k.exp(), torch.tensor([[0.1, 0.3, 0.6]], dtype=torch.float64))
    torch.testing.assert_close(t_k.exp(), torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    expected = -(0.5 * math.log(0.1) + 0.3 * math.log(0.3) + 0.2 * math.log(0.6))
    assert kd_divergence("forward_kl", s, t, teacher_topk=2).item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="atkd"):
        kd_divergence("atkd", s, t, next_tokens=torch.tensor([0]), teacher_topk=2)


def test_tail_mass_is_the_log_sum_exp_of_the_rest_also_where_it_underflows():
    from fairseq_imitkd.losses import tail_mass

    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(55))
    logits[1, 0] = 200.0  # a row so peaked that the rest's probabilities underflow in float32
    lprobs = logits.log_softmax(-1).requires_grad_(True)
    index = torch.tensor([[0, 1], [0, 2], [0, 1]])
    out = tail_mass(lprobs, index)
    reference = lprobs.detach().scatter(-1, index, -math.inf).logsumexp(-1, keepdim=True)
    assert torch.isfinite(reference).all() and reference[1].item() < -150
    torch.testing.assert_close(out, reference)
    out.sum().backward()
    assert torch.isfinite(lprobs.grad).all()
    full = tail_mass(lprobs.detach(), torch.arange(6).expand(3, 6))  # nothing is left: -inf
    assert torch.isneginf(full).all()


def test_the_student_tail_from_the_complement_is_within_the_cache_precision_and_exact_where_small():
    """student_buckets reads the tail off the k log-probs (no V-wide pass); where the rest is below its floor
    it takes tail_mass. Reference: the float64 distribution's rest."""
    from fairseq_imitkd.losses import _COMPLEMENT_FLOOR, student_buckets, tail_mass

    gen = torch.Generator().manual_seed(57)
    logits = torch.randn(3000, 500, generator=gen, dtype=torch.float64) * torch.linspace(1, 9, 3000).unsqueeze(1)
    exact = logits.log_softmax(-1)
    lprobs = logits.float().log_softmax(-1).requires_grad_(True)
    index = lprobs.detach().topk(8, -1).indices
    out = student_buckets(lprobs, index)
    reference = exact.scatter(-1, index, -math.inf).logsumexp(-1)
    rest = reference.exp()
    assert (rest < _COMPLEMENT_FLOOR).any() and (rest >= _COMPLEMENT_FLOOR).any()  # both routes taken
    error = (out[:, -1].double() - reference).abs()
    assert error[rest >= _COMPLEMENT_FLOOR].max() < 5e-3
    small = rest < _COMPLEMENT_FLOOR * 0.5  # clearly below the floor: the exact route, bit for bit
    torch.testing.assert_close(out[small, -1], tail_mass(lprobs.detach()[small], index[small]).squeeze(-1),
                               rtol=0, atol=0)
    assert torch.equal(out[:, :-1], lprobs.detach().gather(-1, index))
    # the gradient reaching the student's logits is the exact tail's (the log-probs are normalised)
    grads = []
    for tail in (lambda lp: student_buckets(lp, index)[:, -1], lambda lp: tail_mass(lp, index).squeeze(-1)):
        z = logits.float().requires_grad_(True)
        tail(z.log_softmax(-1))[rest >= 0.01].sum().backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)


def test_a_teacher_given_as_buckets_gives_the_topk_loss_and_gradient():
    """A cache hands over the teacher's top k and tail, never its (N, V) distribution: the loss and the
    student's gradient must be those of --kd-teacher-topk K on the whole teacher."""
    s_logits = torch.randn(7, 13, generator=torch.Generator().manual_seed(53), dtype=torch.float64)
    t = _lprobs(7, 13, seed=54)
    values, index = t.topk(4, dim=-1)
    rest = t.scatter(-1, index, -math.inf).logsumexp(-1, keepdim=True)
    buckets = torch.cat([values, rest], -1)
    for name in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        grads = []
        for kwargs in (dict(teacher_topk=4, teacher=t), dict(teacher_topk=4, teacher_index=index, teacher=buckets)):
            x = s_logits.clone().requires_grad_(True)
            teacher = kwargs.pop("teacher")
            loss = kd_divergence(name, x.log_softmax(-1), teacher, **kwargs)
            grads.append((loss, torch.autograd.grad(loss, x)[0]))
        torch.testing.assert_close(grads[0][0], grads[1][0])
        torch.testing.assert_close(grads[0][1], grads[1][1])
    with pytest.raises(ValueError, match="temperature 1"):
        kd_divergence("forward_kl", s_logits.log_softmax(-1), buckets, teacher_index=index, teacher_topk=4,
                      temperature=2.0)


@pytest.mark.parametrize("k", [3, 9])
def test_topk_targets_have_finite_gradients_at_extreme_and_masked_logits(k):
    g = torch.Generator().manual_seed(52)
    s_logits = (1e4 * torch.randn(6, 9, generator=g)).requires_grad_(True)
    masked = torch.zeros(6, 9, dtype=torch.bool)
    masked[:, 7:] = True
    s = F.log_softmax(s_logits.masked_fill(masked, -math.inf), -1)
    t = F.log_softmax((1e4 * torch.randn(6, 9, generator=g)).masked_fill(masked, -math.inf), -1)
    for name in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        loss = kd_divergence(name, s, t, teacher_topk=k)
        (grad,) = torch.autograd.grad(loss, s_logits, retain_graph=True)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name


def test_student_buckets_of_rows_the_student_rules_out_and_of_half_precision():
    """-inf log-probs at the k tokens (a masked row) give the whole mass to the tail and no NaN gradient; a
    float16 student is bucketed in float32, as precisely as a float32 one."""
    from fairseq_imitkd.losses import student_buckets, tail_mass

    lprobs = torch.randn(4, 9, generator=torch.Generator().manual_seed(58)).log_softmax(-1)
    lprobs[0, :3] = -math.inf
    lprobs[0] = lprobs[0].log_softmax(-1)
    lprobs.requires_grad_(True)
    index = torch.tensor([[0, 1, 2]] * 4)
    out = student_buckets(lprobs, index)
    assert out[0, -1].item() == pytest.approx(0.0, abs=1e-6) and torch.isneginf(out[0, :3]).all()
    out[:, -1].sum().backward()
    assert torch.isfinite(lprobs.grad).all()
    half = student_buckets(lprobs.detach().half(), index)
    assert half.dtype == torch.float32
    # float16 log-probs are no longer normalised to its precision: within the cache's few 1e-3 in log
    torch.testing.assert_close(half[1:, -1], tail_mass(lprobs.detach().half().float()[1:], index[1:]).squeeze(-1),
                               rtol=0, atol=2e-3)
