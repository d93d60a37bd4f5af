"""Multi-process training with fairseq's DDP on CPU, as users start it: ``torchrun`` with gloo and
``legacy_ddp``, two ranks, the real ``fairseq-train`` (``ddp_probe.py`` records what each rank did)."""
import json
import os
import socket
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import COMMON_TRAIN, REPO, USER_DIR
from fairseq_imitkd.repairs import cpu_launch

PROBE = str(REPO / "tests" / "ddp_probe.py")
STUDENT = ["--arch", "transformer_student_tiny", "--share-all-embeddings"]
CPU_DDP = ["--ddp-backend", "legacy_ddp", "--distributed-backend", "gloo"]
CRITERIA = {
    "word_kd": ["--criterion", "word_kd", "--kd-alpha", "0.5", "--label-smoothing", "0.1"],
    # sequence mixing; the agreement clock moves β from the all-reduced agreement of both ranks
    "imitkd": ["--criterion", "imitkd", "--imitkd-target", "full", "--imitkd-sampling", "greedy",
               "--imitkd-beta-clock", "agreement", "--imitkd-agree-low", "0.0", "--imitkd-agree-high", "0.5",
               "--imitkd-agree-momentum", "0.5", "--imitkd-max-len-a", "1.5", "--imitkd-max-len-b", "4"],
    # every row rolled out from the first update (for the first-update comparison)
    "imitkd_beta0": ["--criterion", "imitkd", "--imitkd-target", "full", "--imitkd-sampling", "greedy",
                     "--imitkd-beta-schedule", "constant", "--imitkd-beta", "0", "--imitkd-max-len-a", "1.5",
                     "--imitkd-max-len-b", "4"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(data, teacher, out, criterion, ranks, max_update, extra=()):
    """Run the probe (``ranks`` processes under torchrun, or one plain process); return each rank's record."""
    out.mkdir()
    args = [str(data), "--user-dir", USER_DIR, "--task", "distillation", "--teacher-path", str(teacher),
            *CRITERIA[criterion], *STUDENT, *COMMON_TRAIN, "--dropout", "0", "--max-tokens", "1000",
            "--max-update", str(max_update), "--log-interval", "1", "--save-dir", str(out / "save"),
            "--no-save", *extra]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), PROBE, *args, *CPU_DDP]
    else:
        cmd = [sys.executable, PROBE, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", IMITKD_PROBE_DIR=str(out))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.parametrize("criterion", ["word_kd", "imitkd"])
def test_two_ranks_train_one_model(toy_data, teacher, tmp_path, criterion):
    ranks = _train(toy_data, teacher, tmp_path / "run", criterion, ranks=2, max_update=6)
    assert [r["teacher_loads"] for r in ranks] == [1, 1]  # once per rank, never per update
    for step0, step1 in zip(*(r["updates"] for r in ranks)):
        assert step0["update"] == step1["update"]
        # each rank trains on its own shard of the global batch
        assert step0["ids"] and step1["ids"] and not set(step0["ids"]) & set(step1["ids"])
        # identical replicas after every update
        assert step0["params_sha"] == step1["params_sha"], step0["update"]
        if criterion == "imitkd":
            # the probe reads β back as beta_x_sents / nsentences, which rounds differently for the two
            # ranks' sentence counts: equal to 12 digits is the same β
            beta0, beta1 = ([round(b, 12) for b in step["beta"]] for step in (step0, step1))
            assert beta0 == beta1 and len(set(beta0)) == 1, (step0["update"], step0["beta"], step1["beta"])
            for step in (step0, step1):  # rollouts only of this rank's own sentences
                assert all(row in step["sources"] for row in step["rolled"])
    assert len(ranks[0]["updates"]) == 6
    if criterion == "imitkd":
        betas = [u["beta"][0] for u in ranks[0]["updates"]]
        assert betas[0] == 1.0 and min(betas) < 1.0, betas  # the clock moved, the same on both ranks
        assert all(sum(len(u["rolled"]) for u in r["updates"]) > 0 for r in ranks)


@pytest.mark.parametrize("criterion", ["word_kd", "imitkd_beta0"])
def test_two_ranks_match_one_rank_on_the_same_global_batch(toy_data, teacher, tmp_path, criterion):
    """Two ranks of one batch each against one rank accumulating the same two batches (--update-freq 2).
    Same weights, same sentences, dropout off, greedy rollouts: the per-sentence sums are the same float32
    operations, and only the order in which the two halves are added differs, so the first update's loss
    agrees to float32 rounding (relative 1e-5 leaves a wide margin over a few ulps)."""
    two = _train(toy_data, teacher, tmp_path / "two", criterion, ranks=2, max_update=1)
    one = _train(toy_data, teacher, tmp_path / "one", criterion, ranks=1, max_update=1,
                 extra=["--update-freq", "2"])
    two_steps = [r["updates"][0] for r in two]
    one_step = one[0]["updates"][0]
    assert sorted(two_steps[0]["ids"] + two_steps[1]["ids"]) == sorted(one_step["ids"])
    if criterion == "imitkd_beta0":
        assert sum(len(s["rolled"]) for s in two_steps) == len(one_step["rolled"]) == len(one_step["ids"])
    loss_two = sum(m[0] for s in two_steps for m in s["micro"]) / sum(m[1] for s in two_steps for m in s["micro"])
    loss_one = sum(m[0] for m in one_step["micro"]) / sum(m[1] for m in one_step["micro"])
    assert loss_two == pytest.approx(loss_one, rel=1e-5)


@pytest.mark.parametrize("criterion", ["word_kd", "imitkd"])
def test_two_nodes_of_one_process_each_train_one_model(toy_data, teacher, tmp_path, criterion):
    """README's several-machines route, ``torchrun --nnodes 2 --node_rank R``, as two nodes on localhost of one
    CPU process each over gloo: both ranks hold identical parameters after every update."""
    out = tmp_path / "run"
    out.mkdir()
    args = [str(toy_data), "--user-dir", USER_DIR, "--task", "distillation", "--teacher-path", str(teacher),
            *CRITERIA[criterion], *STUDENT, *COMMON_TRAIN, "--dropout", "0", "--max-tokens", "1000",
            "--max-update", "3", "--log-interval", "1", "--save-dir", str(out / "save"), "--no-save", *CPU_DDP]
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", IMITKD_PROBE_DIR=str(out))
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                               str(port), PROBE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
             for node in (0, 1)]
    try:
        results = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (_, err) in zip(nodes, results):
        assert node.returncode == 0, err[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and [r["teacher_loads"] for r in ranks] == [1, 1]
    assert len(ranks[0]["updates"]) == len(ranks[1]["updates"]) == 3
    for step0, step1 in zip(*(r["updates"] for r in ranks)):
        assert step0["update"] == step1["update"]
        assert step0["ids"] and step1["ids"] and not set(step0["ids"]) & set(step1["ids"])  # one shard per node
        assert step0["params_sha"] == step1["params_sha"], step0["update"]


def _cfg(**dt):
    base = dict(distributed_world_size=1, distributed_init_method=None, distributed_no_spawn=False,
                distributed_rank=0, device_id=0, ddp_backend="pytorch_ddp", distributed_backend="nccl")
    return OmegaConf.create({"common": {"cpu": True}, "distributed_training": {**base, **dt}})


TORCHRUN = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}


