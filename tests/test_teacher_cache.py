"""The offline teacher cache: built once, read instead of a teacher pass, refused when it is not the
teacher, dictionaries, split or K the run needs, and resumed when its build was interrupted."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import COMMON_TRAIN, build_training_objects, fairseq_train, first_batch, read_json_log
from fairseq_imitkd.teacher_cache import CacheError, TeacherCache, build

K = 4
STUDENT = ["--arch", "transformer_student_tiny", "--share-all-embeddings", "--cpu", "--dropout", "0"]


@pytest.fixture(scope="module")
def cache(toy_data, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "cache"
    summary = build(str(toy_data), str(out), str(teacher), K, ["train", "valid"], chunk_sentences=500, cpu=True)
    assert summary["splits"]["train"]["chunks_computed"] == 4 and summary["splits"]["train"]["sentences"] == 2000
    return out


def _criterion(data, *extra):
    return build_training_objects(data, "--task", "distillation", "--criterion", "word_kd", "--kd-alpha", "0.5",
                                  *STUDENT, *extra)


def test_cached_rows_are_the_teachers_top_k(toy_data, teacher, cache):
    task, _, criterion = _criterion(toy_data, "--teacher-path", teacher)
    sample = first_batch(task, "valid")
    net = sample["net_input"]
    mask = sample["target"].ne(task.target_dictionary.pad())
    online = task.teacher(torch.device("cpu")).log_probs(net["src_tokens"], net["src_lengths"],
                                                         net["prev_output_tokens"], mask)
    opened = TeacherCache(str(cache), task.source_dictionary, task.target_dictionary, str(teacher))
    values, index, tail = opened.split("valid", task.dataset("valid")).rows(sample["id"], mask.sum(1))
    top, top_index = online.topk(K, dim=-1)
    assert torch.equal(index, top_index)
    assert torch.allclose(values, top, atol=2e-3 * top.abs().max().item())  # float16 storage
    rest = online.scatter(-1, top_index, -float("inf")).logsumexp(-1)
    assert torch.allclose(tail, rest, atol=1e-5)
    # the buckets sum to one
    assert torch.allclose(torch.cat([values, tail[:, None]], -1).logsumexp(-1), torch.zeros(len(tail)), atol=1e-2)


def test_the_cached_loss_is_the_online_top_k_loss(toy_data, teacher, cache):
    task, model, online = _criterion(toy_data, "--teacher-path", teacher, "--kd-teacher-topk", str(K))
    _, _, cached = _criterion(toy_data, "--kd-teacher-cache", cache)
    assert cached.divergence_args["teacher_topk"] == K and not cached.needs_teacher
    cached.task = task  # the same datasets
    model.eval()
    sample = first_batch(task, "valid")
    loss_online, _, log_online = online(model, sample)
    loss_cached, _, log_cached = cached(model, sample)
    assert loss_cached.item() == pytest.approx(loss_online.item(), rel=1e-3)
    assert log_cached["n_agree"] == log_online["n_agree"]
    assert task._teacher is not None  # loaded by the online criterion only


def test_word_kd_trains_from_the_cache_with_no_teacher(toy_data, teacher, cache, tmp_path):
    """The same run with the online teacher (top-k targets) logs the same losses; the cached run names no
    teacher at all, so it cannot have loaded one."""
    logs = {}
    for name, extra in (("cached", ["--kd-teacher-cache", cache]),
                        ("online", ["--teacher-path", teacher, "--kd-teacher-topk", str(K)])):
        save = tmp_path / name
        save.mkdir()
        fairseq_train(toy_data, "--task", "distillation", "--criterion", "word_kd", "--kd-alpha", "0.5", *extra,
                      *STUDENT, *COMMON_TRAIN, "--dropout", "0", "--max-update", "6", "--log-interval", "2",
                      "--save-dir", save, "--log-file", save / "log.txt", "--no-save")
        logs[name] = (save / "log.txt").read_text()
    rows = {n: read_json_log(tmp_path / n / "log.txt", "train_inner") for n in logs}
    keys = ("loss", "nll_loss", "kd_loss", "kd_agree")
    assert [{k: r[k] for k in keys} for r in rows["cached"]] == [{k: r[k] for k in keys} for r in rows["online"]]
    assert len(rows["cached"]) == 3


# --- refusals -----------------------------------------------------------------------------------------


def test_a_cache_of_another_k_is_refused(toy_data, cache):
    with pytest.raises(ValueError, match=f"--kd-teacher-topk 8, but the teacher cache .* holds the top {K}"):
        _criterion(toy_data, "--kd-teacher-cache", cache, "--kd-teacher-topk", "8")


def test_a_cache_of_another_teacher_is_refused(toy_data, teacher, cache, tmp_path):
    other = tmp_path / "other_teacher.pt"
    state = torch.load(teacher)
    state["extra_state"] = {"retrained": True}
    torch.save(state, other)
    with pytest.raises(CacheError, match="built from another teacher than --teacher-path"):
        _criterion(toy_data, "--kd-teacher-cache", cache, "--teacher-path", other)


def test_a_cache_checked_against_a_teacher_file_that_does_not_exist_is_refused(toy_data, cache, tmp_path):
    """--teacher-path only names the teacher the cache is checked against here: it must still exist."""
    from fairseq_imitkd.teacher import TeacherError

    with pytest.raises(TeacherError, match=f"no such file: {tmp_path / 'none.pt'}"):
        _criterion(toy_data, "--kd-teacher-cache", cache, "--teacher-path", tmp_path / "none.pt")


def test_a_cache_of_other_dictionaries_is_refused(toy_data, cache, tmp_path):
    data = tmp_path / "reordered"
    shutil.copytree(toy_data, data)
    for name in ("dict.src.txt", "dict.tgt.txt"):
        lines = (data / name).read_text().splitlines(keepends=True)
        lines[0], lines[3] = lines[3], lines[0]
        (data / name).write_text("".join(lines))
    with pytest.raises(CacheError, match=r"built with other dictionaries \(src.sha1"):
        _criterion(data, "--kd-teacher-cache", cache)


def _swapped_split(toy_data, data, split, other):
    """A copy of the toy data whose ``split`` holds the sentences of ``other``."""
    shutil.copytree(toy_data, data)
    for lang in ("src", "tgt"):
        for ext in ("bin", "idx"):
            shutil.copy(toy_data / f"{other}.src-tgt.{lang}.{ext}", data / f"{split}.src-tgt.{lang}.{ext}")
    return data


def test_a_cache_of_another_split_is_refused(toy_data, cache, tmp_path):
    data = _swapped_split(toy_data, tmp_path / "other_train", "train", "valid")
    # refused when the split is loaded, before the first update (after which fairseq writes crash.pt)
    task, _, criterion = _criterion(data, "--kd-teacher-cache", cache)
    with pytest.raises(CacheError, match=r"built from another train split \(.*sentences: 2000 in the cache, 100 here"):
        task.load_dataset("train")
    save = tmp_path / "save"
    with pytest.raises(CacheError, match="built from another train split"):
        fairseq_train(data, "--task", "distillation", "--criterion", "word_kd", "--kd-alpha", "0.5",
                      "--kd-teacher-cache", cache, *STUDENT, *COMMON_TRAIN, "--max-update", "2", "--save-dir", save)
    assert not list(save.glob("*.pt")), "no checkpoint, no crash.pt"


def test_a_cache_of_another_valid_split_is_refused_when_the_criterion_is_built(toy_data, cache, tmp_path):
    """fairseq-train loads the valid splits before it builds the criterion: they are checked then."""

    data = _swapped_split(toy_data, tmp_path / "other_valid", "valid", "test")
    with pytest.raises(CacheError, match="built from another valid split"):
        fairseq_train(data, "--task", "distillation", "--criterion", "word_kd", "--kd-alpha", "0.5",
                      "--kd-teacher-cache", cache, *STUDENT, *COMMON_TRAIN, "--max-update", "2",
                      "--save-dir", tmp_path / "save")


@pytest.mark.parametrize("damage", ["truncated", "incomplete"])
def test_a_damaged_or_unfinished_cache_is_refused(toy_data, cache, tmp_path, damage):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    if damage == "truncated":
        path = copy / "train" / "values.npy"
        path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
        match = "truncated or damaged"
    else:
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["splits"]["train"]["complete"] = False
        (copy / "manifest.json").write_text(json.dumps(manifest))
        match = "is incomplete: run imitkd-teacher-cache again"
    task, _, criterion = _criterion(toy_data, "--kd-teacher-cache", copy)
    with pytest.raises(CacheError, match=match):
        task.load_dataset("train")


# --- building -------------------------------------------------------------------------------------------


def _undo_chunk(copy, chunk, size=500):
    """The train split of a cache copy as if chunk ``chunk`` had never been computed: its done marker gone and
    its values zeroed (a resume that skipped it would leave the zeros)."""
    progress = json.loads((copy / "train" / "progress.json").read_text())
    progress["done"].remove(chunk)
    (copy / "train" / "progress.json").write_text(json.dumps(progress))
    offsets = np.load(copy / "train" / "offsets.npy")
    values = np.load(copy / "train" / "values.npy", mmap_mode="r+")
    values[offsets[chunk * size]:offsets[(chunk + 1) * size]] = 0
    values.flush()
    del values


def test_an_interrupted_build_resumes_with_the_missing_chunk_only(toy_data, teacher, cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    _undo_chunk(copy, 1)  # as if killed during chunk 1 (sentences 500-999)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"]["complete"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))

    summary = build(str(toy_data), str(copy), str(teacher), K, ["train", "valid"], chunk_sentences=500, cpu=True)
    assert summary["splits"]["train"]["chunks_computed"] == 1 and summary["splits"]["valid"] == {"reused": True}
    for name in ("values", "indices", "tail"):
        assert np.array_equal(np.load(copy / "train" / f"{name}.npy"), np.load(cache / "train" / f"{name}.npy"))


def test_building_over_a_cache_of_other_settings_is_one_line(toy_data, teacher, cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    proc = subprocess.run([sys.executable, "-m", "fairseq_imitkd.teacher_cache", str(toy_data), "-o", str(copy),
                           "--teacher-path", str(teacher), "--topk", "8", "--cpu"],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("imitkd-teacher-cache: ") and "k: 4 in the cache, 8 here" in last and "--overwrite" in last
    assert "Traceback" not in proc.stderr
    assert json.loads((copy / "manifest.json").read_text())["k"] == K  # untouched


@pytest.mark.parametrize("damage", ["deleted", "truncated", "marker"])
def test_rebuilding_a_complete_cache_checks_its_files(toy_data, teacher, cache, tmp_path, damage, caplog):
    """A cache whose manifest says complete but whose files say otherwise is computed again, not reported
    "already complete": a deleted or truncated array (the whole split), a chunk without its done marker."""
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    if damage == "deleted":
        (copy / "train" / "values.npy").unlink()
    elif damage == "truncated":
        path = copy / "train" / "tail.npy"
        path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    else:
        _undo_chunk(copy, 2)
    summary = build(str(toy_data), str(copy), str(teacher), K, ["train", "valid"], chunk_sentences=500, cpu=True)
    assert summary["splits"]["train"]["chunks_computed"] == (1 if damage == "marker" else 4), summary
    assert summary["splits"]["valid"] == {"reused": True}
    assert {"deleted": "values.npy is missing", "truncated": "tail.npy cannot be read",
            "marker": "chunks [2] have no done marker"}[damage] in caplog.text, caplog.text
    for name in ("offsets", "values", "indices", "tail"):
        assert np.array_equal(np.load(copy / "train" / f"{name}.npy"), np.load(cache / "train" / f"{name}.npy"))
    assert json.loads((copy / "manifest.json").read_text())["splits"]["train"]["complete"]


@pytest.mark.parametrize("bad", ["uneven", "missing"])
def test_a_bad_split_is_one_line_and_leaves_no_output(toy_data, teacher, tmp_path, bad):
    """A seq-KD directory whose sides differ in length, or a split that is not there: one line naming it,
    and no (empty) cache directory left behind."""
    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    if bad == "uneven":
        for ext in ("bin", "idx"):
            shutil.copy(toy_data / f"valid.src-tgt.tgt.{ext}", data / f"train.src-tgt.tgt.{ext}")
    out = tmp_path / "cache"
    splits = "train,valid" if bad == "uneven" else "train,dev"
    proc = subprocess.run([sys.executable, "-m", "fairseq_imitkd.teacher_cache", str(data), "-o", str(out),
                           "--teacher-path", str(teacher), "--topk", "4", "--cpu", "--splits", splits],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("imitkd-teacher-cache: "), proc.stderr[-3000:]
    if bad == "uneven":
        assert "split 'train'" in last and "2000 source sentences (src) but 100 targets (tgt)" in last, last
    else:
        assert "split 'dev' not found" in last and "splits there: test, train, valid" in last, last
    assert not out.exists()


# --- the cache as a teacher behind the one seam: ImitKD reads its gold rows from it --------------------

IMITKD = ["--criterion", "imitkd", "--imitkd-target", "full", "--imitkd-sampling", "greedy", "--max-update", "10",
          "--imitkd-beta-schedule", "constant"]


def _imitkd(data, *extra):
    return build_training_objects(data, "--task", "distillation", *IMITKD, *STUDENT, *extra)


def test_the_cached_teacher_answers_gold_rows_from_its_files_and_the_rest_live(toy_data, teacher, cache):
    from fairseq_imitkd.losses import tail_mass
    from fairseq_imitkd.teacher import RowKeys

    task, _, criterion = _imitkd(toy_data, "--teacher-path", teacher, "--kd-teacher-cache", cache,
                                 "--imitkd-beta", "0.5")
    sample = first_batch(task, "valid")
    net = sample["net_input"]
    mask = sample["target"].ne(task.target_dictionary.pad())
    gold = torch.arange(mask.size(0)) % 2 == 0  # every other row "rolled out" (here: the same tokens)
    cached = criterion.teacher_for(torch.nn.Linear(1, 1))
    scores = cached.scores(net["src_tokens"], net["src_lengths"], net["prev_output_tokens"], mask,
                           RowKeys("valid", sample["id"], gold))
    online = task.teacher(torch.device("cpu")).log_probs(net["src_tokens"], net["src_lengths"],
                                                         net["prev_output_tokens"], mask)
    top, index = online.topk(K, dim=-1)
    buckets = torch.cat([top, tail_mass(online, index)], -1)
    assert torch.equal(scores.index, index) and torch.equal(scores.argmax, online.argmax(-1))
    live = (~gold).repeat_interleave(mask.sum(1))
    assert torch.equal(scores.lprobs[live], buckets[live])  # computed here, exactly
    assert not torch.equal(scores.lprobs[~live], buckets[~live])  # read back from float16 files
    assert torch.allclose(scores.lprobs[~live], buckets[~live], atol=2e-3 * top.abs().max().item())


@pytest.mark.parametrize("beta", ["1", "0.5"])
def test_imitkd_full_from_the_cache_is_the_online_top_k_loss(toy_data, teacher, cache, beta):
    """β = 1: every row is gold, read from the cache, and the teacher is never loaded. β = 0.5: the rolled-out
    rows are scored by the live teacher, cut to the same K."""
    task, model, online = _imitkd(toy_data, "--teacher-path", teacher, "--kd-teacher-topk", str(K),
                                  "--imitkd-beta", beta)
    _, _, cached = _imitkd(toy_data, "--teacher-path", teacher, "--kd-teacher-cache", cache, "--imitkd-beta", beta)
    assert cached.divergence_args["teacher_topk"] == K
    task.load_dataset("train")
    cached.task = task  # the same datasets
    model.train()
    sample = first_batch(task, "train")
    results = {}
    for name, criterion in (("cached", cached), ("online", online)):
        torch.manual_seed(3)  # the same rows drawn for rollouts
        loss, _, log = criterion(model, sample)
        results[name] = (loss.item(), int(log["n_agree"]), log["n_on_policy"])
        if name == "cached":  # first: whether it needed the live teacher
            assert (task._teacher is not None) == (beta != "1")
    assert results["cached"][2] == results["online"][2] and (results["cached"][2] > 0) == (beta != "1")
    assert results["cached"][0] == pytest.approx(results["online"][0], rel=1e-3)
    assert results["cached"][1] == results["online"][1]


def test_imitkd_trains_from_the_cache_through_fairseq_train(toy_data, teacher, cache, tmp_path):
    """fairseq-train with ImitKD+Full at β = 1 from the cache logs the losses of the online top-K run."""
    logs = {}
    for name, extra in (("cached", ["--kd-teacher-cache", cache]), ("online", ["--kd-teacher-topk", str(K)])):
        save = tmp_path / name
        save.mkdir()
        fairseq_train(toy_data, "--task", "distillation", "--teacher-path", teacher, *IMITKD, "--imitkd-beta", "1",
                      *extra, *STUDENT, *COMMON_TRAIN, "--max-update", "4", "--log-interval", "2",
                      "--save-dir", save, "--log-file", save / "log.txt", "--no-save")
        logs[name] = read_json_log(save / "log.txt", "train_inner")
    keys = ("loss", "kd_loss", "kd_agree")
    assert len(logs["cached"]) == 2
    for cached, online in zip(logs["cached"], logs["online"]):
        assert cached["kd_agree"] == online["kd_agree"]
        for k in ("loss", "kd_loss"):
            assert float(cached[k]) == pytest.approx(float(online[k]), rel=2e-3), (k, cached, online)
    assert set(keys) <= set(logs["cached"][0])


@pytest.mark.parametrize("extra,match", [(["--imitkd-mix", "token"], "--imitkd-mix sequence"),
                                         (["--imitkd-target", "argmax"], "--imitkd-target full")])
def test_imitkd_refuses_a_cache_it_would_not_read(toy_data, teacher, cache, extra, match):
    with pytest.raises(ValueError, match=match):
        _imitkd(toy_data, "--teacher-path", teacher, "--kd-teacher-cache", cache, "--imitkd-beta", "0.5", *extra)


def test_a_teacher_path_beside_a_cache_of_every_split_is_not_called_unused(toy_data, teacher, cache, caplog):
    """The cache is checked against the teacher it names: that teacher is used, not ignored."""
    import logging

    with caplog.at_level(logging.WARNING, logger="fairseq_imitkd"):
        _, _, criterion = _criterion(toy_data, "--kd-teacher-cache", cache, "--teacher-path", teacher)
    assert not criterion.needs_teacher
    assert "unused" not in caplog.text
