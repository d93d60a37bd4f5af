#!/usr/bin/env bash
# Step 2: train the teacher on $IMITKD_WORK/data-bin -> $IMITKD_WORK/checkpoints/teacher/checkpoint_best.pt
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat >&2 <<EOF
usage: $(basename "$0") [--arch paper|ARCH] [-- EXTRA fairseq-train ARGS]

  --arch paper   (default) the ImitKD paper's IWSLT teacher: transformer 8+8 layers, d=256, 4 heads, FFN 1024
  --arch ARCH    any fairseq transformer arch, e.g. transformer_iwslt_de_en (6+6, d=512, FFN 1024)
Standard IWSLT settings: adam (0.9, 0.98), lr 5e-4, inverse_sqrt with 4000 warmup updates, label smoothing 0.1,
dropout 0.3, max-tokens 4096, shared embeddings, best checkpoint by validation BLEU (greedy).
Budget: TEACHER_MAX_UPDATE (default 50000). IMITKD_SMOKE=1: a 1+1 d=64 teacher, 20 updates, CPU.
Outputs go to IMITKD_WORK=$WORK
EOF
  exit 2
}

ARCH=paper
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) [ $# -ge 2 ] || usage; ARCH="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "$(basename "$0"): unknown argument: $1" >&2; usage ;;
  esac
done
need_cmd fairseq-train imitkd-user-dir
need_data

if [ "$SMOKE" = 1 ]; then
  ARCH_ARGS=(--arch transformer --encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 64 --decoder-embed-dim 64
    --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128 --encoder-attention-heads 4 --decoder-attention-heads 4)
elif [ "$ARCH" = paper ]; then
  ARCH_ARGS=(--arch transformer --encoder-layers 8 --decoder-layers 8 --encoder-embed-dim 256 --decoder-embed-dim 256
    --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024 --encoder-attention-heads 4 --decoder-attention-heads 4)
else
  ARCH_ARGS=(--arch "$ARCH")
fi
. "$RECIPE/_train_args.sh"
MAX_UPDATE="${TEACHER_MAX_UPDATE:-50000}"
[ "$SMOKE" = 1 ] && MAX_UPDATE=20

# --user-dir: this fairseq build cannot reload its own checkpoints under torch >= 2.6 without the plugin's
# allow-list, and a resumed run (checkpoint_last.pt) reloads one
train_once "$CKPT/teacher" "$LOGS/train_teacher.log" fairseq-train "$DATA_BIN" --user-dir "$(user_dir)" \
  --task translation --source-lang "$SRC" --target-lang "$TGT" \
  "${ARCH_ARGS[@]}" --share-all-embeddings \
  --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
  "${TRAIN_ARGS[@]}" --max-update "$MAX_UPDATE" \
  --save-dir "$CKPT/teacher" "${EXTRA[@]}"
log "done: $CKPT/teacher/checkpoint_best.pt"
