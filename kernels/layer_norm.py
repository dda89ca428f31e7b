"""LayerNorm over the last dim, forward and backward, fp32 statistics.

Spec: :func:`virchow_fast.ops.reference.layer_norm`. Traffic (R rows, C width, e bytes):
forward reads x, writes y (2 R C e); backward reads x and dy, writes dx (3 R C e) plus one fp32
[C] partial per program for dW and db. The backward runs a bounded number of programs (a few per
SM), each looping over a contiguous run of rows and keeping its dW/db partial in registers, so the
final reduction is a small [G, C] sum with no atomics or locks at any row count.

C is a compile-time constant and rows are dense (row stride C; a strided input is copied once), so
the compiler knows every row start's alignment and moves 128 bits per access for any C that is a
multiple of 8 elements, not only for multiples of 16.

:func:`layer_norm_branch` is the pre-norm branch point of a block, ``(LayerNorm(x), x)``: the
backward kernel also takes the residual stream's gradient and adds it into dx (4 R C e), which
saves autograd's separate sum of x's two gradients (3 R C e more).

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
def _ln_row(x, W, B, cols, mask, eps, C: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(y, mean, rstd) of one fp32 row ``x`` (zero past C): the forward's arithmetic, fp32 statistics."""
    mean = tl.sum(x, axis=0) / C
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
    y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return y, mean, rstd


@triton.jit
def _ln_row_grad(x, dy, w, mean, rstd, mask, C: tl.constexpr):
    """(dx, xhat) of one fp32 row: the LayerNorm input gradient (w: fp32 weight row) and the
    normalised input, for the dW / db sums."""
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    wdy = w * dy
    c1 = tl.sum(xhat * wdy, axis=0) / C
    c2 = tl.sum(wdy, axis=0) / C
    return (wdy - (xhat * c1 + c2)) * rstd, xhat


