#!/usr/bin/env bash
# Step 3: train one student.
#
#   distill.sh METHOD [extra fairseq-train flags...]
#
#   scratch      plain label-smoothed cross-entropy on the gold summaries (no teacher)
#   word_kd      word-level KD: (1-a) NLL(gold) + a CE(teacher || student), a=0.5, T=1, on gold prefixes
#   seqkd        sequence-level KD: the teacher beam-decodes the training articles once (beam \$SEQKD_BEAM=5, smoke 2; 99 tokens,
#                imitkd-seqkd, cached in $IMITKD_WORK/seqkd), then plain cross-entropy on its outputs
#   imitkd       ImitKD: greedy student rollouts (99 tokens) mixed with data under beta = 10^(-t/N),
#                the teacher's argmax on rollout prefixes, gold on data prefixes
#   imitkd_full  ImitKD+Full: the same rollouts, the teacher's full distribution on every prefix
#
# Student: $STUDENT_ARCH (default transformer_student_deep_shallow, 6+1 layers, d=256; smoke: transformer_student_tiny).
# Teacher: $TEACHER (default $IMITKD_WORK/checkpoints/teacher/checkpoint_best.pt).
# Writes $IMITKD_WORK/checkpoints/METHOD/checkpoint_best.pt (selected by validation loss).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
[ $# -ge 1 ] || die "usage: distill.sh {scratch,word_kd,seqkd,imitkd,imitkd_full} [fairseq-train flags...]"
METHOD="$1"; shift
need_cmd fairseq-train imitkd-user-dir imitkd-seqkd
need_data
USER_DIR="$(imitkd-user-dir)"
mapfile -t tdata < <(teacher_data_args)

data="$DATA_BIN"
task=(--task translation)
case "$METHOD" in
  scratch)
    crit=(--criterion label_smoothed_cross_entropy --label-smoothing 0.1) ;;
  word_kd)
    need_teacher
    task=(--task distillation --teacher-path "$(teacher_path)" "${tdata[@]}")
    crit=(--criterion word_kd --kd-alpha 0.5 --kd-temperature 1 --label-smoothing 0.1) ;;
  seqkd)
    need_teacher
    stamp="$(teacher_path) $(IFS=:; for p in $(teacher_path); do stat -c '%s %Y' "$p"; done)"
    if [ -f "$SEQKD_DIR/seqkd_manifest.json" ] && [ -f "$SEQKD_DIR/train.$SRC-$TGT.$TGT.bin" ] \
       && [ "$(cat "$SEQKD_DIR/.teacher" 2>/dev/null)" = "$stamp" ]; then
      log "seq-KD corpus cached in $SEQKD_DIR (same teacher file)"
    else
      log "seq-KD corpus -> $SEQKD_DIR"
      mkdir -p "$LOGS"
      batch=(--max-tokens 12000)
      if [ "$SMOKE" = 1 ]; then batch=(--max-tokens 20000); fi
      run imitkd-seqkd "$DATA_BIN" -o "$SEQKD_DIR" --teacher-path "$(teacher_path)" "${tdata[@]}" \
        --beam "$SEQKD_BEAM" --max-len-a 0 --max-len-b "$GEN_LEN" "${batch[@]}" --no-progress-bar --overwrite \
        "${DEVICE_ARGS[@]}" 2>&1 | tee "$LOGS/seqkd_corpus.log" >&2
      [ -f "$SEQKD_DIR/train.$SRC-$TGT.$TGT.bin" ] || die "imitkd-seqkd wrote no corpus: see $LOGS/seqkd_corpus.log"
      echo "$stamp" > "$SEQKD_DIR/.teacher"
    fi
    data="$SEQKD_DIR"
    crit=(--criterion label_smoothed_cross_entropy --label-smoothing 0.1) ;;
  imitkd|imitkd_full)
    need_teacher
    target=argmax
    if [ "$METHOD" = imitkd_full ]; then target=full; fi
    task=(--task distillation --teacher-path "$(teacher_path)" "${tdata[@]}")
    crit=(--criterion imitkd --imitkd-target "$target" --imitkd-sampling greedy
          --imitkd-beta-schedule exponential --imitkd-beta-base 10 --imitkd-beta-updates "$MAX_UPDATE"
          --imitkd-max-len-a 0 --imitkd-max-len-b "$GEN_LEN") ;;
  *) die "unknown METHOD '$METHOD' (scratch, word_kd, seqkd, imitkd, imitkd_full)" ;;
esac

if [ "$SMOKE" = 1 ]; then
  opt=(--lr 2e-3 --warmup-updates 5 --max-tokens 6000 --dropout 0.1)
else
  opt=(--lr 7e-4 --warmup-updates 4000 --max-tokens 8192 --update-freq 4 --dropout 0.1 --clip-norm 0.1)
fi
SAVE="$CKPT/$METHOD"
mkdir -p "$SAVE" "$LOGS"
log "$METHOD student ($STUDENT_ARCH) -> $SAVE"
mapfile -t extra < <(train_extra)
run fairseq-train "$data" --user-dir "$USER_DIR" "${task[@]}" -s "$SRC" -t "$TGT" \
  --arch "$STUDENT_ARCH" --share-all-embeddings "${crit[@]}" \
  --optimizer adam --adam-betas '(0.9,0.98)' --lr-scheduler inverse_sqrt --weight-decay 0.0001 "${opt[@]}" \
  --max-update "$MAX_UPDATE" --save-dir "$SAVE" --no-epoch-checkpoints --keep-last-epochs 1 --seed 1 \
  --log-format simple --log-interval 50 "${DEVICE_ARGS[@]}" "${LOADER_ARGS[@]}" "${extra[@]}" "$@" 2>&1 | tee "$LOGS/$METHOD.log" >&2
[ -f "$SAVE/checkpoint_best.pt" ] || die "no $SAVE/checkpoint_best.pt: see $LOGS/$METHOD.log"
log "done: $SAVE/checkpoint_best.pt"
