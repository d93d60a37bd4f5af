"""Distillation in one command: Multi30k De->En, a teacher trained here, three students, one BLEU table.

    python examples/demo/run.py                                  # downloads Multi30k (about 4 MB)
    python examples/demo/run.py --local ../shared/data/multi30k  # or reads a local copy of data/task1/raw

It prepares the data (a joint sentencepiece model trained here, fairseq binarization), trains a small
teacher, then three students of one size with the same budget: from scratch (label-smoothed CE),
word-level KD, and the recommended ImitKD setting (ImitKD+Full, greedy rollouts, the agreement clock),
and prints their greedy test BLEU beside the teacher's. The sizes are chosen so that the whole run fits
in about 20 minutes on 2 CPU cores; ``--size smoke`` is a seconds-long run of the same steps for CI.

Each step prints one status line; fairseq's own output goes to log files under ``--workdir``. A step
that finished is skipped when the command runs again, and an interrupted training resumes from its
``checkpoint_last.pt``, so rerunning the same command after Ctrl-C continues where it stopped.

The data, training and evaluation helpers are the Multi30k benchmark's (``benchmarks/multi30k``); the
student recipes are its ``methods.py`` entries, so the demo trains exactly what the benchmark measures,
only for fewer updates.
"""
import argparse
import gzip
import importlib.util
import json
import logging
import os
import shutil
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "benchmarks", "multi30k"))

import data  # noqa: E402  (benchmarks/multi30k)
import evaluate  # noqa: E402
import methods  # noqa: E402


