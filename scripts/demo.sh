#!/usr/bin/env bash
# The main job: a short real DINOv2 / Virchow 2 training run on the CPU with the debug config.
# Extra arguments go to `virchow-fast train` (e.g. --set train.epochs=4, or --resume).
set -euo pipefail
. "$(dirname "$0")/env.sh"
unset OMP_NUM_THREADS   # training may use both cores
exec virchow-fast train --config configs/debug.yaml "$@"
