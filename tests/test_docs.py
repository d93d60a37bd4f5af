"""docs/ is the reference: it must name every option the plugin adds to fairseq-train.

``fairseq-train --help`` exits at its first parsing stage, before the task's and the criterion's options
are added, so it never lists them. The test builds fairseq-train's parser as fairseq does for a run with
``--task distillation`` and each criterion, and reads the help text of that parser instead.
"""
import re
from pathlib import Path

import pytest

from conftest import USER_DIR

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PLUGIN_OPTION = re.compile(r"--(?:teacher|kd|imitkd)-[a-z0-9-]+")


def plugin_options(criterion: str) -> set:
    """The --teacher-/--kd-/--imitkd- options of fairseq-train's full help for ``criterion``."""
    from fairseq import options

    parser = options.get_training_parser()
    options.parse_args_and_arch(parser, ["data-bin", "--user-dir", USER_DIR, "--task", "distillation",
                                         "--criterion", criterion, "--arch", "transformer_student_tiny"])
    return set(PLUGIN_OPTION.findall(parser.format_help()))


def docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.rglob("*.md")))


@pytest.mark.parametrize("criterion", ["word_kd", "imitkd"])
def test_docs_name_every_plugin_option(criterion):
    found = plugin_options(criterion)
    assert "--teacher-path" in found and len(found) > 3, found  # the help was read, with the task's options
    named = set(PLUGIN_OPTION.findall(docs_text()))
    assert not found - named, f"options missing from docs/: {sorted(found - named)}"


def test_docs_name_no_option_that_does_not_exist():
    """A renamed or removed option must leave the docs too."""
    found = plugin_options("word_kd") | plugin_options("imitkd")
    # the commands' own options that share the prefixes (imitkd-seqkd, imitkd-teacher-cache)
    from fairseq_imitkd.seqkd.cli import get_parser as seqkd_parser
    from fairseq_imitkd.teacher_cache import get_parser as cache_parser

    for parser in (seqkd_parser(), cache_parser()):
        found |= set(PLUGIN_OPTION.findall(parser.format_help()))
    stale = set(PLUGIN_OPTION.findall(docs_text())) - found
    assert not stale, f"docs/ names options that do not exist: {sorted(stale)}"
