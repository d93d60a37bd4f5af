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
        args = methods.method_args(m, teacher, caches={32: "cache_dir"})
        assert "--criterion" in args
        assert ("--kd-teacher-cache" in args) == ("cache" in spec)
        if "cache" in spec:
            assert args[args.index("--kd-teacher-cache") + 1] == "cache_dir"
        assert ("--teacher-path" in args) == spec["kd"] == (args[args.index("--task") + 1] == "distillation")
    assert set(methods.MAIN_METHODS) <= set(methods.METHODS)
    for tier in methods.TIERS.values():
        assert all(len(tier["seeds"][m]) >= 2 for m in methods.MAIN_METHODS)
        assert tier["max_update"] is None or tier["validate_after"] <= tier["max_update"]  # None: from the curve
    for name, compared in methods.TIER_METHODS.items():
        assert name in methods.TIERS and set(compared) <= set(methods.ALL)


@pytest.mark.parametrize("argv,message", [
    (["--methods", "scratch,nope"], "unknown method(s) nope"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--seeds", "1,x"], "--seeds must be comma-separated integers"),
    (["--methods", "scratch,word_kd@1+x"], "--methods word_kd@1+x: seeds after @"),
])
def test_bad_options_are_refused_with_their_name(capsys, argv, message):
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_method_can_have_its_own_seeds():
    ctx = run.Context(run.parse_args(["--methods", "scratch,word_kd@3,seqkd@1+2", "--seeds", "5"]))
    assert ctx.seeds == {"scratch": [5], "word_kd": [3], "seqkd": [1, 2]}


@pytest.mark.parametrize("name", ["results.json", "results_competent.json"])
def test_committed_results_have_what_the_readme_table_reads(name):
    path = os.path.join(BENCH, name)
    if not os.path.exists(path):
        pytest.skip(f"{name} not committed yet")
    with open(path, encoding="utf-8") as f:
        res = json.load(f)
    assert res["methods"] and set(res["methods"]) <= set(methods.METHODS)
    assert set(res["ablations"]) <= set(methods.ABLATIONS)
    if res["tier"] == "quick" and res["teacher_sents_per_sec"] is not None:
        assert res["teacher_bleu_beam5"] > 0 and res["teacher_sents_per_sec"] > 0
    for m, r in {**res["methods"], **res["ablations"]}.items():
        for key in ("bleu_greedy", "bleu_beam5", "bleu_greedy_nolimit", "sec_per_update"):
            assert isinstance(r[key], (int, float)), (m, key)
        assert 0.0 <= r["at_limit_share_nolimit"] <= 1.0 and r["len_ratio_nolimit"] > 0, m
        assert len(r["seeds"]) >= 1 and set(r["seeds"]) <= set(r["seeds_planned"]), m
    for b in res["paired_bootstrap"]:
        assert b["baseline"] in res["methods"] and b["system"] in {**res["methods"], **res["ablations"]}
        assert 0.0 <= b["p_value"] <= 1.0


def test_competent_tier_continues_the_quick_scratch_student(tmp_path):
    args = run.parse_args(["--tier", "competent", "--workdir", str(tmp_path)])
    assert args.methods.split(",") == list(methods.COMPETENT_METHODS)
    ctx = run.Context(args)
    assert ctx.start_checkpoint(2) == os.path.join(str(tmp_path), "quick", "runs", "scratch_s2", "checkpoint_last.pt")
    assert run.parse_args(["--workdir", str(tmp_path)]).methods.split(",") == list(methods.METHODS)
    # a smoke run continues a smoke run, not the real quick tier
    smoke = run.Context(run.parse_args(["--tier", "competent", "--workdir", str(tmp_path), "--max-update", "7"]))
    assert "quick_u7" in smoke.start_checkpoint(1)


# --- the learning curve and the converged tier ----------------------------------------------------------

def test_plateau_is_the_first_point_after_which_the_curve_never_rises_by_delta():
    import curve

    rising_then_flat = [(250, 10.0), (500, 20.0), (750, 25.0), (1000, 26.0), (1250, 26.2), (1500, 26.1), (1750, 26.25)]
    assert curve.plateau(rising_then_flat, delta=0.3) == 1000  # after 1000: at most +0.25
    assert curve.plateau(rising_then_flat, delta=1.5) == 750  # after 750: at most +1.25
    assert curve.plateau(list(reversed(rising_then_flat)), delta=0.3) == 1000  # order does not matter
    # a late rise past delta moves the plateau past the dip before it
    assert curve.plateau([(1, 10.0), (2, 12.0), (3, 11.0), (4, 12.5)], delta=0.3) == 4


def test_the_budget_is_the_later_plateau_of_the_seed_averaged_curves():
    import curve

    scratch = [{"250": 10.0, "500": 20.0, "750": 22.0, "1000": 22.1}, {"250": 12.0, "500": 22.0, "750": 24.0,
                                                                       "1000": 24.1, "1250": 30.0}]
    word_kd = [{"250": 15.0, "500": 25.0, "750": 25.1, "1000": 25.2}]
    got = curve.choose_budget({"scratch": scratch, "word_kd": word_kd}, delta=0.3)
    # scratch's seeds share 250-1000 (the second seed's 1250 is not averaged): 11, 21, 23, 23.1 -> 750
    assert got["methods"]["scratch"]["mean_curve"] == [[250, 11.0], [500, 21.0], [750, 23.0], [1000, 23.1]]
    assert got["methods"]["scratch"]["plateau_update"] == 750 and got["methods"]["word_kd"]["plateau_update"] == 500
    assert got["budget_updates"] == 750 and not got["lower_bound"]
    still_rising = curve.choose_budget({"word_kd": [{"1": 1.0, "2": 2.0, "3": 3.0}]}, delta=0.3)
    assert still_rising["budget_updates"] == 3 and still_rising["lower_bound"]
    with pytest.raises(ValueError, match="needs 3 or more"):
        curve.choose_budget({"word_kd": [{"1": 1.0, "2": 2.0}]}, delta=0.3)


def test_the_converged_tier_reads_its_budget_from_the_curve_or_says_how_to_measure_it(tmp_path, monkeypatch):
    import curve

    args = run.parse_args(["--tier", "converged", "--workdir", str(tmp_path)])
    assert args.methods.split(",") == list(methods.TIER_METHODS["converged"])
    missing = str(tmp_path / "curve.json")
    monkeypatch.setattr(curve, "CURVE_JSON", missing)
    with pytest.raises(SystemExit, match="run benchmarks/multi30k/run.py --tier curve"):
        run.Context(args)
    (tmp_path / "curve.json").write_text(json.dumps({"budget_updates": 3250}))
    assert run.Context(args).tier["max_update"] == 3250
    # a smoke run needs no curve
    (tmp_path / "curve.json").unlink()
    smoke = run.Context(run.parse_args(["--tier", "converged", "--workdir", str(tmp_path), "--max-update", "9"]))
    assert smoke.tier["max_update"] == 9
    assert run.parse_args(["--tier", "curve", "--workdir", str(tmp_path)]).methods == "scratch,word_kd"
    # a shortened curve still validates four times; other tiers' smoke runs validate once, at the end
    short = run.Context(run.parse_args(["--tier", "curve", "--workdir", str(tmp_path), "--max-update", "40"])).tier
    assert (short["validate_after"], short["validate_every"]) == (10, 10)
    quick = run.Context(run.parse_args(["--workdir", str(tmp_path), "--max-update", "40"])).tier
    assert (quick["validate_after"], quick["validate_every"]) == (40, 40)


def test_parse_train_log_weighs_each_epochs_tokens_per_update_by_its_updates(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        _line("train", {"epoch": 1, "train_num_updates": "100", "train_train_wall": "10", "train_wpb": "8000"})
        + _line("train", {"epoch": 2, "train_num_updates": "150", "train_train_wall": "5", "train_wpb": "5000"})
    )
    assert run.parse_train_log(str(log))["tokens_per_update"] == pytest.approx((100 * 8000 + 50 * 5000) / 150, abs=0.1)


def test_fair_settings_are_shared():
    teacher = ["--teacher-path", "t.pt"]
    common = methods.common_args(methods.TIERS["quick"], 1)
    assert common[common.index("--clip-norm") + 1] == str(methods.CLIP_NORM)
    for m in methods.ALL:
        args = methods.method_args(m, teacher, caches={32: "cache_dir"})
        one_hot = "--criterion" in args and (args[args.index("--criterion") + 1] != "imitkd"
                                             or args[args.index("--imitkd-target") + 1] == "argmax")
        # label smoothing 0.1 on every one-hot target, none on teacher distributions
        assert ("--label-smoothing" in args) == one_hot, m
        if one_hot:
            assert args[args.index("--label-smoothing") + 1] == "0.1"
    star = methods.method_args("imitkd_star", teacher)
    assert star[star.index("--imitkd-beta-base") + 1] == "2"
    warm = methods.method_args("imitkd_full_warmup", teacher, methods.TIERS["competent"])
    assert warm[warm.index("--imitkd-beta-warmup-updates") + 1] == "200"


def test_output_lengths_and_the_share_at_the_limit():
    import evaluate
    from fairseq_generate_io import output_lengths

    lines = ["S-0\tein Hund\n", "H-0\t-0.1\ta dog\n", "P-0\t-0.1 -0.2 -0.3\n",
             "P-1\t" + " ".join(["-0.5"] * 13) + "\n", "P-2\t-0.4\n"]
    lengths = output_lengths(lines)
    assert lengths == {0: 2, 1: 12, 2: 0}  # EOS is not counted
    # limits int(1.2*src + 10) with src 1, 2, 3 -> 11, 12, 13: only sentence 1 stops at its limit
    stats = evaluate.length_stats(lengths, [1, 2, 3], (1.2, 10))
    assert stats == {"at_limit_share": round(1 / 3, 4), "mean_out_tokens": round(14 / 3, 2)}
    assert evaluate.length_stats(lengths, [1, 2, 3], evaluate.DEFAULT_MAX_LEN)["at_limit_share"] == 0.0


def test_report_keeps_methods_whose_names_share_a_prefix_apart(tmp_path):
    import collect

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
    got = collect.collect(ctx)["methods"]
    assert got["imitkd"]["bleu_greedy"] == 20.0 and got["imitkd"]["seeds"] == [1]
    assert got["imitkd_star"]["bleu_greedy"] == 30.0
    assert got["scratch"]["bleu_greedy"] == 11.0 and got["scratch"]["bleu_greedy_stats"]["std"] == pytest.approx(1.41)


def _finished_run(ctx, method, seed, bleu, hyp_lines=None):
    d = ctx.run_dir(method, seed)
    os.makedirs(d, exist_ok=True)
    rec = dict(method=method, seed=seed, bleu_greedy=bleu, bleu_beam5=bleu, sec_per_update=0.5, command="x")
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump(rec, f)
    if hyp_lines is not None:
        with open(os.path.join(d, "test.beam1.hyp"), "w") as f:
            f.write("\n".join(hyp_lines) + "\n")
    return rec, d


def test_archived_runs_outlive_the_work_directory_and_the_work_directory_wins(tmp_path):
    import shutil

    import collect

    out = tmp_path / "out"
    ctx = run.Context(run.parse_args(["--workdir", str(tmp_path / "work"), "--out-dir", str(out)]))
    assert ctx.archive.dir == os.path.join(str(out), "runs", "quick")
    rec, d = _finished_run(ctx, "scratch", 1, 10.0, ["a dog runs", "a cat sits"])
    ctx.archive.save_run(rec, d)
    first = (out / "runs" / "quick" / "scratch_s1.test.beam1.hyp.gz").read_bytes()
    ctx.archive.save_run(rec, d)  # the same bytes again: a rerun leaves git clean
    assert (out / "runs" / "quick" / "scratch_s1.test.beam1.hyp.gz").read_bytes() == first
    shutil.rmtree(tmp_path / "work")  # the session that ran seed 1 is gone
    _finished_run(ctx, "scratch", 2, 14.0)
    got = collect.collect(ctx)["methods"]["scratch"]
    assert got["seeds"] == [1, 2] and got["bleu_greedy"] == 12.0
    with open(ctx.archive.hypothesis("scratch", 1, "test.beam1", str(tmp_path / "tmp"))) as f:
        assert f.read() == "a dog runs\na cat sits\n"
    assert ctx.archive.hypothesis("scratch", 2, "test.beam1", str(tmp_path / "tmp")) is None
    _finished_run(ctx, "scratch", 1, 11.0)  # rerun here: its fresh record is read, not the archived one
    assert collect.collect(ctx)["methods"]["scratch"]["bleu_greedy"] == 12.5


def test_an_archived_run_is_not_rerun_unless_another_tier_needs_its_checkpoint(tmp_path, monkeypatch):
    ctx = run.Context(run.parse_args(["--workdir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")]))
    ctx.archive.save_run(dict(method="scratch", seed=1, bleu_greedy=1.0), str(tmp_path))
    trained = []
    monkeypatch.setattr(run, "train", lambda c, m, s: trained.append((m, s)) or {})
    monkeypatch.setattr(run, "evaluate_checkpoint", lambda c, best, d: {})
    run.train_and_evaluate(ctx, "scratch", 1)
    assert trained == []
    best = os.path.join(ctx.run_dir("scratch", 1), "checkpoint_best.pt")
    os.makedirs(os.path.dirname(best))
    open(best, "w").close()
    run.train_and_evaluate(ctx, "scratch", 1, need_checkpoint=True)
    assert trained == [("scratch", 1)]
    assert os.path.exists(os.path.join(ctx.run_dir("scratch", 1), "result.json"))


