# shellcheck disable=SC2034  # the variables are used by the scripts that source this file
# Sourced by every step of the IWSLT14 De-En recipe: paths, settings, helpers. Not a step itself.
#
# Environment:
#   IMITKD_WORK   where every output goes (default: work/ beside this file)
#   IMITKD_SMOKE  1 = tiny everything (1000 training lines, tiny models, 20 updates, CPU): a plumbing check
#   IMITKD_SMOKE_DEVICE  cuda = the smoke settings on the GPU instead of the CPU (default cpu)
#   TEACHER       teacher checkpoint(s), a.pt[:b.pt] (default: $IMITKD_WORK/checkpoints/teacher/checkpoint_best.pt)
#   TEACHER_DATA  folder with the teacher's own dict.{de,en}.txt, if the checkpoint's recorded data folder is gone
#   MAX_UPDATE    update budget of every student (default 80000; smoke 20)

shopt -s inherit_errexit
RECIPE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${IMITKD_WORK:-$RECIPE/work}"
SMOKE="${IMITKD_SMOKE:-0}"
SRC=de
TGT=en

TEXT="$WORK/text"          # tokenized, lowercased {train,valid,test}.{de,en} + test.raw.en (references)
SPM_DIR="$WORK/spm"        # spm.model + the encoded {train,valid,test}.{de,en}
DATA_BIN="$WORK/data-bin"  # fairseq-preprocess output
CKPT="$WORK/checkpoints"   # teacher/ and one folder per distillation method
SEQKD_DIR="$WORK/seqkd"    # seq-KD / Seq-Inter corpora (fairseq data directories)
LOGS="$WORK/logs"
RESULTS="$WORK/results"

SMOKE_CPU=()  # --cpu for the smoke settings, unless IMITKD_SMOKE_DEVICE=cuda
if [ "$SMOKE" = 1 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  [ "${IMITKD_SMOKE_DEVICE:-cpu}" = cuda ] || SMOKE_CPU=(--cpu)
fi

# die, log, need_cmd, need_py, teacher_path, need_teacher, teacher_data_args
# shellcheck source=../_helpers.sh
. "$RECIPE/../_helpers.sh"
# print a command (shell-quoted, so it can be pasted), then run it
run() { printf '+' >&2; printf ' %q' "$@" >&2; echo >&2; "$@"; }
# the same, with the output also kept in a log file (LOG first)
run_logged() {
  local logf="$1"; shift
  mkdir -p "$(dirname "$logf")"
  { printf '+'; printf ' %q' "$@"; echo; } | tee "$logf" >&2
  "$@" 2>&1 | tee -a "$logf"
}

need_data() {
  if [ ! -f "$DATA_BIN/dict.$SRC.txt" ] || [ ! -f "$DATA_BIN/test.$SRC-$TGT.$TGT.bin" ]; then
    die "no binarized data in $DATA_BIN: run prepare.sh first (IMITKD_WORK=$WORK)"
  fi
}
user_dir() { imitkd-user-dir; }

# Train once: DIR/recipe.done holds the exact command that finished there. The same command again is skipped
# (fairseq-train would resume from checkpoint_last.pt and still run one more update); another one resumes.
train_once() {
  local dir="$1" logf="$2"; shift 2
  local stamp
  stamp="$(printf '%q ' "$@")"
  if [ -f "$dir/recipe.done" ] && [ -f "$dir/checkpoint_best.pt" ]; then
    if [ "$(cat "$dir/recipe.done")" = "$stamp" ]; then
      log "already trained with these settings: $dir/checkpoint_best.pt (delete $dir to train again)"
      return 0
    fi
    log "warning: $dir was trained with other settings; fairseq-train resumes from its checkpoint_last.pt (delete $dir to start over)"
  fi
  rm -f "$dir/recipe.done"
  run_logged "$logf" "$@"
  [ -f "$dir/checkpoint_best.pt" ] || die "no $dir/checkpoint_best.pt after training (see $logf)"
  printf '%s' "$stamp" > "$dir/recipe.done"
}

