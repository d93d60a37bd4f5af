"""The files of a seq-KD corpus directory, each written so that a reader never sees half of one.

``OUT/seqkd_manifest.json`` says what the corpus was made from (so that a rerun resumes only the same
corpus), ``OUT/.shards/`` holds the finished shards with their completion markers until the merge, and
``OUT/seqkd_stats.json`` is written last, once the directory is a complete fairseq data directory.
The atomic JSON and file writes, the manifest's reading and its settings check are ``fairseq_imitkd.artifacts``'s,
shared with the teacher cache; what is here is the corpus's own: fairseq's indexed datasets and its layout.
"""
import json
import logging
import os
import shutil
from typing import List, Optional, Sequence

import numpy as np
import torch
from fairseq.data import indexed_dataset

from ..artifacts import copy_file, pending, read_json, tmp_path
from . import SeqKDError

MANIFEST = "seqkd_manifest.json"
STATS = "seqkd_stats.json"
SHARDS = ".shards"

logger = logging.getLogger("fairseq_imitkd.seqkd")


def write_indexed(prefix: str, items: Sequence[torch.Tensor], vocab_size: int) -> None:
    """Write ``prefix.{bin,idx}`` in mmap format, dtype sized to the vocabulary as fairseq-preprocess does.

    Written under temporary names and renamed, so a reader (or a resumed run) never sees half a file.
    """
    _write_atomic(prefix, vocab_size, lambda builder: [builder.add_item(item) for item in items])


def merge_indexed(prefix: str, parts: Sequence[str], vocab_size: int) -> None:
    """Concatenate the mmap datasets ``parts`` (prefixes, in order) into ``prefix.{bin,idx}``, atomically."""
    _write_atomic(prefix, vocab_size, lambda builder: [builder.merge_file_(part) for part in parts])


def _write_atomic(prefix: str, vocab_size: int, fill) -> None:
    data, index = indexed_dataset.data_file_path(prefix), indexed_dataset.index_file_path(prefix)
    builder = indexed_dataset.make_builder(tmp_path(data), impl="mmap", vocab_size=vocab_size)
    try:
        fill(builder)
        builder.finalize(tmp_path(index))
    except BaseException:
        for path in (tmp_path(data), tmp_path(index)):
            if os.path.exists(path):
                os.remove(path)
        raise
    os.replace(tmp_path(data), data)
    os.replace(tmp_path(index), index)


def read_indexed(prefix: str) -> List[np.ndarray]:
    """All items of an mmap dataset as int64 arrays (for checks and tests)."""
    if os.path.getsize(indexed_dataset.data_file_path(prefix)) == 0:  # numpy cannot memory-map an empty file
        return []
    ds = indexed_dataset.MMapIndexedDataset(prefix)
    return [ds[i].numpy() for i in range(len(ds))]


#: what an unreadable manifest's error tells to do
OVERWRITE_HINT = "pass --overwrite to replace this directory's corpus"


def read_manifest(out: str) -> Optional[dict]:
    return read_json(os.path.join(out, MANIFEST), SeqKDError, OVERWRITE_HINT)


def clear_output(out: str) -> None:
    """--overwrite: remove the previous corpus (fairseq data files and our records), nothing else."""
    shutil.rmtree(os.path.join(out, SHARDS), ignore_errors=True)
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if os.path.isfile(path) and (name in (MANIFEST, STATS) or name.endswith((".bin", ".idx"))
                                     or (name.startswith("dict.") and name.endswith(".txt"))):
            os.remove(path)
    logger.info("--overwrite: removed the previous corpus's files from %s", out)


def copy_indexed(src_prefix: str, dst_prefix: str) -> None:
    for path in (indexed_dataset.data_file_path, indexed_dataset.index_file_path):
        copy_file(path(src_prefix), path(dst_prefix))


class ShardFiles:
    """Where shard ``i`` of ``n`` lives: ``OUT/.shards/shard{i}-of-{n}.{bin,idx}`` and its ``.json`` marker."""

    def __init__(self, out: str, num_shards: int):
        self.dir = os.path.join(out, SHARDS)
        self.num_shards = num_shards

    def prefix(self, i: int) -> str:
        return os.path.join(self.dir, f"shard{i}-of-{self.num_shards}")

    def marker(self, i: int) -> str:
        return self.prefix(i) + ".json"

    def done(self, i: int) -> bool:
        """Finished: the marker is written last, after both data files are in place."""
        return os.path.isfile(self.marker(i)) and indexed_dataset.dataset_exists(self.prefix(i), impl=None)

    def read_marker(self, i: int) -> dict:
        with open(self.marker(i), encoding="utf-8") as f:
            return json.load(f)

    def missing(self) -> List[int]:
        """The shards still to decode: those without a finished marker."""
        return pending(self.num_shards, self.done)


def read_stats(out: str) -> Optional[dict]:
    path = os.path.join(out, STATS)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def file_stat(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime}
