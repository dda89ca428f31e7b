"""Residual add fused with LayerScale: z = x + gamma * y, forward and backward.

Spec: :func:`virchow_fast.ops.reference.residual_layer_scale`. Every block ends its two branches
with it. Traffic per [R, C] (e bytes): eagerly ``y * gamma`` then ``x + t`` reads and writes 5 R C e
in the forward; its backward writes dz * gamma and dz * y and reduces the latter (5 R C e). Fused:
forward reads x, y, writes z (3 R C e); backward reads dz, y, writes dy (3 R C e) and keeps the
dgamma partial sums in registers, one fp32 [C] row per program (bounded, no atomics); dx is dz
itself (no copy unless the dtype differs). torch.compile fuses the same; this is for the eager path.

Order: jit kernels -> launchers -> custom ops (autograd) -> public function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_float, last_dim_contiguous, next_pow2, num_programs


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _rls_fwd_kernel(
    X,  # [R, C] residual stream, row stride stride_x
    Y,  # [R, C] branch output, row stride stride_y
    G,  # [C] LayerScale gamma
    Z,  # [R, C] (out), contiguous
    stride_x, stride_y, C,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Z + row * C + cols, (x + g * y).to(Z.dtype.element_ty), mask=mask)


@triton.jit
def _rls_bwd_kernel(
    DZ,  # [R, C], row stride stride_dz
    Y,  # [R, C] forward branch input, row stride stride_y
    G,  # [C]
    DY,  # [R, C] (out), contiguous
    DG_partial,  # [P, C] fp32 (out), one row per program along the rows
    stride_dz, stride_y, R, C, rows_per_program,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    g = tl.load(G + cols, mask=mask, other=0.0).to(tl.float32)
    dg = tl.zeros([BLOCK_C], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, R)
    for r in range(row_start, row_end):
        dz = tl.load(DZ + r * stride_dz + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + r * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DY + r * C + cols, (dz * g).to(DY.dtype.element_ty), mask=mask)
        dg += dz * y
    tl.store(DG_partial + pid * C + cols, dg, mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _block(c: int) -> int:
    return min(next_pow2(c), 2048)


def _forward(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """x, y: [R, C]; gamma: [C] -> z: [R, C] in the promoted dtype of (x, y, gamma)."""
    x, y = last_dim_contiguous(x), last_dim_contiguous(y)
    R, C = x.shape
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), gamma.dtype)
    z = torch.empty((R, C), dtype=out_dtype, device=x.device)
    if R == 0 or C == 0:
        return z
    block = _block(C)
    _rls_fwd_kernel[(R, triton.cdiv(C, block))](x, y, gamma, z, x.stride(0), y.stride(0), C,
                                                BLOCK_C=block, num_warps=4)
    return z


def _backward(dz: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor):
    """-> dy [R, C] (y.dtype), dgamma [C] fp32."""
    dz, y = last_dim_contiguous(dz), last_dim_contiguous(y)
    R, C = y.shape
    dy = torch.empty((R, C), dtype=y.dtype, device=y.device)
    p = num_programs(y.device, R)
    partial = torch.empty((p, C), dtype=torch.float32, device=y.device)
    if R == 0 or C == 0:
        return dy, partial.zero_().sum(0)
    block = _block(C)
    _rls_bwd_kernel[(p, triton.cdiv(C, block))](dz, y, gamma, dy, partial, dz.stride(0), y.stride(0), R, C,
                                                triton.cdiv(R, p), BLOCK_C=block, num_warps=4)
    return dy, partial.sum(0)


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("virchow_fast_triton::residual_layer_scale_fwd", mutates_args=())
def _rls_fwd(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    return _forward(x, y, gamma)


@_rls_fwd.register_fake
def _(x, y, gamma):
    return x.new_empty(x.shape, dtype=torch.promote_types(torch.promote_types(x.dtype, y.dtype), gamma.dtype))


@torch.library.custom_op("virchow_fast_triton::residual_layer_scale_bwd", mutates_args=())
def _rls_bwd(dz: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dz, y, gamma)


@_rls_bwd.register_fake
def _(dz, y, gamma):
    return y.new_empty(y.shape), y.new_empty(y.shape[1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, y, gamma = inputs
    ctx.save_for_backward(y, gamma)
    ctx.x_dtype = x.dtype


def _autograd_backward(ctx, dz):
    y, gamma = ctx.saved_tensors
    dy, dgamma = _rls_bwd(dz, y, gamma)
    return dz.to(ctx.x_dtype), dy, dgamma.to(gamma.dtype)


_rls_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------

def residual_layer_scale(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    """x + gamma * y (same contract as the reference).

    x, y: [..., C] of one shape (fp32 / fp16 / bf16, may differ); gamma: [C] or None (plain add).
    Returns z: [..., C] in the promoted dtype of the inputs, as torch's own arithmetic would.
    """
    if gamma is None:
        return x + y
    check_float("residual_layer_scale x", x)
    check_float("residual_layer_scale y", y)
    if x.shape != y.shape or gamma.shape != x.shape[-1:]:
        raise ValueError(f"residual_layer_scale: x {tuple(x.shape)}, y {tuple(y.shape)}, gamma {tuple(gamma.shape)}")
    C = x.shape[-1]
    return _rls_fwd(x.reshape(-1, C), y.reshape(-1, C), gamma).view(x.shape)
