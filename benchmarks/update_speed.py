"""Wall time of one imitkd update against one word_kd update: same student, batches and machine.

What is timed is a whole update as fairseq-train does it, ``task.train_step`` (rollout, teacher pass,
student forward and backward) plus the optimizer step. The methods run in turn on each real Multi30k
batch, in a fresh seeded order per batch, so that drifts of a noisy machine hit all of them alike. Adam runs with
lr=0, so the student is the same for every method and batch.

The student (``transformer_student_small``) is first trained for ``--pretrain-updates`` updates with
label-smoothed CE, so that its rollouts have realistic lengths (a random student rolls out to the
length limit). ImitKD runs at β=0, fully on-policy (``imitkd_full_cache``: β=1). The teacher is the shared
Multi30k teacher.

Example (CPU, 1 thread)::

    OMP_NUM_THREADS=1 python benchmarks/update_speed.py --threads 1 --out benchmarks/results/update_speed_cpu_t1.json

Both rollout engines side by side (each imitkd method runs twice, ``<method>`` with the exact engine and
``<method>@static``; word_kd has no rollout)::

    python benchmarks/update_speed.py --device cuda --engine both --prewarm \\
        --out benchmarks/results/update_speed_engines_gpu.json

The teacher cache against the online teacher and plain CE (a cached method builds the cache first;
``imitkd_full_cache`` is ImitKD+Full at β = 1, all gold rows read from the cache)::

    OMP_NUM_THREADS=1 python benchmarks/update_speed.py --threads 1 --cache-topk 32 \\
        --methods ce,word_kd,word_kd_cache,imitkd_full_cache --out benchmarks/results/update_speed_cache_cpu_t1.json
"""
import argparse
import contextlib
import datetime
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks", "multi30k"))
import data as multi30k  # noqa: E402  (the benchmark's data preparation, shared by every speed script)
import evaluate as multi30k_evaluate  # noqa: E402  (the processor's name)

logger = logging.getLogger("update_speed")

METHODS = {
    "ce": ["--criterion", "cross_entropy"],
    "word_kd": ["--criterion", "word_kd", "--kd-alpha", "0.5"],
    # the same loss as word_kd --kd-teacher-topk K, read from imitkd-teacher-cache's files: no teacher pass
    "word_kd_cache": ["--criterion", "word_kd", "--kd-alpha", "0.5", "--kd-teacher-cache", "{cache}"],
    # ImitKD+Full at β = 1 from the same cache: every row is gold, read from the files (no rollout, no teacher)
    "imitkd_full_cache": ["--criterion", "imitkd", "--imitkd-target", "full", "--imitkd-sampling", "greedy",
                          "--kd-teacher-cache", "{cache}", "--imitkd-beta-schedule", "constant", "--imitkd-beta", "1"],
    "imitkd_topk5": ["--criterion", "imitkd", "--imitkd-target", "argmax", "--imitkd-sampling", "topk",
                     "--imitkd-topk", "5"],
    "imitkd_full_greedy": ["--criterion", "imitkd", "--imitkd-target", "full", "--imitkd-sampling", "greedy"],
    "imitkd_token_full_greedy": ["--criterion", "imitkd", "--imitkd-mix", "token", "--imitkd-target", "full",
                                 "--imitkd-sampling", "greedy"],
}
BETA0 = ["--imitkd-beta-schedule", "constant", "--imitkd-beta", "0"]  # unless a method sets its own β
CACHED = [name for name, flags in METHODS.items() if "{cache}" in flags]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher-dir", default=multi30k.DEFAULT_TEACHER_DIR)
    p.add_argument("--text-dir", default=multi30k.DEFAULT_TEXT_DIR)
    p.add_argument("--workdir", default="/tmp/imitkd-bench", help="binarized data and the pretrained student")
    p.add_argument("--pretrain-updates", type=int, default=400)
    p.add_argument("--student", help="a trained transformer_student_small checkpoint to time instead of pretraining one")
    p.add_argument("--batches", type=int, default=20, help="timed batches per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    p.add_argument("--prewarm", action="store_true",
                   help="one untimed pass of every method over every batch first: the static engine's CUDA graphs "
                   "are then captured for every batch shape, as they are after the first updates of a long run")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--teacher-fp16", action="store_true")
    p.add_argument("--engine", default="auto", choices=["auto", "exact", "static", "both"],
                   help="--imitkd-rollout-engine of the imitkd methods; both: each imitkd method with each engine")
    p.add_argument("--methods", default=",".join(m for m in METHODS if m != "ce" and m not in CACHED))
    p.add_argument("--cache-topk", type=int, default=8, help="K of the teacher cache (word_kd_cache)")
    p.add_argument("--out", required=True, help="JSON results; a markdown summary is printed")
    return p.parse_args(argv)


def run(cmd, env=None):
    logger.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)


