"""residual_weight kernel vs ops/reference.py: [gamma * W | gamma * b | 0], forward and backward
(dW, dgamma, dbias from the residual GEMM's weight gradient), at the model's widths and awkward ones;
and the identity it exists for: addmm(x, scale_rows(a), W_ext^T) = x + keep * gamma * (a W^T + b)."""
import pytest
import torch

from virchow_fast.ops import reference

rw = pytest.importorskip("virchow_fast.kernels.residual_weight")

TOL = {  # (atol, rtol) against fp32: one rounding of W_ext / dW; dgamma sums K products in fp32
    torch.float32: {"w": (1e-6, 1e-6), "dw": (1e-6, 1e-6), "dg": (1e-4, 1e-5), "db": (1e-6, 1e-6)},
    torch.bfloat16: {"w": (1e-2, 1e-2), "dw": (1e-2, 1e-2), "dg": (5e-2, 1e-2), "db": (1e-2, 1e-2)},
}


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("with_gamma, with_bias", [(True, True), (True, False), (False, True), (False, False)])
# (N, K): ViT-H's fc2 (1280 x 3416) cut to a few rows; K past one 4096 block; a tiny K
@pytest.mark.parametrize("shape", [(3, 3416), (2, 5000), (5, 24)], ids=lambda s: "x".join(map(str, s)))
def test_residual_weight(shape, with_gamma, with_bias, dtype, device, close):
    n, k = shape
    pad = 8
    w = torch.randn(n, k, device=device).to(dtype)
    g = (torch.rand(n, device=device) + 0.1).to(dtype) if with_gamma else None
    b = torch.randn(n, device=device).to(dtype) if with_bias else None
    dwe = torch.randn(n, k + pad, device=device).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (w, g, b) if t is not None]
    it = iter(leaves)
    wk, gk, bk = next(it), next(it) if with_gamma else None, next(it) if with_bias else None
    out = rw.residual_weight(wk, gk, bk, pad)
    grads = torch.autograd.grad(out, leaves, dwe)
    ref_leaves = [t.float().requires_grad_() for t in (w, g, b) if t is not None]
    it = iter(ref_leaves)
    wr, gr, br = next(it), next(it) if with_gamma else None, next(it) if with_bias else None
    ref = reference.residual_weight(wr, gr, br, pad)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dwe.float())
    assert out.shape == (n, k + pad) and out.dtype == dtype
    close(out, ref, TOL[dtype]["w"], "W_ext")
    assert not out[:, k + 1:].any()
    names = ["dw"] + (["dg"] if with_gamma else []) + (["db"] if with_bias else [])
    for name, got, exp, leaf in zip(names, grads, ref_grads, leaves, strict=True):
        assert got.dtype == leaf.dtype, name
        close(got, exp, TOL[dtype][name], name)


def test_residual_gemm_identity():
    """The block's rewrite of timm's branch end, on the reference ops (fp32)."""
    torch.manual_seed(0)
    t, kdim, n = 13, 24, 16
    x, a = torch.randn(t, n), torch.randn(t, kdim)
    w, b, g = torch.randn(n, kdim), torch.randn(n), torch.rand(n)
    seg = torch.tensor([0] * 5 + [1] * 4 + [2] * 4)
    keep = torch.tensor([2.0, 0.0, 1.25])
    expected = x + keep[seg][:, None] * g * (a @ w.t() + b)
    got = torch.addmm(x, reference.scale_rows(a, keep, seg, 8), reference.residual_weight(w, g, b, 8).t())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(pad=0), "multiple of 8"), (dict(pad=12), "multiple of 8"),
    (dict(gamma=torch.ones(3)), "gamma"), (dict(bias=torch.ones(5)), "bias"),
    (dict(weight=torch.ones(4)), r"\[N, K\]"),
])
def test_residual_weight_arguments(bad, match):
    args = dict(weight=torch.ones(4, 6), gamma=torch.ones(4), bias=torch.ones(4), pad=8)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        rw.residual_weight(**args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_block_drop_path_keeps_rng_stream_and_outputs(backend, monkeypatch):
    """A training Block with drop path 0.4 (its branch ends as residual GEMMs) draws the same random
    numbers as timm's unfused ``x + ls(branch(norm(x))) * keep[seg]`` (same drop decisions, same
    stream after it) and gives its outputs and gradients (fp32, either backend)."""
    from virchow_fast import ops
    from virchow_fast.config import ModelConfig
    from virchow_fast.model.vit import Block

    for op in ("attention", "layer_norm", "swiglu", "residual_weight"):
        monkeypatch.setenv(ops.TABLE[op].env, backend)
    torch.manual_seed(0)
    block = Block(ModelConfig(embed_dim=32, num_heads=2, mlp_hidden=24, layerscale_init=0.5), drop_path=0.4).train()
    lengths = torch.tensor([9, 4, 9, 4, 4, 9, 4, 4])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    x = torch.randn(int(lengths.sum()), 32)

    def timm_block(x):  # timm's Block on packed crops: norm, branch, LayerScale, drop path, add
        n, p = len(lengths), block.drop_path
        h = block.attn(block.norm1(x), cu, 9)
        k1 = (torch.rand(n) >= p).float() / (1 - p)
        x = x + block.ls1(h) * k1[seg].unsqueeze(-1)
        h = block.mlp(block.norm2(x))
        k2 = (torch.rand(n) >= p).float() / (1 - p)
        return x + block.ls2(h) * k2[seg].unsqueeze(-1), (k1, k2)

    params = [block.ls1.gamma, block.ls2.gamma, block.mlp.fc1.weight, block.mlp.fc2.weight, block.mlp.fc2.bias,
              block.attn.proj.weight, block.attn.proj.bias]
    results = []
    for fn in (lambda x: (block(x, cu, 9, seg), None), timm_block):
        torch.manual_seed(123)
        xi = x.clone().requires_grad_()
        out, keeps = fn(xi)
        grads = torch.autograd.grad(out.square().sum(), [xi] + params)
        results.append((out, grads, torch.rand(4), keeps))
    (out, grads, after, _), (out_r, grads_r, after_r, (k1, k2)) = results
    assert torch.equal(after, after_r)  # same number of draws: the stream after the block is unchanged
    assert (k1 == 0).any() and (k2 == 0).any() and (k1 > 0).any()  # some crops dropped, some kept
    torch.testing.assert_close(out, out_r, atol=1e-5, rtol=1e-5)
    for g, gr in zip(grads, grads_r, strict=True):
        torch.testing.assert_close(g, gr, atol=1e-4, rtol=1e-4)