def load_file(name: str, path: str):
    """The module in ``path``, under ``name``, loaded without importing any package around it."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the benchmark's run.py, under its own name: this file is "run" too when imported
bench = load_file("multi30k_run", os.path.join(REPO, "benchmarks", "multi30k", "run.py"))

USER_DIR = os.path.join(REPO, "fairseq_imitkd")
URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/{name}.gz"
logger = logging.getLogger("demo")

# The students: (name, benchmark method, what the table calls it). The recommended ImitKD setting is
# docs/criterion-imitkd.md, "Which β schedule to use when": full targets, greedy rollouts, the agreement clock.
STUDENTS = (
    ("scratch", "scratch", "scratch (label-smoothed CE on gold)"),
    ("word_kd", "word_kd", "word_kd (alpha 0.5)"),
    ("imitkd", "imitkd_full_adaptive", "ImitKD+Full, greedy, agreement clock"),
)

# full: measured to fit 20 minutes on 2 cores (README); smoke: the same steps in seconds, for CI.
# ``lines``: train/valid/test sentences kept (None: all); teacher and students train ``*_updates`` updates.
# The teacher is the students' width with two more decoder layers, trained longer: on one CPU thread for
# minutes, a d=128 model learns fastest per second (a 3+3 d=192 one ran 1.6x and a d=256 one 3.8x slower
# per update), and its extra training is what makes it the better model here.
_TEACHER_ARCH = ["--arch", "transformer", "--encoder-layers", "3", "--decoder-layers", "3",
                 "--encoder-embed-dim", "128", "--decoder-embed-dim", "128", "--encoder-ffn-embed-dim", "512",
                 "--decoder-ffn-embed-dim", "512", "--encoder-attention-heads", "4", "--decoder-attention-heads", "4"]
SIZES = {
    "full": dict(lines=None, vocab=5000, teacher_arch=_TEACHER_ARCH, teacher_desc="transformer 3+3, d=128",
                 teacher_updates=600, teacher_tokens=2048, teacher_warmup=100,
                 student_arch=methods.STUDENT, student_desc="3+1, d=128",
                 student_updates=400, student_tokens=2048, student_warmup=100),
    "smoke": dict(lines=(600, 40, 40), vocab=300, teacher_arch=["--arch", "transformer_student_tiny"],
                  teacher_desc="tiny 1+1, d=32", teacher_updates=6, teacher_tokens=1024, teacher_warmup=2,
                  student_arch="transformer_student_tiny", student_desc="1+1, d=32",
                  student_updates=3, student_tokens=1024, student_warmup=1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local", metavar="DIR",
                   help="read Multi30k from DIR ({train,val,test_2016_flickr}.{de,en}, plain or .gz) "
                        "instead of downloading it")
    p.add_argument("--workdir", default=os.path.join(HERE, "work"),
                   help="data, checkpoints and logs; a rerun resumes from it (default: %(default)s)")
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="full (default) or smoke (CI)")
    p.add_argument("--jobs", type=int, default=2, help="trainings side by side, one thread each (default 2, for 2 cores)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.local and not os.path.isdir(args.local):
        p.error(f"--local {args.local}: no such directory")
    return args


def fmt_s(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Status:
    """One line per step on stdout; while trainings run, their update counts (read from their logs) on a
    line rewritten in place on a terminal, or every minute otherwise."""

    def __init__(self):
        self.t0 = time.time()
        self.running = {}  # name -> (log path, total updates, start time)
        self.lock = threading.Lock()
        self.tty = sys.stdout.isatty()
        self.stop = threading.Event()
        threading.Thread(target=self._monitor, daemon=True).start()

    def say(self, msg: str) -> None:
        with self.lock:
            clear = "\r\033[K" if self.tty else ""
            print(f"{clear}[{fmt_s(time.time() - self.t0):>6}] {msg}", flush=True)

    def track(self, name: str, log_path: str, total: int) -> None:
        with self.lock:
            self.running[name] = (log_path, total, time.time())

    def untrack(self, name: str) -> None:
        with self.lock:
            self.running.pop(name, None)

    @staticmethod
    def _updates(log_path: str) -> int:
        try:
            with open(log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(log_path) - 20000))
                tail = f.read().decode("utf-8", "replace")
        except OSError:
            return 0
        marker = '"num_updates": "'
        i = tail.rfind(marker)
        return int(tail[i + len(marker):].split('"', 1)[0]) if i >= 0 else 0

    def _line(self) -> str:
        parts = [f"{n} {self._updates(log)}/{total} updates ({fmt_s(time.time() - t)})"
                 for n, (log, total, t) in self.running.items()]
        return "  ... " + " | ".join(parts) if parts else ""

    def _monitor(self) -> None:
        last = time.time()
        while not self.stop.wait(2.0):
            with self.lock:
                line = self._line()
                if not line:
                    continue
                if self.tty:
                    print("\r\033[K" + line[:150], end="", flush=True)
                elif time.time() - last >= 60:
                    print(line, flush=True)
                    last = time.time()


class Demo:
    def __init__(self, args):
        self.args = args
        self.size = SIZES[args.size]
        self.work = os.path.abspath(args.workdir)
        self.raw = os.path.join(self.work, "raw")
        self.bin = os.path.join(self.work, "bin")
        self.logs = os.path.join(self.work, "logs")
        self.state = os.path.join(self.work, "state")
        for d in (self.logs, self.state):
            os.makedirs(d, exist_ok=True)
        self.status = Status()
        self.teacher_checkpoint = os.path.join(self.work, "teacher", "checkpoint_best.pt")

    def env(self, threads: int) -> dict:
        return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    # -- resumable steps ------------------------------------------------------------------------------
    def step(self, name: str, what: str, fn, summary=lambda r: "") -> dict:
        """Run ``fn`` unless its result is recorded; print one line either way."""
        path = os.path.join(self.state, f"{name}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
            self.status.say(f"{what}: done earlier, skipped {summary(result)}".rstrip())
            return result
        self.status.say(f"{what} ...")
        t = time.time()
        result = fn()
        result["wall_s"] = round(time.time() - t + result.get("wall_s", 0), 1)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
        self.status.say(f"{what}: done in {fmt_s(time.time() - t)} {summary(result)}".rstrip())
        return result

    def get_data(self) -> dict:
        """Multi30k's raw text into ``work/raw`` (the smoke size keeps the first lines of each split)."""
        tmp = self.raw + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        lines = dict(zip(data.SPLITS.values(), self.size["lines"] or (None,) * 3))
        counts = {}
        for stem, keep in lines.items():
            for lang in (data.SRC, data.TGT):
                name = f"{stem}.{lang}"
                if self.args.local:
                    plain, gz = os.path.join(self.args.local, name), os.path.join(self.args.local, name + ".gz")
                    src = plain if os.path.isfile(plain) else gz
                    if not os.path.isfile(src):
                        raise SystemExit(f"demo: {plain} (or .gz) not found in --local {self.args.local}")
                else:
                    src = os.path.join(tmp, name + ".gz")
                    urllib.request.urlretrieve(URL.format(name=name), src)
                opener = gzip.open if src.endswith(".gz") else open
                with opener(src, "rt", encoding="utf-8") as f:
                    text = f.read().splitlines()[:keep]
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write("".join(line + "\n" for line in text))
                counts[stem] = len(text)
                if src.startswith(tmp):
                    os.remove(src)
        if os.path.isdir(self.raw):
            shutil.rmtree(self.raw)
        os.replace(tmp, self.raw)
        return dict(sentences=counts, source=self.args.local or URL.format(name="..."))

    def prepare(self) -> dict:
        """A joint sentencepiece model trained on train (both sides), then fairseq-preprocess with one
        joined dictionary, which ``--share-all-embeddings`` and distillation (one vocabulary) need."""
        import sentencepiece

        spm_model = os.path.join(self.work, "spm.model")
        sentencepiece.SentencePieceTrainer.train(
            input=[os.path.join(self.raw, f"train.{lang}") for lang in (data.SRC, data.TGT)],
            model_prefix=spm_model[:-len(".model")], vocab_size=self.size["vocab"], model_type="bpe",
            character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
            bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0)
        sp = sentencepiece.SentencePieceProcessor(model_file=spm_model)
        spm_dir = os.path.join(self.work, "spm")
        os.makedirs(spm_dir, exist_ok=True)
        for stem in data.SPLITS.values():
            for lang in (data.SRC, data.TGT):
                with open(os.path.join(self.raw, f"{stem}.{lang}"), encoding="utf-8") as fin:
                    pieces = [" ".join(sp.encode(line.rstrip("\n"), out_type=str)) for line in fin]
                with open(os.path.join(spm_dir, f"{stem}.{lang}"), "w", encoding="utf-8") as fout:
                    fout.write("".join(p + "\n" for p in pieces))
        tmp = self.bin + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pref = {split: os.path.join(spm_dir, stem) for split, stem in data.SPLITS.items()}
        data.run_logged([sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", data.SRC,
                         "--target-lang", data.TGT, "--trainpref", pref["train"], "--validpref", pref["valid"],
                         "--testpref", pref["test"], "--joined-dictionary", "--destdir", tmp, "--workers", "1"],
                        os.path.join(self.logs, "prepare.log"), env=self.env(1))
        shutil.rmtree(self.bin, ignore_errors=True)
        os.replace(tmp, self.bin)
        with open(os.path.join(self.bin, "dict.en.txt"), encoding="utf-8") as f:
            return dict(spm_model=spm_model, dictionary=sum(1 for _ in f) + 4)

    def tier(self, who: str) -> dict:
        """The benchmark's tier keys for ``methods.common_args``: one validation, at the end."""
        n = self.size[f"{who}_updates"]
        return dict(max_update=n, max_tokens=self.size[f"{who}_tokens"], warmup=self.size[f"{who}_warmup"],
                    validate_every=n, validate_after=n)

    def train(self, name: str, args: list, updates: int, threads: int) -> dict:
        """fairseq-train into ``work/<name>``; an interrupted run resumes from its checkpoint_last.pt."""
        run_dir = os.path.join(self.work, name)
        os.makedirs(run_dir, exist_ok=True)
        log = os.path.join(run_dir, "train.log")
        if bench.checkpoint_updates(os.path.join(run_dir, "checkpoint_last.pt")) < updates:
            # a finished run is never restarted: fairseq would resume it and do one update more
            self.status.track(name, log, updates)
            try:
                data.run_logged([sys.executable, "-m", "fairseq_cli.train", self.bin, "--user-dir", USER_DIR,
                                 "--save-dir", run_dir, "--cpu"] + args, log, env=self.env(threads))
            finally:
                self.status.untrack(name)
        out = bench.parse_train_log(log)
        out["checkpoint"] = os.path.join(run_dir, "checkpoint_best.pt")
        return out

    def test_bleu(self, name: str, checkpoint: str, threads: int) -> dict:
        """Greedy decoding of test_2016_flickr with the benchmark's length cap, sacreBLEU on raw text."""
        prefix = os.path.join(self.work, name, "test.greedy")
        speed = evaluate.generate(self.bin, checkpoint, "test", prefix, beam=1, batch_size=64, user_dir=USER_DIR,
                                  device_args=["--cpu"], env=self.env(threads))
        score = evaluate.bleu(prefix + ".hyp", os.path.join(self.raw, f"{data.SPLITS['test']}.{data.TGT}"))
        return dict(test_bleu=score["bleu"], sents_per_s=speed["sents_per_sec"], hyp=prefix + ".hyp")

    def teacher(self) -> dict:
        s = self.size
        args = methods.method_args("scratch", []) + methods.common_args(self.tier("teacher"), 1) \
            + s["teacher_arch"]
        return self.train("teacher", args, s["teacher_updates"], threads=1)

    def student(self, name: str, method: str, teacher_ckpt: str) -> dict:
        teacher_args = ["--teacher-path", teacher_ckpt, "--teacher-data", self.bin]
        args = methods.method_args(method, teacher_args, self.tier("student")) \
            + methods.common_args(self.tier("student"), 1, self.size["student_arch"])
        out = self.train(name, args, self.size["student_updates"], threads=1)
        out.update(self.test_bleu(name, out["checkpoint"], threads=1))
        out["final_beta"] = last_logged(os.path.join(self.work, name, "train.log"), "beta")
        return out


