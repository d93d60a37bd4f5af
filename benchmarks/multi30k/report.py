"""Collect the runs' results into results[_full].json, a markdown table and the BLEU-against-speed plot."""
import datetime
import glob
import json
import os
import platform
from typing import Dict, List, Optional

import evaluate
import methods

SUFFIX = {"quick": "", "full": "_full", "competent": "_competent"}
# greedy test decodes whose output lengths are reported: with the benchmark's cap, and as users decode
LENGTH_DECODES = {"test.beam1": "capped", "test.beam1.nolimit": "nolimit"}
HERE = os.path.dirname(os.path.abspath(__file__))


def _read(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 2) if a and b else None


def collect(ctx) -> dict:
    speed_dir = os.path.join(ctx.tier_dir, "speed")
    speed = ctx.archive.speed()
    if os.path.isdir(speed_dir):
        speed.update({f[:-5]: _read(os.path.join(speed_dir, f)) for f in sorted(os.listdir(speed_dir))
                      if f.endswith(".json")})
    teacher = speed.get("teacher", {})
    t_beam = teacher.get("beam5_b64", {}).get("sents_per_sec")
    archived = ctx.archive.runs()
    out_methods: Dict[str, dict] = {}
    for m in methods.ALL:  # every finished run of this tier, whichever invocation (or session) made it
        seeds = ctx.tier["seeds"][m]
        runs = {s: r for (am, s), r in archived.items() if am == m}
        found = glob.glob(os.path.join(ctx.run_dir(m, "*"), "result.json"))
        runs.update({r["seed"]: r for r in map(_read, found) if r["method"] == m})  # imitkd_s* finds imitkd_star
        if not runs:
            continue
        rec = dict(label=methods.ALL[m]["label"], data=methods.ALL[m]["data"], seeds=sorted(runs),
                   seeds_planned=seeds)
        for key in ("bleu_greedy", "bleu_beam5", "bleu_greedy_nolimit", "val_bleu_selection", "val_bleu_greedy",
                    "sec_per_update", "train_total_s"):
            values = [r[key] for r in runs.values() if r.get(key) is not None]  # older runs lack nolimit
            if not values:
                continue
            stats = evaluate.mean_std(values)
            rec[key] = stats["mean"]
            if len(values) > 1:
                rec[key + "_stats"] = stats
        for name, tag in LENGTH_DECODES.items():
            for stat in ("at_limit_share", "len_ratio"):
                values = [r["length"][name][stat] for r in runs.values() if name in r.get("length", {})]
                if values:
                    rec[f"{stat}_{tag}"] = round(sum(values) / len(values), 4)
        rec["per_seed"] = {str(s): {k: r.get(k) for k in ("bleu_greedy", "bleu_beam5", "bleu_greedy_nolimit",
                                                           "val_bleu_selection", "val_bleu_greedy", "best_update",
                                                           "sec_per_update", "train_total_s", "updates", "length")}
                           for s, r in runs.items()}
        sp = speed.get(m, {})
        rec["student_sents_per_sec"] = sp.get("greedy_b64", {}).get("sents_per_sec")
        rec["student_sents_per_sec_beam5"] = sp.get("beam5_b64", {}).get("sents_per_sec")
        rec["student_sents_per_sec_batch1"] = sp.get("greedy_b1", {}).get("sents_per_sec")
        rec["speedup_greedy_vs_teacher_beam5"] = _ratio(rec["student_sents_per_sec"], t_beam)
        rec["speedup_beam5_vs_teacher_beam5"] = _ratio(rec["student_sents_per_sec_beam5"], t_beam)
        rec["command"] = runs[min(runs)]["command"]
        rec["cpus"] = sorted({r["cpu"] for r in runs.values() if r.get("cpu")})
        if any("restored" in r for r in runs.values()):
            rec["seeds_restored"] = sorted(s for s, r in runs.items() if "restored" in r)
        out_methods[m] = rec
    return dict(methods={m: r for m, r in out_methods.items() if m in methods.METHODS},
                ablations={m: r for m, r in out_methods.items() if m in methods.ABLATIONS}, teacher=teacher, speed=speed)


BOOTSTRAP_DECODES = (("greedy", "test.beam1"), ("beam5", "test.beam5"), ("greedy_nolimit", "test.beam1.nolimit"))
BOOTSTRAP_ORDER = {d: i for i, (d, _name) in enumerate(BOOTSTRAP_DECODES)}


