"""imitkd through the real fairseq-train: both mixing modes, both targets, and exact resume."""

import numpy as np
import pytest
import torch

import fairseq_imitkd.criterions.imitkd as imitkd_module
from conftest import COMMON_TRAIN, build_training_objects, fairseq_generate, first_batch, read_json_log

STUDENT = ["--arch", "transformer_student_tiny", "--share-all-embeddings"]


def imitkd_args(data, teacher, save, *extra):
    return [
        data, "--task", "distillation", "--teacher-path", teacher, "--criterion", "imitkd", *STUDENT,
        *COMMON_TRAIN, "--save-dir", save, "--log-file", save / "log.txt", "--log-interval", "1",
        "--imitkd-max-len-a", "1.5", "--imitkd-max-len-b", "4", *extra,
    ]


@pytest.mark.parametrize("mix,target", [("sequence", "argmax"), ("sequence", "full"),
                                        ("token", "argmax"), ("token", "full")])
def test_imitkd_trains_through_fairseq_train(toy_data, teacher, tmp_path, mix, target):
    from conftest import fairseq_train

    fairseq_train(*imitkd_args(
        toy_data, teacher, tmp_path, "--imitkd-mix", mix, "--imitkd-target", target,
        "--imitkd-beta-schedule", "exponential", "--imitkd-beta-base", "200", "--max-update", "6",
    ))
    rows = read_json_log(tmp_path / "log.txt", "train_inner")
    assert [int(r["num_updates"]) for r in rows] == list(range(1, 7))
    betas = [float(r["beta"]) for r in rows]
    expected = [200 ** (-t / 6) for t in range(6)]  # update_num t = 0..5 for updates 1..6
    assert betas == pytest.approx(expected, abs=1e-4)
    for key in ("kd_loss", "kd_agree", "loss"):
        assert all(torch.isfinite(torch.tensor(float(r[key]))) for r in rows), key
    # once beta is small nearly everything is on-policy, with rollouts of real length
    assert float(rows[-1]["on_policy"]) > 0.8
    assert float(rows[-1]["rollout_len"]) >= 1.0
    # no teacher leaks into what is saved: the student's tensors only, and Adam's moments for them only
    state = torch.load(tmp_path / "checkpoint_last.pt")
    _, student, _ = build_training_objects(toy_data, "--task", "distillation", *STUDENT)
    assert set(state["model"]) == set(student.state_dict())
    assert all(state["model"][k].shape == v.shape for k, v in student.state_dict().items())
    adam = state["last_optimizer_state"]["state"]
    assert sum(m["exp_avg"].numel() for m in adam.values()) == sum(p.numel() for p in student.parameters())