def test_archive_finished_replaces_rebuilt_records_and_keeps_real_ones(tmp_path):
    ctx = run.Context(run.parse_args(["--workdir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")]))
    ctx.archive.save_run(dict(method="scratch", seed=1, bleu_greedy=1.0, restored="rebuilt"), str(tmp_path))
    ctx.archive.save_run(dict(method="word_kd", seed=1, bleu_greedy=2.0), str(tmp_path))
    _finished_run(ctx, "scratch", 1, 10.0)
    _finished_run(ctx, "word_kd", 1, 20.0)
    _finished_run(ctx, "seqkd", 1, 30.0)
    run.archive_finished(ctx)
    got = {m: r["bleu_greedy"] for (m, _s), r in ctx.archive.runs().items()}
    assert got == {"scratch": 10.0, "word_kd": 2.0, "seqkd": 30.0}


def _bootstrap_context(tmp_path):
    """A tier over four test references, the references themselves and a worse system's outputs."""
    text = tmp_path / "text"
    text.mkdir()
    refs = ["a dog runs on the grass", "two men play football", "a woman reads a book", "the child is smiling"]
    (text / "test_2016_flickr.en").write_text("\n".join(refs) + "\n")
    ctx = run.Context(run.parse_args(["--workdir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"),
                                      "--text-dir", str(text)]))
    worse = ["a dog runs", "two men play", "a woman reads", "the child"]
    return ctx, refs, worse


