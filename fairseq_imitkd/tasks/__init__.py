from . import distillation  # noqa: F401
