"""imitkd-seqkd: sequence-level KD corpora, checked against fairseq-generate and sacrebleu.

The distilled split is a 100-sentence copy of the toy ``valid`` split, named ``train`` so that the output
directory trains with fairseq-train's defaults.
"""
import filecmp
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import COMMON_TRAIN, fairseq_generate, fairseq_train, read_json_log

GEN = ["--cpu", "--batch-size", "16"]  # the same batches for imitkd-seqkd and fairseq-generate
RUN = [*GEN, "--no-progress-bar"]
N = 100


def seqkd(*args) -> dict:
    """Run the builder in-process; its summary (which shards were decoded, reused, merged; the stats)."""
    from fairseq_imitkd.seqkd.cli import build, get_parser

    return build(get_parser().parse_args([str(a) for a in args]))


def seqkd_main(capsys, *args):
    """Run the console entry point; its exit code and stderr."""
    from fairseq_imitkd.seqkd.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def tokens(prefix: Path):
    from fairseq_imitkd.seqkd.corpus_files import read_indexed

    return read_indexed(str(prefix))


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def generate_nbest(data: Path, teacher: Path, beam: int, nbest: int):
    """fairseq-generate's n-best lists ``{id: [hypothesis, ...]}`` (best first) and references ``{id: text}``."""
    _, out = fairseq_generate(data, "--path", teacher, "--gen-subset", "train", "--beam", beam, "--nbest", nbest,
                              "--required-batch-size-multiple", "1", "--num-workers", "0", *GEN)
    hyps, refs = {}, {}
    for line in out.splitlines():
        if m := re.match(r"H-(\d+)\t[^\t]*\t(.*)$", line):
            hyps.setdefault(int(m[1]), []).append(m[2])
        elif m := re.match(r"T-(\d+)\t(.*)$", line):
            refs[int(m[1])] = m[2]
    return hyps, refs


@pytest.fixture(scope="module")
def small_data(toy_data, tmp_path_factory) -> Path:
    """toy_data's dictionaries and valid/test splits, plus its valid split again as ``train``."""
    data = tmp_path_factory.mktemp("seqkd_data")
    for f in toy_data.iterdir():
        if f.name.startswith(("dict.", "valid.", "test.")):
            shutil.copy(f, data / f.name)
        if f.name.startswith("valid."):
            shutil.copy(f, data / f.name.replace("valid.", "train.", 1))
    return data


