"""Bad teachers, dictionaries and flags fail fast, before any training, with a message naming the problem.

Every check here is reached the way fairseq-train reaches it: the command line is parsed, the task set
up, the student built, and the error comes from ``task.build_criterion``, before fairseq's trainer could
write a ``crash.pt``.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import USER_DIR, build_training_objects

STUDENT = ["--arch", "transformer_student_tiny", "--share-all-embeddings", "--cpu"]
DICTS = ("dict.src.txt", "dict.tgt.txt")


def kd_args(data, *extra):
    return [data, "--task", "distillation", "--criterion", "word_kd", *STUDENT, *extra]


def criterion_error(*args, exc=None) -> str:
    """The message of the error ``build_training_objects`` raises, checked to come from build_criterion."""
    from fairseq_imitkd.teacher import TeacherError

    with pytest.raises(exc or TeacherError) as info:
        build_training_objects(*args)
    assert any(entry.name == "build_criterion" for entry in info.traceback), info.traceback
    return str(info.value)


def copy_dicts(toy_data: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in DICTS:
        shutil.copy(toy_data / name, dest / name)
    return dest


def n_symbols(path: Path) -> int:
    from fairseq.data import Dictionary

    return len(Dictionary.load(str(path)))


def swap_lines(path: Path, i: int, j: int):
    """Swap two symbol lines of a dict file; return the two symbols (line i's first)."""
    lines = path.read_text().splitlines(keepends=True)
    lines[i], lines[j] = lines[j], lines[i]
    path.write_text("".join(lines))
    return lines[j].split()[0], lines[i].split()[0]


# --- the teacher file ---------------------------------------------------------------------------


def test_missing_teacher_file(toy_data, tmp_path):
    missing = tmp_path / "nowhere" / "teacher.pt"
    msg = criterion_error(*kd_args(toy_data, "--teacher-path", missing))
    assert str(missing) in msg and "no such file" in msg, msg


def test_kd_criterion_without_teacher_path(toy_data):
    msg = criterion_error(*kd_args(toy_data))
    assert "--teacher-path" in msg, msg


def test_the_student_task_alone_needs_no_teacher(toy_data):
    """The same command without a KD criterion builds fine: the teacher is only a KD criterion's need."""
    task, _, criterion = build_training_objects(toy_data, "--task", "distillation", *STUDENT)
    assert not getattr(criterion, "needs_teacher", False)
    assert task._teacher is None


# --- the teacher's dictionaries -------------------------------------------------------------------


def test_teacher_dictionary_of_another_size(toy_data, teacher, tmp_path):
    data = copy_dicts(toy_data, tmp_path / "teacher_data")
    n_task = n_symbols(toy_data / "dict.tgt.txt")
    with open(data / "dict.tgt.txt", "a") as f:
        f.write("extra0 1\nextra1 1\nextra2 1\n")
    msg = criterion_error(*kd_args(toy_data, "--teacher-path", teacher, "--teacher-data", data))
    assert "target dictionary mismatch" in msg, msg
    assert f"task ({n_task} symbols)" in msg and f"teacher ({n_task + 3} symbols" in msg, msg
    assert str(data) in msg, msg
    # the first difference is where the task's dictionary ends
    assert f"index {n_task}: task <end of dictionary>, teacher 'extra0'" in msg, msg


def test_teacher_dictionary_in_another_order(toy_data, teacher, tmp_path):
    from fairseq.data import Dictionary

    data = copy_dicts(toy_data, tmp_path / "teacher_data")
    first, second = swap_lines(data / "dict.tgt.txt", 2, 3)
    assert n_symbols(data / "dict.tgt.txt") == n_symbols(toy_data / "dict.tgt.txt")
    index = Dictionary().nspecial + 2
    msg = criterion_error(*kd_args(toy_data, "--teacher-path", teacher, "--teacher-data", data))
    assert "target dictionary mismatch" in msg, msg
    assert f"first difference at index {index}: task {first!r}, teacher {second!r}" in msg, msg


def test_teacher_dictionary_in_another_order_stops_fairseq_train(toy_data, teacher, tmp_path):
    """The same check through the real fairseq-train process: non-zero exit, the reason on stderr."""
    data = copy_dicts(toy_data, tmp_path / "teacher_data")
    swap_lines(data / "dict.src.txt", 0, 5)
    first, second = swap_lines(data / "dict.tgt.txt", 0, 5)
    save = tmp_path / "save"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.train", str(toy_data), "--user-dir", USER_DIR,
         "--task", "distillation", "--teacher-path", str(teacher), "--teacher-data", str(data),
         "--criterion", "word_kd", *STUDENT, "--optimizer", "adam", "--lr", "0.001", "--max-tokens", "2000",
         "--num-workers", "0", "--max-update", "2", "--save-dir", str(save), "--no-progress-bar"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode != 0, proc.stderr[-3000:]
    # one line, no traceback through fairseq's trainer
    assert proc.stderr.strip().splitlines()[-1].startswith("TeacherError: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    index = 4  # line 0 of a dict file is symbol 4: fairseq's <s>, <pad>, </s>, <unk> come first
    assert "source dictionary mismatch" in proc.stderr, proc.stderr[-3000:]
    assert f"first difference at index {index}: task {first!r}, teacher {second!r}" in proc.stderr, proc.stderr[-3000:]
    assert not list(save.glob("*.pt")), "no checkpoint may be written"
    # fairseq logs to stdout: the task was set up, but the run stopped before the criterion was logged
    assert "[tgt] dictionary: " in proc.stdout, proc.stdout[-3000:]
    assert "criterion: " not in proc.stdout and "loaded 100 examples" not in proc.stdout, proc.stdout[-3000:]


def test_teacher_data_without_dictionaries(toy_data, teacher, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dict.src.txt").write_text((toy_data / "dict.src.txt").read_text())  # one of the two only
    msg = criterion_error(*kd_args(toy_data, "--teacher-path", teacher, "--teacher-data", empty))
    assert "--teacher-data" in msg and str(empty) in msg and "dict.tgt.txt" in msg, msg


def test_default_teacher_data_falls_back_to_the_checkpoint_folder(toy_data, teacher, tmp_path):
    """No --teacher-data and a recorded data dir that is gone: an error asking for --teacher-data,
    until the dictionaries are put beside the checkpoint."""
    from fairseq_imitkd.teacher import Teacher, resolve_teacher_data

    alone = tmp_path / "shipped"
    alone.mkdir()
    state = torch.load(teacher, map_location="cpu")
    assert state["cfg"]["task"]["data"] == str(toy_data)
    state["cfg"]["task"]["data"] = "/nonexistent"
    torch.save(state, alone / "teacher.pt")
    del state

    args = kd_args(toy_data, "--teacher-path", alone / "teacher.pt")
    msg = criterion_error(*args)
    assert "--teacher-data" in msg and "/nonexistent" in msg and str(alone / "teacher.pt") in msg, msg

    copy_dicts(toy_data, alone)
    assert resolve_teacher_data(str(alone / "teacher.pt"), None, ("src", "tgt")) == str(alone)
    task, _, criterion = build_training_objects(*args)
    loaded = task.teacher(torch.device("cpu"))
    assert isinstance(loaded, Teacher) and len(loaded.models) == 1
    assert loaded.models[0].encoder.embed_tokens.weight.size(0) == len(task.source_dictionary)


def test_dictionaries_that_are_not_the_teachers_own(toy_data, teacher, tmp_path):
    """Student data and --teacher-data agree with each other, but not with the teacher's embeddings."""
    from fairseq.data import Dictionary
    from fairseq_imitkd.teacher import TeacherError, load_teacher

    big = copy_dicts(toy_data, tmp_path / "big")
    extra = "".join(f"new{i} 1\n" for i in range(8))
    for name in DICTS:
        with open(big / name, "a") as f:
            f.write(extra)
    rows = torch.load(teacher, map_location="cpu")["model"]["encoder.embed_tokens.weight"].size(0)
    symbols = n_symbols(big / "dict.src.txt")
    assert symbols == rows + 8
    expected = f"encoder.embed_tokens.weight has {rows} rows but its source dictionary has {symbols} symbols"

    big_dict = Dictionary.load(str(big / "dict.src.txt"))
    with pytest.raises(TeacherError) as info:
        load_teacher(str(teacher), str(big), "src", "tgt", big_dict, big_dict)
    assert expected in str(info.value) and str(teacher) in str(info.value), info.value

    # through the task: the dictionary comparison passes (same files), and the embedding rows are checked
    # with it, at build time, before fairseq could write a crash.pt at the first update
    # (a folder with dictionaries only: the task cannot infer the language pair from data files)
    msg = criterion_error(
        *kd_args(big, "--teacher-path", teacher, "--teacher-data", big, "--source-lang", "src", "--target-lang", "tgt")
    )
    assert expected in msg and f"the dictionaries in {big} (--teacher-data)" in msg, msg


def _teacher_recording(teacher: Path, folder: Path, data: str) -> Path:
    """A copy of the teacher in ``folder`` whose checkpoint records ``data`` as its data directory."""
    folder.mkdir(parents=True, exist_ok=True)
    state = torch.load(teacher, map_location="cpu")
    state["cfg"]["task"]["data"] = data
    torch.save(state, folder / "teacher.pt")
    return folder / "teacher.pt"


def test_a_relative_recorded_data_dir_never_resolves_against_the_current_directory(
        toy_data, teacher, tmp_path, monkeypatch, caplog):
    """The teacher records ``bin``; run from a folder whose ``bin`` is the student's data, the check would
    compare the student's dictionaries with themselves and pass a teacher whose symbols are swapped.
    ``bin`` is taken beside the checkpoint, and the log says which dictionaries were compared."""
    import logging

    work = tmp_path / "work"
    copy_dicts(toy_data, work / "bin")
    monkeypatch.chdir(work)
    path = _teacher_recording(teacher, tmp_path / "shipped", "bin")
    args = kd_args(toy_data, "--teacher-path", path)
    msg = criterion_error(*args)  # nothing beside the checkpoint: not the cwd's bin
    assert "cannot find the teacher's dictionaries" in msg and str(tmp_path / "shipped" / "bin") in msg, msg
    assert "--teacher-data" in msg, msg

    first, second = swap_lines(copy_dicts(toy_data, tmp_path / "shipped" / "bin") / "dict.tgt.txt", 2, 3)
    msg = criterion_error(*args)  # the teacher's own, swapped, dictionaries
    assert f"task {first!r}, teacher {second!r}" in msg and str(tmp_path / "shipped" / "bin") in msg, msg

    copy_dicts(toy_data, tmp_path / "shipped" / "bin")
    with caplog.at_level(logging.INFO, logger="fairseq_imitkd.teacher"):
        build_training_objects(*args)
    assert f"dictionaries {tmp_path / 'shipped' / 'bin'}/dict.{{src,tgt}}.txt" in caplog.text, caplog.text
    assert "recorded in the teacher checkpoint" in caplog.text, caplog.text


def test_a_mismatch_names_both_dictionary_files_and_where_the_teachers_came_from(toy_data, teacher, tmp_path):
    """No --teacher-data: the message must not blame it, and must say what was compared with what."""
    path = _teacher_recording(teacher, tmp_path / "shipped", "/nonexistent")
    first, second = swap_lines(copy_dicts(toy_data, tmp_path / "shipped") / "dict.src.txt", 0, 1)
    msg = criterion_error(*kd_args(toy_data, "--teacher-path", path))
    assert f"from {toy_data / 'dict.src.txt'}" in msg, msg
    assert f"from {tmp_path / 'shipped' / 'dict.src.txt'} (the teacher checkpoint's folder)" in msg, msg
    assert f"task {first!r}, teacher {second!r}" in msg and "given by --teacher-data" not in msg, msg

    # the student's data binarized with its own, bigger, dictionary, and the same files beside the teacher
    for name in DICTS:
        with open(tmp_path / "shipped" / name, "w") as f:
            f.write((toy_data / name).read_text() + "".join(f"new{i} 1\n" for i in range(3)))
    data = copy_dicts(tmp_path / "shipped", tmp_path / "own")
    msg = criterion_error(*kd_args(data, "--teacher-path", path, "--source-lang", "src", "--target-lang", "tgt"))
    assert f"the dictionaries in {tmp_path / 'shipped'} (the teacher checkpoint's folder)" in msg, msg
    assert "given by --teacher-data" not in msg, msg


# --- flags ----------------------------------------------------------------------------------------


def test_teacher_fp16_and_bf16_are_exclusive(toy_data, teacher):
    with pytest.raises(ValueError) as info:
        build_training_objects(*kd_args(toy_data, "--teacher-path", teacher, "--teacher-fp16", "--teacher-bf16"))
    assert "--teacher-fp16" in str(info.value) and "--teacher-bf16" in str(info.value), info.value


@pytest.mark.parametrize(
    "flag, value",
    [("--kd-alpha", "1.5"), ("--kd-alpha", "-0.1"), ("--kd-temperature", "0"), ("--label-smoothing", "1")],
)
def test_out_of_range_criterion_flags(toy_data, teacher, flag, value):
    msg = criterion_error(*kd_args(toy_data, "--teacher-path", teacher, flag, value), exc=ValueError)
    assert flag in msg and str(float(value)) in msg, msg


def test_kd_criterion_needs_the_distillation_task(toy_data):
    msg = criterion_error(toy_data, "--task", "translation", "--criterion", "word_kd", *STUDENT, exc=ValueError)
    assert "--task distillation" in msg and "--task translation" in msg, msg


# --- unreadable or unsafe teacher files -------------------------------------------------------------


class _Marker:
    """Unpickling this would create a file: the test checks safe loading never runs it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("kind", ["truncated", "text", "unsafe global"])
def test_a_teacher_file_that_is_no_readable_checkpoint_is_named(toy_data, teacher, tmp_path, kind):
    bad = tmp_path / "bad.pt"
    marker = tmp_path / "executed"
    if kind == "truncated":
        bad.write_bytes(Path(teacher).read_bytes()[:4096])
    elif kind == "text":
        bad.write_text("not a checkpoint\n")
    else:
        torch.save({"cfg": None, "model": {}, "payload": _Marker(str(marker))}, bad)
    msg = criterion_error(*kd_args(toy_data, "--teacher-path", bad, "--teacher-data", toy_data))
    assert str(bad) in msg and "\n" not in msg, msg
    if kind == "unsafe global":
        assert "safe loading refuses" in msg and "io.open" in msg, msg  # the global _Marker pickles
        assert not marker.exists(), "the pickled object must not be executed"
    else:
        assert "cannot be read" in msg and "truncated" in msg, msg


def test_a_split_whose_sides_differ_in_length_is_named(toy_data, tmp_path):
    """A seq-KD directory with fewer targets than sources (here: train's targets replaced by valid's)."""
    bad = tmp_path / "bad"
    shutil.copytree(toy_data, bad)
    for ext in ("bin", "idx"):
        shutil.copy(toy_data / f"valid.src-tgt.tgt.{ext}", bad / f"train.src-tgt.tgt.{ext}")
    task, _, _ = build_training_objects(bad, "--task", "distillation", *STUDENT)
    with pytest.raises(ValueError, match=r"split 'train' of .*: 2000 source sentences \(src\) but 100 targets"):
        task.load_dataset("train")


def test_a_data_dir_without_the_split_is_one_line(toy_data, tmp_path):
    """fairseq's own FileNotFoundError traceback, named in one line with the splits that are there; through
    the real fairseq-train (which loads the valid split before anything else)."""
    data = tmp_path / "no_valid"
    data.mkdir()
    for f in toy_data.iterdir():
        if not f.name.startswith("valid."):
            shutil.copy(f, data / f.name)
    task, _, _ = build_training_objects(data, "--task", "distillation", *STUDENT)
    with pytest.raises(ValueError, match=r"split 'valid' not found in .*no_valid.*splits there: test, train\)"):
        task.load_dataset("valid")
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.train", str(data), "--user-dir", USER_DIR, "--task", "distillation",
         *STUDENT, "--optimizer", "adam", "--lr", "0.001", "--max-tokens", "2000", "--num-workers", "0",
         "--max-update", "1", "--save-dir", str(tmp_path / "save"), "--no-progress-bar"],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImitKDError: split 'valid' not found") and "--valid-subset" in last, last


@pytest.mark.parametrize("exists", [True, False])
def test_a_teacher_path_that_no_criterion_uses(toy_data, teacher, tmp_path, exists, caplog):
    """label_smoothed_cross_entropy uses no teacher: a file that does not exist is refused, one that does
    is named unused in one warning."""
    import logging

    path = teacher if exists else tmp_path / "nowhere.pt"
    args = [toy_data, "--task", "distillation", "--teacher-path", path, *STUDENT,
            "--criterion", "label_smoothed_cross_entropy"]
    if not exists:
        msg = criterion_error(*args)
        assert "no such file" in msg and str(path) in msg, msg
        return
    with caplog.at_level(logging.WARNING):
        task, _, _ = build_training_objects(*args)
    warned = [r.getMessage() for r in caplog.records if "unused" in r.getMessage()]
    assert warned == [f"--teacher-path {path} is unused: criterion label_smoothed_cross_entropy uses no teacher"]
    assert task._teacher is None


# --- a student whose dictionaries do not match the data ---------------------------------------------


def _other_vocabulary(tmp_path: Path, joined: bool) -> Path:
    """A toy corpus whose dictionaries differ from the toy data's: other symbols, or one per side."""
    from conftest import fairseq_preprocess

    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(5)) for i in range(60)]
    for split in ("train", "valid"):
        (raw / f"{split}.src").write_text("".join(r + "\n" for r in rows))
        (raw / f"{split}.tgt").write_text("".join(r.upper() + "\n" for r in rows))
    out = tmp_path / "bin"
    fairseq_preprocess("--source-lang", "src", "--target-lang", "tgt", "--trainpref", raw / "train",
                       "--validpref", raw / "valid", "--destdir", out, "--workers", "1",
                       *(["--joined-dictionary"] if joined else []))
    return out


def test_a_student_sharing_embeddings_over_two_dictionaries_is_named(tmp_path):
    """fairseq's own check, kept: its message says what is wrong and which flag asks for it."""
    data = _other_vocabulary(tmp_path, joined=False)
    with pytest.raises(ValueError, match="--share-all-embeddings requires a joined dictionary"):
        build_training_objects(data, "--task", "translation", *STUDENT)


def test_continuing_a_student_on_data_of_another_dictionary_is_named(word_kd_student, toy_data, tmp_path):
    """fairseq alone says only "please ensure that the architectures match"; the task names the dictionaries."""
    from conftest import COMMON_TRAIN, fairseq_train

    data = _other_vocabulary(tmp_path, joined=True)
    start = word_kd_student / "checkpoint_best.pt"
    with pytest.raises(ValueError) as info:
        fairseq_train(data, "--task", "distillation", "--criterion", "cross_entropy", *STUDENT, *COMMON_TRAIN,
                      "--finetune-from-model", start, "--max-update", "1", "--save-dir", tmp_path / "save")
    from fairseq.data import Dictionary

    trained, here = (len(Dictionary.load(str(d / "dict.src.txt"))) for d in (toy_data, data))
    msg = str(info.value)
    assert str(start) in msg and f"source dictionary of {trained} symbols, but {data} has {here}" in msg, msg
    assert not list((tmp_path / "save").glob("*.pt"))


def test_a_student_checkpoint_records_its_dictionaries(word_kd_student, toy_data, tmp_path):
    """Same size, another order: only the fingerprints the task saves can tell."""
    from conftest import COMMON_TRAIN, fairseq_train

    state = torch.load(word_kd_student / "checkpoint_best.pt")
    assert state["task_state"]["dictionaries"]["src"]["size"] == len(torch.load(word_kd_student / "checkpoint_best.pt")
                                                                      ["model"]["encoder.embed_tokens.weight"])
    data = tmp_path / "reordered"
    shutil.copytree(toy_data, data)
    for name in DICTS:  # the joined dictionary, reordered on both sides
        swap_lines(data / name, 0, 5)
    with pytest.raises(ValueError, match=r"another source dictionary than .*\(the same size"):
        fairseq_train(data, "--task", "distillation", "--criterion", "cross_entropy", *STUDENT, *COMMON_TRAIN,
                      "--finetune-from-model", word_kd_student / "checkpoint_best.pt", "--max-update", "1",
                      "--save-dir", tmp_path / "save")
