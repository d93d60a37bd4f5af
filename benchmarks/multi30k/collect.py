"""Every finished run of a tier, from the work directory and the archive: per-method means, spreads and
per-seed figures, and the paired bootstrap between methods."""
import glob
import json
import os
from typing import Dict, List, Optional

import data
import evaluate
import methods

# greedy test decodes whose output lengths are reported: with the benchmark's cap, and as users decode
LENGTH_DECODES = {"test.beam1": "capped", "test.beam1.nolimit": "nolimit"}


def _read(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
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
        rec["speedup_greedy_vs_teacher_beam5"] = ratio(rec["student_sents_per_sec"], t_beam)
        rec["speedup_beam5_vs_teacher_beam5"] = ratio(rec["student_sents_per_sec_beam5"], t_beam)
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


# seqkd on a corpus CTranslate2 decoded: judged against seqkd
CORPUS_ABLATIONS = tuple(m for m, a in methods.ABLATIONS.items() if a["data"].startswith("seqkd_ct2"))


def bootstrap(ctx, present: Dict[str, dict], ablations: Optional[Dict[str, dict]] = None) -> List[dict]:
    """Paired bootstrap of every method against scratch, of every ImitKD variant against word_kd and
    against seqkd, of word_kd's other divergences against word_kd, and of the CTranslate2 corpora's
    students (ablations) against seqkd; each pair on the test outputs of a seed both have, or, where
    none has both, of each one's lowest seed with outputs (its ``seed`` is then "system's/baseline's"). A method is paired on
    its lowest common seed; a corpus ablation on every common seed, since the question it answers (is
    the corpus's student within seed noise?) needs each."""
    import tempfile

    ref = os.path.join(ctx.args.text_dir, "test_2016_flickr.en")
    pairs = [("scratch", m) for m in present if m != "scratch"]
    pairs += [(base, m) for base in ("word_kd", "seqkd") for m in present if m.startswith("imitkd")]
    pairs += [("word_kd", m) for m in present if m.startswith("word_kd_")]  # each divergence against forward KL
    corpus = {m: r for m, r in (ablations or {}).items() if m in CORPUS_ABLATIONS}
    pairs += [("seqkd", m) for m in corpus]
    present = {**present, **corpus}
    out = []
    with tempfile.TemporaryDirectory() as scratch_dir:
        for decode, name in BOOTSTRAP_DECODES:
            for base in ("scratch", "word_kd", "seqkd"):
                by_seed: Dict[int, Dict[str, str]] = {}  # seed -> {system: outputs}
                base_hyps: Dict[int, Optional[str]] = {}

                def base_hyp(seed, base=base):  # each baseline output unpacked once
                    if seed not in base_hyps:
                        base_hyps[seed] = _hypothesis(ctx, base, seed, name, scratch_dir)
                    return base_hyps[seed]
                apart: Dict[str, tuple] = {}  # system -> (its seed, the baseline's seed): no common seed has outputs
                for b, m in pairs:
                    if b != base or base not in present:
                        continue
                    paired = False
                    for seed in sorted(set(present[base]["seeds"]) & set(present[m]["seeds"])):
                        hyp = _hypothesis(ctx, m, seed, name, scratch_dir)
                        if base_hyp(seed) and hyp:
                            by_seed.setdefault(seed, {})[m] = hyp
                            paired = True
                            if m not in corpus:  # a method: its lowest common seed is enough
                                break
                    if not paired:
                        own = next(((s, h) for s in present[m]["seeds"]
                                    if (h := _hypothesis(ctx, m, s, name, scratch_dir))), None)
                        theirs = next(((s, h) for s in present[base]["seeds"] if (h := base_hyp(s))), None)
                        if own and theirs:
                            apart[m] = (own, theirs)
                for seed, hyps in sorted(by_seed.items()):
                    res = evaluate.paired_bootstrap(base_hyps[seed], hyps, ref)
                    out.extend(dict(decode=decode, baseline=base, system=m, seed=seed, **res[m]) for m in hyps)
                # still paired on the same test sentences, but the two seeds differ: the seed is "system/baseline"
                for m, ((s, hyp), (bs, base_hyp)) in sorted(apart.items()):
                    res = evaluate.paired_bootstrap(base_hyp, {m: hyp}, ref)
                    out.append(dict(decode=decode, baseline=base, system=m, seed=f"{s}/{bs}", **res[m]))
    # rows computed by an earlier session on outputs that were not kept, for the seeds they were on
    done = {(b["decode"], b["baseline"], b["system"], b["seed"]) for b in out}
    out += [b for b in ctx.archive.bootstrap() if (b["decode"], b["baseline"], b["system"], b["seed"]) not in done
            and b["baseline"] in present and b["system"] in present]
    return sorted(out, key=lambda b: (BOOTSTRAP_ORDER[b["decode"]], b["baseline"] != "scratch", b["baseline"],
                                      b["system"], str(b["seed"])))


def signature(ctx, present: Dict[str, dict]) -> Optional[str]:
    """sacreBLEU's signature from a run's result, for a tier that did not decode the teacher."""
    for m, r in present.items():
        path = os.path.join(ctx.run_dir(m, r["seeds"][0]), "result.json")
        rec = _read(path) if os.path.exists(path) else ctx.archive.runs().get((m, r["seeds"][0]), {})
        if rec.get("sacrebleu_signature"):
            return rec["sacrebleu_signature"]
    return None


def cpus(present: Dict[str, dict]) -> str:
    """The processors the runs trained on (a tier completed over several sessions may have had several)."""
    names = sorted({c for r in present.values() for c in r.get("cpus", [])}) or [evaluate.cpu_name()]
    return " and ".join(names)


def median(values: List[Optional[float]]) -> Optional[float]:
    import statistics

    values = [v for v in values if v]
    return round(statistics.median(values), 1) if values else None


def compared(invocation: dict) -> bool:
    """Whether an invocation of run.py ran any compared method (not only ablations)."""
    return bool(set(invocation.get("methods", methods.METHODS)) & set(methods.METHODS))


def torch_version() -> str:
    import torch

    return torch.__version__


def corpora_seconds(ctx) -> Dict[str, float]:
    out = ctx.archive.corpus_seconds()
    for name in data.CORPORA:
        p = os.path.join(ctx.work, name, "seqkd_stats.json")
        if os.path.exists(p):
            out[name] = _read(p)["seconds"]
    return out


RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def ct2_speed(results: str = RESULTS) -> List[dict]:
    """``benchmarks/ct2_speed.py``'s tables (the students deployed with CTranslate2): ``ct2_speed.json``
    first, then any later run written beside it as ``ct2_speed_*.json``. Each run has its own teacher
    baselines, so ratios are only read within a run."""
    first = os.path.join(results, "ct2_speed.json")
    paths = ([first] if os.path.exists(first) else []) + sorted(glob.glob(os.path.join(results, "ct2_speed_*.json")))
    return [dict(_read(p), file=os.path.basename(p)) for p in paths]

