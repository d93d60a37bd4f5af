"""What both rollout engines do alike at each decoding step, and what they return.

The generation rules (fairseq's length limits and pad/EOS masking), the greedy and top-k choices, the
score updates, the teacher-forcing layout of a finished batch, and the :class:`Rollout` record. The
exact engine (``rollout.py``) and the static one (``static_rollout.py``) both import this module and
neither imports the other's steps, so they decode by the same rules and cannot drift apart.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Rollout:
    """A batch of generated sequences in fairseq's teacher-forcing layout.

    ``tokens`` can serve as targets (``ignore_index=pad``) and ``prev_output_tokens``
    as decoder input, exactly like ``sample["target"]`` and
    ``sample["net_input"]["prev_output_tokens"]`` of a right-padded fairseq batch.
    """

    #: (B, T) generated tokens; each row ends with its only EOS at ``lengths - 1``, then pad.
    tokens: Tensor
    #: (B, T) ``[eos, tokens[:, :-1]]`` with pad from ``lengths`` on.
    prev_output_tokens: Tensor
    #: (B,) number of generated tokens, final EOS included.
    lengths: Tensor
    #: (N, V) float32 teacher log-probs given ``prev_output_tokens[:, :t + 1]`` (unmasked:
    #: before any pad/EOS/length rule) at the N generated positions, row by row: what a dense
    #: (B, T, V) buffer would hold at ``tokens.ne(pad)``, without its padded cells.  Only with
    #: teacher models and ``keep_teacher_lprobs=True``; see :meth:`teacher_lprobs_at`.
    teacher_lprobs: Optional[Tensor] = None
    #: (B, T) argmax of the teacher's (unmasked) distribution at each position, pad
    #: after the end.  Only with teacher models.
    teacher_argmax: Optional[Tensor] = None
    #: number of generated tokens (final EOS included) that were the teacher's action
    #: (token mixing); 0-dim tensor on the batch's device, to avoid a sync per step.
    teacher_tokens: Optional[Tensor] = None

    def teacher_lprobs_at(self, rows: Optional[Tensor]) -> Tensor:
        """The teacher's log-probs at the generated positions of ``rows`` (None: every row), row by row
        in the order given: ``dense[rows][mask]`` for ``mask = tokens[rows].ne(pad)``."""
        if rows is None:
            return self.teacher_lprobs
        offsets = self.lengths.cumsum(0) - self.lengths
        width = int(self.lengths[rows].max())
        steps = torch.arange(width, device=self.lengths.device).unsqueeze(0)
        index = offsets[rows].unsqueeze(1) + steps
        return self.teacher_lprobs[index[steps < self.lengths[rows].unsqueeze(1)]]


def apply_generation_rules(lprobs: Tensor, step: int, min_len: int, max_len: int, eos: int, pad: int) -> Tensor:
    """Mask, in place, what ``SequenceGenerator`` never lets a hypothesis pick at ``step``.

    NaN -> -inf; pad never; only EOS at the last step; no EOS before ``min_len``.
    (``unk_penalty`` is 0 by default there, and subtracting 0 is a no-op.)
    """
    lprobs.masked_fill_(torch.isnan(lprobs), -math.inf)
    lprobs[:, pad] = -math.inf
    if step >= max_len:
        lprobs[:, :eos] = -math.inf
        lprobs[:, eos + 1 :] = -math.inf
    if step < min_len:
        lprobs[:, eos] = -math.inf
    return lprobs


def _greedy(lprobs: Tensor, cum_scores: Tensor, step: int) -> Tensor:
    """Best token, chosen as ``BeamSearch`` does at beam 1.

    It ranks *cumulative* scores with ``topk(k=2)``, not ``lprobs.argmax()``: in float32
    adding the running score can merge near-ties, and topk and argmax may break ties
    differently.  Ranking the same numbers with the same op keeps us identical.
    """
    cand = lprobs if step == 0 else lprobs + cum_scores.unsqueeze(1)
    return torch.topk(cand, k=min(2, cand.size(1) - 1), dim=1)[1][:, 0]


def _drawable(probs: Tensor, column: int = 0) -> Tensor:
    """``probs`` with every row that has no positive finite mass replaced by a one-hot on ``column``.

    A half-precision overflow gives NaN/inf logits (the generation rules turn NaN into -inf), and
    ``torch.multinomial`` rejects such a row: on CPU with an exception, on CUDA with a device-side
    assert that kills the CUDA context and the run. A ``where``, not a test: no host sync. Valid rows
    are untouched, so their draws stay those of ``search.Sampling``.
    """
    total = probs.sum(dim=1, keepdim=True)
    bad = ~(torch.isfinite(total) & (total > 0))
    onehot = probs.new_zeros(1, probs.size(1))  # one row, broadcast: no (B, V) buffer a step
    onehot[0, column] = 1.0
    return torch.where(bad, onehot, probs)


def _sample(lprobs: Tensor, topk: int, eos: int = 0) -> Tensor:
    """Draw one token per row, as ``search.Sampling`` does at beam 1 (same draws per seed).

    A row with nothing to draw from (:func:`_drawable`) takes its first top-k candidate, or ``eos``
    (which ends it) when sampling from the full distribution."""
    if topk > 0:
        top_lprobs, top_idx = lprobs.topk(min(topk, lprobs.size(1)), dim=1)
        choice = torch.multinomial(_drawable(top_lprobs.exp()), 1, replacement=True)
        return top_idx.gather(1, choice).squeeze(1)
    return torch.multinomial(_drawable(lprobs.exp(), eos), 1, replacement=True).squeeze(1)


def _advance_scores(cum_scores: Tensor, lprobs: Tensor, chosen: Tensor, step: int) -> Tensor:
    """Running score after ``chosen``, with the arithmetic of ``BeamSearch`` (topk value)."""
    picked = lprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    new = picked if step == 0 else picked + cum_scores
    # A policy can be handed a token it gives -inf (only with a broken, NaN-emitting
    # model); an infinite offset would then make all its candidates tie.
    return new.masked_fill_(~torch.isfinite(new), 0.0)


def teacher_forcing_layout(out: Tensor, lengths: Tensor, eos: int, pad: int):
    """``(tokens, prev_output_tokens, after_end)`` of a :class:`Rollout` from the generated tokens ``out``
    (B, >= max length; pad after each row's end) and the rows' lengths (final EOS included)."""
    width = int(lengths.max())
    tokens = out[:, :width].contiguous()  # criterions call .view(-1) on targets
    positions = torch.arange(width, device=out.device).unsqueeze(0)
    after_end = positions >= lengths.unsqueeze(1)
    prev_output_tokens = torch.cat([tokens.new_full((tokens.size(0), 1), eos), tokens[:, :-1]], dim=1)
    prev_output_tokens.masked_fill_(after_end, pad)
    return tokens, prev_output_tokens, after_end


