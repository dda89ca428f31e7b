#!/usr/bin/env bash
# A CPU stand-in for the lent H200 machine's Python, then benchmarks/gpu_check.sh inside it.
#
# That machine has Python 3.12 as `python3` only (no `python`), numpy 2.5, torch 2.11, triton 3.6,
# timm, click, pyyaml, tqdm, tensorboard; no DALI, cuCIM, OpenSlide or imagecodecs; no package
# registry. This script builds a venv with those versions (from the registry, once), then runs
# gpu_check.sh with a PATH whose only Python is that venv's `python3` and with the import blocker
# of tests/benchmarks/blocker (a sitecustomize that makes nvidia.dali, cucim, openslide and
# imagecodecs unimportable and logs every attempt), so a step that would need them on the H200
# shows up here as a clean skip or as a failure.
#
#   bash benchmarks/sim_h200_env.sh                 # build the venv if missing, run gpu_check (budget 600 s)
#   SIM_BUDGET_S=120 OUT=/tmp/sim_out bash benchmarks/sim_h200_env.sh
#   SIM_VENV=/path/to/venv SIM_PYTHON=python3.12 bash benchmarks/sim_h200_env.sh
#
# With no Python 3.12 on the machine it falls back to the newest python3.1x it finds and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${SIM_VENV:-/tmp/virchow_fast_sim_h200}"
PINS=(torch==2.11.0 triton==3.6.0 "numpy>=2.5,<2.6" timm click pyyaml tqdm tensorboard pytest setuptools wheel)
BLOCKED="nvidia-dali-cuda130 nvidia-dali-cuda120 cucim cucim-cu12 cucim-cu13 openslide-python openslide-bin imagecodecs"

if [ ! -x "$VENV/bin/python3" ]; then
  PY="${SIM_PYTHON:-}"
  if [ -z "$PY" ]; then
    # a pyenv shim for a version that is installed but not selected fails `-c`: look in pyenv's versions too
    pyenv_root="$(pyenv root 2>/dev/null || true)"
    for cand in python3.12 ${pyenv_root:+$pyenv_root/versions/3.12*/bin/python3.12} python3.13 python3.11; do
      if command -v "$cand" > /dev/null 2>&1 && "$cand" -c "import venv" 2>/dev/null; then PY="$cand"; break; fi
    done
  fi
  [ -n "$PY" ] || { echo "sim_h200_env: no python3.12 (or 3.11/3.13) found; set SIM_PYTHON" >&2; exit 2; }
  ver=$("$PY" -c "import platform; print(platform.python_version())")
  case "$ver" in 3.12.*) ;; *) echo "sim_h200_env: NOTE no Python 3.12 here, using $ver (the H200 has 3.12)" ;; esac
  "$PY" -m venv "$VENV"
  "$VENV/bin/python3" -m pip install -q --upgrade pip
  "$VENV/bin/python3" -m pip install -q "${PINS[@]}"
  # timm / torchvision must not pull any of them in; remove if something did
  "$VENV/bin/python3" -m pip uninstall -y -q $BLOCKED 2>/dev/null || true
fi

# The PATH of the H200 machine: a `python3` that is the venv's, and no `python`.
BIN="$(mktemp -d /tmp/sim_h200_bin.XXXXXX)"
trap 'rm -rf "$BIN"' EXIT
printf '#!/bin/sh\nexec "%s" "$@"\n' "$VENV/bin/python3" > "$BIN/python3"
chmod +x "$BIN/python3"
export PATH="$BIN:/usr/bin:/bin"
unset VIRTUAL_ENV PYTHONHOME
if command -v python > /dev/null 2>&1; then echo "sim_h200_env: a 'python' is still on PATH: $(command -v python)" >&2; exit 2; fi

BLOCK_LOG="$(mktemp /tmp/sim_h200_blocked.XXXXXX)"
export VF_BLOCK_IMPORTS_LOG="$BLOCK_LOG"
export PYTHONPATH="$ROOT/tests/benchmarks/blocker"
python3 - <<'PYEOF'
import importlib.metadata as md, platform
import numpy, torch, triton
print(f"sim_h200_env: python {platform.python_version()} numpy {numpy.__version__} torch {torch.__version__} "
      f"triton {triton.__version__}")
for name in ("nvidia-dali-cuda130", "cucim-cu13", "openslide-python", "imagecodecs"):
    try:
        md.version(name)
        print(f"sim_h200_env: WARNING {name} is installed in the venv")
    except md.PackageNotFoundError:
        pass
PYEOF

export GPU_CHECK_BUDGET_S="${SIM_BUDGET_S:-600}"
rc=0
bash benchmarks/gpu_check.sh || rc=$?
if [ -s "$BLOCK_LOG" ]; then
  echo "sim_h200_env: imports of blocked packages were attempted:"
  sort "$BLOCK_LOG" | uniq -c
else
  echo "sim_h200_env: no step tried to import nvidia.dali, cucim, openslide or imagecodecs"
fi
rm -f "$BLOCK_LOG"
exit $rc
