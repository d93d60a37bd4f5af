"""An offline teacher: its top-k next-token log-probs on the gold prefixes of a split, computed once.

Word-level KD asks the teacher the same question about the same gold prefix every epoch. The cache asks
it once (``imitkd-teacher-cache``) and keeps, for every target position of a binarized split, the
teacher's K most likely tokens, their log-probs and the log of the rest of its mass; ``word_kd
--kd-teacher-cache DIR`` then trains with no teacher in memory and no teacher pass. The loss is
``--kd-teacher-topk K``'s, the same K buckets and tail as the online teacher's (the values in float16).

Layout of ``DIR``: ``manifest.json`` (what it was built from: the teacher files' sha256, the
dictionaries' fingerprints, K, and per split its sentence count, position count and length hash) and,
per split, ``DIR/<split>/``: ``values.npy`` ``(P, K)`` float16, ``indices.npy`` ``(P, K)`` uint16 (int32
for vocabularies over 65,535), ``tail.npy`` ``(P,)`` float32 and ``offsets.npy`` ``(n+1,)`` int64, where
sentence ``i`` (fairseq's sample id) owns positions ``offsets[i]:offsets[i+1]``, its target tokens with
EOS. Arrays are numpy ``.npy`` files, memory-mapped for reading. A build writes chunk by chunk and
records finished chunks in ``DIR/<split>/progress.json``, so an interrupted build resumes.
"""
import argparse
import hashlib
import json
import logging
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import artifacts
from .artifacts import pending, write_json
from .errors import ImitKDError
from .losses import tail_mass
from .teacher import (RowKeys, TeacherBase, TeacherScores, check_teacher_files, check_teacher_paths,
                      dictionary_fingerprint, file_identity, load_teacher, split_teacher_paths, translation_task)

logger = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
ARRAYS = ("values", "indices", "tail")


class CacheError(ImitKDError):
    """A teacher cache that is not the one a run needs (another teacher, dictionary, split or K), or that
    is incomplete or damaged; the message names the difference."""


OVERWRITE_HINT = "rebuild the cache with --overwrite"
#: a difference between this run's settings and the cache's, as the cache's errors word it
LINE = "{key}: {have!r} in the cache, {want!r} here"


def read_json(path: str) -> Optional[dict]:
    return artifacts.read_json(path, CacheError, OVERWRITE_HINT)


def split_identity(dataset) -> dict:
    """A split as the cache sees it: sentence count, position count (targets with EOS), length hash."""
    sizes = np.asarray(dataset.tgt_sizes, dtype=np.int64)
    return {"sentences": int(len(sizes)), "positions": int(sizes.sum()),
            "lengths_sha1": hashlib.sha1(sizes.tobytes()).hexdigest()}


def index_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.int32


def bytes_per_position(k: int, vocab_size: int) -> int:
    return k * (2 + np.dtype(index_dtype(vocab_size)).itemsize) + 4


def _differences(want: dict, have: dict) -> List[str]:
    return artifacts.differences(want, have, LINE)


def _recorded(settings: dict):
    """The manifest's values of ``settings``' keys: the keys it has besides (``splits``) are not compared."""
    return lambda manifest: {key: manifest.get(key) for key in settings}


# --- building ---------------------------------------------------------------------------------------


def build(data: str, out: str, teacher_path: str, k: int, splits: List[str], teacher_data: Optional[str] = None,
          source_lang: Optional[str] = None, target_lang: Optional[str] = None, max_tokens: int = 8000,
          chunk_sentences: int = 2000, cpu: bool = False, overwrite: bool = False) -> dict:
    """Write (or finish) the cache of ``splits`` of ``data`` in ``out``; return a summary with timings."""
    if k < 1:
        raise CacheError(f"--topk must be >= 1, got {k}")
    if chunk_sentences < 1 or max_tokens < 1:
        raise CacheError("--chunk-sentences and --max-tokens must be >= 1")
    task = translation_task(data, source_lang, target_lang)
    check_teacher_files(teacher_path, teacher_data, task.cfg.source_lang, task.cfg.target_lang,
                        task.source_dictionary, task.target_dictionary, data=data)
    vocab = len(task.target_dictionary)
    if k > vocab:
        raise CacheError(f"--topk {k} exceeds the target vocabulary ({vocab} symbols)")
    settings = {"format": FORMAT, "k": k, "vocab_size": vocab,
                "teachers": [file_identity(p) for p in split_teacher_paths(teacher_path)],
                "dictionaries": {"src": dictionary_fingerprint(task.source_dictionary),
                                 "tgt": dictionary_fingerprint(task.target_dictionary)}}
    datasets = {}
    for split in splits:  # a missing or uneven split is refused before anything is written
        task.load_dataset(split)
        datasets[split] = task.dataset(split)
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    try:
        return _build(out, task, datasets, settings, teacher_path, teacher_data, k, vocab, max_tokens,
                      chunk_sentences, cpu, overwrite)
    finally:
        if created and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)


