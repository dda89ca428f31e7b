"""The whole ViT with every op on the triton backend equals the torch backend, forward and backward.

Tiny config, packed multi-crop forward (2 global + 3 local crops, head dim 80 as in ViT-H); on the
CPU the kernels run in Triton's interpreter.
"""
import pytest
import torch

from virchow_fast import ops

pytest.importorskip("triton")
vit = pytest.importorskip("virchow_fast.model.vit")
from virchow_fast.config import ModelConfig  # noqa: E402

OPS = ("attention", "layer_norm", "swiglu", "residual_weight")


@pytest.fixture
def restore_ops():
    yield
    ops.configure({op: "auto" for op in OPS})


def _run(model, crops, weights, backend):
    ops.configure({op: backend for op in OPS})
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same drop-path draws for both backends
    outs = model.forward_packed(crops)
    # a random projection of every token (a plain sum would have an exactly zero gradient through
    # the final LayerNorm, leaving only rounding noise to compare)
    loss = sum((o.float() * w).sum() for o, w in zip(outs, weights, strict=True))
    loss.backward()
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_vit_triton_equals_torch(device, restore_ops):
    torch.manual_seed(0)
    cfg = ModelConfig(patch_size=14, img_size=42, embed_dim=160, depth=2, num_heads=2, mlp_hidden=96,
                      num_registers=4, layerscale_init=0.1, drop_path=0.5)  # drop path: the keep factor fused
    model = vit.VisionTransformer(cfg).to(device)
    # global crops: 3x3 patches + 5 prefix = 14 tokens; local crops: 2x2 + 5 = 9 tokens
    crops = [torch.randn(2, 3, 42, 42, device=device), torch.randn(3, 3, 28, 28, device=device)]
    weights = [torch.randn(2, 14, 160, device=device), torch.randn(3, 9, 160, device=device)]
    out_ref, grads_ref = _run(model, crops, weights, "torch")
    out, grads = _run(model, crops, weights, "triton")
    for o, r in zip(out, out_ref, strict=True):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads_ref.items():  # fp32 sums in a different order: compare relative to the norm
        err = (grads[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"
