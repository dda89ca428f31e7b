"""SwiGLU kernel vs ops/reference.py: forward, dX and (with fc1's bias fused) dbias on the model's
widths and awkward ones."""
import pytest
import torch

from virchow_fast.ops import reference

sw = pytest.importorskip("virchow_fast.kernels.swiglu")

# (atol, rtol) against the fp32 reference, per input dtype: one rounding of the output; dbias sums
# R rows in fp32 (another summation order than the reference's), as the layer_scale tests' "grad".
TOL = {
    torch.float32: {"y": (1e-5, 1e-5), "dx": (1e-5, 1e-5), "dbias": (1e-4, 1e-5)},
    torch.float16: {"y": (2e-3, 2e-3), "dx": (4e-3, 4e-3), "dbias": (1e-2, 4e-3)},
    torch.bfloat16: {"y": (1.6e-2, 1.6e-2), "dx": (3e-2, 1.6e-2), "dbias": (6e-2, 1.6e-2)},
}
DTYPES = list(TOL)


def _check(shape, dtype, device, close):
    x = torch.randn(shape, device=device, dtype=dtype) * 2
    dy = torch.randn(*shape[:-1], shape[-1] // 2, device=device, dtype=dtype)
    xk = x.clone().requires_grad_()
    y = sw.swiglu(xk)
    (dx,) = torch.autograd.grad(y, xk, dy)
    xr = x.float().requires_grad_()
    yr = reference.swiglu(xr)
    (dxr,) = torch.autograd.grad(yr, xr, dy.float())
    assert y.dtype == dtype and y.shape == yr.shape
    close(y, yr, TOL[dtype]["y"], "y")
    close(dx, dxr, TOL[dtype]["dx"], "dx")


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# 6832 = ViT-H fc1 (2 x 3416), 10928 = ViT-G fc1 (2 x 5464); 2 x 1037: H not a multiple of the block.
@pytest.mark.parametrize("shape", [(1, 6832), (7, 10928), (3, 5, 2074), (13, 6), (1, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_swiglu(shape, dtype, device, close):
    _check(shape, dtype, device, close)


def _check_bias(shape, dtype, bias_dtype, device, close):
    x = torch.randn(shape, device=device, dtype=dtype) * 2
    b = torch.randn(shape[-1], device=device, dtype=bias_dtype)
    dy = torch.randn(*shape[:-1], shape[-1] // 2, device=device, dtype=dtype)
    xk, bk = x.clone().requires_grad_(), b.clone().requires_grad_()
    y = sw.swiglu(xk, bk)
    dx, db = torch.autograd.grad(y, [xk, bk], dy)
    xr, br = x.float().requires_grad_(), b.float().requires_grad_()
    yr = reference.swiglu(xr, br)
    dxr, dbr = torch.autograd.grad(yr, [xr, br], dy.float())
    assert y.dtype == dtype and y.shape == yr.shape
    assert dx.dtype == dtype and db.dtype == bias_dtype and db.shape == b.shape
    close(y, yr, TOL[dtype]["y"], "y")
    close(dx, dxr, TOL[dtype]["dx"], "dx")
    close(db, dbr, TOL[dtype]["dbias"], "dbias")


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# (37, 2074): more rows than programs (4 in the interpreter), so each program loops over several rows;
# (5, 6): 4 programs of 2 rows, the last one has none (its partial sums must still be zeros).
@pytest.mark.parametrize("shape", [(1, 6832), (7, 10928), (3, 5, 2074), (13, 6), (37, 2074), (5, 6), (1, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_swiglu_bias(shape, dtype, device, close):
    _check_bias(shape, dtype, dtype, device, close)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("shape", [(37, 2074), (7, 10928)], ids=lambda s: "x".join(map(str, s)))
def test_swiglu_fp32_bias_on_bf16(shape, device, close):
    """fc1's bias kept in fp32 while the activations are bf16: y and dx bf16, dbias fp32."""
    _check_bias(shape, torch.bfloat16, torch.float32, device, close)


@pytest.mark.usefixtures("poison_outputs")
def test_swiglu_bias_strided_rows(device, close):
    x = torch.randn(17, 3, 40, device=device)[:, 1]  # row stride 120
    b = torch.randn(40, device=device)
    close(sw.swiglu(x, b), reference.swiglu(x, b), TOL[torch.float32]["y"], "y")


@pytest.mark.usefixtures("poison_outputs")
def test_swiglu_strided_rows(device, close):
    x = torch.randn(17, 3, 40, device=device)[:, 1]  # row stride 120
    close(sw.swiglu(x), reference.swiglu(x), TOL[torch.float32]["y"], "y")


def test_swiglu_odd_width_rejected(device):
    with pytest.raises(ValueError):
        sw.swiglu(torch.randn(2, 5, device=device))


@pytest.mark.parametrize("shape", [(6,), (2, 12), (12, 1)], ids=lambda s: "x".join(map(str, s)))
def test_swiglu_bias_shape_rejected(shape, device):
    with pytest.raises(ValueError, match="bias"):
        sw.swiglu(torch.randn(2, 12, device=device), torch.randn(shape, device=device))


@pytest.mark.gpu  # larger shapes; skipped without CUDA (tests/conftest.py)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(30528, 6832), (30528, 10928), (4099, 2074)], ids=lambda s: "x".join(map(str, s)))
def test_swiglu_gpu(shape, dtype, close):
    _check(shape, dtype, torch.device("cuda"), close)
    _check_bias(shape, dtype, dtype, torch.device("cuda"), close)