@pytest.mark.parametrize("settings, env, words", [
    (dict(distributed_world_size=2), {}, "one process per GPU"),
    (dict(distributed_world_size=2, distributed_init_method="tcp://localhost:1"), {}, "train nothing"),
    (dict(), TORCHRUN, "--ddp-backend legacy_ddp"),
    (dict(ddp_backend="legacy_ddp"), TORCHRUN, "--distributed-backend gloo"),
])
def test_cpu_launches_that_cannot_work_are_refused(settings, env, words):
    with pytest.raises(cpu_launch.LaunchError, match="torchrun") as e:
        cpu_launch.check_launch(_cfg(**settings), env=env, cuda_devices=0)
    assert words in str(e.value)


def test_torchrun_on_cpu_takes_rank_and_world_size_from_its_environment():
    cfg = _cfg(ddp_backend="legacy_ddp", distributed_backend="gloo")
    cpu_launch.check_launch(cfg, env=TORCHRUN, cuda_devices=0)
    dt = cfg.distributed_training
    assert (dt.distributed_rank, dt.distributed_world_size, dt.distributed_init_method, dt.distributed_no_spawn) \
        == (1, 2, "env://", True)
    single = _cfg()
    cpu_launch.check_launch(single, env={}, cuda_devices=0)  # one process: untouched
    assert single.distributed_training.distributed_init_method is None
    gpus = _cfg(distributed_world_size=2)
    gpus.common.cpu = False
    cpu_launch.check_launch(gpus, env={}, cuda_devices=2)  # GPUs: fairseq's own launcher
    assert gpus.distributed_training.distributed_init_method is None


def test_fairseq_train_refuses_a_cpu_launch_in_one_line(toy_data, teacher, tmp_path):
    """What fairseq alone does here is exit 0 having trained nothing."""
    save = tmp_path / "save"
    cmd = [sys.executable, "-m", "fairseq_cli.train", str(toy_data), "--user-dir", USER_DIR, "--task",
           "distillation", "--teacher-path", str(teacher), *CRITERIA["word_kd"], *STUDENT, *COMMON_TRAIN,
           "--max-update", "2", "--save-dir", str(save), "--distributed-world-size", "2",
           "--distributed-init-method", "tcp://localhost:1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("LaunchError: ") and "torchrun" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not save.exists() or not any(save.iterdir())
