"""Seq-KD corpus: fairseq's SequenceGenerator against CTranslate2 (``imitkd-seqkd --engine``).

Two readings:
- the whole Multi30k train corpus that benchmarks/multi30k built with each engine (its
  ``seqkd_stats.json`` seconds), and how far the two corpora agree: the share of identical targets and
  the BLEU of the CTranslate2 targets against the fairseq ones (detokenized, sacreBLEU);
- ``--slice N``: fairseq, CTranslate2, and CTranslate2 with a vocabulary map (imitkd-vmap's defaults
  over the training pairs), each CTranslate2 setting also with 7-bit int8 weights
  (``--ct2-int8-weight-bits 7``), decode the same first 1/N of train here, one after the other, with nothing
  else running, at ``--threads``: the clean speed ratios, and how many targets match fairseq's.

    OMP_NUM_THREADS=1 python benchmarks/seqkd_engines.py --slice 15 --out benchmarks/results/seqkd_engines.json
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "multi30k"))

import data  # noqa: E402  (benchmarks/multi30k)
import evaluate  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=os.path.join(HERE, "multi30k", "work"),
                   help="benchmarks/multi30k's work directory (bin/, seqkd/, seqkd_ct2/)")
    p.add_argument("--teacher-dir", default=data.DEFAULT_TEACHER_DIR)
    p.add_argument("--slice", type=int, default=15, help="time both engines on the first 1/N of train (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(HERE, "results", "seqkd_engines.json"))
    return p.parse_args(argv)


def corpus_text(corpus: str, spm) -> list:
    from fairseq.data import Dictionary

    from fairseq_imitkd.seqkd.corpus_files import read_indexed

    d = Dictionary.load(os.path.join(corpus, "dict.en.txt"))
    return [spm.decode(d.string(t[:-1]).split()) for t in read_indexed(os.path.join(corpus, "train.de-en.en"))]


CT2_CORPORA = tuple(c for c in data.CORPORA if c.startswith("seqkd_ct2"))  # multi30k's CTranslate2 corpora


def agreement(work: str, teacher_dir: str) -> dict:
    """Each CTranslate2 corpus of ``work`` against the fairseq one: identical targets, BLEU, build time."""
    import sacrebleu
    import sentencepiece

    spm = sentencepiece.SentencePieceProcessor(model_file=os.path.join(teacher_dir, "spm.model"))
    corpora = ["seqkd"] + [c for c in CT2_CORPORA if os.path.isfile(os.path.join(work, c, "seqkd_stats.json"))]
    stats = {c: json.load(open(os.path.join(work, c, "seqkd_stats.json"))) for c in corpora}
    theirs = corpus_text(os.path.join(work, "seqkd"), spm)
    out = dict(sentences=len(theirs), note="whole-train builds of benchmarks/multi30k, timed by imitkd-seqkd; what "
                                           "shared the CPU with them is in benchmarks/README.md")
    for c in corpora:
        entry = dict(seconds=stats[c]["seconds"], devices=sorted({sh["device"] for sh in stats[c]["shards"]}),
                     mean_target_length=round(stats[c]["mean_target_length"], 3))
        if c != "seqkd":
            ours = corpus_text(os.path.join(work, c), spm)
            entry.update(exact_match_fairseq=round(sum(a == b for a, b in zip(ours, theirs)) / len(ours), 4),
                         bleu_against_fairseq=round(sacrebleu.corpus_bleu(ours, [theirs]).score, 2),
                         speedup=round(stats["seqkd"]["seconds"] / stats[c]["seconds"], 2))
        out[c] = entry
    return out


def time_slice(work: str, teacher_dir: str, n: int, threads: int) -> dict:
    """Each engine setting decodes the same first 1/n of train, one after the other; CTranslate2's
    targets are also compared with fairseq's (share of identical sentences)."""
    import numpy as np

    from fairseq_imitkd.seqkd.corpus_files import ShardFiles, read_indexed

    out, targets = {}, {}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory() as tmp:
        vmap = data.train_vmap(work)  # imitkd-vmap's defaults, from the training pairs
        settings = {"fairseq": ["--engine", "fairseq"], "ctranslate2": ["--engine", "ctranslate2"],
                    "ctranslate2_vmap": ["--engine", "ctranslate2", "--ct2-vmap", vmap],
                    "ctranslate2_7bit": ["--engine", "ctranslate2", "--ct2-int8-weight-bits", "7"],
                    "ctranslate2_7bit_vmap": ["--engine", "ctranslate2", "--ct2-int8-weight-bits", "7",
                                              "--ct2-vmap", vmap]}
        for name, extra in settings.items():
            cmd = [sys.executable, "-m", "fairseq_imitkd.seqkd", os.path.join(work, "bin"), "-o",
                   os.path.join(tmp, name), "--teacher-path", os.path.join(teacher_dir, "checkpoint.pt"),
                   "--teacher-data", teacher_dir, "--split", "train", "--beam", "5", "--max-tokens", "8000",
                   "--num-shards", str(n), "--shard-id", "0", "--no-progress-bar", "--cpu", *extra]
            t0 = time.time()
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            shards = ShardFiles(os.path.join(tmp, name), n)
            marker = shards.read_marker(0)
            targets[name] = read_indexed(shards.prefix(0))
            out[name] = dict(sentences=marker["sentences"], decode_s=round(marker["seconds"], 2),
                             wall_s=round(time.time() - t0, 2), device=marker["device"])
            if name != "fairseq":
                same = sum(np.array_equal(a, b) for a, b in zip(targets[name], targets["fairseq"]))
                out[name]["exact_match_fairseq"] = round(same / len(targets[name]), 4)
                out[name]["speedup_decode"] = round(out["fairseq"]["decode_s"] / out[name]["decode_s"], 2)
                out[name]["speedup_wall"] = round(out["fairseq"]["wall_s"] / out[name]["wall_s"], 2)
    return out


def main(argv=None):
    args = parse_args(argv)
    result = dict(date=time.strftime("%Y-%m-%d"), cpu=evaluate.cpu_name(), threads=args.threads,
                  command=" ".join(sys.argv), beam=5)
    if os.path.isfile(os.path.join(args.work, "seqkd", "seqkd_stats.json")):
        result["whole_train"] = agreement(args.work, args.teacher_dir)
    if args.slice:
        result["slice"] = dict(fraction=f"1/{args.slice}", **time_slice(args.work, args.teacher_dir, args.slice,
                                                                           args.threads))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
