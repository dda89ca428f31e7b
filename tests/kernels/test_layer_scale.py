"""Fused residual + LayerScale (+ branch bias) kernel vs ops/reference.py: forward, dx, dy, dgamma, dbias."""
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


def _check(shape, dtype, x_dtype, device, close, bias_on=False):
    C = shape[-1]
    x = torch.randn(shape, device=device, dtype=x_dtype)
    y = torch.randn(shape, device=device, dtype=dtype)
    gamma = (torch.rand(C, device=device) + 0.5).requires_grad_()
    params = [gamma]
    bias = None
    if bias_on:  # in the residual stream's dtype, as the model's parameters
        bias = torch.randn(C, device=device, dtype=x_dtype).requires_grad_()
        params.append(bias)
    xk, yk = x.clone().requires_grad_(), y.clone().requires_grad_()
    z = rls.residual_layer_scale(xk, yk, gamma, bias=bias)
    dz = torch.randn_like(z)
    grads = torch.autograd.grad(z, [xk, yk] + params, dz)
    xr, yr = x.clone().requires_grad_(), y.float().requires_grad_()
    zr = reference.residual_layer_scale(xr, yr, gamma, bias=bias)
    ref_grads = torch.autograd.grad(zr, [xr, yr] + params, dz.float().to(zr.dtype))
    assert z.dtype == torch.promote_types(torch.promote_types(x_dtype, dtype), gamma.dtype)
    assert [g.dtype for g in grads] == [x_dtype, dtype] + [p.dtype for p in params]
    tol = TOL[dtype]
    close(z, zr, tol["z"], "z")
    for name, g, gr in zip(("dx", "dy", "dgamma", "dbias")[:len(grads)], grads, ref_grads, strict=True):
        close(g, gr, tol["grad"], name)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [(1, 1280), (37, 1664), (2, 5, 100), (61, 3)], ids=lambda s: "x".join(map(str, s)))
def test_residual_layer_scale(shape, dtype, device, close):
    _check(shape, dtype, torch.float32, device, close)


@pytest.mark.usefixtures("poison_outputs")
def test_same_dtype_and_no_gamma(device, close):
    _check((13, 96), torch.bfloat16, torch.bfloat16, device, close)
    # (no gamma and no keep is a plain add, nothing to fuse: the op returns x + y without a kernel;
    # the kernel's no-gamma path, with a keep factor, is checked against the reference below)


def _keep_case(shape, dtype, device, seed, gamma_on=True):
    torch.manual_seed(seed)
    C, R = shape[-1], int(torch.tensor(shape[:-1]).prod())
    x = torch.randn(shape, device=device, dtype=dtype)
    y = torch.randn(shape, device=device, dtype=dtype)
    gamma = (torch.rand(C, device=device) + 0.5).requires_grad_() if gamma_on else None
    keep = ((torch.rand(4, device=device) >= 0.4).to(dtype) / 0.6)  # drop path 0.4, as the shipped configs
    keep[0], keep[1] = 0.0, 1 / 0.6  # at least one dropped and one kept crop
    seg = torch.sort(torch.randint(0, 4, (R,), device=device)).values
    return x, y, gamma, keep, seg


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("gamma_on", [True, False], ids=["gamma", "no_gamma"])
@pytest.mark.parametrize("shape", [(37, 1664), (2, 5, 100)], ids=lambda s: "x".join(map(str, s)))
def test_drop_path_keep_factor(shape, dtype, gamma_on, device, close):
    """Per-crop keep factor (0 or 1 / (1 - p)) fused: z, dx, dy, dgamma against the reference,
    dropped crops get exactly x and zero dy."""
    x, y, gamma, keep, seg = _keep_case(shape, dtype, device, 3, gamma_on)
    xk, yk = x.clone().requires_grad_(), y.clone().requires_grad_()
    z = rls.residual_layer_scale(xk, yk, gamma, keep, seg)
    dz = torch.randn_like(z)
    params = [xk, yk] + ([gamma] if gamma_on else [])
    grads = torch.autograd.grad(z, params, dz)
    xr, yr = x.float().requires_grad_(), y.float().requires_grad_()
    zr = reference.residual_layer_scale(xr, yr, gamma, keep.float(), seg)
    ref_grads = torch.autograd.grad(zr, [xr, yr] + ([gamma] if gamma_on else []), dz.float())
    tol = TOL[dtype]
    close(z, zr, tol["z"], "z")
    for name, g, gr in zip(("dx", "dy", "dgamma")[:len(grads)], grads, ref_grads, strict=True):
        close(g, gr, tol["grad"], name)
    dropped = (keep[seg] == 0).view(shape[:-1])
    assert dropped.any() and (~dropped).any()
    assert torch.equal(z[dropped], x[dropped].to(z.dtype)) and not grads[1][dropped].any()


