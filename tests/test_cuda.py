"""Every GPU path of the package, a few steps each. Skipped without CUDA; ``pytest -m cuda`` runs them all.

Each test trains, decodes or converts for a few steps and checks what can go wrong on a GPU only:
half-precision students (fairseq's ``--fp16`` needs CUDA) and teachers, ``--amp``, token mixing with a
half-precision teacher, the teacher cache, Seq-KD corpora, CTranslate2 on the GPU, and fairseq's own
launchers. ``benchmarks/gpu/README.md`` has the one device command that runs them with the benchmarks.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import USER_DIR, fairseq_generate, read_json_log
from half_precision import CRITERIA, check_teacher_step, common_train, train_a_few_updates

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STUDENT = ["--arch", "transformer_student_tiny", "--share-all-embeddings"]


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("student_dtype", ["fp16", "bf16"])
def test_half_precision_student_trains(toy_data, teacher, tmp_path, student_dtype, criterion):
    train_a_few_updates(toy_data, teacher, tmp_path, criterion, student_dtype, "fp32", device="cuda")


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("teacher_dtype", ["fp16", "bf16"])
def test_half_precision_teacher_beside_an_fp16_student(toy_data, teacher, tmp_path, teacher_dtype, criterion):
    """imitkd_token is token mixing with a half-precision teacher decoding beside the student."""
    train_a_few_updates(toy_data, teacher, tmp_path, criterion, "fp16", teacher_dtype, device="cuda")


@pytest.mark.parametrize("criterion", ["imitkd_topk", "imitkd_token"])
def test_half_precision_with_the_exact_rollout_engine(toy_data, teacher, tmp_path, criterion):
    """On CUDA the default engine is the static one (the tests above): the exact one must train too."""
    train_a_few_updates(toy_data, teacher, tmp_path, criterion, "fp16", "fp16", device="cuda",
                        extra=["--imitkd-rollout-engine", "exact"])


@pytest.mark.parametrize("teacher_dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("criterion", ["word_kd", "imitkd_full", "imitkd_token"])
def test_teacher_is_frozen_apart_and_in_its_dtype(toy_data, teacher, criterion, teacher_dtype):
    check_teacher_step(toy_data, teacher, criterion, teacher_dtype, "cuda")


@pytest.mark.parametrize("criterion", ["word_kd", "imitkd_full", "imitkd_token"])
def test_amp_student_trains(toy_data, teacher, tmp_path, criterion):
    train_a_few_updates(toy_data, teacher, tmp_path, criterion, "fp32", "fp32", device="cuda", extra=["--amp"])


@pytest.mark.parametrize("teacher_dtype", ["fp32", "bf16"])
def test_teacher_keeps_its_dtype_under_amp_autocast(toy_data, teacher, teacher_dtype):
    """fairseq's --amp runs the criterion under CUDA autocast (float16): the teacher's scores must not
    change with it, so its precision stays the one --teacher-* asked for."""
    from conftest import build_training_objects, first_batch
    from fairseq import utils

    flags = {"fp32": [], "bf16": ["--teacher-bf16"]}[teacher_dtype]
    task, _, _ = build_training_objects(toy_data, "--task", "distillation", "--teacher-path", teacher, *STUDENT,
                                        *CRITERIA["word_kd"], *flags)
    sample = utils.move_to_cuda(first_batch(task, "valid"))
    net = sample["net_input"]
    mask = sample["target"].ne(task.target_dictionary.pad())
    held = task.teacher(torch.device("cuda"))
    args = (net["src_tokens"], net["src_lengths"], net["prev_output_tokens"], mask)
    plain = held.log_probs(*args)
    with torch.autocast("cuda", dtype=torch.float16):
        under_amp = held.log_probs(*args)
    assert torch.equal(plain, under_amp)


def test_teacher_cache_builds_and_trains(toy_data, teacher, tmp_path):
    from fairseq_imitkd.teacher_cache import build

    cache = tmp_path / "cache"
    summary = build(str(toy_data), str(cache), str(teacher), 4, ["train", "valid"], chunk_sentences=500, cpu=False)
    assert summary["splits"]["train"]["sentences"] == 2000
    (tmp_path / "run").mkdir()
    rows = train_a_few_updates(toy_data, teacher, tmp_path / "run", "word_kd", "fp16", "fp32", device="cuda",
                               extra=["--kd-teacher-cache", cache])
    assert all(math.isfinite(float(r["kd_loss"])) for r in rows)


# --------------------------------------------------------------------------- Seq-KD and CTranslate2 on the GPU


def _seqkd(*args) -> dict:
    from fairseq_imitkd.seqkd.cli import build, get_parser

    return build(get_parser().parse_args([str(a) for a in args]))


def _read_targets(prefix):
    from fairseq_imitkd.seqkd.corpus_files import read_indexed

    return read_indexed(str(prefix))


def test_seqkd_fairseq_engine_fp16(toy_data, teacher, tmp_path):
    summary = _seqkd(toy_data, "-o", tmp_path / "out", "--teacher-path", teacher, "--fp16", "--batch-size", "64",
                     "--no-progress-bar")
    assert summary["merged"]
    targets = _read_targets(tmp_path / "out" / "train.src-tgt.tgt")
    assert len(targets) == 2000 and all(len(t) >= 1 for t in targets)
    stats = json.loads((tmp_path / "out" / "seqkd_stats.json").read_text())
    assert "cuda" in json.dumps(stats["shards"]), stats


def ct2_on_cuda():
    """CTranslate2 usable on this GPU, or the reason it is not (its wheels link CUDA 12's cuBLAS)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    if ctranslate2.get_cuda_device_count() == 0:
        pytest.skip("CTranslate2 sees no CUDA device")
    return ctranslate2


def _skip_if_cublas_missing(text: str):
    if "libcublas" in text:
        pytest.skip("CTranslate2 cannot load CUDA 12's cuBLAS beside this torch (README, GPU status): "
                    + text.strip().splitlines()[-1][:300])


def test_seqkd_ctranslate2_engine_int8_float16(toy_data, teacher, tmp_path, monkeypatch):
    """Decodes on the GPU torch uses, and the fairseq teacher it checks first stays off the GPU."""
    ct2_on_cuda()
    from fairseq_imitkd.seqkd import engines

    seen = []
    nbest = engines.CTranslate2Engine.nbest

    def recording_nbest(self, sample):
        seen.append((self.device_index, torch.cuda.memory_allocated()))
        return nbest(self, sample)

    monkeypatch.setattr(engines.CTranslate2Engine, "nbest", recording_nbest)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    try:
        summary = _seqkd(toy_data, "-o", tmp_path / "out", "--teacher-path", teacher, "--engine", "ctranslate2",
                         "--ct2-compute-type", "int8_float16", "--batch-size", "64", "--no-progress-bar")
    except RuntimeError as e:
        _skip_if_cublas_missing(str(e))
        raise
    assert summary["merged"]
    assert seen and all(index == torch.cuda.current_device() for index, _ in seen)
    assert all(allocated == before for _, allocated in seen), (before, seen)  # no torch teacher on the GPU
    assert len(_read_targets(tmp_path / "out" / "train.src-tgt.tgt")) == 2000


@pytest.fixture(scope="module")
def cuda_greedy(word_kd_student, toy_data, tmp_path_factory):
    """The student's greedy test output from fairseq-generate on the GPU, with sources and references."""
    hyps, out = fairseq_generate(toy_data, "--path", word_kd_student / "checkpoint_best.pt", "--beam", "1",
                                 "--batch-size", "64", "--required-batch-size-multiple", "1")
    rows = {}
    for line in out.splitlines():
        if line[:2] in ("S-", "T-"):
            key, text = line.split("\t")
            rows.setdefault(int(key[2:]), {})[line[0]] = text
    ids = sorted(rows)
    source = tmp_path_factory.mktemp("cuda_deploy") / "test.src"
    source.write_text("".join(rows[i]["S"] + "\n" for i in ids))
    return source, [hyps[i] for i in ids], [rows[i]["T"] for i in ids]


def test_int8_float16_export_translates_on_the_gpu_within_half_a_bleu(word_kd_student, cuda_greedy, tmp_path):
    import sacrebleu

    ct2_on_cuda()
    source, fairseq_out, refs = cuda_greedy
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(USER_DIR), os.environ.get("PYTHONPATH", "")]))
    model = tmp_path / "int8_float16"
    proc = subprocess.run([sys.executable, "-m", "fairseq_imitkd.export", str(word_kd_student / "checkpoint_best.pt"),
                           "-o", str(model), "--quantization", "int8_float16"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out.txt"
    proc = subprocess.run([sys.executable, "-m", "fairseq_imitkd_translate", str(model), "-i", str(source), "-o",
                           str(out), "--device", "cuda", "--beam", "1", "--batch-size", "32"],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        _skip_if_cublas_missing(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ct2_out = out.read_text().splitlines()
    bleu_ct2 = sacrebleu.corpus_bleu(ct2_out, [refs], tokenize="none").score
    bleu_fairseq = sacrebleu.corpus_bleu(fairseq_out, [refs], tokenize="none").score
    assert abs(bleu_ct2 - bleu_fairseq) <= 0.5, (bleu_ct2, bleu_fairseq)


# --------------------------------------------------------------------------- fairseq's own GPU launchers


@pytest.mark.parametrize("route", ["world_size_1", "spawn"])
def test_fairseq_train_launches_on_one_gpu(toy_data, teacher, tmp_path, route):
    """The console script as users run it: the plugin's launch wrapper must survive fairseq's spawn (its
    main is pickled into the worker) and end the prefetch threads there too (exit 0, not 134)."""
    launch = ["--distributed-world-size", "1"]
    if route == "spawn":
        port = 20000 + os.getpid() % 20000
        launch += ["--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-num-procs", "1"]
    cmd = ["fairseq-train", str(toy_data), "--user-dir", USER_DIR, "--task", "distillation", "--teacher-path",
           str(teacher), *STUDENT, *common_train("cuda"), *CRITERIA["imitkd_token"], "--fp16", *launch,
           "--max-update", "4", "--log-interval", "1", "--save-dir", str(tmp_path), "--log-file",
           str(tmp_path / "log.txt"), "--disable-validation"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_json_log(tmp_path / "log.txt", "train_inner")
    assert [int(r["num_updates"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert (tmp_path / "checkpoint_last.pt").is_file()
