"""Text side of the CNN/DailyMail recipe (called by prepare.sh; needs no fairseq).

  get OUT [--local DIR]   write OUT/{train,valid,test}.{article,summary} (one document per line, whitespace
                          squeezed) and OUT/meta.json. With --local: DIR/{train,val}.jsonl (+ DIR/test.jsonl if
                          present, else val doubles as test) with keys "article" and "abstract". Without:
                          download cnn_dailymail 3.0.0 with HuggingFace `datasets` (the highlights are the
                          summaries).
  spm-train TEXT SPM      train one joint sentencepiece model on the training articles and summaries
  spm-encode TEXT SPM     encode every split, truncating sources to --max-src and targets to --max-tgt pieces
"""
import argparse
import json
import os
import random
import sys

from fairseq_generate_io import read_lines, write_lines

SRC, TGT = "article", "summary"
SPLITS = ("train", "valid", "test")


def fail(msg: str) -> None:
    print(f"text.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def squeeze(text: str) -> str:
    return " ".join(str(text).split())


def read_jsonl(path: str):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                rows.append((squeeze(d["article"]), squeeze(d["abstract"])))
            except (ValueError, KeyError) as e:
                fail(f"{path}:{n}: not a JSON object with 'article' and 'abstract' ({e})")
    return rows


def cmd_get(a):
    if a.local:
        paths = {"train": os.path.join(a.local, "train.jsonl"), "valid": os.path.join(a.local, "val.jsonl")}
        for p in paths.values():
            if not os.path.isfile(p):
                fail(f"{p} not found (--local expects DIR/train.jsonl and DIR/val.jsonl)")
        test = os.path.join(a.local, "test.jsonl")
        paths["test"] = test if os.path.isfile(test) else paths["valid"]
        data = {s: read_jsonl(p) for s, p in paths.items()}
        source = {"local": os.path.abspath(a.local), "files": {s: os.path.abspath(p) for s, p in paths.items()},
                  "test_is_valid": paths["test"] == paths["valid"]}
    else:
        try:
            import datasets
        except ImportError:
            fail("downloading CNN/DailyMail needs the HuggingFace `datasets` package (pip install datasets), "
                 "or pass --local DIR")
        try:  # the dataset's current home on the Hub; older `datasets` know it as plain "cnn_dailymail"
            ds = datasets.load_dataset("abisee/cnn_dailymail", "3.0.0")
        except Exception:  # noqa: BLE001 - any failure: try the legacy name, which raises its own error
            ds = datasets.load_dataset("cnn_dailymail", "3.0.0")
        names = {"train": "train", "valid": "validation", "test": "test"}
        data = {s: [(squeeze(r["article"]), squeeze(r["highlights"])) for r in ds[names[s]]] for s in SPLITS}
        source = {"huggingface": "cnn_dailymail 3.0.0", "test_is_valid": False}
    # empty articles or summaries carry nothing to learn and break the binarizer's alignment
    data = {s: [(x, y) for x, y in rows if x and y] for s, rows in data.items()}
    if a.max_train:
        data["train"] = data["train"][: a.max_train]
    if a.max_test:
        data["valid"] = data["valid"][: a.max_test]
        data["test"] = data["test"][: a.max_test]
    os.makedirs(a.out, exist_ok=True)
    for s, rows in data.items():
        write_lines(os.path.join(a.out, f"{s}.{SRC}"), [x for x, _ in rows])
        write_lines(os.path.join(a.out, f"{s}.{TGT}"), [y for _, y in rows])
    meta = dict(source, sizes={s: len(rows) for s, rows in data.items()},
                references="test.summary: the full, untruncated summaries (ROUGE is scored against these)")
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta["sizes"]))


def cmd_spm_train(a):
    import sentencepiece as spm

    # pieces of at most 64 words: sentencepiece skips "sentences" over max_sentence_length bytes, which most
    # whole articles are
    # (streamed and subsampled, so the full corpus never sits in memory at once: ~400 bytes per chunk)
    paths = [os.path.join(a.text, f"train.{lang}") for lang in (SRC, TGT)]
    keep = min(1.0, a.max_lines / max(1.0, sum(os.path.getsize(p) for p in paths) / 400))
    rng = random.Random(1)
    chunks = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                w = line.split()
                chunks.extend(" ".join(w[i: i + 64]) for i in range(0, len(w), 64) if rng.random() < keep)
    rng.shuffle(chunks)
    chunks = chunks[: a.max_lines]
    os.makedirs(a.spm, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks), model_prefix=os.path.join(a.spm, "spm"), vocab_size=a.vocab,
        model_type="unigram", character_coverage=0.9999, num_threads=a.threads, hard_vocab_limit=False,
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2)


def cmd_spm_encode(a):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(a.spm, "spm.model"))
    stats = {}
    for split in SPLITS:
        for lang, cap in ((SRC, a.max_src), (TGT, a.max_tgt)):
            lines = read_lines(os.path.join(a.text, f"{split}.{lang}"))
            pieces = sp.encode(lines, out_type=str)
            stats[f"{split}.{lang}"] = {"lines": len(lines), "truncated": sum(len(p) > cap for p in pieces),
                                        "mean_pieces": round(sum(len(p) for p in pieces) / max(1, len(pieces)), 1)}
            write_lines(os.path.join(a.spm, f"{split}.{lang}"), (" ".join(p[:cap]) for p in pieces))
    with open(os.path.join(a.spm, "encode_stats.json"), "w") as f:
        json.dump(dict(max_src=a.max_src, max_tgt=a.max_tgt, splits=stats), f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("get")
    g.add_argument("out")
    g.add_argument("--local", default=None)
    g.add_argument("--max-train", type=int, default=0, help="keep the first N training pairs (0: all)")
    g.add_argument("--max-test", type=int, default=0, help="keep the first N valid/test pairs (0: all)")
    t = sub.add_parser("spm-train")
    t.add_argument("text")
    t.add_argument("spm")
    t.add_argument("--vocab", type=int, default=32000)
    t.add_argument("--max-lines", type=int, default=3_000_000, help="64-word chunks sampled for training")
    t.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("spm-encode")
    e.add_argument("text")
    e.add_argument("spm")
    e.add_argument("--max-src", type=int, default=400)
    e.add_argument("--max-tgt", type=int, default=100)
    a = p.parse_args()
    {"get": cmd_get, "spm-train": cmd_spm_train, "spm-encode": cmd_spm_encode}[a.cmd](a)


if __name__ == "__main__":
    main()
