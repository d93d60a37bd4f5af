"""The Multi30k benchmark driver's bookkeeping (the benchmark itself runs for hours, outside the tests)."""
import json
import os
import sys
import threading

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "benchmarks", "multi30k")
sys.path.insert(0, BENCH)

import methods  # noqa: E402
import run  # noqa: E402


def _line(tag, rec):
    return f"2026-11-22 18:06:35 | INFO | {tag} | {json.dumps(rec)}\n"


def test_parse_train_log_sums_epochs_and_keeps_the_last_record_of_a_resumed_one(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "$ fairseq-train ...\n"
        + _line("train_inner", {"epoch": 1, "num_updates": "25", "train_wall": "9"})
        + _line("train", {"epoch": 1, "train_num_updates": "230", "train_train_wall": "100"})
        + _line("valid", {"epoch": 2, "valid_bleu": "10.5", "valid_num_updates": "300"})
        + _line("train", {"epoch": 2, "train_num_updates": "400", "train_train_wall": "70"})  # killed, then resumed:
        + "$ fairseq-train ...\n"
        + _line("valid", {"epoch": 2, "valid_bleu": "12.0", "valid_num_updates": "400"})
        + _line("valid", {"epoch": 3, "valid_bleu": "12.0", "valid_num_updates": "500"})
        + _line("train", {"epoch": 2, "train_num_updates": "460", "train_train_wall": "80"})
        + _line("train", {"epoch": 3, "train_num_updates": "500", "train_train_wall": "20"})
    )
    got = run.parse_train_log(str(log))
    assert got["updates"] == 500
    assert got["train_steps_s"] == 200.0  # 100 + 80 (the resumed epoch's last record) + 20
    assert got["sec_per_update"] == pytest.approx(0.4)
    assert got["val_bleu_selection"] == 12.0 and got["best_update"] == 400  # ties go to the earlier checkpoint
    assert got["valid_bleu_curve"] == {"300": 10.5, "400": 12.0, "500": 12.0}


def test_parse_train_log_without_an_epoch_line_names_the_file(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("$ fairseq-train ...\nTraceback ...\n")
    with pytest.raises(RuntimeError, match="train.log: no end-of-epoch"):
        run.parse_train_log(str(log))


def test_scheduler_respects_dependencies_and_skips_dependents_of_a_failure():
    order, lock = [], threading.Lock()

    def job(name, fail=False):
        def fn():
            with lock:
                order.append(name)
            if fail:
                raise ValueError(name)
        return fn

    s = run.Scheduler(2)
    s.add("corpus", job("corpus"))
    s.add("bad", job("bad", fail=True))
    s.add("uses_corpus", job("uses_corpus"), deps=["corpus"])
    s.add("uses_bad", job("uses_bad"), deps=["bad"])
    s.add("after_skipped", job("after_skipped"), deps=["uses_bad"])
    failed = s.run()
    assert sorted(failed) == ["after_skipped", "bad", "uses_bad"]
    assert order.index("corpus") < order.index("uses_corpus")
    assert "uses_bad" not in order and "after_skipped" not in order


def test_every_method_has_arguments_and_kd_methods_get_the_teacher():
    teacher = ["--teacher-path", "t.pt"]
    for m, spec in methods.METHODS.items():
        args = methods.method_args(m, teacher)
        assert "--criterion" in args
        assert ("--teacher-path" in args) == spec["kd"] == (args[args.index("--task") + 1] == "distillation")
    assert set(methods.MAIN_METHODS) <= set(methods.METHODS)
    for tier in methods.TIERS.values():
        assert all(len(tier["seeds"][m]) >= 2 for m in methods.MAIN_METHODS)
        assert tier["validate_after"] <= tier["max_update"]


def test_bad_options_are_refused_with_their_name(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--methods", "scratch,nope"])
    assert "unknown method(s) nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse_args(["--jobs", "0"])
    assert "--jobs must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse_args(["--seeds", "1,x"])
    assert "--seeds must be comma-separated integers" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["results.json"])
def test_committed_results_have_what_the_readme_table_reads(name):
    path = os.path.join(BENCH, name)
    if not os.path.exists(path):
        pytest.skip(f"{name} not committed yet")
    with open(path, encoding="utf-8") as f:
        res = json.load(f)
    assert res["teacher_bleu_beam5"] > 0 and res["teacher_sents_per_sec"] > 0
    assert set(res["methods"]) == set(methods.METHODS)
    for m, r in res["methods"].items():
        for key in ("bleu_greedy", "bleu_beam5", "sec_per_update", "student_sents_per_sec"):
            assert isinstance(r[key], (int, float)), (m, key)
    for m in methods.MAIN_METHODS:
        assert len(res["methods"][m]["seeds"]) >= 2


def test_report_keeps_methods_whose_names_share_a_prefix_apart(tmp_path):
    import report

    args = run.parse_args(["--workdir", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    ctx = run.Context(args)
    keys = ("bleu_greedy", "bleu_beam5", "val_bleu_selection", "val_bleu_greedy", "sec_per_update",
            "train_total_s", "updates", "best_update")
    for method, seed, bleu in (("imitkd", 1, 20.0), ("imitkd_star", 1, 30.0), ("scratch", 1, 10.0),
                               ("scratch", 2, 12.0)):
        d = ctx.run_dir(method, seed)
        os.makedirs(d)
        with open(os.path.join(d, "result.json"), "w") as f:
            json.dump(dict({k: bleu for k in keys}, method=method, seed=seed, command="x"), f)
    got = report.collect(ctx)["methods"]
    assert got["imitkd"]["bleu_greedy"] == 20.0 and got["imitkd"]["seeds"] == [1]
    assert got["imitkd_star"]["bleu_greedy"] == 30.0
    assert got["scratch"]["bleu_greedy"] == 11.0 and got["scratch"]["bleu_greedy_stats"]["std"] == pytest.approx(1.41)
