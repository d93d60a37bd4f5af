"""``imitkd-seqkd``: build a sequence-level KD corpus (Kim & Rush 2016) as a new fairseq data directory.

The teacher (or an ensemble ``a.pt:b.pt``) beam-decodes one binarized split of a translation data
directory; its outputs become the targets of a new data directory that ``fairseq-train`` reads as is:
the same dictionaries, the source side copied unchanged, one target per source line in the split's
original order, and the other splits (valid/test) copied over.

- Seq-KD (``--select top``, default): the beam's best hypothesis.
- Seq-Inter (``--nbest K --select sentence-bleu``): among the K best, the one with the highest smoothed
  sentence BLEU against the reference.

Work is split into contiguous shards under ``OUT/.shards/``; a finished shard has a completion marker
and is never decoded again, so an interrupted or partial run (``--shard-id``) resumes where it stopped,
and the corpus is merged once every shard is there. ``OUT/seqkd_manifest.json`` records what the corpus
was made from, so that a rerun resumes only the same corpus and never mixes two; ``--status`` says what a
build would find there (scripts reuse a finished corpus by it).

Every check (data, split, teacher, dictionaries, output directory) runs before anything is written.

Seq-Inter choices:
- K defaults to the beam (5): the n-best list then comes from the very beam search Seq-KD runs anyway.
  Kim & Rush went up to K=35 (``--beam 35 --nbest 35``). On CPU that is impractical for a training set:
  with the Multi30k teacher, 1 thread, beam 35 took 7.4x beam 5's time (32.6 s against 4.4 s for 101
  sentences). On an H100 the wider beam is nearly free for a small teacher, and scoring 35 candidates
  per sentence with sacrebleu (on the CPU) becomes the main cost.
- Smoothing: sacrebleu's ``BLEU(effective_order=True, smooth_method="exp")``, exactly
  ``sacrebleu.sentence_bleu``'s defaults, so any chosen score can be recomputed with one sacrebleu call.
  The K candidates of one beam differ by a few tokens and, on short sentences, often share no 4-gram
  with the reference; unsmoothed BLEU would give them all 0 and the choice would be arbitrary, while
  'exp' keeps them non-zero and ordered by their lower-order matches. ``effective_order`` leaves out
  the orders longer than the sentence.
- Tokenization: the data directory does not say which subword model made it, so by default candidates
  are scored on the dictionary's tokens as they stand (no further tokenization), i.e. on subword
  pieces for a BPE corpus, and a warning is logged when those look like sentencepiece pieces. For a
  subword corpus pass ``--remove-bpe sentencepiece`` (or ``subword_nmt``): both sides are then
  detokenized and scored by sacrebleu's 13a tokenizer, on words as final BLEU is, so a candidate gets
  no credit for matching fragments of a wrong word. That is the setting we recommend and use.
"""
import argparse
import hashlib
import logging
import os
import sys
import time
from typing import Dict, List, Optional

import torch
from fairseq import utils
from fairseq.data import data_utils, indexed_dataset
from fairseq.dataclass.configs import GenerationConfig

from ..errors import ImitKDError
from ..export import CPU_INT8, QUANTIZATIONS
from ..teacher import (check_teacher_files, file_identity, load_teacher, split_teacher_paths,
                       translation_task)
from . import SeqKDError
from .corpus_files import (
    MANIFEST,
    SHARDS,
    STATS,
    ShardFiles,
    clear_output,
    copy_file,
    copy_indexed,
    file_stat,
    merge_indexed,
    read_manifest,
    read_stats,
    write_indexed,
    write_json,
)
from .decoding import SELECT_CHOICES, SMOOTH_CHOICES, SentenceBleu, decode_shard, shard_range
from .engines import (CT2_CPU_MAX_BATCH, ENGINES, CTranslate2Engine, FairseqEngine, resolve_compute_type,
                      resolve_max_batch_size)

logger = logging.getLogger("fairseq_imitkd.seqkd")

