#!/usr/bin/env bash
# Step 3: train one student with one method -> $IMITKD_WORK/checkpoints/METHOD/checkpoint_best.pt
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

METHODS="scratch word_kd seqkd seqkd_wordkd seqinter imitkd imitkd_full imitkd_star"
usage() {
  cat >&2 <<EOF
usage: $(basename "$0") METHOD [-- EXTRA fairseq-train ARGS]

METHOD (student transformer_student_iwslt: 2+2 layers, d=256, FFN 768):
  scratch       gold data, label-smoothed cross-entropy (no teacher)
  word_kd       gold data, word-level KD (alpha 0.5, T 1, label smoothing 0.1)
  seqkd         the teacher's beam-5 outputs (Seq-KD corpus), label-smoothed cross-entropy
  seqkd_wordkd  Seq-KD corpus + word-level KD
  seqinter      Seq-Inter corpus (of the 5-best, the highest sentence BLEU), label-smoothed cross-entropy
  imitkd        ImitKD: teacher argmax targets, top-5 sampled rollouts
  imitkd_full   ImitKD+Full: the teacher's full distribution, greedy rollouts
  imitkd_star   ImitKD*: imitkd with the Seq-KD corpus as its data
ImitKD variants: beta = 200^(-t/N), N = MAX_UPDATE, rollouts of at most 125 tokens.
Seq-KD corpora are built once with imitkd-seqkd and cached in \$IMITKD_WORK/seqkd.

Environment: TEACHER (a.pt[:b.pt], default the one train_teacher.sh made), TEACHER_DATA, MAX_UPDATE (80000),
SEQKD_BEAM (5), SEQINTER_NBEST (= SEQKD_BEAM), SEQKD_ARGS (more imitkd-seqkd options), IMITKD_SMOKE. Outputs go to IMITKD_WORK=$WORK
EOF
  exit 2
}
[ $# -ge 1 ] || usage
METHOD="$1"; shift
case " $METHODS " in *" $METHOD "*) ;; *) [ "$METHOD" = -h ] || [ "$METHOD" = --help ] || echo "$(basename "$0"): unknown method: $METHOD" >&2; usage ;; esac
EXTRA=()
if [ $# -gt 0 ]; then
  [ "$1" = -- ] || { echo "$(basename "$0"): unexpected argument: $1 (extra fairseq-train arguments go after --)" >&2; usage; }
  shift; EXTRA=("$@")
fi
need_cmd fairseq-train imitkd-seqkd imitkd-user-dir
need_data
[ "$METHOD" = scratch ] || need_teacher
T="$(teacher_path)"
mapfile -t TDATA < <(teacher_data_args)

if [ "$SMOKE" = 1 ]; then
  STUDENT=transformer_student_tiny MAX_UPDATE=20 SEQKD_BEAM=2
  GEN_LEN=(--max-len-a 0 --max-len-b 25) ROLLOUT_LEN=(--imitkd-max-len-a 0 --imitkd-max-len-b 25) DEVICE=("${SMOKE_CPU[@]}")
else
  STUDENT=transformer_student_iwslt MAX_UPDATE="${MAX_UPDATE:-80000}" SEQKD_BEAM="${SEQKD_BEAM:-5}"
  GEN_LEN=() ROLLOUT_LEN=(--imitkd-max-len-a 0 --imitkd-max-len-b 125) DEVICE=()
fi
NBEST="${SEQINTER_NBEST:-$SEQKD_BEAM}"
read -r -a SEQKD_EXTRA <<< "${SEQKD_ARGS:-}"  # more imitkd-seqkd options, e.g. "--fp16 --max-tokens 30000"

# build (or reuse) a sequence-level KD corpus; prints its directory
corpus() {
  local name="$1"; shift
  local dir="$SEQKD_DIR/$name" state over=()
  local args=("$DATA_BIN" -o "$dir" --teacher-path "$T" "${TDATA[@]}" --split train --beam "$SEQKD_BEAM" \
    "${GEN_LEN[@]}" "${DEVICE[@]}" --no-progress-bar "${SEQKD_EXTRA[@]}" "$@")
  state="$(imitkd-seqkd "${args[@]}" --status 2>/dev/null)" || state=error  # a build below names the problem
  if [ "$state" = cached ]; then
    log "seq-KD corpus $dir: already built with these settings, reused" ; echo "$dir"; return
  fi
  [ "$state" = stale ] && { log "seq-KD corpus $dir was made with other settings: rebuilding it"; over=(--overwrite); }
  mkdir -p "$SEQKD_DIR"
  run_logged "$LOGS/seqkd_$name.log" imitkd-seqkd "${args[@]}" "${over[@]}" >&2
  [ -f "$dir/seqkd_stats.json" ] || die "imitkd-seqkd did not finish $dir (see $LOGS/seqkd_$name.log)"
  echo "$dir"
}
seqkd_corpus() { corpus "seqkd_beam$SEQKD_BEAM"; }
seqinter_corpus() {
  corpus "seqinter_beam${SEQKD_BEAM}_nbest$NBEST" --nbest "$NBEST" --select sentence-bleu --remove-bpe sentencepiece
}

CE=(--task translation --criterion label_smoothed_cross_entropy --label-smoothing 0.1)
KD_TASK=(--task distillation --teacher-path "$T" "${TDATA[@]}")
WORD_KD=("${KD_TASK[@]}" --criterion word_kd --kd-alpha 0.5 --kd-temperature 1 --label-smoothing 0.1)
IMITKD=("${KD_TASK[@]}" --criterion imitkd --imitkd-beta-schedule exponential --imitkd-beta-base 200 "${ROLLOUT_LEN[@]}")
case "$METHOD" in
  scratch)      DATA="$DATA_BIN";          ARGS=("${CE[@]}") ;;
  word_kd)      DATA="$DATA_BIN";          ARGS=("${WORD_KD[@]}") ;;
  seqkd)        DATA="$(seqkd_corpus)";    ARGS=("${CE[@]}") ;;
  seqkd_wordkd) DATA="$(seqkd_corpus)";    ARGS=("${WORD_KD[@]}") ;;
  seqinter)     DATA="$(seqinter_corpus)"; ARGS=("${CE[@]}") ;;
  imitkd)       DATA="$DATA_BIN";          ARGS=("${IMITKD[@]}" --imitkd-target argmax --imitkd-sampling topk --imitkd-topk 5) ;;
  imitkd_full)  DATA="$DATA_BIN";          ARGS=("${IMITKD[@]}" --imitkd-target full --imitkd-sampling greedy) ;;
  imitkd_star)  DATA="$(seqkd_corpus)";    ARGS=("${IMITKD[@]}" --imitkd-target argmax --imitkd-sampling topk --imitkd-topk 5) ;;
esac

. "$RECIPE/_train_args.sh"
train_once "$CKPT/$METHOD" "$LOGS/distill_$METHOD.log" fairseq-train "$DATA" --user-dir "$(user_dir)" \
  --source-lang "$SRC" --target-lang "$TGT" "${ARGS[@]}" \
  --arch "$STUDENT" --share-all-embeddings \
  "${TRAIN_ARGS[@]}" --max-update "$MAX_UPDATE" \
  --save-dir "$CKPT/$METHOD" "${EXTRA[@]}"
log "done: $METHOD -> $CKPT/$METHOD/checkpoint_best.pt"
