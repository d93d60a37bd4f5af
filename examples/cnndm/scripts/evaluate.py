"""Decode the test split with fairseq-generate and score ROUGE-1/2/L F1 (called by evaluate.sh).

Every checkpoint and beam runs through ``fairseq_cli.generate.main`` in this one process, so fairseq is
imported once however many there are. The hypotheses (fairseq's H- lines, in dictionary pieces) are decoded
with the recipe's sentencepiece model and scored with Google's ``rouge-score`` package
(``RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True)``) against the full, untruncated reference
summaries. Scores are mean F1 x 100.

Results are merged into RESULTS/results.json (keyed by name and beam, so evaluating more checkpoints later
adds rows) and RESULTS/results.tsv is rewritten from it. RESULTS/NAME/beamK/ holds fairseq's
generate-test.txt and hyp.txt (one detokenized summary per line, in test order).
"""
import argparse
import json
import os
import re
import sys
import time

from fairseq_generate_io import generate_args, read_hypotheses, read_lines, write_lines

METRICS = ("rouge1", "rouge2", "rougeL")


def parse_ckpt(spec: str):
    if "=" in spec:
        name, path = spec.split("=", 1)
    else:
        path = spec
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        sys.exit(f"evaluate.py: error: bad name {name!r} (give NAME=CKPT)")
    return name, path


def read_hyps(path: str, n: int, sp):
    with open(path, encoding="utf-8") as f:
        pieces = read_hypotheses(f, prefix="H-")
    hyps = [sp.decode_pieces(pieces[i].split()) if i in pieces else None for i in range(n)]
    missing = [i for i, h in enumerate(hyps) if h is None]
    if missing:
        sys.exit(f"evaluate.py: error: {path} has no hypothesis for {len(missing)} of {n} test documents")
    return hyps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", help="CKPT or NAME=CKPT (NAME defaults to the checkpoint's folder name)")
    p.add_argument("--data", required=True)
    p.add_argument("--spm-model", required=True)
    p.add_argument("--refs", required=True, help="reference summaries, one per line, in test order")
    p.add_argument("--results", required=True)
    p.add_argument("--user-dir", required=True)
    p.add_argument("--source-lang", default="article")
    p.add_argument("--target-lang", default="summary")
    p.add_argument("--beams", default="1,4")
    p.add_argument("--max-len-b", type=int, default=99)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--gen-args", default="", help="extra fairseq-generate flags, one string")
    a = p.parse_args()

    import sentencepiece as spm
    from rouge_score import rouge_scorer
    from fairseq import options
    from fairseq_cli import generate

    sp = spm.SentencePieceProcessor(model_file=a.spm_model)
    refs = read_lines(a.refs)
    scorer = rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)
    beams = [int(b) for b in a.beams.split(",") if b]

    os.makedirs(a.results, exist_ok=True)
    json_path = os.path.join(a.results, "results.json")
    rows = {}
    if os.path.isfile(json_path):
        with open(json_path) as f:
            rows = {(r["name"], r["beam"]): r for r in json.load(f)}

    for spec in a.ckpts:
        name, path = parse_ckpt(spec)
        if not os.path.isfile(path):
            sys.exit(f"evaluate.py: error: checkpoint not found: {path}")
        for beam in beams:
            out = os.path.join(a.results, name, f"beam{beam}")
            argv = generate_args(a.data, path, beam=beam, batch_size=a.batch_size, user_dir=a.user_dir,
                                 max_len=(0, a.max_len_b), results_path=out, cpu=a.cpu,
                                 extra=["--task", "translation", "-s", a.source_lang, "-t", a.target_lang,
                                        "--no-progress-bar", *a.gen_args.split()])
            print("+ fairseq-generate " + " ".join(argv), file=sys.stderr, flush=True)
            parser = options.get_generation_parser()
            args = options.parse_args_and_arch(parser, argv)
            t0 = time.perf_counter()
            generate.main(args)
            seconds = time.perf_counter() - t0
            hyps = read_hyps(os.path.join(out, "generate-test.txt"), len(refs), sp)
            write_lines(os.path.join(out, "hyp.txt"), hyps)
            sums = dict.fromkeys(METRICS, 0.0)
            for ref, hyp in zip(refs, hyps):
                for m, s in scorer.score(ref, hyp).items():
                    sums[m] += s.fmeasure
            row = {"name": name, "beam": beam, "checkpoint": os.path.abspath(path), "documents": len(refs)}
            row.update({m: round(100 * sums[m] / len(refs), 2) for m in METRICS})
            row["mean_hyp_words"] = round(sum(len(h.split()) for h in hyps) / len(hyps), 1)
            row["decode_seconds"] = round(seconds, 2)
            rows[(name, beam)] = row
            print(f"{name}\tbeam {beam}\tR1 {row['rouge1']:.2f}\tR2 {row['rouge2']:.2f}\tRL {row['rougeL']:.2f}"
                  f"\t{row['mean_hyp_words']} words\t{seconds:.1f} s", flush=True)

    ordered = sorted(rows.values(), key=lambda r: (r["name"], r["beam"]))
    with open(json_path, "w") as f:
        json.dump(ordered, f, indent=1)
    cols = ["name", "beam", *METRICS, "mean_hyp_words", "decode_seconds", "documents"]
    with open(os.path.join(a.results, "results.tsv"), "w") as f:
        f.write("\t".join(cols) + "\n")
        for r in ordered:
            f.write("\t".join(str(r[c]) for c in cols) + "\n")


if __name__ == "__main__":
    main()
