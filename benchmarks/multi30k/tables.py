"""The results as markdown: the full table of results*.md, and the compact one this benchmark's README.md shows."""
import os
from typing import List, Optional

import collect
import methods

HERE = os.path.dirname(os.path.abspath(__file__))


README_BEGIN = "<!-- multi30k-table: written by benchmarks/multi30k/report.py -->"
README_END = "<!-- /multi30k-table -->"
README_MARKERS = {  # results suffix -> README markers of its table
    "": (README_BEGIN, README_END),
    "_competent": ("<!-- multi30k-competent-table: written by benchmarks/multi30k/report.py -->",
                   "<!-- /multi30k-competent-table -->"),
}


def readme_table(res: dict) -> str:
    """The compact table this benchmark's README.md shows: quality, training cost and, where it was timed,
    decoding speed (CTranslate2's dated runs stay in results.md; the table of record is benchmarks/README.md's)."""
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
                    f"| {_fmt(r.get('sec_per_update'), 2)} | {_fmt(collect.ratio(r.get('sec_per_update'), base), 2)} |"
                    + (f" {_fmt(r['student_sents_per_sec'])} | {_fmt(r['speedup_greedy_vs_teacher_beam5'])} |"
                       if timed else ""))
    return "\n".join(rows)


def ct2_table(res: dict) -> str:
    """The students deployed with CTranslate2 (``benchmarks/ct2_speed.py``), greedy at batch 64, beside
    fairseq-generate in the same run: one table per run, since each run has its own teacher baselines
    (and possibly its own machine); empty when that script has not been run."""
    out = []
    for ct2 in res.get("ctranslate2_speed") or []:
        rows = {(r["model"], r["engine"], r["weights"], r["beam"], r["batch_size"], r.get("lever")): r
                for r in ct2["rows"]}
        out += ["", "", f"Deployed with CTranslate2 (`benchmarks/results/{ct2.get('file', 'ct2_speed.json')}`, "
                f"{ct2['date']}, {ct2['threads']} thread, batch 64, one student per row, each model alone; BLEU at "
                "fairseq-generate's default limit; \"+vmap\": CTranslate2's vocabulary map):", "",
                "| model | fairseq sents/s | CT2 float32 | CT2 int8 | CT2 int8 + vmap | × fairseq teacher beam 5 "
                "(int8 / +vmap) | × CT2 int8 teacher beam 5 (int8 / +vmap) | BLEU fairseq → int8 / +vmap |",
                "|---|---|---|---|---|---|---|---|"]
        for model in dict.fromkeys(r["model"] for r in ct2["rows"]):
            beam = 5 if model == "teacher" else 1
            fs, f32, i8, vm = (rows.get((model, e, w, beam, 64, lever)) for e, w, lever in
                               (("fairseq", "float32", None), ("ctranslate2", "float32", None),
                                ("ctranslate2", "int8", None), ("ctranslate2", "int8", "vmap")))
            if not (fs and f32 and i8):
                continue

            def pair(key, fmt="{:.1f}"):
                return fmt.format(i8[key]) + (" / " + fmt.format(vm[key]) if vm else "")

            vmap_speed = f"{vm['sents_per_sec']:.1f}" if vm else ""
            out.append(f"| {model}{' (beam 5)' if beam == 5 else ''} | {fs['sents_per_sec']:.1f} | "
                       f"{f32['sents_per_sec']:.1f} | {i8['sents_per_sec']:.1f} | {vmap_speed} | "
                       f"{pair('x_fairseq_teacher_beam5')} | {pair('x_ct2_int8_teacher_beam5')} | "
                       f"{fs['bleu']:.2f} → {pair('bleu', '{:.2f}')} |")
        out += _deployed_table(ct2, rows)
    return "\n".join(out)


DEPLOYED = ("int8 7-bit", "vmap + max len 64")  # ct2_speed.py's deployment setting: (weights, lever)


def _deployed_table(ct2: dict, rows: dict) -> List[str]:
    """The students in the setting a user would deploy (7-bit int8 weights, vocabulary map, 64-piece
    limit) against fairseq at the same limit; nothing for a run that did not time it."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in ct2["rows"]):
        dep = rows.get((model, "ctranslate2", DEPLOYED[0], 1, 64, DEPLOYED[1]))
        fs = rows.get((model, "fairseq", "float32", 1, 64, "max len 64"))
        if dep and fs:
            lines.append(f"| {model} | {fs['sents_per_sec']:.1f} | {dep['sents_per_sec']:.1f} | "
                         f"{dep['x_fairseq_teacher_beam5']:.1f} | {dep['x_ct2_int8_teacher_beam5']:.1f} | "
                         f"{fs['bleu']:.2f} → {dep['bleu']:.2f} |")
    if not lines:
        return []
    return ["", "Deployed as a user would (the same run): int8 with 7-bit weights (`imitkd-export --int8-weight-bits "
            "7`), `--use-vmap`, `--max-len 64`, against fairseq-generate at `--max-len-b 64`:", "",
            "| model | fairseq sents/s (64) | CT2 sents/s | × fairseq teacher beam 5 | × CT2 int8 teacher beam 5 | "
            "BLEU fairseq (64) → CT2 |", "|---|---|---|---|---|---|"] + lines


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


def markdown(res: dict, png: Optional[str]) -> str:
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
              f"batch 64, is {_fmt(collect.ratio(med, res['teacher_sents_per_sec']))}× the teacher's beam 5 and "
              f"{_fmt(collect.ratio(med, res['teacher_speed'].get('greedy_b64')))}× its greedy decoding.",
              ""] + ([f"![BLEU against decoding speed]({png})", ""] if png else [])
    if res.get("ctranslate2_speed"):
        lines += ["## Deployment speed (CTranslate2)", "", ct2_table(res).strip(), ""]
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
        lines += ["## Paired bootstrap (sacreBLEU `--paired-bs`, 1,000 resamples, the lowest seed both have; every such seed for the corpus ablations)", "",
                  "Seed `a/b`: no seed has outputs of both, so the system's seed a is paired with the baseline's "
                  "seed b (the same test sentences, two seeds).", "",
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