def test_drop_path_bad_seg_ids(device):
    x = torch.randn(6, 8, device=device)
    with pytest.raises(ValueError, match="seg_ids"):
        rls.residual_layer_scale(x, x, None, torch.ones(2, device=device), torch.zeros(5, dtype=torch.long))


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("keep_on", [True, False], ids=["keep", "no_keep"])
@pytest.mark.parametrize("gamma_on", [True, False], ids=["gamma", "no_gamma"])
@pytest.mark.parametrize("shape", [(1, 1280), (37, 1664), (2, 5, 100), (61, 3)], ids=lambda s: "x".join(map(str, s)))
def test_branch_bias(shape, dtype, gamma_on, keep_on, device, close):
    """The branch's output bias fused: z = x + keep[seg] * gamma * (y + b); z, dx, dy, dgamma and
    dbias (the column sums of dy) against the fp32 reference, bias alone (no gamma, no keep)
    included. Dropped crops still get exactly x and zero dy."""
    x, y, gamma, keep, seg = _keep_case(shape, dtype, device, 5, gamma_on)
    C, R = shape[-1], seg.numel()
    seg[0] = 0  # a dropped crop (keep[0] = 0) and, with more than one row, a kept one (keep[1] = 1 / 0.6)
    if R > 1:
        seg[-1] = 1
    if not keep_on:
        keep, seg = None, None
    bias = torch.randn(C, device=device, dtype=dtype).requires_grad_()
    xk, yk = x.clone().requires_grad_(), y.clone().requires_grad_()
    params = ([gamma] if gamma_on else []) + [bias]
    z = rls.residual_layer_scale(xk, yk, gamma, keep, seg, bias)
    dz = torch.randn_like(z)
    grads = torch.autograd.grad(z, [xk, yk] + params, dz)
    xr, yr, br = x.float().requires_grad_(), y.float().requires_grad_(), bias.detach().float().requires_grad_()
    zr = reference.residual_layer_scale(xr, yr, gamma, None if keep is None else keep.float(), seg, br)
    ref_grads = torch.autograd.grad(zr, [xr, yr] + params[:-1] + [br], dz.float())
    dt = torch.promote_types(dtype, torch.float32 if gamma_on else dtype)
    assert z.dtype == dt and [g.dtype for g in grads] == [dtype, dtype] + [p.dtype for p in params]
    tol = TOL[dtype]
    close(z, zr, tol["z"], "z")
    names = ("dx", "dy") + (("dgamma",) if gamma_on else ()) + ("dbias",)
    for name, g, gr in zip(names, grads, ref_grads, strict=True):
        close(g, gr, tol["grad"], name)
    if keep_on:
        dropped = (keep[seg] == 0).view(shape[:-1])
        assert dropped.any() and (R == 1 or (~dropped).any())
        assert torch.equal(z[dropped], x[dropped].to(z.dtype)) and not grads[1][dropped].any()


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_branch_bias_fp32_stream(dtype, device, close):
    """fp32 residual stream and parameters, branch y in any dtype (fsdp off under autocast)."""
    _check((37, 1664), dtype, torch.float32, device, close, bias_on=True)


def test_bad_bias_shape(device):
    x = torch.randn(6, 8, device=device)
    with pytest.raises(ValueError, match="bias"):
        rls.residual_layer_scale(x, x, None, bias=torch.zeros(7, device=device))
    with pytest.raises(ValueError, match="bias"):
        rls.residual_layer_scale(x, x, torch.ones(8, device=device), bias=torch.zeros(1, 8, device=device))


@pytest.mark.gpu  # larger shapes; skipped without CUDA (tests/conftest.py)
@pytest.mark.parametrize("bias_on", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [(30528, 1280), (31808, 1664)], ids=lambda s: "x".join(map(str, s)))
def test_residual_layer_scale_gpu(shape, dtype, bias_on, close):
    _check(shape, dtype, torch.float32, torch.device("cuda"), close, bias_on)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_block_drop_path_keeps_rng_stream_and_outputs(backend, monkeypatch):
    """A training Block with drop path 0.4 through the fused op draws the same random numbers as
    the unfused ``x + ls(y) * keep[seg]`` it replaces (same drop decisions, same stream after it)
    and gives its outputs and gradients: bit-exact on the torch backend, at fp32 kernel tolerance
    on triton."""
    from virchow_fast.config import ModelConfig
    from virchow_fast.model.vit import Block

    monkeypatch.setenv("VIRCHOW_FAST_RESIDUAL_LAYER_SCALE", backend)
    torch.manual_seed(0)
    block = Block(ModelConfig(embed_dim=32, num_heads=2, mlp_hidden=24, layerscale_init=0.5), drop_path=0.4).train()
    lengths = torch.tensor([9, 4, 9, 4, 4, 9, 4, 4])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    x = torch.randn(int(lengths.sum()), 32)

    def old_block(x):  # the unfused residual of the previous implementation, draws in the same order
        n, p = len(lengths), block.drop_path
        h = block.attn(block.norm1(x), cu, 9)
        k1 = (torch.rand(n) >= p).to(x.dtype) / (1 - p)
        x = x + block.ls1(h) * k1[seg].unsqueeze(-1)
        h = block.mlp(block.norm2(x))
        k2 = (torch.rand(n) >= p).to(x.dtype) / (1 - p)
        return x + block.ls2(h) * k2[seg].unsqueeze(-1), (k1, k2)

    results = []
    for fn in (lambda x: (block(x, cu, 9, seg), None), old_block):
        torch.manual_seed(123)
        xi = x.clone().requires_grad_()
        out, keeps = fn(xi)
        grads = torch.autograd.grad(out.square().sum(), [xi, block.ls1.gamma, block.ls2.gamma, block.mlp.fc1.weight])
        results.append((out, grads, torch.rand(4), keeps))
    (out, grads, after, _), (out_r, grads_r, after_r, (k1, k2)) = results
    assert torch.equal(after, after_r)  # same number of draws: the stream after the block is unchanged
    assert (k1 == 0).any() and (k2 == 0).any() and (k1 > 0).any()  # some crops dropped, some kept
    tol = dict(atol=0, rtol=0) if backend == "torch" else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, out_r, **tol)
    for g, gr in zip(grads, grads_r, strict=True):
        torch.testing.assert_close(g, gr, **tol)
