"""The compared methods and the two budgets (tiers). One student architecture and one optimizer for all.

Every method trains ``transformer_student_small`` (3 encoder + 1 decoder layers, d=128, FFN 512):
the shared teacher is 3+3 d=256, and the paper's 2+2 d=256 student would decode only about 1.4x
faster, because the output projection over the 7,796-piece vocabulary dominates a step.
"""
from typing import Dict, List

STUDENT = "transformer_student_small"

# cost: rough seconds per update on CPU (KD methods as benchmarks/update_speed.py measured them, CE a
# guess), only to start the longest runs first; gold: Multi30k itself; seqkd / seqinter: the teacher's corpora over train (gold valid and test)
METHODS: Dict[str, dict] = {
    "scratch": dict(cost=1.2, data="gold", kd=False, label="Scratch (label-smoothed CE on gold)"),
    "word_kd": dict(cost=2.3, data="gold", kd=True, label="Word-KD (alpha 0.5)"),
    "seqkd": dict(cost=1.2, data="seqkd", kd=False, label="Seq-KD (teacher beam 5)"),
    "seqkd_word_kd": dict(cost=2.3, data="seqkd", kd=True, label="Seq-KD + Word-KD"),
    "seqinter": dict(cost=1.2, data="seqinter", kd=False, label="Seq-Inter (best of 5 by sentence BLEU)"),
    "imitkd": dict(cost=2.8, data="gold", kd=True, label="ImitKD (argmax targets, top-5 rollouts)"),
    "imitkd_full": dict(cost=3.1, data="gold", kd=True, label="ImitKD+Full (full targets, greedy rollouts)"),
    "imitkd_star": dict(cost=2.8, data="seqkd", kd=True, label="ImitKD* (ImitKD over the Seq-KD corpus)"),
    "imitkd_token": dict(cost=3.9, data="gold", kd=True, label="ImitKD+Full, token-level mixing"),
    # the same three ImitKD variants with β driven by the student's agreement with the teacher
    "imitkd_adaptive": dict(cost=2.8, data="gold", kd=True, label="ImitKD, agreement-clock beta"),
    "imitkd_full_adaptive": dict(cost=3.1, data="gold", kd=True, label="ImitKD+Full, agreement-clock beta"),
    "imitkd_token_adaptive": dict(cost=3.9, data="gold", kd=True, label="ImitKD+Full, token mixing, agreement-clock beta"),
    # the divergence family (--kd-divergence), each against word_kd's forward KL
    "word_kd_reverse_kl": dict(cost=2.3, data="gold", kd=True, label="Word-KD, reverse KL"),
    "word_kd_jsd": dict(cost=2.3, data="gold", kd=True, label="Word-KD, generalized JSD (beta 0.5)"),
    "word_kd_atkd": dict(cost=2.3, data="gold", kd=True, label="Word-KD, ATKD (alpha 0.2)"),
    "imitkd_full_jsd": dict(cost=3.1, data="gold", kd=True,
                            label="ImitKD+Full, agreement-clock beta, generalized JSD (beta 0.5)"),
    "imitkd_full_atkd": dict(cost=3.1, data="gold", kd=True, label="ImitKD+Full, agreement-clock beta, ATKD"),
    # word_kd with the teacher's top-32 read from imitkd-teacher-cache instead of a teacher pass
    "word_kd_cache": dict(cost=1.5, data="gold", kd=True, cache=32,
                          label="Word-KD from the offline teacher cache (top-32 + tail)"),
}
# three seeds for these in the quick tier, two for the rest
MAIN_METHODS = ("scratch", "word_kd", "seqkd", "imitkd_full_adaptive", "imitkd_token_adaptive")

