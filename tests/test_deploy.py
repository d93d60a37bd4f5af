"""Deployment: ``imitkd-export`` turns a student into a CTranslate2 model, ``imitkd-translate`` translates
a file with it, and the output is fairseq-generate's. Run as users run them: console scripts in
subprocesses, on the word_kd student (whose teacher file is gone)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import fairseq_generate

pytest.importorskip("ctranslate2")

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _export(*args):
    return subprocess.run([sys.executable, "-m", "fairseq_imitkd.export", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=300)


def _translate(*args):
    return subprocess.run([sys.executable, "-m", "fairseq_imitkd_translate", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=300)


def _one_line_error(proc, prog):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"{prog}: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[-1]


@pytest.fixture(scope="module")
def test_split(word_kd_student, toy_data, tmp_path_factory):
    """The toy test sources (pieces) and fairseq-generate's greedy output at its default length limit."""
    hyps, out = fairseq_generate(toy_data, "--path", word_kd_student / "checkpoint_best.pt", "--beam", "1",
                                 "--batch-size", "64", "--required-batch-size-multiple", "1", "--cpu")
    sources = {int(line.split("\t")[0][2:]): line.split("\t")[1] for line in out.splitlines()
               if line.startswith("S-")}
    ids = sorted(sources)
    assert ids == sorted(hyps) and len(ids) == 100
    path = tmp_path_factory.mktemp("deploy") / "test.src"
    path.write_text("".join(sources[i] + "\n" for i in ids))
    return path, [hyps[i] for i in ids]


def _export_and_translate(student, source, model, quantization):
    proc = _export(student / "checkpoint_best.pt", "-o", model, "--quantization", quantization)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (model / "model.bin").is_file() and (model / "imitkd_export.json").is_file()
    out = model.parent / f"{quantization}.out.txt"
    proc = _translate(model, "-i", source, "-o", out, "--beam", "1", "--batch-size", "16",
                      "--stats", model.parent / "stats.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_text().splitlines()


def test_an_exported_student_translates_as_fairseq_does(word_kd_student, test_split, tmp_path):
    """float32 is the same computation in another engine: every sentence must come out the same."""
    source, fairseq_out = test_split
    assert _export_and_translate(word_kd_student, source, tmp_path / "ct2", "float32") == fairseq_out


def test_an_int8_export_is_smaller_and_well_formed(word_kd_student, test_split, toy_data, tmp_path):
    """int8 is lossy: on this barely trained toy student about half the greedy outputs differ somewhere
    (its argmaxes are near ties), so the check here is the size (0.73 of float32 for this d=32 student,
    whose layer norms and biases stay float32) and a well-formed output; BLEU against the float32
    student belongs to a benchmark on real data."""
    source, fairseq_out = test_split
    f32 = tmp_path / "f32"
    _export_and_translate(word_kd_student, source, f32, "float32")
    out = _export_and_translate(word_kd_student, source, tmp_path / "int8", "int8")
    ratio = (tmp_path / "int8" / "model.bin").stat().st_size / (f32 / "model.bin").stat().st_size
    assert ratio < 0.8, ratio
    vocabulary = {line.split()[0] for line in (toy_data / "dict.tgt.txt").read_text().splitlines()}
    assert len(out) == len(fairseq_out) and all(set(line.split()) <= vocabulary for line in out)


def test_quantize_rows_is_symmetric_per_row_at_the_given_width():
    import numpy as np
    from fairseq_imitkd.export import quantize_rows

    w = np.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [2.0, 1.0, -0.5]], dtype=np.float32)
    q, scale = quantize_rows(w, 7)
    # each row's largest magnitude goes to ±63; 31.5 rounds half to even
    assert q.tolist() == [[32, -63, 16], [0, 0, 0], [63, 32, -16]]
    assert scale.tolist() == [63.0, 1.0, 31.5]
    q8, scale8 = quantize_rows(w, 8)  # CTranslate2's own int8: ±127
    assert q8[0].tolist() == [64, -127, 32] and scale8[0] == 127.0
    assert np.abs(q / scale[:, None] - w).max() <= 0.5 / scale.min()


