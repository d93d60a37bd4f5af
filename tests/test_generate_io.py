"""Driving fairseq-generate and reading its log (hypotheses by id, its speed line), without torch."""
import subprocess
import sys

from fairseq_generate_io import generate_args, parse_speed, read_hypotheses


def test_hypotheses_by_id_including_an_empty_one():
    log = ["S-1\tein Hund\n", "H-1\t-0.5\t▁a ▁dog\n", "D-1\t-0.5\ta dog\n", "P-1\t-0.1 -0.2\n",
           "D-0\t-0.7\tA man runs .\n", "D-2\t-9.0\n"]
    assert read_hypotheses(log) == {0: "A man runs .", 1: "a dog", 2: ""}
    assert read_hypotheses(log, prefix="H-") == {1: "▁a ▁dog"}


def test_speed_line_with_thousands_separators_and_an_infinite_rate():
    line = ("2026-11-22 18:06:56 | INFO | fairseq_cli.generate | Translated 1,000 sentences (14,562 tokens) "
            "in 35.3s (28.29 sentences/s, 411.98 tokens/s)")
    assert parse_speed(line) == dict(sentences=1000, tokens=14562, seconds=35.3, sents_per_sec=28.29,
                                     tokens_per_sec=411.98)
    fast = parse_speed("Translated 3 sentences (9 tokens) in 0.0s (inf sentences/s, inf tokens/s)")
    assert fast["sents_per_sec"] == float("inf") and fast["sentences"] == 3
    assert parse_speed("Generate test with beam=5: BLEU4 = 39.5") is None


def test_generate_args_keep_every_line_and_the_users_length_limit_unless_told():
    argv = generate_args("bin", "ck.pt", split="valid", beam=5, batch_size=8, extra=["--seed", "1"], cpu=True)
    assert argv[0] == "bin" and argv[argv.index("--gen-subset") + 1] == "valid"
    assert argv[argv.index("--required-batch-size-multiple") + 1] == "1" and argv[argv.index("--nbest") + 1] == "1"
    assert "--max-len-a" not in argv and argv[-3:] == ["--seed", "1", "--cpu"]
    capped = generate_args("bin", "ck.pt", max_len=(1.2, 10), remove_bpe="sentencepiece")
    assert capped[capped.index("--max-len-a") + 1] == "1.2" and capped[capped.index("--max-len-b") + 1] == "10"


def test_the_module_imports_neither_torch_nor_fairseq():
    code = "import sys, fairseq_generate_io; print(any(m in sys.modules for m in ('torch', 'fairseq')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
