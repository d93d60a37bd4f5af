"""A static-shape rollout engine for fairseq ``transformer`` models, replayable as a CUDA graph.

The exact engine (``rollout.py``) decodes through fairseq's ``EnsembleModel`` with dict incremental
state and drops finished rows. That is exact by construction, but on a GPU each step is a few
milliseconds of kernel launches, Python and host syncs, and none of it can be captured in a graph.
This engine computes the same decoder step from the model's *own* modules and weights with fixed
shapes instead:

* the self-attention keys/values live in a preallocated ``(B, H, T, d)`` cache written at step t;
* the encoder-attention keys/values are projected once per layer, not once per step;
* finished rows are masked (they keep decoding pad, their outputs are ignored), not dropped;
* no attention weights are computed for anyone to read;
* the step loop has no host sync but an "all finished?" check, at most one every ``SYNC_EVERY`` steps
  (on CUDA the flag is copied to the host asynchronously and read when it has arrived: most rollouts
  end without any sync in the loop, a step or two after their last row finished).

On CUDA the step (embedding through ``log_softmax``) is captured once per (padded batch size, padded
source length, cache length, attended length bucket) as a ``torch.cuda.CUDAGraph`` and replayed;
token choice (generation rules, top-k, sampling) stays outside the graph, so torch's RNG is used
exactly as in eager mode. On CPU the same step runs eagerly and attends to the ``t + 1`` filled
positions only.

The generation rules are ``SequenceGenerator``'s at beam 1, shared with ``rollout.py``
(``rollout_steps.py``: ``apply_generation_rules``, ``_greedy``, ``_sample``; ``rollout.max_rollout_len``).
In float32 the greedy tokens equal ``SequenceGenerator``'s except where a reordered float sum flips a near-tie; sampled
rollouts are seeded and repeatable, but not the exact engine's draws (that one shrinks the batch, so
``torch.multinomial`` sees other shapes).

Anything the step does not implement falls back to the exact engine, with one log line per reason.
"""
import contextlib
import logging
from collections import OrderedDict
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rollout_steps import Rollout, _advance_scores, _greedy, _sample, apply_generation_rules, teacher_forcing_layout

logger = logging.getLogger(__name__)

#: on CUDA, steps between two blocking "all rows finished?" checks (asynchronous ones run between them)
SYNC_EVERY = 8
#: graph states kept per process (each holds caches, encoder K/V buffers and a few graphs). Batches of
#: --max-tokens put (batch, source) buckets on a diagonal: a handful of states per role in practice.
GRAPH_POOL_SIZE = 32
_logged_reasons = set()


