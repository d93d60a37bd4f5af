# Shell helpers shared by the recipes' _common.sh (sourced, never run).
die() { echo "$(basename "$0"): error: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $(basename "$0"): $*" >&2; }

# fail early, with the fix, when a command or a python package is missing
need_cmd() {
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 \
      || die "'$c' not found: activate the environment where fairseq-imitkd is installed (pip install -e .)"
  done
}
need_py() {
  for m in "$@"; do
    python -c "import $m" 2>/dev/null || die "python package '$m' is missing (pip install ${m/rouge_score/rouge-score})"
  done
}

# the teacher: TEACHER=a.pt[:b.pt] (an ensemble), else the recipe's own ($CKPT is set by _common.sh)
teacher_path() { echo "${TEACHER:-$CKPT/teacher/checkpoint_best.pt}"; }
need_teacher() {
  local t p parts
  t="$(teacher_path)"
  IFS=: read -r -a parts <<< "$t"
  for p in "${parts[@]}"; do
    [ -f "$p" ] || die "teacher checkpoint not found: $p (run train_teacher.sh, or set TEACHER=path.pt[:other.pt])"
  done
}
teacher_data_args() {
  if [ -n "${TEACHER_DATA:-}" ]; then printf '%s\n' --teacher-data "$TEACHER_DATA"; fi
}
