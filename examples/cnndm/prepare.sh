#!/usr/bin/env bash
# Step 1: get CNN/DailyMail, train a joint sentencepiece model, encode and truncate, binarize.
#
#   prepare.sh               download cnn_dailymail 3.0.0 with HuggingFace `datasets` (needs internet)
#   prepare.sh --local DIR   read DIR/train.jsonl, DIR/val.jsonl (and DIR/test.jsonl if present; otherwise
#                            val doubles as test), JSON lines with "article" and "abstract"
#
# Writes $IMITKD_WORK/{text,spm,data-bin}. Sources are cut to 400 sentencepiece pieces, targets to 100
# (smoke: 200 / 100). Languages: article -> summary, one joined dictionary.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

LOCAL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --local) [ $# -ge 2 ] || die "--local needs a directory"; LOCAL="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
need_cmd fairseq-preprocess
need_py sentencepiece

mkdir -p "$WORK" "$LOGS"
get_args=("$TEXT" --max-train "$MAX_TRAIN" --max-test "$MAX_TEST")
if [ -n "$LOCAL" ]; then
  [ -d "$LOCAL" ] || die "no such directory: $LOCAL"
  get_args+=(--local "$LOCAL")
fi
log "text -> $TEXT"
run python "$RECIPE/scripts/text.py" get "${get_args[@]}"

log "sentencepiece (vocab $SPM_VOCAB) -> $SPM_DIR"
run python "$RECIPE/scripts/text.py" spm-train "$TEXT" "$SPM_DIR" --vocab "$SPM_VOCAB" --threads "${OMP_NUM_THREADS:-4}"
run python "$RECIPE/scripts/text.py" spm-encode "$TEXT" "$SPM_DIR" --max-src "$MAX_SRC" --max-tgt "$MAX_TGT"

log "binarize -> $DATA_BIN"
rm -rf "$DATA_BIN"
run fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --joined-dictionary \
  --trainpref "$SPM_DIR/train" --validpref "$SPM_DIR/valid" --testpref "$SPM_DIR/test" \
  --destdir "$DATA_BIN" --workers "${OMP_NUM_THREADS:-4}" > "$LOGS/preprocess.log" 2>&1 \
  || { tail -20 "$LOGS/preprocess.log" >&2; die "fairseq-preprocess failed (log: $LOGS/preprocess.log)"; }
log "done: $(wc -l < "$DATA_BIN/dict.$SRC.txt") dictionary entries"