# Not part of the comparison: variants that test why a method does what it does, run on request
# (``--methods imitkd_full_base10,...``) and reported apart, under "ablations".
ABLATIONS: Dict[str, dict] = {
    "imitkd_full_base10": dict(cost=3.1, data="gold", kd=True,
                               label="ImitKD+Full, slower beta = 10^(-t/N) (the paper's CNN/DM schedule)"),
    "imitkd_full_beta1": dict(cost=2.5, data="gold", kd=True,
                              label="ImitKD+Full with beta = 1: the teacher's full distribution on gold prefixes only"),
    "imitkd_full_beta0": dict(cost=3.1, data="gold", kd=True,
                              label="ImitKD+Full with beta = 0: every row on-policy from the first update"),
    "imitkd_full_warmup": dict(cost=3.1, data="gold", kd=True,
                               label="ImitKD+Full, beta = 1 for the first 40% of updates, then 200^(-t/N)"),
    "seqkd_ct2": dict(cost=1.2, data="seqkd_ct2", kd=False,
                      label="Seq-KD on the corpus CTranslate2 decoded (imitkd-seqkd --engine ctranslate2, int8)"),
    "seqkd_ct2_vmap": dict(cost=1.2, data="seqkd_ct2_vmap", kd=False,
                           label="Seq-KD on the corpus CTranslate2 decoded with a vocabulary map (--ct2-vmap)"),
    "seqkd_ct2_7bit": dict(cost=1.2, data="seqkd_ct2_7bit", kd=False,
                           label="Seq-KD on the corpus CTranslate2 decoded with 7-bit int8 weights "
                                 "(--ct2-int8-weight-bits 7)"),
    # the deployment-speed architecture lever: depth moved to the encoder at d=256 (6+1), against the 3+1 d=128
    # student of every other row, trained as word_kd_cache
    "word_kd_cache_deep_shallow": dict(cost=4.0, data="gold", kd=True, cache=32,
                                       arch="transformer_student_deep_shallow",
                                       label="Word-KD from the teacher cache, 6+1 d=256 deep-shallow student"),
    # ... pre-norm: the post-norm 6-layer encoder stalled at this budget's learning rate
    "word_kd_cache_deep_shallow_prenorm": dict(cost=4.0, data="gold", kd=True, cache=32,
                                               arch="transformer_student_deep_shallow",
                                               label="Word-KD from the teacher cache, 6+1 d=256 deep-shallow "
                                                     "student, pre-norm"),
}
ALL = {**METHODS, **ABLATIONS}

# One label-smoothing rule for every method: ε = 0.1 on every one-hot target (gold, and the teacher's
# argmax in ImitKD), never on a teacher distribution (word_kd's KD half, ImitKD+Full).
_LS = ["--label-smoothing", "0.1"]
_CE = ["--task", "translation", "--criterion", "label_smoothed_cross_entropy"] + _LS
_WORD_KD = ["--criterion", "word_kd", "--kd-alpha", "0.5", "--kd-temperature", "1"] + _LS


def _imitkd(base: str = "200") -> List[str]:
    return ["--criterion", "imitkd", "--imitkd-beta-schedule", "exponential", "--imitkd-beta-base", base]


def _constant(value: str) -> List[str]:
    return ["--criterion", "imitkd", "--imitkd-beta-schedule", "constant", "--imitkd-beta", value]


# the package's defaults (agreement from 0.45 to 0.6, momentum 0.95), spelled out for the record
_ADAPTIVE = _imitkd() + ["--imitkd-beta-clock", "agreement", "--imitkd-agree-low", "0.45",
                         "--imitkd-agree-high", "0.6"]
_IMITKD = _imitkd()
_ARGMAX_TOPK = ["--imitkd-target", "argmax", "--imitkd-sampling", "topk", "--imitkd-topk", "5"] + _LS
_FULL_GREEDY = ["--imitkd-target", "full", "--imitkd-sampling", "greedy"]
_TOKEN = ["--imitkd-mix", "token"]
_METHOD_ARGS = {
    "scratch": _CE,
    "word_kd": _WORD_KD,
    "seqkd": _CE,
    "seqkd_word_kd": _WORD_KD,
    "seqinter": _CE,
    "seqkd_ct2": _CE,
    "seqkd_ct2_vmap": _CE,
    "seqkd_ct2_7bit": _CE,
    "imitkd": _IMITKD + _ARGMAX_TOPK,
    "imitkd_full": _IMITKD + _FULL_GREEDY,
    "imitkd_star": _imitkd("2") + _ARGMAX_TOPK,  # the paper's ImitKD* base (WMT): half the rows stay on Seq-KD
    "imitkd_token": _IMITKD + _FULL_GREEDY + _TOKEN,
    "imitkd_adaptive": _ADAPTIVE + _ARGMAX_TOPK,
    "imitkd_full_adaptive": _ADAPTIVE + _FULL_GREEDY,
    "imitkd_token_adaptive": _ADAPTIVE + _FULL_GREEDY + _TOKEN,
    "word_kd_reverse_kl": _WORD_KD + ["--kd-divergence", "reverse_kl"],
    "word_kd_jsd": _WORD_KD + ["--kd-divergence", "jsd", "--kd-jsd-beta", "0.5"],
    "word_kd_atkd": _WORD_KD + ["--kd-divergence", "atkd", "--kd-atkd-alpha", "0.2"],
    "word_kd_cache": _WORD_KD,  # + --kd-teacher-cache DIR (method_args)
    "word_kd_cache_deep_shallow": _WORD_KD,
    "word_kd_cache_deep_shallow_prenorm": _WORD_KD + ["--encoder-normalize-before", "--decoder-normalize-before"],
    "imitkd_full_jsd": _ADAPTIVE + _FULL_GREEDY + ["--kd-divergence", "jsd", "--kd-jsd-beta", "0.5"],
    "imitkd_full_atkd": _ADAPTIVE + _FULL_GREEDY + ["--kd-divergence", "atkd", "--kd-atkd-alpha", "0.2"],
    "imitkd_full_base10": _imitkd("10") + _FULL_GREEDY,
    "imitkd_full_beta1": _constant("1") + _FULL_GREEDY,
    "imitkd_full_beta0": _constant("0") + _FULL_GREEDY,
    "imitkd_full_warmup": _IMITKD + _FULL_GREEDY,  # + --imitkd-beta-warmup-updates 0.4·budget (method_args)
}

