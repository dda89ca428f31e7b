#!/usr/bin/env bash
# The prepared script for a lent GPU (H200, no network, python 3.12, torch 2.11, triton 3.6, no DALI):
# install the package, run the GPU tests, run the kernel benchmarks; logs + JSON under $OUT.
# Budget on the GPU: ~7 minutes, capped by GPU_CHECK_BUDGET_S (default 510 s). Also runs on a CPU box
# (benchmarks in their smoke mode, GPU tests skipped by pytest) and says what it skipped.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # default OUT: benchmarks/results/gpu_check_<utc>
#
# To add a step, append one line to STEPS below:  "name|timeout_s|when|command"
#   when: all = always; gpu = only with CUDA (listed as SKIPPED on a CPU); cpu = only without CUDA.
# A step's stdout+stderr go to $OUT/<name>.log; a failing step does not stop the others; the
# summary (step, status, seconds) is printed at the end and written to $OUT/summary.txt.
set -u
cd "$(dirname "$0")/.."
# With OUT given (the device tool's folder, which takes back at most 8 files), every log and JSON
# goes to a scratch folder that is packed into $OUT/gpu_check.tar.gz after each step (so a run cut
# short still returns what it measured), with summary.txt beside it. Without OUT, results stay in
# benchmarks/results/gpu_check_<utc>/.
if [ -n "${OUT:-}" ]; then
  PACK_TO="$OUT"
  mkdir -p "$PACK_TO"
  export OUT="$(mktemp -d /tmp/gpu_check.XXXXXX)"
else
  PACK_TO=""
  export OUT="benchmarks/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)"
fi
mkdir -p "$OUT"
pack() {
  [ -n "$PACK_TO" ] || return 0
  tar czf "$PACK_TO/gpu_check.tar.gz" -C "$OUT" --exclude=_pyshim . && cp "$SUMMARY" "$PACK_TO/summary.txt"
}
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
PY="${PYTHON:-python}"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  HAVE_GPU=1
else
  HAVE_GPU=0
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
fi

# Editable install. PEP 660 (--use-pep517) is what maps kernels/ to virchow_fast.kernels; pip's
# legacy `setup.py develop` fallback (old pip, no pyproject.toml) does not. The CUDA extension is
# not built here unless GPU_CHECK_BUILD_CUDA_EXT=1 (nvcc builds can eat the whole budget).
install() {
  export VIRCHOW_FAST_NO_CUDA_EXT=$([ "${GPU_CHECK_BUILD_CUDA_EXT:-0}" = 1 ] && echo 0 || echo 1)
  "$PY" -m pip install --no-deps --no-build-isolation --use-pep517 -e . \
    || "$PY" -m pip install --no-deps --no-build-isolation -e .
  (cd /tmp && "$PY" -c "import virchow_fast.kernels.attention as m; print('virchow_fast.kernels at', m.__file__)")
}

versions() {
  "$PY" - <<'PYEOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for name in ("flash_attn", "liger_kernel", "apex"):
    try:
        __import__(name); print(name, "installed")
    except ImportError:
        print(name, "not installed")
PYEOF
}

# Last resort when no install worked (e.g. no setuptools in that Python): a sitecustomize on
# PYTHONPATH that maps virchow_fast.kernels to kernels/ (the import the editable install provides).
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
PYEOF
  export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  if (cd /tmp && "$PY" -c "import virchow_fast.kernels.attention"); then
    echo "install did not make virchow_fast.kernels importable: using the PYTHONPATH shim $shim" | tee -a "$SUMMARY"
  else
    echo "virchow_fast.kernels NOT importable even with the shim: kernel tests/benches will fail" | tee -a "$SUMMARY"
  fi
}

