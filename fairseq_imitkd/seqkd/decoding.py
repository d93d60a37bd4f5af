"""Decoding one shard of a split with the teacher, and choosing each sentence's target (Seq-KD, Seq-Inter)."""
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from fairseq import utils
from fairseq.data import BaseWrapperDataset, Dictionary, FairseqDataset
from fairseq.logging import progress_bar

from . import SeqKDError

SELECT_CHOICES = ("top", "sentence-bleu")
SMOOTH_CHOICES = ("exp", "floor", "add-k", "none")


def shard_range(num_sentences: int, num_shards: int, shard_id: int) -> Tuple[int, int]:
    """``[lo, hi)``: shard ``shard_id``'s contiguous slice of the split, sizes differing by at most one.

    Contiguous (not strided) so that the merge is a plain concatenation in the split's original order.
    """
    if not 0 <= shard_id < num_shards:
        raise SeqKDError(f"--shard-id {shard_id} is not in [0, {num_shards}) for --num-shards {num_shards}")
    return num_sentences * shard_id // num_shards, num_sentences * (shard_id + 1) // num_shards


class ShardView(BaseWrapperDataset):
    """The sentences ``[lo, hi)`` of a dataset, batched in the order fairseq would batch the whole split.

    Sample ids stay those of the full split. Filtering the base's own ``ordered_indices`` (not
    re-sorting the slice) means one shard covering the split gives exactly fairseq-generate's batches.
    """

    def __init__(self, dataset: FairseqDataset, lo: int, hi: int):
        super().__init__(dataset)
        self.lo, self.hi = lo, hi

    def ordered_indices(self):
        indices = self.dataset.ordered_indices()
        return indices[(indices >= self.lo) & (indices < self.hi)]


class SentenceBleu:
    """Smoothed sentence BLEU of a candidate against its reference (sacrebleu), for Seq-Inter selection.

    ``effective_order`` drops the n-gram orders longer than the sentence, so short sentences are not
    zeroed. With ``remove_bpe`` (fairseq's post-process names: ``sentencepiece``, ``subword_nmt``,
    ``@@ ``...) both sides are detokenized and then tokenized by sacrebleu (``13a`` by default); without
    it they are scored on the dictionary's tokens as they stand (``tokenize='none'``).
    """

    def __init__(self, tgt_dict: Dictionary, smooth_method: str = "exp", remove_bpe: Optional[str] = None,
                 tokenize: Optional[str] = None):
        from sacrebleu.metrics import BLEU

        if smooth_method not in SMOOTH_CHOICES:
            raise SeqKDError(f"unknown smoothing method {smooth_method!r}; choose from {', '.join(SMOOTH_CHOICES)}")
        self.tgt_dict = tgt_dict
        self.remove_bpe = None if remove_bpe in (None, "none") else remove_bpe
        self.tokenize = tokenize or ("13a" if self.remove_bpe else "none")
        self.smooth_method = smooth_method
        self.bleu = BLEU(effective_order=True, smooth_method=smooth_method, tokenize=self.tokenize)

    def text(self, tokens: torch.Tensor, reference: bool = False) -> str:
        # the reference's <unk> is escaped so that a candidate's <unk> never counts as a match
        return self.tgt_dict.string(tokens, bpe_symbol=self.remove_bpe, escape_unk=reference)

    def __call__(self, candidate: str, reference: str) -> float:
        return self.bleu.sentence_score(candidate, [reference]).score


def choose(candidates: Sequence[torch.Tensor], reference: Optional[torch.Tensor],
           scorer: Optional[SentenceBleu]) -> Tuple[int, Optional[List[float]]]:
    """The index of the candidate to keep (beam order, best first), and the candidates' BLEU if scored.

    Without a scorer: 0, the beam's best (Seq-KD). With one: the highest sentence BLEU, ties going to
    the better beam rank, so that equal scores fall back to plain Seq-KD.
    """
    if scorer is None:
        return 0, None
    ref = scorer.text(reference, reference=True)
    scores = [scorer(scorer.text(c), ref) for c in candidates]
    return max(range(len(scores)), key=scores.__getitem__), scores  # max() keeps the first of equals


def decode_shard(task, engine, dataset: FairseqDataset, lo: int, hi: int, *, nbest: int,
                 scorer: Optional[SentenceBleu], max_tokens: Optional[int], batch_size: Optional[int],
                 max_positions, use_cuda: bool, log_format: str = "tqdm", log_interval: int = 100,
                 name: str = "") -> Tuple[List[torch.Tensor], Dict[str, float]]:
    """Decode sentences ``[lo, hi)`` with ``engine`` (``engines.py``); return their targets in split order
    and stats.

    Each target is the chosen hypothesis's tokens with their final EOS, as fairseq-preprocess stores a
    line. ``required_batch_size_multiple=1``: fairseq's default of 8 can drop the last sentences here.
    """
    targets: Dict[int, torch.Tensor] = {}
    stats = {"sentences": 0, "seconds": 0.0, "source_tokens": 0, "target_tokens": 0,
             "bleu_chosen_sum": 0.0, "bleu_top_sum": 0.0, "changed": 0}
    if hi <= lo:
        return [], stats
    itr = task.get_batch_iterator(
        dataset=ShardView(dataset, lo, hi), max_tokens=max_tokens, max_sentences=batch_size,
        max_positions=max_positions, ignore_invalid_inputs=False, required_batch_size_multiple=1,
        seed=1,  # fairseq-generate's default seed: the same tie order among equal lengths, so the same batches
        num_workers=0, disable_iterator_cache=True,
    ).next_epoch_itr(shuffle=False)
    progress = progress_bar.progress_bar(itr, log_format=log_format, log_interval=log_interval, prefix=name)
    start = time.perf_counter()
    for sample in progress:
        if use_cuda:
            sample = utils.move_to_cuda(sample)
        hypos = engine.nbest(sample)
        for i, sample_id in enumerate(sample["id"].tolist()):
            candidates = hypos[i][:nbest]
            reference = dataset.tgt[sample_id] if scorer is not None else None
            best, scores = choose(candidates, reference, scorer)
            targets[sample_id] = candidates[best]
            stats["target_tokens"] += len(candidates[best]) - 1  # without the EOS
            stats["source_tokens"] += int(dataset.src_sizes[sample_id]) - 1
            if scores is not None:
                stats["bleu_chosen_sum"] += scores[best]
                stats["bleu_top_sum"] += scores[0]
                stats["changed"] += int(best != 0)
        progress.log({"sentences": len(targets)})
    stats["seconds"] = time.perf_counter() - start
    stats["sentences"] = len(targets)
    missing = [i for i in range(lo, hi) if i not in targets]
    if missing:  # would misalign every later line: never write a corpus with a hole
        raise SeqKDError(f"{len(missing)} sentences of [{lo}, {hi}) got no output (first: #{missing[0]})")
    return [targets[i] for i in range(lo, hi)], stats