# quick: 700 updates of 2,048 tokens (about 3 epochs of Multi30k) per run, so that its 12 runs, both
# seq-KD corpora, the evaluation and the timing fit in 3 hours on 2 CPU cores (two runs side by side,
# 1 thread each). full: 8,000 updates of 4,096 tokens (about 70 epochs) and 3 seeds, for a GPU or days of CPU.
# competent: every method continues the quick tier's scratch student of the same seed (700 CE updates,
# valid BLEU about 20) for 500 more updates, Adam and its schedule restarted the same way for all: on-policy
# distillation as it is used in practice, from a student that already translates. Its methods are the
# ones that can continue a gold-trained student; seqkd continues on the teacher's corpus.
TIERS: Dict[str, dict] = {
    "quick": dict(max_update=700, max_tokens=2048, warmup=100, validate_every=100, validate_after=300,
                  seeds={m: ([1, 2, 3] if m in MAIN_METHODS else [1, 2]) for m in ALL}),
    "competent": dict(max_update=500, max_tokens=2048, warmup=100, validate_every=100, validate_after=100,
                      start_from="quick:scratch", seeds={m: [1, 2, 3] for m in ALL}),
    "full": dict(max_update=8000, max_tokens=4096, warmup=1000, validate_every=500, validate_after=2000,
                 seeds={m: [1, 2, 3] for m in ALL}),
    # curve: scratch and word_kd far past where they stop improving, validated often (curve.py reads the
    # budget off their valid BLEU); converged: every method with that budget (max_update None: curve.json).
    # Batches of 8,192 tokens: on a GPU the tiny student's step costs about the same at twice the tokens.
    "curve": dict(max_update=6000, max_tokens=8192, warmup=500, validate_every=250, validate_after=250,
                  curve_points=4, seeds={m: [1, 2] for m in ALL}),
    "converged": dict(max_update=None, max_tokens=8192, warmup=500, validate_every=250, validate_after=500,
                      seeds={m: [1, 2, 3] for m in ALL}),
}
COMPETENT_METHODS = ("scratch", "word_kd", "seqkd", "imitkd_full", "imitkd_full_adaptive", "imitkd_token_adaptive",
                     "imitkd_adaptive", "imitkd_full_beta0")
#: each tier's compared methods, where they are not all of METHODS
TIER_METHODS = {
    "competent": COMPETENT_METHODS,
    "curve": ("scratch", "word_kd"),
    "converged": ("scratch", "word_kd", "seqkd", "word_kd_cache", "imitkd_full_adaptive", "imitkd_token_adaptive"),
}


def method_args(method: str, teacher_args: List[str], tier: dict = None, caches: Dict[int, str] = None) -> List[str]:
    """fairseq-train options of one method (teacher options only for the KD criterions; ``caches``: K ->
    the teacher cache directory of the methods that read one)."""
    spec = ALL[method]
    args = list(_METHOD_ARGS[method])
    if "cache" in spec:
        args += ["--kd-teacher-cache", caches[spec["cache"]]]
    if method == "imitkd_full_warmup":
        args += ["--imitkd-beta-warmup-updates", str(int(0.4 * (tier or TIERS["quick"])["max_update"]))]
    if spec["kd"]:
        args = ["--task", "distillation"] + teacher_args + args
    return args


# one gradient-clipping setting for every method: the ImitKD reference code's 5
CLIP_NORM = 5.0


def common_args(tier: dict, seed: int, arch: str = STUDENT) -> List[str]:
    """What every method shares: student (one architecture but for the architecture ablation), optimizer,
    budget, seed and the checkpoint-selection rule."""
    return [
        "--arch", arch, "--share-all-embeddings", "--dropout", "0.1", "--weight-decay", "0.0001",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", str(CLIP_NORM),
        "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(tier["warmup"]),
        "--max-tokens", str(tier["max_tokens"]), "--required-batch-size-multiple", "1",
        "--max-update", str(tier["max_update"]), "--seed", str(seed),
        # validate (and save) by updates only: BLEU-selected checkpoints at fixed points for every method
        "--validate-interval", "100000", "--save-interval", "100000",
        "--validate-interval-updates", str(tier["validate_every"]),
        "--save-interval-updates", str(tier["validate_every"]), "--keep-interval-updates", "1",
        "--validate-after-updates", str(tier["validate_after"]),
        "--eval-bleu", "--eval-bleu-args", '{"beam": 1, "max_len_a": 1.2, "max_len_b": 10}', "--eval-bleu-remove-bpe", "sentencepiece",
        "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
        "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "25", "--num-workers", "0",
    ]
