#!/usr/bin/env bash
# One unattended check of every GPU path: the CUDA tests, the GPU speed benchmarks, and the IWSLT14
# recipe's smoke settings on the GPU. Writes its evidence under $OUT (default ./gpu-check-out):
#   summary.json   every step's exit code and seconds, the device, torch, CUDA and driver versions
#   pytest.log     `pytest -m cuda` (verbose, with skip reasons)
#   rollout_speed.json, update_speed.json   both rollout engines on the Multi30k student, side by side
#   rollout_speed_6_6_1024.json, rollout_speed_6_1_512.json   both engines at two sizes users train
#   logs.tar.gz    the setup, benchmark and recipe logs, and pytest's JUnit report
# Run from the repository root on a machine with a CUDA torch. Where fairseq is not installed, it
# installs what benchmarks/gpu/carry.sh packed into .devcarry/ (no registry needed). Budget: about
# 8 minutes on one H200; STEP_LIMIT_* (seconds) bound each step; STEPS="cuda_tests ..." runs a subset;
# PYTEST_ARGS adds pytest options (a -k selection for a rerun, say). STEPS=converged runs the Multi30k
# learning curve and the converged tier instead (see converged() below; results_converged.json, curve.json,
# curve.png and multi30k.tar.gz with the run archive).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/gpu-check-out}"
mkdir -p "$OUT"
LOGS="$(mktemp -d)"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
SECONDS=0
declare -A RC DUR

STEPS="${STEPS:-setup environment speed cuda_tests iwslt14_smoke}"  # a subset reruns only those (setup always runs)
step() {  # step NAME LIMIT CMD...: run, log to $LOGS/NAME.log, record exit code and seconds
  local name="$1" limit="$2"; shift 2
  case " setup $STEPS " in *" $name "*) ;; *) echo "== $name: skipped (STEPS)" | tee -a "$LOGS/steps.log"; return 0 ;; esac
  local t0=$SECONDS
  echo "== $name (limit ${limit}s) at ${t0}s" | tee -a "$LOGS/steps.log"
  timeout --kill-after=10 "$limit" bash -o pipefail -c "$*" > "$LOGS/$name.log" 2>&1
  RC[$name]=$?
  DUR[$name]=$((SECONDS - t0))
  echo "== $name: exit ${RC[$name]} after ${DUR[$name]}s" | tee -a "$LOGS/steps.log"
  tail -n 5 "$LOGS/$name.log"
}

setup() {
  local shared="$REPO/../shared" site
  site="$(python3 -c 'import site; print(site.getsitepackages()[0])')"
  if [ ! -d "$shared/teachers/multi30k_de_en" ] && [ -d .devcarry/teacher ]; then
    mkdir -p "$shared/teachers/multi30k_de_en" "$shared/data"
    tar xJf .devcarry/data.tar.xz -C "$shared/data" || return 1
    cp .devcarry/teacher/dict.* .devcarry/teacher/spm.model .devcarry/teacher/README.md "$shared/teachers/multi30k_de_en/"
    python3 - "$REPO/.devcarry/teacher/checkpoint_fp16.pt" "$shared/teachers/multi30k_de_en/checkpoint.pt" <<'PY'
import argparse, sys
import torch
torch.serialization.add_safe_globals([argparse.Namespace])
state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
state["model"] = {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}
torch.save(state, sys.argv[2])
PY
  fi
  if ! python3 -c "import fairseq" 2>/dev/null; then
    [ -f .devcarry/site.tar.xz ] || { echo "no fairseq and no .devcarry/site.tar.xz: run benchmarks/gpu/carry.sh"; return 1; }
    # a folder of its own, first on the path (a .pth puts it there): the image's own packages must not
    # shadow the versions pinned in carry.sh
    mkdir -p /opt/imitkd-site && tar xJf .devcarry/site.tar.xz -C /opt/imitkd-site || return 1
    printf 'import sys; sys.path.insert(0, "/opt/imitkd-site")\n' > "$site/00-imitkd-carry.pth"
  fi
  # this checkout on the path and the console scripts, as `pip install -e .` would (without a registry,
  # pip cannot fetch the build backend); the scripts keep the __main__ guard that spawned workers need
  if ! (cd / && python3 -c "import fairseq_imitkd_user_dir") 2>/dev/null; then
    echo "$REPO" > "$site/fairseq_imitkd_checkout.pth"
  fi
  if ! command -v imitkd-user-dir >/dev/null || ! command -v fairseq-train >/dev/null; then
    python3 - "$REPO/setup.py" "$(python3 -c 'import fairseq, os; print(os.path.dirname(os.path.dirname(fairseq.__file__)))')" "$(dirname "$(command -v python3)")" "$(command -v python3)" <<'PY'
import glob, os, re, sys
setup_py, site, bindir, python = sys.argv[1:]
lines = re.findall(r'"([a-z0-9-]+)=([\w.]+):(\w+)"', open(setup_py).read())
for ep in glob.glob(os.path.join(site, "ve_fairseq-*.dist-info", "entry_points.txt")):
    lines += re.findall(r"^(fairseq-[a-z-]+) = ([\w.]+):(\w+)$", open(ep).read(), re.M)
for name, module, func in lines:
    path = os.path.join(bindir, name)
    if os.path.exists(path):
        continue
    with open(path, "w") as f:
        f.write(f"#!{python}\nimport sys\nfrom {module} import {func}\nif __name__ == '__main__':\n"
                f"    sys.exit({func}())\n")
    os.chmod(path, 0o755)
    print("wrote", path)
PY
  fi
  python3 -c "import fairseq, fairseq_imitkd, torch; print('fairseq', fairseq.__version__, 'torch', torch.__version__)" &&
    imitkd-user-dir && command -v fairseq-train
}

