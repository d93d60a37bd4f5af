"""The frozen teacher: where its dictionaries come from, how it is checked, loaded and run.

fairseq checkpoints hold no dictionaries: a model is rebuilt from whatever ``dict.*.txt`` its task
finds in the data directory. Loading a teacher with the student's data directory would therefore
silently give it the student's vocabulary, and a same-size vocabulary in another order would train
the student on garbage with no error. So the teacher's dictionaries are read from the teacher's own
data directory and compared with the student's symbol by symbol.
"""
import abc
import contextlib
import dataclasses
import hashlib
import logging
import math
import os
from typing import ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
from fairseq import checkpoint_utils, tasks, utils
from fairseq.data import Dictionary
from torch import Tensor

from .repairs.checkpoint_loading import config_value, read_fairseq_checkpoint
from .errors import ImitKDError
from .scoring import outside_autocast, scored_log_probs

logger = logging.getLogger(__name__)


class TeacherError(ImitKDError):
    """A teacher checkpoint or its dictionaries cannot be used with this task."""


def file_identity(path: str) -> Dict[str, object]:
    """A teacher's content identity: a copied or moved teacher is the same teacher, a retrained one is not."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "size": os.path.getsize(path)}


def dictionary_fingerprint(d: Dictionary) -> dict:
    """Size and hash of a dictionary's symbols in order: fairseq checkpoints hold no dictionaries."""
    return {"size": len(d), "sha1": hashlib.sha1("\n".join(d.symbols).encode("utf-8")).hexdigest()}


def split_teacher_paths(teacher_path: Optional[str]) -> List[str]:
    """``a.pt:b.pt`` -> ``["a.pt", "b.pt"]`` (an ensemble, as fairseq's ``--path``)."""
    return [p for p in utils.split_paths(teacher_path or "") if p]


def _checkpoint_config(state: dict):
    cfg = state.get("cfg")
    if cfg is not None:
        return cfg["task"], cfg["model"]
    args = state["args"]
    return vars(args), vars(args)


def read_checkpoint_config(path: str):
    """The ``(task, model)`` config sections of a checkpoint, without reading its weights into memory."""
    return _checkpoint_config(read_fairseq_checkpoint(path, "teacher checkpoint", TeacherError))


def _has_dicts(directory: str, langs: Sequence[str]) -> bool:
    return all(os.path.isfile(os.path.join(directory, f"dict.{lang}.txt")) for lang in langs)


def find_teacher_data(path: str, teacher_data: Optional[str], langs: Sequence[str],
                      task_cfg=None) -> Tuple[str, str]:
    """``(directory, how it was chosen)``: where the teacher's own ``dict.{lang}.txt`` files are.

    Order: ``--teacher-data`` if given; else the data directory recorded in the checkpoint, if it
    holds the dictionaries; else the checkpoint's own folder, if it holds them (a teacher shipped with
    its dictionaries beside it). A relative recorded directory (fairseq records ``data`` as typed, e.g.
    ``bin``) is taken relative to the checkpoint's folder, never to the current directory: there it
    could be the student's own data, and the teacher's dictionaries would be compared with themselves.
    Anything else is an error naming what was tried.
    """
    names = ", ".join(f"dict.{lang}.txt" for lang in langs)
    if teacher_data:
        if not _has_dicts(teacher_data, langs):
            raise TeacherError(f"--teacher-data {teacher_data} does not contain the teacher dictionaries {names}")
        return teacher_data, "--teacher-data"
    if task_cfg is None:
        task_cfg, _ = read_checkpoint_config(path)
    recorded = config_value(task_cfg, "data")
    folder = os.path.dirname(os.path.abspath(path))
    tried = []
    if recorded:
        first = utils.split_paths(recorded)[0]
        resolved = first if os.path.isabs(first) else os.path.join(folder, first)
        tried.append(f"the data directory recorded in the checkpoint ({recorded!r}"
                     + (")" if resolved == first else f", taken as {resolved}, beside the checkpoint)"))
        if _has_dicts(resolved, langs):
            return resolved, "the data directory recorded in the teacher checkpoint"
    tried.append(f"the checkpoint's folder ({folder})")
    if _has_dicts(folder, langs):
        return folder, "the teacher checkpoint's folder"
    raise TeacherError(
        f"cannot find the teacher's dictionaries ({names}) for {path}: {' and '.join(tried)} do not hold them. "
        "Pass --teacher-data DIR, the directory the teacher was trained with."
    )


