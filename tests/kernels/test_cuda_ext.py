"""The CUDA extension virchow_fast._C (csrc/): it builds, it links against the CUDA torch wheel, it
registers its ops with fake kernels, setup.py skips it cleanly; on a GPU its kernels match
ops/reference.py.

The build tests are marked ``slow`` (nvcc for sm_90a on two CPU cores: minutes). The GPU tests
skip visibly without a GPU or without the built extension (``python setup.py build_ext --inplace``).
"""
import glob
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from virchow_fast.ops import reference as ref

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import csrc_build  # noqa: E402  (build helper beside setup.py)

NVCC = os.path.join(csrc_build.cuda_home() or "/usr/local/cuda", "bin", "nvcc")
needs_nvcc = pytest.mark.skipif(not os.path.exists(NVCC) or torch.version.cuda is None,
                                reason="needs nvcc (CUDA_HOME) and a CUDA build of torch")


# ---------------------------------------------------------------------------------------------
# build (CPU machine)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("source", sorted(glob.glob(str(ROOT / "csrc" / "*.cu"))), ids=os.path.basename)
def test_nvcc_compiles_for_sm90a(source, tmp_path):
    """Each .cu is plain CUDA (no torch headers) and compiles for sm_90a; ptxas spills registers
    only in the widest LayerNorm backward instantiations (2048 columns: 8 vectors of 8 bf16 /
    fp16, 16 of 4 fp32), never at the model widths (1280, 1664)."""
    cmd = [NVCC, "-std=c++17", "-O3", "--use_fast_math", "-gencode=arch=compute_90a,code=sm_90a",
           "-Xptxas", "-warn-spills", "-c", source, "-o", str(tmp_path / "out.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    spilling = re.findall(r"spilled to local memory in function '([^']+)'", res.stderr)
    for name in spilling:  # mangled ln_*_kernel<T, VEC, NV>: ...ILi<VEC>ELi<NV>E...
        vec, nv = map(int, re.search(r"Li(\d+)ELi(\d+)E", name).groups())
        assert "ln_bwd_kernel" in name and nv == (8 if vec >= 8 else 16), name


_IMPORT_CHECK = r"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("virchow_fast._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec); sys.modules["virchow_fast._C"] = mod; spec.loader.exec_module(mod)
from virchow_fast.ops import cuda_ops
names = ["layer_norm_fwd", "layer_norm_bwd", "softmax_center", "sinkhorn_col_sums", "sinkhorn_normalize_rows_"]
assert all(hasattr(torch.ops.virchow_fast_cuda, n) for n in names)
# fake kernels: shapes on the meta device, autograd through layer_norm_fwd
x = torch.empty(3, 7, 1280, device="meta", dtype=torch.bfloat16, requires_grad=True)
w = torch.empty(1280, device="meta", requires_grad=True)
b = torch.empty(1280, device="meta", requires_grad=True)
y = cuda_ops.layer_norm(x, w, b, 1e-6)
assert y.shape == x.shape and y.dtype == x.dtype
gx, gw, gb = torch.autograd.grad(y.sum(), [x, w, b])
assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape
p = torch.ops.virchow_fast_cuda.softmax_center(torch.empty(4, 96, device="meta"), torch.empty(96, device="meta"), 0.04)
assert p.shape == (4, 96) and p.dtype == torch.float32
assert torch.ops.virchow_fast_cuda.sinkhorn_col_sums(p).shape == (96,)
from virchow_fast.ops.table import TABLE
assert sorted(n for n, op in TABLE.items() if op.cuda) == ["layer_norm", "prototype_loss", "teacher_probs"]
assert all(hasattr(cuda_ops, op.cuda.split(":")[1]) for op in TABLE.values() if op.cuda)
print("ok")
"""


@pytest.mark.slow
@needs_nvcc
def test_setup_builds_and_extension_links(built_extension):
    """setup.py build_ext (csrc_build: CUDA_HOME, nvidia/cu13 includes, sm_90a + sm_80) links a
    virchow_fast._C that imports without a GPU and registers every op with its fake kernel."""
    blob = pathlib.Path(built_extension).read_bytes()
    assert b"sm_90a" in blob and b"sm_80" in blob
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, built_extension], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-4000:]


def test_skip_on_request(monkeypatch, capsys):
    monkeypatch.setenv("VIRCHOW_FAST_NO_CUDA_EXT", "1")
    assert csrc_build.cuda_extension() == ([], {})
    assert "VIRCHOW_FAST_NO_CUDA_EXT=1" in capsys.readouterr().err


def test_skip_without_cuda_torch(monkeypatch, capsys):
    monkeypatch.delenv("VIRCHOW_FAST_NO_CUDA_EXT", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert csrc_build.cuda_extension() == ([], {})
    assert "torch has no CUDA" in capsys.readouterr().err


def test_skip_without_torch(tmp_path):
    """An isolated build environment without torch: setup.py's helper returns nothing, one message."""
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); import csrc_build; "
            "print(csrc_build.cuda_extension())")
    env = {k: v for k, v in os.environ.items() if k != "VIRCHOW_FAST_NO_CUDA_EXT"}
    res = subprocess.run([sys.executable, "-c", code, str(ROOT)], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "([], {})", res.stderr
    assert res.stderr.count("not building the CUDA extension") == 1


def test_wheel_includes_found():
    if torch.version.cuda is None:
        pytest.skip("CPU torch: no nvidia wheels")
    assert any(os.path.exists(os.path.join(p, "cublas_v2.h")) for p in csrc_build.wheel_cuda_includes())


# ---------------------------------------------------------------------------------------------
# kernels against the reference (GPU)
# ---------------------------------------------------------------------------------------------

def _cuda_ops():
    if not torch.cuda.is_available():
        pytest.skip("no GPU: CUDA kernels not run")
    try:
        from virchow_fast.ops import cuda_ops
    except ImportError as exc:
        pytest.skip(f"virchow_fast._C not built: {exc}")
    return cuda_ops


LN_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
          torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, cols", [(1, 1280), (261 * 3, 1280), (54 * 7, 1664), (13, 192), (17, 100), (5, 2048)])
def test_layer_norm_matches_reference(dtype, rows, cols):
    cuda_ops = _cuda_ops()
    torch.manual_seed(rows + cols)
    x = (torch.randn(rows, cols, device="cuda") * 3 + 1).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(cols, device="cuda")).requires_grad_()
    b = (0.1 * torch.randn(cols, device="cuda")).requires_grad_()
    dy = torch.randn(rows, cols, device="cuda").to(dtype)
    y = cuda_ops.layer_norm(x, w, b, 1e-6)
    grads = torch.autograd.grad(y, [x, w, b], dy)
    x32 = x.detach().float().requires_grad_()
    w32, b32 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y_r = ref.layer_norm(x32, w32, b32, 1e-6)
    grads_r = torch.autograd.grad(y_r, [x32, w32, b32], dy.float())
    torch.testing.assert_close(y.float(), y_r, **LN_TOL[dtype])
    for got, want in zip(grads, grads_r, strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float(), want, rtol=LN_TOL[dtype]["rtol"], atol=LN_TOL[dtype]["atol"] * scale)