environment() {
  python3 - "$OUT/environment.json" <<'PY'
import json, platform, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip()
except OSError:
    info["driver"] = None
for name in ("fairseq", "ctranslate2", "sacrebleu", "numpy", "omegaconf", "hydra"):
    try:
        module = __import__(name)
        info[name] = f"{module.__version__} ({module.__file__})"
    except Exception as e:  # noqa: BLE001  (record what is missing, do not stop)
        info[name] = f"unavailable: {e}"
try:
    import ctranslate2
    info["ctranslate2_cuda_devices"] = ctranslate2.get_cuda_device_count()
except Exception as e:  # noqa: BLE001
    info["ctranslate2_cuda_devices"] = f"unavailable: {e}"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
PY
}

speed() {  # both rollout engines side by side; each benchmark under its own limit, a failure does not stop the next
  local failed=0
  [ "${SPEED_ONLY:-}" = update ] || timeout 60 python3 benchmarks/rollout_speed.py --device cuda --engine both --no-naive --repeats 5 \
    --out "$OUT/rollout_speed.json" || failed=$((failed + 1))
  timeout 150 python3 benchmarks/update_speed.py --device cuda --engine both --batches "${SPEED_BATCHES:-20}" \
    --warmup 3 --prewarm --workdir /tmp/imitkd-bench --out "$OUT/update_speed.json" || failed=$((failed + 1))
  # the sizes users train, random weights and forced lengths: a 6+6 d=1024 teacher, a 6+1 d=512 student
  [ "${SPEED_ONLY:-}" = update ] ||
  for size in 6,6,1024 6,1,512; do
    timeout 45 python3 benchmarks/rollout_speed.py --device cuda --engine both --no-naive --repeats 3 \
      --random "$size" --out "$OUT/rollout_speed_${size//,/_}.json" || failed=$((failed + 1))
  done
  return $failed
}

cuda_tests() {
  local workers=()
  python3 -c "import xdist" 2>/dev/null && workers=(-n "${PYTEST_WORKERS:-6}")
  OMP_NUM_THREADS=1 python3 -m pytest -m cuda tests -v -rs "${workers[@]}" -p no:cacheprovider \
    --junitxml "$LOGS_DIR/pytest.xml" ${PYTEST_ARGS:-}
}

iwslt14_smoke() {
  IMITKD_SMOKE=1 IMITKD_SMOKE_DEVICE=cuda IMITKD_WORK=/tmp/iwslt14-smoke \
    bash examples/iwslt14_de_en/run_all.sh --local "$REPO/../shared/data/iwslt14_sample"
}

