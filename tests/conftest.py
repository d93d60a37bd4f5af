"""Shared fixtures: tiny data made here, a tiny teacher trained once per session with fairseq-train.

Every fairseq CLI is driven in-process through its real ``main`` (argument parsing included) with
the same absolute ``--user-dir``; a few tests use subprocesses where the process boundary is what is
being tested (console scripts, import paths).
"""
import contextlib
import io
import json
import logging
import os
import random
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_imitkd")

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); `pytest -m cuda` runs them")

logging.getLogger().setLevel(logging.INFO)  # fairseq's --log-file records INFO lines (train_inner, valid)

# A toy "translation": the target copies the source through a fixed symbol map, then reverses it.
VOCAB = [f"s{i}" for i in range(24)]
TGT_MAP = {w: VOCAB[(i * 5 + 3) % len(VOCAB)] for i, w in enumerate(VOCAB)}


def toy_pair(rng: random.Random):
    src = [rng.choice(VOCAB) for _ in range(rng.randint(3, 10))]
    return " ".join(src), " ".join(TGT_MAP[w] for w in reversed(src))


def write_split(directory: Path, split: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    pairs = [toy_pair(rng) for _ in range(n)]
    (directory / f"{split}.src").write_text("".join(s + "\n" for s, _ in pairs))
    (directory / f"{split}.tgt").write_text("".join(t + "\n" for _, t in pairs))


def fairseq_preprocess(*args) -> None:
    from fairseq import options
    from fairseq_cli import preprocess

    parser = options.get_preprocessing_parser()
    preprocess.main(parser.parse_args([str(a) for a in args]))


def _all_loggers():
    return [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]


def fairseq_train(*args) -> None:
    from fairseq import checkpoint_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    from fairseq_imitkd.repairs.call_main import main_then_stop_prefetch
    from fairseq_imitkd.repairs import apply_to_config

    # fairseq keeps the best validation score on a function attribute; in one process it would leak
    # from one training run into the next and stop checkpoint_best.pt from being written.
    if hasattr(checkpoint_utils.save_checkpoint, "best"):
        del checkpoint_utils.save_checkpoint.best
    parser = options.get_training_parser()
    parsed = options.parse_args_and_arch(parser, ["--user-dir", USER_DIR, *[str(a) for a in args]])
    cfg = convert_namespace_to_omegaconf(parsed)
    apply_to_config(cfg)  # as the plugin's call_main does
    before = {id(lg): list(lg.handlers) for lg in _all_loggers()}
    try:
        # as fairseq-train runs it with the plugin (calling train.main here skips call_main)
        main_then_stop_prefetch(train.main, cfg)
    finally:
        # fairseq adds a --log-file handler per run (and per epoch) and never removes it: in one process,
        # later runs would keep writing into this run's log
        for lg in _all_loggers():
            for handler in list(lg.handlers):
                if isinstance(handler, logging.FileHandler) and handler not in before.get(id(lg), []):
                    lg.removeHandler(handler)
                    handler.close()


def fairseq_generate(data, *args):
    """Run fairseq-generate; return its hypotheses ``{sample id: text}`` and the printed BLEU line."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import generate

    parser = options.get_generation_parser()
    # in-process, the default data-loader worker costs ~5 s to shut down after each call
    parsed = options.parse_args_and_arch(
        parser, [str(data), "--user-dir", USER_DIR, "--num-workers", "0", *[str(a) for a in args]]
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        generate.main(convert_namespace_to_omegaconf(parsed))
    hyps = {}
    for line in out.getvalue().splitlines():
        if line.startswith("H-"):
            key, _score, text = line.split("\t")
            hyps[int(key[2:])] = text
    return hyps, out.getvalue()


def read_json_log(path: Path, tag: str):
    """Rows of a ``--log-format json --log-file`` log: ``train_inner`` rows, or the ``valid``/``train``
    epoch summaries with their ``valid_``/``train_`` key prefix removed."""
    rows = []
    # fairseq adds a file handler per epoch and never removes it, so later lines repeat: keep each once
    for line in dict.fromkeys(path.read_text().splitlines()):
        try:
            row = json.loads(line)
        except ValueError:  # fairseq's plain log lines (config dumps, messages)
            continue
        if not isinstance(row, dict):
            continue
        if tag == "train_inner" and "loss" in row:
            rows.append(row)
        elif f"{tag}_loss" in row:
            rows.append({k[len(tag) + 1:]: v for k, v in row.items() if k.startswith(tag + "_")})
    return rows


TEACHER_ARCH = [
    "--arch", "transformer", "--share-all-embeddings",
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
    "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]

COMMON_TRAIN = [
    "--optimizer", "adam", "--lr", "0.005", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "50",
    "--max-tokens", "2000", "--cpu", "--seed", "1", "--num-workers", "0",
    "--no-epoch-checkpoints", "--no-progress-bar", "--log-format", "json",
    "--dropout", "0.1",
]


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """A binarized toy corpus with one joined dictionary: ``data/bin`` (train 2000, valid/test 100)."""
    root = tmp_path_factory.mktemp("toy")
    raw = root / "raw"
    raw.mkdir()
    write_split(raw, "train", 2000, seed=1)
    write_split(raw, "valid", 100, seed=2)
    write_split(raw, "test", 100, seed=3)
    fairseq_preprocess(
        "--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
        "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
        "--destdir", root / "bin", "--workers", "1",
    )
    return root / "bin"


@pytest.fixture(scope="session")
def teacher(toy_data, tmp_path_factory) -> Path:
    """A tiny teacher trained with the real fairseq-train on the toy data; returns its checkpoint."""
    save = tmp_path_factory.mktemp("teacher")
    fairseq_train(
        toy_data, *TEACHER_ARCH, *COMMON_TRAIN,
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--max-update", "400", "--save-dir", save, "--log-file", save / "log.txt",
        "--no-last-checkpoints", "--no-save-optimizer-state",
    )
    return save / "checkpoint_best.pt"


def build_training_objects(*args):
    """Parse a fairseq-train command line and build (task, model, criterion) the way fairseq-train does."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    parsed = options.parse_args_and_arch(parser, ["--user-dir", USER_DIR, *[str(a) for a in args]])
    cfg = convert_namespace_to_omegaconf(parsed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return task, model, criterion


def first_batch(task, split="valid", max_tokens=2000):
    task.load_dataset(split)
    itr = task.get_batch_iterator(task.dataset(split), max_tokens=max_tokens, seed=1).next_epoch_itr(shuffle=False)
    return next(iter(itr))


@pytest.fixture(scope="session")
def word_kd_student(toy_data, teacher, tmp_path_factory) -> Path:
    """A student trained with word_kd through fairseq-train; its teacher file is deleted afterwards,
    so every test using it also checks that a student is usable with no teacher around."""
    import shutil

    save = tmp_path_factory.mktemp("word_kd_student")
    teacher_copy = save / "teacher.pt"
    shutil.copy(teacher, teacher_copy)
    fairseq_train(
        toy_data, "--task", "distillation", "--teacher-path", teacher_copy,
        "--criterion", "word_kd", "--kd-alpha", "0.5", "--kd-temperature", "1", "--label-smoothing", "0.1",
        "--arch", "transformer_student_tiny", "--share-all-embeddings", *COMMON_TRAIN,
        "--max-update", "80", "--log-interval", "10", "--save-dir", save, "--log-file", save / "log.txt",
    )
    teacher_copy.unlink()
    return save