def resolve_teacher_data(path: str, teacher_data: Optional[str], langs: Sequence[str]) -> str:
    """The directory that holds the teacher's own ``dict.{lang}.txt`` files (:func:`find_teacher_data`)."""
    return find_teacher_data(path, teacher_data, langs)[0]


def check_same_dictionary(role: str, task_dict: Dictionary, teacher_dict: Dictionary, where: str,
                          task_where: Optional[str] = None) -> None:
    """Fail unless the two dictionaries hold the same symbols in the same order. ``where``/``task_where``:
    the files compared, named in the message."""
    if task_dict.symbols == teacher_dict.symbols:
        return
    n_task, n_teacher = len(task_dict), len(teacher_dict)
    first = next(
        (i for i, (a, b) in enumerate(zip(task_dict.symbols, teacher_dict.symbols)) if a != b),
        min(n_task, n_teacher),
    )
    show = lambda d, i: repr(d.symbols[i]) if i < len(d) else "<end of dictionary>"  # noqa: E731
    raise TeacherError(
        f"{role} dictionary mismatch between the task ({n_task} symbols){' from ' + task_where if task_where else ''} "
        f"and the teacher ({n_teacher} symbols) from {where}: first difference at index {first}: task "
        f"{show(task_dict, first)}, teacher {show(teacher_dict, first)}. Binarize the student's data with the "
        "teacher's dictionaries (fairseq-preprocess --srcdict/--tgtdict)."
    )


def check_embedding_rows(path: str, model_state: dict, src_dict: Dictionary, tgt_dict: Dictionary,
                         where: str = "--teacher-data") -> None:
    """The teacher's embedding/output matrices must have one row per dictionary symbol. ``where``: where
    those dictionaries came from, named in the message."""
    checks = [
        ("encoder.embed_tokens.weight", "source", src_dict),
        ("decoder.embed_tokens.weight", "target", tgt_dict),
        ("decoder.output_projection.weight", "target", tgt_dict),
    ]
    for key, role, dictionary in checks:
        weight = model_state.get(key)
        if weight is not None and weight.size(0) != len(dictionary):
            raise TeacherError(
                f"teacher {path}: {key} has {weight.size(0)} rows but its {role} dictionary has "
                f"{len(dictionary)} symbols: the dictionaries in {where} are not the ones this teacher was "
                "trained with; pass --teacher-data DIR, the directory it was trained with"
            )


def check_teacher_paths(teacher_path: Optional[str]) -> List[str]:
    """The teacher files, each checked to exist."""
    paths = split_teacher_paths(teacher_path)
    for path in paths:
        if not os.path.isfile(path):
            raise TeacherError(f"--teacher-path: no such file: {path}")
    return paths


def check_teacher_files(teacher_path: Optional[str], teacher_data: Optional[str], source_lang: str,
                        target_lang: str, src_dict: Dictionary, tgt_dict: Dictionary,
                        data: Optional[str] = None) -> List[str]:
    """Every teacher file exists, its dictionaries equal the task's symbol by symbol, and its embedding
    matrices have one row per symbol, before any weights are read (they are memory-mapped); returns the
    directory of each one's dictionaries. The one check of the teacher's files, whoever loads it (the
    training task, ``imitkd-seqkd``, ``imitkd-teacher-cache``). ``data``: the task's data directory, named
    in the messages."""
    paths = check_teacher_paths(teacher_path)
    if not paths:
        raise TeacherError("this criterion distils from a teacher: pass --teacher-path CHECKPOINT")
    found = []
    for path in paths:
        state = read_fairseq_checkpoint(path, "teacher checkpoint", TeacherError)  # its weights stay on disk
        task_cfg, _ = _checkpoint_config(state)
        teacher_dir, how = find_teacher_data(path, teacher_data, (source_lang, target_lang), task_cfg)
        teacher_dicts = []
        for role, ours, lang in (("source", src_dict, source_lang), ("target", tgt_dict, target_lang)):
            name = f"dict.{lang}.txt"
            theirs = Dictionary.load(os.path.join(teacher_dir, name))
            check_same_dictionary(role, ours, theirs, f"{os.path.join(teacher_dir, name)} ({how})",
                                  os.path.join(utils.split_paths(data)[0], name) if data else None)
            teacher_dicts.append(theirs)
        model_state = state.get("model")
        if isinstance(model_state, dict):
            check_embedding_rows(path, model_state, *teacher_dicts, where=f"{teacher_dir} ({how})")
        logger.info("teacher %s: dictionaries %s/dict.{%s,%s}.txt (%s), equal to the task's", path, teacher_dir,
                    source_lang, target_lang, how)
        found.append(teacher_dir)
    return found