@pytest.mark.parametrize("flags, saturates", [
    ("fpu sse2 avx avx2 fma", True),  # AVX2 without VNNI (the AMD EPYC the benchmarks ran on)
    ("fpu avx2 avx512f avx512bw avx512_vnni", False),  # VNNI sums u8*s8 products straight into int32
    ("fpu avx2 avx_vnni", False),
    ("fpu sse2 sse4_2", False),  # no AVX2: not the kernel that saturates
    (None, False),  # no flags line (ARM), or no /proc/cpuinfo: cannot tell, so no warning
])
def test_cpu_int8_saturation_is_read_from_the_cpu_flags(tmp_path, flags, saturates):
    from fairseq_imitkd.ct2_deploy import cpu_int8_saturates

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\n" + (f"flags\t\t: {flags}\n" if flags else "Features\t: fp asimd\n"))
    assert cpu_int8_saturates(str(cpuinfo)) is saturates
    assert cpu_int8_saturates(str(tmp_path / "missing")) is False


def test_translate_warns_about_8_bit_int8_weights_only_where_the_cpu_saturates(tmp_path, monkeypatch, caplog):
    import argparse

    import fairseq_imitkd_translate as translate

    model = tmp_path / "m"
    model.mkdir()
    for bits, quantization, compute, saturates, warned in [
        (8, "int8", "default", True, True), (7, "int8", "default", True, False),
        (8, "int8", "default", False, False), (None, "float32", "default", True, False),
        (8, "int8", "float32", True, False),  # int8 weights computed in float32: no int8 products
        # a GPU export deployed on CPU: CTranslate2 has no float16 there and computes int8
        (8, "int8_float16", "default", True, True), (8, "int8", "int8_bfloat16", True, True),
        (8, "int8_float16", "default", False, False),
    ]:
        (model / "imitkd_export.json").write_text(json.dumps({"quantization": quantization, "int8_weight_bits": bits}))
        monkeypatch.setattr(translate.ct2_deploy, "cpu_int8_saturates", lambda saturates=saturates: saturates)
        caplog.clear()
        translate._warn_if_int8_saturates(argparse.Namespace(model=str(model), device="cpu", compute_type=compute))
        assert ("--int8-weight-bits 7" in caplog.text) is warned, (bits, quantization, compute, saturates)


def test_a_7_bit_int8_export_keeps_every_weight_within_63(word_kd_student, test_split, tmp_path):
    """Every weight CTranslate2 would quantize is int8 in [-63, 63] with a scale that gives the float
    weights back to within half a step; the export translates and records its width."""
    import ctranslate2
    import numpy as np
    from ctranslate2.specs import model_spec
    from fairseq_imitkd import export

    checkpoint = word_kd_student / "checkpoint_best.pt"
    data, src, tgt = export.resolve_data(torch.load(checkpoint, weights_only=False), str(checkpoint), None)
    spec = export._converter(ctranslate2, 7)(str(checkpoint), data, source_lang=src, target_lang=tgt,
                                             user_dir=export.USER_DIR)._load()
    reference = ctranslate2.converters.FairseqConverter(str(checkpoint), data, source_lang=src, target_lang=tgt,
                                                        user_dir=export.USER_DIR)._load()
    reference.validate()
    floats = {}
    model_spec.visit_spec(reference, lambda layer, name, value: floats.__setitem__(name, value))
    checked = []

    def check(layer, name, value):
        key = name.split("/")[-1]
        if hasattr(layer, key + "_scale") and not key.endswith("_scale") and not value.is_scalar():
            q, scale = value.numpy(), getattr(layer, key + "_scale").numpy()
            assert q.dtype == np.int8 and np.abs(q).max() == 63, name
            assert np.abs(q / scale[:, None] - floats[name].to("float32").numpy()).max() <= 0.5 / scale.min() + 1e-6
            checked.append(name)
    model_spec.visit_spec(spec, check)
    assert len(checked) >= 8, checked  # encoder and decoder linears, embeddings

    source, fairseq_out = test_split
    model = tmp_path / "int8_7bit"
    proc = _export(checkpoint, "-o", model, "--int8-weight-bits", "7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((model / "imitkd_export.json").read_text())["int8_weight_bits"] == 7
    proc = _translate(model, "-i", source, "-o", tmp_path / "out.txt", "--beam", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "out.txt").read_text().splitlines()) == len(fairseq_out)
    msg = _one_line_error(_translate(model, "-i", source, "-o", tmp_path / "bad.txt", "--compute-type", "bogus"),
                          "imitkd-translate")
    assert "cannot load" in msg and "--compute-type bogus" in msg, msg

    # narrower weights are for CPU int8 only: anything else is refused before a file is written
    msg = _one_line_error(_export(checkpoint, "-o", tmp_path / "f32", "--quantization", "float32",
                                  "--int8-weight-bits", "7"), "imitkd-export")
    assert "--int8-weight-bits 7 is for CPU int8" in msg and "float32" in msg, msg
    assert not (tmp_path / "f32").exists()


