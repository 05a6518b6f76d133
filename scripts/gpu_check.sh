#!/usr/bin/env bash
# The first thing to run on a GPU machine: kernel correctness on the GPU, then the figures.
#
#   scripts/gpu_check.sh [all|tests|bench|train] ...
#
# Steps (all by default; name some to run only those, e.g. to fit a 10-minute call; the
# benchmark can be split too: BENCH_ARGS="--lengths 128 512" then
# BENCH_ARGS="--lengths 2048 8192 --no-pretrain", carrying kernel_configs.json between calls
# with DV3_KERNEL_CACHE=<path to it>):
#   tests  the kernel tests (tests/test_kernels_*.py) compiled for the GPU, no interpreter
#   bench  the kernel benchmark (python -m kernels.bench; extra flags in $BENCH_ARGS)
#   train  `dv3 bench train`, only if `python -m engine.cli bench train --help` works
# Wheels the image lacks (scripts/fetch_gpu_wheels.sh puts them in .whl/) are installed
# first, into a private folder. Everything is written to ${OUT:-benchmarks/results/<date>-<gpu>}:
# environment.txt (card, driver, versions, date), kernel_tests.log, kernels.json,
# kernels_bench.log, kernel_configs.json (the tuned tile configs), train.log/train.json.
# Exit status: non-zero if any step that ran failed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}

steps=("$@")
if [ ${#steps[@]} -eq 0 ] || [ "${steps[0]}" = all ]; then steps=(tests bench train); fi
for step in "${steps[@]}"; do
    case $step in tests|bench|train) ;; *) echo "gpu_check.sh: unknown step '$step' (use all, tests, bench, train)" >&2; exit 2 ;; esac
done

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check.sh: nvidia-smi not found: this is for a machine with an NVIDIA GPU" >&2
    exit 2
fi
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cs 'A-Za-z0-9' '-' | sed 's/-*$//')
dest=${OUT:-benchmarks/results/$(date -u +%Y%m%d)-${gpu:-gpu}}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)

# Carried wheels go to a private folder; the repository comes first on the path.
site=${DV3_WHEEL_SITE:-/tmp/dv3-site}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "gpu_check.sh: installing .whl/*.whl failed" >&2; exit 1; }
    export PYTHONPATH="$REPO:$site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "(no .whl/ wheels: peers and deepspeed only if the image has them)"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
# Tuned tile configs: start from a carried cache (DV3_KERNEL_CACHE=path) if given, and keep
# the result beside the figures so the next call (a fresh machine) can carry it back in.
if [ -n "${DV3_KERNEL_CACHE:-}" ] && [ -f "$DV3_KERNEL_CACHE" ] && [ "$DV3_KERNEL_CACHE" != "$dest/kernel_configs.json" ]; then
    cp "$DV3_KERNEL_CACHE" "$dest/kernel_configs.json"
fi
export DV3_KERNEL_CACHE="$dest/kernel_configs.json"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    "$PY" - <<'PY'
import importlib, platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda)
p = torch.cuda.get_device_properties(0)
print("device", p.name, "sm", f"{p.major}.{p.minor}", "multiprocessors", p.multi_processor_count)
for name in ("triton", "transformers", "deepspeed", "disentangled_flash", "flashdeberta"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "installed"))
    except Exception as error:
        print(name, "unavailable:", type(error).__name__, error)
PY
} 2>&1 | tee "$dest/environment.txt"

status=0
for step in "${steps[@]}"; do
    echo "=== $step ==="
    case $step in
    tests)
        # Most of the time is Triton compiling one kernel variant per test shape: spread
        # the tests over processes when pytest-xdist is there (the GPU image has it).
        parallel=()
        if "$PY" -c "import xdist" >/dev/null 2>&1; then parallel=(-n "${TEST_WORKERS:-8}"); fi
        "$PY" -m pytest tests/test_kernels_*.py -q -p no:cacheprovider "${parallel[@]}" 2>&1 | tee "$dest/kernel_tests.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        ;;
    bench)
        # shellcheck disable=SC2086
        "$PY" -m kernels.bench --device cuda --output "$dest/kernels.json" ${BENCH_ARGS:-} 2>&1 | tee "$dest/kernels_bench.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        ;;
    train)
        if help=$("$PY" -m engine.cli bench train --help 2>&1); then
            args=()
            if grep -q -- "--output" <<<"$help"; then args+=(--output "$dest/train.json"); fi
            "$PY" -m engine.cli bench train "${args[@]}" 2>&1 | tee "$dest/train.log"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        else
            echo "(dv3 bench train is not available here: skipped)" | tee "$dest/train.log"
        fi
        ;;
    esac
done
echo "results in $dest (exit $status)"
exit $status
