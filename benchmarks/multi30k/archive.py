"""The committed record of finished runs, which a later invocation (another session, a user's clone) adds to.

The work directory (checkpoints, corpora, decodes) stays on the machine that made it and is lost with it.
Each finished run's result, its test outputs (what the paired bootstrap reads), each decoding-speed
measurement and each invocation's wall time are copied under ``runs/<tier>/`` beside the results, so that
a tier run over several sessions reports every seed, not only those whose work directory survived.
Records in the work directory win over archived ones of the same run.
"""
import glob
import gzip
import json
import os
import re
import shutil
from typing import Dict, List, Optional, Tuple

# the decodes whose outputs are kept: the ones the paired bootstrap compares
KEPT_DECODES = ("test.beam1", "test.beam5", "test.beam1.nolimit")
RUN_FILE = re.compile(r"[a-z0-9_]+_s[0-9]+\.json")


def write_json(path: str, obj) -> None:
    """Written under a temporary name and renamed: a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Archive:
    """``runs/<tier>/``: ``<method>_s<seed>.json``, ``<method>_s<seed>.<decode>.hyp.gz``, ``speed/<name>.json``,
    ``invocations.json``, ``corpora_seconds.json`` and ``bootstrap.json``."""

    def __init__(self, out_dir: str, tier_name: str):
        self.dir = os.path.join(out_dir, "runs", tier_name)

    def _run_name(self, method: str, seed: int) -> str:
        return os.path.join(self.dir, f"{method}_s{seed}")

    def save_run(self, result: dict, run_dir: str) -> None:
        os.makedirs(self.dir, exist_ok=True)
        name = self._run_name(result["method"], result["seed"])
        for decode in KEPT_DECODES:
            src = os.path.join(run_dir, decode + ".hyp")
            if os.path.exists(src):
                tmp = f"{name}.{decode}.hyp.gz.tmp"
                with open(src, "rb") as fi, open(tmp, "wb") as raw, \
                        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fo:  # mtime 0: the same bytes on a rerun
                    shutil.copyfileobj(fi, fo)
                os.replace(tmp, f"{name}.{decode}.hyp.gz")
        write_json(name + ".json", result)

    def runs(self) -> Dict[Tuple[str, int], dict]:
        out = {}
        for path in glob.glob(os.path.join(self.dir, "*_s*.json")):
            if not RUN_FILE.fullmatch(os.path.basename(path)):
                continue
            r = read_json(path)
            out[(r["method"], int(r["seed"]))] = r
        return out

    def hypothesis(self, method: str, seed: int, decode: str, scratch_dir: str) -> Optional[str]:
        """The archived outputs of one decode as a plain file under ``scratch_dir`` (None if not kept)."""
        src = f"{self._run_name(method, seed)}.{decode}.hyp.gz"
        if not os.path.exists(src):
            return None
        os.makedirs(scratch_dir, exist_ok=True)
        dst = os.path.join(scratch_dir, f"{method}_s{seed}.{decode}.hyp")
        with gzip.open(src, "rb") as fi, open(dst, "wb") as fo:
            shutil.copyfileobj(fi, fo)
        return dst

    def save_speed(self, name: str, measured: dict) -> None:
        os.makedirs(os.path.join(self.dir, "speed"), exist_ok=True)
        write_json(os.path.join(self.dir, "speed", f"{name}.json"), measured)

    def speed(self) -> Dict[str, dict]:
        paths = glob.glob(os.path.join(self.dir, "speed", "*.json"))
        return {os.path.basename(p)[:-5]: read_json(p) for p in sorted(paths)}

    def save_bootstrap(self, rows: List[dict]) -> None:
        """Paired-bootstrap rows whose outputs were not kept (runs archived before outputs were)."""
        os.makedirs(self.dir, exist_ok=True)
        write_json(os.path.join(self.dir, "bootstrap.json"), rows)

    def bootstrap(self) -> List[dict]:
        path = os.path.join(self.dir, "bootstrap.json")
        return read_json(path) if os.path.exists(path) else []

    def save_corpus_seconds(self, name: str, seconds: float) -> None:
        got = self.corpus_seconds()
        got[name] = seconds
        os.makedirs(self.dir, exist_ok=True)
        write_json(os.path.join(self.dir, "corpora_seconds.json"), got)

    def corpus_seconds(self) -> Dict[str, float]:
        path = os.path.join(self.dir, "corpora_seconds.json")
        return read_json(path) if os.path.exists(path) else {}

    @property
    def ledger_path(self) -> str:
        return os.path.join(self.dir, "invocations.json")

    def ledger(self) -> List[dict]:
        return read_json(self.ledger_path) if os.path.exists(self.ledger_path) else []

    def add_invocation(self, invocation: dict) -> List[dict]:
        os.makedirs(self.dir, exist_ok=True)
        ledger = self.ledger() + [invocation]
        write_json(self.ledger_path, ledger)
        return ledger
