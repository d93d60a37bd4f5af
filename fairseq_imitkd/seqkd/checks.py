"""``imitkd-seqkd``'s checks: every option, input and output is refused here, in one line saying what to
change, before the teacher is loaded or anything is written.

They live apart from the command line (``cli``) and the build (``build``) because both need them: ``build``
runs them all before it writes, and ``--status`` runs the same ones to say what a build would find. The
settings a corpus records (``corpus_settings``) are here too: the output check compares them.
"""
import hashlib
import logging
import os
from typing import Dict, Optional

import torch
from fairseq.data import data_utils, indexed_dataset

from ..artifacts import resume
from ..ct2_deploy import CPU_INT8
from ..export import QUANTIZATIONS
from ..teacher import check_teacher_files, file_identity, split_teacher_paths, translation_task
from . import SeqKDError
from .corpus_files import MANIFEST, OVERWRITE_HINT
from .decoding import SentenceBleu, shard_range
from .engines import resolve_compute_type, resolve_max_batch_size

logger = logging.getLogger("fairseq_imitkd.seqkd")

DEFAULT_COPY_SPLITS = ("valid", "test")
DEFAULT_MAX_TOKENS = 12000  # fairseq-generate's default when neither --max-tokens nor --batch-size is given


# --- before any file is written -------------------------------------------------------------------------


def check_options(args) -> None:
    """Option combinations that cannot work, before any file is looked at."""
    if args.beam < 1:
        raise SeqKDError(f"--beam must be at least 1, got {args.beam}")
    if args.nbest is None:
        args.nbest = args.beam if args.select == "sentence-bleu" else 1
    if not 1 <= args.nbest <= args.beam:
        raise SeqKDError(f"--nbest {args.nbest} must be between 1 and --beam {args.beam}")
    if args.select == "top" and args.nbest != 1:
        raise SeqKDError(f"--nbest {args.nbest} is only used by --select sentence-bleu; --select top keeps the best")
    if args.num_shards < 1:
        raise SeqKDError(f"--num-shards must be at least 1, got {args.num_shards}")
    if args.shard_id is not None:
        shard_range(0, args.num_shards, args.shard_id)  # range check
        if args.merge:
            raise SeqKDError("--merge decodes nothing: do not combine it with --shard-id")
    if args.fp16 and (args.cpu or not torch.cuda.is_available()):
        raise SeqKDError("--fp16 needs a GPU (drop --cpu, or drop --fp16)")
    if args.engine == "ctranslate2":
        if args.fp16:
            raise SeqKDError("--fp16 is the fairseq engine's: with --engine ctranslate2 pass --ct2-compute-type "
                             "int8_float16 (or float16)")
        if len(split_teacher_paths(args.teacher_path)) > 1:
            raise SeqKDError("--engine ctranslate2 decodes one teacher, not an ensemble: use --engine fairseq")
        if args.ct2_compute_type != "default" and args.ct2_compute_type not in QUANTIZATIONS:
            raise SeqKDError(f"--ct2-compute-type {args.ct2_compute_type!r} is not one of default, "
                             f"{', '.join(QUANTIZATIONS)}")
        if args.ct2_vmap is not None and not os.path.isfile(args.ct2_vmap):
            raise SeqKDError(f"--ct2-vmap {args.ct2_vmap} does not exist")
        compute_type = resolve_compute_type(args.ct2_compute_type, use_cuda(args))
        if args.ct2_int8_weight_bits != 8 and compute_type not in CPU_INT8:
            raise SeqKDError(f"--ct2-int8-weight-bits {args.ct2_int8_weight_bits} is for CPU int8 "
                             f"({', '.join(CPU_INT8)}), not {compute_type}")
        if args.ct2_max_batch_size is not None and args.ct2_max_batch_size < 0:
            raise SeqKDError(f"--ct2-max-batch-size must be >= 0 (0: the whole batch), got {args.ct2_max_batch_size}")
        args.ct2_max_batch_size = resolve_max_batch_size(args.ct2_max_batch_size, use_cuda(args), args.ct2_vmap)
    elif (args.ct2_compute_type != "default" or args.ct2_vmap is not None or args.ct2_int8_weight_bits != 8
          or args.ct2_max_batch_size is not None):
        raise SeqKDError("--ct2-compute-type, --ct2-vmap, --ct2-int8-weight-bits and --ct2-max-batch-size are "
                         "only used with --engine ctranslate2")
    if args.max_tokens is None and args.batch_size is None:
        args.max_tokens = DEFAULT_MAX_TOKENS


