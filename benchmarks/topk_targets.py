"""How far top-k teacher targets (``--kd-teacher-topk K``) move the KD term from the whole distribution.

On real Multi30k valid batches, a trained student and the shared teacher: the forward KL on the teacher's
K best tokens plus a tail bucket against the KL over the whole vocabulary, per position, and the gradient
of the KD term with respect to the student's logits (its cosine with the full gradient, and the ratio of
norms). Also the teacher mass the top K hold.

Example (CPU, 1 thread; the student: a quick-tier scratch checkpoint of benchmarks/multi30k)::

    OMP_NUM_THREADS=1 python benchmarks/topk_targets.py \\
        --student benchmarks/multi30k/work/quick/runs/scratch_s3/checkpoint_best.pt \\
        --out benchmarks/results/topk_targets.json
"""
import argparse
import datetime
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks", "multi30k"))
import data as multi30k  # noqa: E402  (where the benchmarks' inputs are)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="a student checkpoint trained on Multi30k")
    p.add_argument("--teacher-dir", default=multi30k.DEFAULT_TEACHER_DIR)
    p.add_argument("--text-dir", default=multi30k.DEFAULT_TEXT_DIR)
    p.add_argument("--workdir", default="/tmp/imitkd-bench", help="where Multi30k is binarized (cached)")
    p.add_argument("--ks", default="8,32,128")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sys.path.insert(0, REPO)
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_imitkd.losses import forward_kl, kd_divergence, topk_with_tail
    from fairseq_imitkd.scoring import scored_log_probs

    bin_dir = multi30k.prepare(args.text_dir, args.teacher_dir, args.workdir, os.path.join(args.workdir, "logs"))
    parsed = options.parse_args_and_arch(options.get_training_parser(), [
        bin_dir, "--user-dir", os.path.join(REPO, "fairseq_imitkd"), "--task", "distillation",
        "--teacher-path", os.path.join(args.teacher_dir, "checkpoint.pt"), "--teacher-data", args.teacher_dir,
        "--arch", "transformer_student_small", "--share-all-embeddings", "--cpu"])
    cfg = convert_namespace_to_omegaconf(parsed)
    task = tasks.setup_task(cfg.task)
    student = task.build_model(cfg.model)
    student.load_state_dict(checkpoint_utils.load_checkpoint_to_cpu(args.student)["model"])
    student.eval()
    teacher = task.teacher(torch.device("cpu"))
    task.load_dataset("valid")
    itr = task.get_batch_iterator(task.dataset("valid"), max_tokens=2048, seed=1).next_epoch_itr(shuffle=False)
    ks = [int(k) for k in args.ks.split(",")]
    sums = {k: {"kl_abs_diff": 0.0, "cos": 0.0, "norm_ratio": 0.0, "mass": 0.0} for k in ks}
    n_pos, kl_full_sum = 0, 0.0
    for _, sample in zip(range(args.batches), itr):
        net = sample["net_input"]
        mask = sample["target"].ne(task.target_dictionary.pad())
        inputs = (net["src_tokens"], net["src_lengths"], net["prev_output_tokens"])
        t = teacher.log_probs(*inputs, mask)
        with torch.no_grad():
            s_full = scored_log_probs(student, *inputs, mask)
        logits = s_full.clone().requires_grad_(True)  # log-probs shift logits by a constant: same softmax
        s = torch.log_softmax(logits, -1)
        kl_full = forward_kl(s, t)
        (g_full,) = torch.autograd.grad(kd_divergence("forward_kl", s, t), logits, retain_graph=True)
        kl_full_sum += float(kl_full.sum())
        n_pos += s.size(0)
        for k in ks:
            s_k, t_k = topk_with_tail(s, t, k)
            kl_k = forward_kl(s_k, t_k)
            (g_k,) = torch.autograd.grad(kd_divergence("forward_kl", s, t, teacher_topk=k), logits,
                                         retain_graph=True)
            sums[k]["kl_abs_diff"] += float((kl_full - kl_k).abs().sum())
            sums[k]["cos"] += float(torch.nn.functional.cosine_similarity(g_full, g_k, dim=-1).sum())
            sums[k]["norm_ratio"] += float((g_k.norm(dim=-1) / g_full.norm(dim=-1)).sum())
            sums[k]["mass"] += float(t_k[:, :-1].exp().sum(-1).sum())
    out = {
        "benchmark": "topk_targets",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "student": os.path.relpath(os.path.abspath(args.student), REPO), "positions": n_pos,
        "mean_kl_full_nats": kl_full_sum / n_pos,
        "topk": {str(k): {name: v / n_pos for name, v in d.items()} for k, d in sums.items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"{n_pos} positions, mean KL(teacher||student) {out['mean_kl_full_nats']:.4f} nats")
    print("| K | teacher mass in top K | mean abs KL change (nats) | gradient cosine | gradient norm ratio |")
    print("|---|---|---|---|---|")
    for k, r in out["topk"].items():
        print(f"| {k} | {r['mass']:.4f} | {r['kl_abs_diff']:.4f} | {r['cos']:.4f} | {r['norm_ratio']:.4f} |")


if __name__ == "__main__":
    main()
