#!/usr/bin/env bash
# The whole CNN/DailyMail recipe: prepare, teacher, every student, evaluation.
#
#   run_all.sh [--local DIR]
#
# METHODS (default "scratch word_kd seqkd imitkd") picks the students; "imitkd_full" is also available.
# Set TEACHER=path.pt to distil from an existing teacher instead of training one (its dictionaries must be
# the ones prepare.sh builds here). IMITKD_SMOKE=1 runs the tiny plumbing check (about 3 minutes on 2 CPUs).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
start=$SECONDS
"$RECIPE/prepare.sh" "$@"
if [ -z "${TEACHER:-}" ]; then
  "$RECIPE/train_teacher.sh"
fi
read -r -a methods <<< "${METHODS:-scratch word_kd seqkd imitkd}"
ckpts=("teacher=$(teacher_path)")
for m in "${methods[@]}"; do
  "$RECIPE/distill.sh" "$m"
  ckpts+=("$m=$CKPT/$m/checkpoint_best.pt")
done
"$RECIPE/evaluate.sh" "${ckpts[@]}"
log "finished in $((SECONDS - start)) s; ROUGE F1 on the test split ($RESULTS/results.tsv):"
column -t -s $'\t' "$RESULTS/results.tsv" >&2 2>/dev/null || cat "$RESULTS/results.tsv" >&2