@pytest.fixture(scope="module")
def seqkd_top(small_data, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("seqkd_top") / "out"
    summary = seqkd(small_data, "-o", out, "--teacher-path", teacher, *RUN)
    return out, summary


def test_seqkd_corpus_is_fairseq_generate_beam5(small_data, teacher, seqkd_top):
    from fairseq.data import Dictionary

    out, summary = seqkd_top
    assert summary["decoded_shards"] == [0] and summary["merged"]
    # the dictionaries, the source side and the copied splits are the input's files, byte for byte
    copied = [f"{s}.src-tgt.{lang}.{ext}" for s in ("valid", "test") for lang in ("src", "tgt")
              for ext in ("bin", "idx")]
    for name in ["dict.src.txt", "dict.tgt.txt", "train.src-tgt.src.bin", "train.src-tgt.src.idx", *copied]:
        assert filecmp.cmp(small_data / name, out / name, shallow=False), name
    # ... so the source side is unchanged line for line
    src_in, src_out = tokens(small_data / "train.src-tgt.src"), tokens(out / "train.src-tgt.src")
    assert len(src_out) == len(src_in) == N
    assert all(np.array_equal(a, b) for a, b in zip(src_in, src_out))
    # the targets: fairseq-generate --beam 5's hypotheses, by sample id (the split's original order)
    targets = tokens(out / "train.src-tgt.tgt")
    assert len(targets) == N
    hyps, _ = generate_nbest(small_data, teacher, beam=5, nbest=1)
    assert sorted(hyps) == list(range(N))
    tgt_dict = Dictionary.load(str(out / "dict.tgt.txt"))
    for i, target in enumerate(targets):
        assert target[-1] == tgt_dict.eos() and tgt_dict.eos() not in target[:-1]  # as fairseq-preprocess writes
        assert tgt_dict.string(target) == hyps[i][0], i
    stats = json.loads((out / "seqkd_stats.json").read_text())
    assert stats["sentences"] == N and stats["sentences_per_second"] > 0
    assert stats["mean_target_length"] == pytest.approx(np.mean([len(t) - 1 for t in targets]))
    manifest = json.loads((out / "seqkd_manifest.json").read_text())
    assert manifest["merged"] and manifest["settings"]["beam"] == 5 and manifest["settings"]["select"] == "top"


def test_seq_inter_picks_the_best_sentence_bleu_of_the_nbest(small_data, teacher, tmp_path):
    from fairseq.data import Dictionary
    from sacrebleu.metrics import BLEU

    out = tmp_path / "inter"
    seqkd(small_data, "-o", out, "--teacher-path", teacher, "--beam", 4, "--nbest", 4, "--select", "sentence-bleu",
          *RUN)
    hyps, refs = generate_nbest(small_data, teacher, beam=4, nbest=4)
    tgt_dict = Dictionary.load(str(out / "dict.tgt.txt"))
    chosen = [tgt_dict.string(t) for t in tokens(out / "train.src-tgt.tgt")]
    bleu = BLEU(effective_order=True, smooth_method="exp", tokenize="none")  # the documented default scoring
    best, top = [], []
    for i, text in enumerate(chosen):
        assert text in hyps[i], (i, text, hyps[i])
        scores = [bleu.sentence_score(h, [refs[i]]).score for h in hyps[i]]
        assert bleu.sentence_score(text, [refs[i]]).score == max(scores), (i, scores)
        best.append(max(scores))
        top.append(scores[0])
    assert np.mean(best) >= np.mean(top)
    stats = json.loads((out / "seqkd_stats.json").read_text())
    assert stats["mean_sentence_bleu_chosen"] == pytest.approx(np.mean(best))
    assert stats["mean_sentence_bleu_top"] == pytest.approx(np.mean(top))
    changed = [text != hyps[i][0] for i, text in enumerate(chosen)]
    assert stats["changed_fraction"] == pytest.approx(np.mean(changed))
    assert any(changed)  # the toy teacher's n-best does hold better candidates than its top


def _status(capsys, *args) -> str:
    """What ``imitkd-seqkd ... --status`` prints (the word scripts test)."""
    from fairseq_imitkd.seqkd.cli import main

    capsys.readouterr()
    assert main([str(a) for a in args] + ["--status"]) == 0
    return capsys.readouterr().out.strip()


def test_shards_resume_and_merge_to_the_one_shard_corpus(small_data, teacher, seqkd_top, tmp_path, capsys):
    out = tmp_path / "sharded"
    args = [small_data, "-o", out, "--teacher-path", teacher, *RUN, "--num-shards", 3]
    assert _status(capsys, *args) == "missing"
    first = seqkd(*args, "--shard-id", 0)
    assert first["decoded_shards"] == [0] and first["missing_shards"] == [1, 2] and not first["merged"]
    assert not (out / "train.src-tgt.tgt.bin").exists()
    assert _status(capsys, *args) == "partial"
    assert seqkd(*args, "--shard-id", 1)["missing_shards"] == [2]
    assert seqkd(*args, "--shard-id", 1)["decoded_shards"] == []  # finished shards are never redone
    last = seqkd(*args, "--shard-id", 2)
    assert last["decoded_shards"] == [2] and last["merged"]

    reference = tokens(seqkd_top[0] / "train.src-tgt.tgt")

    def same_as_one_shard():
        merged = tokens(out / "train.src-tgt.tgt")
        return len(merged) == N and all(np.array_equal(a, b) for a, b in zip(merged, reference))

    assert same_as_one_shard()
    assert filecmp.cmp(small_data / "train.src-tgt.src.bin", out / "train.src-tgt.src.bin", shallow=False)

    # an interrupted run: shard 1's output is lost; a rerun redoes shard 1 alone, then merges again
    shards = out / ".shards"
    for f in shards.glob("shard1-of-3.*"):
        f.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    again = seqkd(*args)
    assert again["decoded_shards"] == [1] and again["reused_shards"] == [0, 2] and again["merged"]
    assert all(shards.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    assert same_as_one_shard()
    # complete: a rerun with the same settings decodes nothing and rewrites nothing
    before = snapshot(out)
    done = seqkd(*args)
    assert done["decoded_shards"] == [] and not done["merged"] and snapshot(out) == before
    assert _status(capsys, *args) == "cached" and snapshot(out) == before  # --status writes nothing


def test_fairseq_train_trains_on_the_corpus(seqkd_top, tmp_path):
    out, _ = seqkd_top
    save = tmp_path / "student"
    save.mkdir()
    fairseq_train(out, "--task", "translation", "--arch", "transformer_student_tiny", "--share-all-embeddings",
                  *COMMON_TRAIN, "--max-update", "3", "--save-dir", save, "--log-file", save / "log.txt",
                  "--no-save-optimizer-state")
    assert (save / "checkpoint_last.pt").is_file()
    rows = read_json_log(save / "log.txt", "train")
    assert rows and int(rows[-1]["num_updates"]) == 3, rows


# --- bad input: exit code 2, a message naming the problem, nothing written ----------------------------------


def test_missing_split(small_data, teacher, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = seqkd_main(capsys, small_data, "-o", out, "--teacher-path", teacher, "--split", "nosuch", *RUN)
    assert code == 2 and "nosuch.src-tgt.src.bin" in err and "Traceback" not in err, err
    assert not out.exists()


def test_a_split_whose_sides_differ_in_length(small_data, teacher, tmp_path, capsys):
    """A seq-KD directory cut short given back to imitkd-seqkd: one line with both counts, not an assertion."""
    from conftest import fairseq_preprocess, write_split

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    write_split(tmp_path, "short", 20, seed=5)  # train: 100 sources, the targets of a 20-sentence split
    fairseq_preprocess("--source-lang", "src", "--target-lang", "tgt", "--srcdict", data / "dict.src.txt",
                       "--tgtdict", data / "dict.tgt.txt", "--trainpref", tmp_path / "short", "--destdir",
                       tmp_path / "short_bin", "--workers", "1")
    for ext in ("bin", "idx"):
        shutil.copy(tmp_path / "short_bin" / f"train.src-tgt.tgt.{ext}", data / f"train.src-tgt.tgt.{ext}")
    out = tmp_path / "out"
    code, err = seqkd_main(capsys, data, "-o", out, "--teacher-path", teacher, *RUN)
    assert code == 2 and "Traceback" not in err and "AssertionError" not in err, err
    assert "split 'train'" in err and "100 source sentences (src) but 20 targets (tgt)" in err, err
    assert not out.exists()


def test_console_script_exits_2_without_a_traceback(small_data, teacher, tmp_path):
    """The installed ``imitkd-seqkd`` itself: one line on stderr naming the problem, exit code 2."""
    out = tmp_path / "out"
    proc = subprocess.run(["imitkd-seqkd", str(small_data), "-o", str(out), "--teacher-path", str(teacher),
                           "--split", "nosuch", "--cpu"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "imitkd-seqkd: error: split 'nosuch' not found" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_missing_data_dir_and_teacher(small_data, teacher, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = seqkd_main(capsys, tmp_path / "nodata", "-o", out, "--teacher-path", teacher, *RUN)
    assert code == 2 and "data directory not found" in err, err
    code, err = seqkd_main(capsys, small_data, "-o", out, "--teacher-path", tmp_path / "none.pt", *RUN)
    assert code == 2 and "no such file" in err and "none.pt" in err, err
    assert not out.exists()


def test_teacher_dictionary_mismatch(small_data, teacher, tmp_path, capsys):
    teacher_data = tmp_path / "teacher_data"
    teacher_data.mkdir()
    for name in ("dict.src.txt", "dict.tgt.txt"):
        lines = (small_data / name).read_text().splitlines(keepends=True)
        lines[2], lines[3] = lines[3], lines[2]  # same symbols, another order
        (teacher_data / name).write_text("".join(lines))
    out = tmp_path / "out"
    code, err = seqkd_main(capsys, small_data, "-o", out, "--teacher-path", teacher, "--teacher-data", teacher_data,
                           *RUN)
    assert code == 2 and "dictionary mismatch" in err and "first difference at index" in err, err
    assert not out.exists()


def test_output_holding_another_corpus_is_left_alone(small_data, teacher, seqkd_top, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(seqkd_top[0], out)
    before = snapshot(out)
    code, err = seqkd_main(capsys, small_data, "-o", out, "--teacher-path", teacher, "--beam", 3, *RUN)
    assert code == 2 and "different seq-KD corpus" in err and "beam: 3 now, 5 there" in err, err
    assert _status(capsys, small_data, "-o", out, "--teacher-path", teacher, "--beam", 3, *RUN) == "stale"
    assert _status(capsys, small_data, "-o", out, "--teacher-path", teacher, *RUN) == "cached"
    assert snapshot(out) == before
    # a directory that is no seq-KD corpus at all (the input data, here) and the input itself
    code, err = seqkd_main(capsys, small_data, "-o", small_data, "--teacher-path", teacher, *RUN)
    assert code == 2 and "is the data directory itself" in err, err
    other = tmp_path / "other"
    shutil.copytree(small_data, other)
    code, err = seqkd_main(capsys, small_data, "-o", other, "--teacher-path", teacher, *RUN)
    assert code == 2 and "seqkd_manifest.json" in err, err
    assert _status(capsys, small_data, "-o", other, "--teacher-path", teacher, *RUN) == "foreign"
    # --overwrite replaces the other corpus
    assert seqkd(small_data, "-o", out, "--teacher-path", teacher, "--beam", 3, "--overwrite", *RUN)["merged"]
    assert json.loads((out / "seqkd_manifest.json").read_text())["settings"]["beam"] == 3


def test_option_errors(small_data, teacher, tmp_path, capsys):
    base = [small_data, "-o", tmp_path / "out", "--teacher-path", teacher, *RUN]
    for extra, message in [
        (["--nbest", 6], "--nbest 6 must be between 1 and --beam 5"),
        (["--nbest", 2], "only used by --select sentence-bleu"),
        (["--num-shards", 2, "--shard-id", 2], "--shard-id 2 is not in [0, 2)"),
        (["--merge"], "shards [0] of 1 are not finished"),
        (["--copy-splits", "valid,nosuch"], "nosuch.src-tgt.src.bin"),
    ]:
        code, err = seqkd_main(capsys, *base, *extra)
        assert code == 2 and message in err, (extra, err)
    assert not (tmp_path / "out").exists()


def test_ctranslate2_engine_decodes_the_same_corpus_as_fairseq(small_data, teacher, seqkd_top, tmp_path, capsys):
    """--engine ctranslate2 at float32: the same beam search, so (up to float rounding) the same targets."""
    pytest.importorskip("ctranslate2")
    out = tmp_path / "ct2"
    summary = seqkd(small_data, "-o", out, "--teacher-path", teacher, "--engine", "ctranslate2",
                    "--ct2-compute-type", "float32", *RUN)
    assert summary["merged"] and summary["stats"]["sentences"] == N
    ours, theirs = tokens(out / "train.src-tgt.tgt"), tokens(seqkd_top[0] / "train.src-tgt.tgt")
    same = sum(np.array_equal(a, b) for a, b in zip(ours, theirs))
    assert same >= 0.95 * N, same
    # the source side and the copied splits are fairseq's, whatever decoded
    assert filecmp.cmp(small_data / "train.src-tgt.src.bin", out / "train.src-tgt.src.bin", shallow=False)
    settings = json.loads((out / "seqkd_manifest.json").read_text())["settings"]
    assert settings["engine"] == "ctranslate2" and settings["ct2_compute_type"] == "float32"
    assert "engine" not in json.loads((seqkd_top[0] / "seqkd_manifest.json").read_text())["settings"]
    assert not list(out.glob("**/model.bin"))  # the converted teacher is not left in the corpus
    # sub-batches are a speed knob: one sentence at a time gives the same targets, and the same corpus
    one = tmp_path / "ct2_one"
    seqkd(small_data, "-o", one, "--teacher-path", teacher, "--engine", "ctranslate2",
          "--ct2-compute-type", "float32", "--ct2-max-batch-size", "1", *RUN)
    assert all(np.array_equal(a, b) for a, b in zip(tokens(one / "train.src-tgt.tgt"), ours))
    assert json.loads((one / "seqkd_manifest.json").read_text())["settings"] == settings
    # the fairseq engine will not resume (or mix into) a corpus the other engine decoded
    code, err = seqkd_main(capsys, small_data, "-o", out, "--teacher-path", teacher, *RUN)
    assert code == 2 and "engine: None now, 'ctranslate2' there" in err, err


def test_ctranslate2_engine_option_errors(small_data, teacher, tmp_path, capsys):
    base = [small_data, "-o", tmp_path / "out", "--teacher-path", teacher, *RUN]
    for extra, message in [
        (["--ct2-compute-type", "int8"], "are only used with --engine ctranslate2"),
        (["--ct2-vmap", tmp_path], "are only used with --engine ctranslate2"),
        (["--ct2-int8-weight-bits", "7"], "are only used with --engine ctranslate2"),
        (["--ct2-max-batch-size", "32"], "are only used with --engine ctranslate2"),
        (["--engine", "ctranslate2", "--ct2-max-batch-size", "-1"], "--ct2-max-batch-size must be >= 0"),
        (["--engine", "ctranslate2", "--ct2-compute-type", "float32", "--ct2-int8-weight-bits", "7"],
         "--ct2-int8-weight-bits 7 is for CPU int8 (int8, int8_float32), not float32"),
        (["--engine", "ctranslate2", "--ct2-vmap", tmp_path / "nosuch.vmap"], "--ct2-vmap"),
        (["--engine", "ctranslate2", "--ct2-compute-type", "int4"], "--ct2-compute-type 'int4' is not one of"),
        (["--engine", "ctranslate2", "--teacher-path", f"{teacher}:{teacher}"], "not an ensemble"),
    ]:
        code, err = seqkd_main(capsys, *base, *extra)
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "out").exists()


def test_ctranslate2_7_bit_teacher_is_its_own_corpus(small_data, teacher, tmp_path, capsys):
    """--ct2-int8-weight-bits 7 decodes with an int8 teacher whose weights stay within ±63; the manifest
    records it, so an 8-bit build will not resume into (or mix with) the 7-bit corpus."""
    pytest.importorskip("ctranslate2")
    out = tmp_path / "ct2_7bit"
    summary = seqkd(small_data, "-o", out, "--teacher-path", teacher, "--engine", "ctranslate2",
                    "--ct2-compute-type", "int8", "--ct2-int8-weight-bits", "7", *RUN)
    assert summary["merged"] and summary["stats"]["sentences"] == N
    assert all(len(t) >= 1 for t in tokens(out / "train.src-tgt.tgt"))
    settings = json.loads((out / "seqkd_manifest.json").read_text())["settings"]
    assert settings["ct2_compute_type"] == "int8" and settings["ct2_int8_weight_bits"] == 7
    code, err = seqkd_main(capsys, small_data, "-o", out, "--teacher-path", teacher, "--engine", "ctranslate2",
                           "--ct2-compute-type", "int8", *RUN)
    assert code == 2 and "ct2_int8_weight_bits" in err, err


def test_ctranslate2_vmap_restricts_the_targets(small_data, teacher, seqkd_top, tmp_path, capsys):
    """A map that keeps every target piece changes nothing; one that keeps a single piece for every
    sentence leaves the teacher only that piece and the special symbols (which CTranslate2 always keeps)
    to write. Each map is its own corpus."""
    pytest.importorskip("ctranslate2")
    pieces = [line.split()[0] for line in (small_data / "dict.tgt.txt").read_text().splitlines()]
    full, one = tmp_path / "full.vmap", tmp_path / "one.vmap"
    full.write_text("\t" + " ".join(pieces) + "\n")
    one.write_text("\t" + pieces[0] + "\n")
    theirs = tokens(seqkd_top[0] / "train.src-tgt.tgt")
    out = {}
    for name, vmap in (("full", full), ("one", one)):
        out[name] = tmp_path / name
        seqkd(small_data, "-o", out[name], "--teacher-path", teacher, "--engine", "ctranslate2",
              "--ct2-compute-type", "float32", "--ct2-vmap", vmap, *RUN)
    ours = tokens(out["full"] / "train.src-tgt.tgt")
    assert sum(np.array_equal(a, b) for a, b in zip(ours, theirs)) >= 0.95 * N
    from fairseq.data import Dictionary

    d = Dictionary.load(str(small_data / "dict.tgt.txt"))
    allowed = {d.index(pieces[0]), d.bos(), d.eos(), d.unk()}
    assert all(set(t.tolist()) <= allowed for t in tokens(out["one"] / "train.src-tgt.tgt"))
    code, err = seqkd_main(capsys, small_data, "-o", out["one"], "--teacher-path", teacher, "--engine", "ctranslate2",
                           "--ct2-compute-type", "float32", "--ct2-vmap", full, *RUN)
    assert code == 2 and "ct2_vmap_sha256" in err, err
    # a map covers a whole CTranslate2 batch: a vmap corpus decodes whole fairseq batches unless told,
    # and a sub-batch size makes another corpus
    assert "ct2_vmap_max_batch_size" not in json.loads((out["one"] / "seqkd_manifest.json").read_text())["settings"]
    code, err = seqkd_main(capsys, small_data, "-o", out["one"], "--teacher-path", teacher, "--engine", "ctranslate2",
                           "--ct2-compute-type", "float32", "--ct2-vmap", one, "--ct2-max-batch-size", "4", *RUN)
    assert code == 2 and "ct2_vmap_max_batch_size" in err, err


def test_ctranslate2_engine_refuses_fp16(small_data, teacher, tmp_path, capsys, monkeypatch):
    """--fp16 is fairseq's half-precision teacher; with CTranslate2 the compute type says it. Checked
    before any GPU is touched, so a CPU machine can test it by pretending to have one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = [a for a in RUN if a != "--cpu"]
    code, err = seqkd_main(capsys, small_data, "-o", tmp_path / "out", "--teacher-path", teacher, *args,
                           "--engine", "ctranslate2", "--fp16")
    assert code == 2 and "--fp16 is the fairseq engine's" in err and "int8_float16" in err, err
    assert not (tmp_path / "out").exists()
