"""``imitkd-translate``: translate a text file with a student exported by ``imitkd-export`` (CTranslate2).

Raw text in, raw text out when the export holds a sentencepiece model (or ``--spm`` names one);
space-separated pieces in and out otherwise. CTranslate2's ``translate_file`` does the reading, batching
by length, decoding and writing; this command only hands it sentencepiece as its tokenizer. It lives
outside the package, as ``imitkd-user-dir`` does: a deployed student needs neither torch nor fairseq.
"""
import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
from typing import List, Optional

logger = logging.getLogger("imitkd-translate")


def _load_torch_free(name: str):
    """``fairseq_imitkd/<name>.py``, loaded by its path: importing it as ``fairseq_imitkd.<name>`` would run the
    package's ``__init__``, which imports torch and fairseq. ``find_spec`` locates the package (the very copy
    Python would import, installed or editable) without importing it, as ``imitkd-user-dir`` does."""
    package = importlib.util.find_spec("fairseq_imitkd")
    if package is None or not package.submodule_search_locations:
        raise ImportError("imitkd-translate: the fairseq_imitkd package is not importable from this Python")
    path = os.path.join(list(package.submodule_search_locations)[0], f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_fairseq_imitkd_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: the export's layout and the int8 check, shared with imitkd-export and imitkd-seqkd
ct2_deploy = _load_torch_free("ct2_deploy")
SPM_NAME, MANIFEST, CPU_EQUIVALENT, SATURATION_HINT = (ct2_deploy.SPM_NAME, ct2_deploy.MANIFEST,
                                                       ct2_deploy.CPU_EQUIVALENT, ct2_deploy.SATURATION_HINT)


def _warn_if_int8_saturates(args: argparse.Namespace) -> None:
    manifest = os.path.join(args.model, MANIFEST)
    if args.device != "cpu" or not os.path.isfile(manifest):
        return
    with open(manifest) as f:
        exported = json.load(f)
    compute = exported.get("quantization") if args.compute_type == "default" else args.compute_type
    # CTranslate2 has no float16 on CPU: a GPU export (int8_float16, int8_bfloat16) runs there as int8
    compute = CPU_EQUIVALENT.get(compute, compute)
    if ct2_deploy.int8_saturates_here(compute, exported.get("int8_weight_bits")):
        logger.warning("%s: re-export with imitkd-export --int8-weight-bits 7", SATURATION_HINT)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="imitkd-translate",
                                description="Translate a text file with a CTranslate2 model written by imitkd-export.")
    p.add_argument("model", help="the directory imitkd-export wrote")
    p.add_argument("-i", "--input", required=True, help="source text, one sentence per line")
    p.add_argument("-o", "--output", required=True, help="where the translations go, one per line")
    p.add_argument("--spm", help=f"sentencepiece model (default: MODEL/{SPM_NAME} if present, else the input is "
                   "already split into pieces)")
    p.add_argument("--beam", type=int, default=1, help="beam size (1: greedy; default 1)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default 64)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of one translation (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--compute-type", default="default",
                   help="CTranslate2 compute type (default: the type the model was exported with)")
    p.add_argument("--max-len", type=int, default=200,
                   help="most target pieces per sentence (default 200, fairseq-generate's own limit)")
    p.add_argument("--read-batch-size", type=int, default=0,
                   help="sentences read, then sorted by length and cut into batches, at a time (default 0: "
                        "CTranslate2's, 16 batches; --batch-size: no sorting beyond one batch)")
    p.add_argument("--use-vmap", action="store_true",
                   help="restrict the output vocabulary with the model's vmap.txt (see CTranslate2)")
    p.add_argument("--stats", help="write the timing (sentences, target tokens, seconds) to this JSON file")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> Optional[str]:
    """The sentencepiece model to use; SystemExit with one line for anything unusable."""
    if not os.path.isfile(os.path.join(args.model, "model.bin")):
        raise SystemExit(f"imitkd-translate: {args.model} is not a CTranslate2 model directory (no model.bin): "
                         "export the student with imitkd-export")
    if not os.path.isfile(args.input):
        raise SystemExit(f"imitkd-translate: input {args.input} does not exist")
    check_output(args.input, args.output)
    if args.stats and not os.path.isdir(os.path.dirname(os.path.abspath(args.stats))):
        raise SystemExit(f"imitkd-translate: the directory of --stats {args.stats} does not exist: create it first")
    if args.read_batch_size < 0:
        raise SystemExit(f"imitkd-translate: --read-batch-size must be >= 0, got {args.read_batch_size}")
    for name in ("beam", "batch_size", "threads", "max_len"):
        if getattr(args, name) < 1:
            raise SystemExit(f"imitkd-translate: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.use_vmap and not os.path.isfile(os.path.join(args.model, "vmap.txt")):
        raise SystemExit(f"imitkd-translate: --use-vmap but {args.model} has no vmap.txt")
    spm = args.spm or (os.path.join(args.model, SPM_NAME) if os.path.isfile(os.path.join(args.model, SPM_NAME))
                       else None)
    if spm is not None and not os.path.isfile(spm):
        raise SystemExit(f"imitkd-translate: --spm {spm} does not exist")
    return spm


def check_output(source: str, output: str) -> None:
    """SystemExit with one line for an output that cannot be written, or that is the input itself (under
    another name, a symbolic or a hard link): translating a file into itself would empty it first."""
    if os.path.isdir(output):
        raise SystemExit(f"imitkd-translate: output {output} is a directory: name a file")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise SystemExit(f"imitkd-translate: the directory of output {output} does not exist ({parent}): "
                         "create it first")
    if os.path.exists(output) and os.path.samefile(source, output):
        raise SystemExit(f"imitkd-translate: output {output} is the input file {source}: translating it in place "
                         "would destroy it; name another output")


def translate(args: argparse.Namespace) -> dict:
    import ctranslate2

    spm_path = check_args(args)
    tokenize = detokenize = None
    if spm_path is not None:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=spm_path)
        tokenize = lambda line: sp.encode(line, out_type=str)  # noqa: E731
        detokenize = sp.decode  # noqa: E731
    _warn_if_int8_saturates(args)
    try:
        translator = ctranslate2.Translator(args.model, device=args.device, compute_type=args.compute_type,
                                            inter_threads=1, intra_threads=args.threads)
    except (ValueError, RuntimeError) as e:  # an unknown device or compute type, a type this CPU lacks
        reason = " ".join(str(e).split())
        raise SystemExit(f"imitkd-translate: cannot load {args.model} on {args.device} with --compute-type "
                         f"{args.compute_type}: {reason}") from None
    output = os.path.realpath(args.output)  # through a link, its target is replaced
    if os.path.exists(output) and not os.path.isfile(output):  # /dev/stdout, a pipe: written as it goes
        return _report(args, _translate_file(translator, args, output, tokenize, detokenize))
    # written beside the output, then renamed over it: an interrupted or failed run leaves whatever the
    # output path held before, never a half-written file in its place
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=os.path.dirname(output))
    os.close(fd)
    try:
        stats = _translate_file(translator, args, tmp, tokenize, detokenize)
        if os.path.exists(output):
            os.chmod(tmp, os.stat(output).st_mode & 0o7777)
        else:  # as open() would have created it (mkstemp's file is private)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return _report(args, stats)


def _translate_file(translator, args: argparse.Namespace, output: str, tokenize, detokenize):
    return translator.translate_file(
        args.input, output, max_batch_size=args.batch_size, beam_size=args.beam,
        max_decoding_length=args.max_len, use_vmap=args.use_vmap, read_batch_size=args.read_batch_size,
        source_tokenize_fn=tokenize, target_detokenize_fn=detokenize,
    )


def _report(args: argparse.Namespace, stats) -> dict:
    seconds = stats.total_time_in_ms / 1000
    return {"sentences": stats.num_examples, "target_tokens": stats.num_tokens, "seconds": round(seconds, 4),
            "sentences_per_second": round(stats.num_examples / max(seconds, 1e-9), 1),
            "beam": args.beam, "batch_size": args.batch_size, "threads": args.threads, "device": args.device}


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stderr)
    result = translate(args)
    logger.info("%d sentences, %d target tokens in %.2f s (%.1f sentences/s)", result["sentences"],
                result["target_tokens"], result["seconds"], result["sentences_per_second"])
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
