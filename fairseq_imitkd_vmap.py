"""``imitkd-vmap``: a CTranslate2 vocabulary map from a parallel corpus, for ``imitkd-export --vmap``.

A small student's decoding step is mostly its output projection: at d=128 and 7.8k target pieces it
costs several times the one decoder layer. CTranslate2 can restrict that projection, per batch, to the
target pieces the batch's source pieces make plausible (``use_vmap``). This command writes the map
those candidates come from: for every source piece, the target pieces that most often appear in the
same training pair (by the share of its pairs they appear in), plus the most frequent target pieces,
which every batch keeps. A piece the map leaves out cannot be produced, so ``--per-source`` and
``--common`` trade speed against BLEU; measure both (``benchmarks/ct2_speed.py`` does).

Torch-free, like ``imitkd-translate``: it reads text (sentencepiece pieces, or raw text with ``--spm``).
"""
import argparse
import collections
import logging
import sys
from typing import Dict, Iterable, List, Optional

logger = logging.getLogger("imitkd-vmap")


def build_vmap(sources: Iterable[List[str]], targets: Iterable[List[str]], per_source: int = 20,
               common: int = 100, min_share: float = 0.0) -> Dict[str, List[str]]:
    """``{source piece: candidate target pieces}``; the key ``""`` holds the always-kept common pieces.

    A source piece's candidates are the ``per_source`` target pieces with the largest share of its
    sentence pairs (ties by piece, for a deterministic map), among those above ``min_share`` and not
    already common. Each piece counts once per sentence.
    """
    if per_source < 0 or common < 0:
        raise ValueError("per_source and common must be >= 0")
    pairs: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    source_df: collections.Counter = collections.Counter()
    target_df: collections.Counter = collections.Counter()
    for n, (src, tgt) in enumerate(zip(sources, targets), 1):
        src_set, tgt_set = set(src), set(tgt)
        source_df.update(src_set)
        target_df.update(tgt_set)
        for s in src_set:
            pairs[s].update(tgt_set)
    always = sorted(target_df, key=lambda t: (-target_df[t], t))[:common]
    kept = set(always)
    vmap = {"": always}
    for s in sorted(pairs):
        ranked = sorted(((c / source_df[s], t) for t, c in pairs[s].items() if t not in kept and
                         c / source_df[s] > min_share), key=lambda x: (-x[0], x[1]))
        vmap[s] = [t for _, t in ranked[:per_source]]
    return vmap


def write_vmap(vmap: Dict[str, List[str]], path: str) -> None:
    """CTranslate2's text format: ``source<TAB>candidate candidate ...``, one source piece a line."""
    with open(path, "w", encoding="utf-8") as f:
        for s, candidates in vmap.items():
            f.write(f"{s}\t{' '.join(candidates)}\n")


def _pieces(path: str, sp) -> Iterable[List[str]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield sp.encode(line.rstrip("\n"), out_type=str) if sp is not None else line.split()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="imitkd-vmap", description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help="training source side, one sentence a line")
    p.add_argument("--target", required=True, help="training target side, line for line with --source")
    p.add_argument("--spm", help="sentencepiece model for raw text (default: the files hold pieces already)")
    p.add_argument("-o", "--output", required=True, help="the vmap file to write")
    p.add_argument("--per-source", type=int, default=20, help="candidates per source piece (default 20)")
    p.add_argument("--common", type=int, default=100, help="most frequent target pieces always kept (default 100)")
    p.add_argument("--min-share", type=float, default=0.0,
                   help="keep a candidate only above this share of the source piece's pairs (default 0)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stderr)
    for name in ("source", "target"):
        try:
            open(getattr(args, name)).close()
        except OSError as e:
            raise SystemExit(f"imitkd-vmap: --{name} {getattr(args, name)}: {e.strerror}") from None
    if args.per_source < 0 or args.common < 0 or not 0 <= args.min_share < 1:
        raise SystemExit("imitkd-vmap: --per-source and --common must be >= 0 and --min-share in [0, 1)")
    with open(args.source, encoding="utf-8") as a, open(args.target, encoding="utf-8") as b:
        if sum(1 for _ in a) != sum(1 for _ in b):
            raise SystemExit(f"imitkd-vmap: {args.source} and {args.target} have different line counts")
    sp = None
    if args.spm:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=args.spm)
    vmap = build_vmap(_pieces(args.source, sp), _pieces(args.target, sp), args.per_source, args.common,
                      args.min_share)
    write_vmap(vmap, args.output)
    sizes = [len(v) for k, v in vmap.items() if k]
    logger.info("wrote %s: %d source pieces, %d common target pieces, %.1f candidates per source piece",
                args.output, len(sizes), len(vmap[""]), sum(sizes) / max(len(sizes), 1))


if __name__ == "__main__":
    main()