@triton.jit
def _ln_fwd_kernel(
    X,  # [R, C] x
    Y,  # [R, C] y (out)
    W,  # [C]
    B,  # [C] or dummy when not HAS_BIAS
    Mean,  # [R] fp32 (out)
    Rstd,  # [R] fp32 (out)
    XC,  # [R, C] (out, with COPY): x again, the buffer a residual GEMM then updates in place
    eps,
    C: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, COPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    xin = tl.load(X + row * C + cols, mask=mask, other=0.0)
    if COPY:
        tl.store(XC + row * C + cols, xin, mask=mask)
    x = xin.to(tl.float32)
    y, mean, rstd = _ln_row(x, W, B, cols, mask, eps, C, HAS_BIAS)
    tl.store(Y + row * C + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _ln_bwd_kernel(
    DY,  # [R, C] upstream gradient
    DRES,  # [R, C] gradient of the pass-through x, added to dx (unused without HAS_RES)
    X,  # [R, C] forward input
    W,  # [C]
    Mean,  # [R] fp32
    Rstd,  # [R] fp32
    DX,  # [R, C] (out)
    DW_partial,  # [G, C] fp32 (out), one row per program
    DB_partial,  # [G, C] fp32 (out)
    R, rows_per_program,
    C: tl.constexpr, BLOCK_C: tl.constexpr, HAS_RES: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: the loop variable inherits it
    row_end = tl.minimum(row_start + rows_per_program, R)
    for r in range(row_start, row_end):
        x = tl.load(X + r * C + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * C + cols, mask=mask, other=0.0).to(tl.float32)
        dx, xhat = _ln_row_grad(x, dy, w, tl.load(Mean + r), tl.load(Rstd + r), mask, C)
        if HAS_RES:  # the residual stream's own gradient, summed here instead of in a separate add
            dx += tl.load(DRES + r * C + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r * C + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    tl.store(DW_partial + pid * C + cols, dw, mask=mask)
    tl.store(DB_partial + pid * C + cols, db, mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _warps(block_c: int) -> int:
    return min(max(block_c // 256, 1), 16)


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, copy: bool = False):
    """x: [R, C] -> y [R, C] (x.dtype), mean [R] fp32, rstd [R] fp32 (and with ``copy`` a copy of x,
    written as x is read: one more write, no read)."""
    x = x.contiguous()
    R, C = x.shape
    y = torch.empty((R, C), dtype=x.dtype, device=x.device)
    mean = torch.empty(R, dtype=torch.float32, device=x.device)
    rstd = torch.empty(R, dtype=torch.float32, device=x.device)
    xc = torch.empty((R, C), dtype=x.dtype, device=x.device) if copy else None
    if R > 0:
        block_c = next_pow2(C)
        _ln_fwd_kernel[(R,)](
            x, y, weight, bias if bias is not None else weight, mean, rstd, xc if copy else y,
            eps, C=C, HAS_BIAS=bias is not None, BLOCK_C=block_c, COPY=copy, num_warps=_warps(block_c),
        )
    return (y, mean, rstd, xc) if copy else (y, mean, rstd)


def _backward(dy, x, weight, mean, rstd, dres=None):
    """-> dx [R, C] (x.dtype), dw [C] fp32, db [C] fp32; ``dres`` [R, C] (or None) is added to dx."""
    dy, x = dy.contiguous(), x.contiguous()
    dres = None if dres is None else dres.contiguous()
    R, C = x.shape
    dx = torch.empty((R, C), dtype=x.dtype, device=x.device)
    g = num_programs(x.device, R)
    dw_partial = torch.empty((g, C), dtype=torch.float32, device=x.device)
    db_partial = torch.empty((g, C), dtype=torch.float32, device=x.device)
    if R == 0:
        return dx, dw_partial.zero_().sum(0), db_partial.zero_().sum(0)
    block_c = next_pow2(C)
    _ln_bwd_kernel[(g,)](
        dy, dres if dres is not None else dy, x, weight, mean, rstd, dx, dw_partial, db_partial,
        R, triton.cdiv(R, g), C=C, BLOCK_C=block_c, HAS_RES=dres is not None, num_warps=_warps(block_c),
    )
    return dx, dw_partial.sum(0), db_partial.sum(0)


# ------------------------------------------------------------------------------------------------
# Custom ops: torch.compile and FSDP see two opaque ops with fake (meta) implementations
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("virchow_fast_triton::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, eps)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    R, C = x.shape
    stats = x.new_empty(R, dtype=torch.float32)
    return x.new_empty((R, C)), stats, torch.empty_like(stats)


@torch.library.custom_op("virchow_fast_triton::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor, dres: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy, x, weight, mean, rstd, dres)


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, dres):
    C = x.shape[1]
    return x.new_empty(x.shape), x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32)


@torch.library.custom_op("virchow_fast_triton::layer_norm_fwd_copy", mutates_args=())
def _layer_norm_fwd_copy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """_layer_norm_fwd and a copy of x (layer_norm_branch's ``copy``); its autograd is _LayerNormBranch's."""
    return _forward(x, weight, bias, eps, copy=True)


@_layer_norm_fwd_copy.register_fake
def _(x, weight, bias, eps):
    R, C = x.shape
    stats = x.new_empty(R, dtype=torch.float32)
    return x.new_empty((R, C)), stats, torch.empty_like(stats), x.new_empty((R, C))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _autograd_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd(dy, x, weight, mean, rstd, None)
    return dx, dw.to(weight.dtype), db.to(ctx.bias_dtype) if ctx.has_bias else None, None


_layer_norm_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


class _LayerNormBranch(torch.autograd.Function):
    """(LayerNorm(x), x) for a pre-norm branch point: x goes on as the residual stream.

    Autograd would sum the two gradients of x (the residual path's and the norm's dx) in a separate
    add, which reads both and writes the sum (3 R C e). Returning x itself from this function makes
    both gradients arrive at one backward, and the LayerNorm backward kernel adds the residual one
    as it writes dx (one more read: R C e), so the add is gone.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, copy=False):
        x2 = x.reshape(-1, x.shape[-1])
        if copy:  # the residual stream as a new buffer (the block's residual GEMM updates it in place)
            y, mean, rstd, xc = _layer_norm_fwd_copy(x2, weight, bias, eps)
        else:
            y, mean, rstd = _layer_norm_fwd(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias, ctx.bias_dtype, ctx.shape = bias is not None, None if bias is None else bias.dtype, x.shape
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zero tensor to read)
        if copy:  # not a view when x is [R, C] (a view could not be updated in place)
            return y.view(x.shape), (xc if x.dim() == 2 else xc.view(x.shape))
        return y.view(x.shape), x

    @staticmethod
    def backward(ctx, dy, dres):
        x2, weight, mean, rstd = ctx.saved_tensors
        if dy is None:  # only the residual stream was used
            return dres, None, None, None, None
        C = x2.shape[1]
        dres = None if dres is None else dres.reshape(-1, C)
        dx, dw, db = _layer_norm_bwd(dy.reshape(-1, C), x2, weight, mean, rstd, dres)
        return (dx.view(ctx.shape), dw.to(weight.dtype) if ctx.needs_input_grad[1] else None,
                db.to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None, None, None)


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------

def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with fp32 statistics (same contract as the reference).

    x: [..., C] fp32 / fp16 / bf16; weight, bias: [C] (any float dtype; bias may be None).
    Returns y: [..., C] in x's dtype.
    """
    check_float("layer_norm x", x)
    C = x.shape[-1]
    y, _, _ = _layer_norm_fwd(x.reshape(-1, C), weight, bias, float(eps))
    return y.view(x.shape)


def layer_norm_branch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      eps: float, copy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x, ...), x): the norm of a pre-norm branch and the residual stream it branches from.

    Same values as the reference's; the backward returns x's two gradients summed by the LayerNorm
    backward kernel (no separate add). copy: the stream comes back as a new buffer holding x,
    written by the forward kernel as it reads x (one more write), which the caller may update in
    place (the block's ``addmm_``; x itself is saved for the backward).
    """
    check_float("layer_norm x", x)
    return _LayerNormBranch.apply(x, weight, bias, float(eps), bool(copy))


layer_norm.branch = layer_norm_branch  # what ops.layer_norm_branch runs on this backend
