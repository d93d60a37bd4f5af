"""Driving stock ``fairseq-generate`` and reading what it prints, and the plain text files around it.

The recipes and the benchmarks score what a user's own ``fairseq-generate`` writes, and time decoding with
its own timer (which covers decoding, not loading). They all build its command line here and read its
output here. This module lives outside the ``fairseq_imitkd`` package, whose ``__init__`` imports torch and
fairseq to register the plugin: scripts that only read text (the recipes' ``text.py``) import it instantly.
"""
import re
from typing import Dict, Iterable, List, Optional, Sequence

TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s "
                        r"\(([\d.]+|inf|nan) sentences/s, ([\d.]+|inf|nan) tokens/s\)")


def generate_args(data: str, path: str, *, split: str = "test", beam: int = 1, batch_size: int = 64,
                  user_dir: Optional[str] = None, max_len: Optional[Sequence[float]] = None,
                  remove_bpe: Optional[str] = None, results_path: Optional[str] = None, cpu: bool = False,
                  extra: Sequence[str] = ()) -> List[str]:
    """fairseq-generate's arguments (without the program name) for one decode of ``split`` by ``path``.

    Always ``--nbest 1`` (one output per source line), ``--required-batch-size-multiple 1`` (with fairseq's
    default of 8 this fairseq build silently drops the last partial batch) and ``--num-workers 0`` (a loader
    worker gains nothing on short lines, and its shutdown costs seconds per run). ``max_len``: ``(a, b)`` of
    the length limit ``a·src + b``; None keeps fairseq's default (0, 200), what a user gets.
    """
    argv = [data] + (["--user-dir", user_dir] if user_dir else []) + [
        "--path", path, "--gen-subset", split, "--beam", str(beam), "--nbest", "1", "--batch-size", str(batch_size),
        "--required-batch-size-multiple", "1", "--num-workers", "0"]
    if max_len is not None:
        argv += ["--max-len-a", str(max_len[0]), "--max-len-b", str(max_len[1])]
    if remove_bpe:
        argv += ["--remove-bpe", remove_bpe]
    if results_path:
        argv += ["--results-path", results_path]
    return argv + list(extra) + (["--cpu"] if cpu else [])


def parse_speed(line: str) -> Optional[Dict[str, float]]:
    """The figures of a "Translated N sentences (M tokens) in Ts (...)" line, or None for another line."""
    m = TRANSLATED.search(line)
    if m is None:
        return None
    n, tokens, seconds, sps, tps = m.groups()
    return dict(sentences=int(n.replace(",", "")), tokens=int(tokens.replace(",", "")), seconds=float(seconds),
                sents_per_sec=float(sps), tokens_per_sec=float(tps))


def read_hypotheses(lines: Iterable[str], prefix: str = "D-") -> Dict[int, str]:
    """Sample id -> hypothesis. ``D-`` lines hold it after ``--remove-bpe`` and detokenization,
    ``H-`` lines as dictionary tokens. An empty hypothesis has no text field."""
    hyps = {}
    for line in lines:
        if line.startswith(prefix):
            idx, _score, text = (line.rstrip("\n").split("\t", 2) + ["", ""])[:3]
            hyps[int(idx[len(prefix):])] = text
    return hyps


def output_lengths(lines: Iterable[str]) -> Dict[int, int]:
    """Sample id -> tokens of its best hypothesis, EOS not counted (``P-`` lines score EOS too)."""
    out = {}
    for line in lines:
        if line.startswith("P-"):
            idx, scores = (line.rstrip("\n").split("\t", 1) + [""])[:2]
            out.setdefault(int(idx[2:]), len(scores.split()) - 1)
    return out


def read_lines(path: str) -> List[str]:
    """A text file's lines without their newlines."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def write_lines(path: str, lines: Iterable[str]) -> None:
    """One line per item, each ended by a newline."""
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