def last_logged(log_path: str, key: str):
    """The last value of ``key`` in fairseq's JSON training lines (None if it never appears)."""
    value = None
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            if f'"{key}": ' in line and " | train_inner | " in line:
                value = float(json.loads(line.split(" | train_inner | ", 1)[1])[key])
    return value


def bleu_line(r: dict) -> str:
    if "test_bleu" in r:
        return f"(test BLEU {r['test_bleu']:.2f})"
    return f"({r['updates']} updates, valid BLEU {r['val_bleu_selection']:.2f})"


def ranking(results: dict, seed_noise: float = 1.0) -> str:
    """How the students rank, said plainly: gaps below ``seed_noise`` BLEU (about one standard deviation
    over seeds in the benchmark's quick tier) are called ties, since the demo runs one seed."""
    names = sorted(results, key=lambda n: -results[n]["test_bleu"])
    parts = [names[0]]
    for a, b in zip(names, names[1:]):
        gap = results[a]["test_bleu"] - results[b]["test_bleu"]
        parts.append(("~ " if gap < seed_noise else "> ") + b)
    text = "Ranking (greedy test BLEU, one seed): " + " ".join(parts) + "."
    base = results["scratch"]["test_bleu"]
    gains = [f"{n} {results[n]['test_bleu'] - base:+.2f}" for n in names if n != "scratch"]
    text += "\nAgainst scratch: " + ", ".join(gains) + f". Gaps under {seed_noise:.0f} BLEU are within seed noise " \
        "(~ above); benchmarks/multi30k has three seeds and longer budgets."
    return text


