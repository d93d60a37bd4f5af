"""The CNN/DailyMail recipe (examples/cnndm) end to end in its smoke setting, on the shared CNN/DM sample.

Runs ``IMITKD_SMOKE=1 run_all.sh --local ../shared/data/cnndm_sample`` into a temporary work dir (about 2 to 3
minutes on 2 CPU cores) and checks what every step leaves behind. Skipped where the shared sample is absent.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "cnndm"
SAMPLE = REPO.parent / "shared" / "data" / "cnndm_sample"
METHODS = ("scratch", "word_kd", "seqkd", "imitkd")
PAIR = "article-summary"

pytestmark = pytest.mark.skipif(not (SAMPLE / "train.jsonl").is_file() or not (SAMPLE / "val.jsonl").is_file(),
                                reason=f"shared CNN/DM sample not found at {SAMPLE}")


def recipe_env(work: Path) -> dict:
    env = dict(os.environ, IMITKD_SMOKE="1", IMITKD_WORK=str(work), OMP_NUM_THREADS="1")
    # the fairseq-* and imitkd-* console scripts live beside this interpreter
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    for k in ("TEACHER", "TEACHER_DATA", "METHODS", "STUDENT_ARCH", "MAX_UPDATE", "TRAIN_EXTRA", "BEAMS", "GEN_ARGS"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    pytest.importorskip("rouge_score", reason="the recipe scores with rouge-score (pip install rouge-score)")
    pytest.importorskip("sentencepiece")
    work = tmp_path_factory.mktemp("cnndm_work")
    proc = subprocess.run(["bash", str(RECIPE / "run_all.sh"), "--local", str(SAMPLE)], cwd=str(work.parent),
                          env=recipe_env(work), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work, proc


def test_prepare_outputs(smoke_run):
    work, _ = smoke_run
    meta = json.loads((work / "text" / "meta.json").read_text())
    assert meta["test_is_valid"] is True  # the sample has no test.jsonl: val doubles as test
    assert meta["sizes"] == {"train": 300, "valid": 50, "test": 50}
    assert (work / "spm" / "spm.model").is_file()
    for split, n in (("train", 300), ("valid", 50), ("test", 50)):
        src = (work / "spm" / f"{split}.article").read_text().splitlines()
        tgt = (work / "spm" / f"{split}.summary").read_text().splitlines()
        assert len(src) == len(tgt) == n
        assert max(len(line.split()) for line in src) <= 200  # smoke truncation of sources
        assert max(len(line.split()) for line in tgt) <= 100
        for lang in ("article", "summary"):
            assert (work / "data-bin" / f"{split}.{PAIR}.{lang}.bin").is_file()
    # one joined dictionary
    assert (work / "data-bin" / "dict.article.txt").read_text() == (work / "data-bin" / "dict.summary.txt").read_text()


def test_training_outputs(smoke_run):
    work, _ = smoke_run
    for name in ("teacher",) + METHODS:
        assert (work / "checkpoints" / name / "checkpoint_best.pt").is_file(), name
        assert (work / "logs" / f"{name}.log").is_file(), name
    seqkd = work / "seqkd"
    assert (seqkd / "seqkd_manifest.json").is_file()
    assert (seqkd / f"train.{PAIR}.summary.bin").is_file()
    assert (seqkd / ".teacher").is_file()  # the cache stamp
    log = (work / "logs" / "imitkd.log").read_text()
    assert "--imitkd-beta-base 10" in log or "imitkd_beta_base=10" in log or "'imitkd_beta_base': 10" in log


def test_results_hold_rouge_for_every_method(smoke_run):
    work, proc = smoke_run
    rows = json.loads((work / "results" / "results.json").read_text())
    got = {(r["name"], r["beam"]): r for r in rows}
    for name in ("teacher",) + METHODS:
        for beam in (1, 4):
            r = got[(name, beam)]
            for m in ("rouge1", "rouge2", "rougeL"):
                assert isinstance(r[m], float) and 0.0 <= r[m] <= 100.0, (name, beam, m, r[m])
            assert r["documents"] == 50
            hyps = (work / "results" / name / f"beam{beam}" / "hyp.txt").read_text().splitlines()
            assert len(hyps) == 50
    tsv = (work / "results" / "results.tsv").read_text().splitlines()
    assert tsv[0].split("\t")[:5] == ["name", "beam", "rouge1", "rouge2", "rougeL"]
    assert len(tsv) == 1 + 2 * (1 + len(METHODS))
    assert "finished in" in proc.stderr


def test_unknown_method_is_refused(smoke_run):
    work, _ = smoke_run
    proc = subprocess.run(["bash", str(RECIPE / "distill.sh"), "no_such_method"], env=recipe_env(work),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unknown METHOD" in proc.stderr
