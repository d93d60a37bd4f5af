"""The static-shape rollout engine against fairseq's SequenceGenerator and the exact engine (CPU).

The trained model is the shared Multi30k teacher (3+3, d=256, post-norm, sinusoidal positions, shared
embeddings); small random transformers built with other arguments cover the rest of the family.
"""
import copy
import logging
import math
import os

import pytest
import torch

from test_rollout import (  # noqa: F401  (fixtures)
    DATA_DIR, LENGTH_RULES, TEACHER_DIR, assert_same_as, batch, build_tiny, check_layout, check_teacher_targets,
    sequence_generator, student, teacher_forced_lprobs, tgt_dict,
)

from fairseq_imitkd import static_rollout  # noqa: E402
from fairseq_imitkd.rollout import resolve_engine, rollout  # noqa: E402
from fairseq_imitkd.teacher import Teacher  # noqa: E402

STATIC = {"engine": "static"}


@pytest.fixture(scope="module")
def bundle():
    """test_rollout's bundle, skipping (not failing) without the shared teacher: the fairseq-train test at the
    end needs only the suite's toy teacher."""
    import argparse

    from fairseq import checkpoint_utils

    if not os.path.isfile(os.path.join(TEACHER_DIR, "checkpoint.pt")):
        pytest.skip("shared Multi30k teacher not available")
    torch.serialization.add_safe_globals([argparse.Namespace])
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [os.path.join(TEACHER_DIR, "checkpoint.pt")],
        arg_overrides={"data": TEACHER_DIR, "source_lang": "de", "target_lang": "en"},
    )
    return models[0].eval(), cfg, task


@pytest.fixture(scope="module")
def m30k(bundle):
    """The shared Multi30k teacher model (``teacher`` is conftest's toy checkpoint here)."""
    return bundle[0]


def encode_lines(bundle, lines):
    import sentencepiece
    from fairseq.data.data_utils import collate_tokens

    task = bundle[2]
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(TEACHER_DIR, "spm.model"))
    d = task.source_dictionary
    seqs = [d.encode_line(" ".join(sp.encode(line, out_type=str)), add_if_not_exist=False, append_eos=True).long()
            for line in lines]
    return collate_tokens(seqs, d.pad(), d.eos(), left_pad=True), torch.tensor([s.numel() for s in seqs])


def equal_rows(ro, reference):
    return sum(
        int(ro.lengths[i]) == ref.numel() and torch.equal(ro.tokens[i, : ref.numel()], ref)
        for i, ref in enumerate(reference)
    )


# --------------------------------------------------------------------------- greedy = SequenceGenerator


