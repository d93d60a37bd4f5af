"""``imitkd-user-dir`` and fairseq's ``--user-dir``, through real shells and console scripts.

fairseq imports a user dir under its folder's basename, so which copy of ``fairseq_imitkd`` a process
ends up with depends on sys.path, PYTHONPATH and the order of imports: only separate processes test it.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import fairseq_imitkd
from conftest import REPO, USER_DIR

TRAIN = (
    '--task distillation --teacher-path "$TEACHER" --criterion word_kd '
    "--arch transformer_student_tiny --share-all-embeddings --optimizer adam --lr 0.001 "
    "--max-tokens 2000 --cpu --seed 1 --num-workers 0 --no-progress-bar --max-update 2"
)


def bash(script: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **{k: str(v) for k, v in env.items()})
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=500
    )


@pytest.fixture(scope="module")
def console_script(tmp_path_factory) -> subprocess.CompletedProcess:
    """One run of ``imitkd-user-dir`` from outside the repository, with Python's import timings on stderr."""
    return bash("imitkd-user-dir", cwd=tmp_path_factory.mktemp("cwd"), PYTHONPROFILEIMPORTTIME=1)


def test_console_script_prints_the_imported_package(console_script):
    assert console_script.returncode == 0, console_script.stderr[-3000:]
    assert len(console_script.stdout.splitlines()) == 1, console_script.stdout  # it is used inside $(...)
    printed = Path(console_script.stdout.strip())
    assert (printed / "__init__.py").is_file()
    assert printed == Path(fairseq_imitkd.__file__).resolve().parent == Path(USER_DIR)


def test_console_script_imports_neither_fairseq_nor_torch(console_script):
    """As its docstring says: it runs in $(...) before every fairseq command, so it must be quick."""
    imported = {line.rsplit("|", 1)[-1].strip() for line in console_script.stderr.splitlines()
                if line.startswith("import time:")}
    assert "fairseq_imitkd_user_dir" in imported  # the timings were recorded
    heavy = sorted(m for m in imported if m.split(".")[0] in ("fairseq", "torch"))
    assert not heavy, f"imitkd-user-dir imported {len(heavy)} fairseq/torch modules, e.g. {heavy[:5]}"


def test_fairseq_train_from_outside_the_repository(toy_data, teacher, tmp_path):
    assert REPO not in tmp_path.parents
    proc = bash(
        f'set -e\nfairseq-train "$DATA" --user-dir "$(imitkd-user-dir)" {TRAIN} --save-dir ckpt',
        cwd=tmp_path, DATA=toy_data, TEACHER=teacher,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").is_file(), proc.stderr[-4000:]
    assert "done training" in proc.stdout, proc.stdout[-4000:]  # fairseq logs to stdout


def test_two_copies_of_the_package(toy_data, teacher, tmp_path):
    """A second copy first on PYTHONPATH (a stand-in for an installed one) next to the source checkout."""
    site = tmp_path / "site"
    copy = site / "fairseq_imitkd"
    shutil.copytree(USER_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    # a marker, to see on stderr which copy a process imported
    with open(copy / "__init__.py", "a") as f:
        f.write("\nimport sys as _sys\nprint('IMITKD-SITE-COPY', __file__, file=_sys.stderr)\n")
    work = tmp_path / "work"
    work.mkdir()

    proc = bash(
        "set -e\n"
        'USER_DIR="$(imitkd-user-dir)"\n'  # once: it is used twice below
        'echo "user-dir=$USER_DIR"\n'
        # (b) the repository's copy named explicitly, while the other copy is the importable one
        f'fairseq-train "$DATA" --user-dir "$REPO_COPY" {TRAIN} --save-dir ckpt 2> train.err\n'
        "echo trained\n"
        # (c) the importable copy decodes what the repository's copy trained
        'fairseq-generate "$DATA" --user-dir "$USER_DIR" --path ckpt/checkpoint_last.pt '
        "--gen-subset valid --beam 1 --batch-size 50 --required-batch-size-multiple 1 "
        "--max-len-a 0 --max-len-b 5 --cpu 2> generate.err\n",
        cwd=work, DATA=toy_data, TEACHER=teacher, REPO_COPY=USER_DIR, PYTHONPATH=site,
    )
    train_err = (work / "train.err").read_text() if (work / "train.err").exists() else ""
    generate_err = (work / "generate.err").read_text() if (work / "generate.err").exists() else ""
    assert proc.returncode == 0, (proc.stderr + train_err[-4000:] + generate_err[-4000:])

    # (a) the console script names the copy that Python imports
    assert f"user-dir={copy}\n" in proc.stdout, proc.stdout
    # (b) trained with the repository's copy, without "not globally unique" or the other copy sneaking in
    assert "trained" in proc.stdout
    assert (work / "ckpt" / "checkpoint_last.pt").is_file()
    assert "IMITKD-SITE-COPY" not in train_err and "not globally unique" not in train_err, train_err[-4000:]
    # (c) decoded with the site copy
    assert f"IMITKD-SITE-COPY {copy / '__init__.py'}" in generate_err, generate_err[-4000:]
    hyps = [line for line in proc.stdout.splitlines() if line.startswith("H-")]
    assert len(hyps) == 100, proc.stdout[-3000:]
