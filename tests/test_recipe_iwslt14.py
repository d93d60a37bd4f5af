"""The IWSLT14 De-En recipe (examples/iwslt14_de_en) end to end in its smoke setting, on the shared sample.

``IMITKD_SMOKE=1 run_all.sh --local ../shared/data/iwslt14_sample`` runs into a temporary work dir (about 3
minutes on 2 CPU cores): prepare, a tiny teacher, all 8 distillation methods, evaluation. The tests check what
every step leaves behind, that reruns reuse it, the scripts' argument errors, and (without fairseq) the
preprocessing of the original IWSLT14 release on a fabricated miniature of it.
Skipped only where the shared sample is absent.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "iwslt14_de_en"
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "iwslt14_sample"
METHODS = ("scratch", "word_kd", "seqkd", "seqkd_wordkd", "seqinter", "imitkd", "imitkd_full", "imitkd_star")
PAIR = "de-en"

needs_sample = pytest.mark.skipif(not (SAMPLE / "train.de").is_file(), reason=f"shared IWSLT14 sample not at {SAMPLE}")


def recipe_env(work: Path) -> dict:
    env = dict(os.environ, IMITKD_SMOKE="1", IMITKD_WORK=str(work), OMP_NUM_THREADS="1")
    # the fairseq-* and imitkd-* console scripts live beside this interpreter
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    for k in ("TEACHER", "TEACHER_DATA", "TEACHER_ARCH", "METHODS", "MAX_UPDATE", "TEACHER_MAX_UPDATE", "SEQKD_BEAM",
              "SEQINTER_NBEST", "SEQKD_ARGS"):
        env.pop(k, None)
    return env


def run_script(work: Path, script: str, *args, timeout=900):
    return subprocess.run(["bash", str(RECIPE / script), *[str(a) for a in args]], cwd=str(REPO),
                          env=recipe_env(work), capture_output=True, text=True, timeout=timeout)


def test_sacremoses_installed():
    # the recipe's tokenizer/detokenizer; a missing one must fail the suite, not skip the recipe's tests
    import sacremoses  # noqa: F401


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    if not (SAMPLE / "train.de").is_file():
        pytest.skip(f"shared IWSLT14 sample not at {SAMPLE}")
    work = tmp_path_factory.mktemp("iwslt14_work")
    proc = run_script(work, "run_all.sh", "--local", SAMPLE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return work, proc


@needs_sample
def test_prepare_outputs(smoke_run):
    work, _ = smoke_run
    meta = json.loads((work / "text" / "meta.json").read_text())
    assert meta["lines"] == {"train": 1000, "valid": 200, "test": 200}
    assert meta["test_references"].startswith("detokenized")
    # the sample has no test split: valid's lines alternate between valid (selects checkpoints) and test
    orig = (SAMPLE / "valid.en").read_text(encoding="utf-8").splitlines()
    assert (work / "text" / "valid.en").read_text(encoding="utf-8").splitlines() == orig[0::2][:200]
    assert (work / "text" / "test.en").read_text(encoding="utf-8").splitlines() == orig[1::2][:200]
    refs = (work / "text" / "test.raw.en").read_text().splitlines()
    assert len(refs) == 200 and not any("&apos;" in r for r in refs)  # detokenized references
    assert (work / "spm" / "spm.model").is_file()
    assert (work / "data-bin" / "dict.de.txt").read_text() == (work / "data-bin" / "dict.en.txt").read_text()
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            assert (work / "data-bin" / f"{split}.{PAIR}.{lang}.bin").is_file()


@needs_sample
def test_teacher_and_students(smoke_run):
    work, _ = smoke_run
    assert (work / "checkpoints" / "teacher" / "checkpoint_best.pt").is_file()
    for m in METHODS:
        assert (work / "checkpoints" / m / "checkpoint_best.pt").is_file(), m
        assert (work / "logs" / f"distill_{m}.log").is_file(), m
    log = (work / "logs" / "distill_imitkd_full.log").read_text()
    assert "--imitkd-target full" in log and "--imitkd-sampling greedy" in log and "transformer_student_tiny" in log
    assert "--imitkd-beta-base 200" in log


@needs_sample
def test_seqkd_corpora(smoke_run):
    work, _ = smoke_run
    for name, select in (("seqkd_beam2", "top"), ("seqinter_beam2_nbest2", "sentence-bleu")):
        corpus = work / "seqkd" / name
        stats = json.loads((corpus / "seqkd_stats.json").read_text())
        assert stats["sentences"] == 1000 and stats["settings"]["select"] == select, name
        assert stats["settings"]["beam"] == 2
        for f in (f"train.{PAIR}.de.bin", f"train.{PAIR}.en.bin", f"valid.{PAIR}.en.bin", "dict.en.txt"):
            assert (corpus / f).is_file(), (name, f)
    # seqkd_wordkd and imitkd_star reused the Seq-KD corpus that seqkd built
    for m in ("seqkd_wordkd", "imitkd_star"):
        log = (work / "logs" / f"distill_{m}.log").read_text()
        assert str(work / "seqkd" / "seqkd_beam2") in log, m


@needs_sample
def test_results(smoke_run):
    work, proc = smoke_run
    results = json.loads((work / "results" / "results.json").read_text())
    assert set(results["systems"]) == {"teacher", *METHODS}
    for name, entry in results["systems"].items():
        assert entry["parameters"] > 0
        for beam in ("1", "5"):
            r = entry["beams"][beam]
            assert r["sentences"] == 200, (name, beam)  # nothing dropped (--required-batch-size-multiple 1)
            assert isinstance(r["tokenized_bleu"], float) and isinstance(r["sacrebleu"], float)
            assert r["sentences_per_second"] > 0 and r["speedup_vs_teacher"] > 0
            assert "--required-batch-size-multiple 1" in r["command"] and f"--beam {beam}" in r["command"]
            assert r["sacrebleu_signature"].startswith("nrefs:1|case:lc")
            assert "Translated 200 sentences" in r["translated_line"]
            assert len(Path(r["detokenized_output"]).read_text().splitlines()) == 200
    assert results["systems"]["teacher"]["beams"]["5"]["speedup_vs_teacher"] == 1.0
    tsv = (work / "results" / "results.tsv").read_text().splitlines()
    assert tsv[0].split("\t")[:4] == ["system", "params", "bleu_tok_b1", "sacrebleu_b1"]
    assert len(tsv) == 1 + 1 + len(METHODS)
    assert "sacreBLEU signature: nrefs:1|case:lc" in proc.stdout


@needs_sample
def test_rerun_reuses_everything(smoke_run):
    work, _ = smoke_run
    proc = run_script(work, "prepare.sh", "--local", SAMPLE)
    assert proc.returncode == 0 and "nothing to do" in proc.stderr, proc.stderr[-2000:]
    # other options on the same work dir: refused, not mixed
    proc = run_script(work, "prepare.sh", "--local", SAMPLE, "--vocab", "500")
    assert proc.returncode == 1 and "prepared with other options" in proc.stderr
    proc = run_script(work, "distill.sh", "seqkd")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already built with these settings, reused" in proc.stderr and "already trained" in proc.stderr
    assert "+ fairseq-train" not in proc.stderr and "+ imitkd-seqkd" not in proc.stderr


def test_argument_errors(tmp_path):
    proc = run_script(tmp_path, "distill.sh", "nonsense")
    assert proc.returncode == 2 and "unknown method: nonsense" in proc.stderr and "usage:" in proc.stderr
    proc = run_script(tmp_path, "distill.sh")
    assert proc.returncode == 2 and "usage:" in proc.stderr
    proc = run_script(tmp_path, "distill.sh", "scratch")
    assert proc.returncode == 1 and "run prepare.sh first" in proc.stderr
    proc = run_script(tmp_path, "prepare.sh", "--local", tmp_path / "missing")
    assert proc.returncode == 1 and "no such file or folder" in proc.stderr
    proc = run_script(tmp_path, "prepare.sh", "--srcdict", __file__)
    assert proc.returncode == 1 and "need --spm" in proc.stderr
    proc = run_script(tmp_path, "prepare.sh", "--bogus")
    assert proc.returncode == 2 and "usage:" in proc.stderr
    proc = run_script(tmp_path, "evaluate.sh")
    assert proc.returncode == 2 and "usage:" in proc.stderr
    proc = run_script(tmp_path, "train_teacher.sh")
    assert proc.returncode == 1 and "run prepare.sh first" in proc.stderr


# --- the original release's preprocessing, on a fabricated miniature (no fairseq) -------------------------------

TEST_SETS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011",
             "IWSLT14.TED.tst2012")


def fake_release(root: Path) -> Path:
    d = root / "de-en"
    d.mkdir()
    de, en = [], []
    for lang, lines in (("de", de), ("en", en)):
        lines += ["<url>http://www.ted.com/talks/x.html</url>", "<keywords>talks, science</keywords>",
                  "<talkid>1</talkid>",
                  "<title>Ein Titel</title>" if lang == "de" else "<title>A Title</title>"]
    for k in range(1, 47):
        de.append(f"Satz Nummer {k}, Hallo!")
        en.append(f"Sentence number {k}, hello!")
    de.append("Ja")  # 1 word against 8: ratio > 1.5, dropped by the cleaning
    en.append("Yes, this is a much longer sentence.")
    (d / "train.tags.de-en.de").write_text("\n".join(de) + "\n", encoding="utf-8")
    (d / "train.tags.de-en.en").write_text("\n".join(en) + "\n", encoding="utf-8")
    for i, name in enumerate(TEST_SETS):
        for lang, text in (("de", f"Das ist’s {i}."), ("en", f"It’s Test {i}.")):
            (d / f"{name}.de-en.{lang}.xml").write_text(
                f'<mteval>\n<doc docid="1">\n<seg id="1"> {text} </seg>\n</doc>\n</mteval>\n', encoding="utf-8")
    return d


def test_raw_release_preprocessing(tmp_path):
    release = fake_release(tmp_path)
    out = tmp_path / "text"
    proc = subprocess.run([sys.executable, str(RECIPE / "scripts" / "text.py"), "raw", str(release), str(out),
                           "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    train_de = (out / "train.de").read_text(encoding="utf-8").splitlines()
    valid_de = (out / "valid.de").read_text(encoding="utf-8").splitlines()
    train_en = (out / "train.en").read_text(encoding="utf-8").splitlines()
    # 47 kept pairs (the title line + 46 sentences; tags and the unbalanced pair gone): every 23rd is valid
    assert len(train_de) + len(valid_de) == 47 and len(valid_de) == 2 and len(train_en) == len(train_de)
    assert train_de[0] == "ein titel" and train_en[0] == "a title"
    assert "satz nummer 1 , hallo !" in train_de
    assert valid_de == ["satz nummer 22 , hallo !", "satz nummer 45 , hallo !"]
    assert not any("http" in x or "ja" == x for x in train_de + valid_de)
    test_en = (out / "test.en").read_text(encoding="utf-8").splitlines()
    assert test_en == [f"it &apos;s test {i} ." for i in range(len(TEST_SETS))]  # in prepare-iwslt14.sh's order
    raw = (out / "test.raw.en").read_text(encoding="utf-8").splitlines()
    assert raw == [f"It's Test {i}." for i in range(len(TEST_SETS))]  # untokenized, cased: sacreBLEU's references
    assert json.loads((out / "meta.json").read_text())["test_references"].startswith("raw")
