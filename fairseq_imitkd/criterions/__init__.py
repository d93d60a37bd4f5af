from . import imitkd, word_kd  # noqa: F401
