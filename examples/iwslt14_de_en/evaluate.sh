#!/usr/bin/env bash
# Step 4: BLEU (tokenized and sacreBLEU) and decoding speed on the test set -> $IMITKD_WORK/results/results.{json,tsv}
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat >&2 <<EOF
usage: $(basename "$0") [--no-teacher] SYSTEM [SYSTEM ...]

SYSTEM: a method trained by distill.sh (scratch, word_kd, ...: its checkpoints/METHOD/checkpoint_best.pt),
a checkpoint path, or NAME=CHECKPOINT. The teacher (TEACHER, default checkpoints/teacher/checkpoint_best.pt)
is evaluated too, as "teacher", unless --no-teacher.

Each system decodes the test set with fairseq-generate, greedy and beam 5 (--required-batch-size-multiple 1,
--batch-size 128), and gets: fairseq's tokenized BLEU4 (tokenized, lowercased words: the paper's figure),
sacreBLEU of the detokenized output (sentencepiece decode + sacremoses detokenizer, lowercased) against
text/test.raw.en, and fairseq-generate's sentences/s. Results: \$IMITKD_WORK/results/results.{json,tsv}
(merged by name across runs). Outputs go to IMITKD_WORK=$WORK
EOF
  exit 2
}

TEACHER_TOO=1
SYSTEMS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-teacher) TEACHER_TOO=0; shift ;;
    -h|--help) usage ;;
    -*) echo "$(basename "$0"): unknown option: $1" >&2; usage ;;
    *=*) SYSTEMS+=("$1"); shift ;;
    *)
      if [ -f "$1" ] || [[ "$1" == *:* ]]; then
        name="$(basename "$(dirname "$1")")"; SYSTEMS+=("$name=$1")
      elif [ -f "$CKPT/$1/checkpoint_best.pt" ]; then
        SYSTEMS+=("$1=$CKPT/$1/checkpoint_best.pt")
      else
        die "$1: neither a checkpoint file nor a trained method (no $CKPT/$1/checkpoint_best.pt)"
      fi
      shift ;;
  esac
done
[ ${#SYSTEMS[@]} -gt 0 ] || usage
need_cmd imitkd-user-dir
need_py sacremoses sacrebleu
need_data
[ -f "$TEXT/test.raw.$TGT" ] || die "no $TEXT/test.raw.$TGT: run prepare.sh first"
for s in "${SYSTEMS[@]}"; do
  IFS=: read -r -a parts <<< "${s#*=}"
  for p in "${parts[@]}"; do [ -f "$p" ] || die "checkpoint not found: $p"; done
done
if [ "$TEACHER_TOO" = 1 ]; then
  if [ -n "${TEACHER:-}" ]; then need_teacher; fi
  if [ -n "${TEACHER:-}" ] || [ -f "$(teacher_path)" ]; then
    SYSTEMS=("teacher=$(teacher_path)" "${SYSTEMS[@]}")
  else
    log "no teacher checkpoint ($(teacher_path)): evaluating the students only"
  fi
fi

OPTS=()
if [ "$SMOKE" = 1 ]; then OPTS=("${SMOKE_CPU[@]}" --max-len-a 0 --max-len-b 25); fi
run_logged "$LOGS/evaluate.log" python "$RECIPE/scripts/evaluate.py" --data "$DATA_BIN" --refs "$TEXT/test.raw.$TGT" \
  --meta "$TEXT/meta.json" --out "$RESULTS" --user-dir "$(user_dir)" --beams 1,5 --batch-size 128 "${OPTS[@]}" \
  "${SYSTEMS[@]}"
