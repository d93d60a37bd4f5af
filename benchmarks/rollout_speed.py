"""Time incremental rollouts against re-running the decoder over the whole prefix at every step.

Both decoders are greedy and forced to the same length (``--length`` tokens, final EOS included:
EOS is forbidden before step ``length - 1`` and forced there, i.e. ``min_len = max_len_b = length - 1``).
Forcing the length gives every row and both implementations exactly the same number of decoder
steps, so the ratio measures the per-step cost of incremental decoding alone; with natural
lengths it would also depend on where the model happens to stop and on dropping finished rows.

A second, unforced measurement compares ``rollout`` with fairseq's ``SequenceGenerator`` at beam 1
(the same tokens, checked) on natural lengths.

``--engine`` chooses the rollout engine(s) timed: ``exact`` (fairseq's incremental state, finished rows
dropped), ``static`` (static_rollout.py: fixed shapes, CUDA graphs on a GPU) or ``both``, side by side
in one run (JSON ``engines``: per-step time of each, and ``static_speedup_per_step``).

Example::

    OMP_NUM_THREADS=1 python benchmarks/rollout_speed.py --threads 1 \\
        --out benchmarks/results/rollout_speed.json
    python benchmarks/rollout_speed.py --device cuda --engine both --no-naive \\
        --out benchmarks/results/rollout_speed_engines_gpu.json
"""
import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time

import torch

logger = logging.getLogger("rollout_speed")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multi30k"))
import data as multi30k  # noqa: E402  (where the benchmarks' inputs are)

DEFAULT_CHECKPOINT = os.path.join(multi30k.DEFAULT_TEACHER_DIR, "checkpoint.pt")
DEFAULT_TEXT = multi30k.DEFAULT_TEXT_DIR


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", default=DEFAULT_CHECKPOINT, help="fairseq translation checkpoint (the model to roll out)"
    )
    p.add_argument("--dict-dir", default=None, help="folder with dict.{src,tgt}.txt (default: the checkpoint's folder)")
    p.add_argument("--spm", default=None, help="sentencepiece model (default: spm.model beside the checkpoint)")
    p.add_argument("--text-dir", default=DEFAULT_TEXT, help="raw Multi30k text folder")
    p.add_argument("--split", default="val")
    p.add_argument("--source-lang", default="de")
    p.add_argument("--target-lang", default="en")
    p.add_argument("--num-sentences", type=int, default=64, help="batch size: the first N sentences of --split")
    p.add_argument("--length", type=int, default=50, help="forced rollout length, final EOS included")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per method (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per method first")
    p.add_argument("--engine", default="exact", choices=["exact", "static", "both"],
                   help="rollout engine(s) to time; both: side by side in one run")
    p.add_argument("--no-naive", action="store_true", help="skip the re-run-the-whole-prefix baselines")
    p.add_argument("--random", metavar="ENC,DEC,DIM",
                   help="time a randomly initialised transformer of this size over the checkpoint's dictionaries "
                   "instead (e.g. 6,6,1024 or 6,1,512: heads dim/64, FFN 4*dim); speed only, lengths are forced")
    p.add_argument("--out", default="benchmarks/results/rollout_speed.json")
    return p.parse_args(argv)


def load_model(args):
    from fairseq import checkpoint_utils

    torch.serialization.add_safe_globals([argparse.Namespace])
    dict_dir = args.dict_dir or os.path.dirname(os.path.abspath(args.checkpoint))
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [args.checkpoint],
        arg_overrides={"data": dict_dir, "source_lang": args.source_lang, "target_lang": args.target_lang},
    )
    return models[0].eval(), task, cfg