# Not in the default STEPS (STEPS="converged" runs it alone, after setup): the Multi30k learning curve,
# the budget read off it (curve.py), then the converged tier, every run side by side on the one GPU.
# CURVE_MAX_UPDATE / CONVERGED_MAX_UPDATE shorten either tier (a smoke run); *_JOBS set the processes.
converged() {
  local bench="$REPO/benchmarks/multi30k" work=/tmp/m30k-work out="$OUT/multi30k"
  local curve_dir="$work/curve${CURVE_MAX_UPDATE:+_u$CURVE_MAX_UPDATE}"
  mkdir -p "$out"
  python3 "$bench/run.py" --tier curve --gpu --jobs "${CURVE_JOBS:-4}" --skip-speed --workdir "$work" \
    --out-dir "$out" ${CURVE_MAX_UPDATE:+--max-update "$CURVE_MAX_UPDATE"} || return 1
  python3 "$bench/curve.py" --tier-dir "$curve_dir" --out "$bench/curve.json" || return 1
  cp "$bench/curve.json" "$out/"; cp "$bench/curve.png" "$out/" 2>/dev/null
  python3 "$bench/run.py" --tier converged --gpu --jobs "${CONVERGED_JOBS:-12}" --workdir "$work" \
    --out-dir "$out" ${CONVERGED_MAX_UPDATE:+--max-update "$CONVERGED_MAX_UPDATE"}
}

LOGS_DIR="$LOGS"
export REPO OUT LOGS_DIR
export -f setup environment speed cuda_tests iwslt14_smoke converged
step setup "${STEP_LIMIT_SETUP:-120}" setup
step environment 60 environment
step speed "${STEP_LIMIT_SPEED:-310}" speed
# the tests and the recipe do not time anything: they share the GPU and the CPUs
step cuda_tests "${STEP_LIMIT_TESTS:-270}" cuda_tests &
TESTS=$!
step iwslt14_smoke "${STEP_LIMIT_SMOKE:-270}" iwslt14_smoke &
SMOKE=$!
wait $TESTS $SMOKE
for name in cuda_tests iwslt14_smoke; do  # their records were made in subshells: read them back from the log
  line="$(grep "^== $name: exit" "$LOGS/steps.log" | tail -1)"
  [ -n "$line" ] || continue
  RC[$name]="$(echo "$line" | sed 's/.*exit \([0-9]*\) after.*/\1/')"
  DUR[$name]="$(echo "$line" | sed 's/.* after \([0-9]*\)s/\1/')"
done
step converged "${STEP_LIMIT_CONVERGED:-480}" converged
if [ -d "$OUT/multi30k" ]; then  # the tool brings back 8 files: the results and curve apart, the rest packed
  cp "$OUT"/multi30k/results_converged*.json "$OUT"/multi30k/curve.json "$OUT"/multi30k/curve.png "$OUT/" 2>/dev/null
  tar czf "$OUT/multi30k.tar.gz" -C "$OUT" multi30k && rm -rf "$OUT/multi30k"
fi
cp "$LOGS/cuda_tests.log" "$OUT/pytest.log" 2>/dev/null
cp /tmp/iwslt14-smoke/results/*.md "$LOGS/" 2>/dev/null

python3 - "$OUT/summary.json" "$SECONDS" <<PY
import json, sys
steps = {}
for name, rc, sec in [$(for k in "${!RC[@]}"; do printf '("%s", "%s", "%s"),' "$k" "${RC[$k]}" "${DUR[$k]}"; done)]:
    steps[name] = {"exit": int(rc) if rc.isdigit() else rc, "seconds": int(sec) if sec.isdigit() else sec}
try:
    env = json.load(open("$OUT/environment.json"))
except Exception:  # noqa: BLE001
    env = None
json.dump({"steps": steps, "total_seconds": int(sys.argv[2]), "environment": env}, open(sys.argv[1], "w"), indent=1)
print(json.dumps(steps))
PY
tar czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
echo "device_check: done in ${SECONDS}s; evidence in $OUT"