DEFAULT_COPY_SPLITS = ("valid", "test")
DEFAULT_MAX_TOKENS = 12000  # fairseq-generate's default when neither --max-tokens nor --batch-size is given


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imitkd-seqkd",
        description="Build a sequence-level knowledge-distillation corpus (Kim & Rush 2016): a new fairseq "
        "data directory whose targets are a teacher's beam outputs. Seq-KD keeps the beam's best; Seq-Inter "
        "(--nbest K --select sentence-bleu) keeps the K-best candidate closest to the reference.",
    )
    p.add_argument("data", help="fairseq translation data directory (binarized with the teacher's dictionaries)")
    p.add_argument("-o", "--output", required=True,
                   help="the new data directory to write (must not be DATA; may be a partial run of the same corpus)")
    p.add_argument("--teacher-path", "--path", dest="teacher_path", required=True,
                   help="teacher checkpoint; several separated by ':' form an ensemble, as fairseq-generate's --path")
    p.add_argument("--teacher-data", default=None,
                   help="directory with the teacher's own dict.{src,tgt}.txt. Default: the data directory recorded "
                   "in the checkpoint if it holds them, else the checkpoint's folder")
    p.add_argument("--split", default="train", help="the split to distil (default: %(default)s)")
    p.add_argument("-s", "--source-lang", default=None, help="source language (default: inferred from DATA's files)")
    p.add_argument("-t", "--target-lang", default=None, help="target language (default: inferred from DATA's files)")
    p.add_argument("--copy-splits", default=None,
                   help="comma-separated splits copied unchanged into OUTPUT ('' for none). Default: valid and "
                   "test, those present (the distilled split is never copied)")
    g = p.add_argument_group("generation (fairseq's SequenceGenerator)")
    g.add_argument("--beam", type=int, default=5, help="beam size (default: %(default)s)")
    g.add_argument("--nbest", type=int, default=None,
                   help="K, the candidates --select chooses from (at most --beam). Default: 1 with --select top; "
                   "the whole beam with --select sentence-bleu")
    g.add_argument("--max-len-a", type=float, default=0,
                   help="outputs have at most a*srclen+b tokens (default: %(default)s)")
    g.add_argument("--max-len-b", type=int, default=200, help="b of --max-len-a's limit (default: %(default)s)")
    g.add_argument("--lenpen", type=float, default=1,
                   help="length penalty, <1 favours shorter outputs (default: %(default)s)")
    g.add_argument("--max-tokens", type=int, default=None,
                   help=f"source tokens per batch (default {DEFAULT_MAX_TOKENS} when --batch-size is not given)")
    g.add_argument("--batch-size", type=int, default=None, help="sentences per batch")
    g.add_argument("--cpu", action="store_true", help="decode on CPU even if a GPU is available")
    g.add_argument("--fp16", action="store_true", help="hold the teacher in float16 (GPU only, fairseq engine)")
    g.add_argument("--engine", choices=ENGINES, default="fairseq",
                   help="fairseq: the SequenceGenerator, as fairseq-generate; ctranslate2: convert the teacher once "
                        "and decode with CTranslate2, several times faster on CPU, not bit-equal (default: %(default)s)")
    g.add_argument("--ct2-compute-type", default="default",
                   help="CTranslate2 weight/compute type with --engine ctranslate2: int8, float32, int8_float16, ... "
                        "(default: int8 on CPU, int8_float16 on a GPU)")
    g.add_argument("--ct2-vmap", default=None, metavar="FILE",
                   help="with --engine ctranslate2, restrict each sentence's output vocabulary with this "
                        "imitkd-vmap file: faster, and the targets differ where the map misses a piece the "
                        "teacher would pick (default: the whole vocabulary)")
    g.add_argument("--ct2-max-batch-size", type=int, default=None, metavar="N",
                   help="with --engine ctranslate2, sentences CTranslate2 decodes at a time within each fairseq "
                        "batch: faster on CPU; the same targets at float32, all but about 1 in 2,000 at int8, "
                        "and other targets with --ct2-vmap (a map applies to a whole CTranslate2 batch, so a "
                        "vmap corpus records it) (default: "
                        f"{CT2_CPU_MAX_BATCH} on CPU, the whole batch on a GPU or with --ct2-vmap; 0: the whole batch)")
    g.add_argument("--ct2-int8-weight-bits", type=int, choices=(8, 7), default=8,
                   help="with --engine ctranslate2 and a CPU int8 compute type: 7 keeps the weights within ±63, "
                        "for CPUs whose int8 kernels saturate without AVX-512 VNNI (see imitkd-export) "
                        "(default: %(default)s, CTranslate2's own)")
    s = p.add_argument_group("selection (Seq-Inter)")
    s.add_argument("--select", choices=SELECT_CHOICES, default="top",
                   help="top: the beam's best (Seq-KD). sentence-bleu: the n-best candidate with the highest "
                   "smoothed sentence BLEU against the reference (Seq-Inter); ties go to the better beam rank "
                   "(default: %(default)s)")
    s.add_argument("--bleu-smooth", choices=SMOOTH_CHOICES, default="exp",
                   help="sacrebleu smoothing of sentence BLEU (default: %(default)s, sacrebleu's own for "
                   "sentence BLEU)")
    s.add_argument("--remove-bpe", default=None,
                   help="score detokenized text: remove this subword marking first (fairseq's names: "
                   "sentencepiece, subword_nmt, '@@ '). Default: score the dictionary's tokens as they stand")
    s.add_argument("--bleu-tokenize", default=None,
                   help="sacrebleu tokenizer for scoring (default: 13a with --remove-bpe, else none)")
    r = p.add_argument_group("shards and resume")
    r.add_argument("--num-shards", type=int, default=1,
                   help="split the work into N contiguous shards (default: %(default)s)")
    r.add_argument("--shard-id", type=int, default=None,
                   help="decode only this shard (default: every unfinished shard); the corpus is merged once all exist")
    r.add_argument("--merge", action="store_true", help="decode nothing, merge the finished shards (all must exist)")
    r.add_argument("--status", action="store_true",
                   help="print the state of OUTPUT's corpus against these options and exit, without reading the "
                   "teacher's weights: cached (built with these settings), partial (these settings, shards still to "
                   "do: a rerun resumes), stale (another corpus: --overwrite replaces it), foreign (files that are "
                   "not a corpus), missing (none)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace a different corpus in OUTPUT (removes its manifest, stats, .shards/, dict.*.txt, "
                   "*.bin and *.idx; other files stay)")
    o = p.add_argument_group("output")
    o.add_argument("--no-progress-bar", action="store_true", help="log progress lines instead of a tqdm bar")
    o.add_argument("--log-interval", type=int, default=100,
                   help="batches between progress lines (default: %(default)s)")
    return p


