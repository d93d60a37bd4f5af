"""What fairseq-generate prints: the hypotheses by sample id, and its own decoding-speed line.

Evaluation scripts (recipes, benchmarks) read both from its log, so that scores come from stock
``fairseq-generate`` and speeds from its timer, which covers decoding and not loading.
"""
import re
from typing import Dict, Iterable, Optional

TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s "
                        r"\(([\d.]+|inf|nan) sentences/s, ([\d.]+|inf|nan) tokens/s\)")


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
