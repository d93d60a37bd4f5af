#!/usr/bin/env bash
# Step 4: decode the test split (fairseq-generate, beam 1 and 4, at most 99 tokens) and score ROUGE-1/2/L F1.
#
#   evaluate.sh CKPT [CKPT ...]     each CKPT may be NAME=path.pt; NAME defaults to the checkpoint's folder
#
# All checkpoints are decoded in one Python process (fairseq's start-up is paid once). Hypotheses are
# sentencepiece-decoded and scored with `rouge-score` (use_stemmer=True) against the untruncated references.
# Writes $IMITKD_WORK/results/results.{json,tsv} (merged across calls) and results/NAME/beamK/hyp.txt.
# BEAMS (default "1,4") and GEN_ARGS (extra fairseq-generate flags, e.g. "--no-repeat-ngram-size 3") adjust it.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
[ $# -ge 1 ] || die "usage: evaluate.sh CKPT [CKPT ...]"
need_cmd imitkd-user-dir
need_py sentencepiece rouge_score
need_data
[ -f "$TEXT/test.$TGT" ] || die "no references $TEXT/test.$TGT: run prepare.sh first"
mkdir -p "$RESULTS" "$LOGS"
run python "$RECIPE/scripts/evaluate.py" "$@" --data "$DATA_BIN" --spm-model "$SPM_DIR/spm.model" \
  --refs "$TEXT/test.$TGT" --results "$RESULTS" --user-dir "$(imitkd-user-dir)" \
  --source-lang "$SRC" --target-lang "$TGT" --beams "${BEAMS:-1,4}" --max-len-b "$GEN_LEN" \
  --gen-args "${GEN_ARGS:-}" "${DEVICE_ARGS[@]}" 2> "$LOGS/evaluate.log" \
  || { tail -30 "$LOGS/evaluate.log" >&2; die "evaluation failed (log: $LOGS/evaluate.log)"; }
log "results: $RESULTS/results.tsv"