def test_imitkd_student_decodes(toy_data, teacher, tmp_path):
    """Selected by validation BLEU, as README recommends; that checkpoint holds numpy arrays (the BLEU
    meters' counts), which torch's safe loading must accept through the plugin's allow-list."""
    from conftest import fairseq_train

    fairseq_train(*imitkd_args(toy_data, teacher, tmp_path, "--imitkd-beta-schedule", "constant",
                               "--imitkd-beta", "0", "--max-update", "3", "--eval-bleu",
                               "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric"))
    best = tmp_path / "checkpoint_best.pt"
    state = torch.load(best)  # weights_only=True, torch's default

    def arrays(obj):
        if isinstance(obj, np.ndarray):
            return 1
        if isinstance(obj, dict):
            return sum(arrays(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(arrays(v) for v in obj)
        return 0

    assert arrays(state["extra_state"]["metrics"]) > 0
    assert "bleu" in read_json_log(tmp_path / "log.txt", "valid")[-1]
    hyps, _ = fairseq_generate(toy_data, "--path", best, "--gen-subset", "test",
                               "--beam", "1", "--batch-size", "50", "--required-batch-size-multiple", "1", "--cpu")
    assert len(hyps) == 100


def _record_training_calls(monkeypatch):
    """Record, for each training forward: update_num, beta, on-policy rows, rollout tokens, loss."""
    calls = []
    last_rollout = {}
    real_rollout = imitkd_module.rollout
    real_forward = imitkd_module.ImitKDCriterion.forward

    def recording_rollout(*args, **kwargs):
        out = real_rollout(*args, **kwargs)
        last_rollout["tokens"] = out.tokens.clone()
        return out

    def recording_forward(self, model, sample, reduce=True):
        last_rollout.clear()
        loss, size, log = real_forward(self, model, sample, reduce)
        if model.training:
            calls.append({
                "update_num": self.update_num, "beta": log["beta_x_sents"] / log["nsentences"],
                "n_on_policy": log.get("n_on_policy"), "tokens": last_rollout.get("tokens"),
                "loss": loss.item(), "sample_ids": sample["id"].tolist(),
            })
        return loss, size, log

    monkeypatch.setattr(imitkd_module, "rollout", recording_rollout)
    monkeypatch.setattr(imitkd_module.ImitKDCriterion, "forward", recording_forward)
    return calls


@pytest.mark.parametrize("clock", ["updates", "agreement"])
def test_resume_continues_exactly(toy_data, teacher, tmp_path, monkeypatch, clock):
    """Stopped at update k and resumed from checkpoint_last.pt, update k+1 sees the same beta, the same
    on-policy rows, the same rollout tokens and the same loss as an uninterrupted run. With the agreement
    clock, β depends on the clock's state, which must come back from the checkpoint."""
    from conftest import fairseq_train

    calls = _record_training_calls(monkeypatch)
    k = 5
    # the horizon is pinned: with the default (--max-update) a run extended later would change beta
    extra = ["--imitkd-beta-updates", "8", "--imitkd-beta-base", "4", "--imitkd-sampling", "topk",
             "--imitkd-topk", "5"]
    if clock == "agreement":  # thresholds the toy student crosses within k updates, a short memory
        extra += ["--imitkd-beta-clock", "agreement", "--imitkd-agree-low", "0.0", "--imitkd-agree-high", "0.5",
                  "--imitkd-agree-momentum", "0.5"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    straight.mkdir()
    interrupted.mkdir()
    fairseq_train(*imitkd_args(toy_data, teacher, straight, *extra, "--max-update", str(k + 1)))
    uninterrupted = calls[-1]
    calls.clear()
    fairseq_train(*imitkd_args(toy_data, teacher, interrupted, *extra, "--max-update", str(k)))
    before = calls[-1]
    calls.clear()
    fairseq_train(*imitkd_args(toy_data, teacher, interrupted, *extra, "--max-update", str(k + 1)))
    assert len(calls) == 1, "the resumed run should do exactly one more update"
    resumed = calls[0]

    assert before["update_num"] == k - 1 and resumed["update_num"] == uninterrupted["update_num"] == k
    assert resumed["sample_ids"] == uninterrupted["sample_ids"]
    assert resumed["beta"] == uninterrupted["beta"]
    if clock == "updates":
        assert resumed["beta"] == pytest.approx(4 ** (-k / 8))
    else:
        state = torch.load(straight / "checkpoint_last.pt")["task_state"]["kd_schedule"]
        assert state["observations"] == k + 1 and 0.0 < state["progress"] <= 1.0
        # β follows the clock, not the update count: the 4^(-x) curve at the clock's progress after k updates
        assert resumed["beta"] < 1.0
        assert resumed["beta"] != pytest.approx(4 ** (-k / 8))
    assert resumed["n_on_policy"] == uninterrupted["n_on_policy"] and resumed["n_on_policy"] > 0
    assert torch.equal(resumed["tokens"], uninterrupted["tokens"])
    assert resumed["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-6)


def test_agreement_clock_logs_progress_and_warmup_holds_beta(toy_data, teacher, tmp_path):
    """β = 1 through the warm-up whatever the clock says; the log shows the clock's progress beside β."""
    from conftest import fairseq_train

    fairseq_train(*imitkd_args(toy_data, teacher, tmp_path, "--imitkd-beta-clock", "agreement",
                               "--imitkd-agree-low", "0.0", "--imitkd-agree-high", "0.3",
                               "--imitkd-beta-warmup-updates", "3", "--imitkd-beta-schedule", "linear",
                               "--max-update", "6"))
    rows = read_json_log(tmp_path / "log.txt", "train_inner")
    betas = [float(r["beta"]) for r in rows]
    progress = [float(r["beta_progress"]) for r in rows]
    assert betas[:3] == [1.0, 1.0, 1.0]
    assert progress == sorted(progress)  # the ratchet
    # after the warm-up, linear β is 1 - progress of the clock as it stood before the update
    for t in range(3, 6):
        assert betas[t] == pytest.approx(1.0 - progress[t], abs=1e-3)
    assert progress[-1] > 0.0


def test_epoch_bounded_run_needs_a_horizon(toy_data, teacher):
    with pytest.raises(ValueError, match="--imitkd-beta-updates"):
        build_training_objects(toy_data, "--task", "distillation", "--teacher-path", teacher,
                               "--criterion", "imitkd", *STUDENT, "--max-epoch", "3")
    # a constant beta needs none
    build_training_objects(toy_data, "--task", "distillation", "--teacher-path", teacher, "--criterion", "imitkd",
                           *STUDENT, "--max-epoch", "3", "--imitkd-beta-schedule", "constant", "--imitkd-beta", "0.3")


@pytest.mark.parametrize("flag,value", [("--imitkd-beta", "1.5"), ("--imitkd-temperature", "0"),
                                        ("--imitkd-topk", "-1"), ("--imitkd-beta-base", "1"),
                                        ("--imitkd-beta-warmup-updates", "-2"), ("--imitkd-beta-warmup-updates", "10"),
                                        ("--imitkd-max-len-a", "-1"), ("--label-smoothing", "1.0")])
def test_bad_options_are_named(toy_data, teacher, flag, value):
    with pytest.raises(ValueError, match=flag):
        build_training_objects(toy_data, "--task", "distillation", "--teacher-path", teacher,
                               "--criterion", "imitkd", *STUDENT, "--max-update", "10", flag, value)


def test_sample_size_counts_scored_positions(toy_data, teacher):
    task, model, criterion = build_training_objects(
        toy_data, "--task", "distillation", "--teacher-path", teacher, "--criterion", "imitkd", *STUDENT,
        "--max-update", "10", "--imitkd-beta-schedule", "constant", "--imitkd-beta", "0.5",
    )
    sample = first_batch(task, "train")
    model.train()
    torch.manual_seed(3)
    loss, sample_size, log = criterion(model, sample)
    assert sample_size == log["n_scored"]
    n_on = log["n_on_policy"]
    assert 0 < n_on < sample["nsentences"]
    # gold rows contribute their target length, rolled-out rows their rollout length
    torch.manual_seed(3)
    on_policy = torch.rand(sample["nsentences"]) >= 0.5
    gold_tokens = int(sample["target"][~on_policy].ne(task.target_dictionary.pad()).sum())
    assert sample_size == gold_tokens + log["rollout_tokens"]


def test_fully_on_policy_rollouts_shorter_than_gold(toy_data, teacher):
    """β=0 and rollouts capped at 3 tokens while gold targets are up to 11: the batch is exactly as wide
    as the rollouts, and only rollout positions are scored."""
    task, model, criterion = build_training_objects(
        toy_data, "--task", "distillation", "--teacher-path", teacher, "--criterion", "imitkd", *STUDENT,
        "--max-update", "10", "--imitkd-beta-schedule", "constant", "--imitkd-beta", "0",
        "--imitkd-max-len-a", "0", "--imitkd-max-len-b", "2", "--imitkd-target", "full",
    )
    sample = first_batch(task, "train")
    assert sample["target"].size(1) > 3
    model.train()
    loss, sample_size, log = criterion(model, sample)
    assert log["n_on_policy"] == sample["nsentences"]
    assert sample_size == log["rollout_tokens"] <= 3 * sample["nsentences"]
    assert torch.isfinite(loss)


def test_token_mixing_teacher_stays_frozen(toy_data, teacher):
    """Teacher.inference flags the teacher's weights for the fast decoding path only while it decodes:
    after a token-mixing update the teacher requires no grad again and holds none."""
    task, model, criterion = build_training_objects(
        toy_data, "--task", "distillation", "--teacher-path", teacher, "--criterion", "imitkd", *STUDENT,
        "--max-update", "10", "--imitkd-mix", "token", "--imitkd-target", "full",
        "--imitkd-beta-schedule", "constant", "--imitkd-beta", "0.5",
    )
    sample = first_batch(task, "train")
    model.train()
    loss, _, log = criterion(model, sample)
    loss.backward()
    t = task.teacher(torch.device("cpu"))
    assert log["n_on_policy_tokens"] > 0
    assert all(not p.requires_grad and p.grad is None for m in t.models for p in m.parameters())
    with t.inference() as models:
        assert all(p.requires_grad for m in models for p in m.parameters())
        assert not torch.is_grad_enabled()
    assert all(not p.requires_grad for m in t.models for p in m.parameters())


@pytest.mark.parametrize("mix,target", [("sequence", "argmax"), ("sequence", "full"), ("token", "full")])
def test_length_grouped_passes_give_the_same_loss(toy_data, teacher, monkeypatch, mix, target):
    """Teacher and student run per length group; the loss is the same sum over the same positions as
    one pass over the whole padded batch (dropout off, so both passes are deterministic)."""
    task, model, criterion = build_training_objects(
        toy_data, "--task", "distillation", "--teacher-path", teacher, "--criterion", "imitkd", *STUDENT,
        "--dropout", "0", "--max-update", "10", "--imitkd-beta-schedule", "constant", "--imitkd-beta", "0.3",
        "--imitkd-mix", mix, "--imitkd-target", target, "--imitkd-max-len-a", "1.5", "--imitkd-max-len-b", "4",
    )
    sample = first_batch(task, "train")
    model.train()
    results, n_groups = {}, []
    real = imitkd_module.length_groups

    def counted(lengths):
        out = real(lengths, min_saving=0.0)  # split whenever it saves anything: the toy batch is short
        n_groups.append(len(out))
        return out

    for name, groups in (("grouped", counted), ("whole", lambda lengths: [(None, int(lengths.max()))])):
        monkeypatch.setattr(imitkd_module, "length_groups", groups)
        torch.manual_seed(7)
        loss, size, log = criterion(model, sample)
        results[name] = (loss.item(), size, int(log["n_agree"]))
    assert n_groups == [2], "the test batch should be split in two"
    assert results["grouped"][1:] == results["whole"][1:]
    assert results["grouped"][0] == pytest.approx(results["whole"][0], rel=1e-5)


@pytest.mark.parametrize("flag,value", [("--imitkd-agree-low", "-0.1"), ("--imitkd-agree-high", "0"),
                                        ("--imitkd-agree-momentum", "1.0"), ("--imitkd-agree-low", "0.7")])
def test_bad_agreement_clock_options_are_named(toy_data, teacher, flag, value):
    with pytest.raises(ValueError, match="--imitkd-agree-"):
        build_training_objects(toy_data, "--task", "distillation", "--teacher-path", teacher, "--criterion",
                               "imitkd", *STUDENT, "--max-update", "10", "--imitkd-beta-clock", "agreement",
                               flag, value)


@pytest.mark.parametrize("mix", ["sequence", "token"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "atkd"])
def test_imitkd_full_with_another_divergence(toy_data, teacher, mix, divergence):
    """Every divergence on student prefixes: a finite loss with a gradient, the same positions scored."""
    task, model, criterion = build_training_objects(
        toy_data, "--task", "distillation", "--teacher-path", teacher, "--criterion", "imitkd", *STUDENT,
        "--max-update", "10", "--imitkd-beta-schedule", "constant", "--imitkd-beta", "0.5", "--imitkd-mix", mix,
        "--imitkd-target", "full", "--imitkd-sampling", "greedy", "--kd-divergence", divergence,
        "--imitkd-max-len-a", "1.5", "--imitkd-max-len-b", "4",
    )
    sample = first_batch(task, "train")
    model.train()
    torch.manual_seed(3)
    loss, size, log = criterion(model, sample)
    assert torch.isfinite(loss) and size == log["n_scored"] > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_divergence_needs_full_targets(toy_data, teacher):
    for extra in (["--kd-divergence", "jsd"], ["--kd-teacher-topk", "8"]):
        with pytest.raises(ValueError, match="--imitkd-target full"):
            build_training_objects(toy_data, "--task", "distillation", "--teacher-path", teacher, "--criterion",
                                   "imitkd", *STUDENT, "--max-update", "10", *extra)
    with pytest.raises(ValueError, match="does not apply to --kd-divergence atkd"):
        build_training_objects(toy_data, "--task", "distillation", "--teacher-path", teacher, "--criterion",
                               "imitkd", *STUDENT, "--max-update", "10", "--imitkd-target", "full",
                               "--kd-divergence", "atkd", "--kd-teacher-topk", "8")
