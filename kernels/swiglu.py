"""SwiGLU on the packed fc1 output with fc1's bias fused: SiLU(g) * v, [g, v] = x + bias, fwd and bwd.

Spec: :func:`virchow_fast.ops.reference.swiglu` (timm SwiGLUPacked). The model calls it on
``x @ W1^T`` with fc1's bias, so neither the bias add nor its gradient is a pass of its own.
Traffic per row of width 2H (e bytes): forward reads 2H, writes H (3 H e); backward reads x (2H)
and dy (H), writes dx (2H): 5 H e. The bias ([2H], read once per program, from L2) adds nothing
to the row traffic; its gradient, the column sums of dx, is accumulated in fp32 registers over
each program's rows and written once, one fp32 [2H] row per program (bounded, no atomics), instead
of a separate full read of dx. Nothing but x (and the bias) is saved; x + bias and SiLU are
recomputed in the backward (free next to the memory traffic). All arithmetic is fp32 after the
loads.

For the block's fc2, whose GEMM also does the residual add, bias, LayerScale and drop path
(model/vit.py), the output rows are ``[k * y, k, 0 ...]``: each row times its crop's drop-path
factor k = keep[seg_ids[row]] (1 without keep) and PAD more columns, the first of which (k)
multiplies the bias row of the GEMM's weight (kernels/residual_weight.py). Free in traffic: a
factor per row and PAD elements; the backward scales dy by the same k and never reads the PAD
columns of its gradient.

H and PAD are compile-time constants and the outputs (and dy) are dense rows of H + PAD / 2H: the
compiler then knows that every row start is a multiple of 8 elements (H = 3416 and 5464 are
multiples of 8 but not of 16, so a runtime H or row stride would be assumed unaligned) and moves
128 bits per access (tests/kernels/test_sm90_compile.py asserts it at the model widths).

Order: jit kernels -> launchers -> custom ops (autograd) -> public function.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import check_float, check_keep_pad, last_dim_contiguous, next_pow2, num_programs

# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _swiglu_fwd_kernel(
    X,  # [R, 2H]: gate = X[:, :H], value = X[:, H:], row stride stride_x
    B,  # [2H] fc1 bias (unused without HAS_BIAS)
    KEEP,  # [S] per-crop factor (unused without HAS_KEEP)
    SEG,  # [R] int64 crop of each row (unused without HAS_KEEP)
    Y,  # [R, H + PAD] (out), dense rows
    stride_x,
    H: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(X + row * stride_x + H + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        g += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        v += tl.load(B + H + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * v
    k = 1.0
    if HAS_KEEP:
        k = tl.load(KEEP + tl.load(SEG + row)).to(tl.float32)
        y = y * k
    tl.store(Y + row * (H + PAD) + cols, y.to(Y.dtype.element_ty), mask=mask)
    if PAD > 0:
        if tl.program_id(1) == 0:  # the bias column (the row's factor) and zeros, once per row
            pc = tl.arange(0, PAD)
            tl.store(Y + row * (H + PAD) + H + pc, tl.where(pc == 0, k, 0.0).to(Y.dtype.element_ty))


@triton.jit
def _swiglu_bwd_kernel(
    DY,  # [R, H + PAD], dense rows (the PAD columns are not read)
    X,  # [R, 2H] forward input, row stride stride_x
    B,  # [2H] fc1 bias (unused without HAS_BIAS)
    KEEP,  # [S] per-crop factor (unused without HAS_KEEP)
    SEG,  # [R] int64 crop of each row (unused without HAS_KEEP)
    DX,  # [R, 2H] (out), dense rows
    DB_partial,  # [P, 2H] fp32 (out), one row per program along the rows (unused without HAS_BIAS)
    stride_x, R, rows_per_program,
    H: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    bg = tl.zeros([BLOCK], dtype=tl.float32)
    bv = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_BIAS:
        bg = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        bv = tl.load(B + H + cols, mask=mask, other=0.0).to(tl.float32)
    dbg = tl.zeros([BLOCK], dtype=tl.float32)
    dbv = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: the loop variable inherits it
    row_end = tl.minimum(row_start + rows_per_program, R)
    for r in range(row_start, row_end):
        g = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(X + r * stride_x + H + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * (H + PAD) + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_KEEP:
            dy = dy * tl.load(KEEP + tl.load(SEG + r)).to(tl.float32)
        if HAS_BIAS:
            g += bg
            v += bv
        sig = tl.sigmoid(g)
        silu = g * sig
        dg = dy * v * sig * (1.0 + g * (1.0 - sig))
        dv = dy * silu
        tl.store(DX + r * (2 * H) + cols, dg.to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + r * (2 * H) + H + cols, dv.to(DX.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            dbg += dg
            dbv += dv
    if HAS_BIAS:
        tl.store(DB_partial + pid * (2 * H) + cols, dbg, mask=mask)
        tl.store(DB_partial + pid * (2 * H) + H + cols, dbv, mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _block(h: int) -> int:
    return min(next_pow2(h), 1024)


def _keep_args(keep: torch.Tensor | None, seg_ids: torch.Tensor | None, x: torch.Tensor):
    """(KEEP, SEG) kernel arguments: the tensors, or aliases of x the kernel never reads."""
    if keep is None:
        return x, x
    return keep.contiguous(), seg_ids.contiguous()


def _forward(x: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor | None = None,
             seg_ids: torch.Tensor | None = None, pad: int = 0) -> torch.Tensor:
    """x: [R, 2H]; bias: [2H] or None; keep [S] / seg_ids [R] or None -> y: [R, H + pad] in x's dtype."""
    x = last_dim_contiguous(x)
    bias = None if bias is None else bias.contiguous()
    R, H = x.shape[0], x.shape[1] // 2
    y = torch.empty((R, H + pad), dtype=x.dtype, device=x.device)
    if R == 0 or H == 0:
        if pad:
            y[:, H:].zero_()
        return y
    block = _block(H)
    kp, sp = _keep_args(keep, seg_ids, x)
    _swiglu_fwd_kernel[(R, triton.cdiv(H, block))](
        x, bias if bias is not None else x, kp, sp, y, x.stride(0),
        H=H, BLOCK=block, HAS_BIAS=bias is not None, HAS_KEEP=keep is not None, PAD=pad, num_warps=4)
    return y


