"""The learning curve that sets the converged tier's budget: valid BLEU against updates × tokens.

The converged tier compares methods where students stop improving, so its budget is read off a curve,
not guessed: the ``curve`` tier trains scratch and word_kd with a generous budget and validates often
(``run.py --tier curve``); this script reads each run's validation BLEU (``valid_bleu_curve`` in its
``result.json``), averages the seeds at each validation point, and takes for each method the first
point after which the curve never rises by ``--delta`` BLEU or more. The budget is the later of the two
methods' points. Writes ``curve.json`` (read by ``run.py --tier converged``) and ``curve.png``::

    python benchmarks/multi30k/run.py --tier curve --gpu --jobs 4 --skip-speed
    python benchmarks/multi30k/curve.py            # -> benchmarks/multi30k/curve.json, curve.png
    python benchmarks/multi30k/run.py --tier converged --gpu --jobs 12
"""
import argparse
import glob
import json
import os
import statistics
import sys
from typing import Dict, List, Sequence, Tuple

import plot

HERE = os.path.dirname(os.path.abspath(__file__))
CURVE_JSON = os.path.join(HERE, "curve.json")
METHODS = ("scratch", "word_kd")


def plateau(points: Sequence[Tuple[int, float]], delta: float) -> int:
    """The first update after which BLEU never again exceeds the best so far by ``delta`` or more.

    ``points``: ``(updates, bleu)`` in any order. A curve still rising at its last point returns that
    point: the budget it gives is then a lower bound, and :func:`choose_budget` says so.
    """
    if not points:
        raise ValueError("no validation points")
    pts = sorted(points)
    best_so_far, later_best = [], []
    best = -float("inf")
    for _, b in pts:
        best = max(best, b)
        best_so_far.append(best)
    best = -float("inf")
    for _, b in reversed(pts):
        best = max(best, b)
        later_best.append(best)
    later_best.reverse()
    for i, (u, _) in enumerate(pts):
        if later_best[i] - best_so_far[i] < delta:
            return u
    return pts[-1][0]  # unreachable: at the last point the later best is the best so far


def mean_curve(curves: Sequence[Dict[str, float]]) -> List[Tuple[int, float]]:
    """Seeds averaged at the validation points they all have."""
    common = set.intersection(*(set(c) for c in curves)) if curves else set()
    return sorted((int(u), statistics.mean(float(c[u]) for c in curves)) for u in common)


def choose_budget(curves: Dict[str, List[Dict[str, float]]], delta: float) -> dict:
    """``curves``: method -> one ``valid_bleu_curve`` per seed. The budget is the latest plateau."""
    per_method = {}
    for method, runs in sorted(curves.items()):
        points = mean_curve(runs)
        if len(points) < 3:
            raise ValueError(f"{method}: {len(points)} validation point(s) common to its seeds; a curve needs 3 "
                             "or more (validate more often, or train longer)")
        at = plateau(points, delta)
        per_method[method] = dict(plateau_update=at, last_update=points[-1][0], still_rising=at == points[-1][0]
                                  and points[-1][1] - max(b for _, b in points[:-1]) >= delta,
                                  mean_curve=[[u, round(b, 2)] for u, b in points], seeds=len(runs))
    budget = max(r["plateau_update"] for r in per_method.values())
    return dict(budget_updates=budget, delta_bleu=delta, methods=per_method,
                lower_bound=any(r["still_rising"] for r in per_method.values()))


def read_runs(tier_dir: str, methods: Sequence[str]) -> Tuple[Dict[str, List[Dict[str, float]]], Dict[str, float]]:
    """Each method's per-seed valid BLEU curves and the runs' mean target tokens per update."""
    curves, wpb = {}, []
    for method in methods:
        for path in sorted(glob.glob(os.path.join(tier_dir, "runs", f"{method}_s*", "result.json"))):
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
            curves.setdefault(method, []).append(rec["valid_bleu_curve"])
            if rec.get("tokens_per_update"):
                wpb.append(rec["tokens_per_update"])
        if method not in curves:
            raise SystemExit(f"curve.py: no finished {method} run under {tier_dir}/runs: run "
                             "benchmarks/multi30k/run.py --tier curve first")
    return curves, {"tokens_per_update": round(statistics.mean(wpb), 1) if wpb else None}


def draw(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = result.get("tokens_per_update") or 1
    fig, ax = plt.subplots(figsize=(8, 5))
    for method, r in result["methods"].items():
        xs = [u * tokens / 1e6 for u, _ in r["mean_curve"]]
        ax.plot(xs, [b for _, b in r["mean_curve"]], marker="o", markersize=3, label=f"{method} ({r['seeds']} seeds)")
    ax.axvline(result["budget_updates"] * tokens / 1e6, color="grey", linestyle="--",
               label=f"budget: {result['budget_updates']} updates")
    ax.set_xlabel("target tokens seen (millions)" if result.get("tokens_per_update") else "updates")
    ax.set_ylabel("valid BLEU (greedy, fairseq --eval-bleu)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_budget(path: str = None) -> int:
    """The converged tier's budget, or one line saying how to measure it."""
    path = path or CURVE_JSON
    if not os.path.isfile(path):
        raise SystemExit(f"the converged tier's budget comes from the learning curve, and {path} does not exist: "
                         "run benchmarks/multi30k/run.py --tier curve, then benchmarks/multi30k/curve.py")
    with open(path, encoding="utf-8") as f:
        return int(json.load(f)["budget_updates"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tier-dir", default=os.path.join(HERE, "work", "curve"), help="the curve tier's work folder")
    p.add_argument("--delta", type=float, default=0.3, help="BLEU a curve must still gain to count as rising")
    p.add_argument("--out", default=CURVE_JSON)
    args = p.parse_args(argv)
    if not args.delta > 0:
        p.error(f"--delta must be > 0, got {args.delta}")
    curves, extra = read_runs(args.tier_dir, METHODS)
    try:
        result = dict(choose_budget(curves, args.delta), **extra)
    except ValueError as e:
        raise SystemExit(f"curve.py: {e}")
    if result["tokens_per_update"]:
        result["budget_tokens"] = int(result["budget_updates"] * result["tokens_per_update"])
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    if plot.available():
        draw(result, os.path.splitext(args.out)[0] + ".png")
    flat = [m for m, r in result["methods"].items() if max(b for _, b in r["mean_curve"]) < 1.0]
    if flat:  # a curve that never left zero has no plateau to read, only a start
        print(f"curve.py: warning: {', '.join(flat)} never reached 1 valid BLEU; the budget means nothing "
              "until they learn (train longer)", file=sys.stderr)
    print(json.dumps({k: v for k, v in result.items() if k != "methods"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
