# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse .venv and install the pinned stack.
# Reinstalls only when requirements/ or setup.py change (a hash is kept in .venv/.virchow-fast-stamp).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    echo "virchow-fast: creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=$(cat requirements/*.txt setup.py pyproject.toml csrc_build.py | sha256sum | cut -c1-16)
if [ "$(cat .venv/.virchow-fast-stamp 2>/dev/null)" != "$stamp" ]; then
    echo "virchow-fast: installing the pinned stack into .venv (first run: a few minutes)"
    python -m pip install -q --disable-pip-version-check "pip>=24" "setuptools==80.9.0" wheel
    python -m pip install -q --disable-pip-version-check -r requirements/base.txt -r requirements/test.txt
    python -m pip install -q --disable-pip-version-check --no-deps -r requirements/nodeps.txt
    # the CUDA extension is built on GPU machines (see README); CPU runs and tests do not need it
    VIRCHOW_FAST_NO_CUDA_EXT=1 python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
    echo "$stamp" > .venv/.virchow-fast-stamp
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
