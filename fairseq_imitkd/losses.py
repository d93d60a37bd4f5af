"""Loss math for distillation, as pure functions of log-probabilities.

Every function takes log-probabilities already restricted to the positions that are scored (shape
``(N, V)``; callers drop padding first), so the same code serves gold prefixes (word-level KD) and
student prefixes (ImitKD), and can be tested analytically without a model.

Temperature: for ``lprobs = log_softmax(z)``, ``log_softmax(z / T) == log_softmax(lprobs / T)`` because
the normaliser is a constant shift. Losses therefore accept T=1 log-probs and apply T themselves.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from torch import Tensor

from .errors import OptionError
from .flags import check_range


def _full(x: Tensor) -> Tensor:
    """Half-precision inputs (an fp16/bf16 student or teacher) are reduced in float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _tempered(lprobs: Tensor, temperature: float) -> Tensor:
    if temperature == 1.0:
        return lprobs
    return F.log_softmax(lprobs / temperature, dim=-1)


def soft_cross_entropy(student_lprobs: Tensor, teacher_lprobs: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-position ``-Σ_v p_T(v) log p_S(v)`` at temperature T, shape ``(N,)``.

    This is the KD term of Hinton et al. / Kim & Rush: it equals KL(p_T‖p_S) plus the teacher's entropy,
    which is constant for the student, so its gradient is the forward KL's. A token the teacher gives no
    mass adds nothing, even where the student's log-prob is -inf (a masked entry): 0·log 0 = 0, not NaN.
    """
    s = _tempered(_full(student_lprobs), temperature)
    t = _tempered(_full(teacher_lprobs), temperature).exp()
    return -torch.where(t > 0, t * s, t.new_zeros(())).sum(dim=-1)


def hard_cross_entropy(student_lprobs: Tensor, target: Tensor) -> Tensor:
    """Per-position ``-log p_S(target)``, shape ``(N,)``: ImitKD's loss against argmax targets."""
    return -_full(student_lprobs).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def word_kd_loss(
    student_lprobs: Tensor,
    teacher_lprobs: Tensor,
    target: Tensor,
    alpha: float,
    temperature: float = 1.0,
    epsilon: float = 0.0,
    divergence: str = "forward_kl",
    teacher_index: Optional[Tensor] = None,
    **divergence_args,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Word-level KD: ``(1-α)·LS-NLL(gold) + α·T²·CE(p_T^T ‖ p_S^T)``, summed over the N positions.

    Args:
        student_lprobs, teacher_lprobs: ``(N, V)`` log-probabilities at T=1.
        target: ``(N,)`` gold tokens.
        alpha: weight of the KD term, in [0, 1].
        temperature: softening temperature T > 0 for both distributions; the T² factor keeps the
            gradient scale of the KD term independent of T.
        epsilon: label smoothing of the gold term (fairseq's definition).
        divergence: the KD term (:func:`kd_divergence`; ATKD's next tokens are the gold ones), with its
            ``jsd_beta`` / ``atkd_alpha`` / ``teacher_topk``.
        teacher_index: ``(N, K)`` the teacher's top tokens when they are known (a cached teacher).

    Returns:
        ``(loss, nll_loss, kd_loss)``: the total, the plain gold NLL (for logging) and the un-weighted
        KD cross-entropy at temperature T (for logging), each a scalar sum.
    """
    if epsilon > 0.0:
        smoothed, nll = label_smoothed_nll_loss(_full(student_lprobs), target, epsilon, reduce=True)
    else:  # the same value, without fairseq's 0·Σ log p term, which is NaN where the student has a -inf entry
        smoothed = nll = hard_cross_entropy(student_lprobs, target).sum()
    kd = kd_divergence(divergence, student_lprobs, teacher_lprobs, next_tokens=target, temperature=temperature,
                       teacher_index=teacher_index, **divergence_args)
    if alpha == 0.0:  # keep the gold-only loss bit-exact with label_smoothed_cross_entropy
        loss = smoothed
    else:
        loss = (1.0 - alpha) * smoothed + alpha * (temperature**2) * kd
    return loss, nll, kd


def agreement(student_lprobs: Tensor, teacher_lprobs: Tensor) -> Tensor:
    """Number of positions where the student's argmax equals the teacher's (a scalar count)."""
    return (student_lprobs.argmax(-1) == teacher_lprobs.argmax(-1)).sum()


#: what ``--imitkd-target`` chooses between
IMITKD_TARGETS = ("argmax", "full")


def imitkd_targets(gold: Tensor, teacher_argmax: Tensor, on_policy: Tensor) -> Tensor:
    """ImitKD's one-hot target at each scored position, shape ``(N,)``: the teacher's action where the
    prefix is the student's own (``on_policy``), the data's next token where it is the data's.

    Token mixing passes ``on_policy`` all True: every prefix is (partly) rolled out, so every target is the
    teacher's action.
    """
    return torch.where(on_policy, teacher_argmax, gold)


def imitkd_loss(student_lprobs: Tensor, target: str, *, teacher_lprobs: Optional[Tensor] = None,
                teacher_index: Optional[Tensor] = None, teacher_argmax: Optional[Tensor] = None,
                gold: Optional[Tensor] = None,
                on_policy: Optional[Tensor] = None, epsilon: float = 0.0, divergence: str = "forward_kl",
                next_tokens: Optional[Tensor] = None, **divergence_args) -> Tensor:
    """ImitKD's loss summed over the N scored positions.

    ``full`` (ImitKD+Full): the divergence (:func:`kd_divergence`, default the cross-entropy) to the teacher's
    whole distribution on every prefix, data or rolled out (``teacher_lprobs``; never smoothed; ATKD's
    ``next_tokens`` are the tokens of the prefix; ``teacher_index``: the teacher comes as top-k buckets, as in
    :func:`kd_divergence`). ``argmax`` (ImitKD): the NLL of :func:`imitkd_targets`,
    label-smoothed with ``epsilon`` as fairseq smooths gold targets.
    """
    if target not in IMITKD_TARGETS:
        raise OptionError(f"unknown ImitKD target {target!r}; valid: {', '.join(IMITKD_TARGETS)}")
    if target == "full":
        return kd_divergence(divergence, student_lprobs, teacher_lprobs, next_tokens=next_tokens,
                             teacher_index=teacher_index, **divergence_args)
    hard = imitkd_targets(gold, teacher_argmax, on_policy)
    if epsilon > 0.0:
        return label_smoothed_nll_loss(_full(student_lprobs), hard, epsilon, reduce=True)[0]
    return hard_cross_entropy(student_lprobs, hard).sum()


# --- the divergence family (--kd-divergence) ------------------------------------------------------------

#: what ``--kd-divergence`` chooses between; ``forward_kl`` is the KD term as it always was
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "atkd")


def check_divergence(name: str, jsd_beta: float = 0.5, atkd_alpha: float = 0.2, teacher_topk: int = 0) -> None:
    """Every check of a divergence and its settings, in flag terms: what a criterion runs when it is built and
    what the functions below run on their arguments."""
    if name not in DIVERGENCES:
        raise OptionError(f"unknown --kd-divergence {name!r}; valid: {', '.join(DIVERGENCES)}")
    check_range("kd-jsd-beta", jsd_beta, 0, 1)
    check_range("kd-atkd-alpha", atkd_alpha, 0, 1)
    check_range("kd-teacher-topk", teacher_topk, 0, math.inf, high_open=True)
    if teacher_topk and name == "atkd":
        raise OptionError("--kd-teacher-topk does not apply to --kd-divergence atkd, which needs the probability "
                          "of every next token")


def _xlogy_terms(p_log: Tensor, q_log: Tensor) -> Tensor:
    """``p·(log p - log q)`` per entry, 0 where p is 0 (also where both are -inf: a masked entry)."""
    p = p_log.exp()
    # the difference is zeroed before the product, so that no 0·(-inf - -inf) reaches the backward pass
    return p * torch.where(p > 0, p_log - q_log, p.new_zeros(()))


def forward_kl(student_lprobs: Tensor, teacher_lprobs: Tensor) -> Tensor:
    """Per-position KL(p_T‖p_S), shape ``(N,)``: the soft cross-entropy less the teacher's entropy."""
    return _xlogy_terms(_full(teacher_lprobs), _full(student_lprobs)).sum(-1)


def reverse_kl(student_lprobs: Tensor, teacher_lprobs: Tensor) -> Tensor:
    """Per-position KL(p_S‖p_T), shape ``(N,)``: mode-seeking, the student puts no mass where the teacher has
    little."""
    return _xlogy_terms(_full(student_lprobs), _full(teacher_lprobs)).sum(-1)


def jsd(student_lprobs: Tensor, teacher_lprobs: Tensor, beta: float = 0.5) -> Tensor:
    """Per-position generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), shape ``(N,)``:
    ``β·KL(p_T‖M) + (1-β)·KL(p_S‖M)`` with ``M = β·p_T + (1-β)·p_S``. β=0 is forward KL(p_T‖p_S) and β=1
    reverse KL(p_S‖p_T), computed as such (the mixture formula degenerates to 0 there)."""
    check_divergence("jsd", jsd_beta=beta)
    if beta == 0.0:
        return forward_kl(student_lprobs, teacher_lprobs)
    if beta == 1.0:
        return reverse_kl(student_lprobs, teacher_lprobs)
    s, t = _full(student_lprobs), _full(teacher_lprobs)
    # an entry both models rule out (-inf in both) gets a finite stand-in: its terms are 0 anyway, and a
    # logsumexp over two -inf would send NaN back through the gradient
    both_out = torch.isneginf(s) & torch.isneginf(t)
    s_, t_ = s.masked_fill(both_out, 0.0), t.masked_fill(both_out, 0.0)
    mixture = torch.logsumexp(torch.stack([t_ + math.log(beta), s_ + math.log(1.0 - beta)]), dim=0)
    return beta * _xlogy_terms(t, mixture).sum(-1) + (1.0 - beta) * _xlogy_terms(s, mixture).sum(-1)


def tvd(student_lprobs: Tensor, teacher_lprobs: Tensor) -> Tensor:
    """Per-position total variation distance ``½·Σ_v |p_S(v) - p_T(v)|``, shape ``(N,)``."""
    return 0.5 * (_full(student_lprobs).exp() - _full(teacher_lprobs).exp()).abs().sum(-1)


def _binary_and_rest(lprobs: Tensor, target: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """log p(target), log (1 - p(target)) and the log-probs renormalised over the other tokens (target -inf)."""
    log_target = lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    others = lprobs.scatter(-1, target.unsqueeze(-1), -math.inf)
    log_rest = torch.logsumexp(others, dim=-1)
    return log_target, log_rest, others - log_rest.unsqueeze(-1)


def atkd(student_lprobs: Tensor, teacher_lprobs: Tensor, next_tokens: Tensor, alpha: float = 0.2) -> Tensor:
    """ATKD (Zhong et al. 2024), as its reference code computes it, for a batch of N scored positions.

    ``next_tokens``: the token that comes next at each position (gold on gold prefixes, the rolled-out token on
    student prefixes). The teacher's uncertainty is its non-target mass ``1 - p_T(target)``; positions below
    the median over the batch (``torch.median``: the lower middle value) are easy, the rest hard. TCKD is the
    KL between the teacher's and the student's binary ``[p(target), 1 - p(target)]``, NCKD the KL between
    their distributions renormalised over the non-target tokens (not weighted by the non-target mass).
    The loss ``α·NCKD_easy + (1-α)·(TCKD_hard + NCKD_hard)`` averages each term over its own group.

    Returned multiplied by N: a criterion's division by ``sample_size`` (the N scored positions, without
    ``--sentence-avg``) gives the reference's value. A batch-level loss: it is not a sum over positions.
    """
    check_divergence("atkd", atkd_alpha=alpha)
    s, t = _full(student_lprobs), _full(teacher_lprobs)
    s_target, s_rest, s_others = _binary_and_rest(s, next_tokens)
    t_target, t_rest, t_others = _binary_and_rest(t, next_tokens)
    tckd = _xlogy_terms(torch.stack([t_target, t_rest], -1), torch.stack([s_target, s_rest], -1)).sum(-1)
    nckd = _xlogy_terms(t_others, s_others).sum(-1)
    uncertainty = t_rest.exp()
    easy = uncertainty < uncertainty.median()
    hard = ~easy

    def mean(x: Tensor, group: Tensor) -> Tensor:
        return x[group].mean() if bool(group.any()) else x.new_zeros(())  # an empty group adds nothing

    loss = alpha * mean(nckd, easy) + (1.0 - alpha) * (mean(tckd, hard) + mean(nckd, hard))
    return loss * s.size(0)


def tail_mass(lprobs: Tensor, index: Tensor) -> Tensor:
    """``(N, 1)``: the log of the mass outside the tokens ``index``.

    Summed directly in probability space, which is exact (no cancellation against the top k) and costs
    about half the V-wide passes of a masked log-sum-exp, the bulk of a cached word_kd update's KD term.
    Rows whose rest underflows there (a very peaked row, or none left: k = V, masked entries) take the
    masked log-sum-exp instead, on a finite stand-in where nothing is left, so no NaN flows back.
    """
    rest = lprobs.exp().scatter(-1, index, 0.0).sum(-1, keepdim=True)
    tiny = rest.squeeze(-1) < _UNDERFLOW
    out = rest.clamp_min(_UNDERFLOW).log()
    if tiny.any():
        rows = tiny.nonzero().squeeze(-1)
        masked = lprobs[rows].scatter(-1, index[rows], -math.inf)
        empty = torch.isneginf(masked).all(-1, keepdim=True)
        exact = torch.logsumexp(masked.masked_fill(empty, 0.0), dim=-1, keepdim=True).masked_fill(empty, -math.inf)
        out = out.index_put((rows,), exact)
    return out


_UNDERFLOW = 1e-30  # far above float32's smallest normal (1.2e-38): below it, exp() has lost mass


def student_buckets(student_lprobs: Tensor, index: Tensor) -> Tensor:
    """``(N, k+1)``: the student's log-probs of the ``k`` tokens ``index`` and one tail bucket with the rest.

    The tail is the complement of the k tokens' mass, from those k log-probs alone: no pass over the
    vocabulary forward or backward, where :func:`tail_mass` makes several (the bulk of a cached word_kd
    update's KD term). The complement carries the float32 log-probs' absolute error, so rows whose rest is
    below ``_COMPLEMENT_FLOOR`` take :func:`tail_mass`; above it the tail's log is within a few 1e-3 of
    the exact one (tests/test_losses.py), the precision of the float16 values a teacher cache stores.
    Only for a normalised student (log_softmax), which is what every criterion hands here.
    """
    student_lprobs = _full(student_lprobs)
    top = student_lprobs.gather(-1, index)
    rest = 1.0 - top.double().exp().sum(-1, keepdim=True)  # 1 - Σ_k p_k, in float64 (no NaN from -inf entries)
    tail = rest.clamp_min(_UNDERFLOW).log().to(top.dtype)
    small = rest.squeeze(-1) < _COMPLEMENT_FLOOR
    if small.any():
        rows = small.nonzero().squeeze(-1)
        tail = tail.index_put((rows,), tail_mass(student_lprobs[rows], index[rows]))
    return torch.cat([top, tail], -1)


_COMPLEMENT_FLOOR = 1e-3


def topk_with_tail(student_lprobs: Tensor, teacher_lprobs: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Both distributions over the teacher's ``k`` most likely tokens plus one tail bucket holding the rest
    of each one's mass: ``(N, k+1)`` log-probs, student first. What a teacher that keeps (or caches) only
    its top k can be compared on; with ``k`` the vocabulary size, the tail is empty and nothing changes."""
    k = min(k, teacher_lprobs.size(-1))
    t_top, index = teacher_lprobs.topk(k, dim=-1)
    return student_buckets(student_lprobs, index), torch.cat([t_top, tail_mass(teacher_lprobs, index)], -1)


def kd_divergence(name: str, student_lprobs: Tensor, teacher_lprobs: Tensor, *, next_tokens: Optional[Tensor] = None,
                  temperature: float = 1.0, jsd_beta: float = 0.5, atkd_alpha: float = 0.2,
                  teacher_topk: int = 0, teacher_index: Optional[Tensor] = None) -> Tensor:
    """The KD term of ``--kd-divergence NAME`` over N positions, a scalar: the sum over positions (ATKD: its
    batch value times N). ``forward_kl`` is the soft cross-entropy, bit for bit the KD term of before: the
    forward KL plus the teacher's entropy, a constant for the student, so its gradient is the KL's.
    ``teacher_topk`` K > 0 compares the distributions on the teacher's K best tokens and a tail bucket
    (:func:`topk_with_tail`), after the temperature. ``teacher_index`` ``(N, K)``: the teacher comes as
    those buckets already (a cache): ``teacher_lprobs`` is ``(N, K+1)``, its log-probs of the K tokens and
    its tail, at T=1; only the student is bucketed, so no ``(N, V)`` teacher is ever built."""
    check_divergence(name, jsd_beta, atkd_alpha, teacher_topk)
    if teacher_index is not None:
        if temperature != 1.0 or name == "atkd":
            raise OptionError("a teacher given as top-k buckets (a cache) holds log-probs at temperature 1 and no "
                              "full distribution: use --kd-temperature 1 and a divergence other than atkd")
        s, t = student_buckets(_full(student_lprobs), teacher_index), _full(teacher_lprobs)
    elif name == "forward_kl" and not teacher_topk:
        return soft_cross_entropy(student_lprobs, teacher_lprobs, temperature).sum()
    else:
        s = _tempered(_full(student_lprobs), temperature)
        t = _tempered(_full(teacher_lprobs), temperature)
        if teacher_topk:
            s, t = topk_with_tail(s, t, teacher_topk)
    if name == "forward_kl":
        return soft_cross_entropy(s, t).sum()
    if name == "reverse_kl":
        return reverse_kl(s, t).sum()
    if name == "jsd":
        return jsd(s, t, jsd_beta).sum()
    if name == "tvd":
        return tvd(s, t).sum()
    if next_tokens is None:
        raise OptionError("--kd-divergence atkd needs the next token of every position")
    return atkd(s, t, next_tokens, atkd_alpha)
