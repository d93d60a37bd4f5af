#!/usr/bin/env bash
# The static rollout engine on one GPU, in one device call (at most 9.5 minutes, each stage under its own limit):
#   1. its CUDA tests (graphs replayed = eager step; greedy = SequenceGenerator on CUDA);
#   2. rollout_speed: per-step time of the exact and the static engine, side by side;
#   3. update_speed: word_kd against imitkd (argmax top-5, full greedy, token mixing), each imitkd
#      method with each engine;
#   4. rollout_speed of both engines at two sizes users train (random weights, forced lengths).
# Needs: a Python with CUDA torch, fairseq (ve-fairseq or fairseq-fixed), sentencepiece and pytest; the
# shared Multi30k teacher and text (../shared beside the checkout, or IMITKD_SHARED). JSON goes to
# $OUT (the device tool's folder) or benchmarks/results. Each stage has its own time limit and a failed
# stage does not stop the next one; the exit status is the number of failed stages.
#
#   bash benchmarks/gpu_static_rollout.sh
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results}
TAG=${TAG:-gpu}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the tests and benchmarks read ../shared; a checkout that carries shared/ inside (the device tool) links it
if [ -z "${IMITKD_SHARED:-}" ] && [ ! -e ../shared ] && [ -d shared ]; then IMITKD_SHARED="$PWD/shared"; fi
if [ -n "${IMITKD_SHARED:-}" ]; then
    export IMITKD_SHARED
    [ -e ../shared ] || ln -s "$IMITKD_SHARED" ../shared
fi
failed=0
stage() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%T))"
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/${TAG}_$name.log" | tail -25
    local rc=${PIPESTATUS[0]}
    if [ "$rc" != 0 ]; then echo "=== $name FAILED (exit $rc)"; failed=$((failed + 1)); fi
}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())" \
    || exit 99
stage tests 120 python -m pytest -q -p no:cacheprovider tests/test_static_rollout.py \
    -k "cuda or padded or (greedy_matches and default)"
stage rollout_speed 120 python benchmarks/rollout_speed.py --device cuda --engine both --no-naive --repeats 5 \
    --out "$OUT_DIR/rollout_speed_engines_$TAG.json"
stage update_speed 200 python benchmarks/update_speed.py --device cuda --engine both --batches 20 --warmup 3 --prewarm \
    --workdir /tmp/imitkd-bench --out "$OUT_DIR/update_speed_engines_$TAG.json"
# the sizes users train, random weights (forced lengths): a 6+6 d=1024 teacher, a 6+1 d=512 student
stage rollout_speed_6_6_1024 60 python benchmarks/rollout_speed.py --device cuda --engine both --no-naive --repeats 3 \
    --random 6,6,1024 --out "$OUT_DIR/rollout_speed_engines_6_6_1024_$TAG.json"
stage rollout_speed_6_1_512 60 python benchmarks/rollout_speed.py --device cuda --engine both --no-naive --repeats 3 \
    --random 6,1,512 --out "$OUT_DIR/rollout_speed_engines_6_1_512_$TAG.json"
echo "=== done: $failed failed stage(s)"
exit "$failed"
