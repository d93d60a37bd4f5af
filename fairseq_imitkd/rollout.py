"""Fast on-policy rollouts of a fairseq encoder-decoder model, optionally mixed with a teacher.

ImitKD trains the student on prefixes it produces itself, so every update starts with a
decoding pass.  This module makes that pass cheap: the encoder runs once, the decoder
keeps fairseq's incremental state (one new position per step instead of the whole
prefix), finished rows leave the batch, and a teacher can decode *beside* the student
over the same prefix, so its distributions come for free and no second teacher pass is
needed.

Greedy rollouts reproduce ``SequenceGenerator(models, tgt_dict, beam_size=1)`` token for
token, and top-k/full sampling reproduces ``SequenceGenerator`` with
``search.Sampling`` for the same torch seed: the same length limits, the same masking
of pad/EOS, the same float32 arithmetic and the same batch shrinking (which fixes the
shapes handed to ``torch.multinomial`` and hence its draws).  All randomness comes from
torch's default generator, which fairseq reseeds every update, so resumed runs are exact.

This is the *exact* engine. ``static_rollout.py`` is a second one for GPUs (fixed shapes, CUDA
graphs) that shares these generation rules; ``rollout(engine=...)`` chooses.
"""

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from fairseq.sequence_generator import EnsembleModel
from torch import Tensor, nn

from . import static_rollout
from .rollout_steps import Rollout, _advance_scores, _greedy, _sample, apply_generation_rules, teacher_forcing_layout
from .scoring import attention_backends, outside_autocast
from .teacher import TeacherBase, check_same_dictionary