@pytest.mark.gpu
def test_layer_norm_opcheck():
    _cuda_ops()
    x = torch.randn(37, 1280, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(1280, device="cuda"), torch.randn(1280, device="cuda")
    torch.library.opcheck(torch.ops.virchow_fast_cuda.layer_norm_fwd, (x, w, b, 1e-6))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, k", [(1, 4096), (64, 65536), (13, 1001)])
def test_softmax_center_matches_reference(dtype, m, k):
    _cuda_ops()
    logits = torch.randn(m, k, device="cuda").clamp(-1, 1).to(dtype)
    center = 0.1 * torch.randn(k, device="cuda")
    got = torch.ops.virchow_fast_cuda.softmax_center(logits, center, 0.04)
    torch.testing.assert_close(got, ref.softmax_center(logits, center, 0.04), rtol=1e-4, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("m, k", [(64, 65536), (7, 1001), (300, 4096)])
def test_sinkhorn_matches_reference(m, k):
    cuda_ops = _cuda_ops()
    logits = torch.randn(m, k, device="cuda").clamp(-1, 1)
    torch.testing.assert_close(cuda_ops.sinkhorn_knopp(logits, 0.04, 3), ref.sinkhorn_knopp(logits, 0.04, 3),
                               rtol=1e-4, atol=1e-9)
    doubled = []
    got = cuda_ops.sinkhorn_knopp(logits, 0.04, 3, all_reduce=lambda t: (doubled.append(1), t.mul_(2)),
                                  total_rows=2 * m)
    want = ref.sinkhorn_knopp(torch.cat([logits, logits]), 0.04, 3)[:m]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    assert len(doubled) == 4  # the total and 3 column sums, as the reference


@pytest.mark.gpu
def test_centering_through_ops(monkeypatch):
    _cuda_ops()
    from virchow_fast import ops
    monkeypatch.setenv("VIRCHOW_FAST_TEACHER_PROBS", "cuda")
    z = torch.nn.functional.normalize(torch.randn(32, 256, device="cuda"), dim=1)
    w = torch.nn.functional.normalize(torch.randn(8192, 256, device="cuda"), dim=1)
    got = ops.teacher_probs(z, w, 0.04, "sinkhorn")
    torch.testing.assert_close(got, ref.teacher_probs(z, w, 0.04, "sinkhorn"), rtol=1e-4, atol=1e-9)
