"""Fused residual + LayerScale kernel vs ops/reference.py: forward, dx, dy, dgamma."""
import pytest
import torch

from virchow_fast.ops import reference

rls = pytest.importorskip("virchow_fast.kernels.layer_scale")

# (atol, rtol) against the fp32 reference, per dtype of the branch y (x is the fp32 residual
# stream or y's dtype): one rounding of z / dy; dgamma sums R rows.
TOL = {
    torch.float32: {"z": (1e-5, 1e-5), "grad": (1e-4, 1e-5)},
    torch.float16: {"z": (2e-3, 2e-3), "grad": (1e-2, 4e-3)},
    torch.bfloat16: {"z": (1.6e-2, 1.6e-2), "grad": (6e-2, 1.6e-2)},
}


def _check(shape, dtype, x_dtype, device, close):
    C = shape[-1]
    x = torch.randn(shape, device=device, dtype=x_dtype)
    y = torch.randn(shape, device=device, dtype=dtype)
    gamma = (torch.rand(C, device=device) + 0.5).requires_grad_()
    xk, yk = x.clone().requires_grad_(), y.clone().requires_grad_()
    z = rls.residual_layer_scale(xk, yk, gamma)
    dz = torch.randn_like(z)
    grads = torch.autograd.grad(z, [xk, yk, gamma], dz)
    xr, yr = x.clone().requires_grad_(), y.float().requires_grad_()
    zr = reference.residual_layer_scale(xr, yr, gamma)
    ref_grads = torch.autograd.grad(zr, [xr, yr, gamma], dz.float().to(zr.dtype))
    assert z.dtype == torch.promote_types(torch.promote_types(x_dtype, dtype), gamma.dtype)
    assert [g.dtype for g in grads] == [x_dtype, dtype, gamma.dtype]
    tol = TOL[dtype]
    close(z, zr, tol["z"], "z")
    for name, g, gr in zip(("dx", "dy", "dgamma"), grads, ref_grads):
        close(g, gr, tol["grad"], name)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [(1, 1280), (37, 1664), (2, 5, 100), (61, 3)], ids=lambda s: "x".join(map(str, s)))
def test_residual_layer_scale(shape, dtype, device, close):
    _check(shape, dtype, torch.float32, device, close)


@pytest.mark.usefixtures("poison_outputs")
def test_same_dtype_and_no_gamma(device, close):
    _check((13, 96), torch.bfloat16, torch.bfloat16, device, close)
    x, y = torch.randn(4, 8, device=device), torch.randn(4, 8, device=device)
    close(rls.residual_layer_scale(x, y, None), x + y, (0, 0), "z")


@pytest.mark.gpu  # larger shapes; skipped without CUDA (tests/conftest.py)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [(30528, 1280), (31808, 1664)], ids=lambda s: "x".join(map(str, s)))
def test_residual_layer_scale_gpu(shape, dtype, close):
    _check(shape, dtype, torch.float32, torch.device("cuda"), close)
