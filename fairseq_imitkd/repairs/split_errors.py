"""A binarized split that fairseq cannot load, named in one line instead of its traceback.

fairseq's ``load_langpair_dataset`` (``fairseq/tasks/translation.py``, ve-fairseq 0.12.3) raises a bare
``FileNotFoundError("Dataset not found: valid (DIR)")`` for a split that is not there, and
``LanguagePairDataset.__init__`` (``fairseq/data/language_pair_dataset.py``) asserts "Source and target
must contain the same number of examples" for one whose two sides differ in length (a seq-KD corpus written
by hand or cut short). The ``distillation`` task and the teacher's offline tools (``imitkd-seqkd``,
``imitkd-teacher-cache``) load splits through :func:`explained_split_errors`, which turns both into an
:class:`~fairseq_imitkd.errors.ImitKDError`.

Proved by ``tests/test_teacher_checks.py::test_a_data_dir_without_the_split_is_one_line`` and
``::test_a_split_whose_sides_differ_in_length_is_named``.
"""
import contextlib
import glob
import os
from typing import List

from ..errors import ImitKDError


def binarized_splits(data: str, src: str, tgt: str) -> List[str]:
    """The splits of the ``src``-``tgt`` pair binarized in ``data`` (either direction's file names)."""
    found = set()
    for pair in (f"{src}-{tgt}", f"{tgt}-{src}"):
        suffix = f".{pair}.{src}.idx"
        paths = glob.glob(os.path.join(glob.escape(data), "*" + suffix))
        found.update(os.path.basename(p)[: -len(suffix)] for p in paths)
    return sorted(found)


@contextlib.contextmanager
def explained_split_errors(task, split: str, hint: str = "binarize it with fairseq-preprocess"):
    """Run fairseq's ``load_dataset`` of ``split`` for ``task`` (a translation task) inside this context."""
    data = task.cfg.data.split(os.pathsep)[0]
    src, tgt = task.cfg.source_lang, task.cfg.target_lang
    try:
        yield
    except FileNotFoundError as e:
        if "Dataset not found" not in str(e):
            raise
        there = binarized_splits(data, src, tgt)
        raise ImitKDError(f"split {split!r} not found in {data}: no {split}.{src}-{tgt}.{src}.idx/.bin "
                          f"(binarized {src}-{tgt} splits there: {', '.join(there) if there else 'none'}); "
                          f"{hint}") from None
    except AssertionError as e:
        if "same number of examples" not in str(e):
            raise
        from fairseq.data import data_utils

        prefix = os.path.join(data, f"{split}.{src}-{tgt}.")
        if not os.path.exists(prefix + src + ".idx"):
            prefix = os.path.join(data, f"{split}.{tgt}-{src}.")
        counts = {lang: len(data_utils.load_indexed_dataset(prefix + lang, d))
                  for lang, d in ((src, task.src_dict), (tgt, task.tgt_dict))}
        raise ImitKDError(f"split {split!r} of {data}: {counts[src]} source sentences ({src}) but {counts[tgt]} "
                          f"targets ({tgt}); every source line needs its target (rebuild a seq-KD corpus with "
                          "imitkd-seqkd)") from None