def test_export_copies_the_sentencepiece_model_and_translate_uses_it(word_kd_student, tmp_path):
    """A sentencepiece model beside the weights is what imitkd-translate tokenizes raw text with."""
    sentencepiece = pytest.importorskip("sentencepiece")
    text = tmp_path / "spm.txt"
    text.write_text("".join(f"s{i} s{(i * 7) % 24} s{(i * 5) % 24}\n" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "spm"), vocab_size=30,
                                             model_type="word", bos_id=-1, eos_id=-1)
    model = tmp_path / "ct2"
    proc = _export(word_kd_student / "checkpoint_best.pt", "-o", model, "--spm", tmp_path / "spm.model")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (model / "spm.model").read_bytes() == (tmp_path / "spm.model").read_bytes()
    src = tmp_path / "in.txt"
    src.write_text("s1 s2 s3\ns4 s5\n")
    proc = _translate(model, "-i", src, "-o", tmp_path / "out.txt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (tmp_path / "out.txt").read_text().splitlines()
    # detokenized by sentencepiece: words, not "▁"-marked pieces
    assert len(lines) == 2 and all(lines) and not any("\u2581" in line for line in lines), lines


def test_bad_exports_are_one_line_and_write_nothing(word_kd_student, tmp_path):
    student = word_kd_student / "checkpoint_best.pt"
    text = tmp_path / "not_a_checkpoint.pt"
    text.write_text("hello\n")
    msg = _one_line_error(_export(text, "-o", tmp_path / "a"), "imitkd-export")
    assert str(text) in msg and "cannot be read" in msg, msg

    # an architecture option the converter does not support
    state = torch.load(student)
    state["cfg"]["model"].activation_fn = "tanh"
    unsupported = tmp_path / "tanh.pt"
    torch.save(state, unsupported)
    msg = _one_line_error(_export(unsupported, "-o", tmp_path / "b"), "imitkd-export")
    assert "cannot convert" in msg and "--activation-fn tanh" in msg, msg

    # a directory that holds another model is kept as it is
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.bin").write_bytes(b"another model")
    msg = _one_line_error(_export(student, "-o", other), "imitkd-export")
    assert "holds another CTranslate2 model" in msg and "--force" in msg, msg
    assert (other / "model.bin").read_bytes() == b"another model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_checkpoint.pt", "other", "tanh.pt"]

    msg = _one_line_error(_translate(tmp_path, "-i", text, "-o", tmp_path / "out.txt"), "imitkd-translate")
    assert "not a CTranslate2 model directory" in msg, msg


