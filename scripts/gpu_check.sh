#!/usr/bin/env bash
# The first thing to run on a GPU machine: kernel correctness on the GPU, then the figures.
# Sized for one call of at most 8 minutes on an H200 (the GPU image: torch 2.11, triton 3.6,
# transformers 5.17; scripts/fetch_gpu_wheels.sh puts what it lacks into .whl/).
#
#   scripts/gpu_check.sh [all|env|tests|bench|plot|train] ...
#   GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh      # rehearsal without a GPU: same steps, tiny shapes
#
# Every step runs under its own `timeout` (a hang loses that step, not the later ones) and all
# of them share a budget (GPU_CHECK_BUDGET seconds, default 470). The kernel benchmark rewrites
# its JSON after every measurement, so a step cut short still leaves figures. Results, at most
# 8 files, go to ${OUT:-benchmarks/results/<date>-<gpu>}/:
#   environment.txt   card, driver, versions, commit, date, and each step's status and seconds
#   kernel_tests.log  tests/test_kernels_*.py compiled for the GPU (per-test timeout)
#   kernels.json      dv3 bench kernels at L=512 and L=8192: fused (each backward variant),
#                     disentangled-flash, flashdeberta, HF eager, SDPA flash (no position terms)
#   kernels.png       its plot (TFLOP/s and peak memory against length, fwd and fwd+bwd)
#   kernels_bench.log the benchmark's own lines
#   kernel_configs.json  the tile configs used (DV3_KERNEL_CACHE)
#   train.json, train.log  dv3 bench train, base at L=512, a few steps, torch Adam (no nvcc build)
# Exit status: non-zero if any step that ran failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-gpu}
BUDGET=${GPU_CHECK_BUDGET:-470}
START=$SECONDS

steps=("$@")
if [ ${#steps[@]} -eq 0 ] || [ "${steps[0]}" = all ]; then steps=(env tests bench plot train); fi
for step in "${steps[@]}"; do
    case $step in env|tests|bench|plot|train) ;; *) echo "gpu_check.sh: unknown step '$step' (all, env, tests, bench, plot, train)" >&2; exit 2 ;; esac
done

if [ "$DEVICE" = gpu ]; then
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "gpu_check.sh: nvidia-smi not found: this is for a machine with an NVIDIA GPU (GPU_CHECK_DEVICE=cpu rehearses)" >&2
        exit 2
    fi
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cs 'A-Za-z0-9' '-' | sed 's/-*$//')
    unset TRITON_INTERPRET
else
    gpu=cpu-rehearsal
    export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu
fi
dest=${OUT:-benchmarks/results/$(date -u +%Y%m%d)-${gpu:-gpu}}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)

# Carried wheels go to a private folder; the repository comes first on the path.
site=${DV3_WHEEL_SITE:-/tmp/dv3-site}
if [ "$DEVICE" = gpu ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "gpu_check.sh: installing .whl/*.whl failed" >&2; exit 1; }
    export PYTHONPATH="$REPO:$site${PYTHONPATH:+:$PYTHONPATH}"
else
    # (the wheels are for the GPU image's Python 3.12; a CPU rehearsal uses this environment)
    echo "(no .whl/ wheels installed: peers and deepspeed only if this environment has them)"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
# The configs used are kept beside the figures; a carried cache (DV3_KERNEL_CACHE=path) is the start.
if [ -n "${DV3_KERNEL_CACHE:-}" ] && [ -f "$DV3_KERNEL_CACHE" ] && [ "$DV3_KERNEL_CACHE" != "$dest/kernel_configs.json" ]; then
    cp "$DV3_KERNEL_CACHE" "$dest/kernel_configs.json"
fi
export DV3_KERNEL_CACHE="$dest/kernel_configs.json"

status=0
steps_log=$dest/steps.tmp
: > "$steps_log"
log_status() { echo "step $1: $2 (${3}s)" | tee -a "$steps_log"; }

# run_step NAME LIMIT LOGFILE FUNCTION: the function under `timeout` in its own shell (never past
# the shared budget), its output to the terminal and LOGFILE; exit 124/137 means it timed out.
run_step() {
    local name=$1 limit=$2 logfile=$3 function=$4
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 15 ]; then
        log_status "$name" "skipped, budget spent" 0
        status=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (at most ${limit}s) ==="
    local began=$SECONDS rc
    timeout --kill-after=10 "$limit" bash -c "$function" 2>&1 | tee "$logfile"
    rc=${PIPESTATUS[0]}
    local took=$((SECONDS - began))
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        log_status "$name" "TIMED OUT after ${limit}s" "$took"; status=1
    elif [ "$rc" -ne 0 ]; then
        log_status "$name" "failed (exit $rc)" "$took"; status=1
    else
        log_status "$name" ok "$took"
    fi
}