def test_greedy_matches_sequence_generator_on_the_whole_valid_set(bundle, m30k, tgt_dict):
    """All 1014 Multi30k validation sentences, in batches of 128: >= 99.9% of rows identical."""
    pytest.importorskip("sentencepiece")
    with open(os.path.join(DATA_DIR, "val.de"), encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    same = total = 0
    for start in range(0, len(lines), 128):
        src_tokens, src_lengths = encode_lines(bundle, lines[start: start + 128])
        reference = sequence_generator([m30k], tgt_dict, src_tokens, src_lengths)
        ro = rollout(m30k, src_tokens, src_lengths, **STATIC)
        check_layout(ro, tgt_dict.eos(), tgt_dict.pad())
        same += equal_rows(ro, reference)
        total += len(reference)
    logging.getLogger(__name__).info("static engine: %d of %d rows equal to SequenceGenerator", same, total)
    assert total == len(lines) and same >= 0.999 * total


@LENGTH_RULES
def test_greedy_matches_sequence_generator(m30k, tgt_dict, batch, kwargs):
    src_tokens, src_lengths = batch
    reference = sequence_generator([m30k], tgt_dict, src_tokens, src_lengths, **kwargs)
    ro = rollout(m30k, src_tokens, src_lengths, **kwargs, **STATIC)
    assert_same_as(ro, reference)
    check_layout(ro, tgt_dict.eos(), tgt_dict.pad())


def test_max_decoder_positions_caps_length(bundle, tgt_dict, batch):
    src_tokens, src_lengths = batch
    small = build_tiny(bundle, seed=3, max_target_positions=9)
    ro = rollout(small, src_tokens, src_lengths, **STATIC)
    assert_same_as(ro, sequence_generator([small], tgt_dict, src_tokens, src_lengths))
    assert int(ro.lengths.max()) == 9


def variant(bundle, seed, **overrides):
    """A small random transformer (2 decoder layers) with some of the family's options changed."""
    model = build_tiny(bundle, seed=seed, layers=2, heads=4, **overrides)
    # random weights give near-uniform distributions; sharper ones make the test meaningful
    if model.decoder.output_projection is not None:  # (None with adaptive softmax)
        with torch.no_grad():
            model.decoder.output_projection.weight.mul_(8.0)
    return model


VARIANTS = {
    "post-norm sinusoidal shared": {},
    "pre-norm learned": {"decoder_normalize_before": True, "encoder_normalize_before": True,
                         "decoder_learned_pos": True, "encoder_learned_pos": True},
    "layernorm_embedding": {"layernorm_embedding": True},
    "no_scale_embedding": {"no_scale_embedding": True},
    "unshared output, project_out_dim": {"share_all_embeddings": False, "share_decoder_input_output_embed": False,
                                         "decoder_output_dim": 24},
    "gelu, no positions": {"activation_fn": "gelu", "no_token_positional_embeddings": True},
}


@pytest.mark.parametrize("overrides", list(VARIANTS.values()), ids=list(VARIANTS))
def test_family_variants_match_fairseq(bundle, tgt_dict, batch, overrides):
    """Greedy tokens equal SequenceGenerator's, and the distributions equal the exact engine's."""
    src_tokens, src_lengths = batch
    model = variant(bundle, 21, **overrides)
    assert static_rollout.unsupported(model) is None
    ro = rollout(model, src_tokens, src_lengths, max_len_b=20, **STATIC)
    assert_same_as(ro, sequence_generator([model], tgt_dict, src_tokens, src_lengths, max_len_b=20))
    # the same model as a teacher beside a student that only follows it: its log-probs at every position
    follow = dict(teacher=Teacher([model]), teacher_prob=1.0, max_len_b=20)
    static, exact = (rollout(model, src_tokens, src_lengths, engine=e, **follow) for e in ("static", "exact"))
    assert torch.equal(static.tokens, exact.tokens)
    assert (static.teacher_lprobs - exact.teacher_lprobs).abs().max() < 1e-5


# --------------------------------------------------------------------------- the teacher beside the student


@pytest.mark.parametrize("teacher_prob", [0.0, 1.0])
def test_teacher_lprobs_equal_the_exact_engine(student, m30k, tgt_dict, batch, teacher_prob):
    src_tokens, src_lengths = batch
    kwargs = dict(teacher=Teacher([m30k]), teacher_prob=teacher_prob, max_len_b=30)
    static, exact = (rollout(student, src_tokens, src_lengths, engine=e, **kwargs) for e in ("static", "exact"))
    assert torch.equal(static.tokens, exact.tokens) and torch.equal(static.lengths, exact.lengths)
    assert static.teacher_lprobs.shape == exact.teacher_lprobs.shape
    diff = (static.teacher_lprobs - exact.teacher_lprobs).abs().max()
    assert diff < 1e-5, diff
    assert torch.equal(static.teacher_argmax, exact.teacher_argmax)
    assert int(static.teacher_tokens) == int(exact.teacher_tokens)
    check_layout(static, tgt_dict.eos(), tgt_dict.pad())


@pytest.mark.parametrize("teacher_sample", [False, True])
def test_token_mixing_returns_teacher_forced_lprobs(student, m30k, tgt_dict, batch, teacher_sample):
    src_tokens, src_lengths = batch
    torch.manual_seed(7)
    ro = rollout(student, src_tokens, src_lengths, sampling="topk", topk=10, max_len_b=25, teacher=Teacher([m30k]),
                 teacher_prob=0.5, teacher_sample=teacher_sample, **STATIC)
    check_layout(ro, tgt_dict.eos(), tgt_dict.pad())
    mask = check_teacher_targets(ro, [m30k], src_tokens, src_lengths, tgt_dict)
    n = int(mask.sum())
    assert 0 < int(ro.teacher_tokens) < n  # both policies acted, counted over generated tokens only


def test_keep_teacher_lprobs_false(student, m30k, batch):
    src_tokens, src_lengths = batch
    kwargs = dict(teacher=Teacher([m30k]), teacher_prob=0.3, max_len_b=15, **STATIC)
    torch.manual_seed(9)
    full = rollout(student, src_tokens, src_lengths, **kwargs)
    torch.manual_seed(9)
    lean = rollout(student, src_tokens, src_lengths, keep_teacher_lprobs=False, **kwargs)
    assert lean.teacher_lprobs is None
    assert torch.equal(full.tokens, lean.tokens) and torch.equal(full.teacher_argmax, lean.teacher_argmax)


def test_low_precision_teacher(student, m30k, tgt_dict, batch):
    src_tokens, src_lengths = batch
    half = copy.deepcopy(m30k).to(torch.bfloat16)
    ro = rollout(student, src_tokens[:8], src_lengths[:8], teacher=Teacher([half]), teacher_prob=0.5, max_len_b=8,
                 **STATIC)
    assert ro.teacher_lprobs.dtype == torch.float32 and torch.isfinite(ro.teacher_lprobs).all()
    expected = teacher_forced_lprobs([m30k], src_tokens[:8], src_lengths[:8], ro.prev_output_tokens)
    mask = ro.tokens.ne(tgt_dict.pad())
    assert (ro.teacher_lprobs.exp() - expected[mask].exp()).abs().sum(-1).max() < 0.2


# --------------------------------------------------------------------------- sampling


def test_topk_sampling_is_seeded(student, tgt_dict, batch):
    src_tokens, src_lengths = batch
    draws = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        draws.append(rollout(student, src_tokens, src_lengths, sampling="topk", topk=5, max_len_b=20, **STATIC))
    assert torch.equal(draws[0].tokens, draws[1].tokens)
    assert draws[0].tokens.shape != draws[2].tokens.shape or not torch.equal(draws[0].tokens, draws[2].tokens)
    check_layout(draws[0], tgt_dict.eos(), tgt_dict.pad())


def test_sampling_draws_only_from_top_k(student, tgt_dict, batch):
    src_tokens, src_lengths = batch
    torch.manual_seed(0)
    ro = rollout(student, src_tokens, src_lengths, sampling="topk", topk=3, max_len_b=12, min_len=12, **STATIC)
    with torch.no_grad():
        lprobs = student.get_normalized_probs(student(src_tokens, src_lengths, ro.prev_output_tokens), log_probs=True)
    lprobs[:, :, tgt_dict.pad()] = -math.inf
    lprobs[:, :12, tgt_dict.eos()] = -math.inf
    top3 = lprobs[:, :12].topk(3, dim=-1).indices
    assert (top3 == ro.tokens[:, :12, None]).any(-1).all()
    assert ro.tokens[:, 12].eq(tgt_dict.eos()).all()


def test_rows_with_no_finite_score_end_instead_of_reaching_multinomial():
    """Both engines sample through rollout_steps._sample: a row without mass (an fp16 overflow, NaN turned to
    -inf by the generation rules) takes EOS (full distribution) or its first top-k candidate, and never
    reaches torch.multinomial, which raises on CPU and fires a device-side assert on CUDA."""
    from fairseq_imitkd.rollout_steps import _sample

    lprobs = torch.tensor([[-0.1, -30.0, -math.inf, -30.0], [-math.inf] * 4, [math.nan] * 4])
    lprobs = lprobs.masked_fill(lprobs.isnan(), -math.inf)
    for _ in range(5):
        assert _sample(lprobs, 0, eos=2)[1:].eq(2).all()
        assert _sample(lprobs, 2)[0] in (0, 1, 3)
    torch.manual_seed(0)
    first = _sample(lprobs[:1].repeat(200, 1), 0, eos=2)
    assert first.eq(0).float().mean() > 0.9 and not first.eq(2).any()  # a valid row samples as before


# --------------------------------------------------------------------------- engine choice and fallback


def test_dropout_off_and_training_mode_restored(bundle, batch):
    src_tokens, src_lengths = batch
    model = build_tiny(bundle, seed=5, dropout=0.5).train()
    first = rollout(model, src_tokens, src_lengths, max_len_b=10, **STATIC)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(first.tokens, rollout(model.eval(), src_tokens, src_lengths, max_len_b=10, **STATIC).tokens)


def test_unsupported_model_falls_back_with_one_log_line(bundle, tgt_dict, batch, caplog):
    src_tokens, src_lengths = batch
    model = variant(bundle, 22, scale_attn=True)
    assert static_rollout.unsupported(model) is not None
    static_rollout._logged_reasons.clear()
    with caplog.at_level(logging.INFO, logger="fairseq_imitkd.static_rollout"):
        first = rollout(model, src_tokens, src_lengths, max_len_b=10, **STATIC)
        rollout(model, src_tokens, src_lengths, max_len_b=10, **STATIC)
    lines = [r.getMessage() for r in caplog.records if r.name == "fairseq_imitkd.static_rollout"]
    assert len(lines) == 1 and "scale_attn" in lines[0] and "exact engine" in lines[0]
    assert torch.equal(first.tokens, rollout(model, src_tokens, src_lengths, max_len_b=10, engine="exact").tokens)


@pytest.mark.parametrize("overrides,reason", [
    ({"cross_self_attention": True}, "cross_self_attention"),
    ({"scale_heads": True}, "scale_attn"),
    ({"quant_noise_pq": 0.1}, "quant noise"),
    ({"adaptive_softmax_cutoff": "100,1000", "share_all_embeddings": False,
      "share_decoder_input_output_embed": False}, "adaptive softmax"),
], ids=["cross_self_attention", "scale_heads", "quant_noise", "adaptive_softmax"])
def test_what_is_not_supported_is_named(bundle, overrides, reason):
    assert reason in static_rollout.unsupported(variant(bundle, 24, **overrides))


def test_teacher_ensemble_falls_back(bundle, student, m30k, batch):
    src_tokens, src_lengths = batch
    assert static_rollout.static_unsupported(student, [m30k, m30k]) == "a teacher ensemble"
    assert static_rollout.static_unsupported(student, [m30k]) is None
    ro = rollout(student, src_tokens, src_lengths, teacher=Teacher([m30k, build_tiny(bundle, seed=1)]),
                 teacher_prob=0.5, max_len_b=8, **STATIC)
    assert ro.teacher_lprobs is not None


def test_engine_choice(m30k, batch, monkeypatch):
    src_tokens, src_lengths = batch
    calls = []
    real = static_rollout.decode
    monkeypatch.setattr(static_rollout, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    rollout(m30k, src_tokens[:2], src_lengths[:2], max_len_b=3, engine="static")
    assert calls == [1]
    rollout(m30k, src_tokens[:2], src_lengths[:2], max_len_b=3, engine="auto")  # CPU: the exact engine
    rollout(m30k, src_tokens[:2], src_lengths[:2], max_len_b=3)
    assert calls == [1]
    assert resolve_engine("auto", torch.device("cpu")) == "exact"
    assert resolve_engine("auto", torch.device("cuda")) == "static"
    assert resolve_engine("static", torch.device("cpu")) == "static"
    with pytest.raises(ValueError, match="exact, static"):
        rollout(None, torch.zeros(1, 1, dtype=torch.long), torch.ones(1), engine="fast")


def decode(model, teachers, src_tokens, src_lengths, tgt_dict, graphs, **kwargs):
    args = dict(eos=tgt_dict.eos(), pad=tgt_dict.pad(), max_len=40, min_len=1, sampling="greedy", topk=0,
                temperature=1.0, teacher_prob=0.0, teacher_sample=False, keep_teacher_lprobs=True)
    args.update(kwargs)
    return static_rollout.decode(model, teachers, src_tokens, src_lengths, graphs=graphs, **args)


@pytest.mark.parametrize("teacher_prob", [0.0, 0.5, 1.0])
def test_padded_graph_shapes_equal_the_eager_step(student, m30k, tgt_dict, batch, teacher_prob):
    """What a CUDA graph replays (batch, source and cache padded to buckets, attention masked), run eagerly on
    CPU: the same tokens and log-probs as the unpadded step, also from a pooled state reused for other inputs."""
    src_tokens, src_lengths = batch
    static_rollout._graph_pool.clear()
    for rows in (slice(0, 32), slice(3, 20), slice(0, 32)):  # 32 -> bucket 32; 17 rows -> the same state
        src, lens = src_tokens[rows], src_lengths[rows]
        src = src[:, (src != tgt_dict.pad()).any(0)]  # as fairseq would pad these rows
        runs = []
        for graphs in (False, True):
            torch.manual_seed(5)  # the same coins
            runs.append(decode(student, [m30k], src, lens, tgt_dict, graphs, teacher_prob=teacher_prob,
                               temperature=0.7))
        eager, padded = runs
        assert torch.equal(eager.tokens, padded.tokens) and torch.equal(eager.lengths, padded.lengths)
        assert (eager.teacher_lprobs - padded.teacher_lprobs).abs().max() < 1e-5
        assert torch.equal(eager.teacher_argmax, padded.teacher_argmax)
    assert len(static_rollout._graph_pool) <= 4  # student and teacher, at most two source buckets


def test_pooled_state_sees_updated_weights(bundle, tgt_dict, batch):
    """A training step changes the weights in place between rollouts, learned positions included: a pooled
    (graph) state must decode with the new ones, as a fresh eager step does."""
    src_tokens, src_lengths = batch
    model = variant(bundle, 23, decoder_learned_pos=True, encoder_learned_pos=True)
    static_rollout._graph_pool.clear()
    decode(model, [], src_tokens, src_lengths, tgt_dict, True, max_len=12)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    again, eager = (decode(model, [], src_tokens, src_lengths, tgt_dict, g, max_len=12) for g in (True, False))
    assert len(static_rollout._graph_pool) == 1  # the state was reused
    assert torch.equal(again.tokens, eager.tokens)
    assert_same_as(eager, sequence_generator([model], tgt_dict, src_tokens, src_lengths, max_len_b=12))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("teacher_prob", [0.0, 0.5])
def test_cuda_graphs_equal_eager(student, m30k, tgt_dict, batch, teacher_prob):
    """Replayed graphs give the eager step's tokens and log-probs (to rounding: padded shapes may take other
    kernels, so a near-tie of the random student may flip), also when pooled graphs are reused; the loop
    syncs with the host once per SYNC_EVERY steps only."""
    import warnings

    src_tokens, src_lengths = (x.cuda() for x in batch)
    s, t = copy.deepcopy(student).cuda(), copy.deepcopy(m30k).cuda()
    torch.manual_seed(3)
    eager = decode(s, [t], src_tokens, src_lengths, tgt_dict, False, teacher_prob=teacher_prob)
    for _ in range(2):  # the second run replays the pooled graphs
        torch.manual_seed(3)
        ro = decode(s, [t], src_tokens, src_lengths, tgt_dict, True, teacher_prob=teacher_prob)
        same = ((ro.tokens == eager.tokens).all(1) & (ro.lengths == eager.lengths)).nonzero().squeeze(1)
        assert same.numel() >= 0.9 * len(ro.tokens)
        assert (ro.teacher_lprobs_at(same) - eager.teacher_lprobs_at(same)).abs().max() < 1e-4
    assert any(state.graphs for state in static_rollout._graph_pool.values())  # graphs were captured

    # every length bucket captured first (forced length 41), then the host syncs of a replayed rollout counted
    decode(s, [t], src_tokens, src_lengths, tgt_dict, True, min_len=40, teacher_prob=teacher_prob)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            forced = decode(s, [t], src_tokens, src_lengths, tgt_dict, True, min_len=40, teacher_prob=teacher_prob)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 41 // static_rollout.SYNC_EVERY + 12, syncs  # a sync per step would be 41 or more
    assert forced.lengths.eq(41).all()

    torch.manual_seed(3)
    sampled = decode(s, [t], src_tokens, src_lengths, tgt_dict, True, sampling="topk", topk=5,
                     teacher_prob=teacher_prob)
    check_layout(sampled, tgt_dict.eos(), tgt_dict.pad())
    reference = sequence_generator([t], tgt_dict, src_tokens, src_lengths)
    assert equal_rows(rollout(t, src_tokens, src_lengths, engine="static"), reference) >= len(reference) - 1


# --------------------------------------------------------------------------- through fairseq-train


@pytest.mark.parametrize("mix,target,sampling", [("sequence", "argmax", "topk"), ("token", "full", "greedy")])
def test_imitkd_trains_with_the_static_engine(toy_data, teacher, tmp_path, monkeypatch, mix, target, sampling):
    """A few imitkd updates through the real fairseq-train with --imitkd-rollout-engine static."""
    from conftest import fairseq_train, read_json_log
    from test_imitkd import imitkd_args

    calls = []
    real = static_rollout.decode
    monkeypatch.setattr(static_rollout, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    fairseq_train(*imitkd_args(
        toy_data, teacher, tmp_path, "--imitkd-mix", mix, "--imitkd-target", target, "--imitkd-sampling", sampling,
        "--imitkd-beta-schedule", "constant", "--imitkd-beta", "0.3", "--imitkd-rollout-engine", "static",
        "--max-update", "3",
    ))
    rows = read_json_log(tmp_path / "log.txt", "train_inner")
    assert [int(r["num_updates"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[-1]["rollout_len"]) >= 1.0
    assert len(calls) >= 3  # every update rolled out through the static engine


def test_resume_continues_exactly_with_the_static_engine(toy_data, teacher, tmp_path, monkeypatch):
    """test_imitkd's resume check (top-5 sampled rollouts, stopped at update k and resumed) run with
    --imitkd-rollout-engine static: the same rows, rollout tokens and loss as an uninterrupted run."""
    import test_imitkd

    real_args = test_imitkd.imitkd_args
    monkeypatch.setattr(test_imitkd, "imitkd_args", lambda *a: real_args(*a, "--imitkd-rollout-engine", "static"))
    calls = []
    real = static_rollout.decode
    monkeypatch.setattr(static_rollout, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    test_imitkd.test_resume_continues_exactly(toy_data, teacher, tmp_path, monkeypatch, "updates")
    assert calls
