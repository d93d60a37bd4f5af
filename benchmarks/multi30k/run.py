"""Multi30k De->En: the ImitKD paper's comparison (quality, training cost, decoding speed), end to end.

From a clean checkout (with ``../shared`` beside it, or ``--text-dir``/``--teacher-dir``)::

    OMP_NUM_THREADS=1 python benchmarks/multi30k/run.py --tier quick          # 2 CPU cores, about 3 h
    python benchmarks/multi30k/run.py --tier full --gpu                        # more updates and seeds
    python benchmarks/multi30k/run.py --tier curve --gpu --skip-speed          # then curve.py, then:
    python benchmarks/multi30k/run.py --tier converged --gpu --jobs 12         # budget from curve.json

Steps, each cached in ``--workdir`` so that a rerun skips what is finished and resumes the rest
(fairseq-train resumes from ``checkpoint_last.pt``, imitkd-seqkd from its finished shards). Finished
runs, their test outputs and the timings are also recorded under ``runs/<tier>/`` beside the results
(``archive.py``), which is committed: a run recorded there is not rerun, so a tier can be completed over
several sessions. To reproduce every run yourself, give ``--out-dir`` an empty folder.

1. encode Multi30k with the teacher's sentencepiece model and binarize it with its dictionaries;
2. build the teacher's Seq-KD and Seq-Inter corpora over train (beam 5);
3. train every (method, seed) and evaluate its best checkpoint (valid BLEU selects it): sacreBLEU on
   the detokenized test_2016_flickr output, greedy and beam 5, and on valid, greedy;
4. time decoding of the test set, one model at a time (nothing else running): each method's seed-1
   student at batch 64 (greedy and beam 5) and batch 1 (greedy), the teacher at beam 5 and greedy;
5. write ``results[_full].json``, ``results[_full].md`` and the BLEU-against-speed plot beside this file.

Training jobs run ``--jobs`` at a time (default 2 on CPU, 1 on GPU), each with ``--threads`` torch
threads (default 1), so on 2 cores two runs share the machine; ``sec_per_update`` is measured so.
"""
import argparse
import glob
import json
import logging
import os
import shlex
import sys
import threading
import time
from typing import Callable, Dict, List

