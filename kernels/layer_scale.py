"""Residual add fused with the branch's output bias, LayerScale and per-crop stochastic depth:
z = x + keep[seg] * gamma * (y + b).

Spec: :func:`virchow_fast.ops.reference.residual_layer_scale`. Every block ends its two branches
with it. Stochastic depth drops a branch per crop (packed segment): ``keep`` [S] holds each crop's
factor (0 or 1 / (1 - p)) and ``seg_ids`` [R] each row's crop, so a drop-path rate of 0.4 keeps
the add fused (one scalar load per row) instead of falling back to ``x + ls(y) * keep[seg]``.
Traffic per [R, C] (e bytes): eagerly ``y * gamma``, ``* keep``, then ``x + t`` reads and writes
7 R C e in the forward and more in the backward. Fused: forward reads x, y, writes z (3 R C e);
backward reads dz, y, writes dy (3 R C e) and keeps the dgamma partial sums in registers, one fp32
[C] row per program (bounded, no atomics); dx is dz itself (no copy unless the dtype differs).

The bias b [C] is that of the Linear that produced y (proj, fc2), which runs without it: its
gradient, the column sums of dy, would otherwise cost the Linear a separate full read of the
[R, C] gradient. Here the backward already holds every dy it writes, so it sums them in fp32 in
registers next to dgamma (one more fp32 [C] partial per program). No extra row traffic: b is a
[C] vector every row shares (cached, like gamma; the backward loads it once per program, for
dgamma's y + b only), and the backward reads y only for dgamma, so not at all with a bias but no
gamma. Eagerly the bias add alone reads and writes 2 R C e more, and its gradient reads R C e.

C is a compile-time constant and rows are dense (row stride C), so the compiler knows every row
start's alignment and moves 128 bits per access for any C that is a multiple of 8 elements.

Order: jit kernels -> launchers -> custom ops (autograd) -> public function.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import check_float, next_pow2, num_programs

# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _row_scale(G, KEEP, SEG, row, cols, mask, HAS_GAMMA: tl.constexpr, HAS_KEEP: tl.constexpr):
    """[BLOCK_C] fp32 factor of row ``row``: gamma (or 1) times the row's crop keep factor."""
    s = tl.full(cols.shape, 1.0, tl.float32)
    if HAS_GAMMA:
        s = tl.load(G + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_KEEP:
        s = s * tl.load(KEEP + tl.load(SEG + row)).to(tl.float32)
    return s


@triton.jit
def _row_grad_constants(G, B, cols, mask, BLOCK_C: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(gamma, bias) columns for :func:`_row_grad`, fp32: gamma 1 without HAS_GAMMA; the bias is read
    only with gamma too (it enters only dgamma's (y + b)), else 0."""
    g = tl.full((BLOCK_C,), 1.0, tl.float32)
    if HAS_GAMMA:
        g = tl.load(G + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_GAMMA and HAS_BIAS:
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return g, b


@triton.jit
def _row_grad(dz, r, Y, KEEP, SEG, DY, g, b, dg, db, cols, mask, C: tl.constexpr, HAS_GAMMA: tl.constexpr,
              HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The backward of row ``r`` from its fp32 gradient dz: stores dy = keep * gamma * dz, returns the
    dgamma and dbias sums with this row added (g: gamma row or ones; b: bias row, read with gamma)."""
    if HAS_KEEP:
        dz = dz * tl.load(KEEP + tl.load(SEG + r)).to(tl.float32)
    dy = dz * g
    tl.store(DY + r * C + cols, dy.to(DY.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        db += dy
    if HAS_GAMMA:
        y = tl.load(Y + r * C + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += b
        dg += dz * y
    return dg, db


@triton.jit
def _rls_fwd_kernel(
    X,  # [R, C] residual stream
    Y,  # [R, C] branch output
    G,  # [C] LayerScale gamma (unused without HAS_GAMMA)
    KEEP,  # [S] per-crop keep factor (unused without HAS_KEEP)
    SEG,  # [R] crop of each row (unused without HAS_KEEP)
    B,  # [C] branch output bias (unused without HAS_BIAS)
    Z,  # [R, C] (out)
    C: tl.constexpr, BLOCK_C: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_KEEP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    s = _row_scale(G, KEEP, SEG, row, cols, mask, HAS_GAMMA, HAS_KEEP)
    tl.store(Z + row * C + cols, (x + s * y).to(Z.dtype.element_ty), mask=mask)


@triton.jit
def _rls_bwd_kernel(
    DZ,  # [R, C]
    Y,  # [R, C] forward branch input
    G,  # [C] (unused without HAS_GAMMA)
    KEEP,  # [S] (unused without HAS_KEEP)
    SEG,  # [R] (unused without HAS_KEEP)
    B,  # [C] forward bias (unused without HAS_BIAS)
    DY,  # [R, C] (out)
    DG_partial,  # [P, C] fp32 (out), one row per program along the rows (unused without HAS_GAMMA)
    DB_partial,  # [P, C] fp32 (out), column sums of this program's dy rows (unused without HAS_BIAS)
    R, rows_per_program,
    C: tl.constexpr, BLOCK_C: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_KEEP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    g, b = _row_grad_constants(G, B, cols, mask, BLOCK_C, HAS_GAMMA, HAS_BIAS)
    dg = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, R)
    for r in range(row_start, row_end):
        dz = tl.load(DZ + r * C + cols, mask=mask, other=0.0).to(tl.float32)
        dg, db = _row_grad(dz, r, Y, KEEP, SEG, DY, g, b, dg, db, cols, mask, C, HAS_GAMMA, HAS_KEEP, HAS_BIAS)
    if HAS_GAMMA:
        tl.store(DG_partial + pid * C + cols, dg, mask=mask)
    if HAS_BIAS:
        tl.store(DB_partial + pid * C + cols, db, mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _block(c: int) -> int:
    return min(next_pow2(c), 2048)


def _out_dtype(x, y, gamma, keep, bias) -> torch.dtype:
    dt = torch.promote_types(x.dtype, y.dtype)
    for t in (gamma, keep, bias):
        dt = dt if t is None else torch.promote_types(dt, t.dtype)
    return dt


def _dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like


def _forward(x, y, gamma, keep, seg_ids, bias) -> torch.Tensor:
    """x, y: [R, C]; gamma: [C] or None; keep: [S] or None; seg_ids: [R]; bias: [C] or None
    -> z: [R, C] in the promoted dtype of the inputs."""
    x, y = x.contiguous(), y.contiguous()
    R, C = x.shape
    z = torch.empty((R, C), dtype=_out_dtype(x, y, gamma, keep, bias), device=x.device)
    if R == 0 or C == 0:
        return z
    block = _block(C)
    _rls_fwd_kernel[(R, triton.cdiv(C, block))](
        x, y, _dummy(gamma, x), _dummy(keep, x), _dummy(seg_ids, x), _dummy(bias, x), z,
        C=C, BLOCK_C=block, HAS_GAMMA=gamma is not None, HAS_KEEP=keep is not None, HAS_BIAS=bias is not None,
        num_warps=4)
    return z


def _backward(dz, y, gamma, keep, seg_ids, bias):
    """-> dy [R, C] (y.dtype), dgamma [C] fp32 (zeros without gamma), dbias [C] fp32 (zeros
    without bias)."""
    dz, y = dz.contiguous(), y.contiguous()
    R, C = y.shape
    dy = torch.empty((R, C), dtype=y.dtype, device=y.device)
    p = num_programs(y.device, R)
    dg_partial = torch.empty((p, C), dtype=torch.float32, device=y.device)
    db_partial = torch.empty((p, C), dtype=torch.float32, device=y.device)
    if R == 0 or C == 0 or gamma is None:
        dg_partial.zero_()
    if R == 0 or C == 0 or bias is None:
        db_partial.zero_()
    if R == 0 or C == 0:
        return dy, dg_partial.sum(0), db_partial.sum(0)
    block = _block(C)
    _rls_bwd_kernel[(p, triton.cdiv(C, block))](
        dz, y, _dummy(gamma, y), _dummy(keep, y), _dummy(seg_ids, y), _dummy(bias, y), dy, dg_partial, db_partial,
        R, triton.cdiv(R, p),
        C=C, BLOCK_C=block, HAS_GAMMA=gamma is not None, HAS_KEEP=keep is not None, HAS_BIAS=bias is not None,
        num_warps=4)
    return dy, dg_partial.sum(0), db_partial.sum(0)


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("virchow_fast_triton::residual_layer_scale_fwd", mutates_args=())
def _rls_fwd(x: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor], keep: Optional[torch.Tensor],
             seg_ids: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _forward(x, y, gamma, keep, seg_ids, bias)


@_rls_fwd.register_fake
def _(x, y, gamma, keep, seg_ids, bias):
    return x.new_empty(x.shape, dtype=_out_dtype(x, y, gamma, keep, bias))


@torch.library.custom_op("virchow_fast_triton::residual_layer_scale_bwd", mutates_args=())
def _rls_bwd(dz: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor], keep: Optional[torch.Tensor],
             seg_ids: Optional[torch.Tensor], bias: Optional[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dz, y, gamma, keep, seg_ids, bias)


@_rls_bwd.register_fake
def _(dz, y, gamma, keep, seg_ids, bias):
    C = y.shape[1]
    return y.new_empty(y.shape), y.new_empty(C, dtype=torch.float32), y.new_empty(C, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, y, gamma, keep, seg_ids, bias = inputs
    ctx.save_for_backward(y, gamma, keep, seg_ids, bias)
    ctx.x_dtype = x.dtype


def _autograd_backward(ctx, dz):
    y, gamma, keep, seg_ids, bias = ctx.saved_tensors
    dy, dgamma, dbias = _rls_bwd(dz, y, gamma, keep, seg_ids, bias)
    return (dz.to(ctx.x_dtype), dy, None if gamma is None else dgamma.to(gamma.dtype), None, None,
            None if bias is None else dbias.to(bias.dtype))


_rls_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------

def residual_layer_scale(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor | None,
                         keep: torch.Tensor | None = None, seg_ids: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """x + keep[seg_ids] * gamma * (y + bias) (same contract as the reference).

    x, y: [..., C] of one shape (fp32 / fp16 / bf16, may differ); gamma: [C] or None (no LayerScale);
    keep: [S] per-crop stochastic-depth factor or None; seg_ids: [R] int crop of each of the
    R = x.numel() / C rows (needed with keep); bias: [C] or None, the output bias of the Linear
    that produced y (its gradient, the column sums of dy, comes from this op's backward).
    Returns z: [..., C] in the promoted dtype of the inputs, as torch's own arithmetic would.
    """
    if gamma is None and keep is None and bias is None:
        return x + y
    seg_ids = check_args("residual_layer_scale", x, y, gamma, keep, seg_ids, bias)
    C = x.shape[-1]
    return _rls_fwd(x.reshape(-1, C), y.reshape(-1, C), gamma, keep, seg_ids, bias).view(x.shape)


def check_args(name, x, y, gamma, keep, seg_ids, bias):
    """Dtypes and shapes of a residual op's arguments (one ValueError line naming them); returns
    seg_ids (None without keep)."""
    check_float(f"{name} x", x)
    check_float(f"{name} y", y)
    if bias is not None:
        check_float(f"{name} bias", bias)
    C = x.shape[-1]
    if (x.shape != y.shape or (gamma is not None and gamma.shape != x.shape[-1:])
            or (bias is not None and bias.shape != x.shape[-1:])):
        raise ValueError(f"{name}: x {tuple(x.shape)}, y {tuple(y.shape)}, "
                         f"gamma {None if gamma is None else tuple(gamma.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)} (gamma and bias: [C])")
    if keep is not None and (seg_ids is None or seg_ids.shape != (x.numel() // max(C, 1),) or keep.dim() != 1):
        raise ValueError(f"{name}: keep {tuple(keep.shape)} needs seg_ids [{x.numel() // max(C, 1)}], "
                         f"got {None if seg_ids is None else tuple(seg_ids.shape)}")
    return seg_ids if keep is not None else None