def _hypothesis(ctx, method: str, seed: int, decode: str, scratch_dir: str) -> Optional[str]:
    path = os.path.join(ctx.run_dir(method, seed), decode + ".hyp")
    return path if os.path.exists(path) else ctx.archive.hypothesis(method, seed, decode, scratch_dir)


def bootstrap(ctx, present: Dict[str, dict]) -> List[dict]:
    """Paired bootstrap of every method against scratch and of every ImitKD variant against word_kd and
    against seqkd, each pair on the test outputs of the lowest seed that both have."""
    import tempfile

    ref = os.path.join(ctx.args.text_dir, "test_2016_flickr.en")
    pairs = [("scratch", m) for m in present if m != "scratch"]
    pairs += [(base, m) for base in ("word_kd", "seqkd") for m in present if m.startswith("imitkd")]
    out = []
    with tempfile.TemporaryDirectory() as scratch_dir:
        for decode, name in BOOTSTRAP_DECODES:
            for base in ("scratch", "word_kd", "seqkd"):
                by_seed: Dict[int, Dict[str, str]] = {}  # seed -> {system: outputs}
                base_hyps = {}
                for b, m in pairs:
                    if b != base or base not in present:
                        continue
                    for seed in sorted(set(present[base]["seeds"]) & set(present[m]["seeds"])):
                        if seed not in base_hyps:
                            base_hyps[seed] = _hypothesis(ctx, base, seed, name, scratch_dir)
                        hyp = _hypothesis(ctx, m, seed, name, scratch_dir)
                        if base_hyps[seed] and hyp:
                            by_seed.setdefault(seed, {})[m] = hyp
                            break
                for seed, hyps in sorted(by_seed.items()):
                    res = evaluate.paired_bootstrap(base_hyps[seed], hyps, ref)
                    out.extend(dict(decode=decode, baseline=base, system=m, seed=seed, **res[m]) for m in hyps)
    # rows computed by an earlier session on outputs that were not kept, for the seeds they were on
    done = {(b["decode"], b["baseline"], b["system"], b["seed"]) for b in out}
    out += [b for b in ctx.archive.bootstrap() if (b["decode"], b["baseline"], b["system"], b["seed"]) not in done
            and b["baseline"] in present and b["system"] in present]
    return sorted(out, key=lambda b: (BOOTSTRAP_ORDER[b["decode"]], b["baseline"] != "scratch", b["baseline"],
                                      b["system"], b["seed"]))