def test_bootstrap_pairs_each_system_on_the_lowest_seed_both_have(tmp_path):
    import collect

    ctx, refs, worse = _bootstrap_context(tmp_path)
    _finished_run(ctx, "scratch", 2, 1.0, worse)
    rec, d = _finished_run(ctx, "scratch", 3, 1.0, worse)
    ctx.archive.save_run(rec, d)
    _finished_run(ctx, "word_kd", 3, 2.0, refs)  # word_kd has seed 3 only: its pair is seed 3
    present = collect.collect(ctx)["methods"]
    got = collect.bootstrap(ctx, present)
    greedy = [b for b in got if b["decode"] == "greedy"]
    assert [(b["baseline"], b["system"], b["seed"]) for b in greedy] == [("scratch", "word_kd", 3)]
    assert greedy[0]["bleu"] == 100.0 and greedy[0]["baseline_bleu"] < 100.0


def test_bootstrap_pairs_different_seeds_when_no_seed_has_both(tmp_path):
    import collect

    ctx, refs, worse = _bootstrap_context(tmp_path)
    _finished_run(ctx, "word_kd", 3, 1.0, worse)
    _finished_run(ctx, "word_kd_jsd", 1, 2.0, refs)  # seed 1 only: no seed with both outputs
    present = collect.collect(ctx)["methods"]
    greedy = [b for b in collect.bootstrap(ctx, present) if b["decode"] == "greedy" and b["baseline"] == "word_kd"]
    assert [(b["system"], b["seed"]) for b in greedy] == [("word_kd_jsd", "1/3")]
    assert greedy[0]["bleu"] == 100.0 and greedy[0]["baseline_bleu"] < 100.0


