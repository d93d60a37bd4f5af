"""What the half-precision tests share, on CPU (tests/test_half_precision.py) and CUDA (tests/test_cuda.py):
a few real fairseq-train updates of every criterion and mixing mode, checked for finite losses and
gradients, a frozen teacher in the dtype asked for, and checkpoints that hold the student only."""
import math

import torch

from conftest import COMMON_TRAIN, build_training_objects, fairseq_train, read_json_log

STUDENT = ["--arch", "transformer_student_tiny", "--share-all-embeddings"]
IMITKD = ["--criterion", "imitkd", "--imitkd-max-len-a", "1.5", "--imitkd-max-len-b", "4",
          "--imitkd-beta-schedule", "constant", "--imitkd-beta", "0.5"]
CRITERIA = {
    "word_kd": ["--criterion", "word_kd", "--kd-alpha", "0.5"],
    "imitkd_argmax": [*IMITKD, "--imitkd-mix", "sequence", "--imitkd-target", "argmax"],
    "imitkd_full": [*IMITKD, "--imitkd-mix", "sequence", "--imitkd-target", "full"],
    "imitkd_topk": [*IMITKD, "--imitkd-mix", "sequence", "--imitkd-target", "full",
                    "--imitkd-sampling", "topk", "--imitkd-topk", "5"],
    "imitkd_token": [*IMITKD, "--imitkd-mix", "token", "--imitkd-target", "full"],
}
TEACHER_DTYPES = {"fp32": [], "fp16": ["--teacher-fp16"], "bf16": ["--teacher-bf16"]}
STUDENT_DTYPES = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"]}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def common_train(device: str):
    """The suite's training flags, without ``--cpu`` for CUDA."""
    return [a for a in COMMON_TRAIN if not (device == "cuda" and a == "--cpu")]


def train_a_few_updates(toy_data, teacher, save, criterion, student_dtype, teacher_dtype, device="cpu",
                        updates=3, extra=()):
    """Train ``updates`` updates through the real fairseq-train; return its per-update log rows after
    checking that every loss and gradient norm is finite and the checkpoint holds the student only."""
    fairseq_train(
        toy_data, "--task", "distillation", "--teacher-path", teacher, *STUDENT, *common_train(device),
        *CRITERIA[criterion], *STUDENT_DTYPES[student_dtype], *TEACHER_DTYPES[teacher_dtype],
        "--max-update", str(updates), "--log-interval", "1", "--save-dir", save, "--log-file", save / "log.txt",
        "--no-epoch-checkpoints", "--disable-validation", *extra,
    )
    rows = read_json_log(save / "log.txt", "train_inner")
    assert [int(r["num_updates"]) for r in rows] == list(range(1, updates + 1)), rows
    for row in rows:
        for key in ("loss", "gnorm"):
            assert math.isfinite(float(row[key])), (key, row)
    # fairseq's half-precision optimizer skips an update (and lowers its loss scale) on an overflowing
    # gradient: at least the last update must have gone through
    assert float(rows[-1]["gnorm"]) > 0, rows
    state = torch.load(save / "checkpoint_last.pt", weights_only=False)
    _, student, _ = build_training_objects(toy_data, "--task", "distillation", *STUDENT)
    assert set(state["model"]) == set(student.state_dict())
    return rows


def check_teacher_step(toy_data, teacher, criterion, teacher_dtype, device):
    """One ``task.train_step`` by hand: the loss and the student's gradients are finite, and the teacher
    is frozen, in eval mode, on ``device`` and in the dtype asked for, and absent from the student."""
    from conftest import first_batch
    from fairseq import utils

    task, model, crit = build_training_objects(
        toy_data, "--task", "distillation", "--teacher-path", teacher, *STUDENT, *CRITERIA[criterion],
        *TEACHER_DTYPES[teacher_dtype],
    )
    model = model.to(device)
    model.train()
    sample = first_batch(task, "train")
    if device != "cpu":
        sample = utils.move_to_cuda(sample)

    class _Opt:  # fairseq's train_step calls optimizer.backward(loss)
        def backward(self, loss):
            loss.backward()

    loss, sample_size, log = task.train_step(sample, model, crit, _Opt(), update_num=0)
    assert torch.isfinite(loss), log
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    held = task.teacher(torch.device(device))
    params = [p for m in held.models for p in m.parameters()]
    assert all(not p.requires_grad for p in params)
    assert all(p.dtype == DTYPES[teacher_dtype] for p in params)
    assert all(p.device.type == device for p in params)
    assert not any(m.training for m in held.models)
    assert not {id(p) for p in params} & {id(p) for p in model.parameters()}
    return float(loss)
