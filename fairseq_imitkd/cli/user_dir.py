"""``imitkd-user-dir``: print the folder to pass to fairseq's ``--user-dir``.

fairseq imports a user dir by its folder name, so the value must be the folder of the very copy of
``fairseq_imitkd`` that Python imports here (installed or editable), never a second copy.
"""
import os


def user_dir() -> str:
    # Resolve the package location without importing it (and fairseq): this runs inside $(...) in shells.
    import importlib.util

    spec = importlib.util.find_spec("fairseq_imitkd")
    return os.path.dirname(os.path.abspath(spec.origin))


def main() -> None:
    print(user_dir())


if __name__ == "__main__":
    main()