# --- checks -------------------------------------------------------------------------------------------


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
    manifest = read_manifest(out)
    if manifest is None:
        if os.listdir(out) and not args.overwrite:
            raise SeqKDError(f"--output {out} is not empty and has no {MANIFEST}: it does not hold a corpus made "
                             "by imitkd-seqkd. Choose a new directory, or pass --overwrite to replace its data files")
        return None
    if manifest.get("settings") != settings:
        if not args.overwrite:
            theirs = manifest.get("settings") or {}
            diff = [f"{k}: {settings.get(k)!r} now, {theirs.get(k)!r} there"
                    for k in sorted(set(settings) | set(theirs)) if settings.get(k) != theirs.get(k)]
            raise SeqKDError(f"--output {out} holds a different seq-KD corpus ({'; '.join(diff)}). Pass --overwrite "
                             "to replace it, or choose another --output")
        return None
    return None if args.overwrite else manifest


# --- the run ---------------------------------------------------------------------------------------------


def use_cuda(args) -> bool:
    return torch.cuda.is_available() and not args.cpu


def setup_task(args):
    """fairseq's translation task over DATA, and the one check of the teacher's files: they exist, and
    their dictionaries (from --teacher-data or the checkpoint's defaults) equal DATA's symbol by symbol."""
    task = translation_task(args.data, args.source_lang, args.target_lang)
    check_teacher_files(args.teacher_path, args.teacher_data, args.source_lang, args.target_lang,
                        task.source_dictionary, task.target_dictionary, data=args.data)
    return task


