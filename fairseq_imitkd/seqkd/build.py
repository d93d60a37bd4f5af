"""``imitkd-seqkd``'s build: decode the shards not done yet, merge them into the new data directory once
all are, and say what a build would find (``--status``).

Apart from the command line (``cli``) so that a test or a script can build a corpus from parsed options,
and from the checks (``checks``), which all run before the first write here.
"""
import logging
import os
import time
from typing import List

import torch
from fairseq import utils
from fairseq.data import indexed_dataset
from fairseq.dataclass.configs import GenerationConfig

from ..artifacts import copy_file, write_json
from ..teacher import load_teacher, split_teacher_paths
from . import SeqKDError
from .checks import check_lengths, check_output, corpus_settings, load_checked, use_cuda, warn_if_pieces
from .corpus_files import (MANIFEST, SHARDS, STATS, ShardFiles, clear_output, copy_indexed, file_stat, merge_indexed,
                           read_manifest, read_stats, write_indexed)
from .decoding import SentenceBleu, decode_shard, shard_range
from .engines import CTranslate2Engine, FairseqEngine

logger = logging.getLogger("fairseq_imitkd.seqkd")


def build(args) -> dict:
    """Check everything, decode the shards that are not done, merge when all are; return a summary."""
    prefixes, task, dataset = load_checked(args)
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
        missing = list(range(args.num_shards)) if manifest is None else shards.missing()
        if missing:
            raise SeqKDError(f"--merge: shards {missing} of {args.num_shards} are not finished in {out}")

    if todo:
        cuda = use_cuda(args)
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        teacher = load_teacher(args.teacher_path, args.teacher_data, args.source_lang, args.target_lang,
                               task.source_dictionary, task.target_dictionary)  # checks the embedding rows, freezes
        max_positions = utils.resolve_max_positions(task.max_positions(), *[m.max_positions() for m in teacher.models])
        check_lengths(dataset, n, max_positions)
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
            warn_if_pieces(task.target_dictionary, scorer)
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

    missing = shards.missing()
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


def status(args) -> str:
    """What a build with these options would find in OUTPUT (see --status)."""
    prefixes, _task, dataset = load_checked(args)
    settings = corpus_settings(args, prefixes, len(dataset))
    out = args.output
    if not os.path.isdir(out) or not os.listdir(out):
        return "missing"
    manifest = read_manifest(out)
    if manifest is None:
        return "foreign"
    if manifest.get("settings") != settings:
        return "stale"
    return "cached" if manifest.get("merged") and read_stats(out) is not None else "partial"
