"""Decode the test set with fairseq-generate and score it (called by evaluate.sh).

For every system (NAME=CHECKPOINT, the teacher included) and every beam, this runs fairseq-generate's own
``main`` with the arguments printed before each run (in one process: the ~6 s of importing fairseq is paid
once, not once per run). From each run it keeps:

- tokenized BLEU: fairseq's BLEU4 on the tokenized, lowercased words (``--remove-bpe sentencepiece``), the
  figure the ImitKD paper reports;
- sacreBLEU: the hypotheses sentencepiece-decoded (by ``--remove-bpe``), then Moses-detokenized (sacremoses),
  against the references in --refs, lowercased on both sides (the system writes lowercase), with its signature;
- speed: the sentences/s and tokens/s of fairseq-generate's own "Translated N sentences ..." line (decoding
  only: loading the model and the data is not timed).

Results are merged by system name into OUT/results.json and rewritten as OUT/results.tsv.
"""
import argparse
import json
import logging
import os
import sys
import time

from fairseq_generate_io import generate_args, parse_speed, read_hypotheses


class Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def count_parameters(path: str) -> int:
    """Parameters in a checkpoint's model state (tensors shared by several names counted once)."""
    import torch

    state = torch.load(path, map_location="cpu")["model"]  # safe loading: the plugin allow-lists what it needs
    seen, total = set(), 0
    for name, t in state.items():
        if not torch.is_tensor(t) or name.endswith(("_float_tensor", "version")):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


def generate_argv(args, path: str, beam: int, results_path: str):
    lengths = [] if args.max_len_a is None else ["--max-len-a", str(args.max_len_a)]
    lengths += [] if args.max_len_b is None else ["--max-len-b", str(args.max_len_b)]
    return generate_args(args.data, path, beam=beam, batch_size=args.batch_size, user_dir=args.user_dir,
                         remove_bpe="sentencepiece", results_path=results_path, cpu=args.cpu,
                         extra=["--task", "translation", "--source-lang", "de", "--target-lang", "en", "--seed", "1",
                                *lengths])


_BASE_CFG = {}


def generation_config(args, path: str, beam: int, results_path: str):
    """fairseq-generate's config for this command line.

    Parsing a command line into fairseq's config (hydra compose) costs seconds, so it is done once; the runs
    differ only in --path, --beam and --results-path, which are set on a copy.
    """
    import copy

    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    if "cfg" not in _BASE_CFG:
        parsed = options.parse_args_and_arch(options.get_generation_parser(),
                                             generate_argv(args, path, beam, results_path))
        _BASE_CFG["cfg"] = convert_namespace_to_omegaconf(parsed)
    cfg = copy.deepcopy(_BASE_CFG["cfg"])
    cfg.common_eval.path = path
    cfg.generation.beam = beam
    cfg.common_eval.results_path = results_path
    return cfg


def generate(args, name: str, path: str, beam: int, capture: Capture) -> dict:
    from fairseq_cli import generate as fairseq_generate

    results_path = os.path.join(args.out, "generate", name, f"beam{beam}")
    command = "fairseq-generate " + " ".join(generate_argv(args, path, beam, results_path))
    print(f"+ {command}", file=sys.stderr, flush=True)
    cfg = generation_config(args, path, beam, results_path)
    del capture.messages[:]
    scorer = fairseq_generate.main(cfg)
    found = [m for m in capture.messages if parse_speed(m)]
    if not found:
        raise SystemExit(f"evaluate.py: fairseq-generate printed no 'Translated ...' line for {name} beam {beam}")
    speed = parse_speed(found[-1])
    with open(os.path.join(results_path, "generate-test.txt"), encoding="utf-8") as f:
        hyps = read_hypotheses(f)
    return {"command": command, "translated_line": found[-1], "sentences": speed["sentences"],
            "tokens": speed["tokens"], "seconds": speed["seconds"], "sentences_per_second": speed["sents_per_sec"],
            "tokens_per_second": speed["tokens_per_sec"], "tokenized_bleu": round(scorer.score(), 2),
            "tokenized_bleu_line": scorer.result_string(), "hypotheses": hyps}


