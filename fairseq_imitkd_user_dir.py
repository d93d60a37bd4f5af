"""``imitkd-user-dir``: print the folder to pass to fairseq's ``--user-dir``.

fairseq imports a user dir by its folder name, so the value must be the folder of the very copy of
``fairseq_imitkd`` that Python imports here (installed or editable), never a second copy.

This module lives outside the package on purpose: importing anything inside ``fairseq_imitkd`` runs its
``__init__``, which imports torch and fairseq (seconds) to register the plugin. Here ``find_spec``
locates the package without importing it, so ``$(imitkd-user-dir)`` in a shell is instant.
"""
import importlib.util
import os


def user_dir() -> str:
    spec = importlib.util.find_spec("fairseq_imitkd")
    if spec is None or spec.origin is None:
        raise SystemExit("imitkd-user-dir: the fairseq_imitkd package is not importable from this Python")
    return os.path.dirname(os.path.abspath(spec.origin))


def main() -> None:
    print(user_dir())


if __name__ == "__main__":
    main()