def table(size: dict, teacher: dict, students: dict) -> str:
    rows = ["| model | size | updates | train time | test BLEU (greedy) | final beta |", "|---|---|---|---|---|---|",
            f"| teacher | {size['teacher_desc']} | {teacher['updates']} | {fmt_s(teacher['train_steps_s'])} | "
            f"{teacher['test_bleu']:.2f} | – |"]
    for name, _method, label in STUDENTS:
        r = students[name]
        beta = "–" if r.get("final_beta") is None else f"{r['final_beta']:.2f}"
        rows.append(f"| {label} | {size['student_desc']} | {r['updates']} | {fmt_s(r['train_steps_s'])} | "
                    f"{r['test_bleu']:.2f} | {beta} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    demo = Demo(args)
    logging.basicConfig(filename=os.path.join(demo.logs, "demo.log"), level=logging.INFO,
                        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    st = demo.status
    st.say(f"fairseq-imitkd demo, size {args.size}: work in {demo.work}, logs in {demo.logs}")
    src = args.local or "github.com/multi30k/dataset"
    demo.step("data", f"[1/4] Multi30k raw text from {src}", demo.get_data,
              lambda r: f"({r['sentences'][data.SPLITS['train']]} training pairs)")
    demo.step("prepare", "[2/4] sentencepiece + fairseq-preprocess", demo.prepare,
              lambda r: f"({r['dictionary']} symbols)")
    # Two lanes of one thread each: the teacher, and beside it the scratch student, which needs no
    # teacher; then the two KD students side by side. One thread per process: with two threads, a teacher
    # beside two busy processes ran 9.6 s an update here, against about 1 s with one.
    st.say(f"[3/4] teacher ({demo.size['teacher_desc']}, {demo.size['teacher_updates']} updates) and students "
           f"({demo.size['student_desc']}, {demo.size['student_updates']} updates each), {args.jobs} at a time")
    results = {}

    def job(name, fn, what):
        def run_job():
            results[name] = demo.step(name, what, fn, bleu_line)
        return run_job

    jobs = bench.Scheduler(args.jobs)
    jobs.add("teacher", job("teacher", demo.teacher, "      teacher"))
    for name, method, _label in sorted(STUDENTS, key=lambda s: methods.ALL[s[1]]["kd"]):  # scratch first
        fn = (lambda name=name, method=method: demo.student(name, method, demo.teacher_checkpoint))
        jobs.add(name, job(name, fn, f"      student {name}"),
                 deps=("teacher",) if methods.ALL[method]["kd"] else ())
    # the teacher's own test BLEU last: the KD students should not wait for it
    jobs.add("teacher_test", job("teacher_test", lambda: demo.test_bleu("teacher", results["teacher"]["checkpoint"], 1),
                                 "      teacher test BLEU"), deps=("teacher",))
    failed = jobs.run()
    st.stop.set()
    if failed:
        st.say(f"[4/4] failed or skipped: {', '.join(failed)}; see {demo.logs}/demo.log and work/<name>/train.log. "
               "Run the same command again to resume.")
        return 1
    teacher = dict(results["teacher"], **results["teacher_test"])
    students = {name: results[name] for name, _m, _l in STUDENTS}
    st.say("[4/4] results")
    report = table(demo.size, teacher, students) + "\n\n" + ranking(students)
    with open(os.path.join(demo.work, "results.md"), "w", encoding="utf-8") as f:
        f.write(report + "\n")
    print("\n" + report + "\n")
    print(f"Total wall time {fmt_s(time.time() - st.t0)} (this invocation); table in {demo.work}/results.md")
    print("Student checkpoints:")
    for name, _m, _l in STUDENTS:
        print(f"  {name:8s} {students[name]['checkpoint']}")
    best = max(students, key=lambda n: students[n]["test_bleu"])
    spm_model = os.path.join(demo.work, "spm.model")
    print("Deploy one with CTranslate2 (pip install -e \".[ct2]\"):")
    # by its path: importing fairseq_imitkd would import torch and fairseq into this driver
    ct2_deploy = load_file("ct2_deploy", os.path.join(USER_DIR, "ct2_deploy.py"))
    bits = " --int8-weight-bits 7" if ct2_deploy.int8_saturates_here("int8", 8) else ""  # a CPU whose int8 sums saturate
    print(f"  imitkd-export {students[best]['checkpoint']} -o {demo.work}/export_{best} --quantization int8 "
          f"--spm {spm_model}{bits}")
    print(f"  imitkd-translate {demo.work}/export_{best} -i {demo.raw}/test_2016_flickr.de -o {demo.work}/{best}.en")
    return 0


if __name__ == "__main__":
    sys.exit(main())
