#!/usr/bin/env bash
# The prepared script for a lent GPU (an H200 for at most ~9 minutes: python3 3.12 only, torch 2.11,
# triton 3.6, numpy 2.5, no DALI / cuCIM / OpenSlide / imagecodecs, no package registry).
# One run yields, in this order, each step capped in time and summed up in one line:
#   1 ceilings       copy bandwidth, bf16 GEMM rate at the model's GEMM shapes, clocks (bench_ceilings.py)
#   2 step_vit_h     the trainer's own step, ViT-H/14 at 32 tiles, AC off and full, memory and loader
#   3 profile_vit_h  where that step's time goes, by category (bench_profile.py)
#   4 step_vit_g     ViT-G/14's step at its batch
#   5 correctness    one training step triton vs torch (tests/train/test_step_backends.py), then the
#                    kernel tests: the GPU-marked ones first, then the rest
#   6 kernel benches attention (vs SDPA backends, FlexAttention), LN / SwiGLU in GB/s, the residual GEMM vs timm's composition
#                    against copy, head loss vs eager; compile baselines only if time remains
#   7 CUDA extension its build and its tests
# Steps 1-2 (with the install) are the headline: they come first and their caps fit the budget.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh     # default OUT: benchmarks/results/gpu_check_<utc>
#   GPU_CHECK_BUDGET_S=510                         # total seconds (default 510, so a 600 s call returns)
#   GPU_CHECK_ONLY="bench_attention build_cuda_ext" # a rerun: only these steps (+ env, install), the rest SKIPPED
#   GPU_CHECK_INSTALL=no                           # use the environment as it is (the CPU tests set this)
#   bash benchmarks/gpu_check.sh --prepare-wheels  # here, with a registry: pytest wheels into .whl/
#                                                  # (carry .whl to a machine without pytest)
#
# With OUT given (the device tool takes back at most 8 files), every log and JSON goes to a scratch
# folder packed into $OUT/gpu_check.tar.gz after each step (a run cut short still returns what it
# measured), with summary.txt beside it: 2 files. On a machine without CUDA every GPU-only step
# says why it skipped and the rest run in their CPU smoke mode (numbers that prove only that the
# script works).
set -u
T0=$(date +%s)  # the budget counts from here
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if [ "${1:-}" = "--prepare-wheels" ]; then
  "$PY" -m pip download --only-binary=:all: -d .whl pytest && ls .whl
  exit $?
fi

if [ -n "${OUT:-}" ]; then
  PACK_TO="$OUT"
  mkdir -p "$PACK_TO"
  export OUT="$(mktemp -d /tmp/gpu_check.XXXXXX)"
else
  PACK_TO=""
  export OUT="benchmarks/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)"
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
pack() {
  [ -n "$PACK_TO" ] || return 0
  tar czf "$PACK_TO/gpu_check.tar.gz" -C "$OUT" --exclude=_pyshim . && cp "$SUMMARY" "$PACK_TO/summary.txt"
}
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

if ! command -v "$PY" > /dev/null 2>&1; then
  echo "gpu_check: no $PY on PATH (set PYTHON=...)" | tee -a "$SUMMARY"; pack; exit 2