def _bucket(n: int, minimum: int = 8) -> int:
    """Next power of two >= n: few distinct shapes, hence few captured graphs."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def unsupported(model: nn.Module) -> Optional[str]:
    """Why the static step cannot run ``model`` exactly as fairseq does (None: it can)."""
    from fairseq.models.transformer import TransformerDecoderBase
    from fairseq.modules import MultiheadAttention
    from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

    decoder = getattr(model, "decoder", None)
    if decoder is None or getattr(model, "encoder", None) is None:
        return f"{type(model).__name__} is not an encoder-decoder model"
    # exact classes: a subclass may change forward (alignment, extra inputs) in ways we would not see
    if type(decoder).__name__ not in ("TransformerDecoder", "TransformerDecoderBase") or not isinstance(
        decoder, TransformerDecoderBase
    ):
        return f"decoder {type(decoder).__name__} is not fairseq's transformer decoder"
    if decoder.cross_self_attention:
        return "cross_self_attention"
    if decoder.quant_noise is not None:
        return "quant noise on the embeddings"
    if decoder.adaptive_softmax is not None:
        return "adaptive softmax"
    if getattr(decoder, "onnx_trace", False):
        return "onnx tracing"
    if any(getattr(m, "apply_during_inference", False) for m in decoder.modules()):
        return "retain_dropout (dropout at inference)"
    for layer in decoder.layers:
        if type(layer).__name__ not in ("TransformerDecoderLayer", "TransformerDecoderLayerBase") or not isinstance(
            layer, TransformerDecoderLayerBase
        ):
            return f"decoder layer {type(layer).__name__}"
        if layer.encoder_attn is None:
            return "no_encoder_attn"
        if layer.cross_self_attention:
            return "cross_self_attention"
        if layer.quant_noise:
            return "quant noise"
        if any(getattr(layer, name, None) is not None for name in ("attn_ln", "c_attn", "ffn_layernorm", "w_resid")):
            return "scale_attn/scale_heads/scale_fc/scale_resids"
        for attn, kind in ((layer.self_attn, "self"), (layer.encoder_attn, "encoder")):
            if type(attn) is not MultiheadAttention:
                return f"{kind} attention {type(attn).__name__}"
            if attn.bias_k is not None or attn.add_zero_attn:
                return "add_bias_kv/add_zero_attn"
            if getattr(attn, "use_xformers", False):
                return "xformers attention"
            if getattr(attn, "skip_embed_dim_check", False):
                return "pruned attention heads"
        if not layer.self_attn.self_attention or not layer.encoder_attn.encoder_decoder_attention:
            return "unusual attention wiring"
    return None


def _sublayer(x: Tensor, norm: nn.Module, pre: bool, fn) -> Tensor:
    """A fairseq decoder sublayer with its residual: ``norm`` before ``fn`` (pre-norm) or after the sum."""
    y = fn(norm(x) if pre else x)
    x = x + y
    return x if pre else norm(x)


class _DecoderStep:
    """One decoder step of a fairseq transformer, computed from its own modules with fixed shapes.

    Holds the per-rollout tensors: the position table, the encoder-attention K/V (projected once)
    with the encoder padding mask, and the self-attention K/V cache. The arithmetic follows
    ``TransformerDecoderBase.extract_features_scriptable`` and ``MultiheadAttention.forward`` in
    incremental mode op for op (q scaled after its projection, float32 softmax cast back, float32
    ``log_softmax``), so float32 results agree with fairseq's to rounding.
    """

    def __init__(self, model: nn.Module, encoder_out: dict, batch: int, src_len: int, cache_len: int):
        dec = model.decoder
        self.model = model
        self.dec = dec
        self.layers = list(dec.layers)
        attn = self.layers[0].self_attn
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        self.batch, self.src_len, self.cache_len = batch, src_len, cache_len
        weight = dec.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        shape = (batch, self.heads, cache_len, self.head_dim)
        self.k_cache = [weight.new_zeros(shape) for _ in self.layers]
        self.v_cache = [weight.new_zeros(shape) for _ in self.layers]
        # enc K/V: (B * H, S, d), as fairseq keeps them
        self.enc_k = [weight.new_zeros(batch * self.heads, src_len, self.head_dim) for _ in self.layers]
        self.enc_v = [weight.new_zeros(batch * self.heads, src_len, self.head_dim) for _ in self.layers]
        self.enc_mask = torch.zeros(batch, 1, 1, src_len, dtype=torch.bool, device=self.device)
        self.positions = None
        if dec.embed_positions is not None:
            self.positions = weight.new_zeros(cache_len, dec.embed_positions.embedding_dim)
        self.load_encoder(encoder_out)

    @torch.no_grad()
    def load_positions(self) -> None:
        """The module's own positions for a right-padded prefix without pad (pad + 1 + t at step t), read
        again for every rollout: a student's learned positions change between updates. A graph's cache is
        padded past the model's last position: those rows are never read."""
        dec = self.dec
        n = min(self.cache_len, dec.embed_positions.max_positions)
        dummy = torch.full((1, n), dec.padding_idx + 1, dtype=torch.long, device=self.device)
        self.positions[:n] = dec.embed_positions(dummy)[0]

    @torch.no_grad()
    def load_encoder(self, encoder_out: dict) -> None:
        """Project the encoder output to every layer's K/V once; pad rows/positions beyond the batch are
        masked (rows beyond it attend to zeros: finite, and ignored). Also reads the positions again."""
        if self.positions is not None:
            self.load_positions()
        enc = encoder_out["encoder_out"][0]  # (S, B, C)
        src_len, bsz = enc.size(0), enc.size(1)
        mask = encoder_out["encoder_padding_mask"][0] if len(encoder_out["encoder_padding_mask"]) > 0 else None
        self.enc_mask.zero_()
        if src_len < self.src_len:
            self.enc_mask[:bsz, 0, 0, src_len:] = True
        if mask is not None:
            self.enc_mask[:bsz, 0, 0, :src_len] = mask
        for i, layer in enumerate(self.layers):
            for proj, buf in ((layer.encoder_attn.k_proj, self.enc_k[i]), (layer.encoder_attn.v_proj, self.enc_v[i])):
                kv = proj(enc).view(src_len, bsz * self.heads, self.head_dim).transpose(0, 1)
                if src_len == self.src_len and bsz == self.batch:
                    buf.copy_(kv)
                else:
                    buf.zero_()
                    buf[: bsz * self.heads, :src_len].copy_(kv)

    def reset_cache(self) -> None:
        """Zero the self-attention caches: stale non-finite values (an fp16 overflow of an earlier
        rollout) would turn a masked 0 * inf into NaN."""
        for k, v in zip(self.k_cache, self.v_cache):
            k.zero_()
            v.zero_()

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        """(B*H, 1, d) queries against (B*H, L, d) keys/values; ``mask`` (B, 1, 1, L) True = excluded."""
        scores = torch.bmm(q, k.transpose(1, 2))
        if mask is not None:
            scores = scores.view(self.batch, self.heads, 1, -1).masked_fill(mask, float("-inf"))
            scores = scores.view(self.batch * self.heads, 1, -1)
        probs = F.softmax(scores.float(), dim=-1).type_as(scores)
        return torch.bmm(probs, v).view(self.batch, self.heads * self.head_dim)

    def __call__(self, tokens: Tensor, step: Tensor, kv_len: int, step_mask: Optional[Tensor],
                 temperature: float = 1.0) -> Tensor:
        """float32 log-probs (B, V) of the next token after ``tokens`` (B,) at position ``step`` (1,).

        Attends to the first ``kv_len`` cache positions; ``step_mask`` (B, 1, 1, kv_len) hides the ones
        after ``step`` (None when ``kv_len == step + 1``).
        """
        dec, B, H, d = self.dec, self.batch, self.heads, self.head_dim
        x = dec.embed_scale * dec.embed_tokens(tokens)
        if dec.project_in_dim is not None:
            x = dec.project_in_dim(x)
        if self.positions is not None:
            x = x + self.positions.index_select(0, step)
        if dec.layernorm_embedding is not None:
            x = dec.layernorm_embedding(x)
        for i, layer in enumerate(self.layers):
            sa, ea, pre = layer.self_attn, layer.encoder_attn, layer.normalize_before

            def self_attention(h, sa=sa, i=i):
                q = sa.q_proj(h)
                q *= sa.scaling
                self.k_cache[i].index_copy_(2, step, sa.k_proj(h).view(B, H, 1, d))
                self.v_cache[i].index_copy_(2, step, sa.v_proj(h).view(B, H, 1, d))
                k = self.k_cache[i][:, :, :kv_len].reshape(B * H, kv_len, d)
                v = self.v_cache[i][:, :, :kv_len].reshape(B * H, kv_len, d)
                return sa.out_proj(self._attend(q.view(B * H, 1, d), k, v, step_mask))

            def encoder_attention(h, ea=ea, i=i):
                q = ea.q_proj(h)
                q *= ea.scaling
                return ea.out_proj(self._attend(q.view(B * H, 1, d), self.enc_k[i], self.enc_v[i], self.enc_mask))

            x = _sublayer(x, layer.self_attn_layer_norm, pre, self_attention)
            x = _sublayer(x, layer.encoder_attn_layer_norm, pre, encoder_attention)
            x = _sublayer(x, layer.final_layer_norm, pre, lambda h, l=layer: l.fc2(l.activation_fn(l.fc1(h))))
        if dec.layer_norm is not None:
            x = dec.layer_norm(x)
        if dec.project_out_dim is not None:
            x = dec.project_out_dim(x)
        logits = dec.output_layer(x)
        if temperature != 1.0:
            logits = logits.div_(temperature)  # in the model's dtype, as EnsembleModel.forward_decoder
        return F.log_softmax(logits, dim=-1, dtype=torch.float32)


