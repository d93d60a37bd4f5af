"""Checkpoints under torch's safe loading, and a student loaded where no teacher exists."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import COMMON_TRAIN, USER_DIR, fairseq_train, first_batch, read_json_log


def allowed_names():
    from fairseq_imitkd.repairs.checkpoint_loading import FAIRSEQ_CHECKPOINT_GLOBALS

    return {f"{g.__module__}.{g.__qualname__}" for g in FAIRSEQ_CHECKPOINT_GLOBALS}


# --- torch's safe loading -------------------------------------------------------------------------


def test_torch_load_needs_the_allow_list(word_kd_student, tmp_path):
    """Without the plugin, torch's default (weights_only) load refuses a fairseq checkpoint."""
    code = (
        "import sys, torch\n"
        "try:\n"
        "    torch.load(sys.argv[1])\n"
        "except Exception as e:\n"
        "    print('REFUSED', e)\n"
        "else:\n"
        "    print('LOADED')\n"
        "print('plugin imported:', any(m.startswith('fairseq_imitkd') for m in sys.modules))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(word_kd_student / "checkpoint_best.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("REFUSED"), proc.stdout[-3000:]
    assert "argparse.Namespace" in proc.stdout, proc.stdout[-3000:]
    assert "plugin imported: False" in proc.stdout, proc.stdout[-3000:]


def test_torch_load_with_the_plugin(word_kd_student, tmp_path):
    import fractions

    import fairseq_imitkd  # noqa: F401

    state = torch.load(word_kd_student / "checkpoint_best.pt")  # weights_only is torch's default
    assert state["cfg"]["task"]["_name"] == "distillation"
    assert "encoder.embed_tokens.weight" in state["model"]
    # the allow-list is a list, not a switch-off: any other global in a checkpoint is still refused
    torch.save({"model": {}, "extra": fractions.Fraction(1, 3)}, tmp_path / "foreign.pt")
    with pytest.raises(Exception, match="fractions.Fraction"):
        torch.load(tmp_path / "foreign.pt")


def unsafe_globals_without_any_allow_list(path) -> set:
    """What torch's safe loading would refuse in ``path`` with no globals allow-listed by anyone."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    finally:
        torch.serialization.add_safe_globals(saved)


def test_checkpoints_hold_only_allow_listed_globals(teacher, word_kd_student):
    import fairseq_imitkd  # noqa: F401

    allowed = allowed_names()
    last = word_kd_student / "checkpoint_last.pt"
    assert torch.load(last)["last_optimizer_state"]["state"], "checkpoint_last.pt holds Adam's state"
    for path in (teacher, last, word_kd_student / "checkpoint_best.pt"):
        found = unsafe_globals_without_any_allow_list(path)
        assert "argparse.Namespace" in found, (path, found)  # fairseq's, as the subprocess test shows
        assert found <= allowed, (path, found - allowed)
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []  # with the plugin


# --- a student with no teacher around -------------------------------------------------------------


def test_hub_style_loading_without_the_teacher(word_kd_student):
    from fairseq import checkpoint_utils
    from fairseq_imitkd.tasks.distillation import DistillationTask

    path = word_kd_student / "checkpoint_best.pt"
    recorded_teacher = torch.load(path)["cfg"]["task"]["teacher_path"]
    assert recorded_teacher and not os.path.exists(recorded_teacher)

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], task=None)
    assert isinstance(task, DistillationTask)
    assert task._teacher is None
    model = models[0].eval()

    generator = task.build_generator(models, cfg.generation)
    sample = first_batch(task, split="test", max_tokens=300)
    with torch.no_grad():
        hypos = task.inference_step(generator, models, sample)
    assert len(hypos) == sample["nsentences"] > 0
    eos = task.target_dictionary.eos()
    for beams in hypos:
        best = beams[0]["tokens"]
        assert best.numel() >= 1 and best[-1].item() == eos
        assert torch.isfinite(beams[0]["score"])
    assert task._teacher is None, "decoding must not load the teacher"
    assert not model.training


def test_ctranslate2_converts_the_student_without_its_teacher(word_kd_student, toy_data, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")

    path = word_kd_student / "checkpoint_best.pt"
    assert not os.path.exists(torch.load(path)["cfg"]["task"]["teacher_path"])
    out = tmp_path / "ct2"
    converter = ctranslate2.converters.FairseqConverter(str(path), str(toy_data), user_dir=USER_DIR)
    converter.convert(str(out))
    assert (out / "model.bin").is_file()

    translator = ctranslate2.Translator(str(out), device="cpu", inter_threads=1, intra_threads=1)
    result = translator.translate_batch([["s1", "s2", "s3"]], beam_size=2, max_decoding_length=20)
    hyp = result[0].hypotheses[0]
    vocabulary = {line.split()[0] for line in (toy_data / "dict.tgt.txt").read_text().splitlines()}
    assert hyp and set(hyp) <= vocabulary, hyp


# --- resuming a KD run --------------------------------------------------------------------------


def test_resume_loads_checkpoint_last_with_its_optimizer_state(toy_data, teacher, tmp_path, caplog):
    save = tmp_path / "save"
    save.mkdir()
    teacher_copy = tmp_path / "teacher.pt"
    shutil.copy(teacher, teacher_copy)
    args = [
        toy_data, "--task", "distillation", "--teacher-path", teacher_copy, "--criterion", "word_kd",
        "--arch", "transformer_student_tiny", "--share-all-embeddings", *COMMON_TRAIN,
        "--log-interval", "2", "--save-dir", save,
    ]
    fairseq_train(*args, "--max-update", "4", "--log-file", tmp_path / "log1.txt")
    first = torch.load(save / "checkpoint_last.pt")
    assert first["optimizer_history"][-1]["num_updates"] == 4
    assert {s["step"] for s in first["last_optimizer_state"]["state"].values()} == {4}

    caplog.clear()
    with caplog.at_level("INFO"):
        fairseq_train(*args, "--max-update", "8", "--log-file", tmp_path / "log2.txt")
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Loaded checkpoint")]
    assert loaded and "checkpoint_last.pt" in loaded[0] and "@ 4 updates" in loaded[0], loaded

    rows = read_json_log(tmp_path / "log2.txt", "train_inner")
    assert [int(r["num_updates"]) for r in rows] == [6, 8], rows  # continued from 4, not from 0
    last = torch.load(save / "checkpoint_last.pt")
    assert last["optimizer_history"][-1]["num_updates"] == 8
    # Adam's step counters continued from the saved state: 4 + 4, not 4 fresh steps
    assert {s["step"] for s in last["last_optimizer_state"]["state"].values()} == {8}
    assert not any("teacher" in k for k in last["model"])