def sacrebleu_score(hyps, refs):
    from sacrebleu.metrics import BLEU
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang="en")
    sys_lines = [detok.detokenize(hyps[i].split()) for i in range(len(refs))]
    bleu = BLEU(lowercase=True)
    score = bleu.corpus_score(sys_lines, [refs])
    return sys_lines, round(score.score, 2), str(bleu.get_signature())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("systems", nargs="+", help="NAME=CHECKPOINT (a.pt:b.pt decodes an ensemble)")
    p.add_argument("--data", required=True)
    p.add_argument("--refs", required=True, help="test references for sacreBLEU, one per line")
    p.add_argument("--meta", default=None, help="prepare's meta.json (says what the references are)")
    p.add_argument("--out", required=True)
    p.add_argument("--user-dir", required=True)
    p.add_argument("--beams", default="1,5")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--max-len-a", type=float, default=None)
    p.add_argument("--max-len-b", type=int, default=None)
    args = p.parse_args(argv)
    beams = [int(b) for b in args.beams.split(",")]
    systems = []
    for item in args.systems:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"evaluate.py: expected NAME=CHECKPOINT, got {item!r}")
        systems.append((name, path))
    with open(args.refs, encoding="utf-8") as f:
        refs = [line.rstrip("\n") for line in f]
    meta = {}
    if args.meta and os.path.isfile(args.meta):
        with open(args.meta, encoding="utf-8") as f:
            meta = json.load(f)

    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stderr)  # first: fairseq-generate's own basicConfig is then a no-op
    capture = Capture()
    logging.getLogger("fairseq_cli.generate").addHandler(capture)
    import torch
    from fairseq import utils

    utils.import_user_module(argparse.Namespace(user_dir=args.user_dir))  # the plugin's checkpoint allow-list
    device = "cpu" if args.cpu or not torch.cuda.is_available() else f"cuda ({torch.cuda.get_device_name()})"
    threads = torch.get_num_threads()

    os.makedirs(args.out, exist_ok=True)
    results_file = os.path.join(args.out, "results.json")
    results = {"systems": {}}
    if os.path.isfile(results_file):
        with open(results_file, encoding="utf-8") as f:
            results = json.load(f)
    if device != "cpu":  # CUDA's one-time start-up would otherwise be timed in the first run
        print("warm-up run (not recorded)", file=sys.stderr, flush=True)
        generate(args, "_warmup", systems[0][1], beams[0], capture)
    for name, path in systems:
        entry = {"checkpoint": os.path.abspath(path) if ":" not in path else path,
                 "parameters": sum(count_parameters(x) for x in path.split(":")),
                 "device": device, "threads": threads if device == "cpu" else None,
                 "evaluated": time.strftime("%Y-%m-%d %H:%M:%S"), "beams": {}}
        for beam in beams:
            r = generate(args, name, path, beam, capture)
            hyps = r.pop("hypotheses")
            if len(hyps) != len(refs) or set(hyps) != set(range(len(refs))):
                raise SystemExit(f"evaluate.py: {name} beam {beam}: {len(hyps)} hypotheses for {len(refs)} references"
                                 " (fairseq-generate dropped or skipped sentences)")
            sys_lines, sb, sig = sacrebleu_score(hyps, refs)
            out_txt = os.path.join(args.out, "generate", name, f"beam{beam}", "hyp.detok.en")
            with open(out_txt, "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in sys_lines)
            r.update(sacrebleu=sb, sacrebleu_signature=sig, detokenized_output=out_txt)
            entry["beams"][str(beam)] = r
            print(f"{name} beam {beam}: tokenized BLEU {r['tokenized_bleu']}, sacreBLEU {sb}, "
                  f"{r['sentences_per_second']} sentences/s", file=sys.stderr, flush=True)
        results["systems"][name] = entry
    results["test_references"] = meta.get("test_references", args.refs)
    results["notes"] = ("tokenized_bleu: fairseq BLEU4 on tokenized lowercased words (as the ImitKD paper); "
                        "sacrebleu: detokenized output against test_references, lowercased; speed: fairseq-generate's "
                        "'Translated' line (decoding only), one run each")
    teacher = results["systems"].get("teacher")
    for name, entry in results["systems"].items():
        for beam, r in entry["beams"].items():
            t = teacher["beams"].get(beam) if teacher else None
            r["speedup_vs_teacher"] = (round(r["sentences_per_second"] / t["sentences_per_second"], 2)
                                       if t and t["sentences_per_second"] > 0 else None)
    with open(results_file + ".tmp", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    os.replace(results_file + ".tmp", results_file)
    write_tsv(results, os.path.join(args.out, "results.tsv"))
    with open(os.path.join(args.out, "results.tsv"), encoding="utf-8") as f:
        print(f.read(), end="")
    print(f"sacreBLEU signature: {next(iter(next(iter(results['systems'].values()))['beams'].values()))['sacrebleu_signature']}"
          f"; references: {results['test_references']}")
    print(f"wrote {results_file}")


def write_tsv(results, path: str) -> None:
    beams = sorted({int(b) for e in results["systems"].values() for b in e["beams"]})
    cols = ["system", "params"]
    for b in beams:
        cols += [f"bleu_tok_b{b}", f"sacrebleu_b{b}", f"sent_per_s_b{b}", f"speedup_b{b}"]
    rows = ["\t".join(cols)]
    for name, e in results["systems"].items():
        row = [name, str(e["parameters"])]
        for b in beams:
            r = e["beams"].get(str(b))
            row += ["" if r is None else str(r[k]) if r.get(k) is not None else "-"
                    for k in ("tokenized_bleu", "sacrebleu", "sentences_per_second", "speedup_vs_teacher")]
        rows.append("\t".join(row))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
