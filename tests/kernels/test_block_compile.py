"""The Triton kernels as torch custom ops: opcheck, and a transformer block under
torch.compile(fullgraph=True) with every op on the triton backend equal to eager torch.

On the CPU the kernels run in Triton's interpreter inside the compiled graph. Two backends:
aot_eager (Dynamo + AOTAutograd through our fake and autograd registrations, a few seconds) and
inductor, which also works on the CPU (gcc) but costs ~20-30 s there, so it is marked `slow`
(deselect with -m "not slow").
"""
import pytest
import torch

from virchow_fast import ops

pytest.importorskip("triton")
from virchow_fast.kernels import attention as attn_k  # noqa: E402
from virchow_fast.kernels import layer_norm as ln_k  # noqa: E402
from virchow_fast.kernels import residual_weight as rw_k  # noqa: E402
from virchow_fast.kernels import swiglu as sw_k  # noqa: E402

TRITON = {"attention": "triton", "layer_norm": "triton", "swiglu": "triton", "residual_weight": "triton"}
TORCH = {op: "torch" for op in TRITON}


@pytest.fixture
def restore_ops():
    torch._dynamo.reset()
    yield
    ops.configure({op: "auto" for op in TRITON})
    torch._dynamo.reset()


def test_opcheck_custom_ops(device):
    """Schema, fake (meta) functions, autograd registration and AOT dispatch of every custom op."""
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    qkv = torch.randn(12, 3, 2, 24, device=device, requires_grad=True)
    torch.library.opcheck(attn_k._attention_fwd, (qkv, cu, 7, 0.2))
    x = torch.randn(7, 40, device=device, requires_grad=True)
    w, b = torch.randn(40, device=device, requires_grad=True), torch.randn(40, device=device, requires_grad=True)
    torch.library.opcheck(ln_k._layer_norm_fwd, (x, w, b, 1e-6))
    torch.library.opcheck(ln_k._layer_norm_fwd, (x, w, None, 1e-6))
    xs = torch.randn(5, 18, device=device, requires_grad=True)
    torch.library.opcheck(sw_k._swiglu_fwd, (xs, torch.randn(18, device=device, requires_grad=True)))
    torch.library.opcheck(sw_k._swiglu_fwd, (xs, None))
    keep, seg = torch.tensor([0.0, 2.5], device=device), torch.tensor([0, 1, 1, 1, 1], device=device)
    torch.library.opcheck(sw_k._swiglu_fwd, (xs, None, keep, seg, 8))  # fc2's rows for the residual GEMM
    torch.library.opcheck(sw_k._swiglu_fwd, (xs, None, None, None, 8))
    wt = torch.randn(6, 40, device=device, requires_grad=True)
    g6, b6 = (torch.randn(6, device=device, requires_grad=True) for _ in range(2))
    torch.library.opcheck(rw_k._residual_weight_fwd, (wt, g6, b6, 8))
    torch.library.opcheck(rw_k._residual_weight_fwd, (wt, None, None, 8))


def _block_case(device):
    from virchow_fast.config import ModelConfig
    from virchow_fast.model.vit import Block

    torch.manual_seed(0)
    # head dim 80 (ViT-H's, masked in the kernel), three crops of 13, 5 and 13 tokens
    cfg = ModelConfig(embed_dim=160, num_heads=2, mlp_hidden=96, layerscale_init=0.1)
    block = Block(cfg, drop_path=0.0).to(device)
    lengths = torch.tensor([13, 5, 13])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(device)
    seg_ids = torch.repeat_interleave(torch.arange(3), lengths).to(device)
    x = torch.randn(int(lengths.sum()), 160, device=device)
    return block, x, (cu, 13, seg_ids)


def _run(block, x, args, fn):
    xi = x.clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    y = fn(xi, *args)
    y.square().mean().backward()
    return y.detach(), xi.grad, {n: p.grad for n, p in block.named_parameters()}


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.slow),  # ~20-30 s on a 2-core CPU (C++ codegen)
])
def test_block_compiles_fullgraph(backend, device, restore_ops):
    block, x, args = _block_case(device)
    ops.configure(TORCH)
    y_ref, dx_ref, grads_ref = _run(block, x, args, block)
    ops.configure(TRITON)
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    y, dx, grads = _run(block, x, args, compiled)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_compiled_graph_calls_the_kernels(device, restore_ops):
    """The Dynamo graph holds our custom ops (not the torch reference) when triton is configured (the
    LayerNorm at a branch point inside the subgraph of its autograd.Function)."""
    block, x, args = _block_case(device)
    seen = []

    def capture(gm, example_inputs):  # the graph and its subgraphs (an autograd.Function's forward is one)
        for sub in gm.modules():
            if isinstance(sub, torch.fx.GraphModule):
                seen.extend(str(node.target) for node in sub.graph.nodes if node.op == "call_function")
        return gm.forward

    ops.configure(TRITON)
    torch.compile(block, fullgraph=True, backend=capture)(x, *args)
    for name in ("attention_fwd", "layer_norm_fwd", "swiglu_fwd", "residual_weight_fwd"):
        assert any(f"virchow_fast_triton.{name}" in s for s in seen), f"{name} not in the graph: {seen}"
