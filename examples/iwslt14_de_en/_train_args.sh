# Sourced by train_teacher.sh and distill.sh: the optimizer, budget and checkpoint selection they share.
# Every student gets exactly these, so methods differ only in data and criterion.

EVAL_BLEU_ARGS='{"beam": 1}'
TRAIN_ARGS=(
  --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 0.0
  --lr 5e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000
  --dropout 0.3 --weight-decay 0.0001 --max-tokens 4096
  --seed 1 --no-epoch-checkpoints --log-format simple --log-interval 100
)
if [ "$SMOKE" = 1 ]; then
  # tiny: CPU (unless IMITKD_SMOKE_DEVICE=cuda), small batches (20 updates stay within one epoch: one validation), short validation decodes
  EVAL_BLEU_ARGS='{"beam": 1, "max_len_a": 0, "max_len_b": 25}'
  TRAIN_ARGS+=("${SMOKE_CPU[@]}" --max-tokens 1024 --warmup-updates 10 --num-workers 0 --log-interval 10)
fi
TRAIN_ARGS+=(
  --eval-bleu --eval-bleu-args "$EVAL_BLEU_ARGS" --eval-bleu-remove-bpe sentencepiece
  --best-checkpoint-metric bleu --maximize-best-checkpoint-metric
)
