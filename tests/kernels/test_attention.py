"""Packed varlen attention kernel vs ops/reference.py: forward, dQ, dK, dV.

Head dims 80 / 104 (masked inside the kernel) and 64 / 128; 54- and 261-token segments mixed in
one packed batch; a single segment; an empty segment; strided q/k/v views of one qkv tensor.
"""
import pytest
import torch

from virchow_fast.ops import reference

attn = pytest.importorskip("virchow_fast.kernels.attention")

# (atol, rtol) of the kernel against the fp32 reference on the same (rounded) inputs. fp16/bf16:
# the dot operands (P, dS) are rounded to the input dtype, as in FlashAttention, plus one rounding
# of each output; gradients sum more terms.
TOL = {
    torch.float32: {"o": (2e-5, 2e-5), "grad": (1e-4, 1e-4)},
    torch.float16: {"o": (2e-3, 2e-3), "grad": (5e-3, 5e-3)},
    torch.bfloat16: {"o": (1.6e-2, 1.6e-2), "grad": (4e-2, 3e-2)},
}
DTYPES = list(TOL)


def _cu(lengths, device):
    return torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)


def _check(lengths, H, D, dtype, device, close, scale=None, packed_qkv=False):
    T = sum(lengths)
    cu = _cu(lengths, device)
    max_len = max(lengths)
    if packed_qkv:  # the model's layout: one [T, 3, H, D] projection, unbound into strided views
        qkv = torch.randn(T, 3, H, D, device=device, dtype=dtype)
        q, k, v = qkv.unbind(1)
    else:
        q, k, v = (torch.randn(T, H, D, device=device, dtype=dtype) for _ in range(3))
    do = torch.randn(T, H, D, device=device, dtype=dtype)

    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = attn.attention(*ins, cu, max_len, scale)
    grads = torch.autograd.grad(o, ins, do)

    ref_ins = [t.detach().float().requires_grad_() for t in (q, k, v)]
    o_ref = reference.attention(*ref_ins, cu, max_len, scale)
    ref_grads = torch.autograd.grad(o_ref, ref_ins, do.float())

    tol = TOL[dtype]
    assert o.dtype == dtype and o.shape == (T, H, D)
    close(o, o_ref, tol["o"], "o")
    for name, g, gr in zip(("dq", "dk", "dv"), grads, ref_grads):
        close(g, gr, tol["grad"], name)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [80, 104])
def test_mixed_crops(D, dtype, device, close):
    """One global (261) and two local (54) crops of a tile, packed: the model's call."""
    _check([54, 261, 54], 1, D, dtype, device, close)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("D", [64, 128])
def test_pow2_head_dims(D, device, close):
    _check([54, 37], 2, D, torch.float16, device, close)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_segment_prime_length(dtype, device, close):
    _check([131], 1, 80, dtype, device, close, scale=0.3)


@pytest.mark.usefixtures("poison_outputs")
def test_short_and_empty_segments_packed_qkv(device, close):
    _check([1, 0, 5, 67], 3, 104, torch.float32, device, close, packed_qkv=True)


def test_int64_cu_seqlens_and_bad_shapes(device, close):
    q, k, v = (torch.randn(20, 1, 16, device=device) for _ in range(3))
    cu = torch.tensor([0, 7, 20], device=device)
    close(attn.attention(q, k, v, cu, 13), reference.attention(q, k, v, cu, 13), TOL[torch.float32]["o"], "o")
    with pytest.raises(ValueError):
        attn.attention(q, k[:, :, :8], v, cu, 13)


@pytest.mark.gpu  # larger shapes; skipped without CUDA (tests/conftest.py)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 80, 104, 128])
def test_attention_gpu(D, dtype, close):
    """Four tiles of the ViT-H crops: 4 x (2 x 261 + 8 x 54), 16 heads."""
    _check([261, 261] + [54] * 8 + [261, 261] + [54] * 8, 16, D, dtype, torch.device("cuda"), close)
    _check(([261] * 2 + [54] * 8) * 2, 16, D, dtype, torch.device("cuda"), close, packed_qkv=True)
