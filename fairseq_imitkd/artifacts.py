"""What the offline artifacts (``imitkd-seqkd``'s corpus, ``imitkd-teacher-cache``'s cache) share.

Both are directories built once, by chunks or shards, and resumed by a rerun: each records in a manifest
what it was made from, refuses (in one line naming every difference) to resume from other settings, marks
each finished chunk or shard last, after its data, and writes every record under a temporary name then
renames it, so that a reader or a resumed run never sees half a file. What each one writes besides (fairseq's
indexed datasets, numpy arrays) stays with it.
"""
import json
import os
import shutil
from typing import Callable, List, Optional

#: the line ``differences`` writes for one differing key: ``{key}``, ``{want!r}`` (this run's), ``{have!r}``
#: (the recorded one)
LINE = "{key}: {want!r} here, {have!r} there"
_ABSENT = object()


def tmp_path(path: str) -> str:
    """Where ``path`` is written before it is renamed into place (per process, so two writers never mix)."""
    return f"{path}.tmp{os.getpid()}"


def write_atomic(path: str, fill: Callable[[str], None]) -> None:
    """``fill(tmp)`` writes the file at a temporary name, then it is renamed to ``path``: a reader sees the whole
    old file or the whole new one. A failed ``fill`` leaves ``path`` as it was and no temporary file."""
    tmp = tmp_path(path)
    try:
        fill(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    def fill(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    write_atomic(path, fill)


def copy_file(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` atomically."""
    write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def read_json(path: str, error, hint: str) -> Optional[dict]:
    """A JSON record, None when absent; an unreadable one raises ``error`` naming the file and ``hint``."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise error(f"{path} is not valid JSON ({e}): {hint}") from e


def differences(want: dict, have: dict, line: str = LINE, prefix: str = "") -> List[str]:
    """One ``line`` per key whose value differs between this run's ``want`` and the recorded ``have``, in key
    order, nested records key by key (``dictionaries.tgt: ...``). An absent key reads as None, yet differs
    from a recorded None."""
    out = []
    for key in sorted(set(want) | set(have)):
        a, b = want.get(key, _ABSENT), have.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, line, f"{prefix}{key}.")
        elif a is _ABSENT or b is _ABSENT or a != b:
            out.append(line.format(key=f"{prefix}{key}", want=None if a is _ABSENT else a,
                                   have=None if b is _ABSENT else b))
    return out


def require_same(want: dict, have: dict, error, message: str, line: str = LINE) -> None:
    """Raise ``error(message)`` when the settings differ, ``{differences}`` in ``message`` replaced by them all,
    ``'; '``-separated, so the one line says every reason a rerun cannot resume."""
    diff = differences(want, have, line)
    if diff:
        raise error(message.format(differences="; ".join(diff)))


def resume(path: str, settings: dict, recorded: Callable[[dict], dict], overwrite: bool, error, hint: str,
           refusal: str, line: str = LINE) -> Optional[dict]:
    """The manifest at ``path`` when a rerun with ``settings`` resumes it; None to start anew (none there, or
    ``overwrite``). ``recorded(manifest)`` gives the settings it records; when they differ and ``overwrite`` is
    not set, ``error(refusal)`` (see ``require_same``). An unreadable manifest is an error either way."""
    manifest = read_json(path, error, hint)
    if manifest is None or overwrite:
        return None
    require_same(settings, recorded(manifest), error, refusal, line)
    return manifest


def pending(count: int, done: Callable[[int], bool]) -> List[int]:
    """The chunks or shards ``0..count-1`` without their completion marker: what a rerun still computes."""
    return [i for i in range(count) if not done(i)]
