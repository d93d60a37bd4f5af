"""Loss math for distillation, as pure functions of log-probabilities.

Every function takes log-probabilities already restricted to the positions that are scored (shape
``(N, V)``; callers drop padding first), so the same code serves gold prefixes (word-level KD) and
student prefixes (ImitKD), and can be tested analytically without a model.

Temperature: for ``lprobs = log_softmax(z)``, ``log_softmax(z / T) == log_softmax(lprobs / T)`` because
the normaliser is a constant shift. Losses therefore accept T=1 log-probs and apply T themselves.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from torch import Tensor


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
) -> Tuple[Tensor, Tensor, Tensor]:
    """Word-level KD: ``(1-α)·LS-NLL(gold) + α·T²·CE(p_T^T ‖ p_S^T)``, summed over the N positions.

    Args:
        student_lprobs, teacher_lprobs: ``(N, V)`` log-probabilities at T=1.
        target: ``(N,)`` gold tokens.
        alpha: weight of the KD term, in [0, 1].
        temperature: softening temperature T > 0 for both distributions; the T² factor keeps the
            gradient scale of the KD term independent of T.
        epsilon: label smoothing of the gold term (fairseq's definition).

    Returns:
        ``(loss, nll_loss, kd_loss)``: the total, the plain gold NLL (for logging) and the un-weighted
        KD cross-entropy at temperature T (for logging), each a scalar sum.
    """
    if epsilon > 0.0:
        smoothed, nll = label_smoothed_nll_loss(_full(student_lprobs), target, epsilon, reduce=True)
    else:  # the same value, without fairseq's 0·Σ log p term, which is NaN where the student has a -inf entry
        smoothed = nll = hard_cross_entropy(student_lprobs, target).sum()
    kd = soft_cross_entropy(student_lprobs, teacher_lprobs, temperature).sum()
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
                teacher_argmax: Optional[Tensor] = None, gold: Optional[Tensor] = None,
                on_policy: Optional[Tensor] = None, epsilon: float = 0.0) -> Tensor:
    """ImitKD's loss summed over the N scored positions.

    ``full`` (ImitKD+Full): the cross-entropy to the teacher's whole distribution on every prefix, data or
    rolled out (``teacher_lprobs``; never smoothed). ``argmax`` (ImitKD): the NLL of
    :func:`imitkd_targets`, label-smoothed with ``epsilon`` as fairseq smooths gold targets.
    """
    if target not in IMITKD_TARGETS:
        raise ValueError(f"unknown ImitKD target {target!r}; valid: {', '.join(IMITKD_TARGETS)}")
    if target == "full":
        return soft_cross_entropy(student_lprobs, teacher_lprobs).sum()
    hard = imitkd_targets(gold, teacher_argmax, on_policy)
    if epsilon > 0.0:
        return label_smoothed_nll_loss(_full(student_lprobs), hard, epsilon, reduce=True)[0]
    return hard_cross_entropy(student_lprobs, hard).sum()