def test_export_hints_about_the_data_directory_are_true(word_kd_student, toy_data, tmp_path):
    """A checkpoint whose recorded data directory is gone is told to pass --data; one whose directory does not
    tell the language pair is told to pass --source-lang/--target-lang, and doing so works."""
    state = torch.load(word_kd_student / "checkpoint_best.pt")
    state["cfg"]["task"]["source_lang"] = state["cfg"]["task"]["target_lang"] = None
    state["cfg"]["task"]["data"] = str(tmp_path / "gone")
    gone = tmp_path / "gone.pt"
    torch.save(state, gone)
    msg = _one_line_error(_export(gone, "-o", tmp_path / "a", "--source-lang", "src", "--target-lang", "tgt"),
                          "imitkd-export")
    assert str(tmp_path / "gone") in msg and "does not exist" in msg and "pass --data DIR" in msg, msg
    assert "--source-lang" not in msg, msg

    three = tmp_path / "three"  # a third dictionary: the pair cannot be inferred from the file names
    three.mkdir()
    for lang in ("src", "tgt", "xx"):
        (three / f"dict.{lang}.txt").write_text((toy_data / "dict.src.txt").read_text())
    msg = _one_line_error(_export(gone, "-o", tmp_path / "b", "--data", three), "imitkd-export")
    assert "pass --source-lang and --target-lang" in msg, msg
    proc = _export(gone, "-o", tmp_path / "c", "--data", three, "--source-lang", "src", "--target-lang", "tgt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "c" / "imitkd_export.json").read_text())
    assert (manifest["source_lang"], manifest["target_lang"]) == ("src", "tgt")


def test_vmap_builder_counts_pairs_analytically():
    from fairseq_imitkd_vmap import build_vmap

    sources = [["a", "b"], ["a"], ["a", "c"], ["b"]]
    targets = [["x", "y"], ["x"], ["x", "z"], ["y", "w", "w"]]
    vmap = build_vmap(sources, targets, per_source=2, common=1)
    # document frequencies: x 3, y 2, z 1, w 1 -> the common piece is x
    assert vmap[""] == ["x"]
    # a: pairs 1-3, y in 1 of 3, z in 1 of 3 -> both, ties broken by the piece
    assert vmap["a"] == ["y", "z"]
    # b: pairs 1 and 4: y in both (1.0), w in one (0.5, counted once though it appears twice)
    assert vmap["b"] == ["y", "w"]
    assert vmap["c"] == ["z"]
    assert build_vmap(sources, targets, per_source=5, common=0, min_share=0.5)["a"] == ["x"]  # 3/3 > 0.5 only


@pytest.mark.parametrize("extra, message", [
    (["--target", "{short}"], "have different line counts"),
    (["--per-source", "-1"], "--per-source and --common must be >= 0"),
    (["--common", "-2"], "--per-source and --common must be >= 0"),
    (["--min-share", "1"], "--min-share in [0, 1)"),
])
def test_bad_vmap_input_is_one_line_and_writes_nothing(tmp_path, extra, message):
    from fairseq_imitkd_vmap import main

    (tmp_path / "src").write_text("a b\nc\n")
    (tmp_path / "tgt").write_text("x y\nz\n")
    (tmp_path / "short").write_text("x y\n")
    extra = [e.format(short=tmp_path / "short") for e in extra]
    with pytest.raises(SystemExit) as e:
        main(["--source", str(tmp_path / "src"), "--target", str(tmp_path / "tgt"), "-o", str(tmp_path / "v"), *extra])
    assert str(e.value).startswith("imitkd-vmap: ") and message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "v").exists()