class _EagerPolicy:
    """The step run eagerly (CPU, or CUDA without graphs): attends to the filled positions only."""

    def __init__(self, model, encoder_out, batch, src_len, cache_len, temperature, capture, role):
        self.step_fn = _DecoderStep(model, encoder_out, batch, src_len, cache_len)
        self.temperature = temperature
        self.steps = torch.arange(cache_len, device=self.step_fn.device)

    def __call__(self, tokens: Tensor, step: int) -> Tensor:
        return self.step_fn(tokens, self.steps[step: step + 1], step + 1, None, self.temperature)


class _GraphState:
    """Static buffers of one (model, padded batch, padded source, cache length) and its captured graphs,
    one per attended-length bucket. Reused across rollouts: new inputs are copied in.

    Without ``capture`` (CPU tests) the same padded, masked step runs eagerly: what a graph replays.
    """

    def __init__(self, model, encoder_out, batch, src_len, cache_len, temperature, capture):
        self.step_fn = _DecoderStep(model, encoder_out, batch, src_len, cache_len)
        self.temperature = temperature
        device = self.step_fn.device
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.capture = capture
        self.graphs = {}  # kv bucket -> (graph, output)
        # one memory pool per state: its graphs are replayed one at a time, in increasing bucket order
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.weight_ptr = model.decoder.embed_tokens.weight.data_ptr()

    def _forward(self, kv_len: int) -> Tensor:
        positions = torch.arange(kv_len, device=self.step.device)
        mask = (positions > self.step).view(1, 1, 1, kv_len)
        return self.step_fn(self.tokens, self.step, kv_len, mask, self.temperature)

    def run(self, kv_len: int) -> Tensor:
        if not self.capture:
            return self._forward(kv_len)
        entry = self.graphs.get(kv_len)
        if entry is None:
            entry = self.graphs[kv_len] = self._capture(kv_len)
        if entry[0] is None:  # capture failed: this bucket runs eagerly
            return self._forward(kv_len)
        entry[0].replay()
        return entry[1]

    def _capture(self, kv_len: int):
        # warm up on a side stream (lazy inits, cuBLAS handles), then capture; both write the same K/V at
        # the current step as the replay will, so they leave the cache as it should be
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: fairseq's prefetch threads may touch CUDA while this thread captures
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self._forward(kv_len)
        except RuntimeError as e:  # e.g. an op that cannot be captured in this torch build
            log_once(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0]}); the step "
                     "runs eagerly")
            return None, None
        return graph, out


