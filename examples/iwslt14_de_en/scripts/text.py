"""Text side of the IWSLT14 De-En recipe (called by prepare.sh; needs no fairseq).

  raw DIR OUT     the original release (the extracted ``de-en/`` of de-en.tgz): clean, Moses-tokenize and
                  lowercase as fairseq's examples/translation/prepare-iwslt14.sh does, split train/valid/test
                  the same way, and keep the untokenized test references for sacreBLEU
  local DIR OUT   a copy already tokenized and lowercased (train.{de,en}, valid.{de,en}[, test.{de,en}])
  spm-train       train one joint sentencepiece model on the training text of both languages
  spm-encode      encode every split with it (pieces joined by spaces, as fairseq-preprocess reads them)

Every mode writes OUT/meta.json, which says where the test references come from.
"""
import argparse
import json
import os
import re
import sys

from fairseq_generate_io import read_lines, write_lines

SRC, TGT = "de", "en"
SPLITS = ("train", "valid", "test")
# prepare-iwslt14.sh's test set, in its order
TEST_SETS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011",
             "IWSLT14.TED.tst2012")
TRAIN_DROP = ("<url>", "<talkid>", "<keywords>")
TRAIN_STRIP = re.compile(r"</?(title|description)>")


def fail(msg: str) -> None:
    print(f"text.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


# --- Moses tokenization (sacremoses, the Python port of tokenizer.perl) -------------------------------------

_TOK = {}


def _tokenize(item):
    lang, line = item
    if lang not in _TOK:
        from sacremoses import MosesTokenizer

        _TOK[lang] = MosesTokenizer(lang=lang)
    # tokenizer.perl's defaults: XML escaping on, no aggressive hyphen splitting
    return _TOK[lang].tokenize(line, return_str=True, escape=True, aggressive_dash_splits=False)


def tokenize(lines, lang: str, workers: int):
    items = [(lang, line) for line in lines]
    if workers <= 1 or len(items) < 5000:
        return [_tokenize(x) for x in items]
    from multiprocessing import Pool

    with Pool(workers) as pool:
        return pool.map(_tokenize, items, chunksize=2000)


def clean_pairs(src, tgt, ratio=1.5, min_len=1, max_len=175):
    """clean-corpus-n.perl -ratio 1.5 ... 1 175: squeeze spaces, drop empty, too long or too unbalanced pairs."""
    out_s, out_t = [], []
    for s, t in zip(src, tgt):
        s = " ".join(s.replace("|", "").split())
        t = " ".join(t.replace("|", "").split())
        ns, nt = len(s.split()), len(t.split())
        if not (min_len <= ns <= max_len and min_len <= nt <= max_len):
            continue
        if ns / nt > ratio or nt / ns > ratio:
            continue
        out_s.append(s)
        out_t.append(t)
    return out_s, out_t


def xml_segments(path: str):
    """The <seg> lines of an IWSLT xml file, as prepare-iwslt14.sh's grep/sed extracts them."""
    segs = []
    for line in read_lines(path):
        if "<seg id" not in line:
            continue
        line = re.sub(r'<seg id="[0-9]*">\s*', "", line)
        line = re.sub(r"\s*</seg>\s*", "", line)
        segs.append(line.replace("\u2019", "'"))
    return segs


def cap(lines, n):
    return lines if n is None else lines[:n]


def cmd_raw(args) -> None:
    d = args.dir
    train_files = {lang: os.path.join(d, f"train.tags.{SRC}-{TGT}.{lang}") for lang in (SRC, TGT)}
    test_files = {lang: [os.path.join(d, f"{name}.{SRC}-{TGT}.{lang}.xml") for name in TEST_SETS] for lang in (SRC, TGT)}
    missing = [p for p in list(train_files.values()) + sum(test_files.values(), []) if not os.path.isfile(p)]
    if missing:
        fail(f"{d} is not the extracted IWSLT14 de-en release: missing {', '.join(missing)}")
    workers = max(1, args.workers)

    raw = {}
    for lang in (SRC, TGT):
        lines = [TRAIN_STRIP.sub("", line) for line in read_lines(train_files[lang])
                 if not any(tag in line for tag in TRAIN_DROP)]
        raw[lang] = lines
    if len(raw[SRC]) != len(raw[TGT]):
        fail(f"train.tags: {len(raw[SRC])} German lines but {len(raw[TGT])} English lines")
    tok = {lang: tokenize(raw[lang], lang, workers) for lang in (SRC, TGT)}
    src, tgt = clean_pairs(tok[SRC], tok[TGT])
    pairs = {SRC: [s.lower() for s in src], TGT: [t.lower() for t in tgt]}
    # every 23rd line (1-based) is valid, the rest train
    out = {"train": {}, "valid": {}, "test": {}}
    for lang in (SRC, TGT):
        out["valid"][lang] = [x for i, x in enumerate(pairs[lang], 1) if i % 23 == 0]
        out["train"][lang] = [x for i, x in enumerate(pairs[lang], 1) if i % 23 != 0]
    test_raw = {}
    for lang in (SRC, TGT):
        segs = sum((xml_segments(p) for p in test_files[lang]), [])
        test_raw[lang] = segs
        out["test"][lang] = [x.lower() for x in tokenize(segs, lang, workers)]
    if len(test_raw[SRC]) != len(test_raw[TGT]):
        fail(f"test xml: {len(test_raw[SRC])} German segments but {len(test_raw[TGT])} English ones")
    write_splits(args, out, cap(test_raw[TGT], args.max_test), {
        "source": os.path.abspath(d),
        "preprocessing": "prepare-iwslt14.sh's cleaning (tags, clean-corpus-n 1-175 words, ratio 1.5), Moses "
                         "tokenization by sacremoses, lowercasing; valid = every 23rd training pair",
        "test_references": "raw: the untokenized, cased IWSLT14 test segments (dev2010, TEDX.dev2012, tst2010-2012)",
    })


def cmd_local(args) -> None:
    d = args.dir
    out = {}
    for split in ("train", "valid"):
        for lang in (SRC, TGT):
            if not os.path.isfile(os.path.join(d, f"{split}.{lang}")):
                fail(f"{d} has no {split}.{lang}: --local needs a tokenized, lowercased copy with "
                     "train.{de,en} and valid.{de,en} (and optionally test.{de,en})")
        out[split] = {lang: read_lines(os.path.join(d, f"{split}.{lang}")) for lang in (SRC, TGT)}
    has_test = all(os.path.isfile(os.path.join(d, f"test.{lang}")) for lang in (SRC, TGT))
    if has_test:
        out["test"] = {lang: read_lines(os.path.join(d, f"test.{lang}")) for lang in (SRC, TGT)}
        split_note = "train, valid and test as given"
    else:
        # no test split: carve one out of valid (alternate lines), so that checkpoint selection never sees it
        valid = out["valid"]
        out["valid"] = {lang: valid[lang][0::2] for lang in (SRC, TGT)}
        out["test"] = {lang: valid[lang][1::2] for lang in (SRC, TGT)}
        split_note = "no test split in the copy: valid's even lines (1-based) became test, its odd lines valid"
    for split in out:
        if len(out[split][SRC]) != len(out[split][TGT]):
            fail(f"{split}: {len(out[split][SRC])} German lines but {len(out[split][TGT])} English lines")
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=TGT)
    refs = [detok.detokenize(line.split()) for line in cap(out["test"][TGT], args.max_test)]
    write_splits(args, out, refs, {
        "source": os.path.abspath(d),
        "preprocessing": "given tokenized and lowercased; " + split_note,
        "test_references": "detokenized: the copy holds only tokenized, lowercased references, so sacreBLEU's "
                           "references are their sacremoses detokenization (lowercased), not the raw text",
    })