def _backward(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor | None = None,
              seg_ids: torch.Tensor | None = None, pad: int = 0):
    """dy: [R, H + pad], x: [R, 2H], bias: [2H] or None -> dx [R, 2H] (x.dtype), dbias [2H] fp32
    (zeros without bias)."""
    dy, x = dy.contiguous(), last_dim_contiguous(x)
    bias = None if bias is None else bias.contiguous()
    R, H = x.shape[0], x.shape[1] // 2
    dx = torch.empty((R, 2 * H), dtype=x.dtype, device=x.device)
    p = num_programs(x.device, R)
    partial = torch.empty((p, 2 * H), dtype=torch.float32, device=x.device)
    if R == 0 or H == 0 or bias is None:
        partial.zero_()
    if R == 0 or H == 0:
        return dx, partial.sum(0)
    block = _block(H)
    kp, sp = _keep_args(keep, seg_ids, x)
    _swiglu_bwd_kernel[(p, triton.cdiv(H, block))](
        dy, x, bias if bias is not None else x, kp, sp, dx, partial, x.stride(0), R, triton.cdiv(R, p),
        H=H, BLOCK=block, HAS_BIAS=bias is not None, HAS_KEEP=keep is not None, PAD=pad, num_warps=4)
    return dx, partial.sum(0)


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("virchow_fast_triton::swiglu_fwd", mutates_args=())
def _swiglu_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], keep: Optional[torch.Tensor] = None,
                seg_ids: Optional[torch.Tensor] = None, pad: int = 0) -> torch.Tensor:
    return _forward(x, bias, keep, seg_ids, pad)


@_swiglu_fwd.register_fake
def _(x, bias, keep=None, seg_ids=None, pad=0):
    return x.new_empty((x.shape[0], x.shape[1] // 2 + pad))


@torch.library.custom_op("virchow_fast_triton::swiglu_bwd", mutates_args=())
def _swiglu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], keep: Optional[torch.Tensor] = None,
                seg_ids: Optional[torch.Tensor] = None, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, x, bias, keep, seg_ids, pad)


@_swiglu_bwd.register_fake
def _(dy, x, bias, keep=None, seg_ids=None, pad=0):
    return x.new_empty(x.shape), x.new_empty(x.shape[1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, bias, keep, seg_ids, pad = inputs
    ctx.save_for_backward(x, bias, keep, seg_ids)
    ctx.pad = pad


def _autograd_backward(ctx, dy):
    x, bias, keep, seg_ids = ctx.saved_tensors
    dx, dbias = _swiglu_bwd(dy, x, bias, keep, seg_ids, ctx.pad)
    return dx, None if bias is None else dbias.to(bias.dtype), None, None, None


_swiglu_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------

def swiglu(x: torch.Tensor, bias: torch.Tensor | None = None, keep: torch.Tensor | None = None,
           seg_ids: torch.Tensor | None = None, pad: int = 0) -> torch.Tensor:
    """SiLU(g) * v, [g, v] = (x + bias) split in halves (same contract as the reference).

    x: [..., 2H] (fp32 / fp16 / bf16); bias: [2H] (fp32 / fp16 / bf16, may differ from x) or None.
    keep [S] / seg_ids [R]: each row times its crop's stochastic-depth factor keep[seg_ids[row]]
    (x then 2-D, [R, 2H]). pad > 0 (a multiple of 8): [R, H + pad] rows ``[k * y, k, 0, ...]``, k the
    row's factor (1 without keep): the input of fc2 as the block's residual GEMM takes it, with the
    bias column (see model/vit.py). Returns [..., H + pad] in x's dtype; the backward gives dx in
    x's dtype and dbias in bias's dtype (column sums of d(x + bias) over all rows, accumulated in
    fp32); the gradient of the pad columns is ignored.
    """
    check_float("swiglu x", x)
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim {x.shape[-1]} is odd; expected packed [gate, value]")
    if bias is not None:
        check_float("swiglu bias", bias)
        if bias.shape != x.shape[-1:]:
            raise ValueError(f"swiglu: bias {tuple(bias.shape)} does not match x {tuple(x.shape)}; "
                             f"expected [{x.shape[-1]}]")
    pad = check_keep_pad("swiglu", x.numel() // max(x.shape[-1], 1), keep, seg_ids, pad)
    y = _swiglu_fwd(x.reshape(-1, x.shape[-1]), bias, keep, seg_ids, pad)
    return y.view(*x.shape[:-1], x.shape[-1] // 2 + pad)