_graph_pool: "OrderedDict[tuple, _GraphState]" = OrderedDict()


class _GraphPolicy:
    """The step replayed from CUDA graphs, with the batch and source padded to power-of-two buckets."""

    def __init__(self, model, encoder_out, batch, src_len, cache_len, temperature, capture, role):
        self.batch = batch
        b_pad, s_pad, t_pad = _bucket(batch), _bucket(src_len), _bucket(cache_len, 16)
        # role: one model may be both student and teacher (self-distillation), with caches of its own each
        key = (role, id(model), b_pad, s_pad, t_pad, float(temperature), model.decoder.embed_tokens.weight.dtype,
               capture)
        state = _graph_pool.get(key)
        if state is not None and state.weight_ptr != model.decoder.embed_tokens.weight.data_ptr():
            state = None  # the model moved: its captured weight addresses are stale
        if state is None:
            state = _GraphState(model, encoder_out, b_pad, s_pad, t_pad, temperature, capture)
            _graph_pool[key] = state
            while len(_graph_pool) > GRAPH_POOL_SIZE:
                _graph_pool.popitem(last=False)
        else:
            state.step_fn.load_encoder(encoder_out)
        _graph_pool.move_to_end(key)
        state.step_fn.reset_cache()
        state.tokens.fill_(0)
        self.state = state

    def __call__(self, tokens: Tensor, step: int) -> Tensor:
        state = self.state
        state.tokens[: self.batch].copy_(tokens)
        state.step.fill_(step)
        return state.run(min(_bucket(step + 1, 16), state.step_fn.cache_len))[: self.batch]