def load_checked(args):
    """Every check that reads no teacher weights (options, inputs, the teacher's files), then the split:
    ``(prefixes, task, dataset)``. A build and ``--status`` start here, so both refuse the same inputs."""
    check_options(args)
    prefixes = check_inputs(args)
    task = setup_task(args)
    task.load_dataset(args.split)
    return prefixes, task, task.dataset(args.split)


def split_prefix(data: str, split: str, src: str, tgt: str) -> Optional[str]:
    """``DATA/split.src-tgt.`` (or fairseq's other accepted order ``split.tgt-src.``) if the source exists."""
    for a, b in ((src, tgt), (tgt, src)):
        prefix = os.path.join(data, f"{split}.{a}-{b}.")
        if indexed_dataset.dataset_exists(prefix + src, impl=None):
            return prefix
    return None


def expected_files(data: str, split: str, src: str, tgt: str, lang: str) -> str:
    base = os.path.join(data, f"{split}.{src}-{tgt}.{lang}")
    return f"{base}.bin and {base}.idx"


def check_inputs(args) -> Dict[str, str]:
    """The data directory, its languages, dictionaries and splits; returns the split's file prefixes."""
    data = args.data
    if not os.path.isdir(data):
        raise SeqKDError(f"data directory not found: {data}")
    if args.source_lang is None or args.target_lang is None:
        src, tgt = data_utils.infer_language_pair(data)
        if src is None:
            raise SeqKDError(f"cannot infer the language pair from the files in {data}: pass -s SRC -t TGT")
        args.source_lang = args.source_lang or src
        args.target_lang = args.target_lang or tgt
    src, tgt = args.source_lang, args.target_lang
    for lang in (src, tgt):
        if not os.path.isfile(os.path.join(data, f"dict.{lang}.txt")):
            raise SeqKDError(f"{data} has no dict.{lang}.txt: not a fairseq data directory for {src}-{tgt}")
    prefix = split_prefix(data, args.split, src, tgt)
    if prefix is None:
        raise SeqKDError(f"split {args.split!r} not found: expected {expected_files(data, args.split, src, tgt, src)}")
    if args.select == "sentence-bleu" and not indexed_dataset.dataset_exists(prefix + tgt, impl=None):
        raise SeqKDError(f"--select sentence-bleu needs the references: expected "
                         f"{expected_files(data, args.split, src, tgt, tgt)}")
    if not split_teacher_paths(args.teacher_path):
        raise SeqKDError("--teacher-path is empty")
    prefixes = {args.split: prefix}
    explicit = args.copy_splits is not None
    wanted = [x for x in args.copy_splits.split(",") if x] if explicit else list(DEFAULT_COPY_SPLITS)
    for name in wanted:
        if name == args.split:
            if explicit:
                raise SeqKDError(f"--copy-splits {name}: that is the split being distilled")
            continue
        other = split_prefix(data, name, src, tgt)
        if other is None:
            if explicit:
                raise SeqKDError(f"--copy-splits: split {name!r} not found: expected "
                                 f"{expected_files(data, name, src, tgt, src)}")
            logger.info("no %s split in %s: not copied", name, data)
            continue
        prefixes[name] = other
    return prefixes


