"""Is the seq-KD corpus in DIR already built from these teacher files? Prints one word (used by distill.sh):

  cached  merged, and made from teachers with the same content (sha256) as TEACHER (a.pt[:b.pt])
  stale   a corpus of other teachers: rebuild it (imitkd-seqkd --overwrite)
  build   none yet, or an unfinished one (imitkd-seqkd resumes its finished shards)
"""
import hashlib
import json
import os
import sys


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} CORPUS_DIR TEACHER")
    corpus, teacher = sys.argv[1:]
    try:
        with open(os.path.join(corpus, "seqkd_manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        print("build")
        return
    theirs = [t.get("sha256") for t in manifest.get("settings", {}).get("teachers", [])]
    ours = [sha256(p) for p in teacher.split(":") if p]
    if theirs != ours:
        print("stale")
    elif manifest.get("merged") and os.path.isfile(os.path.join(corpus, "seqkd_stats.json")):
        print("cached")
    else:
        print("build")


if __name__ == "__main__":
    main()
