"""Sequence-level knowledge distillation corpora (Kim & Rush 2016), the ``imitkd-seqkd`` command.

Seq-KD replaces every training target by the teacher's beam output; Seq-Inter instead keeps, among the
teacher's K-best, the candidate closest to the reference by smoothed sentence BLEU.

- ``decoding``: a contiguous shard of a split batched in fairseq's own length order, the decoding loop over
  one shard, and the candidate selection;
- ``corpus_files``: the files of a corpus directory (shards and their markers, the manifest, fairseq's mmap
  ``.bin``/``.idx`` written atomically, merged and copied);
- ``checks``: every check of the options, inputs and output, run before anything is written, and the
  settings a corpus records;
- ``build``: decoding the unfinished shards, the merge into a data directory, and ``--status``;
- ``cli``: the command line.

The manifest, atomic writes and settings comparison it shares with the teacher cache are in
``fairseq_imitkd.artifacts``.
"""
from ..errors import ImitKDError


class SeqKDError(ImitKDError):
    """Bad input or output location for a seq-KD corpus; the message says what and how to fix it."""
