#!/usr/bin/env bash
# Lint, then the test suite on the CPU (GPU cases run when a GPU is present and are skipped, visibly, when not).
# Default: everything, the `slow` cases included. Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
. "$(dirname "$0")/env.sh"
echo "virchow-fast: ruff (E, F, W, B, I at 120 columns; pyproject.toml)"
ruff check --no-cache .
set +e
python -m pytest -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "virchow-fast: pytest collected no tests: failing on purpose" >&2
    exit 1
fi
exit "$rc"