def test_bootstrap_pairs_a_corpus_ablation_with_seqkd_on_every_common_seed(tmp_path):
    import collect

    ctx, refs, worse = _bootstrap_context(tmp_path)
    for seed in (1, 2):
        _finished_run(ctx, "seqkd", seed, 1.0, worse)
        _finished_run(ctx, "seqkd_ct2", seed, 2.0, refs)
        _finished_run(ctx, "imitkd", seed, 2.0, refs)
    got = collect.collect(ctx)
    assert "seqkd_ct2" in got["ablations"] and "seqkd_ct2" not in got["methods"]
    greedy = [(b["baseline"], b["system"], b["seed"]) for b in collect.bootstrap(ctx, got["methods"], got["ablations"])
              if b["decode"] == "greedy" and b["baseline"] == "seqkd"]
    # the ablation on both seeds, the method on its lowest common seed only
    assert sorted(greedy) == [("seqkd", "imitkd", 1), ("seqkd", "seqkd_ct2", 1), ("seqkd", "seqkd_ct2", 2)]
    # without the ablations passed in, no corpus pair
    assert all(b["system"] != "seqkd_ct2" for b in collect.bootstrap(ctx, got["methods"]))


def test_only_the_architecture_ablation_changes_the_student():
    archs = {m: spec.get("arch", methods.STUDENT) for m, spec in methods.ALL.items()}
    assert {a for m, a in archs.items() if m in methods.METHODS} == {methods.STUDENT}
    assert archs["word_kd_cache_deep_shallow"] == "transformer_student_deep_shallow"
    common = methods.common_args(methods.TIERS["quick"], 1, archs["word_kd_cache_deep_shallow"])
    assert common.count("--arch") == 1 and common[common.index("--arch") + 1] == "transformer_student_deep_shallow"