# Ordered by value: correctness on the GPU first, then the cheap kernel benches, then the step
# benchmark, the CUDA extension last (its nvcc build is the slowest step). Expected total on the
# H200: ~7 min; GPU_CHECK_BUDGET_S (default 510 s) caps it: a step gets at most the time left and
# steps past the budget are listed as SKIPPED, so the device call (10 min cap) always returns.
STEPS=(
  "versions|30|all|versions"
  "install|90|gpu|install"
  "tests_kernels|150|all|$PY -m pytest -q -rs -p no:cacheprovider -m 'not slow' tests/kernels"  # fwd+bwd vs reference, bf16, model shapes
  "bench_layer_norm|45|all|$PY benchmarks/bench_layer_norm.py"
  "bench_swiglu|45|all|$PY benchmarks/bench_swiglu.py"
  "bench_layer_scale|30|all|$PY benchmarks/bench_layer_scale.py"
  "bench_attention|100|all|$PY benchmarks/bench_attention.py"
  "bench_head_loss|100|gpu|$PY benchmarks/bench_head_loss.py --iters 5"  # 4 head shapes x eager / compile / fused
  "bench_step_smoke|120|cpu|$PY benchmarks/bench_step.py"  # tiny config, proves the script runs
  "bench_step_vit_h|120|gpu|$PY benchmarks/bench_step.py --models vit_h14 --batch 32,64 --ac full,off"
  "bench_step_vit_g|90|gpu|$PY benchmarks/bench_step.py --models vit_g14 --batch 16,32 --ac full --ops auto"
  "tests_block_inductor|60|gpu|$PY -m pytest -q -rs -p no:cacheprovider -m slow tests/kernels/test_block_compile.py"
  "build_cuda_ext|150|gpu|VIRCHOW_FAST_NO_CUDA_EXT=0 MAX_JOBS=16 $PY setup.py -q build_ext --inplace"  # csrc/ -> virchow_fast/_C*.so
  "tests_cuda_ext|40|gpu|$PY -m pytest -q -rs -p no:cacheprovider -m 'not slow' tests/kernels/test_cuda_ext.py"
  "bench_layer_norm_cuda|45|gpu|$PY benchmarks/bench_layer_norm.py"  # now with the built extension beside Triton and torch
)

SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
echo "gpu_check: HAVE_GPU=$HAVE_GPU OUT=$OUT $(date -u +%FT%TZ)" | tee -a "$SUMMARY"
[ "$HAVE_GPU" = 1 ] || echo "NO CUDA: GPU-only steps SKIPPED, GPU tests skipped by pytest, benchmarks in CPU smoke mode (no GPU numbers)" | tee -a "$SUMMARY"

BUDGET_S="${GPU_CHECK_BUDGET_S:-510}"
[ "$HAVE_GPU" = 1 ] || BUDGET_S=$(( BUDGET_S * 6 ))  # the CPU interpreter is slow; the budget is the GPU's
DEADLINE=$(( $(date +%s) + BUDGET_S ))
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit when cmd <<< "$step"
  if { [ "$when" = gpu ] && [ "$HAVE_GPU" = 0 ]; } || { [ "$when" = cpu ] && [ "$HAVE_GPU" = 1 ]; }; then
    printf '%-22s SKIPPED (%s only)\n' "$name" "$when" | tee -a "$SUMMARY"
    continue
  fi
  [ "$HAVE_GPU" = 1 ] || limit=$(( limit * 3 ))
  left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 15 ]; then
    printf '%-22s SKIPPED (budget of %ss spent)\n' "$name" "$BUDGET_S" | tee -a "$SUMMARY"
    continue
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit}s): $cmd"
  start=$(date +%s)
  if declare -F "$cmd" > /dev/null; then
    timeout "$limit" bash -c "$(declare -f "$cmd"); PY='$PY'; $cmd" > "$OUT/$name.log" 2>&1
  else
    timeout "$limit" bash -c "$cmd" > "$OUT/$name.log" 2>&1
  fi
  rc=$?
  secs=$(( $(date +%s) - start ))
  case $rc in 0) status=ok ;; 124) status="TIMEOUT after ${limit}s" ;; *) status="FAILED rc=$rc" ;; esac
  printf '%-22s %-22s %4ss  log: %s\n' "$name" "$status" "$secs" "$OUT/$name.log" | tee -a "$SUMMARY"
  tail -n 25 "$OUT/$name.log"
  [ "$name" = install ] && ensure_importable
  grep -E "SKIPPED|skipped" "$OUT/$name.log" | head -n 30 >> "$OUT/skipped.txt" 2>/dev/null || true
  pack
done

echo
echo "== summary ($SUMMARY)"
cat "$SUMMARY"
echo "what was skipped: $OUT/skipped.txt"
pack
[ -z "$PACK_TO" ] || echo "packed: $PACK_TO/gpu_check.tar.gz"