STRATEGIES = ("greedy", "topk")
#: decoding engines: ``exact`` (fairseq's EnsembleModel, finished rows dropped), ``static`` (fixed shapes,
#: CUDA graphs; static_rollout.py), ``auto`` (see :func:`resolve_engine`)
ENGINES = ("auto", "exact", "static")


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Like ``fairseq.utils.model_eval`` for several modules, but restores their
    training flags even when decoding raises (``model_eval`` has no ``finally``)."""
    flags = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.train(flag)


def max_rollout_len(
    src_tokens: Tensor,
    models: Sequence[nn.Module],
    max_len_a: float = 0.0,
    max_len_b: int = 200,
) -> int:
    """Number of non-EOS steps allowed, computed as ``SequenceGenerator`` does.

    The padded source length counts (not each row's own length), and the limit is
    capped one below the smallest ``max_decoder_positions()`` so that the final EOS
    still has a position embedding.
    """
    positions = min(
        [m.max_decoder_positions() for m in models if hasattr(m, "max_decoder_positions")]
        + [2**62]
    )
    return min(int(max_len_a * src_tokens.size(1) + max_len_b), positions - 1)


@torch.no_grad()
def rollout(
    model: nn.Module,
    src_tokens: Tensor,
    src_lengths: Tensor,
    *,
    max_len_a: float = 0.0,
    max_len_b: int = 200,
    min_len: int = 1,
    sampling: str = "greedy",
    topk: int = 0,
    temperature: float = 1.0,
    teacher: Optional[TeacherBase] = None,
    teacher_prob: float = 0.0,
    teacher_sample: bool = False,
    keep_teacher_lprobs: bool = True,
    engine: str = "exact",
) -> Rollout:
    """Decode ``src_tokens`` with ``model`` (the student), optionally mixed with teachers.

    Args:
        model: a fairseq encoder-decoder model; its ``decoder.dictionary`` gives eos/pad.
        src_tokens, src_lengths: the batch's ``net_input`` (left-padded as fairseq does).
        max_len_a, max_len_b: at most ``int(a * src_tokens.size(1) + b)`` tokens before
            the final EOS (padded source length, as ``SequenceGenerator``).
        min_len: EOS is forbidden at steps ``< min_len``.
        sampling: ``"greedy"`` or ``"topk"`` (sample from the ``topk`` most likely
            tokens; ``topk=0`` samples from the full distribution).
        temperature: divides the student's logits before the softmax (> 0).
        teacher: optional teacher (its ensemble averaged in probability space), decoded
            incrementally over the same prefix through :meth:`TeacherBase.inference`.
        teacher_prob: beta; per row and step the next token is the teacher's action
            with this probability, else the student's.  With 0 or 1 no coin is drawn,
            so ``teacher_prob=0`` consumes the RNG exactly as a student-only rollout.
        teacher_sample: the teacher's action is a sample from its full distribution at
            temperature 1 instead of its argmax.
        keep_teacher_lprobs: also return the teacher's log-probs at every generated
            position (N, V); else only their argmax.
        engine: ``exact``, ``static`` (static_rollout.py; models it cannot run fall back to
            ``exact`` with one log line) or ``auto`` (:func:`resolve_engine`).

    Dropout is off during the rollout; training flags are restored afterwards.
    ``teacher_prob=1`` never runs the student.
    """
    if sampling not in STRATEGIES:
        raise ValueError(f"unknown sampling strategy {sampling!r}; valid: {', '.join(STRATEGIES)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if topk < 0:
        raise ValueError(f"topk must be >= 0 (0 = full distribution), got {topk}")
    if not 0.0 <= teacher_prob <= 1.0:
        raise ValueError(f"teacher_prob (beta) must lie in [0, 1], got {teacher_prob}")
    if min_len < 0:
        raise ValueError(f"min_len must be >= 0, got {min_len}")
    if teacher_prob > 0 and teacher is None:
        raise ValueError("teacher_prob > 0 needs a teacher")
    if engine not in ENGINES:
        raise ValueError(f"unknown rollout engine {engine!r}; valid: {', '.join(ENGINES)}")
    with teacher.inference() if teacher is not None else contextlib.nullcontext([]) as teachers:
        for t in teachers:
            check_same_dictionary("target", model.decoder.dictionary, t.decoder.dictionary, "the teacher's model")
        return _checked_rollout(
            model, list(teachers), src_tokens, src_lengths, max_len_a=max_len_a, max_len_b=max_len_b,
            min_len=min_len, sampling=sampling, topk=topk, temperature=temperature, teacher_prob=teacher_prob,
            teacher_sample=teacher_sample, keep_teacher_lprobs=keep_teacher_lprobs,
            engine=resolve_engine(engine, src_tokens.device),
        )


def resolve_engine(engine: str, device: torch.device) -> str:
    """``auto``: the static engine on CUDA, where a step is launch-bound and graphs pay off; the exact
    one on CPU, where dropping finished rows saves more than fixed shapes do (benchmarks/README.md)."""
    if engine == "auto":
        return "static" if device.type == "cuda" else "exact"
    return engine


def _checked_rollout(model, teachers, src_tokens, src_lengths, *, max_len_a, max_len_b, min_len, sampling, topk,
                     temperature, teacher_prob, teacher_sample, keep_teacher_lprobs, engine="exact") -> Rollout:
    max_len = max_rollout_len(src_tokens, [model] + teachers, max_len_a, max_len_b)
    if max_len < 1:
        raise ValueError(
            f"maximum rollout length {max_len} < 1 (max_len_a={max_len_a}, max_len_b={max_len_b}, "
            f"source length {src_tokens.size(1)})"
        )
    if min_len > max_len:
        raise ValueError(f"min_len ({min_len}) cannot exceed the maximum length ({max_len})")

    dictionary = model.decoder.dictionary
    eos, pad = dictionary.eos(), dictionary.pad()
    decode = _decode
    if engine == "static":

        reason = static_rollout.static_unsupported(model, teachers)
        if reason is None:
            decode = static_rollout.decode
        else:
            static_rollout.log_fallback(reason)
    with _eval_mode([model] + teachers), attention_backends(src_tokens.device):
        return decode(
            model, teachers, src_tokens, src_lengths, eos=eos, pad=pad,
            max_len=max_len, min_len=min_len, sampling=sampling, topk=topk,
            temperature=temperature, teacher_prob=float(teacher_prob),
            teacher_sample=teacher_sample, keep_teacher_lprobs=keep_teacher_lprobs,
        )


def _decode(
    model, teachers, src_tokens, src_lengths, *, eos, pad, max_len, min_len, sampling, topk,
    temperature, teacher_prob, teacher_sample, keep_teacher_lprobs,
) -> Rollout:
    bsz = src_tokens.size(0)
    device = src_tokens.device
    net_input = {"src_tokens": src_tokens, "src_lengths": src_lengths}

    run_student = not (teachers and teacher_prob == 1.0)
    # (wrapper, encoder outs, incremental states) per policy; EnsembleModel gives
    # SequenceGenerator's exact per-step arithmetic (temperature, ensembling).
    policies: Dict[str, list] = {}
    if run_student:
        ens = EnsembleModel([model])
        policies["student"] = [ens, ens.forward_encoder(net_input), [{}]]
    if teachers:
        ens = EnsembleModel(teachers)
        with outside_autocast(device):  # the teacher's own dtype, also under --amp
            policies["teacher"] = [ens, ens.forward_encoder(net_input), [{} for _ in teachers]]

    # Working buffers hold only unfinished rows; ``rows`` maps them to the batch.
    work = src_tokens.new_full((bsz, max_len + 2), pad)
    work[:, 0] = eos
    rows = torch.arange(bsz, device=device)
    cum = {name: torch.zeros(bsz, device=device) for name in policies}
    out = src_tokens.new_full((bsz, max_len + 1), pad)
    lengths = src_tokens.new_zeros(bsz)
    t_argmax = src_tokens.new_full((bsz, max_len + 1), pad) if teachers else None
    t_steps: List[tuple] = []  # (rows, step lprobs) for the teacher
    teacher_tokens = torch.zeros((), dtype=torch.long, device=device)

    for step in range(max_len + 1):
        prefix = work[:, : step + 1]
        actions = {}
        masked = {}
        if run_student:
            ens, enc, states = policies["student"]
            lp, _ = ens.forward_decoder(prefix, enc, states, temperature)
            masked["student"] = apply_generation_rules(lp.float(), step, min_len, max_len, eos, pad)
            if sampling == "greedy":
                actions["student"] = _greedy(masked["student"], cum["student"], step)
            else:
                actions["student"] = _sample(masked["student"], topk, eos)
        if teachers:
            ens, enc, states = policies["teacher"]
            with outside_autocast(device):
                lp, _ = ens.forward_decoder(prefix, enc, states, 1.0)
            lp = lp.float()
            t_argmax[rows, step] = lp.argmax(dim=1)
            if keep_teacher_lprobs:
                t_steps.append((rows, lp))
            if teacher_prob > 0.0:
                masked["teacher"] = apply_generation_rules(lp.clone(), step, min_len, max_len, eos, pad)
                if teacher_sample:
                    actions["teacher"] = _sample(masked["teacher"], 0, eos)
                else:
                    actions["teacher"] = _greedy(masked["teacher"], cum["teacher"], step)

        if "teacher" not in actions:
            nxt = actions["student"]
        elif "student" not in actions:
            nxt = actions["teacher"]
            teacher_tokens += nxt.numel()
        else:
            coin = torch.rand(work.size(0), device=device) < teacher_prob
            nxt = torch.where(coin, actions["teacher"], actions["student"])
            teacher_tokens += coin.sum()
        for name, lp in masked.items():
            cum[name] = _advance_scores(cum[name], lp, nxt, step)
        work[:, step + 1] = nxt

        done = nxt.eq(eos)
        if bool(done.any()):
            done_rows = rows[done]
            out[done_rows, : step + 1] = work[done, 1 : step + 2]
            lengths[done_rows] = step + 1
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            # Drop finished rows, as SequenceGenerator does: less work per step, and
            # the same shapes (hence the same sampling draws) as fairseq.
            work, rows = work[keep], rows[keep]
            for name, (ens, enc, states) in policies.items():
                ens.reorder_incremental_state(states, keep)
                policies[name][1] = ens.reorder_encoder_out(enc, keep)
                cum[name] = cum[name][keep]

    tokens, prev_output_tokens, _ = teacher_forcing_layout(out, lengths, eos, pad)

    teacher_lprobs = None
    if teachers and keep_teacher_lprobs:
        # packed row by row: every row still decoding at a step generates a token there, so each
        # step's distributions land at offset[row] + step, and no padded cell is ever written
        offsets = lengths.cumsum(0) - lengths
        teacher_lprobs = t_steps[0][1].new_empty(int(lengths.sum()), t_steps[0][1].size(1))
        for step, (step_rows, lp) in enumerate(t_steps):
            teacher_lprobs[offsets[step_rows] + step] = lp
    return Rollout(
        tokens=tokens,
        prev_output_tokens=prev_output_tokens,
        lengths=lengths,
        teacher_lprobs=teacher_lprobs,
        teacher_argmax=t_argmax[:, :tokens.size(1)].contiguous() if teachers else None,
        teacher_tokens=teacher_tokens,
    )