def _ct2_row(model, engine, weights, beam, sps, bleu, lever=None, teacher_sps=(50.0, 200.0)):
    row = dict(model=model, engine=engine, weights=weights, beam=beam, batch_size=64, sents_per_sec=sps, bleu=bleu,
               x_fairseq_teacher_beam5=sps / teacher_sps[0], x_ct2_int8_teacher_beam5=sps / teacher_sps[1])
    return dict(row, lever=lever) if lever else row


def test_each_ct2_speed_run_gets_its_own_table_with_the_vmap_columns():
    import tables

    first = dict(file="ct2_speed.json", date="d1", threads=1, rows=[
        _ct2_row("teacher", "fairseq", "float32", 5, 50.0, 39.0),
        _ct2_row("teacher", "ctranslate2", "float32", 5, 100.0, 39.0),
        _ct2_row("teacher", "ctranslate2", "int8", 5, 200.0, 39.1),
        _ct2_row("a", "fairseq", "float32", 1, 250.0, 20.0),
        _ct2_row("a", "ctranslate2", "float32", 1, 1000.0, 20.0),
        _ct2_row("a", "ctranslate2", "int8", 1, 2000.0, 19.5),
        _ct2_row("a", "ctranslate2", "int8", 1, 3000.0, 19.25, lever="vmap")])
    second = dict(first, file="ct2_speed_arch.json", date="d2", rows=first["rows"][:6])
    text = tables.ct2_table({"ctranslate2_speed": [first, second]})
    assert text.count("| model | fairseq sents/s") == 2
    assert "ct2_speed.json`, d1" in text and "ct2_speed_arch.json`, d2" in text
    # int8 / +vmap: 2000/50 = 40, 3000/50 = 60; 2000/200 = 10, 3000/200 = 15
    assert "| a | 250.0 | 1000.0 | 2000.0 | 3000.0 | 40.0 / 60.0 | 10.0 / 15.0 | 20.00 → 19.50 / 19.25 |" in text
    assert "| a | 250.0 | 1000.0 | 2000.0 |  | 40.0 | 10.0 | 20.00 → 19.50 |" in text
    assert tables.ct2_table({"ctranslate2_speed": []}) == ""
    assert "Deployed as a user would" not in text  # neither run timed the deployment setting


