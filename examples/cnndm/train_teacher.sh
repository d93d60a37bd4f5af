#!/usr/bin/env bash
# Step 2: train the teacher, a transformer 6+6, d=512, 8 heads, FFN 2048 (fairseq's `transformer`, shared
# embeddings), with label-smoothed cross-entropy. Smoke: 1+1 layers, d=64, 20 updates on CPU.
#
#   train_teacher.sh [extra fairseq-train flags...]
#
# Writes $IMITKD_WORK/checkpoints/teacher/checkpoint_best.pt (selected by validation loss).
# TEACHER_MAX_UPDATE (default 100000) sets its budget.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
need_cmd fairseq-train imitkd-user-dir
need_data

SAVE="$CKPT/teacher"
mkdir -p "$SAVE" "$LOGS"
if [ "$SMOKE" = 1 ]; then
  model=(--arch transformer --encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 64 --decoder-embed-dim 64
         --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128 --encoder-attention-heads 2
         --decoder-attention-heads 2 --dropout 0.1)
  opt=(--lr 2e-3 --warmup-updates 5 --max-tokens 6000 --max-update "${TEACHER_MAX_UPDATE:-20}")
else
  model=(--arch transformer --dropout 0.1 --attention-dropout 0.1)
  opt=(--lr 7e-4 --warmup-updates 4000 --max-tokens 8192 --update-freq 4 --max-update "${TEACHER_MAX_UPDATE:-100000}"
       --clip-norm 0.1 --patience 10)
fi
log "teacher -> $SAVE"
mapfile -t extra < <(train_extra)
run fairseq-train "$DATA_BIN" --user-dir "$(imitkd-user-dir)" --task translation -s "$SRC" -t "$TGT" \
  "${model[@]}" --share-all-embeddings \
  --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
  --optimizer adam --adam-betas '(0.9,0.98)' --lr-scheduler inverse_sqrt --weight-decay 0.0001 "${opt[@]}" \
  --save-dir "$SAVE" --no-epoch-checkpoints --keep-last-epochs 1 --seed 1 \
  --log-format simple --log-interval 50 "${DEVICE_ARGS[@]}" "${LOADER_ARGS[@]}" "${extra[@]}" "$@" 2>&1 | tee "$LOGS/teacher.log" >&2
[ -f "$SAVE/checkpoint_best.pt" ] || die "no $SAVE/checkpoint_best.pt: see $LOGS/teacher.log"
log "done: $SAVE/checkpoint_best.pt"