def corpus_settings(args, prefixes: Dict[str, str], num_sentences: int) -> Dict[str, object]:
    """Everything that decides the corpus's content. A rerun resumes only if these are equal.

    Batch sizes, the device and the shard count are left out: they change how the work is done, not
    what the corpus is (up to float rounding and the padded-length rule of --max-len-a).
    """
    src, tgt = args.source_lang, args.target_lang
    prefix = prefixes[args.split]
    settings = {
        "data": os.path.abspath(args.data),
        "split": args.split,
        "source_lang": src,
        "target_lang": tgt,
        "sentences": num_sentences,
        "split_bytes": {lang: os.path.getsize(indexed_dataset.data_file_path(prefix + lang))
                        for lang in (src, tgt) if indexed_dataset.dataset_exists(prefix + lang, impl=None)},
        "teachers": [file_identity(p) for p in split_teacher_paths(args.teacher_path)],
        "beam": args.beam,
        "nbest": args.nbest,
        "select": args.select,
        "max_len_a": args.max_len_a,
        "max_len_b": args.max_len_b,
        "lenpen": args.lenpen,
        "fp16": args.fp16,
    }
    if args.engine != "fairseq":  # fairseq corpora keep the settings they had before there was a choice
        settings["engine"] = args.engine
        settings["ct2_compute_type"] = resolve_compute_type(args.ct2_compute_type, use_cuda(args))
        if args.ct2_int8_weight_bits != 8:  # 8-bit corpora keep the settings they had before the choice
            settings["ct2_int8_weight_bits"] = args.ct2_int8_weight_bits
        if args.ct2_vmap is not None and args.ct2_max_batch_size:  # the map covers each sub-batch: other targets
            settings["ct2_vmap_max_batch_size"] = args.ct2_max_batch_size
        if args.ct2_vmap is not None:  # by content: another map is another corpus
            with open(args.ct2_vmap, "rb") as f:
                settings["ct2_vmap_sha256"] = hashlib.sha256(f.read()).hexdigest()
    if args.select == "sentence-bleu":
        settings["bleu"] = {"smooth": args.bleu_smooth, "remove_bpe": args.remove_bpe,
                            "tokenize": args.bleu_tokenize or ("13a" if args.remove_bpe else "none")}
    return settings


def check_output(args, settings: dict) -> Optional[dict]:
    """Refuse an output that would overwrite the input or another corpus; return a resumable manifest."""
    out = args.output
    if os.path.realpath(out) == os.path.realpath(args.data):
        raise SeqKDError(f"--output {out} is the data directory itself: write the corpus to a new directory")
    if not os.path.exists(out):
        return None
    if not os.path.isdir(out):
        raise SeqKDError(f"--output {out} exists and is not a directory")
    if not os.path.isfile(os.path.join(out, MANIFEST)):
        if os.listdir(out) and not args.overwrite:
            raise SeqKDError(f"--output {out} is not empty and has no {MANIFEST}: it does not hold a corpus made "
                             "by imitkd-seqkd. Choose a new directory, or pass --overwrite to replace its data files")
        return None
    return resume(os.path.join(out, MANIFEST), settings, lambda manifest: manifest.get("settings") or {},
                  args.overwrite, SeqKDError, OVERWRITE_HINT,
                  f"--output {out} holds a different seq-KD corpus ({{differences}}). Pass --overwrite to replace "
                  "it, or choose another --output", "{key}: {want!r} now, {have!r} there")


def use_cuda(args) -> bool:
    return torch.cuda.is_available() and not args.cpu


def setup_task(args):
    """fairseq's translation task over DATA, and the one check of the teacher's files: they exist, and
    their dictionaries (from --teacher-data or the checkpoint's defaults) equal DATA's symbol by symbol."""
    task = translation_task(args.data, args.source_lang, args.target_lang)
    check_teacher_files(args.teacher_path, args.teacher_data, args.source_lang, args.target_lang,
                        task.source_dictionary, task.target_dictionary, data=args.data)
    return task

# --- the run's own checks, once the teacher is loaded ---------------------------------------------------


def check_lengths(dataset, n: int, max_positions) -> None:
    """Every sentence must get a target: fail on one the teacher cannot take instead of skipping it."""
    import numpy as np

    _, ignored = dataset.filter_indices_by_size(np.arange(n, dtype=np.int64), max_positions)
    if len(ignored) > 0:
        first = int(ignored[0])
        raise SeqKDError(f"{len(ignored)} sentences are longer than the teacher accepts (max positions "
                         f"{max_positions}), first #{first} of size {dataset.size(first)}: every source line needs "
                         "a target, so filter them out of the split first")


def warn_if_pieces(tgt_dict, scorer: SentenceBleu) -> None:
    if scorer.remove_bpe is None and any(sym.startswith("\u2581") for sym in tgt_dict.symbols[:200]):
        logger.warning("the dictionary looks like sentencepiece pieces: sentence BLEU is scored on pieces. "
                       "Pass --remove-bpe sentencepiece to score detokenized words")
