"""Decoding speed of students and teacher, fairseq against CTranslate2, side by side in one run.

For the Multi30k teacher and each student given: fairseq-generate (teacher beam 5 and greedy, students
greedy, batch 64) and CTranslate2 exports made with ``imitkd-export`` (float32 and int8; teacher beam 5,
students greedy at batch 64 and 1), all on test_2016_flickr, one model at a time, a fixed thread count.
Speed is the decoders' own timers (fairseq-generate's "Translated ..." line, CTranslate2's
``ExecutionStats``), best of ``--repeats``; BLEU is sacreBLEU on detokenized output against the raw
references, every decode at fairseq-generate's default limit of 200 target pieces unless a lever says 64.

Levers on each student's int8 greedy batch-64 decode: a vocabulary map built from the training pairs
(``imitkd-vmap``, ``--use-vmap``); a length limit of 64 pieces (``--max-len 64``: no Multi30k training
target is longer than 48) instead of 200, which cuts a student's runaway repetitions short (fairseq is
decoded at that limit too, so that ΔBLEU compares the engines, not the limits); both together; on the
first student, batches in file order instead of sorted by length (``--read-batch-size 64``); and int8
weights kept within ±63 (``imitkd-export --int8-weight-bits 7``), alone and with vmap and the limit,
which is how a user on a CPU without AVX-512 VNNI would deploy (the teacher gets a 7-bit beam-5 row).

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
    p.add_argument("--work", default=os.path.join(HERE, "multi30k", "work"),
                   help="benchmarks/multi30k's work directory (its bin/ and spm/ train pieces)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "ct2_speed.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vmap-per-source", type=int, default=20)
    p.add_argument("--vmap-common", type=int, default=100)
    return p.parse_args(argv)


SHORT = 64  # the length lever's limit: no Multi30k training target is longer than 48 pieces


def fairseq_decode(args, name, checkpoint, beam, max_len=evaluate.DEFAULT_MAX_LEN):
    prefix = os.path.join(args.scratch, f"{name}.fairseq.beam{beam}" + ("" if max_len[1] == 200 else f".len{max_len[1]}"))
    best = None
    for _ in range(args.repeats):
        run = evaluate.generate(os.path.join(args.work, "bin"), checkpoint, "test", prefix, beam=beam, batch_size=64,
                                user_dir=USER_DIR, device_args=["--cpu"],
                                env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)), max_len=max_len)
        best = run if best is None or run["sents_per_sec"] > best["sents_per_sec"] else best
    ref = os.path.join(args.text_dir, "test_2016_flickr.en")
    return dict(engine="fairseq", beam=beam, batch_size=64, sents_per_sec=best["sents_per_sec"],
                tokens_per_sec=best["tokens_per_sec"], bleu=evaluate.bleu(prefix + ".hyp", ref)["bleu"])


def ct2_decode(args, name, model_dir, beam, batch_size, extra=()):
    out = os.path.join(args.scratch, f"{name}.beam{beam}.b{batch_size}.hyp")
    src = os.path.join(args.text_dir, "test_2016_flickr.de")
    best = None
    for _ in range(args.repeats):
        run = fairseq_imitkd_translate.translate(fairseq_imitkd_translate.parse_args(
            [model_dir, "-i", src, "-o", out, "--beam", str(beam), "--batch-size", str(batch_size),
             "--threads", str(args.threads), *extra]))
        best = run if best is None or run["sentences_per_second"] > best["sentences_per_second"] else best
    ref = os.path.join(args.text_dir, "test_2016_flickr.en")
    return dict(engine="ctranslate2", beam=beam, batch_size=batch_size, sents_per_sec=best["sentences_per_second"],
                tokens_per_sec=round(best["target_tokens"] / max(best["seconds"], 1e-9), 1),
                bleu=evaluate.bleu(out, ref)["bleu"])


def add_ratios(rows) -> None:
    """Each row's sentences/s against the two teacher baselines, and each CTranslate2 student's BLEU
    against the same student decoded by fairseq."""
    def find(model, engine, weights, beam, batch=64, lever=None):
        return next((r for r in rows if (r["model"], r["engine"], r["weights"], r["beam"], r["batch_size"],
                                         r.get("lever")) == (model, engine, weights, beam, batch, lever)), None)

    fs_teacher, ct2_teacher = find("teacher", "fairseq", "float32", 5), find("teacher", "ctranslate2", "int8", 5)
    for r in rows:
        r["x_fairseq_teacher_beam5"] = round(r["sents_per_sec"] / fs_teacher["sents_per_sec"], 2)
        r["x_ct2_int8_teacher_beam5"] = round(r["sents_per_sec"] / ct2_teacher["sents_per_sec"], 2)
        # fairseq at the same length limit: a limit cuts runaway outputs short in either engine
        short = f"max len {SHORT}" in (r.get("lever") or "")
        same = find(r["model"], "fairseq", "float32", r["beam"], lever=f"max len {SHORT}" if short else None)
        if r["engine"] == "ctranslate2" and same is not None:
            r["bleu_minus_fairseq"] = round(r["bleu"] - same["bleu"], 2)


def markdown(result) -> str:
    lines = [f"CPU ({result['cpu']}), {result['threads']} thread(s), test_2016_flickr (1,000 sentences), best of "
             f"{result['repeats']}, CTranslate2 {result['ctranslate2']}; every decode at 200 target pieces at most but where "
             f"the lever says {SHORT}. ΔBLEU: against the same student in fairseq at the same limit.", "",
             "| model | engine | weights | beam | batch | lever | sent/s | tok/s | BLEU | ΔBLEU vs fairseq | "
             "× fairseq teacher b5 | × CT2 int8 teacher b5 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        delta = r.get("bleu_minus_fairseq")
        lines.append(f"| {r['model']} | {r['engine']} | {r['weights']} | {r['beam']} | {r['batch_size']} | "
                     f"{r.get('lever') or ''} | {r['sents_per_sec']:.1f} | {r['tokens_per_sec']:.0f} | {r['bleu']:.2f} | "
                     f"{'' if delta is None else f'{delta:+.2f}'} | {r['x_fairseq_teacher_beam5']:.1f} | "
                     f"{r['x_ct2_int8_teacher_beam5']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    args.scratch = os.path.join(args.work, "ct2_speed")
    os.makedirs(args.scratch, exist_ok=True)
    spm = os.path.join(args.teacher_dir, "spm.model")
    models = [("teacher", os.path.join(args.teacher_dir, "checkpoint.pt"), args.teacher_dir)]
    models += [(n, p, os.path.join(args.work, "bin")) for n, p in (kv.split("=", 1) for kv in args.students.split(","))]
    vmap = data.train_vmap(args.work, args.vmap_per_source, args.vmap_common)
    rows = []
    for i, (name, checkpoint, dicts) in enumerate(models):
        teacher = name == "teacher"
        for beam in ([5, 1] if teacher else [1]):
            rows.append(dict(model=name, weights="float32", **fairseq_decode(args, name, checkpoint, beam)))
        if not teacher:
            rows.append(dict(model=name, weights="float32", lever=f"max len {SHORT}",
                             **fairseq_decode(args, name, checkpoint, 1, max_len=(0.0, SHORT))))
        short, use_vmap = ["--max-len", str(SHORT)], ["--use-vmap"]
        for weights, quantization, bits in (("float32", "float32", 8), ("int8", "int8", 8), ("int8 7-bit", "int8", 7)):
            tag = weights.replace(" ", "_")
            model_dir = os.path.join(args.scratch, f"{name}.{tag}")
            export(checkpoint, model_dir, data=dicts, quantization=quantization, spm=spm, force=True, vmap=vmap,
                   int8_weight_bits=bits)
            if bits == 7:  # the narrower weights: at the default limit, and with the two levers that pay
                settings = [(5, 64, None, [])] if teacher else [(1, 64, None, []),
                                                                (1, 64, f"vmap + max len {SHORT}", use_vmap + short)]
            else:
                settings = [(5, 64, None, [])] if teacher else [(1, 64, None, []), (1, 1, None, [])]
                if not teacher and quantization == "int8":
                    settings += [(1, 64, "vmap", use_vmap), (1, 64, f"max len {SHORT}", short),
                                 (1, 64, f"vmap + max len {SHORT}", use_vmap + short)]
                    settings += [(1, 64, "file order", ["--read-batch-size", "64"])] if i == 1 else []  # first student
            for beam, batch, lever, extra in settings:
                label = f"{name}.{tag}" + (f".{lever.replace(' + ', '_').replace(' ', '_')}" if lever else "")
                rows.append(dict(model=name, weights=weights, lever=lever,
                                 **ct2_decode(args, label, model_dir, beam, batch, extra)))
    add_ratios(rows)
    result = dict(date=time.strftime("%Y-%m-%d"), threads=args.threads, repeats=args.repeats,
                  cpu=evaluate.cpu_name(), ctranslate2=__import__("ctranslate2").__version__,
                  command=" ".join(sys.argv), vmap=dict(per_source=args.vmap_per_source, common=args.vmap_common),
                  rows=rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
