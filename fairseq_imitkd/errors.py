"""The errors this package raises for bad input: each message names the problem and how to fix it.

They are ``ValueError``s, so callers that catch those keep working. ``fairseq-train`` and
``fairseq-generate`` print them as one line without a traceback (``repairs.call_main.guarded_call_main``):
a traceback through fairseq's trainer would bury the one line that matters.
"""


class ImitKDError(ValueError):
    """Bad input to a distillation run: a file, an option, a corpus or a launch setting."""


class OptionError(ImitKDError):
    """An option outside its range, or options that do not go together; the message names the flag."""
