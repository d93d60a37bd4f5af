"""The two ways ``imitkd-seqkd`` can beam-decode a split: fairseq's SequenceGenerator, or CTranslate2.

Both take a fairseq batch (so batching, sorting by length and sample ids are fairseq's own in either
case) and return each sentence's n-best hypotheses as target-dictionary ids ending in EOS, the form
fairseq-preprocess stores a line in. Selection, shards and merging do not know which engine decoded.

CTranslate2 exists here for speed: a teacher beam-decoding a training set is the dominant cost of
Seq-KD on a CPU, and fairseq's per-step Python is most of that cost for a small teacher. Its output is
not bit-equal to fairseq's (int8 weights by default, its own beam bookkeeping), so the corpus records
the engine and its compute type, and a rerun never mixes shards of the two.
"""
import argparse
import logging
import os
import tempfile
from typing import List, Optional

import torch
from fairseq.dataclass.configs import GenerationConfig

from ..ct2_deploy import SATURATION_HINT, int8_saturates_here
from . import SeqKDError

logger = logging.getLogger(__name__)

ENGINES = ("fairseq", "ctranslate2")
#: CPU default: int8 weights, the fastest; GPUs get int8 weights with float16 activations
DEFAULT_COMPUTE_TYPE = {"cpu": "int8", "cuda": "int8_float16"}
#: CPU default of --ct2-max-batch-size without a vocabulary map: CTranslate2 decodes a fairseq batch as
#: sub-batches of this many sentences (faster in one exploration, within the noise at the engine level:
#: benchmarks/README.md, "Sub-batches for the CTranslate2 engine")
CT2_CPU_MAX_BATCH = 32


def resolve_max_batch_size(max_batch_size: Optional[int], use_cuda: bool, vmap: Optional[str]) -> int:
    """Sentences CTranslate2 decodes at a time (0: the whole fairseq batch). A vocabulary map applies to a
    whole CTranslate2 batch, so sub-batches change a vmap corpus's targets: with a map, and on a GPU,
    the default is the whole batch."""
    if max_batch_size is not None:
        return max_batch_size
    return 0 if use_cuda or vmap is not None else CT2_CPU_MAX_BATCH


class FairseqEngine:
    """fairseq's SequenceGenerator over the (frozen) teacher, set up as fairseq-generate sets it up."""

    def __init__(self, task, teacher, gen_cfg: GenerationConfig, use_cuda: bool):
        self.task, self.teacher, self.use_cuda = task, teacher, use_cuda
        self.models = teacher.models
        for model in self.models:
            # as fairseq-generate (beamable encoder attention, no attention weights kept); the model can no
            # longer train, which this process never asks of it
            model.prepare_for_inference_(argparse.Namespace(generation=gen_cfg))
        self.generator = task.build_generator(self.models, gen_cfg)

    def device_name(self) -> str:
        if self.use_cuda:
            return f"cuda ({torch.cuda.get_device_name()})"
        return f"cpu ({torch.get_num_threads()} threads)"

    def nbest(self, sample) -> List[List[torch.Tensor]]:
        with self.teacher.inference():  # the frozen teacher's fast path (Teacher.inference)
            hypos = self.task.inference_step(self.generator, self.models, sample)
        return [[h["tokens"].int().cpu() for h in sentence] for sentence in hypos]

    def close(self) -> None:
        pass


class CTranslate2Engine:
    """The teacher converted once to CTranslate2 (into a temporary directory) and decoded there.

    The length limit follows fairseq's rule, ``max_len_a * padded source length + max_len_b`` per batch,
    and ``length_penalty`` is fairseq's ``lenpen`` (both divide the log-probability by length^lenpen).
    A vocabulary map (``vmap``, from imitkd-vmap) limits each batch's output layer to the pieces its
    sources bring in, which is most of a step's cost for a shallow teacher on CPU.
    """

    def __init__(self, teacher_path: str, data: str, source_lang: str, target_lang: str, src_dict, tgt_dict,
                 gen_cfg: GenerationConfig, use_cuda: bool, compute_type: str, vmap: Optional[str] = None,
                 int8_weight_bits: int = 8, max_batch_size: int = 0):
        from ..export import export

        try:
            import ctranslate2
        except ImportError as e:
            raise SeqKDError("--engine ctranslate2 needs CTranslate2: pip install ctranslate2 "
                             "(or fairseq-imitkd[ct2])") from e
        self.device = "cuda" if use_cuda else "cpu"
        self.compute_type, self.use_vmap, self.bits = compute_type, vmap is not None, int8_weight_bits
        self.max_batch_size = max_batch_size
        self.src_dict, self.tgt_dict, self.cfg = src_dict, tgt_dict, gen_cfg
        self.threads = torch.get_num_threads()
        self._tmp = tempfile.TemporaryDirectory(prefix="imitkd-seqkd-ct2-")
        model_dir = os.path.join(self._tmp.name, "teacher")
        export(teacher_path, model_dir, data=data, quantization=compute_type, source_lang=source_lang,
               target_lang=target_lang, vmap=vmap, int8_weight_bits=int8_weight_bits)
        # the GPU torch uses (CUDA_VISIBLE_DEVICES, torch.cuda.set_device), not CTranslate2's default GPU 0
        self.device_index = torch.cuda.current_device() if use_cuda else 0
        self.translator = ctranslate2.Translator(model_dir, device=self.device, device_index=self.device_index,
                                                 compute_type=compute_type, inter_threads=1,
                                                 intra_threads=self.threads)
        logger.info("teacher converted to CTranslate2 (%s, %s)", compute_type, self.device_name())
        if not use_cuda and int8_saturates_here(compute_type, int8_weight_bits):
            logger.warning("%s: pass --ct2-int8-weight-bits 7", SATURATION_HINT)

    def device_name(self) -> str:
        vmap = ", vmap" if self.use_vmap else ""
        bits = f", {self.bits}-bit weights" if self.bits != 8 else ""
        sub = f", sub-batches of {self.max_batch_size}" if self.max_batch_size else ""
        device = f"cuda:{self.device_index}" if self.device == "cuda" else self.device
        return f"{device} (ctranslate2 {self.compute_type}{bits}{vmap}{sub}, {self.threads} threads)"

    def nbest(self, sample) -> List[List[torch.Tensor]]:
        src = sample["net_input"]["src_tokens"]
        pad, eos = self.src_dict.pad(), self.src_dict.eos()
        # the converted model appends the source EOS itself (add_source_eos)
        batch = [[self.src_dict[t] for t in row.tolist() if t != pad and t != eos] for row in src]
        max_len = int(self.cfg.max_len_a * src.size(1) + self.cfg.max_len_b)
        results = self.translator.translate_batch(
            batch, beam_size=self.cfg.beam, num_hypotheses=self.cfg.nbest, length_penalty=self.cfg.lenpen,
            max_decoding_length=max_len, use_vmap=self.use_vmap, return_scores=False,
            max_batch_size=self.max_batch_size)
        out = []
        for result in results:
            out.append([torch.tensor([self.tgt_dict.index(p) for p in hyp] + [self.tgt_dict.eos()], dtype=torch.int32)
                        for hyp in result.hypotheses])
        return out

    def close(self) -> None:
        del self.translator
        self._tmp.cleanup()


def resolve_compute_type(compute_type: str, use_cuda: bool) -> str:
    """The CTranslate2 compute type a run uses ('default': int8 on CPU, int8_float16 on a GPU)."""
    return DEFAULT_COMPUTE_TYPE["cuda" if use_cuda else "cpu"] if compute_type == "default" else compute_type
