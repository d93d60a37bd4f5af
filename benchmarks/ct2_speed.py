"""Decoding speed of students and teacher, fairseq against CTranslate2, side by side in one run.

For the Multi30k teacher and each student given: fairseq-generate (teacher beam 5 and greedy, students
greedy, batch 64) and CTranslate2 exports made with ``imitkd-export`` (float32 and int8; teacher beam 5,
students greedy at batch 64 and 1), all on test_2016_flickr, one model at a time, a fixed thread count.
Speed is the decoders' own timers (fairseq-generate's "Translated ..." line, CTranslate2's
``ExecutionStats``), best of ``--repeats``; BLEU is sacreBLEU on detokenized output against the raw
references, every decode at fairseq-generate's default limit of 200 target pieces.

    OMP_NUM_THREADS=1 python benchmarks/ct2_speed.py --students word_kd=PATH,imitkd_token=PATH
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "multi30k"))

import data  # noqa: E402  (benchmarks/multi30k)
import evaluate  # noqa: E402

import fairseq_imitkd_translate  # noqa: E402
from fairseq_imitkd.export import export  # noqa: E402

USER_DIR = os.path.join(os.path.dirname(HERE), "fairseq_imitkd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--students", required=True, help="name=checkpoint,... (students of benchmarks/multi30k)")
    p.add_argument("--text-dir", default=data.DEFAULT_TEXT_DIR)
    p.add_argument("--teacher-dir", default=data.DEFAULT_TEACHER_DIR)
    p.add_argument("--bin", default=os.path.join(HERE, "multi30k", "work", "bin"),
                   help="the binarized Multi30k of benchmarks/multi30k (its test split and dictionaries)")
    p.add_argument("--workdir", default=os.path.join(HERE, "multi30k", "work", "ct2_speed"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "ct2_speed.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def fairseq_decode(args, name, checkpoint, beam):
    prefix = os.path.join(args.workdir, f"{name}.fairseq.beam{beam}")
    best = None
    for _ in range(args.repeats):
        run = evaluate.generate(args.bin, checkpoint, "test", prefix, beam=beam, batch_size=64, user_dir=USER_DIR,
                                device_args=["--cpu"], env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)),
                                max_len=evaluate.DEFAULT_MAX_LEN)
        best = run if best is None or run["sents_per_sec"] > best["sents_per_sec"] else best
    ref = os.path.join(args.text_dir, "test_2016_flickr.en")
    return dict(engine="fairseq", beam=beam, batch_size=64, sents_per_sec=best["sents_per_sec"],
                tokens_per_sec=best["tokens_per_sec"], bleu=evaluate.bleu(prefix + ".hyp", ref)["bleu"])


def ct2_decode(args, name, model_dir, beam, batch_size):
    out = os.path.join(args.workdir, f"{name}.beam{beam}.b{batch_size}.hyp")
    src = os.path.join(args.text_dir, "test_2016_flickr.de")
    best = None
    for _ in range(args.repeats):
        run = fairseq_imitkd_translate.translate(fairseq_imitkd_translate.parse_args(
            [model_dir, "-i", src, "-o", out, "--beam", str(beam), "--batch-size", str(batch_size),
             "--threads", str(args.threads)]))
        best = run if best is None or run["sentences_per_second"] > best["sentences_per_second"] else best
    ref = os.path.join(args.text_dir, "test_2016_flickr.en")
    return dict(engine="ctranslate2", beam=beam, batch_size=batch_size, sents_per_sec=best["sentences_per_second"],
                tokens_per_sec=round(best["target_tokens"] / max(best["seconds"], 1e-9), 1),
                bleu=evaluate.bleu(out, ref)["bleu"])


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    spm = os.path.join(args.teacher_dir, "spm.model")
    models = [("teacher", os.path.join(args.teacher_dir, "checkpoint.pt"), args.teacher_dir)]
    models += [(n, p, args.bin) for n, p in (kv.split("=", 1) for kv in args.students.split(","))]
    rows = []
    for name, checkpoint, dicts in models:
        teacher = name == "teacher"
        for beam in ([5, 1] if teacher else [1]):
            rows.append(dict(model=name, weights="float32", **fairseq_decode(args, name, checkpoint, beam)))
        for quantization in ("float32", "int8"):
            model_dir = os.path.join(args.workdir, f"{name}.{quantization}")
            export(checkpoint, model_dir, data=dicts, quantization=quantization, spm=spm, force=True)
            for beam, batch in ([(5, 64)] if teacher else [(1, 64), (1, 1)]):
                rows.append(dict(model=name, weights=quantization,
                                 **ct2_decode(args, f"{name}.{quantization}", model_dir, beam, batch)))
    result = dict(date=time.strftime("%Y-%m-%d"), threads=args.threads, repeats=args.repeats,
                  cpu=evaluate.cpu_name(), ctranslate2=__import__("ctranslate2").__version__, command=" ".join(sys.argv),
                  rows=rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
