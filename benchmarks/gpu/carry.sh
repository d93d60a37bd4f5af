#!/usr/bin/env bash
# Prepare what the device check (device_check.sh) needs on a GPU machine that has torch but no registry:
# the Python packages torch's image lacks, unpacked, and the shared Multi30k teacher and data, all in
# .devcarry/ at the repository root (git-ignored; under the device tool's 64 MiB).
#   bash benchmarks/gpu/carry.sh [--python-version 3.12] [--shared ../shared]
# Needs pip with access to PyPI here. The packages are the device image's Python's (3.12 by default).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PYV=3.12
SHARED="$REPO/../shared"
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYV="$2"; shift 2 ;;
    --shared) SHARED="$2"; shift 2 ;;
    *) echo "carry.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
CARRY="$REPO/.devcarry"
grep -qx '/.devcarry/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/.devcarry/' >> "$REPO/.git/info/exclude"
rm -rf "$CARRY" && mkdir -p "$CARRY"
WHEELS="$(mktemp -d)" SITE="$(mktemp -d)"
trap 'rm -rf "$WHEELS" "$SITE"' EXIT

# fairseq (the ve-fairseq build) and what it needs beyond the image; CTranslate2; sacremoses for the IWSLT14 recipe.
# Pinned to what pip resolves for README's install: without resolution (--no-deps), omegaconf 2.4 would come,
# which hydra 1.3 excludes and which refuses fairseq's --adam-betas '(0.9, 0.98)' string.
PKGS=(ve-fairseq==0.12.3 hydra-core==1.3.8 omegaconf==2.3.1 bitarray==3.12.3 ctranslate2==4.8.5 sacremoses==0.2.0)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${PKGS[@]}"
python3 -m pip wheel -q --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3  # an sdist only on PyPI
(cd "$SITE" && for w in "$WHEELS"/*.whl; do python3 -m zipfile -e "$w" .; done
 rm -f fairseq/examples/hubert/tests/*.npy  # test arrays of a speech example, 5.5 MB
 tar cf - . | xz -T0 -6 > "$CARRY/site.tar.xz")

# the shared teacher, its weights in float16 to fit (device_check.sh casts them back to float32), and the data
python3 - "$SHARED/teachers/multi30k_de_en" "$CARRY/teacher" <<'PY'
import argparse, os, shutil, sys
import torch
src, dst = sys.argv[1:]
os.makedirs(dst)
torch.serialization.add_safe_globals([argparse.Namespace])
state = torch.load(os.path.join(src, "checkpoint.pt"), map_location="cpu", weights_only=False)
halves = {}  # shared embeddings are one tensor under three names: keep them one
state["model"] = {k: halves.setdefault(v.data_ptr(), v.half()) if v.is_floating_point() else v
                  for k, v in state["model"].items()}
torch.save(state, os.path.join(dst, "checkpoint_fp16.pt"))
for name in ("dict.de.txt", "dict.en.txt", "spm.model", "README.md"):
    shutil.copy(os.path.join(src, name), dst)
PY
tar cf - -C "$SHARED/data" README.md multi30k iwslt14_sample | xz -T0 -6 > "$CARRY/data.tar.xz"
du -sh "$CARRY"/*
