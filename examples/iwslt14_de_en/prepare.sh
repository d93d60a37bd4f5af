#!/usr/bin/env bash
# Step 1: IWSLT14 De-En text -> sentencepiece -> fairseq binary data in $IMITKD_WORK/data-bin.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

URL="${IWSLT14_URL:-http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz}"

usage() {
  cat >&2 <<EOF
usage: $(basename "$0") [--local DIR|FILE] [--spm MODEL [--srcdict DICT] [--tgtdict DICT]] [--vocab N] [--force]

Downloads IWSLT14 De-En ($URL), cleans, Moses-tokenizes (sacremoses) and lowercases it as fairseq's
prepare-iwslt14.sh does, trains a joint sentencepiece model and binarizes with fairseq-preprocess.

  --local DIR|FILE  read a local copy instead of downloading: de-en.tgz, its extracted de-en/ folder, or a
                    folder already tokenized and lowercased with train.{de,en} valid.{de,en} [test.{de,en}]
                    (without test.*, a test split is carved from valid)
  --spm MODEL       encode with this sentencepiece model instead of training one (a teacher's)
  --srcdict DICT    binarize with this dictionary (a teacher's dict.de.txt); needs --spm
  --tgtdict DICT    ... and this one for English (default: --srcdict, for a joined dictionary)
  --vocab N         sentencepiece vocabulary size (default 10000; 1000 with IMITKD_SMOKE=1)
  --force           redo every stage (the downloaded archive is kept)
Outputs go to IMITKD_WORK=$WORK
EOF
  exit 2
}

LOCAL="" SPM="" SRCDICT="" TGTDICT="" FORCE=0
VOCAB=10000; [ "$SMOKE" = 1 ] && VOCAB=1000
while [ $# -gt 0 ]; do
  case "$1" in
    --local) [ $# -ge 2 ] || usage; LOCAL="$2"; shift 2 ;;
    --spm) [ $# -ge 2 ] || usage; SPM="$2"; shift 2 ;;
    --srcdict) [ $# -ge 2 ] || usage; SRCDICT="$2"; shift 2 ;;
    --tgtdict) [ $# -ge 2 ] || usage; TGTDICT="$2"; shift 2 ;;
    --vocab) [ $# -ge 2 ] || usage; VOCAB="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage ;;
    *) echo "$(basename "$0"): unknown argument: $1" >&2; usage ;;
  esac
done
abs() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }
[ -z "$LOCAL" ] || [ -e "$LOCAL" ] || die "--local $LOCAL: no such file or folder"
[ -z "$LOCAL" ] || LOCAL="$(abs "$LOCAL")"
for f in "$SPM" "$SRCDICT" "$TGTDICT"; do [ -z "$f" ] || [ -f "$f" ] || die "not found: $f"; done
[ -z "$SPM" ] || SPM="$(abs "$SPM")"
[ -z "$SRCDICT" ] || SRCDICT="$(abs "$SRCDICT")"
[ -z "$TGTDICT" ] || TGTDICT="$(abs "$TGTDICT")"
if [ -n "$SRCDICT$TGTDICT" ] && [ -z "$SPM" ]; then
  die "--srcdict/--tgtdict need --spm: the teacher's dictionary only fits text cut by the teacher's sentencepiece model"
fi
[ -n "$SRCDICT" ] || [ -z "$TGTDICT" ] || SRCDICT="$TGTDICT"
[[ "$VOCAB" =~ ^[0-9]+$ ]] || die "--vocab must be a number, got $VOCAB"
need_cmd fairseq-preprocess
need_py sentencepiece sacremoses

# the options that decide the data: a rerun with others must not mix them
STAMP="local=$LOCAL spm=$SPM srcdict=$SRCDICT tgtdict=$TGTDICT vocab=$VOCAB smoke=$SMOKE"
mkdir -p "$WORK" "$LOGS"
if [ "$FORCE" = 1 ]; then
  rm -rf "$TEXT" "$SPM_DIR" "$DATA_BIN" "$SEQKD_DIR" "$WORK/prepare.done"  # seq-KD corpora derive from the data
  [ ! -d "$CKPT" ] || log "warning: $CKPT holds checkpoints trained on the previous data: delete them to retrain"
elif [ -f "$WORK/prepare.done" ]; then
  [ "$(cat "$WORK/prepare.done")" = "$STAMP" ] || die "$WORK was prepared with other options ($(cat "$WORK/prepare.done")): pass --force, or set another IMITKD_WORK"
  log "already prepared ($DATA_BIN): nothing to do (--force redoes it)"
  exit 0
fi

LIMITS=()
[ "$SMOKE" = 1 ] && LIMITS=(--max-train 1000 --max-valid 200 --max-test 200)

# 1. text: tokenized, lowercased train/valid/test + the test references for sacreBLEU
SRC_DIR=""
if [ -z "$LOCAL" ]; then
  mkdir -p "$WORK/orig"
  if [ ! -f "$WORK/orig/de-en.tgz" ]; then
    log "downloading $URL"
    fetch=(wget -O "$WORK/orig/de-en.tgz.part" "$URL")
    command -v curl >/dev/null && fetch=(curl -fL --retry 3 -o "$WORK/orig/de-en.tgz.part" "$URL")
    run "${fetch[@]}" || die "download of $URL failed. Fetch de-en.tgz another way and pass --local de-en.tgz (or set IWSLT14_URL to a mirror)"
    mv "$WORK/orig/de-en.tgz.part" "$WORK/orig/de-en.tgz"
  fi
  LOCAL="$WORK/orig/de-en.tgz"
fi
if [ -f "$LOCAL" ]; then
  mkdir -p "$WORK/orig"
  run tar -xzf "$LOCAL" -C "$WORK/orig"
  [ -d "$WORK/orig/de-en" ] || die "$LOCAL has no de-en/ folder: not the IWSLT14 de-en archive"
  SRC_DIR="$WORK/orig/de-en"
  MODE=raw
elif [ -f "$LOCAL/train.tags.de-en.de" ]; then
  SRC_DIR="$LOCAL"; MODE=raw
elif [ -f "$LOCAL/train.de" ]; then
  SRC_DIR="$LOCAL"; MODE=local
else
  die "--local $LOCAL: expected de-en.tgz, its extracted de-en/ folder (train.tags.de-en.*), or tokenized train.{de,en} + valid.{de,en}"
fi
run python "$RECIPE/scripts/text.py" "$MODE" "$SRC_DIR" "$TEXT" "${LIMITS[@]}"

# 2. sentencepiece: one joint model for German and English (shared embeddings need one vocabulary)
mkdir -p "$SPM_DIR"
if [ -n "$SPM" ]; then
  cp "$SPM" "$SPM_DIR/spm.model"
else
  run python "$RECIPE/scripts/text.py" spm-train --input "$TEXT/train.$SRC" "$TEXT/train.$TGT" \
    --model-prefix "$SPM_DIR/spm" --vocab-size "$VOCAB"
fi
run python "$RECIPE/scripts/text.py" spm-encode --model "$SPM_DIR/spm.model" --in-dir "$TEXT" --out-dir "$SPM_DIR"

# 3. binarize
DICT_ARGS=(--joined-dictionary)
if [ -n "$TGTDICT" ] && [ "$TGTDICT" != "$SRCDICT" ]; then DICT_ARGS=(--srcdict "$SRCDICT" --tgtdict "$TGTDICT")
elif [ -n "$SRCDICT" ]; then DICT_ARGS=(--joined-dictionary --srcdict "$SRCDICT"); fi
WORKERS=1; [ "$SMOKE" = 1 ] || WORKERS="$(nproc 2>/dev/null || echo 1)"
rm -rf "$DATA_BIN"
run_logged "$LOGS/prepare.log" fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" \
  --trainpref "$SPM_DIR/train" --validpref "$SPM_DIR/valid" --testpref "$SPM_DIR/test" \
  --destdir "$DATA_BIN" "${DICT_ARGS[@]}" --workers "$WORKERS"
echo "$STAMP" > "$WORK/prepare.done"
log "done: $DATA_BIN ($(wc -l < "$DATA_BIN/dict.$SRC.txt") dictionary entries)"
