"""The residual op and the LayerNorm after it in one pass: z = x + keep[seg] * gamma * (y + bias), h = LN(z).

Spec: :func:`virchow_fast.ops.reference.residual_layer_norm` (``residual_layer_scale`` then
``layer_norm``). Inside a block the attention branch's residual add is followed at once by norm2,
the MLP branch's LayerNorm; fused, z is written once and never read back in the forward, and the
backward adds the residual stream's gradient, runs the LayerNorm backward and the residual op's
backward on one row in registers. Traffic per [R, C] (e bytes):

- forward: read x, y, write z, h (4 R C e; separately 3 + 2);
- backward: read z, dh, dz (the residual stream's gradient from the MLP branch's add), y; write
  dx, dy (6 R C e; separately the LayerNorm branch backward 4 and the residual backward 3), plus
  one fp32 [C] partial per program for each of dgamma, dbias, dweight and dln_bias (no atomics).

The LayerNorm normalises z as stored (rounded to its dtype), as the two separate ops would. One
program holds a whole row (the LayerNorm's reductions); the backward runs a bounded number of
programs, each looping over its run of rows. C is a compile-time constant and rows are dense, so
every access moves 128 bits for C a multiple of 8 elements (tests/kernels/test_sm90_compile.py).

Order: jit kernels -> launchers -> custom ops (autograd) -> public function.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import next_pow2, num_programs
from .layer_norm import _ln_row, _ln_row_grad, _warps
from .layer_scale import _dummy, _out_dtype, _row_grad, _row_grad_constants, _row_scale, check_args

# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _rn_fwd_kernel(
    X,  # [R, C] residual stream
    Y,  # [R, C] branch output (its Linear run without bias)
    G, KEEP, SEG, BIAS,  # [C] gamma, [S] keep, [R] crop ids, [C] branch bias (each unused without its flag)
    W, LNB,  # [C] LayerNorm weight and bias (LNB unused without HAS_LN_BIAS)
    Z,  # [R, C] (out) the new residual stream
    Hn,  # [R, C] (out) LayerNorm(z)
    Mean, Rstd,  # [R] fp32 (out)
    eps,
    C: tl.constexpr, BLOCK_C: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_KEEP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    s = _row_scale(G, KEEP, SEG, row, cols, mask, HAS_GAMMA, HAS_KEEP)
    z = (x + s * y).to(Z.dtype.element_ty)
    tl.store(Z + row * C + cols, z, mask=mask)
    h, mean, rstd = _ln_row(tl.where(mask, z.to(tl.float32), 0.0), W, LNB, cols, mask, eps, C,  # z as stored
                            HAS_LN_BIAS)
    tl.store(Hn + row * C + cols, h.to(Hn.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _rn_bwd_kernel(
    DZ,  # [R, C] gradient of z from its other use (the next residual add)
    DH,  # [R, C] gradient of h
    Z,  # [R, C] forward output z
    Y,  # [R, C] forward branch input (read only with HAS_GAMMA, for dgamma)
    G, KEEP, SEG, BIAS,  # as the forward
    W,  # [C] LayerNorm weight
    Mean, Rstd,  # [R] fp32
    DX,  # [R, C] (out) gradient of x (= the total gradient of z)
    DY,  # [R, C] (out)
    DG_partial, DB_partial, DW_partial, DLNB_partial,  # [P, C] fp32 (out), one row per program
    R, rows_per_program,
    C: tl.constexpr, BLOCK_C: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_KEEP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    g, b = _row_grad_constants(G, BIAS, cols, mask, BLOCK_C, HAS_GAMMA, HAS_BIAS)
    dg = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    dlnb = tl.zeros([BLOCK_C], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: the loop variable inherits it
    row_end = tl.minimum(row_start + rows_per_program, R)
    for r in range(row_start, row_end):
        z = tl.load(Z + r * C + cols, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(DH + r * C + cols, mask=mask, other=0.0).to(tl.float32)
        dz, zhat = _ln_row_grad(z, dh, w, tl.load(Mean + r), tl.load(Rstd + r), mask, C)
        dz += tl.load(DZ + r * C + cols, mask=mask, other=0.0).to(tl.float32)  # the residual stream's gradient
        tl.store(DX + r * C + cols, dz.to(DX.dtype.element_ty), mask=mask)
        dw += dh * zhat
        dlnb += dh
        dg, db = _row_grad(dz, r, Y, KEEP, SEG, DY, g, b, dg, db, cols, mask, C, HAS_GAMMA, HAS_KEEP, HAS_BIAS)
    tl.store(DW_partial + pid * C + cols, dw, mask=mask)
    tl.store(DLNB_partial + pid * C + cols, dlnb, mask=mask)
    if HAS_GAMMA:
        tl.store(DG_partial + pid * C + cols, dg, mask=mask)
    if HAS_BIAS:
        tl.store(DB_partial + pid * C + cols, db, mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _forward(x, y, gamma, keep, seg_ids, bias, weight, ln_bias, eps):
    """-> z [R, C] (promoted dtype), h [R, C] (z's dtype), mean [R], rstd [R] fp32."""
    x, y = x.contiguous(), y.contiguous()
    R, C = x.shape
    dt = _out_dtype(x, y, gamma, keep, bias)
    z = torch.empty((R, C), dtype=dt, device=x.device)
    h = torch.empty((R, C), dtype=dt, device=x.device)
    mean = torch.empty(R, dtype=torch.float32, device=x.device)
    rstd = torch.empty(R, dtype=torch.float32, device=x.device)
    if R == 0:
        return z, h, mean, rstd
    block = next_pow2(C)
    _rn_fwd_kernel[(R,)](
        x, y, _dummy(gamma, x), _dummy(keep, x), _dummy(seg_ids, x), _dummy(bias, x), weight, _dummy(ln_bias, weight),
        z, h, mean, rstd, eps,
        C=C, BLOCK_C=block, HAS_GAMMA=gamma is not None, HAS_KEEP=keep is not None, HAS_BIAS=bias is not None,
        HAS_LN_BIAS=ln_bias is not None, num_warps=_warps(block))
    return z, h, mean, rstd


def _backward(dz, dh, z, y, gamma, keep, seg_ids, bias, weight, mean, rstd, x_dtype):
    """-> dx [R, C] (x_dtype), dy [R, C] (y.dtype), and fp32 [C] dgamma, dbias, dweight, dln_bias
    (zeros where the forward had no such argument)."""
    dz, dh, z, y = dz.contiguous(), dh.contiguous(), z.contiguous(), y.contiguous()
    R, C = z.shape
    dx = torch.empty((R, C), dtype=x_dtype, device=z.device)
    dy = torch.empty((R, C), dtype=y.dtype, device=z.device)
    p = num_programs(z.device, R)
    parts = [torch.empty((p, C), dtype=torch.float32, device=z.device) for _ in range(4)]  # dg, db, dw, dlnb
    if R == 0:
        return (dx, dy, *(t.zero_().sum(0) for t in parts))
    for t, present in zip(parts[:2], (gamma, bias), strict=True):
        if present is None:
            t.zero_()
    block = next_pow2(C)
    _rn_bwd_kernel[(p,)](
        dz, dh, z, y, _dummy(gamma, z), _dummy(keep, z), _dummy(seg_ids, z), _dummy(bias, z), weight, mean, rstd,
        dx, dy, *parts, R, triton.cdiv(R, p),
        C=C, BLOCK_C=block, HAS_GAMMA=gamma is not None, HAS_KEEP=keep is not None, HAS_BIAS=bias is not None,
        num_warps=_warps(block))
    return (dx, dy, *(t.sum(0) for t in parts))


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("virchow_fast_triton::residual_layer_norm_fwd", mutates_args=())
def _rn_fwd(x: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor], keep: Optional[torch.Tensor],
            seg_ids: Optional[torch.Tensor], bias: Optional[torch.Tensor], weight: torch.Tensor,
            ln_bias: Optional[torch.Tensor], eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, y, gamma, keep, seg_ids, bias, weight, ln_bias, eps)