def build(args) -> dict:
    """Check everything, decode the shards that are not done, merge when all are; return a summary."""
    check_options(args)
    prefixes = check_inputs(args)
    task = setup_task(args)
    task.load_dataset(args.split)
    dataset = task.dataset(args.split)
    n = len(dataset)
    if n == 0:
        raise SeqKDError(f"split {args.split!r} of {args.data} is empty")
    settings = corpus_settings(args, prefixes, n)
    manifest = check_output(args, settings)
    out, shards = args.output, ShardFiles(args.output, args.num_shards)
    summary = {"output": out, "decoded_shards": [], "reused_shards": [], "merged": False}

    if manifest and manifest.get("merged") and not os.path.isdir(shards.dir) and not args.merge:
        logger.info("%s already holds this corpus, merged (its %s/ was removed): nothing to do", out, SHARDS)
        return dict(summary, stats=read_stats(out))
    if args.merge:
        todo = []
    elif args.shard_id is not None:
        todo = [args.shard_id]
    else:
        todo = list(range(args.num_shards))
    if manifest is not None:
        summary["reused_shards"] = [i for i in todo if shards.done(i)]
        for i in summary["reused_shards"]:
            logger.info("shard %d/%d already done: skipped", i, args.num_shards)
        todo = [i for i in todo if i not in summary["reused_shards"]]
    if args.merge:
        missing = [i for i in range(args.num_shards) if manifest is None or not shards.done(i)]
        if missing:
            raise SeqKDError(f"--merge: shards {missing} of {args.num_shards} are not finished in {out}")

    if todo:
        cuda = use_cuda(args)
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        teacher = load_teacher(args.teacher_path, args.teacher_data, args.source_lang, args.target_lang,
                               task.source_dictionary, task.target_dictionary)  # checks the embedding rows, freezes
        max_positions = utils.resolve_max_positions(task.max_positions(), *[m.max_positions() for m in teacher.models])
        _check_lengths(dataset, n, max_positions)
        gen_cfg = GenerationConfig(beam=args.beam, nbest=args.nbest, max_len_a=args.max_len_a,
                                   max_len_b=args.max_len_b, lenpen=args.lenpen)
        if args.engine == "ctranslate2":
            engine = CTranslate2Engine(args.teacher_path, args.teacher_data or args.data, args.source_lang,
                                       args.target_lang, task.source_dictionary, task.target_dictionary, gen_cfg,
                                       cuda, settings["ct2_compute_type"], args.ct2_vmap,
                                       args.ct2_int8_weight_bits, args.ct2_max_batch_size)
            cuda = False  # CTranslate2 takes the batch from CPU tensors
            del teacher  # only checked above, on CPU; CTranslate2 holds its own copy of the weights
        else:
            teacher.to(device=device, dtype=torch.float16 if args.fp16 else None)
            engine = FairseqEngine(task, teacher, gen_cfg, cuda)
        scorer = None
        if args.select == "sentence-bleu":
            scorer = SentenceBleu(task.target_dictionary, args.bleu_smooth, args.remove_bpe, args.bleu_tokenize)
            _warn_if_pieces(task.target_dictionary, scorer)
        # nothing was written before this point: every check above has passed
        if args.overwrite and os.path.isdir(out):
            clear_output(out)
        os.makedirs(shards.dir, exist_ok=True)
        if manifest is None:
            manifest = {"tool": "imitkd-seqkd", "settings": settings, "merged": False, "created": time.time(),
                        "teacher_files": [file_stat(p) for p in split_teacher_paths(args.teacher_path)]}
            write_json(os.path.join(out, MANIFEST), manifest)
        elif manifest.get("merged"):  # the merged files go stale until the next merge, even if this run dies
            manifest["merged"] = False
            write_json(os.path.join(out, MANIFEST), manifest)
        try:
            for i in todo:
                lo, hi = shard_range(n, args.num_shards, i)
                logger.info("decoding shard %d/%d: sentences [%d, %d) of %s on %s",
                            i, args.num_shards, lo, hi, args.split, engine.device_name())
                targets, stats = decode_shard(
                    task, engine, dataset, lo, hi, nbest=args.nbest, scorer=scorer,
                    max_tokens=args.max_tokens, batch_size=args.batch_size, max_positions=max_positions,
                    use_cuda=cuda, log_format="simple" if args.no_progress_bar else "tqdm",
                    log_interval=args.log_interval, name=f"shard {i}/{args.num_shards}")
                write_indexed(shards.prefix(i), targets, len(task.target_dictionary))
                write_json(shards.marker(i), dict(stats, shard=i, num_shards=args.num_shards, lo=lo, hi=hi,
                                                  device=engine.device_name(), finished=time.time()))
                logger.info("shard %d/%d done: %d sentences in %.1f s", i, args.num_shards, stats["sentences"],
                            stats["seconds"])
                summary["decoded_shards"].append(i)
        finally:
            engine.close()

    missing = [i for i in range(args.num_shards) if not shards.done(i)]
    if missing:
        logger.info("%d of %d shards finished; still to do: %s. Rerun to finish and merge.",
                    args.num_shards - len(missing), args.num_shards, missing)
        summary["missing_shards"] = missing
        return summary
    if summary["decoded_shards"] or args.merge or not manifest.get("merged"):
        stats = merge(args, task, dataset, prefixes, settings, shards, n)
        manifest["merged"] = True
        write_json(os.path.join(out, MANIFEST), manifest)
        summary["merged"] = True
    else:
        logger.info("%s already holds this corpus, merged: nothing to do", out)
        stats = read_stats(out)
    summary["stats"] = stats
    return summary


