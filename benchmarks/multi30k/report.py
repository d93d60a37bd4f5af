"""Collect the runs' results into results[_full].json, a markdown table and the BLEU-against-speed plot,
and rewrite this benchmark's README.md tables from them (``collect``, ``tables`` and ``plot`` do each part)."""
import datetime
import json
import os
import platform
from typing import List

import collect
import methods
import plot
import tables

SUFFIX = {"quick": "", "full": "_full", "competent": "_competent"}
HERE = os.path.dirname(os.path.abspath(__file__))


def write(ctx, ledger: List[dict]) -> str:
    got = collect.collect(ctx)
    teacher = got["teacher"]
    present = got["methods"]
    res = dict(
        benchmark="multi30k_de_en", tier=ctx.args.tier,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        teacher_bleu_beam5=teacher.get("beam5_b64", {}).get("bleu"),
        teacher_bleu_greedy=teacher.get("greedy_b64", {}).get("bleu"),
        teacher_sents_per_sec=teacher.get("beam5_b64", {}).get("sents_per_sec"),
        teacher_speed={k: v.get("sents_per_sec") for k, v in teacher.items()},
        sacrebleu_signature=teacher.get("beam5_b64", {}).get("signature") or collect.signature(ctx, present),
        methods=present,
        ablations=got["ablations"],
        # one architecture for every method: the median over methods is its speed, less noisy than any one run
        student_sents_per_sec_median=collect.median([r["student_sents_per_sec"] for r in present.values()]),
        paired_bootstrap=collect.bootstrap(ctx, present, got["ablations"]) if present else [],
        ctranslate2_speed=collect.ct2_speed() if ctx.args.tier == "quick" else None,
        setup=dict(student=methods.STUDENT, tier=ctx.tier, jobs=ctx.args.jobs or
                   (1 if ctx.args.gpu else 2), threads_per_process=ctx.args.threads,
                   device="cuda" if ctx.args.gpu else "cpu", cpu=collect.cpus(present), cores=os.cpu_count(),
                   python=platform.python_version(), torch=collect.torch_version(),
                   selection="checkpoint_best.pt by greedy valid BLEU (fairseq --eval-bleu), validated every "
                             f"{ctx.tier['validate_every']} updates from update {ctx.tier['validate_after']}"),
        wall_time=dict(invocations=ledger, total_s=round(sum(i["wall_s"] for i in ledger if collect.compared(i)), 1),
                       ablations_s=round(sum(i["wall_s"] for i in ledger if not collect.compared(i)), 1),
                       corpora_s=collect.corpora_seconds(ctx)),
    )
    suffix = SUFFIX.get(ctx.args.tier, "_" + ctx.args.tier)
    if ctx.args.max_update:
        suffix += f"_u{ctx.args.max_update}"
    os.makedirs(ctx.args.out_dir, exist_ok=True)
    path = os.path.join(ctx.args.out_dir, f"results{suffix}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    png = f"bleu_vs_speed{suffix}.png" if plot.available() else None  # run.main warned at its start if not
    if png:
        plot.plot(res, os.path.join(ctx.args.out_dir, png))
    with open(os.path.join(ctx.args.out_dir, f"results{suffix}.md"), "w", encoding="utf-8") as f:
        f.write(tables.markdown(res, png))
    if suffix in tables.README_MARKERS and os.path.abspath(ctx.args.out_dir) == HERE:
        tables.update_readme(os.path.join(HERE, "README.md"), res, *tables.README_MARKERS[suffix])
    return path