environment() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "mode: $DEVICE, budget ${BUDGET}s"
    if [ "$DEVICE" = gpu ]; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    fi
    "$PY" - <<'PY'
import importlib, platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", f"{p.major}.{p.minor}", "multiprocessors", p.multi_processor_count)
for name in ("triton", "transformers", "deepspeed", "disentangled_flash", "flashdeberta", "pytest_timeout", "matplotlib"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "installed"))
    except Exception as error:
        print(name, "unavailable:", type(error).__name__, error)
PY
}

kernel_tests() {
    local args=(-q -p no:cacheprovider)
    if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then args+=(--timeout "${TEST_TIMEOUT:-90}"); fi
    if [ "$DEVICE" = gpu ]; then
        # Most of the time is Triton compiling kernels: spread the tests over processes if xdist is there.
        if "$PY" -c "import xdist" >/dev/null 2>&1; then args+=(-n "${TEST_WORKERS:-8}"); fi
        "$PY" -m pytest tests/test_kernels_*.py "${args[@]}"
    else
        # Rehearsal: the GPU-only tests (they skip, saying why) and the dispatch tests.
        "$PY" -m pytest tests/test_kernels_gpu.py tests/test_kernels_dispatch.py "${args[@]}" -rs
    fi
}

kernel_bench() {
    if [ "$DEVICE" = gpu ]; then
        # First tuning candidates (a full search per length bucket does not fit the call).
        # shellcheck disable=SC2086
        DV3_KERNEL_AUTOTUNE=${DV3_KERNEL_AUTOTUNE:-0} "$PY" -m kernels.bench --device cuda --lengths 512 8192 \
            --no-pretrain --paths fused-slices fused-split disentangled-flash flashdeberta hf sdpa \
            --warmup-ms 10 --rep-ms 40 --output "$dest/kernels.json" ${BENCH_ARGS:-}
    else
        # shellcheck disable=SC2086
        "$PY" -m kernels.bench --device cpu --lengths 16 32 --tokens 32 --heads 1 --head-dim 32 \
            --position-buckets 8 --max-relative-positions 32 --repeats 1 --no-pretrain \
            --paths fused-slices fused-split hf sdpa disentangled-flash flashdeberta --output "$dest/kernels.json" ${BENCH_ARGS:-}
    fi
}

train_bench() {
    local config=/tmp/dv3-gpu-check-ds.json
    # DeepSpeed's fused Adam would be JIT-built with nvcc (minutes): torch's Adam instead.
    "$PY" - "$config" <<'PY' || return 1
import json, sys
base = json.load(open("ds_configs/zero2_bf16.json"))
base.setdefault("optimizer", {"type": "AdamW", "params": {}})["params"]["torch_adam"] = True
json.dump(base, open(sys.argv[1], "w"), indent=1)
PY
    if [ "$DEVICE" = gpu ]; then
        "$PY" -m engine.cli bench train --preset base --seq-len 512 --micro-batch 16 --steps 3 --warmup 2 \
            --deepspeed-config "$config" --output "$dest/train.json"
    else
        "$PY" -m engine.cli bench train --preset tiny --seq-len 64 --micro-batch 2 --steps 1 --warmup 1 \
            --deepspeed-config ds_configs/cpu.json --output "$dest/train.json"
    fi
}

plot() { "$PY" -m kernels.bench --plot-from "$dest/kernels.json" --plot "$dest/kernels.png"; }
export -f environment kernel_tests kernel_bench train_bench plot
export PY DEVICE BUDGET dest

for step in "${steps[@]}"; do
    case $step in
    env) run_step env 60 "$dest/environment.txt" environment ;;
    tests) run_step tests "${TESTS_LIMIT:-150}" "$dest/kernel_tests.log" kernel_tests ;;
    bench) run_step bench "${BENCH_LIMIT:-180}" "$dest/kernels_bench.log" kernel_bench ;;
    plot)
        if [ -f "$dest/kernels.json" ]; then
            run_step plot 30 /dev/null plot
        else
            echo "(no kernels.json to plot)"
        fi
        ;;
    train) run_step train "${TRAIN_LIMIT:-100}" "$dest/train.log" train_bench ;;
    esac
done
# Each step's status and time go at the end of environment.txt (one file fewer).
cat "$steps_log" >> "$dest/environment.txt"
rm -f "$steps_log"
echo "results in $dest ($(ls "$dest" | wc -l) files, $((SECONDS - START))s, exit $status)"
exit $status