import archive
from archive import read_json, write_json
import curve
import data
import evaluate
import methods
import plot
import report

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
USER_DIR = os.path.join(REPO, "fairseq_imitkd")
logger = logging.getLogger("multi30k")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tier", choices=sorted(methods.TIERS), default="quick", help="budget (default: %(default)s)")
    p.add_argument("--text-dir", default=data.DEFAULT_TEXT_DIR, help="Multi30k raw text")
    p.add_argument("--teacher-dir", default=data.DEFAULT_TEACHER_DIR,
                   help="the teacher: checkpoint.pt, spm.model, dict.de.txt, dict.en.txt")
    p.add_argument("--workdir", default=os.path.join(HERE, "work"), help="data, corpora, checkpoints, logs")
    p.add_argument("--out-dir", default=HERE, help="where results*.json/.md/.png go")
    p.add_argument("--gpu", action="store_true", help="train and decode on the GPU (default: CPU)")
    p.add_argument("--jobs", type=int, default=None, help="runs side by side (default: 2 on CPU, 1 on GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    p.add_argument("--methods", default=None,
                   help="comma-separated, default all compared methods of the tier; NAME@1+2 gives one method its "
                        "own seeds; ablations: "
                   + ", ".join(methods.ABLATIONS))
    p.add_argument("--max-update", type=int, default=None, help="override the tier's update budget (smoke runs)")
    p.add_argument("--seeds", default=None, help="override the tier's seeds for every method, e.g. 1,2")
    p.add_argument("--report-only", action="store_true", help="only rewrite the results from what is finished")
    p.add_argument("--skip-speed", action="store_true",
                   help="train and evaluate only; time decoding in a later invocation, with nothing else running")
    args = p.parse_args(argv)
    if args.methods is None:
        args.methods = ",".join(methods.TIER_METHODS.get(args.tier, methods.METHODS))
    unknown = sorted({m.partition("@")[0] for m in args.methods.split(",")} - set(methods.ALL))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(methods.ALL)}")
    for item in args.methods.split(","):
        own = item.partition("@")[2]
        if "@" in item and not all(x.isdigit() and int(x) >= 1 for x in own.split("+")):
            p.error(f"--methods {item}: seeds after @ must be positive integers joined by +, e.g. {item.split('@')[0]}@1+2")
    if args.seeds is not None:
        try:
            seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            p.error(f"--seeds must be comma-separated integers, e.g. 1,2 (got {args.seeds!r})")
        if not seeds or min(seeds) < 1:
            p.error(f"--seeds must be positive integers (got {args.seeds!r})")
    for name in ("jobs", "threads", "max_update"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


class Context:
    def __init__(self, args):
        self.args = args
        self.tier = dict(methods.TIERS[args.tier])
        if self.tier["max_update"] is None and not args.max_update:  # the converged tier: from the curve
            self.tier["max_update"] = curve.read_budget()
        if args.max_update:
            self.tier["max_update"] = args.max_update
            # a shortened curve still needs its points: it validates at least curve_points times
            every = max(1, args.max_update // self.tier.get("curve_points", 1))
            self.tier["validate_after"] = min(self.tier["validate_after"], every)
            self.tier["validate_every"] = min(self.tier["validate_every"], every)
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        self.seeds = {}
        for item in args.methods.split(","):
            m, _, own = item.partition("@")
            self.seeds[m] = [int(s) for s in own.split("+")] if own else (seeds or self.tier["seeds"][m])
        self.work = os.path.abspath(args.workdir)
        self.tier_dir = os.path.join(self.work, args.tier if not args.max_update else f"{args.tier}_u{args.max_update}")
        self.logs = os.path.join(self.tier_dir, "logs")
        self.archive = archive.Archive(os.path.abspath(args.out_dir), os.path.basename(self.tier_dir))
        self.teacher = os.path.join(os.path.abspath(args.teacher_dir), "checkpoint.pt")
        self.teacher_args = ["--teacher-path", self.teacher, "--teacher-data", os.path.abspath(args.teacher_dir)]
        self.device_args = [] if args.gpu else ["--cpu"]
        self.env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        self.data: Dict[str, str] = {}
        self.caches: Dict[int, str] = {}  # K -> teacher cache directory

    def run_dir(self, method: str, seed: int) -> str:
        return os.path.join(self.tier_dir, "runs", f"{method}_s{seed}")

    def start_context(self) -> "Context":
        """The tier whose students this tier continues (the competent tier: the quick tier's scratch)."""
        tier = self.tier["start_from"].split(":")[0]
        args = argparse.Namespace(**dict(vars(self.args), tier=tier))  # a smoke run continues a smoke run
        ctx = Context(args)
        ctx.data = self.data
        return ctx

    def start_checkpoint(self, seed: int) -> str:
        method = self.tier["start_from"].split(":")[1]
        return os.path.join(self.start_context().run_dir(method, seed), "checkpoint_last.pt")


class Scheduler:
    """Runs named jobs on ``n`` worker threads in insertion order, each once its dependencies are done."""

    def __init__(self, n: int):
        self.n, self.jobs, self.state = n, [], {}
        self.cond = threading.Condition()

    def add(self, name: str, fn: Callable[[], None], deps=()):
        self.jobs.append((name, fn, tuple(deps)))
        self.state[name] = "waiting"

    def _next(self):
        for name, fn, deps in self.jobs:
            if self.state[name] != "waiting":
                continue
            if any(self.state[d] == "failed" or self.state[d] == "skipped" for d in deps):
                self.state[name] = "skipped"
                logger.error("skipping %s: a job it needs failed", name)
                self.cond.notify_all()
                return self._next()
            if all(self.state[d] == "done" for d in deps):
                self.state[name] = "running"
                return name, fn
        return None

    def _worker(self):
        while True:
            with self.cond:
                while True:
                    job = self._next()
                    if job or all(s != "waiting" for s in self.state.values()):
                        break
                    self.cond.wait()
            if job is None:
                return
            name, fn = job
            t0 = time.time()
            try:
                fn()
                status = "done"
                logger.info("done: %s (%.0f s)", name, time.time() - t0)
            except Exception:  # noqa: BLE001 - one failed run must not stop the others
                logger.exception("failed: %s", name)
                status = "failed"
            with self.cond:
                self.state[name] = status
                self.cond.notify_all()

    def run(self) -> List[str]:
        threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [n for n, s in self.state.items() if s in ("failed", "skipped")]


def checkpoint_updates(path: str) -> int:
    """Updates done by a fairseq checkpoint (0 if there is none)."""
    if not os.path.isfile(path):
        return 0
    import fairseq_imitkd  # noqa: F401 - allow-lists what fairseq checkpoints hold for torch's safe loading
    from fairseq import checkpoint_utils

    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    return int(state["optimizer_history"][-1]["num_updates"])


def parse_train_log(path: str) -> dict:
    """Training time and validation from fairseq's JSON log lines (the log is appended across resumes)."""
    epochs, valid = {}, {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            for tag, store, key in ((" | train | ", epochs, "epoch"), (" | valid | ", valid, "valid_num_updates")):
                if tag in line and line.rstrip().endswith("}"):
                    rec = json.loads(line.split(tag, 1)[1])
                    store[int(float(rec[key]))] = rec
    if not epochs:
        raise RuntimeError(f"{path}: no end-of-epoch training line")
    train_s = sum(float(r["train_train_wall"]) for r in epochs.values())  # time in train steps, no validation
    updates = max(int(float(r["train_num_updates"])) for r in epochs.values())
    bleus = {u: float(r["valid_bleu"]) for u, r in valid.items()}
    # target tokens per update, each epoch weighted by its updates (the learning curve's x axis)
    done, weighted = 0, 0.0
    for epoch in sorted(epochs):
        n = int(float(epochs[epoch]["train_num_updates"]))
        weighted += float(epochs[epoch].get("train_wpb", "nan")) * (n - done)
        done = n
    best_update = max(bleus, key=lambda u: (bleus[u], -u)) if bleus else None
    return dict(updates=updates, train_steps_s=round(train_s, 1), sec_per_update=round(train_s / updates, 4),
                tokens_per_update=round(weighted / updates, 1) if weighted == weighted and updates else None,
                valid_bleu_curve={str(u): b for u, b in sorted(bleus.items())},
                val_bleu_selection=bleus.get(best_update), best_update=best_update)


def train(ctx: Context, method: str, seed: int) -> dict:
    run_dir = ctx.run_dir(method, seed)
    os.makedirs(run_dir, exist_ok=True)
    attempts_path = os.path.join(run_dir, "attempts.json")
    attempts = read_json(attempts_path) if os.path.exists(attempts_path) else []
    if checkpoint_updates(os.path.join(run_dir, "checkpoint_last.pt")) < ctx.tier["max_update"]:
        # a finished run is never restarted: fairseq would resume it and do one update more
        cmd = [sys.executable, "-m", "fairseq_cli.train", ctx.data[methods.ALL[method]["data"]],
               "--user-dir", USER_DIR, "--save-dir", run_dir] + methods.method_args(method, ctx.teacher_args, ctx.tier, ctx.caches) \
            + methods.common_args(ctx.tier, seed, methods.ALL[method].get("arch", methods.STUDENT)) + ctx.device_args
        if "start_from" in ctx.tier:
            # fairseq loads it (weights only: optimizer, schedule, meters and data order reset) on the first
            # launch and resumes from checkpoint_last.pt after an interruption
            cmd += ["--finetune-from-model", ctx.start_checkpoint(seed)]
        t0 = time.time()
        data.run_logged(cmd, os.path.join(run_dir, "train.log"), env=ctx.env)
        attempts.append(dict(wall_s=round(time.time() - t0, 1), command=shlex.join(cmd[1:]), ended=time.time()))
        write_json(attempts_path, attempts)
    out = parse_train_log(os.path.join(run_dir, "train.log"))
    out["train_total_s"] = round(sum(a["wall_s"] for a in attempts), 1)  # incl. validation and checkpoints
    out["command"] = attempts[-1]["command"] if attempts else None
    return out


def train_and_evaluate(ctx: Context, method: str, seed: int, need_checkpoint: bool = False) -> None:
    """Train and evaluate one run unless it is finished here or archived (a start student whose
    checkpoint another tier needs is trained again if only its record survived)."""
    run_dir = ctx.run_dir(method, seed)
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        return
    if (method, seed) in ctx.archive.runs() and not need_checkpoint:
        logger.info("%s seed %d: archived in %s, not rerun", method, seed, ctx.archive.dir)
        return
    result = dict(method=method, seed=seed, data=methods.ALL[method]["data"], cpu=evaluate.cpu_name(),
                  **train(ctx, method, seed))
    best = os.path.join(run_dir, "checkpoint_best.pt")
    if not os.path.isfile(best):
        raise RuntimeError(f"{best} was not written: did validation run?")
    result.update(evaluate_checkpoint(ctx, best, run_dir))
    write_json(result_path, result)
    ctx.archive.save_run(result, run_dir)


# (result key, split, beam, length limit, file name)
DECODES = (
    ("bleu_greedy", "test", 1, evaluate.MAX_LEN, "test.beam1"),
    ("bleu_beam5", "test", 5, evaluate.MAX_LEN, "test.beam5"),
    ("val_bleu_greedy", "valid", 1, evaluate.MAX_LEN, "valid.beam1"),
    # as users decode: fairseq-generate's own length limit
    ("bleu_greedy_nolimit", "test", 1, evaluate.DEFAULT_MAX_LEN, "test.beam1.nolimit"),
)


def evaluate_checkpoint(ctx: Context, checkpoint: str, out_dir: str) -> dict:
    """Every decode of DECODES: BLEU, output/reference length ratio and the share of outputs at the limit."""
    result = {}
    for key, split, beam, max_len, name in DECODES:
        prefix = os.path.join(out_dir, name)
        speed = evaluate.generate(ctx.data["gold"], checkpoint, split, prefix, beam=beam, batch_size=64,
                                  user_dir=USER_DIR, device_args=ctx.device_args, env=ctx.env, max_len=max_len,
                                  src_lengths=data.source_lengths(ctx.work, split))
        score = evaluate.bleu(prefix + ".hyp", os.path.join(ctx.args.text_dir, f"{data.SPLITS[split]}.{data.TGT}"))
        result[key] = score["bleu"]
        result["sacrebleu_signature"] = score["signature"]
        result.setdefault("length", {})[name] = dict(len_ratio=score["len_ratio"],
                                                     at_limit_share=speed["at_limit_share"],
                                                     mean_out_tokens=speed["mean_out_tokens"])
        result.setdefault("eval_sents_per_sec_shared_machine", {})[name] = speed["sents_per_sec"]
    return result


SPEED_SETTINGS = {  # name -> (beam, batch size)
    "student": {"greedy_b64": (1, 64), "beam5_b64": (5, 64), "greedy_b1": (1, 1)},
    "teacher": {"beam5_b64": (5, 64), "greedy_b64": (1, 64), "beam5_b1": (5, 1)},
}


def time_decoding(ctx: Context, name: str, checkpoint: str, kind: str) -> None:
    """Decode the test set at each setting, alone on the machine; the teacher's BLEU comes from here too."""
    speed_dir = os.path.join(ctx.tier_dir, "speed")
    os.makedirs(speed_dir, exist_ok=True)
    path = os.path.join(speed_dir, f"{name}.json")
    if os.path.exists(path) or name in ctx.archive.speed():
        return
    out = {}
    for setting, (beam, bsz) in SPEED_SETTINGS[kind].items():
        prefix = os.path.join(speed_dir, f"{name}.{setting}")
        out[setting] = evaluate.generate(ctx.data["gold"], checkpoint, "test", prefix, beam=beam, batch_size=bsz,
                                         user_dir=USER_DIR, device_args=ctx.device_args, env=ctx.env)
        out[setting].update(evaluate.bleu(prefix + ".hyp", os.path.join(ctx.args.text_dir, "test_2016_flickr.en")))
    write_json(path, out)
    ctx.archive.save_speed(name, out)


def archive_finished(ctx: Context) -> None:
    """Archive every finished run of this tier (and of the tier it continues) that is not archived yet."""
    for c in [ctx] + ([ctx.start_context()] if "start_from" in ctx.tier else []):
        archived = c.archive.runs()
        for path in glob.glob(os.path.join(c.tier_dir, "runs", "*", "result.json")):
            r = read_json(path)
            if "restored" in archived.get((r["method"], r["seed"]), {"restored": True}):  # missing or rebuilt
                c.archive.save_run(r, os.path.dirname(path))
        for name in data.CORPORA:
            stats = os.path.join(c.work, name, "seqkd_stats.json")
            if os.path.exists(stats) and name not in c.archive.corpus_seconds():
                c.archive.save_corpus_seconds(name, read_json(stats)["seconds"])
        speed_dir = os.path.join(c.tier_dir, "speed")
        for path in glob.glob(os.path.join(speed_dir, "*.json")):
            name = os.path.basename(path)[:-5]
            if name not in c.archive.speed():
                c.archive.save_speed(name, read_json(path))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout, force=True)  # an import may have configured logging already
    data.check_inputs(args.text_dir, args.teacher_dir)
    if not plot.available():  # said once, at the start, not after hours of training
        logger.warning(plot.MISSING)
    ctx = Context(args)
    if args.report_only:
        archive_finished(ctx)
        logger.info("results: %s", report.write(ctx, ctx.archive.ledger()))
        return 0
    os.makedirs(ctx.logs, exist_ok=True)
    t_start = time.time()
    ctx.data["gold"] = data.prepare(args.text_dir, args.teacher_dir, ctx.work, os.path.join(ctx.work, "logs"))

    jobs = Scheduler(args.jobs or (1 if args.gpu else 2))
    needed = {methods.ALL[m]["data"] for m in ctx.seeds} - {"gold"}
    for corpus in sorted(needed):
        def build(corpus=corpus):
            ctx.data[corpus] = data.build_corpus(corpus, ctx.data["gold"], args.teacher_dir, ctx.work,
                                                 os.path.join(ctx.work, "logs"), ctx.device_args, env=ctx.env)
        jobs.add(f"corpus:{corpus}", build)
    for k in sorted({methods.ALL[m]["cache"] for m in ctx.seeds if "cache" in methods.ALL[m]}):
        def build_cache(k=k):
            ctx.caches[k] = data.build_cache(k, ctx.data["gold"], args.teacher_dir, ctx.work,
                                             os.path.join(ctx.work, "logs"), ctx.device_args, env=ctx.env)
        jobs.add(f"cache:{k}", build_cache)
    # the longest runs first, so that the lanes end together
    order = sorted(((m, s) for m in ctx.seeds for s in ctx.seeds[m]), key=lambda ms: -methods.ALL[ms[0]]["cost"])
    starts = set()
    if "start_from" in ctx.tier:  # the students this tier continues, trained (or found) first
        start_ctx, start_method = ctx.start_context(), ctx.tier["start_from"].split(":")[1]
        for s in sorted({s for m in ctx.seeds for s in ctx.seeds[m]}):
            jobs.add(f"start:{s}", lambda s=s: train_and_evaluate(start_ctx, start_method, s, need_checkpoint=True))
            starts.add(s)
    for m, s in order:
        corpus = methods.ALL[m]["data"]
        deps = [f"corpus:{corpus}"] if corpus != "gold" else []
        deps += [f"cache:{methods.ALL[m]['cache']}"] if "cache" in methods.ALL[m] else []
        deps += [f"start:{s}"] if s in starts else []
        jobs.add(f"run:{m}:{s}", lambda m=m, s=s: train_and_evaluate(ctx, m, s), deps=deps)
    failed = jobs.run()
    t_train = time.time()

    timing = Scheduler(1)  # one at a time: decoding speed is measured with nothing else running
    if "start_from" not in ctx.tier and not args.skip_speed:
        timing.add("speed:teacher", lambda: time_decoding(ctx, "teacher", ctx.teacher, "teacher"))
    # ablations decode as fast as their method; the competent tier's students are the quick tier's architecture
    timed = [] if "start_from" in ctx.tier or args.skip_speed else [m for m in ctx.seeds if m in methods.METHODS]
    for m in timed:
        seed = min(ctx.seeds[m])
        best = os.path.join(ctx.run_dir(m, seed), "checkpoint_best.pt")
        if os.path.exists(os.path.join(ctx.run_dir(m, seed), "result.json")):
            timing.add(f"speed:{m}", lambda m=m, best=best: time_decoding(ctx, m, best, "student"))
    failed += timing.run()
    t_end = time.time()

    # every invocation's wall time is kept: an interrupted tier's total is their sum
    ledger = ctx.archive.add_invocation(dict(
        start=t_start, train_eval_s=round(t_train - t_start, 1), speed_s=round(t_end - t_train, 1),
        wall_s=round(t_end - t_start, 1), argv=sys.argv[1:], methods=sorted(ctx.seeds), failed=failed))
    archive_finished(ctx)
    path = report.write(ctx, ledger)
    logger.info("results: %s", path)
    if failed:
        logger.error("failed or skipped: %s (rerun to resume)", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
