"""Our command-line flags: how one is declared in a fairseq dataclass, and how its range is checked.

fairseq builds ``--help`` and argparse from dataclass fields with a ``help`` metadata entry; :func:`flag`
is that field in one call, so a config reads as a list of flags. :func:`check_range` is the one message
for a value outside its range, naming the flag.
"""
from dataclasses import field

from .errors import OptionError


def flag(default, help: str):
    """A dataclass field that fairseq turns into a flag with this default and ``--help`` text."""
    return field(default=default, metadata={"help": help})


def check_range(name: str, value: float, low: float, high: float, low_open=False, high_open=False) -> None:
    """Raise an OptionError naming the flag when ``value`` is outside its range (NaN is outside every range)."""
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above or value != value:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise OptionError(f"--{name} must be in {lo}{low}, {high}{hi}, got {value}")