def write_splits(args, out, test_refs, meta) -> None:
    os.makedirs(args.out, exist_ok=True)
    limits = {"train": args.max_train, "valid": args.max_valid, "test": args.max_test}
    counts = {}
    for split in SPLITS:
        for lang in (SRC, TGT):
            lines = cap(out[split][lang], limits[split])
            write_lines(os.path.join(args.out, f"{split}.{lang}"), lines)
        counts[split] = len(cap(out[split][SRC], limits[split]))
    write_lines(os.path.join(args.out, f"test.raw.{TGT}"), test_refs)
    meta.update(lines=counts, limits=limits)
    with open(os.path.join(args.out, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"text.py: wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " lines")


# --- sentencepiece ------------------------------------------------------------------------------------


def cmd_spm_train(args) -> None:
    import sentencepiece as spm

    for path in args.input:
        if not os.path.isfile(path):
            fail(f"not found: {path}")
    os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=",".join(args.input), model_prefix=args.model_prefix, vocab_size=args.vocab_size,
        model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
        input_sentence_size=args.input_sentence_size, shuffle_input_sentence=True,
        num_threads=args.threads, minloglevel=1,
        # fairseq's dictionary adds its own <s> <pad> </s> <unk>: no pieces for them besides sentencepiece's <unk>
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0,
    )
    print(f"text.py: trained {args.model_prefix}.model (vocab {args.vocab_size})")


def cmd_spm_encode(args) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=args.model)
    os.makedirs(args.out_dir, exist_ok=True)
    for split in SPLITS:
        for lang in (SRC, TGT):
            src = os.path.join(args.in_dir, f"{split}.{lang}")
            if not os.path.isfile(src):
                fail(f"not found: {src}")
            pieces = sp.encode(read_lines(src), out_type=str)
            write_lines(os.path.join(args.out_dir, f"{split}.{lang}"), (" ".join(p) for p in pieces))
    print(f"text.py: encoded {args.in_dir} with {args.model} into {args.out_dir}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("raw", cmd_raw), ("local", cmd_local)):
        s = sub.add_parser(name)
        s.add_argument("dir")
        s.add_argument("out")
        s.add_argument("--max-train", type=int, default=None)
        s.add_argument("--max-valid", type=int, default=None)
        s.add_argument("--max-test", type=int, default=None)
        s.add_argument("--workers", type=int, default=os.cpu_count() or 1)
        s.set_defaults(fn=fn)
    s = sub.add_parser("spm-train")
    s.add_argument("--input", nargs="+", required=True)
    s.add_argument("--model-prefix", required=True)
    s.add_argument("--vocab-size", type=int, required=True)
    s.add_argument("--input-sentence-size", type=int, default=2_000_000)
    s.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    s.set_defaults(fn=cmd_spm_train)
    s = sub.add_parser("spm-encode")
    s.add_argument("--model", required=True)
    s.add_argument("--in-dir", required=True)
    s.add_argument("--out-dir", required=True)
    s.set_defaults(fn=cmd_spm_encode)
    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
