"""``imitkd-export``: a student checkpoint to a CTranslate2 model directory, for deployment.

A student exists to be fast, and fairseq's generator spends most of a small student's decoding time in
per-step Python. CTranslate2 ships a fairseq converter; this command calls it with what a student of
this plugin needs: the plugin as its user dir (the ``distillation`` task is rebuilt with no teacher
file around), torch's safe loading with fairseq's allow-list, the student's own dictionaries, and the
sentencepiece model copied beside the weights so that ``imitkd-translate`` reads raw text. It writes
into a temporary directory and renames it at the end, so a failure leaves nothing behind.
"""
import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import List, Optional, Tuple

import numpy as np

from .ct2_deploy import CPU_INT8, MANIFEST, SATURATION_HINT, SPM_NAME, int8_saturates_here
from .repairs.checkpoint_loading import config_value, read_fairseq_checkpoint
from .errors import ImitKDError

logger = logging.getLogger(__name__)

USER_DIR = os.path.dirname(os.path.abspath(__file__))
#: CTranslate2's weight types: float32 and int8 for CPUs, int8_float16 / float16 for GPUs
QUANTIZATIONS = ("float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16")


class ExportError(ImitKDError):
    """A checkpoint, dictionary or output directory that cannot give a CTranslate2 model."""


def _task_config(state: dict):
    cfg = state.get("cfg")
    return cfg["task"] if cfg is not None else state["args"]


def check_output_dir(out: str, force: bool) -> None:
    """An existing output directory is replaced only when it holds a CTranslate2 model and ``force`` is set."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ExportError(f"output {out} exists and is not a directory")
    entries = os.listdir(out)
    if not entries:
        return
    if "model.bin" not in entries:
        raise ExportError(f"output directory {out} is not empty and holds no CTranslate2 model: choose another")
    if not force:
        raise ExportError(f"output directory {out} holds another CTranslate2 model: pass --force to replace it")


def resolve_data(state: dict, checkpoint: str, data: Optional[str], source_lang: Optional[str] = None,
                 target_lang: Optional[str] = None) -> tuple:
    """``(data dir, source lang, target lang)``: the dictionaries the student was trained with; the languages
    given (``--source-lang``/``--target-lang``) win over the checkpoint's and over inferring them."""
    task = _task_config(state)
    src, tgt = source_lang or config_value(task, "source_lang"), target_lang or config_value(task, "target_lang")
    if data is None:
        recorded = config_value(task, "data")
        data = recorded.split(os.pathsep)[0] if recorded else None
        if not data:
            raise ExportError(f"{checkpoint} records no data directory: pass --data DIR with its dict.*.txt")
        if not os.path.isdir(data):
            raise ExportError(f"the data directory recorded in {checkpoint}, {data}, does not exist here: pass --data "
                              "DIR, the directory the student was binarized into (its dict.*.txt)")
    if src is None or tgt is None:  # fairseq infers the pair from the dictionary file names
        langs = sorted(n[5:-4] for n in os.listdir(data) if n.startswith("dict.") and n.endswith(".txt")) \
            if os.path.isdir(data) else []
        if len(langs) != 2:
            raise ExportError(f"cannot tell the language pair of {checkpoint} from {data} (dictionaries found: "
                              f"{langs}): pass --source-lang and --target-lang")
        src, tgt = src or langs[0], tgt or langs[1]
    missing = [f"dict.{lang}.txt" for lang in (src, tgt) if not os.path.isfile(os.path.join(data, f"dict.{lang}.txt"))]
    if missing:
        raise ExportError(f"the data directory {data} lacks {', '.join(missing)}: pass --data DIR, the directory "
                          "the student was binarized into")
    return data, src, tgt