def use_graphs(device: torch.device) -> bool:
    return device.type == "cuda" and hasattr(torch.cuda, "CUDAGraph")


class _FinishedProbe:
    """Whether every row has finished, asked at every step without stalling the GPU.

    On CPU reading the flag costs nothing. On CUDA the flag is copied to pinned host memory without
    blocking, and read once its event has completed; only if it is still in flight after ``SYNC_EVERY``
    steps does the loop wait for it. Reading a flag from an earlier step is safe: finished rows stay
    finished, and the extra steps only decode pad for them.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.host = torch.zeros((), dtype=torch.bool).pin_memory()
            self.event = torch.cuda.Event()
            self.asked_at = None  # the step whose flag is in flight

    def __call__(self, done: Tensor, step: int) -> bool:
        if not self.cuda:
            return bool(done.all())
        if self.asked_at is not None:
            if step - self.asked_at >= SYNC_EVERY:
                self.event.synchronize()
            if self.event.query():
                self.asked_at = None
                if bool(self.host):
                    return True
        if self.asked_at is None:
            self.host.copy_(done.all(), non_blocking=True)
            self.event.record()
            self.asked_at = step
        return False


def log_once(message: str) -> None:
    """One log line per message and process."""
    if message not in _logged_reasons:
        _logged_reasons.add(message)
        logger.info("static rollout engine: %s", message)


def log_fallback(reason: str) -> None:
    log_once(f"{reason} is not supported; using the exact engine")


def static_unsupported(model: nn.Module, teachers: List[nn.Module]) -> Optional[str]:
    """Why this rollout cannot use the static engine (None: it can)."""
    if len(teachers) > 1:
        return "a teacher ensemble"
    for role, m in [("student", model)] + [("teacher", t) for t in teachers]:
        reason = unsupported(m)
        if reason is not None:
            return f"{role}: {reason}"
    return None


@torch.no_grad()
def decode(model, teachers, src_tokens, src_lengths, *, eos, pad, max_len, min_len, sampling, topk,
           temperature, teacher_prob, teacher_sample, keep_teacher_lprobs, graphs: Optional[bool] = None) -> Rollout:
    """The static engine's decoding loop (called by ``rollout.rollout`` inside eval mode and no_grad)."""
    bsz, device = src_tokens.size(0), src_tokens.device
    # graphs: None = on CUDA; True = the padded graph shapes (captured only on CUDA: on CPU, for tests)
    graphs = use_graphs(device) if graphs is None else graphs
    capture = graphs and use_graphs(device)
    net_input = {"src_tokens": src_tokens, "src_lengths": src_lengths}
    run_student = not (teachers and teacher_prob == 1.0)
    policy_cls = _GraphPolicy if graphs else _EagerPolicy
    cache_len = max_len + 1
    policies = {}
    # autocast (--amp) would recast inside a captured graph; the engine runs each model in its own dtype
    with torch.autocast(device.type, enabled=False) if device.type == "cuda" else contextlib.nullcontext():
        if run_student:
            enc = model.encoder.forward_torchscript(net_input)
            policies["student"] = policy_cls(model, enc, bsz, src_tokens.size(1), cache_len, temperature, capture,
                                              "student")
        if teachers:
            enc = teachers[0].encoder.forward_torchscript(net_input)
            policies["teacher"] = policy_cls(teachers[0], enc, bsz, src_tokens.size(1), cache_len, 1.0, capture,
                                              "teacher")
        return _loop(policies, bsz, device, src_tokens, eos=eos, pad=pad, max_len=max_len, min_len=min_len,
                     sampling=sampling, topk=topk, teacher_prob=teacher_prob, teacher_sample=teacher_sample,
                     keep_teacher_lprobs=keep_teacher_lprobs, copy_outputs=graphs)


