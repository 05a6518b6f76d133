#!/usr/bin/env bash
# Download, here, the wheels the GPU machine's image lacks, into .whl/ (git-ignored), for
# Python 3.12 on manylinux x86_64. scripts/gpu_check.sh installs whatever .whl/ holds.
#
#   scripts/fetch_gpu_wheels.sh            # peers + deepspeed and its missing needs
#
# The GPU image already has torch 2.11, triton 3.6, transformers, einops, msgpack, ninja,
# psutil, py-cpuinfo, nvidia-ml-py and pytest; it lacks deepspeed (sdist only on PyPI, pure
# Python: built into a wheel here), hjson and pydantic (with pydantic-core, annotated-types,
# typing-inspection), the two peers of the kernel benchmark, pytest-timeout (gpu_check.sh's
# per-test timeout) and matplotlib with its pure and binary needs (the benchmark's plot).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
DEST=${WHEEL_DIR:-.whl}
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

# Same versions as this venv where it has them, so pydantic and pydantic-core stay a matching pair.
version_here() { "$PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
pinned() {
    local name=$1 fallback=${2:-}
    local version
    version=$(version_here "$name")
    version=${version:-$fallback}
    if [ -n "$version" ]; then echo "$name==$version"; else echo "$name"; fi
}

# One version of each name in .whl/: two stop the whole install over there.
forget() {
    local stem
    stem=$(echo "$1" | tr '-' '_')
    rm -f "$DEST"/"$stem"-*.whl "$DEST"/"$1"-*.whl
}

fetch() {
    local spec=$1
    forget "${spec%%==*}"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$DEST" "$spec"
}

fetch disentangled-flash==1.1.1
fetch flashdeberta==0.0.8
fetch "$(pinned hjson)"
fetch "$(pinned pydantic)"
fetch "$(pinned pydantic-core)"
fetch "$(pinned annotated-types)"
fetch "$(pinned typing-inspection)"
fetch "$(pinned typing-extensions)"  # pydantic needs a recent one
fetch "$(pinned pytest-timeout)"
for name in matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil tzdata six pillow; do
    fetch "$(pinned "$name")"
done

forget deepspeed
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8

echo "wheels in $DEST:"
ls -la "$DEST"
du -sh "$DEST"
