"""Multi30k prepared as the shared teacher was trained on it, and the teacher's seq-KD corpora.

Everything is cached in the work directory and made again only when missing, so a rerun resumes.
"""
import logging
import os
import subprocess
import sys
from typing import List, Optional

logger = logging.getLogger("multi30k.data")

# the inputs every benchmark reads by default: ../shared beside the repository
SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
                      "shared")
DEFAULT_TEXT_DIR = os.path.join(SHARED, "data", "multi30k")
DEFAULT_TEACHER_DIR = os.path.join(SHARED, "teachers", "multi30k_de_en")
SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}  # fairseq split -> Multi30k file stem
SRC, TGT = "de", "en"


def run_logged(cmd: List[str], log_path: str, env: Optional[dict] = None) -> None:
    """Run a command with its output appended to ``log_path``; a failure names the log."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    logger.info("$ %s  (log: %s)", " ".join(cmd), log_path)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed with exit code {proc.returncode}; see {log_path}:\n  {' '.join(cmd)}")


def check_inputs(text_dir: str, teacher_dir: str) -> None:
    missing = [os.path.join(text_dir, f"{stem}.{lang}") for stem in SPLITS.values() for lang in (SRC, TGT)]
    missing += [os.path.join(teacher_dir, f) for f in ("checkpoint.pt", "spm.model", "dict.de.txt", "dict.en.txt")]
    missing = [p for p in missing if not os.path.isfile(p)]
    if missing:
        raise SystemExit("multi30k benchmark: missing input files:\n  " + "\n  ".join(missing)
                         + "\n(--text-dir is Multi30k's raw text, --teacher-dir the shared teacher's folder)")


def prepare(text_dir: str, teacher_dir: str, work: str, log_dir: str) -> str:
    """sentencepiece-encode the raw text with the teacher's model; binarize with its dictionaries."""
    import sentencepiece

    bin_dir = os.path.join(work, "bin")
    if os.path.isfile(os.path.join(bin_dir, "test.de-en.en.idx")):
        return bin_dir
    spm_dir = os.path.join(work, "spm")
    os.makedirs(spm_dir, exist_ok=True)
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(teacher_dir, "spm.model"))
    for stem in SPLITS.values():
        for lang in (SRC, TGT):
            with open(os.path.join(text_dir, f"{stem}.{lang}"), encoding="utf-8") as fin:
                lines = [" ".join(sp.encode(line.rstrip("\n"), out_type=str)) for line in fin]
            with open(os.path.join(spm_dir, f"{stem}.{lang}"), "w", encoding="utf-8") as fout:
                fout.write("\n".join(lines) + "\n")
    tmp = bin_dir + ".tmp"
    pref = {split: os.path.join(spm_dir, stem) for split, stem in SPLITS.items()}
    run_logged([sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", SRC, "--target-lang", TGT,
                "--trainpref", pref["train"], "--validpref", pref["valid"], "--testpref", pref["test"],
                "--srcdict", os.path.join(teacher_dir, "dict.de.txt"),
                "--tgtdict", os.path.join(teacher_dir, "dict.en.txt"), "--destdir", tmp, "--workers", "1"],
               os.path.join(log_dir, "prepare.log"))
    os.replace(tmp, bin_dir)
    return bin_dir


def source_lengths(work: str, split: str) -> List[int]:
    """Tokens per source sentence of a prepared split (without EOS, as fairseq's length limit counts)."""
    with open(os.path.join(work, "spm", f"{SPLITS[split]}.{SRC}"), encoding="utf-8") as f:
        return [len(line.split()) for line in f]


# name -> imitkd-seqkd options beyond the beam
CORPORA = {
    "seqkd": [],
    "seqinter": ["--nbest", "5", "--select", "sentence-bleu", "--remove-bpe", "sentencepiece"],
    # the Seq-KD corpus decoded by CTranslate2 (int8 on CPU): does a student trained on it score the same?
    "seqkd_ct2": ["--engine", "ctranslate2"],
    # ... with CTranslate2's vocabulary map over the training pairs (imitkd-vmap's defaults): faster, further off
    "seqkd_ct2_vmap": ["--engine", "ctranslate2", "--ct2-vmap", "{vmap}"],
    # ... with int8 weights within ±63, for CPUs whose int8 kernels saturate (AVX2 without VNNI)
    "seqkd_ct2_7bit": ["--engine", "ctranslate2", "--ct2-int8-weight-bits", "7"],
}


def train_vmap(work: str, per_source: int = 20, common: int = 100) -> str:
    """imitkd-vmap over the prepared training pairs (which hold sentencepiece pieces), built once per setting."""
    path = os.path.join(work, f"train.s{per_source}.c{common}.vmap")
    if not os.path.isfile(path):
        spm_dir = os.path.join(work, "spm")
        run_logged([sys.executable, "-m", "fairseq_imitkd_vmap", "--source", os.path.join(spm_dir, f"train.{SRC}"),
                    "--target", os.path.join(spm_dir, f"train.{TGT}"), "-o", path + ".tmp", "--per-source",
                    str(per_source), "--common", str(common)], os.path.join(work, "logs", "train_vmap.log"))
        os.replace(path + ".tmp", path)
    return path


def build_corpus(name: str, bin_dir: str, teacher_dir: str, work: str, log_dir: str, device_args: List[str],
                 env: Optional[dict] = None) -> str:
    """The teacher's beam-5 corpus over train (``imitkd-seqkd``, which resumes by shard)."""
    out = os.path.join(work, name)
    if os.path.isfile(os.path.join(out, "seqkd_stats.json")):
        return out
    options = CORPORA[name]
    if "{vmap}" in options:
        options = [train_vmap(work) if o == "{vmap}" else o for o in options]
    run_logged([sys.executable, "-m", "fairseq_imitkd.seqkd", bin_dir, "-o", out,
                "--teacher-path", os.path.join(teacher_dir, "checkpoint.pt"), "--teacher-data", teacher_dir,
                "--split", "train", "--beam", "5", "--max-tokens", "8000", "--num-shards", "4",
                "--no-progress-bar"] + options + device_args,
               os.path.join(log_dir, f"corpus_{name}.log"), env=env)
    return out


def build_cache(topk: int, bin_dir: str, teacher_dir: str, work: str, log_dir: str, device_args: List[str],
                env: Optional[dict] = None) -> str:
    """The teacher's top-k log-probs on the gold prefixes of train and valid (``imitkd-teacher-cache``,
    which resumes by chunk and returns at once when the cache is complete)."""
    out = os.path.join(work, f"teacher_cache_k{topk}")
    run_logged([sys.executable, "-m", "fairseq_imitkd.teacher_cache", bin_dir, "-o", out,
                "--teacher-path", os.path.join(teacher_dir, "checkpoint.pt"), "--teacher-data", teacher_dir,
                "--topk", str(topk), "--splits", "train,valid"] + device_args,
               os.path.join(log_dir, f"teacher_cache_k{topk}.log"), env=env)
    return out
