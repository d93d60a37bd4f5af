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
  Kim & Rush went up to K=35 (``--beam 35 --nbest 35``): on CPU a beam seven times wider costs several
  times the decoding of a training set (no benchmark here measures it), while on a GPU the wider beam
  costs little for a small teacher and scoring 35 candidates per sentence with sacrebleu (on the CPU)
  becomes the main cost.
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
import logging
import sys

from ..errors import ImitKDError
from .build import build, status
from .checks import DEFAULT_MAX_TOKENS
from .decoding import SELECT_CHOICES, SMOOTH_CHOICES
from .engines import CT2_CPU_MAX_BATCH, ENGINES



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
    # the speed and the targets of the CTranslate2 engine and its sub-batches: benchmarks/README.md, "Seq-KD
    # corpora: fairseq against CTranslate2" and "Sub-batches for the CTranslate2 engine"
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
