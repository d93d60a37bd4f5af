#!/usr/bin/env bash
# The whole recipe: prepare -> train_teacher -> distill (8 methods) -> evaluate.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

ALL_METHODS=(scratch word_kd seqkd seqkd_wordkd seqinter imitkd imitkd_full imitkd_star)
usage() {
  cat >&2 <<EOF2
usage: $(basename "$0") [prepare.sh OPTIONS]     e.g. --local DIR, or --spm/--srcdict for your own teacher

Runs prepare.sh (with these options), train_teacher.sh (skipped when TEACHER is set: bring your own, and
binarize with its --spm/--srcdict), distill.sh for each of: ${ALL_METHODS[*]}
(METHODS="..." for a subset), then evaluate.sh on all of them. TEACHER_ARCH is passed to train_teacher.sh --arch.
IMITKD_SMOKE=1: tiny everything, a few minutes on CPU. Outputs go to IMITKD_WORK=$WORK
EOF2
  exit 2
}
case "${1:-}" in -h|--help) usage ;; esac
read -r -a METHOD_LIST <<< "${METHODS:-${ALL_METHODS[*]}}"
[ ${#METHOD_LIST[@]} -gt 0 ] || usage

start=$SECONDS
# step LABEL SCRIPT ARGS...: run one step and say how long it took
step() {
  local t=$SECONDS label="$1"; shift
  log "=== $label"
  bash "$RECIPE/$1" "${@:2}"
  log "=== $label: $((SECONDS - t)) s"
}
step prepare prepare.sh "$@"
if [ -z "${TEACHER:-}" ]; then
  step teacher train_teacher.sh --arch "${TEACHER_ARCH:-paper}"
else
  log "=== TEACHER=$TEACHER: no teacher training"
fi
for m in "${METHOD_LIST[@]}"; do step "distill $m" distill.sh "$m"; done
step evaluate evaluate.sh "${METHOD_LIST[@]}"
log "all done in $((SECONDS - start)) s: results in $RESULTS/results.tsv and results.json"