def test_a_vmap_export_translates_with_the_restricted_vocabulary(word_kd_student, test_split, tmp_path):
    """With a map that holds every piece fairseq outputs, greedy output is unchanged (the argmax is a
    candidate); with an empty map it cannot be, which shows the map is used."""
    source, fairseq_hyps = test_split
    hyps = tmp_path / "hyps.txt"
    hyps.write_text("".join(h + "\n" for h in fairseq_hyps))
    outputs = {}
    for name, extra in [("full", ["--per-source", "1000", "--common", "0"]),
                        ("empty", ["--per-source", "0", "--common", "0"])]:
        vmap = tmp_path / f"{name}.vmap"
        proc = subprocess.run([sys.executable, "-m", "fairseq_imitkd_vmap", "--source", source, "--target", hyps,
                               "-o", vmap, *extra], capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        model = tmp_path / f"ct2_{name}"
        proc = _export(word_kd_student / "checkpoint_best.pt", "-o", model, "--quantization", "float32",
                       "--vmap", vmap)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (model / "vmap.txt").is_file()
        out = tmp_path / f"{name}.out"
        proc = _translate(model, "-i", source, "-o", out, "--beam", "1", "--use-vmap")
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[name] = out.read_text().splitlines()
    assert outputs["full"] == fairseq_hyps
    assert outputs["empty"] != fairseq_hyps
    msg = _one_line_error(_translate(tmp_path / "ct2_full", "-i", source, "-o", tmp_path / "x", "--read-batch-size",
                                     "-1"), "imitkd-translate")
    assert "--read-batch-size must be >= 0" in msg
    bad = subprocess.run([sys.executable, "-m", "fairseq_imitkd_vmap", "--source", tmp_path / "nosuch", "--target",
                          hyps, "-o", tmp_path / "v"], capture_output=True, text=True, env=ENV, timeout=300)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("imitkd-vmap: --source")


def _fake_model(tmp_path):
    """A directory that passes imitkd-translate's checks (its weights are never read by these tests)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.bin").write_bytes(b"")
    return model


@pytest.mark.parametrize("link", ["same", "relative", "symlink", "hardlink"])
def test_translating_a_file_into_itself_is_refused_and_keeps_it(tmp_path, link):
    model, text = _fake_model(tmp_path), tmp_path / "text.txt"
    text.write_text("s1 s2\ns3\n")
    output = {"same": text, "relative": tmp_path / "." / "text.txt", "symlink": tmp_path / "link.txt",
              "hardlink": tmp_path / "hard.txt"}[link]
    if link == "symlink":
        output.symlink_to(text)
    elif link == "hardlink":
        os.link(text, output)
    msg = _one_line_error(_translate(model, "-i", text, "-o", output), "imitkd-translate")
    assert "is the input file" in msg and str(output) in msg, msg
    assert text.read_text() == "s1 s2\ns3\n"


@pytest.mark.parametrize("where", ["missing_dir", "a_directory", "stats_in_a_missing_dir"])
def test_an_output_that_cannot_be_written_is_one_line(tmp_path, where):
    """Refused before anything is translated (the --stats file is written last, after the whole file)."""
    model, text = _fake_model(tmp_path), tmp_path / "text.txt"
    text.write_text("s1 s2\n")
    output = {"missing_dir": tmp_path / "nowhere" / "out.txt", "a_directory": tmp_path}.get(where, tmp_path / "out")
    stats = ["--stats", tmp_path / "nowhere" / "stats.json"] if where == "stats_in_a_missing_dir" else []
    msg = _one_line_error(_translate(model, "-i", text, "-o", output, *stats), "imitkd-translate")
    named = stats[1] if stats else output
    assert str(named) in msg and ("is a directory" if where == "a_directory" else "does not exist") in msg, msg
    assert not (tmp_path / "nowhere").exists()


def test_a_failed_translation_leaves_the_previous_output_in_place(tmp_path, monkeypatch):
    """The output is written beside the target and renamed at the end: a crash mid-file keeps the old file,
    and leaves no temporary file behind; a finished run replaces it."""
    import types

    import fairseq_imitkd_translate as translate

    class Translator:
        fail = True

        def __init__(self, *args, **kwargs):
            pass

        def translate_file(self, source, output, **kwargs):
            with open(output, "w") as f:
                f.write("half a transl")
                if Translator.fail:
                    raise RuntimeError("killed mid-file")
                f.write("ation\n")
            return types.SimpleNamespace(num_examples=1, num_tokens=2, total_time_in_ms=1.0)

    monkeypatch.setitem(sys.modules, "ctranslate2", types.SimpleNamespace(Translator=Translator))
    model, text, out = _fake_model(tmp_path), tmp_path / "text.txt", tmp_path / "out.txt"
    text.write_text("s1 s2\n")
    out.write_text("the previous translations\n")
    args = translate.parse_args([str(model), "-i", str(text), "-o", str(out)])
    with pytest.raises(RuntimeError, match="killed mid-file"):
        translate.translate(args)
    assert out.read_text() == "the previous translations\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out.txt", "text.txt"]
    Translator.fail = False
    assert translate.translate(args)["sentences"] == 1
    assert out.read_text() == "half a translation\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out.txt", "text.txt"]


def test_translate_imports_neither_torch_nor_fairseq():
    """A deployed student needs neither: imitkd-translate loads fairseq_imitkd/ct2_deploy.py by its path, and never
    the package, whose __init__ imports both."""
    code = ("import sys, fairseq_imitkd_translate as t; print(t.ct2_deploy.MANIFEST, "
            "sorted(m for m in ('torch', 'fairseq', 'fairseq_imitkd') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "imitkd_export.json []", out.stdout + out.stderr