def test_the_deployment_setting_is_compared_with_fairseq_at_the_same_limit():
    import tables

    rows = [_ct2_row("teacher", "fairseq", "float32", 5, 50.0, 39.0),
            _ct2_row("teacher", "ctranslate2", "float32", 5, 100.0, 39.0),
            _ct2_row("teacher", "ctranslate2", "int8", 5, 200.0, 39.1),
            _ct2_row("a", "fairseq", "float32", 1, 250.0, 20.0),
            _ct2_row("a", "fairseq", "float32", 1, 300.0, 24.0, lever="max len 64"),
            _ct2_row("a", "ctranslate2", "float32", 1, 1000.0, 20.0),
            _ct2_row("a", "ctranslate2", "int8", 1, 2000.0, 19.5),
            _ct2_row("a", "ctranslate2", "int8 7-bit", 1, 4000.0, 23.75, lever="vmap + max len 64")]
    text = tables.ct2_table({"ctranslate2_speed": [dict(file="f.json", date="d", threads=1, rows=rows)]})
    assert "Deployed as a user would" in text
    # 4000/50 = 80, 4000/200 = 20; BLEU against fairseq at 64 pieces (24.0), not at 200 (20.0)
    assert "| a | 300.0 | 4000.0 | 80.0 | 20.0 | 24.00 → 23.75 |" in text


def test_without_matplotlib_the_results_are_written_unplotted_after_one_warning(tmp_path, monkeypatch, capsys):
    """matplotlib is an extra ([bench]): without it the run says so once, at its start, and writes its results
    without the plot, instead of ending in a traceback at the plot after hours of training."""
    import logging

    import data

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(data, "check_inputs", lambda *a: None)
    out = tmp_path / "out"
    argv = ["--report-only", "--workdir", str(tmp_path / "work"), "--out-dir", str(out)]
    ctx = run.Context(run.parse_args(argv))
    _finished_run(ctx, "scratch", 1, 10.0)
    capsys.readouterr()
    assert run.main(argv) == 0  # it logs to stdout (logging.basicConfig(force=True))
    logging.getLogger().handlers.clear()  # its handler holds pytest's captured stdout
    warnings = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "without the BLEU-against-speed plot" in warnings[0], warnings
    written = sorted(p.name for p in out.iterdir())
    assert "results.json" in written and "results.md" in written and not any(n.endswith(".png") for n in written)
    assert "![" not in (out / "results.md").read_text()