def merge(args, task, dataset, prefixes, settings, shards: ShardFiles, n: int) -> dict:
    """Write the data directory: merged targets, copied source/dictionaries/splits, then the stats."""
    out, split, src, tgt = args.output, args.split, args.source_lang, args.target_lang
    out_prefix = os.path.join(out, f"{split}.{src}-{tgt}.")
    merge_indexed(out_prefix + tgt, [shards.prefix(i) for i in range(shards.num_shards)], len(task.target_dictionary))
    merged = indexed_dataset.MMapIndexedDataset.Index(indexed_dataset.index_file_path(out_prefix + tgt))
    if len(merged) != n:
        raise SeqKDError(f"merged {len(merged)} targets for {n} source sentences: the shards in {shards.dir} "
                         "do not match this split; rerun with --overwrite")
    source = prefixes[split] + src
    if indexed_dataset.infer_dataset_impl(source) == "mmap":
        copy_indexed(source, out_prefix + src)  # byte for byte
    else:  # an older binary format: the same token arrays, rewritten in mmap format
        write_indexed(out_prefix + src, [dataset.src[i] for i in range(n)], len(task.source_dictionary))
    for lang in dict.fromkeys((src, tgt)):
        copy_file(os.path.join(args.data, f"dict.{lang}.txt"), os.path.join(out, f"dict.{lang}.txt"))
    copied = [name for name in prefixes if name != split]
    for name in copied:
        for lang in (src, tgt):
            if indexed_dataset.dataset_exists(prefixes[name] + lang, impl=None):
                copy_indexed(prefixes[name] + lang, os.path.join(out, f"{name}.{src}-{tgt}.{lang}"))
    stats = _aggregate([shards.read_marker(i) for i in range(shards.num_shards)], args, settings, copied)
    write_json(os.path.join(out, STATS), stats)
    logger.info("merged %d shards into %s (%d sentences; copied splits: %s)", shards.num_shards, out, n,
                ", ".join(copied) or "none")
    return stats


