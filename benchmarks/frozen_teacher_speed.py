"""Decoding with a frozen teacher: torch's slow CPU path, and Teacher.inference, which avoids it.

The shared Multi30k teacher decodes real Multi30k val batches (greedy, incremental, as a token-mixing
rollout does) and scores them teacher-forced (as every KD criterion does), alternately with its
weights frozen (``requires_grad=False``, how the task holds it) and inside ``Teacher.inference()``.
Both run under no_grad and give the same tokens (checked).

    OMP_NUM_THREADS=1 python benchmarks/frozen_teacher_speed.py --out benchmarks/results/frozen_teacher_cpu_t1.json
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks", "multi30k"))
import data as multi30k  # noqa: E402  (where the benchmarks' inputs are)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(REPO, "benchmarks", "multi30k", "work", "bin"),
                   help="Multi30k binarized with the teacher's dictionaries (benchmarks/multi30k/run.py makes it)")
    p.add_argument("--teacher-dir", default=multi30k.DEFAULT_TEACHER_DIR)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, REPO)
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_imitkd.rollout import rollout

    t = args.teacher_dir
    ns = options.parse_args_and_arch(options.get_training_parser(), [
        args.data, "--user-dir", os.path.join(REPO, "fairseq_imitkd"), "--task", "distillation",
        "--teacher-path", os.path.join(t, "checkpoint.pt"), "--teacher-data", t,
        "--arch", "transformer_student_small", "--criterion", "word_kd", "--cpu"])
    task = tasks.setup_task(convert_namespace_to_omegaconf(ns).task)
    task.load_dataset("valid")
    teacher = task.teacher(torch.device("cpu"))
    itr = task.get_batch_iterator(task.dataset("valid"), max_tokens=args.max_tokens,
                                  required_batch_size_multiple=1).next_epoch_itr(shuffle=False)
    batches = [b for _, b in zip(range(args.batches), itr)]

    def decode():
        return [rollout(teacher.models[0], b["net_input"]["src_tokens"], b["net_input"]["src_lengths"],
                        max_len_a=1.2, max_len_b=10).tokens for b in batches]

    def score():
        for b in batches:
            ni = b["net_input"]
            teacher.log_probs(ni["src_tokens"], ni["src_lengths"], ni["prev_output_tokens"], b["target"].ne(1))

    modes = {"frozen": contextlib.nullcontext, "inference": teacher.inference}
    times = {(w, m): [] for w in ("greedy_decode", "teacher_forced") for m in modes}
    outputs = {}
    for _ in range(args.repeats):
        for work, fn in (("greedy_decode", decode), ("teacher_forced", score)):
            for mode, ctx in modes.items():
                with torch.no_grad(), ctx():
                    t0 = time.perf_counter()
                    out = fn()
                    times[(work, mode)].append(time.perf_counter() - t0)
                if work == "greedy_decode":
                    outputs[mode] = out
    same = all(torch.equal(a, b) for a, b in zip(outputs["frozen"], outputs["inference"]))
    res = {f"{w}_{m}_s": min(v) for (w, m), v in times.items()}
    res.update(greedy_decode_speedup=res["greedy_decode_frozen_s"] / res["greedy_decode_inference_s"],
               teacher_forced_speedup=res["teacher_forced_frozen_s"] / res["teacher_forced_inference_s"],
               same_tokens=same)
    out = dict(benchmark="frozen_teacher_speed",
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command=" ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
               device=platform.processor() or platform.machine(), torch=torch.__version__,
               threads=torch.get_num_threads(), batches=args.batches, max_tokens=args.max_tokens,
               sentences=sum(b["nsentences"] for b in batches), repeats=args.repeats, best_of=args.repeats, **res)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
