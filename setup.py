"""fairseq-imitkd: knowledge distillation (word-level, sequence-level, ImitKD) as a fairseq plugin."""
from setuptools import find_packages, setup

setup(
    name="fairseq-imitkd",
    version="0.1.0",
    description="Distil autoregressive seq2seq teachers into small students inside fairseq "
    "(word-level KD, sequence-level KD, ImitKD).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fairseq_imitkd", "fairseq_imitkd.*"]),
    # modules outside the package, so that they need not import torch/fairseq: two console scripts,
    # and what the recipes and benchmarks use to drive and read fairseq-generate
    py_modules=["fairseq_imitkd_user_dir", "fairseq_generate_io", "fairseq_imitkd_translate", "fairseq_imitkd_vmap"],
    install_requires=[
        # ve-fairseq is a build of fairseq main with wheels for Python 3.11/3.12 (see docs/compatibility.md:
        # the official fairseq 0.12.2 neither installs with pip>=24.1 nor imports on Python>=3.11).
        "ve-fairseq==0.12.3",
        # A range, not a pin: an installed torch (CPU or CUDA) that satisfies it is kept as is.
        "torch>=2.1",
        "sacrebleu>=2.0",
        "sentencepiece>=0.1.99",
        "numpy>=1.21",
    ],
    extras_require={
        "test": ["pytest>=7", "ctranslate2>=4", "rouge-score>=0.1.2", "sacremoses>=0.1"],
        "ct2": ["ctranslate2>=4"],
        # examples/cnndm: ROUGE, and the corpus download on a user's machine
        "cnndm": ["rouge-score>=0.1.2", "datasets"],
        # examples/iwslt14_de_en: Moses tokenization of the downloaded corpus and detokenized sacreBLEU
        "iwslt": ["sacremoses>=0.1"],
        # benchmarks/multi30k: the BLEU-against-speed plot
        "bench": ["matplotlib>=3.5"],
    },
    entry_points={
        "console_scripts": [
            "imitkd-user-dir=fairseq_imitkd_user_dir:main",
            "imitkd-seqkd=fairseq_imitkd.seqkd.cli:main",
            "imitkd-export=fairseq_imitkd.export:main",
            "imitkd-teacher-cache=fairseq_imitkd.teacher_cache:main",
            "imitkd-translate=fairseq_imitkd_translate:main",
            "imitkd-vmap=fairseq_imitkd_vmap:main",
        ],
    },
)