def random_model(args, cfg, task):
    """The checkpoint's transformer config with other sizes and random weights (seed 0)."""
    import copy

    from fairseq.models.transformer import TransformerModel

    enc, dec, dim = (int(x) for x in args.random.split(","))
    model_cfg = copy.deepcopy(cfg.model)
    for side, layers in (("encoder", enc), ("decoder", dec)):
        setattr(model_cfg, f"{side}_layers", layers)
        setattr(model_cfg, f"{side}_embed_dim", dim)
        setattr(model_cfg, f"{side}_ffn_embed_dim", 4 * dim)
        setattr(model_cfg, f"{side}_attention_heads", max(1, dim // 64))
    model_cfg.decoder_input_dim = model_cfg.decoder_output_dim = dim
    torch.manual_seed(0)
    return TransformerModel.build_model(model_cfg, task).eval()


def load_batch(args, task):
    """The first ``--num-sentences`` sentences, sentencepiece-encoded and left-padded as fairseq does."""
    import sentencepiece
    from fairseq.data.data_utils import collate_tokens

    spm_path = args.spm or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "spm.model")
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_path)
    path = os.path.join(args.text_dir, f"{args.split}.{args.source_lang}")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for _, line in zip(range(args.num_sentences), f)]
    d = task.source_dictionary
    seqs = [
        d.encode_line(" ".join(sp.encode(line, out_type=str)), add_if_not_exist=False, append_eos=True).long()
        for line in lines
    ]
    return collate_tokens(seqs, d.pad(), d.eos(), left_pad=True), torch.tensor([s.numel() for s in seqs])


