"""What ``imitkd-export`` writes beside a student's CTranslate2 weights, and whether this CPU's int8 saturates.

Shared by ``imitkd-export``, ``imitkd-seqkd --engine ctranslate2`` and ``imitkd-translate``. It imports
nothing but the standard library, and nothing from this package: ``imitkd-translate`` (a deployed student
needs neither torch nor fairseq) loads this one file by its path, without running the package's
``__init__``, which imports torch and fairseq to register the plugin. Keep it that way.
"""
from typing import Optional

SPM_NAME = "spm.model"  # what imitkd-export copies beside the weights
MANIFEST = "imitkd_export.json"  # what imitkd-export records beside the weights
CPU_INT8 = ("int8", "int8_float32")  # the CPU int8 types, the only ones a narrower weight range is for
#: what CTranslate2 computes on CPU for the int8 types with half-precision activations (none on CPU)
CPU_EQUIVALENT = {"int8_float16": "int8", "int8_bfloat16": "int8"}
# the BLEU lost: 8-bit int8 against float32 in benchmarks/results/ct2_speed_7bit.md (the Multi30k students
# without a vocabulary map); why, in benchmarks/README.md's session of 2026-12-03
SATURATION_HINT = ("this CPU has AVX2 but no VNNI, where CTranslate2's int8 products are summed in pairs into int16 "
                   "and can saturate with 8-bit weights (on Multi30k students: up to 1.8 BLEU lost); 7-bit weights "
                   "avoid it at the same speed")


def cpu_int8_saturates(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this x86 CPU multiplies int8 with AVX2's ``vpmaddubsw``, whose pair sums saturate at int16:
    the case when it lacks VNNI, which accumulates straight into int32. False where it cannot tell."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and not {"avx512_vnni", "avx_vnni"} & set(flags)


def int8_saturates_here(compute_type: Optional[str], weight_bits: Optional[int]) -> bool:
    """Whether a model computed in ``compute_type`` with ``weight_bits``-bit int8 weights risks saturated
    sums on this CPU: the case the three commands warn about."""
    return compute_type in CPU_INT8 and weight_bits == 8 and cpu_int8_saturates()
