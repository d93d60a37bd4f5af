"""Decode with fairseq-generate and score with sacrebleu against the raw (detokenized) references."""
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import sacrebleu
from fairseq_generate_io import generate_args, output_lengths, parse_speed, read_hypotheses, read_lines

from data import run_logged

# output length limit a*source+b for every model and decode: the rollouts' default, long enough for
# the teacher's outputs, and it keeps a weak early student from decoding 200 tokens of garbage
MAX_LEN = (1.2, 10)
# what a user gets from fairseq-generate without length options: a = 0, b = 200
DEFAULT_MAX_LEN = (0.0, 200)


def length_stats(lengths: Dict[int, int], src_lengths: Sequence[int], max_len: Sequence[float]) -> dict:
    """The share of outputs that stop only at the limit ``a·src + b`` (fairseq's rule: src without EOS)."""
    a, b = max_len
    at_limit = sum(1 for i, n in lengths.items() if n >= int(a * src_lengths[i] + b))
    return dict(at_limit_share=round(at_limit / max(len(lengths), 1), 4),
                mean_out_tokens=round(sum(lengths.values()) / max(len(lengths), 1), 2))


def generate(bin_dir: str, checkpoint: str, split: str, out_prefix: str, *, beam: int, batch_size: int,
             user_dir: str, device_args: List[str], env: Optional[dict] = None,
             max_len: Sequence[float] = MAX_LEN, src_lengths: Optional[Sequence[int]] = None) -> dict:
    """Decode one split; write ``out_prefix.hyp`` (detokenized, in corpus order); return speed figures
    (and, given the source lengths in tokens, how many outputs ran to the length limit)."""
    log_path = out_prefix + ".log"
    if os.path.exists(log_path):
        os.remove(log_path)
    argv = generate_args(bin_dir, checkpoint, split=split, beam=beam, batch_size=batch_size, user_dir=user_dir,
                         max_len=max_len, remove_bpe="sentencepiece", extra=device_args)
    run_logged([sys.executable, "-m", "fairseq_cli.generate"] + argv, log_path, env=env)
    with open(log_path, encoding="utf-8") as f:
        lines = f.readlines()
    hyps = read_hypotheses(lines)
    speeds = [s for s in map(parse_speed, lines) if s]
    if not speeds:
        raise RuntimeError(f"no 'Translated ...' line in {log_path}")
    speed = speeds[-1]
    n = max(hyps) + 1 if hyps else 0
    if sorted(hyps) != list(range(n)) or n != speed["sentences"]:
        raise RuntimeError(f"{log_path}: {len(hyps)} hypotheses for {speed['sentences']} sentences")
    with open(out_prefix + ".hyp", "w", encoding="utf-8") as f:
        f.write("".join(hyps[i] + "\n" for i in range(n)))
    out = dict(speed, beam=beam, batch_size=batch_size, max_len=list(max_len))
    if src_lengths is not None:
        out.update(length_stats(output_lengths(lines), src_lengths, max_len))
    return out


def bleu(hyp_path: str, ref_path: str) -> dict:
    hyps, refs = read_lines(hyp_path), read_lines(ref_path)
    if len(hyps) != len(refs):
        raise RuntimeError(f"{hyp_path}: {len(hyps)} lines, but {ref_path} has {len(refs)}")
    metric = sacrebleu.BLEU()
    score = metric.corpus_score(hyps, [refs])
    return dict(bleu=round(score.score, 2), signature=str(metric.get_signature()),
                len_ratio=round(score.sys_len / max(score.ref_len, 1), 4))


def paired_bootstrap(baseline: str, systems: Dict[str, str], ref_path: str, n_samples: int = 1000) -> Dict[str, dict]:
    """sacrebleu's paired bootstrap resampling (``sacrebleu --paired-bs``): each system against ``baseline``.

    ``p_value`` is the probability, under resampling, that the difference is due to chance.
    """
    from sacrebleu.significance import PairedTest

    named = [("baseline", read_lines(baseline))] + [(name, read_lines(p)) for name, p in systems.items()]
    test = PairedTest(named, {"BLEU": sacrebleu.BLEU()}, [read_lines(ref_path)], test_type="bs",
                      n_samples=n_samples)
    _sigs, scores = test()
    out = {}
    for name, res in zip(scores["System"][1:], scores["BLEU"][1:]):
        out[name] = dict(bleu=round(res.score, 2), mean=round(res.mean, 2), ci95=round(res.ci, 2),
                         p_value=round(res.p_value, 4))
    base = scores["BLEU"][0]
    for v in out.values():
        v["baseline_bleu"] = round(base.score, 2)
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return subprocess.run(["uname", "-m"], capture_output=True, text=True, check=False).stdout.strip()


def mean_std(values: Sequence[float]) -> dict:
    import statistics

    vals = [float(v) for v in values]
    return dict(mean=round(statistics.fmean(vals), 2),
                std=round(statistics.stdev(vals), 2) if len(vals) > 1 else None,
                min=round(min(vals), 2), max=round(max(vals), 2), n=len(vals))