def _aggregate(markers: List[dict], args, settings: dict, copied: List[str]) -> dict:
    total = {k: sum(m[k] for m in markers)
             for k in ("sentences", "seconds", "source_tokens", "target_tokens", "bleu_chosen_sum", "bleu_top_sum",
                       "changed")}
    n = total["sentences"]
    stats = {
        "split": args.split,
        "sentences": n,
        "seconds": round(total["seconds"], 3),
        "sentences_per_second": round(n / total["seconds"], 3) if total["seconds"] > 0 else None,
        "mean_source_length": total["source_tokens"] / n,
        "mean_target_length": total["target_tokens"] / n,
        "num_shards": len(markers),
        "shards": [{k: m[k] for k in ("shard", "lo", "hi", "sentences", "seconds", "device")} for m in markers],
        "copied_splits": copied,
        "settings": settings,
        "note": "seconds: decoding time summed over shards (teacher loading excluded); lengths in "
                "dictionary tokens, EOS excluded",
    }
    if args.select == "sentence-bleu":
        stats["mean_sentence_bleu_chosen"] = total["bleu_chosen_sum"] / n
        stats["mean_sentence_bleu_top"] = total["bleu_top_sum"] / n
        stats["changed_fraction"] = total["changed"] / n
    return stats


def _check_lengths(dataset, n: int, max_positions) -> None:
    """Every sentence must get a target: fail on one the teacher cannot take instead of skipping it."""
    import numpy as np

    _, ignored = dataset.filter_indices_by_size(np.arange(n, dtype=np.int64), max_positions)
    if len(ignored) > 0:
        first = int(ignored[0])
        raise SeqKDError(f"{len(ignored)} sentences are longer than the teacher accepts (max positions "
                         f"{max_positions}), first #{first} of size {dataset.size(first)}: every source line needs "
                         "a target, so filter them out of the split first")


def _warn_if_pieces(tgt_dict, scorer: SentenceBleu) -> None:
    if scorer.remove_bpe is None and any(sym.startswith("\u2581") for sym in tgt_dict.symbols[:200]):
        logger.warning("the dictionary looks like sentencepiece pieces: sentence BLEU is scored on pieces. "
                       "Pass --remove-bpe sentencepiece to score detokenized words")


def status(args) -> str:
    """What a build with these options would find in OUTPUT (see --status)."""
    check_options(args)
    prefixes = check_inputs(args)
    task = setup_task(args)
    task.load_dataset(args.split)
    settings = corpus_settings(args, prefixes, len(task.dataset(args.split)))
    out = args.output
    if not os.path.isdir(out) or not os.listdir(out):
        return "missing"
    manifest = read_manifest(out)
    if manifest is None:
        return "foreign"
    if manifest.get("settings") != settings:
        return "stale"
    return "cached" if manifest.get("merged") and read_stats(out) is not None else "partial"


def format_summary(summary: dict) -> str:
    def shards(ids):
        return "none" if not ids else str(ids) if len(ids) <= 8 else f"{len(ids)} ({ids[0]}..{ids[-1]})"

    lines = [f"imitkd-seqkd: {summary['output']}: decoded shards {shards(summary['decoded_shards'])}, "
             f"reused {shards(summary['reused_shards'])}"]
    if summary.get("missing_shards"):
        lines.append(f"  not merged yet: shards {shards(summary['missing_shards'])} still to do")
    stats = summary.get("stats")
    if stats:
        lines.append(f"  {stats['sentences']} sentences of {stats['split']}, {stats['seconds']:.1f} s decoding, "
                     f"{stats['sentences_per_second']} sentences/s, mean target length "
                     f"{stats['mean_target_length']:.2f} (source {stats['mean_source_length']:.2f})")
        if "mean_sentence_bleu_chosen" in stats:
            lines.append(f"  sentence BLEU: chosen {stats['mean_sentence_bleu_chosen']:.2f}, top "
                         f"{stats['mean_sentence_bleu_top']:.2f}; {100 * stats['changed_fraction']:.1f}% of targets "
                         "are not the beam's best")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    # force: importing fairseq has already given the root logger a bare handler (a module-level logging.info)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", level=logging.INFO, stream=sys.stderr, force=True)
    try:
        if args.status:
            print(status(args))
            return 0
        summary = build(args)
    except ImitKDError as e:  # SeqKDError, TeacherError, and the converter's ExportError
        print(f"imitkd-seqkd: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