@dataclasses.dataclass
class RowKeys:
    """What a precomputed teacher looks a batch's rows up by: the split, each row's sample id, and whether the
    row's prefix is that sentence's own target (``gold``; a rolled-out prefix is in no file)."""

    split: str
    ids: Tensor
    gold: Tensor

    def __getitem__(self, rows: Optional[Tensor]) -> "RowKeys":
        return self if rows is None else RowKeys(self.split, self.ids[rows], self.gold[rows])


@dataclasses.dataclass
class TeacherScores:
    """The teacher's next-token distributions at N scored positions, in the form its teacher has them.

    ``lprobs`` is ``(N, V)``; or, with ``index`` ``(N, K)`` the teacher's K best tokens (most likely first),
    ``(N, K+1)``: their log-probs and one tail bucket with the rest of the mass, all a cache keeps. The
    divergences take both forms (``losses.kd_divergence``'s ``teacher_index``). ``lprobs`` may be None where
    only the teacher's action is known (``argmax`` given).
    """

    lprobs: Optional[Tensor]
    index: Optional[Tensor] = None
    actions: Optional[Tensor] = None

    @property
    def argmax(self) -> Tensor:
        """``(N,)`` the teacher's most likely token at each position."""
        if self.actions is None:
            self.actions = self.lprobs.argmax(-1) if self.index is None else self.index[:, 0]
        return self.actions

    @staticmethod
    def cat(parts: Sequence["TeacherScores"]) -> "TeacherScores":
        """Positions of several groups in one record (a batch-level loss such as ATKD)."""
        def joined(name):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)
        return TeacherScores(joined("lprobs"), joined("index"), torch.cat([p.argmax for p in parts]))