def quantize_rows(weight: np.ndarray, bits: int) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row integer weights, CTranslate2's int8 scheme with ``2**(bits-1) - 1`` in place of 127:
    ``weight ≈ q / scale[:, None]``. With 7 bits, an activation shifted to uint8 times a weight, summed in
    pairs, stays within int16 (2·255·63 < 32768): AVX2 int8 kernels without VNNI (oneDNN's u8s8, which
    CTranslate2 uses on non-Intel CPUs) saturate there with 8-bit weights and change a small student's
    outputs."""
    qmax = 2 ** (bits - 1) - 1
    w = np.asarray(weight, dtype=np.float32)
    amax = np.abs(w).max(axis=1)
    amax[amax == 0] = qmax  # an all-zero row: any scale will do
    scale = (qmax / amax).astype(np.float32)
    q = np.clip(np.rint(w * scale[:, None]), -qmax, qmax).astype(np.int8)
    return q, scale


def quantize_spec(spec, bits: int) -> int:
    """Quantize every weight of a CTranslate2 model spec that CTranslate2 would quantize (those with a
    ``<name>_scale`` companion) with :func:`quantize_rows`; return how many."""
    from ctranslate2.specs import model_spec

    done = []

    def visit(layer, name, value):
        key = name.split("/")[-1]
        if not hasattr(layer, key + "_scale") or not isinstance(value, model_spec.Variable) or value.is_scalar():
            return
        q, scale = quantize_rows(value.to("float32").numpy(), bits)
        setattr(layer, key, model_spec.NumpyVariable(q))
        setattr(layer, key + "_scale", model_spec.NumpyVariable(scale))
        done.append(name)
    model_spec.visit_spec(spec, visit)
    return len(done)


def _converter(ctranslate2, int8_weight_bits: int):
    """CTranslate2's fairseq converter, or, for narrower int8 weights, one whose spec comes quantized
    (``_load`` is the hook CTranslate2's converters are written against)."""
    if int8_weight_bits == 8:
        return ctranslate2.converters.FairseqConverter

    class NarrowInt8FairseqConverter(ctranslate2.converters.FairseqConverter):
        def _load(self):
            spec = super()._load()
            if spec is None:
                return None
            spec.validate()  # wraps the raw arrays as CTranslate2 variables (convert validates again)
            if quantize_spec(spec, int8_weight_bits) == 0:
                raise ValueError("the model has no weight CTranslate2 quantizes")
            return spec
    return NarrowInt8FairseqConverter


def export(checkpoint: str, out: str, data: Optional[str] = None, quantization: str = "int8",
           spm: Optional[str] = None, source_lang: Optional[str] = None, target_lang: Optional[str] = None,
           force: bool = False, vmap: Optional[str] = None, int8_weight_bits: int = 8) -> str:
    """Convert ``checkpoint`` into the CTranslate2 model directory ``out``; return ``out``."""
    try:
        import ctranslate2
    except ImportError as e:
        raise ExportError("CTranslate2 is not installed: pip install ctranslate2 (or fairseq-imitkd[ct2])") from e
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"--quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if int8_weight_bits not in (7, 8):
        raise ExportError(f"--int8-weight-bits {int8_weight_bits} must be 8 (CTranslate2's own) or 7")
    if int8_weight_bits != 8 and quantization not in CPU_INT8:
        raise ExportError(f"--int8-weight-bits {int8_weight_bits} is for CPU int8 ({', '.join(CPU_INT8)}), "
                          f"not --quantization {quantization}")
    if spm is not None and not os.path.isfile(spm):
        raise ExportError(f"--spm {spm} does not exist")
    if vmap is not None and not os.path.isfile(vmap):
        raise ExportError(f"--vmap {vmap} does not exist")
    state = read_fairseq_checkpoint(checkpoint, "student checkpoint", ExportError)
    if not isinstance(state.get("model"), dict) or not state["model"]:
        raise ExportError(f"student checkpoint {checkpoint} holds no model weights")
    data, src, tgt = resolve_data(state, checkpoint, data, source_lang, target_lang)
    check_output_dir(out, force)

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".imitkd-export-", dir=parent)
    try:
        converter = _converter(ctranslate2, int8_weight_bits)(checkpoint, data, source_lang=src, target_lang=tgt,
                                                              user_dir=USER_DIR)
        try:
            # vmap: as vmap.txt; weights quantized already are left as they are (quantization None)
            converter.convert(tmp, vmap=vmap, quantization=quantization if int8_weight_bits == 8 else None,
                              force=True)
        except (ValueError, NotImplementedError, KeyError, AttributeError) as e:
            reason = " ".join(str(e).split())
            raise ExportError(f"CTranslate2's fairseq converter cannot convert {checkpoint}: {reason}") from e
        if spm is not None:
            shutil.copyfile(spm, os.path.join(tmp, SPM_NAME))
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"checkpoint": os.path.abspath(checkpoint), "data": os.path.abspath(data),
                       "source_lang": src, "target_lang": tgt, "quantization": quantization,
                       "int8_weight_bits": int8_weight_bits if quantization.startswith("int8") else None,
                       "spm": SPM_NAME if spm is not None else None, "vmap": os.path.abspath(vmap) if vmap else None,
                       "ctranslate2": ctranslate2.__version__}, f, indent=1)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="imitkd-export",
        description="Convert a student checkpoint trained with fairseq-imitkd into a CTranslate2 model directory.",
    )
    p.add_argument("checkpoint", help="the student's fairseq checkpoint (no teacher file is needed)")
    p.add_argument("-o", "--output-dir", required=True, help="the CTranslate2 model directory to write")
    p.add_argument("--data", help="the directory holding the student's dict.{src,tgt}.txt "
                   "(default: the data directory recorded in the checkpoint)")
    p.add_argument("--quantization", default="int8", choices=QUANTIZATIONS,
                   help="weight type: float32 or int8 on CPUs, int8_float16 on GPUs (default: int8)")
    p.add_argument("--int8-weight-bits", type=int, default=8, choices=(8, 7),
                   help="7 keeps CPU int8 weights within ±63, so that x86 CPUs without AVX-512 VNNI (AMD before "
                   "Zen 4), where CTranslate2's int8 kernels saturate with 8-bit weights, stay close to float32 (default: 8)")
    p.add_argument("--spm", help="a sentencepiece model to copy beside the weights, for imitkd-translate")
    p.add_argument("--vmap", help="a vocabulary map written by imitkd-vmap, for imitkd-translate --use-vmap")
    p.add_argument("--source-lang", help="default: the checkpoint's")
    p.add_argument("--target-lang", help="default: the checkpoint's")
    p.add_argument("--force", action="store_true", help="replace an output directory that holds a CTranslate2 model")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stderr)
    try:
        out = export(args.checkpoint, args.output_dir, data=args.data, quantization=args.quantization,
                     spm=args.spm, source_lang=args.source_lang, target_lang=args.target_lang, force=args.force,
                     vmap=args.vmap, int8_weight_bits=args.int8_weight_bits)
    except ImitKDError as e:
        raise SystemExit(f"imitkd-export: {e}") from None
    if int8_saturates_here(args.quantization, args.int8_weight_bits):
        logger.warning("%s: to deploy on a CPU like this one, export with --int8-weight-bits 7", SATURATION_HINT)
    bits = f", {args.int8_weight_bits}-bit weights" if args.quantization.startswith("int8") else ""
    logger.info("wrote %s (%s%s)", out, args.quantization, bits)


if __name__ == "__main__":
    main()
