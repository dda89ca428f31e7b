"""Rows divided by their L2 norm, forward and backward: the prototypes' weight norm.

Spec: :func:`virchow_fast.ops.reference.l2_normalize` (``F.normalize(w, dim=-1)``). The DINO and
iBOT heads normalise their [K, b] prototype matrices (K = 131072) every forward, student and
teacher; eagerly that is a norm pass and a division pass forward and about eight passes backward
(the division's and the norm's gradients, a masked fill for zero rows). Here the forward reads w
and writes y = w / max(||w||, eps) plus one fp32 factor per row (1 / max(||w||, eps)); the backward
reads dy and w, writes dw = (dy - y (y . dy)) / ||w|| (dy / eps on a row whose norm is below eps,
as torch's clamp gives): 2 b e and 3 b e bytes per row. All arithmetic is fp32 after the loads.

b is a compile-time constant and rows are dense, so rows of a multiple of 8 elements move 128 bits
per access. One program per block of rows.

Order: jit kernels -> launchers -> custom ops (autograd) -> public function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_float, next_pow2

ROWS = 8  # rows per program


@triton.jit
def _tile(R, C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    """This program's rows: their indices, row mask, [ROWS, BLOCK_C] element offsets and mask."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    return rows, rmask, rows[:, None] * C + cols[None, :], rmask[:, None] & (cols < C)[None, :]


@triton.jit
def _fwd_kernel(W, Y, INV, R, eps, C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    rows, rmask, offs, mask = _tile(R, C, BLOCK_C, ROWS)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), eps)
    tl.store(Y + offs, (w * inv[:, None]).to(Y.dtype.element_ty), mask=mask)
    tl.store(INV + rows, inv, mask=rmask)


@triton.jit
def _bwd_kernel(DY, W, INV, DW, R, eps, C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    rows, rmask, offs, mask = _tile(R, C, BLOCK_C, ROWS)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    inv = tl.load(INV + rows, mask=rmask, other=0.0)
    y = w * inv[:, None]
    dot = tl.sum(y * dy, axis=1)
    clamped = inv >= 1.0 / eps  # the norm was below eps: y = w / eps, a plain scale
    dw = tl.where(clamped[:, None], dy, dy - y * dot[:, None]) * inv[:, None]
    tl.store(DW + offs, dw.to(DW.dtype.element_ty), mask=mask)


def _grid(R: int):
    return (triton.cdiv(R, ROWS),)


def _forward(w: torch.Tensor, eps: float):
    w = w.contiguous()
    R, C = w.shape
    y = torch.empty_like(w)
    inv = torch.empty(R, dtype=torch.float32, device=w.device)
    if R:
        _fwd_kernel[_grid(R)](w, y, inv, R, eps, C=C, BLOCK_C=next_pow2(max(C, 16)), ROWS=ROWS, num_warps=4)
    return y, inv


def _backward(dy: torch.Tensor, w: torch.Tensor, inv: torch.Tensor, eps: float):
    dy, w = dy.contiguous(), w.contiguous()
    R, C = w.shape
    dw = torch.empty_like(w)
    if R:
        _bwd_kernel[_grid(R)](dy, w, inv, dw, R, eps, C=C, BLOCK_C=next_pow2(max(C, 16)), ROWS=ROWS, num_warps=4)
    return dw


@torch.library.custom_op("virchow_fast_triton::l2_normalize_fwd", mutates_args=())
def _l2_normalize_fwd(w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(w, eps)


@_l2_normalize_fwd.register_fake
def _(w, eps):
    return torch.empty_like(w, memory_format=torch.contiguous_format), w.new_empty(w.shape[0], dtype=torch.float32)


@torch.library.custom_op("virchow_fast_triton::l2_normalize_bwd", mutates_args=())
def _l2_normalize_bwd(dy: torch.Tensor, w: torch.Tensor, inv: torch.Tensor, eps: float) -> torch.Tensor:
    return _backward(dy, w, inv, eps)


@_l2_normalize_bwd.register_fake
def _(dy, w, inv, eps):
    return torch.empty_like(w, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    w, eps = inputs
    ctx.save_for_backward(w, output[1])
    ctx.eps = eps


def _autograd_backward(ctx, dy, _dinv):
    w, inv = ctx.saved_tensors
    return _l2_normalize_bwd(dy, w, inv, ctx.eps), None


_l2_normalize_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def l2_normalize(w: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """w / max(||w||, eps) row by row (same contract as the reference): w [R, C] fp32 / fp16 / bf16
    -> [R, C] in w's dtype; the gradient is torch's (F.normalize's) in fp32 arithmetic."""
    check_float("l2_normalize w", w)
    if w.dim() != 2:
        raise ValueError(f"l2_normalize: w {tuple(w.shape)} must be [rows, C]")
    return _l2_normalize_fwd(w, float(eps))[0]
