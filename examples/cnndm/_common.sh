# Sourced by every step of the CNN/DailyMail recipe: paths, settings, helpers. Not a step itself.
#
# Environment:
#   IMITKD_WORK   where every output goes (default: work/ beside this file)
#   IMITKD_SMOKE  1 = tiny everything (300 articles, 50 test, vocab 1000, tiny models, 20 updates, CPU)
#   TEACHER       teacher checkpoint(s), a.pt[:b.pt] (default: $IMITKD_WORK/checkpoints/teacher/checkpoint_best.pt)
#   TEACHER_DATA  folder with the teacher's own dict.{article,summary}.txt, if the checkpoint's data folder is gone
#   STUDENT_ARCH  student architecture (default transformer_student_deep_shallow: 6+1, d=256; smoke: _tiny)
#   MAX_UPDATE    update budget of every student (default 50000; smoke 20)
#   SEQKD_BEAM    beam of the seq-KD corpus (default 5, the paper's; smoke 2)
#   TRAIN_EXTRA   extra flags appended to every fairseq-train call (e.g. "--fp16" on a GPU)

RECIPE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${IMITKD_WORK:-$RECIPE/work}"
SMOKE="${IMITKD_SMOKE:-0}"
SRC=article
TGT=summary

TEXT="$WORK/text"          # {train,valid,test}.{article,summary}: one document per line, whitespace squeezed
SPM_DIR="$WORK/spm"        # spm.model + the encoded, truncated {train,valid,test}.{article,summary}
DATA_BIN="$WORK/data-bin"  # fairseq-preprocess output (joined dictionary)
CKPT="$WORK/checkpoints"   # teacher/ and one folder per distillation method
SEQKD_DIR="$WORK/seqkd"    # the teacher's beam-5 sequence-level KD corpus (a fairseq data directory)
LOGS="$WORK/logs"
RESULTS="$WORK/results"

if [ "$SMOKE" = 1 ]; then
  MAX_SRC=200; MAX_TGT=100; SPM_VOCAB=1000; MAX_TRAIN=300; MAX_TEST=50
  STUDENT_ARCH="${STUDENT_ARCH:-transformer_student_tiny}"
  MAX_UPDATE="${MAX_UPDATE:-20}"
  DEVICE_ARGS=(--cpu)
  SEQKD_BEAM="${SEQKD_BEAM:-2}"
  # a DataLoader worker costs seconds to start and to join; on tiny data it only slows things down
  LOADER_ARGS=(--num-workers 0)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  MAX_SRC=400; MAX_TGT=100; SPM_VOCAB="${SPM_VOCAB:-32000}"; MAX_TRAIN=0; MAX_TEST=0
  STUDENT_ARCH="${STUDENT_ARCH:-transformer_student_deep_shallow}"
  MAX_UPDATE="${MAX_UPDATE:-50000}"
  DEVICE_ARGS=()
  SEQKD_BEAM="${SEQKD_BEAM:-5}"
  LOADER_ARGS=()
fi
# generation length: ImitKD's CNN/DM setting (99 tokens, then EOS), for rollouts, seq-KD and evaluation alike
GEN_LEN=99

# die, log, need_cmd, need_py, teacher_path, need_teacher, teacher_data_args
# shellcheck source=../_helpers.sh
. "$RECIPE/../_helpers.sh"
# print a command (shell-quoted, so it can be pasted), then run it
run() { printf '+' >&2; printf ' %q' "$@" >&2; echo >&2; "$@"; }

need_data() {
  [ -f "$DATA_BIN/dict.$SRC.txt" ] && [ -f "$DATA_BIN/test.$SRC-$TGT.$TGT.bin" ] \
    || die "no binarized data in $DATA_BIN: run prepare.sh first (IMITKD_WORK=$WORK)"
}
train_extra() {
  local extra=()
  if [ -n "${TRAIN_EXTRA:-}" ]; then read -r -a extra <<< "$TRAIN_EXTRA"; fi
  if [ "${#extra[@]}" -gt 0 ]; then printf '%s\n' "${extra[@]}"; fi
}