class TeacherBase(abc.ABC):
    """What the criterions and rollouts ask of a teacher; the one seam for every kind of teacher.

    A teacher scores positions (:meth:`scores`) and, for rollouts that let it act, decodes
    (:meth:`inference`). The fairseq models of :class:`Teacher` do both; a cache of its outputs
    (``teacher_cache.CachedTeacher``) answers the rows it holds by their :class:`RowKeys` and hands the rest
    to a live teacher. Criterions never ask which kind they hold.

    Never an ``nn.Module`` and never an attribute of the student or the criterion: a teacher must stay
    out of checkpoints, out of the optimizer, out of DDP, and out of ``--fp16``'s halving of the student.
    """

    @abc.abstractmethod
    def scores(self, src_tokens: Tensor, src_lengths: Tensor, prev_output_tokens: Tensor, mask: Tensor,
               keys: Optional[RowKeys] = None) -> TeacherScores:
        """The teacher-forced next-token distributions at the ``mask`` positions, in float32. ``keys``: what a
        precomputed teacher looks the rows up by; a live one ignores them."""

    @abc.abstractmethod
    def inference(self) -> ContextManager[List[torch.nn.Module]]:
        """A context giving fairseq models that decode incrementally, with the teacher's fast settings."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where the teacher computes."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """The precision it holds its weights (or outputs) in."""

    @abc.abstractmethod
    def to(self, device=None, dtype=None) -> "TeacherBase":
        """Move (or cast) the teacher; returns itself."""


class Teacher(TeacherBase):
    """A frozen fairseq teacher: one model or an ensemble averaged in probability space."""

    def __init__(self, models: List[torch.nn.Module]):
        self.models = models
        for m in models:
            m.requires_grad_(False)
            m.eval()

    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.models[0].parameters()).dtype

    def to(self, device=None, dtype=None) -> "Teacher":
        for m in self.models:
            m.to(device=device, dtype=dtype)
        return self

    @contextlib.contextmanager
    def inference(self):
        """The one way to decode with the teacher (rollouts with token mixing, Seq-KD corpora): no grad,
        and its weights flagged as requiring grad for the duration.

        Frozen weights put torch's CPU ``linear`` on a slow path for the decoder's non-contiguous
        per-step features (a broadcast bmm instead of one folded mm), which makes incremental decoding
        markedly slower (benchmarks/README.md). Under no_grad the flag costs nothing, and it is cleared
        again on exit, so the teacher never reaches an optimizer.
        """
        with torch.no_grad():
            for m in self.models:
                m.requires_grad_(True)
            try:
                yield self.models
            finally:
                for m in self.models:
                    m.requires_grad_(False)

    def scores(self, src_tokens, src_lengths, prev_output_tokens, mask, keys=None) -> TeacherScores:
        return TeacherScores(self.log_probs(src_tokens, src_lengths, prev_output_tokens, mask))

    @torch.no_grad()
    def log_probs(self, src_tokens: Tensor, src_lengths: Tensor, prev_output_tokens: Tensor, mask: Tensor) -> Tensor:
        """``(N, V)`` next-token log-probabilities at the ``mask`` positions, the ensemble averaged in
        probability space."""
        with outside_autocast(src_tokens.device):
            out = [
                scored_log_probs(m, src_tokens, src_lengths, prev_output_tokens, mask).float() for m in self.models
            ]
        if len(out) == 1:
            return out[0]
        return torch.logsumexp(torch.stack(out), dim=0) - math.log(len(out))


def translation_task(data: str, source_lang: Optional[str], target_lang: Optional[str]):
    """fairseq's translation task over ``data``, as the teacher's offline tools (imitkd-seqkd, the teacher
    cache) read a split; the fields fairseq fills from its global config when it builds the task itself
    are given their defaults."""
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    from .repairs.split_errors import explained_split_errors

    class CheckedTranslationTask(TranslationTask):
        def load_dataset(self, split, **kwargs):  # a missing or uneven split: one line, no traceback
            with explained_split_errors(self, split, "binarize it with fairseq-preprocess, or name others"):
                super().load_dataset(split, **kwargs)

    cfg = TranslationConfig(data=data, source_lang=source_lang, target_lang=target_lang, train_subset="train",
                            dataset_impl=None, required_seq_len_multiple=1)
    return CheckedTranslationTask.setup_task(cfg)


def load_teacher(
    teacher_path: str,
    teacher_data: Optional[str],
    source_lang: str,
    target_lang: str,
    src_dict: Dictionary,
    tgt_dict: Dictionary,
) -> Teacher:
    """Load, check and freeze the teacher(s) on CPU in float32; the caller moves it."""
    paths = split_teacher_paths(teacher_path)
    data_dirs = check_teacher_files(teacher_path, teacher_data, source_lang, target_lang, src_dict, tgt_dict)
    models = []
    for path, data in zip(paths, data_dirs):
        overrides = {"data": data, "source_lang": source_lang, "target_lang": target_lang}
        state = checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides=overrides)
        cfg = state["cfg"]
        if config_value(cfg.task, "_name") == "distillation":
            cfg.task.teacher_path = None  # a distilled student as teacher must not chain-load its own teacher
        if config_value(cfg.task, "eval_bleu"):
            cfg.task.eval_bleu = False  # the teacher needs no BLEU generator (nor its tokenizer)
        teacher_task = tasks.setup_task(cfg.task)  # its dictionaries: the files check_teacher_files compared
        check_embedding_rows(path, state["model"], teacher_task.source_dictionary, teacher_task.target_dictionary,
                             where=data)
        # Building a model draws random initial weights. The teacher is loaded lazily inside the first
        # train step, after fairseq seeded it, so it must not consume the global RNG: else the first
        # update after a resume would differ from the same update in an uninterrupted run.
        with torch.random.fork_rng(devices=[]):
            model = teacher_task.build_model(cfg.model, from_checkpoint=True)
        model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
        logger.info(
            "loaded teacher %s (%s, %d parameters, dictionaries from %s)",
            path, config_value(cfg.model, "arch"), sum(p.numel() for p in model.parameters()), data,
        )
        models.append(model)
    return Teacher(models)