def pretrain_student(args, bin_dir) -> str:
    save = os.path.join(args.workdir, f"student_{args.pretrain_updates}")
    ckpt = os.path.join(save, "checkpoint_last.pt")
    if os.path.exists(ckpt):
        return ckpt
    cmd = [sys.executable, "-m", "fairseq_cli.train", bin_dir, "--user-dir", os.path.join(REPO, "fairseq_imitkd"),
           "--arch", "transformer_student_small", "--share-all-embeddings",
           "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
           "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt",
           "--warmup-updates", "100", "--max-tokens", "4096", "--max-update", str(args.pretrain_updates),
           "--save-dir", save, "--no-epoch-checkpoints", "--seed", "1", "--log-interval", "100",
           "--no-progress-bar"]
    if args.device == "cpu":
        cmd.append("--cpu")
    run(cmd)
    return ckpt


def build(bin_dir, student_ckpt, args):
    """The task, the pretrained student and one criterion per method, as fairseq-train builds them."""
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    common = [bin_dir, "--user-dir", os.path.join(REPO, "fairseq_imitkd"), "--task", "distillation",
              "--teacher-path", os.path.join(args.teacher_dir, "checkpoint.pt"), "--teacher-data", args.teacher_dir,
              "--arch", "transformer_student_small", "--share-all-embeddings", "--max-update", "1000"]
    if args.teacher_fp16:
        common.append("--teacher-fp16")
    criteria, task, model = {}, None, None
    for name, engine in method_engines(args):
        parser = options.get_training_parser()
        method = [a.replace("{cache}", cache_dir(args)) for a in METHODS[name]]
        beta = BETA0 if name.startswith("imitkd") and "--imitkd-beta" not in method else []
        if engine is not None:
            beta = beta + ["--imitkd-rollout-engine", engine]
            if args.engine == "both" and engine == "static":
                name = f"{name}@static"
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, common + method + beta))
        if task is None:
            task = tasks.setup_task(cfg.task)
            model = task.build_model(cfg.model)
            state = checkpoint_utils.load_checkpoint_to_cpu(student_ckpt)
            model.load_state_dict(state["model"])
        criteria[name] = task.build_criterion(cfg.criterion)
    return task, model.to(args.device), criteria


def method_engines(args):
    """(method, rollout engine) pairs to time; the engine is None where the method has no rollout."""
    for name in args.methods.split(","):
        if not name.startswith("imitkd"):
            yield name, None
        elif args.engine == "both":
            yield name, "exact"
            yield name, "static"
        else:
            yield name, args.engine


def cache_dir(args) -> str:
    return os.path.join(args.workdir, f"teacher_cache_k{args.cache_topk}")


def teacher_cache(args, bin_dir) -> dict:
    """Build (or find) the teacher cache of the train split; its build time and bytes per target token."""
    from fairseq_imitkd.teacher_cache import build as build_cache

    out = cache_dir(args)
    summary = build_cache(bin_dir, out, os.path.join(args.teacher_dir, "checkpoint.pt"), args.cache_topk, ["train"],
                          teacher_data=args.teacher_dir, cpu=args.device == "cpu")
    split = summary["splits"]["train"]
    files = sum(os.path.getsize(os.path.join(out, "train", f"{n}.npy")) for n in ("values", "indices", "tail"))
    with open(os.path.join(out, "manifest.json")) as f:
        positions = json.load(f)["splits"]["train"]["positions"]
    return {"k": args.cache_topk, "build_s": split.get("seconds"), "positions": positions,
            "bytes_per_target_token": round(files / positions, 2), "reused": bool(split.get("reused"))}


