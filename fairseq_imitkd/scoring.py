"""Next-token log-probabilities at the scored positions only.

A teacher-forced pass normally projects every position of the padded ``(B, T)`` batch onto the
vocabulary, and with a small model that projection is most of the cost. Rollouts make padding worse
than gold batches: one rambling row sets the width of the whole batch. So the decoder runs in
``features_only`` mode and only the ``N`` positions that are scored are projected and normalised.
"""
import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover
    sdpa_kernel = None


def attention_backends(device):
    """Keep scaled-dot-product attention off cuDNN on CUDA.

    In half precision torch picks cuDNN's attention, which builds a new execution plan for every new
    batch shape: on an H100 that planning cost far more CPU per attention call than the call's GPU work,
    and made word_kd with an fp16 teacher slower than with an fp32 one (the profile and the timings:
    benchmarks/README.md, "fp16 teacher on GPU (fixed)"). Batches of text change shape every step, so
    flash / memory-efficient attention are the right kernels here.
    """
    if sdpa_kernel is None or device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def outside_autocast(device):
    """Run a teacher's pass in the dtype ``--teacher-fp16/--teacher-bf16`` set, also under ``--amp``.

    fairseq's ``--amp`` wraps the whole criterion in CUDA autocast, which would run a float32 teacher's
    matrix products in float16 and a bfloat16 teacher's in float16: the teacher's precision would be
    the student's optimizer setting, not the teacher's own. The teacher's inputs are token ids, so
    turning autocast off for its pass needs no casts.
    """
    return torch.autocast(device_type=device.type, enabled=False)


def scored_log_probs(model, src_tokens: Tensor, src_lengths: Tensor, prev_output_tokens: Tensor,
                     mask: Tensor) -> Tensor:
    """``(N, V)`` log-probabilities of ``model`` at the ``N`` positions where ``mask`` is True.

    Equal, position by position, to ``model.get_normalized_probs(model(...), log_probs=True)[mask]``
    (float32 for half-precision models, as fairseq's normalisation upcasts). Models without a
    ``features_only`` decoder fall back to that full computation.
    """
    decoder = getattr(model, "decoder", None)
    if decoder is None or not hasattr(decoder, "output_layer") or getattr(decoder, "adaptive_softmax", None):
        with attention_backends(src_tokens.device):
            net_output = model(src_tokens, src_lengths, prev_output_tokens)
        return model.get_normalized_probs(net_output, log_probs=True)[mask]
    with attention_backends(src_tokens.device):
        encoder_out = model.encoder(src_tokens, src_lengths=src_lengths)
        features, extra = decoder(prev_output_tokens, encoder_out=encoder_out, features_only=True)
    logits = decoder.output_layer(features[mask])
    return model.get_normalized_probs((logits, extra), log_probs=True)


def length_groups(lengths: Tensor, min_saving: float = 0.1) -> List[Tuple[Optional[Tensor], int]]:
    """Split a batch's rows in two by length when that saves at least ``min_saving`` of its padded cells.

    Returns ``[(rows, width), ...]``: the row indices of each group (``None``: the whole batch, in
    order) and the width it needs. Rollouts pad worse than gold batches (a few rows run to the length
    cap), and every decoder layer of the teacher and the student costs per padded cell, while the
    loss, a sum over scored positions, does not depend on how rows are grouped. The split point is
    the one of the sorted lengths that minimises the two groups' cells.
    """
    bsz = lengths.numel()
    width = int(lengths.max()) if bsz else 0
    if bsz < 2:
        return [(None, width)]
    sorted_len, order = torch.sort(lengths, stable=True)
    k = torch.arange(1, bsz, device=lengths.device)
    cells = k * sorted_len[:-1] + (bsz - k) * width  # rows [0, k) padded to sorted_len[k-1], the rest to width
    best = int(cells.argmin())
    if float(cells[best]) > (1.0 - min_saving) * bsz * width:
        return [(None, width)]
    split = best + 1
    return [(order[:split], int(sorted_len[split - 1])), (order[split:], width)]