@_rn_fwd.register_fake
def _(x, y, gamma, keep, seg_ids, bias, weight, ln_bias, eps):
    dt = _out_dtype(x, y, gamma, keep, bias)
    stat = x.new_empty(x.shape[0], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=dt), x.new_empty(x.shape, dtype=dt), stat, torch.empty_like(stat)


@torch.library.custom_op("virchow_fast_triton::residual_layer_norm_bwd", mutates_args=())
def _rn_bwd(dz: torch.Tensor, dh: torch.Tensor, z: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor],
            keep: Optional[torch.Tensor], seg_ids: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, x_dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dz, dh, z, y, gamma, keep, seg_ids, bias, weight, mean, rstd, x_dtype)


@_rn_bwd.register_fake
def _(dz, dh, z, y, gamma, keep, seg_ids, bias, weight, mean, rstd, x_dtype):
    C = z.shape[1]
    vec = [z.new_empty(C, dtype=torch.float32) for _ in range(4)]
    return (z.new_empty(z.shape, dtype=x_dtype), y.new_empty(y.shape), *vec)


def _setup_context(ctx, inputs, output):
    x, y, gamma, keep, seg_ids, bias, weight, ln_bias, _ = inputs
    z, h, mean, rstd = output
    ctx.save_for_backward(z, y, gamma, keep, seg_ids, bias, weight, mean, rstd)
    ctx.x_dtype = x.dtype
    ctx.ln_bias_dtype = None if ln_bias is None else ln_bias.dtype


