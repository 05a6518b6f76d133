#!/usr/bin/env bash
# Prepare a machine for dv3's tests and demo: system packages (when root), .venv, Python packages.
#
#   scripts/bootstrap.sh            # what `make install` runs
#   VENV=/path/to/venv scripts/bootstrap.sh
#
# Torch: on a machine without an NVIDIA GPU the CPU build torch==2.13.0 is installed; on a GPU
# machine an already-installed torch is kept (and a missing one comes from PyPI unpinned).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

# SLURM + munge: the local test cluster; Open MPI: mpirun and mpi4py; fortunes-*: the
# multilingual default corpus (real text in several languages, read from /usr/share/games/fortunes).
SYSTEM_PACKAGES=(slurm-wlm munge openmpi-bin libopenmpi-dev
                 fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-zh fortunes-pl fortunes-br fortunes-cs)

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
fi
# Debian's own python3 ships venv's ensurepip separately.
if ! "$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing system packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    echo "bootstrap: WARNING: missing system packages (${missing[*]}); install them as root" \
         "(apt-get install ${missing[*]}) or the SLURM/MPI/multilingual tests will fail." >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "bootstrap: GPU found; installing torch from PyPI"
    "${PIP[@]}" torch
  else
    echo "bootstrap: no GPU; installing the CPU build torch==2.13.0"
    "${PIP[@]}" torch==2.13.0
  fi
fi

echo "bootstrap: installing dv3 and its test dependencies"
"${PIP[@]}" -c constraints.txt -e ".[test,bench,ablate]"
"$VENV/bin/dv3" --version
