"""SwiGLU on the packed fc1 output: SiLU(first half) * second half, forward and backward.

Spec: :func:`virchow_fast.ops.reference.swiglu` (timm SwiGLUPacked). Traffic per row of width
2H (e bytes): forward reads 2H, writes H (3 H e); backward reads x (2H) and dy (H), writes dx
(2H): 5 H e. Nothing but x is saved; SiLU is recomputed in the backward (free next to the
memory traffic). All arithmetic is fp32 after the loads.

H is a compile-time constant and the outputs (and dy) are dense rows of H / 2H: the compiler then
knows that every row start is a multiple of 8 elements (H = 3416 and 5464 are multiples of 8 but
not of 16, so a runtime H or row stride would be assumed unaligned) and moves 128 bits per access
(tests/kernels/test_sm90_compile.py asserts it at the model widths).

Order: jit kernels -> launchers -> custom ops (autograd) -> public function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_float, last_dim_contiguous, next_pow2

# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _swiglu_fwd_kernel(
    X,  # [R, 2H]: gate = X[:, :H], value = X[:, H:], row stride stride_x
    Y,  # [R, H] (out), dense rows
    stride_x,
    H: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(X + row * stride_x + H + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * v
    tl.store(Y + row * H + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY,  # [R, H], dense rows
    X,  # [R, 2H] forward input, row stride stride_x
    DX,  # [R, 2H] (out), dense rows
    stride_x,
    H: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(X + row * stride_x + H + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * v * sig * (1.0 + g * (1.0 - sig))
    dv = dy * silu
    tl.store(DX + row * (2 * H) + cols, dg.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * (2 * H) + H + cols, dv.to(DX.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _block(h: int) -> int:
    return min(next_pow2(h), 1024)


def _forward(x: torch.Tensor) -> torch.Tensor:
    """x: [R, 2H] -> y: [R, H] in x's dtype."""
    x = last_dim_contiguous(x)
    R, H = x.shape[0], x.shape[1] // 2
    y = torch.empty((R, H), dtype=x.dtype, device=x.device)
    if R == 0 or H == 0:
        return y
    block = _block(H)
    _swiglu_fwd_kernel[(R, triton.cdiv(H, block))](x, y, x.stride(0), H=H, BLOCK=block, num_warps=4)
    return y


def _backward(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy: [R, H], x: [R, 2H] -> dx: [R, 2H] in x's dtype."""
    dy, x = dy.contiguous(), last_dim_contiguous(x)
    R, H = x.shape[0], x.shape[1] // 2
    dx = torch.empty((R, 2 * H), dtype=x.dtype, device=x.device)
    if R == 0 or H == 0:
        return dx
    block = _block(H)
    _swiglu_bwd_kernel[(R, triton.cdiv(H, block))](dy, x, dx, x.stride(0), H=H, BLOCK=block, num_warps=4)
    return dx


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("virchow_fast_triton::swiglu_fwd", mutates_args=())
def _swiglu_fwd(x: torch.Tensor) -> torch.Tensor:
    return _forward(x)


@_swiglu_fwd.register_fake
def _(x):
    return x.new_empty((x.shape[0], x.shape[1] // 2))


@torch.library.custom_op("virchow_fast_triton::swiglu_bwd", mutates_args=())
def _swiglu_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _backward(dy, x)


@_swiglu_bwd.register_fake
def _(dy, x):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _autograd_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _swiglu_bwd(dy, x)


_swiglu_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------

def swiglu(x: torch.Tensor) -> torch.Tensor:
    """SiLU(x[..., :H]) * x[..., H:] for x: [..., 2H] (fp32 / fp16 / bf16) -> [..., H] in x's dtype."""
    check_float("swiglu x", x)
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim {x.shape[-1]} is odd; expected packed [gate, value]")
    y = _swiglu_fwd(x.reshape(-1, x.shape[-1]))
    return y.view(*x.shape[:-1], x.shape[-1] // 2)
