"""Half precision on CPU: ``--bf16`` students (fairseq's flag is repaired to not mean TPU) and fp32, fp16
and bf16 teachers, through every criterion and mixing mode. ``--fp16`` students need CUDA in fairseq:
the same checks run there in tests/test_cuda.py."""
import pytest
import torch

from half_precision import CRITERIA, TEACHER_DTYPES, check_teacher_step, train_a_few_updates


@pytest.mark.parametrize("teacher_dtype", list(TEACHER_DTYPES))
@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_bf16_student_trains(toy_data, teacher, tmp_path, criterion, teacher_dtype):
    rows = train_a_few_updates(toy_data, teacher, tmp_path, criterion, "bf16", teacher_dtype)
    state = torch.load(tmp_path / "checkpoint_last.pt", weights_only=False)
    # fairseq casts what it saves to float32 (utils.move_to_cpu), so the student loads anywhere
    assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float32}
    assert len(rows) == 3


@pytest.mark.parametrize("teacher_dtype", list(TEACHER_DTYPES))
@pytest.mark.parametrize("criterion", ["word_kd", "imitkd_full", "imitkd_token"])
def test_teacher_dtype_is_kept_frozen_and_apart(toy_data, teacher, criterion, teacher_dtype):
    check_teacher_step(toy_data, teacher, criterion, teacher_dtype, "cpu")


def test_bf16_repair_leaves_a_real_tpu_run_alone(monkeypatch):
    from omegaconf import OmegaConf

    from fairseq_imitkd.repairs import bf16_without_xla

    cfg = OmegaConf.create({"common": {"bf16": True, "tpu": True, "cpu": False}})
    monkeypatch.setattr(bf16_without_xla, "xla_available", lambda: True)
    assert not bf16_without_xla.repair_bf16_without_xla(cfg) and cfg.common.tpu
    monkeypatch.setattr(bf16_without_xla, "xla_available", lambda: False)
    assert bf16_without_xla.repair_bf16_without_xla(cfg) and not cfg.common.tpu
    cfg = OmegaConf.create({"common": {"bf16": False, "tpu": True, "cpu": False}})  # --tpu alone: untouched
    assert not bf16_without_xla.repair_bf16_without_xla(cfg) and cfg.common.tpu


def test_bf16_student_and_teacher_with_the_static_rollout_engine(toy_data, teacher, tmp_path):
    """The static engine computes the decoder step itself: in bfloat16 too (the exact one is CPU's default)."""
    train_a_few_updates(toy_data, teacher, tmp_path, "imitkd_token", "bf16", "bf16",
                        extra=["--imitkd-rollout-engine", "static"])