def _autograd_backward(ctx, dz, dh, _dmean, _drstd):
    z, y, gamma, keep, seg_ids, bias, weight, mean, rstd = ctx.saved_tensors
    dz = torch.zeros_like(z) if dz is None else dz  # an unused output (not in the model: both are used)
    dh = torch.zeros_like(z) if dh is None else dh
    dx, dy, dg, db, dw, dlnb = _rn_bwd(dz, dh, z, y, gamma, keep, seg_ids, bias, weight, mean, rstd, ctx.x_dtype)
    return (dx, dy, None if gamma is None else dg.to(gamma.dtype), None, None,
            None if bias is None else db.to(bias.dtype), dw.to(weight.dtype),
            None if ctx.ln_bias_dtype is None else dlnb.to(ctx.ln_bias_dtype), None)


_rn_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------

def residual_layer_norm(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor | None, keep: torch.Tensor | None,
                        seg_ids: torch.Tensor | None, bias: torch.Tensor | None, weight: torch.Tensor,
                        ln_bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, LayerNorm(z)) with z = x + keep[seg_ids] * gamma * (y + bias) (same contract as the reference).

    x, y: [..., C] (fp32 / fp16 / bf16, may differ); gamma, bias: [C] or None; keep: [S] per-crop
    factor or None with seg_ids [R]; weight, ln_bias: the LayerNorm's [C] parameters (ln_bias may be
    None). z and h are in the promoted dtype of x, y, gamma, keep and bias.
    """
    seg_ids = check_args("residual_layer_norm", x, y, gamma, keep, seg_ids, bias)
    C = x.shape[-1]
    if weight.shape != (C,) or (ln_bias is not None and ln_bias.shape != (C,)):
        raise ValueError(f"residual_layer_norm: LayerNorm weight {tuple(weight.shape)}, bias "
                         f"{None if ln_bias is None else tuple(ln_bias.shape)} for width {C}")
    z, h, _, _ = _rn_fwd(x.reshape(-1, C), y.reshape(-1, C), gamma, keep, seg_ids, bias, weight, ln_bias, float(eps))
    return z.view(x.shape), h.view(x.shape)
