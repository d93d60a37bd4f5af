"""word_kd end to end: fairseq-train with --user-dir, the checkpoint it writes, decoding with it."""
import math
import os
import subprocess
import sys

import torch

from conftest import (
    USER_DIR,
    build_training_objects,
    fairseq_generate,
    first_batch,
    read_json_log,
)


def test_kd_term_falls_during_training(word_kd_student):
    rows = read_json_log(word_kd_student / "log.txt", "train_inner")
    assert len(rows) == 8, rows  # 80 updates, logged every 10
    kd = [float(r["kd_loss"]) for r in rows]
    agree = [float(r["kd_agree"]) for r in rows]
    # seen: kd 6.19 -> 4.40 bits, agreement 0.03 -> 0.16 (the floor of kd is the teacher's entropy)
    assert kd[-1] < kd[0] - 1.0, kd
    assert all(b < a + 0.05 for a, b in zip(kd, kd[1:])), kd
    assert agree[-1] > agree[0] + 0.08, agree
    valid = read_json_log(word_kd_student / "log.txt", "valid")
    assert valid and "kd_loss" in valid[-1] and "nll_loss" in valid[-1]


def test_checkpoint_holds_only_the_student(word_kd_student, toy_data):
    state = torch.load(word_kd_student / "checkpoint_last.pt")  # safe loading (weights_only) is the default
    assert state["cfg"]["task"]["_name"] == "distillation"
    task, model, _ = build_training_objects(
        toy_data, "--task", "distillation", "--arch", "transformer_student_tiny", "--share-all-embeddings"
    )
    assert set(state["model"]) == set(model.state_dict())
    assert not any("teacher" in k for k in state["model"])
    # the optimizer never saw the teacher: Adam holds exactly one moment buffer per student parameter
    adam = state["last_optimizer_state"]["state"]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(s["exp_avg"].numel() for s in adam.values()) == n_trainable


def test_fairseq_generate_decodes_the_student(word_kd_student, toy_data):
    hyps, out = fairseq_generate(
        toy_data, "--path", word_kd_student / "checkpoint_best.pt", "--gen-subset", "test",
        "--beam", "2", "--batch-size", "32", "--cpu",
        # with the default multiple of 8 this fairseq build silently drops the last, partial batch
        "--required-batch-size-multiple", "1",
    )
    assert sorted(hyps) == list(range(100))
    assert "BLEU4" in out


def test_fairseq_interactive_decodes_the_student(word_kd_student, toy_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.interactive", str(toy_data), "--user-dir", USER_DIR,
         "--path", str(word_kd_student / "checkpoint_best.pt"), "--source-lang", "src", "--target-lang", "tgt",
         "--cpu", "--beam", "1"],
        input="s1 s2 s3\ns4 s5\n", capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(line.startswith("H-") for line in proc.stdout.splitlines()) == 2


def test_alpha_zero_matches_label_smoothed_cross_entropy(toy_data, teacher):
    from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

    task, model, word_kd = build_training_objects(
        toy_data, "--task", "distillation", "--teacher-path", teacher, "--criterion", "word_kd",
        "--kd-alpha", "0", "--label-smoothing", "0.1", "--arch", "transformer_student_tiny",
        "--share-all-embeddings", "--cpu",
    )
    reference = LabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1)
    sample = first_batch(task)
    model.eval()
    with torch.no_grad():
        loss, size, log = word_kd(model, sample)
        ref_loss, ref_size, ref_log = reference(model, sample)
    assert size == ref_size == sample["ntokens"]
    assert abs(loss.item() / size - ref_loss.item() / ref_size) <= 1e-6
    assert abs(log["nll_loss"].item() / size - ref_log["nll_loss"].item() / ref_size) <= 1e-6
    assert math.isfinite(log["kd_loss"].item())


def test_train_step_passes_update_num_to_the_criterion(toy_data, teacher):
    from fairseq.optim.adam import FairseqAdam
    from omegaconf import OmegaConf

    task, model, criterion = build_training_objects(
        toy_data, "--task", "distillation", "--teacher-path", teacher, "--criterion", "word_kd",
        "--arch", "transformer_student_tiny", "--share-all-embeddings", "--cpu",
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = FairseqAdam(OmegaConf.create({"lr": [1e-3], "adam_betas": "(0.9, 0.98)", "adam_eps": 1e-8,
                                              "weight_decay": 0.0, "use_old_adam": False, "fp16_adam_stats": False,
                                              "tpu": False}), params)
    sample = first_batch(task)
    task.train_step(sample, model, criterion, optimizer, update_num=17)
    assert criterion.update_num == 17
    teacher_model = task.teacher(torch.device("cpu")).models[0]
    assert not teacher_model.training
    assert all(not p.requires_grad and p.grad is None for p in teacher_model.parameters())
    assert any(p.grad is not None for p in model.parameters())


def test_teacher_half_precision(toy_data, teacher):
    for flag, dtype in (("--teacher-bf16", torch.bfloat16), ("--teacher-fp16", torch.float16)):
        task, model, criterion = build_training_objects(
            toy_data, "--task", "distillation", "--teacher-path", teacher, flag, "--criterion", "word_kd",
            "--arch", "transformer_student_tiny", "--share-all-embeddings", "--cpu",
        )
        sample = first_batch(task)
        loss, _, log = criterion(model, sample)
        assert task.teacher(torch.device("cpu")).dtype == dtype
        assert torch.isfinite(loss) and loss.dtype == torch.float32


def test_every_divergence_gives_a_finite_loss_and_forward_kl_is_the_default(toy_data, teacher):
    import pytest

    losses = {}
    for divergence in ("default", "forward_kl", "reverse_kl", "jsd", "tvd", "atkd", "top8"):
        extra = [] if divergence == "default" else (["--kd-teacher-topk", "8"] if divergence == "top8"
                                                    else ["--kd-divergence", divergence])
        torch.manual_seed(1)  # the same student weights for every divergence
        task, model, criterion = build_training_objects(
            toy_data, "--task", "distillation", "--teacher-path", teacher, "--criterion", "word_kd",
            "--arch", "transformer_student_tiny", "--share-all-embeddings", "--cpu", "--seed", "1", *extra)
        sample = first_batch(task)
        model.eval()
        torch.manual_seed(0)
        loss, size, log = criterion(model, sample)
        assert torch.isfinite(loss) and size == log["n_scored"], divergence
        losses[divergence] = (loss.item(), float(log["kd_loss"]))
    assert losses["forward_kl"] == losses["default"]  # bit for bit
    assert len({v[1] for v in losses.values()}) == 6  # every other divergence, and top-8 targets, another number
    for flag, value in (("--kd-jsd-beta", "1.5"), ("--kd-atkd-alpha", "-0.1"), ("--kd-teacher-topk", "-1")):
        with pytest.raises(ValueError, match=flag):
            build_training_objects(toy_data, "--task", "distillation", "--teacher-path", teacher, "--criterion",
                                   "word_kd", "--arch", "transformer_student_tiny", "--cpu", flag, value)