def _build(out, task, datasets, settings, teacher_path, teacher_data, k, vocab, max_tokens, chunk_sentences, cpu,
           overwrite) -> dict:
    manifest = artifacts.resume(
        os.path.join(out, MANIFEST), settings, _recorded(settings), overwrite, CacheError, OVERWRITE_HINT,
        f"{out} holds a teacher cache built with other settings ({{differences}}): pass --overwrite to replace it, "
        "or choose another directory", LINE)
    if manifest is None:
        manifest = dict(settings, splits={})
    summary = {"output": out, "splits": {}}
    teacher, device = None, torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    for split, dataset in datasets.items():
        ident = split_identity(dataset)
        recorded = manifest["splits"].get(split)
        split_dir = os.path.join(out, split)
        if recorded is not None and not overwrite:
            artifacts.require_same(ident, _recorded(ident)(recorded), CacheError,
                                   f"{out}/{split} was built from another {split} split ({{differences}}): pass "
                                   "--overwrite to rebuild it", LINE)
            # what the manifest says is checked against what is on disk: a file deleted, truncated or replaced,
            # or a chunk whose marker is gone, is computed again rather than reported complete
            problem = _check_split_files(split_dir, dataset, k, vocab)
            if problem is not None:
                logger.warning("%s/%s: %s: computing the whole split again", out, split, problem)
                recorded = None
            else:
                missing = _missing_chunks(split_dir, len(dataset))
                if recorded.get("complete") and not missing:
                    logger.info("%s: split %s already complete (files and chunk markers checked), nothing to do",
                                out, split)
                    summary["splits"][split] = {"reused": True}
                    continue
                if recorded.get("complete"):
                    logger.warning("%s/%s: chunks %s have no done marker in %s: computing them again", out, split,
                                   missing, PROGRESS)
        if recorded is None or overwrite:
            _allocate(split_dir, dataset, k, vocab)
            write_json(os.path.join(split_dir, PROGRESS), {"chunk_sentences": chunk_sentences, "done": []})
        manifest["splits"][split] = dict(ident, complete=False)
        write_json(os.path.join(out, MANIFEST), manifest)
        if teacher is None:
            teacher = load_teacher(teacher_path, teacher_data, task.cfg.source_lang, task.cfg.target_lang,
                                   task.source_dictionary, task.target_dictionary).to(device=device)
        start = time.time()
        computed = _fill(split_dir, dataset, teacher, k, vocab, max_tokens, device)
        manifest["splits"][split] = dict(ident, complete=True)
        write_json(os.path.join(out, MANIFEST), manifest)
        summary["splits"][split] = dict(ident, seconds=round(time.time() - start, 1), chunks_computed=computed,
                                        bytes_per_position=bytes_per_position(k, vocab))
        logger.info("%s/%s: %d sentences, %d positions, %d chunks computed in %.1f s", out, split,
                    ident["sentences"], ident["positions"], computed, time.time() - start)
    return summary


def _array_shapes(dataset, k: int, vocab: int) -> Dict[str, tuple]:
    """``{name: (shape, dtype)}`` of a split's arrays."""
    n, positions = len(dataset), int(np.asarray(dataset.tgt_sizes, dtype=np.int64).sum())
    return {"offsets": ((n + 1,), np.int64), "values": ((positions, k), np.float16),
            "indices": ((positions, k), index_dtype(vocab)), "tail": ((positions,), np.float32)}


def _check_split_files(split_dir: str, dataset, k: int, vocab: int) -> Optional[str]:
    """What is wrong with a split's files on disk (missing, unreadable, truncated, another shape), or None."""
    progress = read_json(os.path.join(split_dir, PROGRESS))
    if progress is None or not isinstance(progress.get("chunk_sentences"), int) or progress["chunk_sentences"] < 1:
        return f"{PROGRESS} is missing or damaged"
    for name, (shape, dtype) in _array_shapes(dataset, k, vocab).items():
        path = os.path.join(split_dir, f"{name}.npy")
        if not os.path.isfile(path):
            return f"{name}.npy is missing"
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:  # a truncated file cannot be memory-mapped
            return f"{name}.npy cannot be read ({e})"
        if array.shape != shape or array.dtype != dtype:
            return f"{name}.npy holds {array.dtype}{list(array.shape)}, the split needs {np.dtype(dtype)}{list(shape)}"
    sizes = np.asarray(dataset.tgt_sizes, dtype=np.int64)
    offsets = np.load(os.path.join(split_dir, "offsets.npy"))
    if offsets[0] != 0 or not np.array_equal(np.diff(offsets), sizes):
        return "offsets.npy does not match the split's target lengths"
    return None