def write(ctx, ledger: List[dict]) -> str:
    got = collect(ctx)
    teacher = got["teacher"]
    present = got["methods"]
    res = dict(
        benchmark="multi30k_de_en", tier=ctx.args.tier,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        teacher_bleu_beam5=teacher.get("beam5_b64", {}).get("bleu"),
        teacher_bleu_greedy=teacher.get("greedy_b64", {}).get("bleu"),
        teacher_sents_per_sec=teacher.get("beam5_b64", {}).get("sents_per_sec"),
        teacher_speed={k: v.get("sents_per_sec") for k, v in teacher.items()},
        sacrebleu_signature=teacher.get("beam5_b64", {}).get("signature") or _signature(ctx, present),
        methods=present,
        ablations=got["ablations"],
        # one architecture for every method: the median over methods is its speed, less noisy than any one run
        student_sents_per_sec_median=_median([r["student_sents_per_sec"] for r in present.values()]),
        paired_bootstrap=bootstrap(ctx, present) if "scratch" in present else [],
        setup=dict(student=methods.STUDENT, tier=ctx.tier, jobs=ctx.args.jobs or
                   (1 if ctx.args.gpu else 2), threads_per_process=ctx.args.threads,
                   device="cuda" if ctx.args.gpu else "cpu", cpu=_cpus(present), cores=os.cpu_count(),
                   python=platform.python_version(), torch=_torch_version(),
                   selection="checkpoint_best.pt by greedy valid BLEU (fairseq --eval-bleu), validated every "
                             f"{ctx.tier['validate_every']} updates from update {ctx.tier['validate_after']}"),
        wall_time=dict(invocations=ledger, total_s=round(sum(i["wall_s"] for i in ledger if _compared(i)), 1),
                       ablations_s=round(sum(i["wall_s"] for i in ledger if not _compared(i)), 1),
                       corpora_s=_corpora_seconds(ctx)),
    )
    suffix = SUFFIX.get(ctx.args.tier, "_" + ctx.args.tier)
    if ctx.args.max_update:
        suffix += f"_u{ctx.args.max_update}"
    os.makedirs(ctx.args.out_dir, exist_ok=True)
    path = os.path.join(ctx.args.out_dir, f"results{suffix}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    png = f"bleu_vs_speed{suffix}.png"
    plot(res, os.path.join(ctx.args.out_dir, png))
    with open(os.path.join(ctx.args.out_dir, f"results{suffix}.md"), "w", encoding="utf-8") as f:
        f.write(markdown(res, png))
    if suffix in README_MARKERS and os.path.abspath(ctx.args.out_dir) == HERE:
        update_readme(os.path.join(os.path.dirname(os.path.dirname(HERE)), "README.md"), res, *README_MARKERS[suffix])
    return path


README_BEGIN = "<!-- multi30k-table: written by benchmarks/multi30k/report.py -->"
README_END = "<!-- /multi30k-table -->"
README_MARKERS = {  # results suffix -> README markers of its table
    "": (README_BEGIN, README_END),
    "_competent": ("<!-- multi30k-competent-table: written by benchmarks/multi30k/report.py -->",
                   "<!-- /multi30k-competent-table -->"),
}


def readme_table(res: dict) -> str:
    """The compact table README.md shows: quality, training cost and, where it was timed, decoding speed."""
    base = res["methods"].get("scratch", {}).get("sec_per_update")
    timed = res["teacher_sents_per_sec"] is not None
    head = "| method | seeds | test BLEU greedy | greedy, uncapped | test BLEU beam 5 | s/update | cost × scratch |"
    rows = [head + (" sents/s (greedy, b64) | × teacher beam 5 |" if timed else ""),
            "|---|---|---|---|---|---|---|" + ("---|---|" if timed else "")]
    if timed or res["teacher_bleu_greedy"] is not None:
        rows.append(f"| teacher (3+3, d=256) | – | {_fmt(res['teacher_bleu_greedy'], 2)} | – "
                    f"| {_fmt(res['teacher_bleu_beam5'], 2)} | – | – |"
                    + (f" {_fmt(res['teacher_speed'].get('greedy_b64'))} (beam 5: {_fmt(res['teacher_sents_per_sec'])}) "
                       "| 1.0 |" if timed else ""))
    for m, r in res["methods"].items():
        rows.append(f"| {m} | {','.join(map(str, r['seeds']))} | {_bleu_cell(r, 'bleu_greedy')} "
                    f"| {_bleu_cell(r, 'bleu_greedy_nolimit')} | {_bleu_cell(r, 'bleu_beam5')} "
                    f"| {_fmt(r.get('sec_per_update'), 2)} | {_fmt(_ratio(r.get('sec_per_update'), base), 2)} |"
                    + (f" {_fmt(r['student_sents_per_sec'])} | {_fmt(r['speedup_greedy_vs_teacher_beam5'])} |"
                       if timed else ""))
    return "\n".join(rows)


def update_readme(path: str, res: dict, begin: str = README_BEGIN, end: str = README_END) -> None:
    """Replace the table between README's markers (if it has them) with the committed results."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if begin not in text or end not in text:
        return
    head, rest = text.split(begin, 1)
    _old, tail = rest.split(end, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + begin + "\n" + readme_table(res) + "\n" + end + tail)


def _signature(ctx, present: Dict[str, dict]) -> Optional[str]:
    """sacreBLEU's signature from a run's result, for a tier that did not decode the teacher."""
    for m, r in present.items():
        path = os.path.join(ctx.run_dir(m, r["seeds"][0]), "result.json")
        rec = _read(path) if os.path.exists(path) else ctx.archive.runs().get((m, r["seeds"][0]), {})
        if rec.get("sacrebleu_signature"):
            return rec["sacrebleu_signature"]
    return None


def _cpus(present: Dict[str, dict]) -> str:
    """The processors the runs trained on (a tier completed over several sessions may have had several)."""
    names = sorted({c for r in present.values() for c in r.get("cpus", [])}) or [evaluate.cpu_name()]
    return " and ".join(names)


def _median(values: List[Optional[float]]) -> Optional[float]:
    import statistics

    values = [v for v in values if v]
    return round(statistics.median(values), 1) if values else None


def _compared(invocation: dict) -> bool:
    """Whether an invocation of run.py ran any compared method (not only ablations)."""
    return bool(set(invocation.get("methods", methods.METHODS)) & set(methods.METHODS))


def _torch_version() -> str:
    import torch

    return torch.__version__


def _corpora_seconds(ctx) -> Dict[str, float]:
    out = ctx.archive.corpus_seconds()
    for name in ("seqkd", "seqinter"):
        p = os.path.join(ctx.work, name, "seqkd_stats.json")
        if os.path.exists(p):
            out[name] = _read(p)["seconds"]
    return out


def _portable(cmd: str) -> str:
    """A command as a user would type it from the repository root, with ../shared beside it."""
    repo = os.path.dirname(os.path.dirname(HERE))
    cmd = cmd.replace(os.path.join(os.path.dirname(repo), "shared") + "/", "../shared/")
    return cmd.replace(repo + "/", "")


def _fmt(v, nd=1) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def _pair(rec: dict, stat: str, nd: int) -> str:
    return f"{_fmt(rec.get(stat + '_capped'), nd)} / {_fmt(rec.get(stat + '_nolimit'), nd)}"


def _bleu_cell(rec: dict, key: str) -> str:
    stats = rec.get(key + "_stats")
    if stats:
        return f"{stats['mean']:.2f} ± {stats['std']:.2f}"
    return _fmt(rec.get(key), 2)


def markdown(res: dict, png: str) -> str:
    s = res["setup"]
    tier = s["tier"]
    lines = [
        f"# Multi30k De→En distillation benchmark ({res['tier']} tier)", "",
        f"Generated by `benchmarks/multi30k/run.py` on {res['date']}. Hardware: {s['cpu']}, {s['cores']} cores, "
        f"device {s['device']}; Python {s['python']}, torch {s['torch']}. {s['jobs']} training run(s) side by side, "
        f"{s['threads_per_process']} torch thread(s) each (`OMP_NUM_THREADS={s['threads_per_process']}`).", "",
        f"Student `{s['student']}` (3+1 layers, d=128) for every method; the shared teacher is 3+3, d=256. "
        f"Budget: {tier['max_update']} updates of at most {tier['max_tokens']} tokens, Adam, lr 2e-3 "
        f"(inverse sqrt, {tier['warmup']} warm-up), dropout 0.1, gradient clipping {methods.CLIP_NORM:g}, label "
        "smoothing 0.1 on every one-hot target (none on teacher distributions). "
        + (f"Every run starts from the {tier['start_from'].replace(':', ' tier’s ')} student of its seed "
           "(fairseq's `--finetune-from-model`: weights only; optimizer, schedule and data order restart). "
           if tier.get("start_from") else "")
        + f"Selection: {s['selection']}.", "",
        "Test BLEU: sacreBLEU on detokenized test_2016_flickr output against the raw references, "
        f"`{res['sacrebleu_signature']}`. Mean ± sample std over seeds where there are several.", "",
        "Decoding speed: test set (1,000 sentences), fairseq-generate's own timer, one model at a time, "
        f"{s['threads_per_process']} thread(s). ×T: student greedy at batch 64 against the teacher's beam 5 at batch 64.",
        "",
        "Uncapped: greedy at fairseq-generate's default length limit (200 tokens), as a user decodes. At limit: the "
        "share of greedy outputs that stop only at the limit (capped / uncapped); len: sacreBLEU's output/reference "
        "length ratio (capped / uncapped).", "",
        "| method | seeds | test BLEU greedy | greedy uncapped | test BLEU beam 5 | valid BLEU (selected) | at limit "
        "| len | s/update | train wall (s) | sents/s greedy b64 | ×T | sents/s beam5 b64 | sents/s greedy b1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| **teacher** (3+3, d=256) | – | {_fmt(res['teacher_bleu_greedy'], 2)} | – | {_fmt(res['teacher_bleu_beam5'], 2)} "
        f"| – | – | – | – | – | {_fmt(res['teacher_speed'].get('greedy_b64'))} | – "
        f"| {_fmt(res['teacher_speed'].get('beam5_b64'))} | beam5 b1: {_fmt(res['teacher_speed'].get('beam5_b1'))} |",
    ]
    for m, r in res["methods"].items():
        lines.append(
            f"| {m} | {','.join(map(str, r['seeds']))} | {_bleu_cell(r, 'bleu_greedy')} "
            f"| {_bleu_cell(r, 'bleu_greedy_nolimit')} | {_bleu_cell(r, 'bleu_beam5')} "
            f"| {_bleu_cell(r, 'val_bleu_selection')} | {_pair(r, 'at_limit_share', 3)} | {_pair(r, 'len_ratio', 2)} "
            f"| {_fmt(r.get('sec_per_update'), 3)} | {_fmt(r.get('train_total_s'), 0)} "
            f"| {_fmt(r['student_sents_per_sec'])} | {_fmt(r['speedup_greedy_vs_teacher_beam5'])} "
            f"| {_fmt(r['student_sents_per_sec_beam5'])} | {_fmt(r['student_sents_per_sec_batch1'])} |")
    med = res["student_sents_per_sec_median"]
    lines += ["", f"Every student has the same architecture and writes about as many tokens, so the spread of their "
              f"speeds is the machine's noise on runs of a few seconds. Their median, {_fmt(med)} sentences/s greedy at "
              f"batch 64, is {_fmt(_ratio(med, res['teacher_sents_per_sec']))}× the teacher's beam 5 and "
              f"{_fmt(_ratio(med, res['teacher_speed'].get('greedy_b64')))}× its greedy decoding.",
              "", f"![BLEU against decoding speed]({png})", ""]
    if res["ablations"]:
        lines += ["## Ablations (same budget and settings, not part of the comparison)", "",
                  "| variant | what | seeds | test BLEU greedy | greedy uncapped | test BLEU beam 5 "
                  "| valid BLEU (selected) |", "|---|---|---|---|---|---|---|"]
        for m, r in res["ablations"].items():
            lines.append(f"| {m} | {r['label']} | {','.join(map(str, r['seeds']))} | {_bleu_cell(r, 'bleu_greedy')} "
                         f"| {_bleu_cell(r, 'bleu_greedy_nolimit')} | {_bleu_cell(r, 'bleu_beam5')} "
                         f"| {_bleu_cell(r, 'val_bleu_selection')} |")
        lines.append("")
    if res["paired_bootstrap"]:
        lines += ["## Paired bootstrap (sacreBLEU `--paired-bs`, 1,000 resamples, the lowest seed both have)", "",
                  "| decode | baseline | system | seed | baseline BLEU | system BLEU | 95% CI ± | p |",
                  "|---|---|---|---|---|---|---|---|"]
        for b in res["paired_bootstrap"]:
            lines.append(f"| {b['decode']} | {b['baseline']} | {b['system']} | {b.get('seed', '–')} "
                         f"| {b['baseline_bleu']:.2f} | {b['bleu']:.2f} | {b['ci95']:.2f} | {b['p_value']:.4f} |")
        lines.append("")
    wt = res["wall_time"]
    lines += ["## Wall time", "",
              f"The comparison: {wt['total_s'] / 3600:.2f} h over the invocations of run.py that ran it "
              f"(training, evaluation, timing, and whatever corpora were not built yet); the ablations: "
              f"{wt['ablations_s'] / 3600:.2f} h. "
              "The teacher's decoding time for the corpora (beam 5 over train, summed over shards): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in wt["corpora_s"].items()) + ".", "",
              "## Commands", "", "```"]
    for inv in wt["invocations"]:
        lines.append("python benchmarks/multi30k/run.py " + " ".join(inv["argv"]))
    lines.append("```")
    lines += ["", "Training command of each method (lowest seed):", ""]
    for m, r in res["methods"].items():
        lines.append(f"- `{m}`: `fairseq-train {_portable(r['command']).split('fairseq_cli.train ', 1)[-1]}`")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ts = res["teacher_speed"]
    if ts.get("beam5_b64") and res["teacher_bleu_beam5"] is not None:
        ax.scatter([ts["beam5_b64"]], [res["teacher_bleu_beam5"]], marker="*", s=220, color="black",
                   label="teacher, beam 5")
        ax.scatter([ts["greedy_b64"]], [res["teacher_bleu_greedy"]], marker="*", s=220, color="grey",
                   label="teacher, greedy")
    cmap = plt.get_cmap("tab10")
    for i, (m, r) in enumerate(res["methods"].items()):
        if r["student_sents_per_sec"] is None:
            continue
        ax.scatter([r["student_sents_per_sec"]], [r["bleu_greedy"]], color=cmap(i % 10), marker="o", label=m)
        if r["student_sents_per_sec_beam5"]:
            ax.scatter([r["student_sents_per_sec_beam5"]], [r["bleu_beam5"]], color=cmap(i % 10), marker="^",
                       alpha=0.6)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("test sentences/s (batch 64, CPU, 1 thread)" if res["setup"]["device"] == "cpu"
                  else "test sentences/s (batch 64, GPU)")
    ax.set_ylabel("test BLEU (sacreBLEU, detokenized)")
    ax.set_title(f"Multi30k De→En, {res['tier']} tier: students greedy (●) and beam 5 (▲)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