@contextlib.contextmanager
def timed(store, key, sync):
    sync()
    t0 = time.perf_counter()
    yield
    sync()
    store[key] = store.get(key, 0.0) + time.perf_counter() - t0


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, REPO)
    from fairseq import utils
    from fairseq.optim.adam import FairseqAdam
    from omegaconf import OmegaConf

    import fairseq_imitkd.criterions.imitkd as imitkd_module
    from fairseq_imitkd.teacher import Teacher

    bin_dir = multi30k.prepare(args.text_dir, args.teacher_dir, args.workdir, os.path.join(args.workdir, "logs"))
    student_ckpt = args.student or pretrain_student(args, bin_dir)
    cache = teacher_cache(args, bin_dir) if set(CACHED) & set(args.methods.split(",")) else None
    task, model, criteria = build(bin_dir, student_ckpt, args)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    optimizer = FairseqAdam(OmegaConf.create({
        "lr": [0.0], "adam_betas": "(0.9, 0.98)", "adam_eps": 1e-8, "weight_decay": 0.0, "use_old_adam": False,
        "fp16_adam_stats": False, "tpu": False}), [p for p in model.parameters() if p.requires_grad])

    # breakdown: time spent in the rollout and in teacher passes, per method
    parts = {}
    real_rollout, real_teacher = imitkd_module.rollout, Teacher.log_probs
    current = {"method": None}

    def timed_rollout(*a, **k):
        with timed(parts.setdefault(current["method"], {}), "rollout_s", sync):
            return real_rollout(*a, **k)

    def timed_teacher(self, *a, **k):
        with timed(parts.setdefault(current["method"], {}), "teacher_pass_s", sync):
            return real_teacher(self, *a, **k)

    imitkd_module.rollout = timed_rollout
    Teacher.log_probs = timed_teacher

    task.load_dataset("train")
    itr = task.get_batch_iterator(task.dataset("train"), max_tokens=args.max_tokens, seed=1,
                                  max_positions=(1024, 1024)).next_epoch_itr(shuffle=True)
    batches = [b for _, b in zip(range(args.warmup + args.batches), itr)]
    names = list(criteria)
    if args.prewarm:
        for sample in batches:
            sample = utils.move_to_cuda(sample) if cuda else sample
            for name in names:
                current["method"] = name
                task.train_step(sample, model, criteria[name], optimizer, update_num=0)
                optimizer.zero_grad()
        parts.clear()
    times = {n: [] for n in names}
    logs = {n: [] for n in names}
    for i, sample in enumerate(batches):
        sample = utils.move_to_cuda(sample) if cuda else sample
        # a fresh order per batch (seeded): each method follows each other equally often, so that what a method
        # leaves behind (the online teacher's large buffers, freed and mapped again by the next one) is
        # not charged to one fixed successor, as a rotation of a fixed order did
        order = random.Random(i).sample(names, len(names))
        for name in order:
            if i == args.warmup:
                parts.pop(name, None)  # breakdown over timed batches only
            current["method"] = name
            torch.manual_seed(i)
            sync()
            t0 = time.perf_counter()
            _, _, log = task.train_step(sample, model, criteria[name], optimizer, update_num=0)
            optimizer.step()
            optimizer.zero_grad()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                logs[name].append({k: float(v) for k, v in log.items()})

    results = {}
    base = sum(times["word_kd"]) if "word_kd" in times else None
    for name in names:
        total = sum(times[name])
        ntok = sum(log["ntokens"] for log in logs[name])
        rolled = sum(log.get("n_on_policy", log.get("n_rollouts", 0)) for log in logs[name])
        r = {
            "total_s": total,
            "median_update_s": statistics.median(times[name]),
            "target_tokens_per_s": ntok / total,
            "ratio_vs_word_kd": total / base if base else None,
        }
        if "ce" in times:
            r["ratio_vs_ce"] = total / sum(times["ce"])
        if "word_kd_cache" in times:
            r["ratio_vs_word_kd_cache"] = total / sum(times["word_kd_cache"])
        if rolled:
            r["mean_rollout_len"] = sum(log["rollout_tokens"] for log in logs[name]) / rolled
        for key, value in parts.get(name, {}).items():
            r[key] = value
            r[key.replace("_s", "_share")] = value / total
        results[name] = r

    out = {
        "benchmark": "update_speed",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "device": torch.cuda.get_device_name() if cuda else multi30k_evaluate.cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "teacher_dtype": "float16" if args.teacher_fp16 else "float32",
        "student": args.student or "transformer_student_small (3+1 layers, d=128), pretrained "
                   f"{args.pretrain_updates} updates with label-smoothed CE",
        "batches": args.batches, "max_tokens": args.max_tokens,
        "beta": {name: (1.0 if "--imitkd-beta" in METHODS[name.split("@")[0]] else 0.0) for name in names
                 if name.startswith("imitkd")},
        "rollout_engine": args.engine, "prewarm": args.prewarm,
        "teacher_cache": cache,
        "methods": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\n{out['device']}, torch {out['torch']}, {out['threads']} thread(s), {args.batches} batches of "
          f"<= {args.max_tokens} tokens, imitkd at beta=0 unless its name says cache (beta=1)\n")
    if cache:
        print(f"teacher cache: K={cache['k']}, {cache['bytes_per_target_token']} bytes per target token, "
              f"built in {cache['build_s']} s\n")
    print("| method | s/update (median) | ratio vs word_kd (total) | ratio vs CE | mean rollout len | rollout share "
          "| teacher share |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = r["ratio_vs_word_kd"] if r["ratio_vs_word_kd"] is not None else float("nan")
        print(f"| {name} | {r['median_update_s']:.3f} | {ratio:.2f} | {r.get('ratio_vs_ce', float('nan')):.2f} | "
              f"{r.get('mean_rollout_len', float('nan')):.1f} | {r.get('rollout_share', 0):.2f} | "
              f"{r.get('teacher_pass_share', 0):.2f} |")


if __name__ == "__main__":
    main()