def _missing_chunks(split_dir: str, n: int) -> List[int]:
    """The chunks of a split of ``n`` sentences that its progress record does not mark done."""
    progress = read_json(os.path.join(split_dir, PROGRESS))
    size = progress["chunk_sentences"]
    done = set(progress.get("done", []))
    return pending((n + size - 1) // size, done.__contains__)


def _allocate(split_dir: str, dataset, k: int, vocab: int) -> None:
    os.makedirs(split_dir, exist_ok=True)
    sizes = np.asarray(dataset.tgt_sizes, dtype=np.int64)
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    np.save(os.path.join(split_dir, "offsets.npy"), offsets)
    shapes = {"values": ((int(offsets[-1]), k), np.float16), "indices": ((int(offsets[-1]), k), index_dtype(vocab)),
              "tail": ((int(offsets[-1]),), np.float32)}
    for name, (shape, dtype) in shapes.items():
        np.lib.format.open_memmap(os.path.join(split_dir, f"{name}.npy"), mode="w+", dtype=dtype, shape=shape).flush()


def topk_and_tail(lprobs: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The ``k`` best log-probs and their tokens, and the log of the remaining mass (``-inf`` if none)."""
    values, index = lprobs.topk(k, dim=-1)
    return values, index, tail_mass(lprobs, index).squeeze(-1)


@torch.no_grad()
def _fill(split_dir: str, dataset, teacher: TeacherBase, k: int, vocab: int, max_tokens: int,
          device: torch.device) -> int:
    from fairseq import utils
    from fairseq.data import data_utils

    progress = read_json(os.path.join(split_dir, PROGRESS))
    done, size = set(progress["done"]), progress["chunk_sentences"]
    offsets = np.load(os.path.join(split_dir, "offsets.npy"))
    arrays = {name: np.load(os.path.join(split_dir, f"{name}.npy"), mmap_mode="r+") for name in ARRAYS}
    n = len(offsets) - 1
    order = dataset.ordered_indices()
    computed = 0
    for chunk in range((n + size - 1) // size):
        if chunk in done:
            continue
        lo, hi = chunk * size, min(n, (chunk + 1) * size)
        ids = order[(order >= lo) & (order < hi)]
        for batch in data_utils.batch_by_size(ids, dataset.num_tokens, max_tokens=max_tokens):
            sample = dataset.collater([dataset[i] for i in batch])
            if device.type == "cuda":
                sample = utils.move_to_cuda(sample, device=device)
            net = sample["net_input"]
            mask = sample["target"].ne(dataset.tgt_dict.pad())
            values, index, tail = topk_and_tail(
                teacher.log_probs(net["src_tokens"], net["src_lengths"], net["prev_output_tokens"], mask), k)
            start = 0
            for row, sid in enumerate(sample["id"].tolist()):
                count = int(mask[row].sum())
                lo_p, hi_p = int(offsets[sid]), int(offsets[sid + 1])
                if hi_p - lo_p != count:
                    raise CacheError(f"sentence {sid}: {count} target positions, the split's sizes say {hi_p - lo_p}")
                arrays["values"][lo_p:hi_p] = values[start:start + count].cpu().numpy()
                arrays["indices"][lo_p:hi_p] = index[start:start + count].cpu().numpy()
                arrays["tail"][lo_p:hi_p] = tail[start:start + count].cpu().numpy()
                start += count
        for a in arrays.values():
            a.flush()
        done.add(chunk)
        write_json(os.path.join(split_dir, PROGRESS), dict(progress, done=sorted(done)))
        computed += 1
    return computed


# --- reading ----------------------------------------------------------------------------------------


class CachedSplit:
    """One split of a cache, memory-mapped: the teacher's top-k rows of any batch of its sentences."""

    def __init__(self, directory: str, split: str, k: int, vocab: int, ident: dict):
        self.split, self.k, self.vocab = split, k, vocab
        split_dir = os.path.join(directory, split)
        try:
            self.offsets = np.load(os.path.join(split_dir, "offsets.npy"))
            self.arrays = {name: np.load(os.path.join(split_dir, f"{name}.npy"), mmap_mode="r") for name in ARRAYS}
        except (OSError, ValueError) as e:
            raise CacheError(f"teacher cache {directory}/{split} cannot be read ({e}): truncated or damaged, "
                             "rebuild it with imitkd-teacher-cache --overwrite") from e
        positions = ident["positions"]
        want = {"values": (positions, k), "indices": (positions, k), "tail": (positions,)}
        for name, shape in want.items():
            if self.arrays[name].shape != shape:
                raise CacheError(f"teacher cache {directory}/{split}/{name}.npy has shape {self.arrays[name].shape}, "
                                 f"the manifest says {shape}: rebuild it")
        if len(self.offsets) != ident["sentences"] + 1 or int(self.offsets[-1]) != positions:
            raise CacheError(f"teacher cache {directory}/{split}/offsets.npy does not match its manifest: rebuild it")

    def rows(self, ids: Tensor, counts: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(values, index, tail)`` of the scored positions of a batch, in its row-major order."""
        spans = []
        for sid, count in zip(ids.tolist(), counts.tolist()):
            lo, hi = int(self.offsets[sid]), int(self.offsets[sid + 1])
            if hi - lo != count:
                raise CacheError(f"sentence {sid} of split {self.split!r} has {count} target positions here but "
                                 f"{hi - lo} in the teacher cache: the cache was built from other data")
            spans.append(np.arange(lo, hi))
        take = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
        values = torch.from_numpy(np.ascontiguousarray(self.arrays["values"][take])).float()
        index = torch.from_numpy(self.arrays["indices"][take].astype(np.int64))
        tail = torch.from_numpy(np.ascontiguousarray(self.arrays["tail"][take]))
        return values, index, tail


class TeacherCache:
    """An opened cache, checked against the run that uses it (dictionaries, K, teacher, splits)."""

    def __init__(self, directory: str, src_dict, tgt_dict, teacher_path: Optional[str] = None):
        self.directory = directory
        manifest = read_json(os.path.join(directory, MANIFEST))
        if manifest is None:
            raise CacheError(f"--kd-teacher-cache {directory} holds no {MANIFEST}: build it with imitkd-teacher-cache")
        if manifest.get("format") != FORMAT:
            raise CacheError(f"teacher cache {directory} has format {manifest.get('format')}, this version reads "
                             f"{FORMAT}: rebuild it")
        here = {"src": dictionary_fingerprint(src_dict), "tgt": dictionary_fingerprint(tgt_dict)}
        diff = _differences(here, manifest.get("dictionaries", {}))
        if diff:
            raise CacheError(f"teacher cache {directory} was built with other dictionaries ({'; '.join(diff)})")
        if teacher_path:
            teachers = [file_identity(p) for p in check_teacher_paths(teacher_path)]
            if teachers != manifest.get("teachers"):
                raise CacheError(f"teacher cache {directory} was built from another teacher than --teacher-path "
                                 f"{teacher_path} (sha256 {[t['sha256'][:12] for t in manifest.get('teachers', [])]} "
                                 f"in the cache, {[t['sha256'][:12] for t in teachers]} here)")
        self.k, self.vocab, self.manifest = manifest["k"], manifest["vocab_size"], manifest
        self._splits: Dict[str, CachedSplit] = {}

    def has(self, split: str) -> bool:
        return split in self.manifest.get("splits", {})

    def split(self, name: str, dataset) -> CachedSplit:
        """The cached split ``name``, checked against the run's ``dataset`` of that name."""
        if name not in self._splits:
            recorded = self.manifest.get("splits", {}).get(name)
            if recorded is None:
                raise CacheError(f"teacher cache {self.directory} holds no split {name!r} (it has "
                                 f"{sorted(self.manifest.get('splits', {}))})")
            if not recorded.get("complete"):
                raise CacheError(f"teacher cache {self.directory}/{name} is incomplete: run imitkd-teacher-cache "
                                 "again to finish it")
            ident = split_identity(dataset)
            diff = _differences(ident, {key: recorded.get(key) for key in ident})
            if diff:
                raise CacheError(f"teacher cache {self.directory}/{name} was built from another {name} split "
                                 f"({'; '.join(diff)})")
            self._splits[name] = CachedSplit(self.directory, name, self.k, self.vocab, ident)
        return self._splits[name]


def _buckets(values: Tensor, index: Tensor, tail: Tensor) -> TeacherScores:
    """The top-k log-probs and the tail as ``(N, K+1)`` buckets, with the tokens they belong to."""
    return TeacherScores(torch.cat([values, tail.unsqueeze(-1)], -1), index)


class CachedTeacher(TeacherBase):
    """The teacher behind the same seam as a live one: the rows a cache holds come from its files, the rest
    (rolled-out prefixes, a split it lacks) from the live teacher, loaded only if ever asked.

    Every answer comes as top-k buckets (``TeacherScores.index``): the live rows are cut to the cache's K
    as the cache was cut, so every row of a batch is compared on K+1 buckets (the cached ones hold the
    float16-rounded values of the files, the live ones float32).
    """

    def __init__(self, cache: TeacherCache, dataset: Callable[[str], object],
                 live: Callable[[torch.device], TeacherBase]):
        self.cache, self._dataset, self._live = cache, dataset, live
        self._device = torch.device("cpu")

    def _cached_rows(self, keys: Optional[RowKeys]) -> Optional[Tensor]:
        if keys is None or not self.cache.has(keys.split):
            return None
        return keys.gold

    def scores(self, src_tokens, src_lengths, prev_output_tokens, mask, keys=None) -> TeacherScores:
        cached = self._cached_rows(keys)
        counts = mask.sum(1)
        if cached is not None and bool(cached.all()):
            return self._from_files(keys, counts, mask.device)
        if cached is None or not bool(cached.any()):
            return self._from_live(src_tokens, src_lengths, prev_output_tokens, mask)
        # both kinds of row: each answered where it can be, then put back in the batch's position order
        live_rows, file_rows = (~cached).nonzero().squeeze(1), cached.nonzero().squeeze(1)
        live = self._from_live(src_tokens[live_rows], src_lengths[live_rows], prev_output_tokens[live_rows],
                               mask[live_rows])
        files = self._from_files(keys[file_rows], counts[file_rows], mask.device)
        position_is_cached = cached.repeat_interleave(counts)
        lprobs = live.lprobs.new_empty(position_is_cached.size(0), live.lprobs.size(1))
        index = live.index.new_empty(position_is_cached.size(0), live.index.size(1))
        lprobs[position_is_cached], index[position_is_cached] = files.lprobs, files.index
        lprobs[~position_is_cached], index[~position_is_cached] = live.lprobs, live.index
        return TeacherScores(lprobs, index)

    def _from_files(self, keys: RowKeys, counts: Tensor, device: torch.device) -> TeacherScores:
        values, index, tail = self.cache.split(keys.split, self._dataset(keys.split)).rows(keys.ids, counts)
        return _buckets(values.to(device), index.to(device), tail.to(device))

    def _from_live(self, src_tokens, src_lengths, prev_output_tokens, mask) -> TeacherScores:
        lprobs = self._live(mask.device).scores(src_tokens, src_lengths, prev_output_tokens, mask).lprobs
        return _buckets(*topk_and_tail(lprobs, self.cache.k))

    def inference(self):
        """A cache cannot decode: rollouts that let the teacher act get the live teacher's models."""
        return self._live(self._device).inference()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what the files hold

    def to(self, device=None, dtype=None) -> "CachedTeacher":
        if device is not None:
            self._device = torch.device(device)
        return self


# --- command line -----------------------------------------------------------------------------------


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imitkd-teacher-cache",
        description="Write a teacher's top-k next-token log-probs for every target position of binarized "
                    "splits, for word_kd --kd-teacher-cache. Run it again to resume an interrupted build.")
    p.add_argument("data", help="the binarized data directory (the student's, made with the teacher's dictionaries)")
    p.add_argument("-o", "--output", required=True, help="the cache directory")
    p.add_argument("--teacher-path", required=True, help="the teacher checkpoint(s), ':'-separated for an ensemble")
    p.add_argument("--teacher-data", help="the directory of the teacher's own dictionaries")
    p.add_argument("--topk", type=int, default=32, help="K, the teacher's most likely tokens kept per position")
    p.add_argument("--splits", default="train,valid", help="comma-separated (default: train,valid)")
    p.add_argument("-s", "--source-lang")
    p.add_argument("-t", "--target-lang")
    p.add_argument("--max-tokens", type=int, default=8000, help="tokens per teacher batch")
    p.add_argument("--chunk-sentences", type=int, default=2000, help="sentences per resumable chunk")
    p.add_argument("--cpu", action="store_true", help="compute on CPU even if a GPU is present")
    p.add_argument("--overwrite", action="store_true", help="replace a cache built with other settings")
    return p


def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stderr)
    try:
        summary = build(args.data, args.output, args.teacher_path, args.topk,
                        [s for s in args.splits.split(",") if s], teacher_data=args.teacher_data,
                        source_lang=args.source_lang, target_lang=args.target_lang, max_tokens=args.max_tokens,
                        chunk_sentences=args.chunk_sentences, cpu=args.cpu, overwrite=args.overwrite)
    except ImitKDError as e:
        raise SystemExit(f"imitkd-teacher-cache: {e}") from None
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