def _loop(policies, bsz, device, src_tokens, *, eos, pad, max_len, min_len, sampling, topk, teacher_prob,
          teacher_sample, keep_teacher_lprobs, copy_outputs) -> Rollout:
    out = src_tokens.new_full((bsz, max_len + 1), pad)
    lengths = src_tokens.new_zeros(bsz)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    feed = src_tokens.new_full((bsz,), eos)
    cum = {name: torch.zeros(bsz, device=device) for name in policies}
    has_teacher = "teacher" in policies
    t_argmax = src_tokens.new_full((bsz, max_len + 1), pad) if has_teacher else None
    t_steps: List[Tensor] = []
    teacher_tokens = torch.zeros((), dtype=torch.long, device=device)
    mix = "student" in policies and has_teacher and teacher_prob > 0.0
    finished = _FinishedProbe(device)

    for step in range(max_len + 1):
        actions, masked = {}, {}
        if "student" in policies:
            lp = policies["student"](feed, step)
            masked["student"] = apply_generation_rules(lp, step, min_len, max_len, eos, pad)
            if sampling == "greedy":
                actions["student"] = _greedy(masked["student"], cum["student"], step)
            else:
                actions["student"] = _sample(masked["student"], topk, eos)
        if has_teacher:
            lp = policies["teacher"](feed, step)
            t_argmax[:, step] = lp.argmax(dim=1)
            if keep_teacher_lprobs:
                t_steps.append(lp.clone() if copy_outputs else lp)  # a graph's output is overwritten
            if teacher_prob > 0.0:
                masked["teacher"] = apply_generation_rules(lp if not keep_teacher_lprobs else lp.clone(), step,
                                                           min_len, max_len, eos, pad)
                if teacher_sample:
                    actions["teacher"] = _sample(masked["teacher"], 0, eos)
                else:
                    actions["teacher"] = _greedy(masked["teacher"], cum["teacher"], step)
        active = ~done
        if not mix and "teacher" in actions:
            nxt = actions["teacher"]
            teacher_tokens += active.sum()
        elif not mix:
            nxt = actions["student"]
        else:
            coin = torch.rand(bsz, device=device) < teacher_prob
            nxt = torch.where(coin, actions["teacher"], actions["student"])
            teacher_tokens += (coin & active).sum()
        for name, lp in masked.items():
            cum[name] = _advance_scores(cum[name], lp, nxt, step)
        nxt = nxt.masked_fill(done, pad)  # finished rows decode pad from now on; their outputs are ignored
        out[:, step] = nxt
        ended = nxt.eq(eos)
        lengths.masked_fill_(ended, step + 1)
        done |= ended
        feed = nxt
        if step < max_len and finished(done, step):
            break

    tokens, prev_output_tokens, after_end = teacher_forcing_layout(out, lengths, eos, pad)
    width = tokens.size(1)
    teacher_lprobs = None
    if has_teacher and keep_teacher_lprobs:
        # row by row, as the exact engine packs them: dense (B, T, V)[tokens != pad]
        teacher_lprobs = torch.stack(t_steps[:width], dim=1)[~after_end]
    return Rollout(
        tokens=tokens,
        prev_output_tokens=prev_output_tokens,
        lengths=lengths,
        teacher_lprobs=teacher_lprobs,
        teacher_argmax=t_argmax[:, :width].masked_fill(after_end, pad).contiguous() if has_teacher else None,
        teacher_tokens=teacher_tokens,
    )
