"""A fairseq-train run killed with SIGKILL mid-epoch and started again with the same command continues as if
it had never stopped: the same batches, learning rate, β and losses at every update, and the same weights at
the end. Run as a user runs it: the real ``fairseq-train`` in a subprocess."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import COMMON_TRAIN, USER_DIR

STUDENT = ["--arch", "transformer_student_tiny", "--share-all-embeddings"]
MAX_UPDATE = 40
KILL_AFTER = 10  # logged updates before the kill; checkpoints every 3 updates: it resumes from update 9


def _command(data, teacher, save, criterion):
    kd = {"word_kd": ["--criterion", "word_kd", "--kd-alpha", "0.5", "--label-smoothing", "0.1"],
          # the agreement clock's state must come back from the checkpoint for β to continue
          "imitkd": ["--criterion", "imitkd", "--imitkd-target", "full", "--imitkd-sampling", "greedy",
                     "--imitkd-beta-clock", "agreement", "--imitkd-agree-low", "0.0", "--imitkd-agree-high", "0.5",
                     "--imitkd-agree-momentum", "0.5", "--imitkd-max-len-a", "1.5", "--imitkd-max-len-b", "4"]}
    return [sys.executable, "-m", "fairseq_cli.train", str(data), "--user-dir", USER_DIR, "--task", "distillation",
            "--teacher-path", str(teacher), *kd[criterion], *STUDENT, *COMMON_TRAIN,
            "--max-update", str(MAX_UPDATE), "--save-interval-updates", "3", "--keep-interval-updates", "1",
            "--log-interval", "1", "--save-dir", str(save), "--log-file", str(save / "log.txt")]


def _rows(log):
    """The last logged row of every update (a resumed run logs the updates after its checkpoint again)."""
    rows = {}
    for line in log.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "num_updates" in row and "loss" in row:
            rows[int(row["num_updates"])] = row
    return rows


def _run(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("criterion", ["word_kd", "imitkd"])
def test_a_killed_run_resumes_exactly(toy_data, teacher, tmp_path, criterion):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    _run(_command(toy_data, teacher, straight, criterion), env)

    cmd = _command(toy_data, teacher, killed, criterion)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (killed / "log.txt").exists() and max(_rows(killed / "log.txt"), default=0) >= KILL_AFTER:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(killed / "checkpoint_last.pt")  # it loads: not half-written
    saved = state["optimizer_history"][-1]["num_updates"]
    assert 0 < saved < MAX_UPDATE and state["extra_state"]["train_iterator"]["iterations_in_epoch"] > 0, \
        "the kill should land mid-epoch"

    _run(cmd, env)  # the same command again
    want, got = _rows(straight / "log.txt"), _rows(killed / "log.txt")
    assert sorted(got) == sorted(want) == list(range(1, MAX_UPDATE + 1))
    keys = ["loss", "lr"] + (["beta", "kd_agree"] if criterion == "imitkd" else ["nll_loss", "kd_loss"])
    for update in range(saved + 1, MAX_UPDATE + 1):
        assert {k: got[update][k] for k in keys} == {k: want[update][k] for k in keys}, update
    end_straight = torch.load(straight / "checkpoint_last.pt")["model"]
    end_resumed = torch.load(killed / "checkpoint_last.pt")["model"]
    assert all(torch.equal(end_straight[k], end_resumed[k]) for k in end_straight)
