"""Fused residual + LayerNorm kernel vs ops/reference.py: z, h and every gradient (x, y, gamma,
branch bias, LayerNorm weight and bias), with and without LayerScale, drop path and biases."""
import pytest
import torch

from virchow_fast.ops import reference

rn = pytest.importorskip("virchow_fast.kernels.residual_norm")

# (atol, rtol) against the fp32 reference, per dtype of the residual stream and branch: z and h
# are one rounding each (h normalises the rounded z, as the reference does); the [C] gradients sum
# R rows (the LayerNorm test's tolerances).
TOL = {
    torch.float32: {"out": (1e-5, 1e-5), "grad": (1e-4, 1e-4), "sum": (1e-4, 1e-4)},
    torch.float16: {"out": (4e-3, 4e-3), "grad": (8e-3, 8e-3), "sum": (2e-2, 1e-2)},
    torch.bfloat16: {"out": (3e-2, 2e-2), "grad": (6e-2, 3e-2), "sum": (1e-1, 2e-2)},
}
NAMES = ("dx", "dy", "dgamma", "dbias", "dweight", "dln_bias")


def _case(shape, dtype, device, gamma_on, keep_on, bias_on, ln_bias_on=True, seed=0):
    torch.manual_seed(seed)
    C, R = shape[-1], int(torch.tensor(shape[:-1]).prod())
    x = torch.randn(shape, device=device, dtype=dtype)
    y = torch.randn(shape, device=device, dtype=dtype)
    # parameters in the stream's dtype, as FSDP's compute copies are
    p = lambda t: t.to(dtype).requires_grad_()  # noqa: E731
    gamma = p(torch.rand(C, device=device) + 0.5) if gamma_on else None
    bias = p(torch.randn(C, device=device) * 0.3) if bias_on else None
    w = p(torch.randn(C, device=device) * 0.5 + 1)
    lnb = p(torch.randn(C, device=device) * 0.1) if ln_bias_on else None
    keep = seg = None
    if keep_on:
        keep = ((torch.rand(4, device=device) >= 0.4).float() / 0.6).to(dtype)
        keep[0], keep[1] = 0.0, 1 / 0.6  # at least one dropped and one kept crop
        seg = torch.sort(torch.randint(0, 4, (R,), device=device)).values
    return x, y, gamma, keep, seg, bias, w, lnb


def _check(shape, dtype, device, close, gamma_on=True, keep_on=False, bias_on=True, ln_bias_on=True):
    x, y, gamma, keep, seg, bias, w, lnb = _case(shape, dtype, device, gamma_on, keep_on, bias_on, ln_bias_on)
    params = [p for p in (gamma, bias, w, lnb) if p is not None]
    names = ["dx", "dy"] + [n for n, p in zip(NAMES[2:], (gamma, bias, w, lnb), strict=True) if p is not None]
    dz_out, dh_out = torch.randn_like(x), torch.randn_like(x)  # z goes on as the residual stream, h to the MLP

    xk, yk = x.clone().requires_grad_(), y.clone().requires_grad_()
    z, h = rn.residual_layer_norm(xk, yk, gamma, keep, seg, bias, w, lnb, 1e-6)
    grads = torch.autograd.grad([z, h], [xk, yk] + params, [dz_out, dh_out])

    # the spec: the reference ops in fp32 on the same (rounded) inputs; z is rounded to the kernel's
    # output dtype before the LayerNorm, as storing it does
    f = lambda t: None if t is None else t.float()  # noqa: E731
    xr, yr = x.float().requires_grad_(), y.float().requires_grad_()
    zr = reference.residual_layer_scale(xr, yr, f(gamma), f(keep), seg, f(bias))
    zr_stored = zr + (zr.detach().to(z.dtype).float() - zr.detach())
    hr = reference.layer_norm(zr_stored, f(w), f(lnb), 1e-6)
    ref_grads = torch.autograd.grad([zr, hr], [xr, yr] + params, [dz_out.float(), dh_out.float()])

    tol = TOL[dtype]
    assert z.dtype == h.dtype == dtype and z.shape == h.shape == x.shape
    close(z, zr, tol["out"], "z")
    close(h, hr, tol["out"], "h")
    assert [g.dtype for g in grads[:2]] == [dtype, dtype]
    assert [g.dtype for g in grads[2:]] == [q.dtype for q in params]
    for name, g, gr in zip(names, grads, ref_grads, strict=True):
        close(g, gr, tol["grad"] if name in ("dx", "dy") else tol["sum"], name)
    if keep_on:  # dropped crops: z is exactly x, dy exactly 0
        dropped = (keep[seg] == 0).view(shape[:-1])
        assert dropped.any() and torch.equal(z[dropped], x[dropped]) and not grads[1][dropped].any()


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [(1, 1280), (37, 1664), (2, 5, 100), (61, 3)], ids=lambda s: "x".join(map(str, s)))
def test_residual_layer_norm(shape, dtype, device, close):
    _check(shape, dtype, device, close)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("flags", [(True, True, True, True), (False, True, True, True), (True, False, False, False),
                                   (False, False, False, True), (False, True, False, False)],
                         ids=lambda f: "-".join(n for n, on in zip(("gamma", "keep", "bias", "lnbias"), f, strict=True)
                                                if on) or "plain")
def test_residual_layer_norm_optional_parts(flags, device, close):
    gamma_on, keep_on, bias_on, ln_bias_on = flags
    _check((37, 96), torch.float32, device, close, gamma_on, keep_on, bias_on, ln_bias_on)
    _check((13, 40), torch.bfloat16, device, close, gamma_on, keep_on, bias_on, ln_bias_on)


def test_residual_layer_norm_bad_shapes(device):
    x = torch.randn(6, 8, device=device)
    with pytest.raises(ValueError, match="residual_layer_norm: LayerNorm weight"):
        rn.residual_layer_norm(x, x, None, None, None, None, torch.ones(7, device=device), None, 1e-6)
    with pytest.raises(ValueError, match="residual_layer_norm: x"):
        rn.residual_layer_norm(x, x, None, None, None, torch.ones(5, device=device), torch.ones(8, device=device),
                               None, 1e-6)


@pytest.mark.gpu  # larger shapes; skipped without CUDA (tests/conftest.py)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [(30528, 1280), (23856, 1664)], ids=lambda s: "x".join(map(str, s)))
def test_residual_layer_norm_gpu(shape, dtype, close):
    _check(shape, dtype, torch.device("cuda"), close, keep_on=True)
