from . import students  # noqa: F401
