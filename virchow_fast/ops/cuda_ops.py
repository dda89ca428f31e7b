"""The CUDA extension's ops (``virchow_fast._C``, built from csrc/): fake kernels, autograd, wrappers.

csrc/bindings.cpp defines the schemas and CUDA kernels of ``torch.ops.virchow_fast_cuda.*``; this module
adds what torch.compile and autograd need (fake kernels, ``register_autograd``) and the functions
with the reference's signatures that the op table (ops/table.py) names as the ``cuda`` backend.
Importing it raises ImportError when the extension is not built.
"""
from __future__ import annotations

import torch

from . import reference
from .reference import AllReduce

try:
    from virchow_fast import _C  # noqa: F401  (loading the library registers torch.ops.virchow_fast_cuda)
except ImportError as exc:
    raise ImportError(f"virchow_fast._C is not built (pip install with torch CUDA and CUDA_HOME): {exc}") from exc

_ops = torch.ops.virchow_fast_cuda


# ---------------------------------------------------------------------------------------------
# fake (meta) kernels: shapes and dtypes only
# ---------------------------------------------------------------------------------------------

@torch.library.register_fake("virchow_fast_cuda::layer_norm_fwd")
def _layer_norm_fwd_fake(x, weight, bias, eps):
    rows = x.numel() // x.shape[-1]
    stat = x.new_empty(rows, dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stat, torch.empty_like(stat)


@torch.library.register_fake("virchow_fast_cuda::layer_norm_bwd")
def _layer_norm_bwd_fake(dy, x, weight, mean, rstd):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
            torch.empty_like(weight))


@torch.library.register_fake("virchow_fast_cuda::softmax_center")
def _softmax_center_fake(logits, center, temp):
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.register_fake("virchow_fast_cuda::sinkhorn_col_sums")
def _sinkhorn_col_sums_fake(q):
    return q.new_empty(q.shape[1])


@torch.library.register_fake("virchow_fast_cuda::sinkhorn_normalize_rows_")
def _sinkhorn_normalize_rows_fake(q, col, col_scale, row_target):
    return None


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------

def _ln_setup(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _ops.layer_norm_bwd(dy, x, weight, mean, rstd)
    return dx, dw, None if ctx.bias_dtype is None else db.to(ctx.bias_dtype), None


torch.library.register_autograd("virchow_fast_cuda::layer_norm_fwd", _ln_backward, setup_context=_ln_setup)


# ---------------------------------------------------------------------------------------------
# the reference's signatures
# ---------------------------------------------------------------------------------------------

def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim, fp32 statistics; x [..., C] (C <= 2048), weight/bias [C]."""
    return _ops.layer_norm_fwd(x, weight, bias, eps)[0]


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iters: int = 3, all_reduce: AllReduce = None,
                   total_rows: int | None = None) -> torch.Tensor:
    """:func:`reference.sinkhorn_knopp` with each iteration as two CUDA kernels around the all-reduce.

    Works in place on one fp32 [M, K] buffer (the reference makes a new one per step).
    """
    q = teacher_logits.float().div(temp).exp_()
    n_rows = float(total_rows if total_rows is not None else q.shape[0])
    total = q.sum().reshape(1)
    if all_reduce is not None:
        all_reduce(total)
    q.div_(total)
    for it in range(n_iters):
        col = _ops.sinkhorn_col_sums(q)
        if all_reduce is not None:
            all_reduce(col)
        # columns to 1/K, rows to 1/B; the last iteration folds in the reference's final * B
        _ops.sinkhorn_normalize_rows_(q, col, 1.0 / q.shape[1], 1.0 if it == n_iters - 1 else 1.0 / n_rows)
    if n_iters == 0:
        q.mul_(n_rows)
    return q


@torch.no_grad()
def teacher_probs(teacher_z: torch.Tensor, teacher_w: torch.Tensor, teacher_temp: float, centering: str,
                  center: torch.Tensor | None = None, sinkhorn_iters: int = 3, all_reduce: AllReduce = None,
                  total_rows: int | None = None) -> torch.Tensor:
    """Teacher targets [M, K]; same contract as :func:`reference.teacher_probs`."""
    logits = reference.prototype_logits(teacher_z, teacher_w)
    if centering == "sinkhorn":
        return sinkhorn_knopp(logits, teacher_temp, sinkhorn_iters, all_reduce, total_rows)
    if centering == "softmax":
        return _ops.softmax_center(logits, center, teacher_temp)
    raise ValueError(f"centering {centering!r}: expected 'sinkhorn' or 'softmax'")


def prototype_loss(*args, **kwargs):
    """The reference head loss with its teacher targets from the CUDA centering kernels above."""
    return reference.prototype_loss(*args, targets=teacher_probs, **kwargs)