fi
NO_GPU_WHY=$("$PY" -c "
import torch
if not torch.cuda.is_available():
    print('no CUDA device visible to torch ' + torch.__version__ + ' (cuda ' + str(torch.version.cuda) + ')')" 2>&1)
if [ -z "$NO_GPU_WHY" ]; then
  HAVE_GPU=1
else
  HAVE_GPU=0
  NO_GPU_WHY=$(echo "$NO_GPU_WHY" | tail -n 1)
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
fi

env_info() {
  "$PY" - <<'PYEOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("numpy", "triton", "timm", "torchvision", "click", "PyYAML", "tqdm", "tensorboard", "pytest",
             "setuptools", "nvidia-dali-cuda130", "cucim-cu13", "openslide-python", "imagecodecs"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PYEOF
  if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
  else
    echo "nvidia-smi: not on PATH"
  fi
}

# Editable install (maps kernels/ to virchow_fast.kernels), without the CUDA extension (step 7
# builds it last). Skipped when this tree is already what `import virchow_fast` finds.
install() {
  local here
  if [ "${GPU_CHECK_INSTALL:-yes}" = "no" ]; then  # the CPU tests: never re-point the caller's environment
    echo "SUMMARY install: not run (GPU_CHECK_INSTALL=no); virchow_fast is imported as installed"
    return 0
  fi
  here=$(cd /tmp && "$PY" -c "import os, virchow_fast.kernels as k; print(os.path.dirname(os.path.dirname(k.__file__)))" 2>/dev/null)
  if [ "$here" = "$PWD" ] || [ "$here" = "$PWD/virchow_fast" ]; then
    echo "SUMMARY install: virchow_fast already installed from this tree, not reinstalled"
  else
    export VIRCHOW_FAST_NO_CUDA_EXT=1
    "$PY" -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -n 5
    if (cd /tmp && "$PY" -c "import virchow_fast.kernels") 2>/dev/null; then
      echo "SUMMARY install: pip install -e . done"
    else
      echo "SUMMARY install: pip install -e . FAILED: the PYTHONPATH shim maps the kernels instead"
    fi
  fi
  if ! "$PY" -c "import pytest" 2>/dev/null; then
    if ls .whl/*.whl > /dev/null 2>&1; then
      "$PY" -m pip install --no-deps --no-index .whl/*.whl 2>&1 | tail -n 2
    else
      echo "pytest not installed and no .whl/ with its wheels: the test steps will skip"
    fi
  fi
}

# Last resort when no install worked (no setuptools there): a sitecustomize on PYTHONPATH mapping
# virchow_fast.kernels to kernels/ (what the editable install provides); an existing sitecustomize
# further on the path still runs.
ensure_importable() {
  (cd /tmp && "$PY" -c "import virchow_fast.kernels.attention" 2>/dev/null) && return 0
  local shim="$OUT/_pyshim"
  mkdir -p "$shim"
  cat > "$shim/sitecustomize.py" <<PYEOF
import importlib.abc, importlib.util, os, sys
_KERNELS = os.path.join("$PWD", "kernels")
class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "virchow_fast.kernels" and not name.startswith("virchow_fast.kernels."):
            return None
        base = os.path.join(_KERNELS, *name.split(".")[2:])
        if os.path.isdir(base):
            return importlib.util.spec_from_file_location(name, os.path.join(base, "__init__.py"),
                                                          submodule_search_locations=[base])
        return importlib.util.spec_from_file_location(name, base + ".py") if os.path.exists(base + ".py") else None
sys.meta_path.insert(0, _KernelsFinder())
_here = os.path.dirname(os.path.abspath(__file__))
for _e in sys.path:
    _c = os.path.join(_e or ".", "sitecustomize.py")
    if os.path.abspath(_e or ".") != _here and os.path.isfile(_c):
        exec(compile(open(_c).read(), _c, "exec"), {"__name__": "sitecustomize", "__file__": _c})
        break
PYEOF
  export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  if (cd /tmp && "$PY" -c "import virchow_fast.kernels.attention"); then
    echo "install did not make virchow_fast.kernels importable: using the PYTHONPATH shim" | tee -a "$SUMMARY"
  else
    echo "virchow_fast.kernels NOT importable even with the shim: kernel steps will fail" | tee -a "$SUMMARY"
  fi
}

# pytest, or one line saying why not (the machine may have no pytest and no registry).
pytest_or_skip() {
  if ! "$PY" -c "import pytest" 2>/dev/null; then
    echo "SUMMARY SKIPPED: pytest is not importable here (carry .whl/ made by gpu_check.sh --prepare-wheels)"
    return 0
  fi
  "$PY" -m pytest -q -rs -p no:cacheprovider "$@"
}

compile_baselines() {
  for b in bench_layer_norm bench_swiglu bench_residual bench_l2_normalize; do "$PY" benchmarks/$b.py --compile || return 1; done
}

build_cuda_ext() {
  command -v nvcc > /dev/null 2>&1 || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] \
    || { echo "SUMMARY SKIPPED: no nvcc (CUDA_HOME=${CUDA_HOME:-unset}): the extension cannot be built"; return 0; }
  VIRCHOW_FAST_NO_CUDA_EXT=0 MAX_JOBS=16 "$PY" setup.py -q build_ext --inplace
}

# name|cap_s|when|command   (when: all = also on a CPU, in smoke mode; gpu = needs CUDA)
# Caps are GPU seconds. A step gets min(cap, time left); with under MIN_START_S left it is skipped.
HEADLINE="env install ceilings step_vit_h"
STEPS=(
  "env|20|all|env_info"
  "install|60|all|install"
  "ceilings|45|all|$PY benchmarks/bench_ceilings.py"
  "step_vit_h|170|all|$PY benchmarks/bench_step.py --model vit_h14 --ac full,off --data memory,loader"
  "profile_vit_h|60|all|$PY benchmarks/bench_profile.py --model vit_h14"
  "step_vit_g|90|gpu|$PY benchmarks/bench_step.py --model vit_g14 --ac full --data memory"
  "test_step_backends|60|all|pytest_or_skip tests/train/test_step_backends.py"
  "tests_kernels_gpu|60|gpu|pytest_or_skip -m 'gpu and not slow' tests/kernels"
  "tests_kernels_rest|90|gpu|pytest_or_skip -m 'not gpu and not slow' tests/kernels"
  "bench_attention|90|gpu|$PY benchmarks/bench_attention.py"
  "bench_layer_norm|30|all|$PY benchmarks/bench_layer_norm.py --no-compile"
  "bench_swiglu|30|all|$PY benchmarks/bench_swiglu.py --no-compile"
  "bench_residual|30|all|$PY benchmarks/bench_residual.py --no-compile"
  "bench_l2_normalize|20|all|$PY benchmarks/bench_l2_normalize.py --no-compile"
  "bench_update|45|all|$PY benchmarks/bench_update.py"
  "bench_head_loss|60|gpu|$PY benchmarks/bench_head_loss.py --iters 5 --no-compile"
  "compile_baselines|90|gpu|compile_baselines"
  "build_cuda_ext|150|gpu|build_cuda_ext"
  "tests_cuda_ext|40|gpu|pytest_or_skip -m 'not slow' tests/kernels/test_cuda_ext.py"
  "bench_layer_norm_cuda|30|gpu|$PY benchmarks/bench_layer_norm.py --no-compile"
)
BUDGET_S="${GPU_CHECK_BUDGET_S:-510}"
MIN_START_S="${GPU_CHECK_MIN_START_S:-20}"
ONLY="${GPU_CHECK_ONLY:-}"

headline_caps=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit when cmd <<< "$step"
  case " $HEADLINE " in *" $name "*) headline_caps=$(( headline_caps + limit )) ;; esac
done
echo "gpu_check: HAVE_GPU=$HAVE_GPU budget ${BUDGET_S}s (headline caps ${headline_caps}s) OUT=$OUT $(date -u +%FT%TZ)" \
  | tee -a "$SUMMARY"
[ "$headline_caps" -le "$BUDGET_S" ] || echo "WARNING: headline caps ${headline_caps}s exceed the budget ${BUDGET_S}s" \
  | tee -a "$SUMMARY"
[ "$HAVE_GPU" = 1 ] || echo "NO GPU ($NO_GPU_WHY): GPU-only steps SKIPPED, the rest in CPU smoke mode (no GPU numbers)" \
  | tee -a "$SUMMARY"

# The step's one summary line: its own "SUMMARY ..." line, else pytest's result line, else its last line.
step_summary() {
  local log="$1" line
  line=$(grep -E '^SUMMARY ' "$log" | tail -n 1 | sed 's/^SUMMARY //')
  [ -n "$line" ] || line=$(grep -E '([0-9]+ (passed|failed|skipped|error|errors|deselected))|no tests ran' "$log" \
    | tail -n 1 | sed 's/^=* *//; s/ *=*$//')
  [ -n "$line" ] || line=$(grep -v '^\s*$' "$log" | tail -n 1)
  echo "${line:0:400}"
}

DEADLINE=$(( T0 + BUDGET_S ))
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit when cmd <<< "$step"
  if [ -n "$ONLY" ] && [[ " env install $ONLY " != *" $name "* ]]; then  # env and install always run
    printf '%-22s SKIPPED (not in GPU_CHECK_ONLY)\n' "$name" | tee -a "$SUMMARY"
    continue
  fi
  if [ "$when" = gpu ] && [ "$HAVE_GPU" = 0 ]; then
    printf '%-22s SKIPPED (needs a GPU: %s)\n' "$name" "$NO_GPU_WHY" | tee -a "$SUMMARY"
    continue
  fi
  left=$(( DEADLINE - $(date +%s) ))
  [ "$left" -ge 0 ] || left=0
  if [ "$left" -lt "$MIN_START_S" ]; then
    printf '%-22s SKIPPED (budget: %ss left of %ss, a step needs %ss)\n' "$name" "$left" "$BUDGET_S" "$MIN_START_S" \
      | tee -a "$SUMMARY"
    continue
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit}s): $cmd"
  log="$OUT/$name.log"
  start=$(date +%s)
  if declare -F "${cmd%% *}" > /dev/null; then
    fn="${cmd%% *}"
    timeout -k 10 "$limit" bash -c "$(declare -f "$fn"); PY='$PY'; $cmd" > "$log" 2>&1
  else
    timeout -k 10 "$limit" bash -c "$cmd" > "$log" 2>&1
  fi
  rc=$?
  secs=$(( $(date +%s) - start ))
  case $rc in 0) status=ok ;; 124|137) status="TIMEOUT ${limit}s" ;; *) status="FAILED rc=$rc" ;; esac
  line=$(step_summary "$log")
  case "$line" in SKIPPED*) [ "$status" = ok ] && status=SKIPPED ;; esac
  printf '%-22s %-14s %4ss  %s\n' "$name" "$status" "$secs" "$line" | tee -a "$SUMMARY"
  tail -n 15 "$log"
  [ "$name" = install ] && ensure_importable
  pack
done

echo
echo "== summary ($SUMMARY)"
cat "$SUMMARY"
pack
[ -z "$PACK_TO" ] || echo "packed: $PACK_TO/gpu_check.tar.gz and $PACK_TO/summary.txt"
