"""The residual GEMM's weight: ``[gamma * W | gamma * b | 0 ...]``, forward and backward.

Spec: :func:`virchow_fast.ops.reference.residual_weight`. A ViT block's branch ends in
``x + keep * gamma * (a @ W^T + b)`` (residual add, the Linear's bias, LayerScale, per-crop drop
path). With LayerScale folded into the weight's rows and the bias as one more column, it is one
cuBLAS GEMM with the residual as its C operand: ``addmm(x, [keep * a | keep | 0], W_ext^T)``; the
row factor and the bias column come from the kernel that wrote ``a`` (attention, SwiGLU). So
the block's residual adds cost no pass over the token rows at all; this op is the price, a pass
over the weight (N x K, once per forward), and its backward one more (dW, dgamma and dbias from the
GEMM's [N, K + pad] weight gradient, all three in the same pass).

Traffic per weight element (e bytes): forward reads W, writes W_ext (2 e); backward reads dW_ext and
W, writes dW (3 e). gamma, b (length N) and their fp32 gradients are one value per row. All
arithmetic is fp32 after the loads.

Order: jit kernels -> launchers -> custom ops (autograd) -> public function.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import check_float, next_pow2

# ------------------------------------------------------------------------------------------------
# Kernels: one program per output row n
# ------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(W, G, B, OUT, K: tl.constexpr, PAD: tl.constexpr, BLOCK: tl.constexpr,
                HAS_GAMMA: tl.constexpr, HAS_BIAS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    g = 1.0
    if HAS_GAMMA:
        g = tl.load(G + n).to(tl.float32)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        mask = cols < K
        w = tl.load(W + n * K + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + n * (K + PAD) + cols, (w * g).to(OUT.dtype.element_ty), mask=mask)
    b = 0.0
    if HAS_BIAS:
        b = tl.load(B + n).to(tl.float32) * g
    pc = tl.arange(0, PAD)
    tl.store(OUT + n * (K + PAD) + K + pc, tl.where(pc == 0, b, 0.0).to(OUT.dtype.element_ty))


@triton.jit
def _bwd_kernel(DWE, W, G, B, DW, DG, DB, K: tl.constexpr, PAD: tl.constexpr, BLOCK: tl.constexpr,
                HAS_GAMMA: tl.constexpr, HAS_BIAS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    g = 1.0
    if HAS_GAMMA:
        g = tl.load(G + n).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        mask = cols < K
        d = tl.load(DWE + n * (K + PAD) + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DW + n * K + cols, (d * g).to(DW.dtype.element_ty), mask=mask)
        if HAS_GAMMA:
            acc += d * tl.load(W + n * K + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        db = tl.load(DWE + n * (K + PAD) + K).to(tl.float32)
        tl.store(DB + n, db * g)
        if HAS_GAMMA:
            dg = tl.sum(acc, axis=0) + db * tl.load(B + n).to(tl.float32)
            tl.store(DG + n, dg)
    elif HAS_GAMMA:
        tl.store(DG + n, tl.sum(acc, axis=0))


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _block(k: int) -> int:
    return min(next_pow2(max(k, 16)), 1024)


def _forward(weight, gamma, bias, pad: int) -> torch.Tensor:
    weight = weight.contiguous()
    N, K = weight.shape
    out = torch.empty((N, K + pad), dtype=weight.dtype, device=weight.device)
    if N == 0:
        return out
    _fwd_kernel[(N,)](weight, weight if gamma is None else gamma.contiguous(),
                      weight if bias is None else bias.contiguous(), out, K=K, PAD=pad, BLOCK=_block(K),
                      HAS_GAMMA=gamma is not None, HAS_BIAS=bias is not None, num_warps=4)
    return out


def _backward(dwe, weight, gamma, bias, pad: int):
    dwe, weight = dwe.contiguous(), weight.contiguous()
    N, K = weight.shape
    dw = torch.empty_like(weight)
    dg = torch.zeros(N, dtype=torch.float32, device=weight.device)
    db = torch.zeros(N, dtype=torch.float32, device=weight.device)
    if N == 0:
        return dw, dg, db
    _bwd_kernel[(N,)](dwe, weight, weight if gamma is None else gamma.contiguous(),
                      weight if bias is None else bias.contiguous(), dw, dg, db, K=K, PAD=pad, BLOCK=_block(K),
                      HAS_GAMMA=gamma is not None, HAS_BIAS=bias is not None, num_warps=4)
    return dw, dg, db


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("virchow_fast_triton::residual_weight_fwd", mutates_args=())
def _residual_weight_fwd(weight: torch.Tensor, gamma: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         pad: int) -> torch.Tensor:
    return _forward(weight, gamma, bias, pad)


@_residual_weight_fwd.register_fake
def _(weight, gamma, bias, pad):
    return weight.new_empty((weight.shape[0], weight.shape[1] + pad))


@torch.library.custom_op("virchow_fast_triton::residual_weight_bwd", mutates_args=())
def _residual_weight_bwd(dwe: torch.Tensor, weight: torch.Tensor, gamma: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dwe, weight, gamma, bias, pad)


@_residual_weight_bwd.register_fake
def _(dwe, weight, gamma, bias, pad):
    n = weight.shape[0]
    return (weight.new_empty(weight.shape), weight.new_empty(n, dtype=torch.float32),
            weight.new_empty(n, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    weight, gamma, bias, pad = inputs
    ctx.save_for_backward(weight, gamma, bias)
    ctx.pad = pad


def _autograd_backward(ctx, dwe):
    weight, gamma, bias = ctx.saved_tensors
    dw, dg, db = _residual_weight_bwd(dwe, weight, gamma, bias, ctx.pad)
    return (dw, None if gamma is None else dg.to(gamma.dtype), None if bias is None else db.to(bias.dtype), None)


_residual_weight_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------

def check_args(weight: torch.Tensor, gamma: torch.Tensor | None, bias: torch.Tensor | None, pad: int) -> None:
    """One line naming what is wrong with residual_weight's arguments."""
    check_float("residual_weight weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"residual_weight: weight {tuple(weight.shape)} must be [N, K]")
    if pad < 8 or pad % 8:
        raise ValueError(f"residual_weight: pad {pad} must be a positive multiple of 8 (the bias column, 16-byte rows)")
    for name, t in (("gamma", gamma), ("bias", bias)):
        if t is not None:
            check_float(f"residual_weight {name}", t)
            if t.shape != weight.shape[:1]:
                raise ValueError(f"residual_weight: {name} {tuple(t.shape)} does not match weight "
                                 f"{tuple(weight.shape)}; expected [{weight.shape[0]}]")


def residual_weight(weight: torch.Tensor, gamma: torch.Tensor | None, bias: torch.Tensor | None,
                    pad: int = 8) -> torch.Tensor:
    """[gamma * W | gamma * b | 0 ...]: [N, K + pad] in weight's dtype (same contract as the reference).

    weight [N, K]; gamma [N] (LayerScale) or None (1); bias [N] or None (0); pad a positive multiple
    of 8. Gradients: dW = gamma * dW_ext[:, :K], dbias = gamma * dW_ext[:, K], dgamma = sum_k
    dW_ext[:, k] W[:, k] + dW_ext[:, K] b, summed in fp32, each in its input's dtype.
    """
    check_args(weight, gamma, bias, pad)
    return _residual_weight_fwd(weight, gamma, bias, int(pad))