@torch.no_grad()
def naive_greedy(model, src_tokens, src_lengths, min_len, max_len, project_all=True):
    """Greedy decoding without incremental state: the decoder re-reads the whole prefix each step.

    ``project_all`` keeps ``model.decoder(prefix)`` as is (vocabulary logits for every position);
    otherwise only the last position is projected, a stronger baseline.  Same masking rules as
    ``rollout`` (pad never, EOS forbidden before ``min_len``, only EOS at ``max_len``).
    """
    from fairseq_imitkd.rollout_steps import apply_generation_rules

    dictionary = model.decoder.dictionary
    eos, pad = dictionary.eos(), dictionary.pad()
    encoder_out = model.encoder(src_tokens, src_lengths=src_lengths)
    bsz = src_tokens.size(0)
    tokens = src_tokens.new_full((bsz, max_len + 2), pad)
    tokens[:, 0] = eos
    finished = torch.zeros(bsz, dtype=torch.bool, device=src_tokens.device)
    for step in range(max_len + 1):
        if project_all:
            logits, extra = model.decoder(tokens[:, : step + 1], encoder_out=encoder_out)
            logits = logits[:, -1:]
        else:
            features, extra = model.decoder(tokens[:, : step + 1], encoder_out=encoder_out, features_only=True)
            logits = model.decoder.output_layer(features[:, -1:])
        lprobs = model.get_normalized_probs((logits, extra), log_probs=True)[:, -1]
        apply_generation_rules(lprobs, step, min_len, max_len, eos, pad)
        nxt = lprobs.argmax(dim=1).masked_fill_(finished, pad)
        tokens[:, step + 1] = nxt
        finished |= nxt.eq(eos)
        if finished.all():
            break
    return tokens[:, 1 : step + 2]


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, repeats, warmup):
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        result = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return result, times


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    from fairseq.sequence_generator import SequenceGenerator

    from fairseq_imitkd.rollout import rollout

    model, task, cfg = load_model(args)
    if args.random:
        model = random_model(args, cfg, task)
    src_tokens, src_lengths = load_batch(args, task)
    model = model.to(args.device)
    src_tokens, src_lengths = src_tokens.to(args.device), src_lengths.to(args.device)
    steps = args.length
    min_len = max_len_b = steps - 1  # steps-1 forced non-EOS tokens, then the forced EOS
    logger.info("batch %s, forced length %d, %d thread(s)", tuple(src_tokens.shape), steps, torch.get_num_threads())

    results = {}
    engines = ["exact", "static"] if args.engine == "both" else [args.engine]
    forced, natural, t_natural = {}, {}, {}
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=1)
    sample = {"net_input": {"src_tokens": src_tokens, "src_lengths": src_lengths}}
    hypos, t_sg = timed(lambda: generator.generate([model], sample), args.repeats, args.warmup)
    for engine in engines:
        forced[engine], results[f"rollout_{engine}"] = timed(
            lambda: rollout(model, src_tokens, src_lengths, min_len=min_len, max_len_b=max_len_b, engine=engine),
            args.repeats, args.warmup,
        )
        assert int(forced[engine].lengths.min()) == int(forced[engine].lengths.max()) == steps
        # natural lengths: rollout vs SequenceGenerator(beam_size=1), default limits
        natural[engine], t_natural[engine] = timed(
            lambda: rollout(model, src_tokens, src_lengths, engine=engine), args.repeats, args.warmup
        )
    incremental = forced[engines[0]]
    results["incremental"] = results[f"rollout_{engines[0]}"]
    if not args.no_naive:
        naive, t_naive = timed(
            lambda: naive_greedy(model, src_tokens, src_lengths, min_len, max_len_b), args.repeats, args.warmup
        )
        results["naive"] = t_naive
        naive_last, t_naive_last = timed(
            lambda: naive_greedy(model, src_tokens, src_lengths, min_len, max_len_b, project_all=False),
            args.repeats, args.warmup,
        )
        results["naive_last_position"] = t_naive_last
        same_rows = (naive == incremental.tokens).all(dim=1).float().mean().item()
        same_tokens = (naive == incremental.tokens).float().mean().item()
    else:
        same_rows = same_tokens = None

    def same_as_generator(ro):
        return sum(torch.equal(ro.tokens[i, : ro.lengths[i]], h[0]["tokens"]) for i, h in enumerate(hypos)) / len(hypos)

    engine_report = {
        e: {
            "forced_median_s": statistics.median(results[f"rollout_{e}"]),
            "per_step_ms": 1000 * statistics.median(results[f"rollout_{e}"]) / steps,
            "forced_rows_equal_to_exact": (forced[e].tokens == forced["exact"].tokens).all(1).float().mean().item()
            if "exact" in forced else None,
            "natural_median_s": statistics.median(t_natural[e]),
            "natural_mean_length": natural[e].lengths.float().mean().item(),
            "natural_rows_equal_to_sequence_generator": same_as_generator(natural[e]),
        }
        for e in engines
    }
    natural_matches = engine_report[engines[0]]["natural_rows_equal_to_sequence_generator"] == 1.0
    t_nat = t_natural[engines[0]]
    natural_first = natural[engines[0]]

    med = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "benchmark": "rollout_speed",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "checkpoint": os.path.abspath(args.checkpoint),
        "random_model": args.random,
        "params": sum(p.numel() for p in model.parameters()),
        "data": f"{args.text_dir}/{args.split}.{args.source_lang} (first {args.num_sentences})",
        "batch_size": int(src_tokens.size(0)),
        "src_len_padded": int(src_tokens.size(1)),
        "forced_length": steps,
        "forcing": f"min_len = max_len_b = {steps - 1}: {steps - 1} tokens, then EOS forced",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "times_s": results,
        "median_s": med,
        "mean_rollout_length": incremental.lengths.float().mean().item(),
        "engines": engine_report,
        "static_speedup_per_step": engine_report["exact"]["per_step_ms"] / engine_report["static"]["per_step_ms"]
        if len(engines) == 2 else None,
        "incremental_is": engines[0],
        "speedup_vs_naive": med["naive"] / med["incremental"] if "naive" in med else None,
        "speedup_vs_naive_last_position": med["naive_last_position"] / med["incremental"] if "naive" in med else None,
        "naive_vs_incremental_identical_rows": same_rows,
        "naive_vs_incremental_identical_tokens": same_tokens,
        "natural_length": {
            "rollout_median_s": statistics.median(t_nat),
            "sequence_generator_beam1_median_s": statistics.median(t_sg),
            "speedup_vs_sequence_generator": statistics.median(t_sg) / statistics.median(t_nat),
            "mean_rollout_length": natural_first.lengths.float().mean().item(),
            "identical_to_sequence_generator": natural_matches,
            "times_s": {"rollout": t_nat, "sequence_generator": t_sg},
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    logger.info("wrote %s", args.out)
    line = (f"| rollout_speed | B={report['batch_size']} len={steps} threads={report['threads']} "
            f"torch {report['torch']} |")
    for e, r in engine_report.items():
        line += (f" {e}: {r['per_step_ms']:.2f} ms/step, natural {r['natural_median_s']:.3f} s "
                 f"(= SequenceGenerator: {r['natural_rows_equal_to_sequence_generator']:.3f}) |")
    if report["static_speedup_per_step"]:
        line += f" static x{report['static_speedup_per_step']:.2f} per step |"
    if "naive" in med:
        line += (f" naive {med['naive']:.3f} s (x{report['speedup_vs_naive']:.1f} for {engines[0]}) |")
    line += (f" SequenceGenerator {report['natural_length']['sequence_generator_beam1_median_s']:.3f} s |")
    print(line)
    return report


if __name__ == "__main__":
    main()
