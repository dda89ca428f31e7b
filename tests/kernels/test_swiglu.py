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


def _keep_pad_case(rows, H, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, 2 * H, generator=g) * 2).to(device, dtype)
    b = torch.randn(2 * H, generator=g).to(device, dtype)
    seg = torch.sort(torch.randint(0, 4, (rows,), generator=g)).values.to(device)
    keep = torch.tensor([0.0, 2.0, 1.25, 2.0], device=device)  # a dropped crop, and two factors
    return x, b, seg, keep


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pad, with_keep", [(8, True), (8, False), (0, True), (16, True)])
def test_swiglu_rows_for_the_residual_gemm(pad, with_keep, dtype, device, close):
    """keep / seg_ids / pad: rows [k * y, k, 0...] (k = keep[seg]), as the block's fc2 GEMM takes them;
    the gradient of the pad columns is ignored and the dropped crop's rows get exactly zero gradient."""
    rows, H = 11, 1037  # H not a multiple of the block; 4 crops of a few rows each
    x, b, seg, keep = _keep_pad_case(rows, H, device, dtype)
    k, s = (keep, seg) if with_keep else (None, None)
    dy = torch.randn(rows, H + pad, device=device, dtype=dtype)
    xk, bk = x.clone().requires_grad_(), b.clone().requires_grad_()
    y = sw.swiglu(xk, bk, k, s, pad)
    dx, db = torch.autograd.grad(y, [xk, bk], dy)
    xr, br = x.float().requires_grad_(), b.float().requires_grad_()
    yr = reference.swiglu(xr, br, k, s, pad)
    dxr, dbr = torch.autograd.grad(yr, [xr, br], dy.float())
    assert y.shape == (rows, H + pad) and y.dtype == dtype
    close(y, yr, TOL[dtype]["y"], "y")
    close(dx, dxr, TOL[dtype]["dx"], "dx")
    close(db, dbr, TOL[dtype]["dbias"], "dbias")
    if pad:  # the bias column and the zeros, exactly
        col = keep[seg] if with_keep else torch.ones(rows, device=device)
        assert torch.equal(y[:, H].float(), col.float())
        assert not y[:, H + 1:].any()
    if with_keep:
        assert not dx[seg == 0].any()  # keep 0: no gradient at all
        # with keep: the reference's rows equal the plain op's rows times the factor
        plain = reference.swiglu(x.float(), b.float())
        close(yr[:, :H], plain * keep[seg][:, None], TOL[torch.float32]["y"], "keep * y")


@pytest.mark.parametrize("bad, match", [
    (dict(pad=4), "multiple of 8"), (dict(pad=-8), "multiple of 8"),
    (dict(keep="k"), "without seg_ids"), (dict(seg_ids="s"), "without keep"),
    (dict(keep="k", seg_ids="short"), "crop ids"),
])
def test_swiglu_keep_pad_arguments(bad, match, device):
    x, b, seg, keep = _keep_pad_case(5, 16, device, torch.float32)
    args = dict(keep=None, seg_ids=None, pad=0)
    for key, value in bad.items():
        args[key] = {"k": keep, "s": seg, "short": seg[:3]}.get(value, value) if isinstance(value, str) else value
    with pytest.raises(ValueError, match=match):
        sw.swiglu(x, b, **args)
