"""The demo (examples/demo/run.py) at its smoke size: every step runs, the table has every row, and a
rerun skips what is finished. Its data is a toy corpus shaped like Multi30k's raw files, so the test
needs neither the network nor ../shared."""
import random
import subprocess
import sys
from pathlib import Path

from conftest import REPO, toy_pair

DEMO = REPO / "examples" / "demo" / "run.py"
ROWS = ("| teacher |", "| scratch (", "| word_kd (", "| ImitKD+Full, greedy, agreement clock |")


def toy_multi30k(directory: Path) -> Path:
    """{train,val,test_2016_flickr}.{de,en}: the test suite's toy translation, one split gzipped as
    Multi30k's repository has them."""
    import gzip

    rng = random.Random(7)
    for stem, n in (("train", 300), ("val", 20), ("test_2016_flickr", 20)):
        pairs = [toy_pair(rng) for _ in range(n)]
        for lang, side in (("de", 0), ("en", 1)):
            text = "".join(p[side] + "\n" for p in pairs)
            if stem == "val":
                with gzip.open(directory / f"{stem}.{lang}.gz", "wt", encoding="utf-8") as f:
                    f.write(text)
            else:
                (directory / f"{stem}.{lang}").write_text(text, encoding="utf-8")
    return directory


def run_demo(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEMO), "--size", "smoke", "--local", str(tmp_path / "raw"),
                           "--workdir", str(tmp_path / "work"), *extra],
                          capture_output=True, text=True, timeout=600, cwd=REPO)


def test_demo_smoke_prints_every_row_and_resumes(tmp_path):
    (tmp_path / "raw").mkdir()
    toy_multi30k(tmp_path / "raw")
    first = run_demo(tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    for row in ROWS:
        assert sum(line.startswith(row) for line in out.splitlines()) == 1, (row, out)
    assert "Ranking (greedy test BLEU, one seed):" in out
    for name in ("scratch", "word_kd", "imitkd"):
        assert (tmp_path / "work" / name / "checkpoint_best.pt").is_file()
    assert "imitkd-export " in out and "imitkd-translate " in out
    # fairseq's own output goes to the logs, not the console: one line per step
    assert "| INFO |" not in out and len(out.splitlines()) < 40, out

    again = run_demo(tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("done earlier, skipped") == 7, again.stdout  # data, prepare, teacher, test, 3 students
    assert [line for line in again.stdout.splitlines() if line.startswith("| ")] == \
        [line for line in out.splitlines() if line.startswith("| ")]


def test_demo_refuses_a_missing_local_directory(tmp_path):
    res = run_demo(tmp_path / "nowhere")
    assert res.returncode == 2 and "--local" in res.stderr and "no such directory" in res.stderr
