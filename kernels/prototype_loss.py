"""Fused DINO / iBOT head loss: prototype cross-entropy with Sinkhorn-Knopp or softmax-center
teacher targets, without ever storing a [rows, K] logit matrix.

Spec: :func:`virchow_fast.ops.reference.prototype_loss`. Notation: student features Z [N, b],
student prototypes W [K, b], teacher features Zt [M, b], teacher prototypes Wt [K, b], pairs
(s_p, t_p, w_p), p = 0..P-1; S = Z W^T, T = Zt Wt^T (never materialised).

The teacher targets are kept as two scaling vectors: p_mk = exp(T_mk / t_t + beta_k + alpha_m).
  softmax-center: beta = -center / t_t, alpha_m = -logsumexp_k(T_mk / t_t + beta_k).
  Sinkhorn-Knopp: Q = diag(r) exp(T / t_t) diag(c) in log form; each iteration is one column pass
  (S_k = sum_m exp(T_mk / t_t + alpha_m), all-reduced, beta = -log(K S_k)) and one row pass
  (alpha = -logsumexp_k(...) - log(total_rows)); the final * total_rows leaves rows summing to 1.
  The reference's initial division by the grand total is a uniform row scale that the first column
  pass cancels exactly, so it is skipped (one all-reduce fewer) unless n_iters == 0.
The loss is linear in the targets, so the cross term needs only y = P @ W ([M, b], P the teacher
probabilities, W the student prototypes):
  CE_p = lse_s(S / t_s) - (1 / t_s) z_s . y_t          (rows of P sum to 1)
and the gradients are
  dZ = (g * (softmax(S / t_s) @ W) - Ybar) / t_s,     g_n = sum_{p: s_p = n} w_p,  Ybar_n = sum w_p y_t
  dW = (softmax(S / t_s)^T (g Z) - P^T Zbar) / t_s,   Zbar_m = sum_{p: t_p = m} w_p z_s
Three tiled kernels cover every pass (each recomputes its logit tile from the features):
  _row_lse: per-row logsumexp over K            (split over K, partials merged on the host)
  _row_expect: per-row sum_k p_k V_k, V [K, b]    (split over K, partials summed); ONLINE: softmax
               @ V and its logsumexp together, flash-attention style (the last Sinkhorn row pass
               yields y, the student's lse pass yields softmax @ W)
  _col_reduce: per-prototype sum_m p_mk g_m  or  sum_m p_mk V_m, V [M, b]
Passes (each 2 R K b FLOPs for its logit tiles, plus as much again for the second dot of the
expect / reduce passes): teacher 2 x iters (Sinkhorn) or 1 (softmax), the last one giving y, + dW;
student 1 (lse and softmax @ W) + dW: 7 teacher-sized and 2 student-sized passes at 3 iterations.
The gradients are computed in the forward (the loss is a scalar) and scaled in
place by the incoming gradient in the backward, as Liger's fused linear cross-entropy does.
Memory, fp32 words, nothing of size [N, K], [M, K] or [P, K]:
  K (b + 3)                      dW (the gradient itself) and the vectors beta, column sums, mean
  (4 N + 3 M + 2 P) b            y, Zbar, Ybar, softmax @ W, dZ, gathered z_s and y_t
  <= 2^23 (32 MiB)               split-K partials of the row passes
against the eager reference's N K + 2 M K + several P K (each [2458, 131072] fp32 buffer of the
ViT-G iBOT head is 1.2 GiB).

Order: launchers -> custom ops -> teacher scalings and loss (autograd) -> public function; the jit
kernels are in kernels/_prototype_loss_jit.py.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton

from virchow_fast.ops.reference import AllReduce

from . import _common
from ._prototype_loss_jit import _col_reduce_kernel, _row_expect_kernel, _row_lse_kernel

# fp32 features use TF32 tensor cores on the GPU unless VIRCHOW_FAST_HEAD_LOSS_PRECISION=ieee
# (logits are divided by t_t = 0.04 so TF32's ~1e-3 relative error shows in the targets).
_PRECISION = os.environ.get("VIRCHOW_FAST_HEAD_LOSS_PRECISION", "tf32")


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def _e_blocks(e: int) -> tuple[int, int]:
    """E as two power-of-two chunks (the largest power of two <= E, then the rest padded): 384 ->
    (256, 128), 256 -> (256, 0); one chunk padded to 512 would waste a quarter of the value MMAs."""
    first = max(16, 1 << (max(int(e), 1).bit_length() - 1))
    rest = int(e) - first
    return first, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def _config(kind: str, d: int, e: int = 16):
    """(BLOCK_R, BLOCK_C, BLOCK_D, BLOCK_E, BLOCK_E1, num_warps, num_stages) of one kernel kind.

    Every tile that feeds a tl.dot has 64 rows (the smallest wgmma M on sm_90a; 32-row tiles fall
    back to mma.sync), 8 warps, 2 stages: ptxas (sm_90a, Triton 3.6) spills nothing for fp32 and
    bf16 operands at E = 256 and 384 (tests/kernels/test_sm90_compile.py checks every launch).
    The value passes take 32 prototypes per step when E > 256 so their shared memory fits.
    Not timed on a GPU yet (none lent so far): autotuning is the next step once one is.
    """
    block_e, block_e1 = _e_blocks(e)
    if _common.interpreting():  # the interpreter pays per op, not per element: big tiles
        return 32, 128, max(16, min(256, triton.next_power_of_2(d))), block_e, block_e1, 4, 1
    block_d = max(16, min(64, triton.next_power_of_2(d)))
    if kind == "row_expect":  # fp32 accumulators [BLOCK_R, E]
        return 64, (64 if block_e + block_e1 <= 256 else 32), block_d, block_e, block_e1, 8, 2
    if kind == "col_values":  # fp32 accumulators [BLOCK_C, E]
        return (64 if block_e + block_e1 <= 256 else 32), 64, block_d, block_e, block_e1, 8, 2
    return 64, 64, block_d, block_e, block_e1, 8, 2  # row_lse, col_sum


_MAX_PARTIAL = 1 << 23  # fp32 elements of split-K partials (32 MiB)


def _splits(device: torch.device, row_blocks: int, rows: int, width: int, cols: int, block_c: int):
    """Split K so that row blocks x splits fills the GPU (~4 programs per SM) while the fp32
    partials (splits x rows x width) stay under 32 MiB; returns (splits, cols per split)."""
    sms = _common.sm_count(device)
    target = 4 * sms if sms else 4
    splits = min(triton.cdiv(cols, block_c), triton.cdiv(target, row_blocks), _MAX_PARTIAL // max(1, rows * width))
    splits = max(1, splits)
    per = triton.cdiv(triton.cdiv(cols, splits), block_c) * block_c
    return triton.cdiv(cols, per), per


def _same_dtype(z: torch.Tensor, w: torch.Tensor):
    dt = torch.promote_types(z.dtype, w.dtype)
    return z.to(dt).contiguous(), w.to(dt).contiguous()


def _lse(z, w, scale: float, beta=None):
    """logsumexp_k(scale * (z @ w^T) + beta) -> [R] fp32. z: [R, D], w: [C, D], beta: [C] or None."""
    z, w = _same_dtype(z, w)
    (R, D), C = z.shape, w.shape[0]
    if R == 0:  # no rows (e.g. no masked token on this rank)
        return torch.empty(0, device=z.device, dtype=torch.float32)
    br, bc, bd, _, _, warps, stages = _config("row_lse", D)
    splits, per = _splits(z.device, triton.cdiv(R, br), R, 2, C, bc)
    m = torch.empty(splits, R, device=z.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    _row_lse_kernel[(triton.cdiv(R, br), splits)](
        z, w, beta if beta is not None else m, m, lsum, R, C, D, z.stride(0), w.stride(0), scale, per,
        HAS_BETA=beta is not None, BLOCK_R=br, BLOCK_C=bc, BLOCK_D=bd, PRECISION=_PRECISION,
        num_warps=warps, num_stages=stages)
    return torch.logsumexp(m + lsum.log(), dim=0)


def _expect_partials(z, w, scale: float, beta, alpha, v):
    z, w = _same_dtype(z, w)
    v = v.contiguous()
    (R, D), (C, E) = z.shape, v.shape
    online = alpha is None
    if R == 0:  # no rows (e.g. no masked token on this rank)
        f32 = dict(device=z.device, dtype=torch.float32)
        return torch.empty(1, 0, E, **f32), torch.empty(1, 0, **f32), torch.empty(1, 0, **f32)
    br, bc, bd, be, be1, warps, stages = _config("row_expect", D, E)
    splits, per = _splits(z.device, triton.cdiv(R, br), R, E, C, bc)
    out = torch.empty(splits, R, E, device=z.device, dtype=torch.float32)
    m = torch.empty(splits, R, device=z.device, dtype=torch.float32) if online else out
    lsum = torch.empty_like(m) if online else out
    _row_expect_kernel[(triton.cdiv(R, br), splits)](
        z, w, beta if beta is not None else out, alpha.contiguous() if not online else out, v, out, m, lsum,
        R, C, D, E, z.stride(0), w.stride(0), v.stride(0), scale, per,
        HAS_BETA=beta is not None, ONLINE=online, BLOCK_R=br, BLOCK_C=bc, BLOCK_D=bd, BLOCK_E=be,
        BLOCK_E1=max(16, be1), SPLIT_E=be1 > 0,
        PRECISION=_PRECISION, num_warps=warps, num_stages=stages)
    return out, m, lsum


def _expect(z, w, scale: float, beta, alpha, v):
    """sum_k exp(scale * (z @ w^T) + beta + alpha[:, None])_rk v_k -> [R, E] fp32; v: [C, E]."""
    out, _, _ = _expect_partials(z, w, scale, beta, alpha, v)
    return out.sum(0) if out.shape[0] > 1 else out[0]


def _softmax_expect(z, w, scale: float, beta, v):
    """(softmax_k(x) @ v [R, E], logsumexp_k(x) [R]) for x = scale * (z @ w^T) + beta, in one pass."""
    out, m, lsum = _expect_partials(z, w, scale, beta, None, v)
    m_all = m.max(0).values  # [R]; splits merged as in flash-decoding
    f = torch.exp(m - m_all)  # [S, R]
    l_all = (f * lsum).sum(0)
    y = (f[:, :, None] * out).sum(0) / l_all[:, None]
    return y, m_all + torch.log(l_all)


def _col_reduce(z, w, scale: float, beta, alpha, v=None, coef: float = 1.0, out=None):
    """coef * sum_r p_rc v_r -> [C, E] fp32 (or [C] without v), p = exp(scale z w^T + beta + alpha).

    With ``out`` given (contiguous fp32) the result is added to it in place: one [C, E] buffer
    holds both terms of dW.
    """
    z, w = _same_dtype(z, w)
    (R, D), C = z.shape, w.shape[0]
    E = v.shape[1] if v is not None else 1
    br, bc, bd, be, be1, warps, stages = _config("col_values" if v is not None else "col_sum", D, E)
    accumulate = out is not None
    if out is None:
        out = torch.empty((C, E) if v is not None else (C,), device=z.device, dtype=torch.float32)
    has_v = v is not None
    v = v.contiguous() if has_v else out
    _col_reduce_kernel[(triton.cdiv(C, bc),)](
        z, w, beta if beta is not None else out, alpha.contiguous(), v, out, R, C, D, E,
        z.stride(0), w.stride(0), v.stride(0), scale, coef,
        HAS_BETA=beta is not None, HAS_V=has_v, ACCUMULATE=accumulate, BLOCK_R=br, BLOCK_C=bc,
        BLOCK_D=bd, BLOCK_E=be, BLOCK_E1=max(16, be1), SPLIT_E=be1 > 0, PRECISION=_PRECISION, num_warps=warps,
        num_stages=stages)
    return out


# custom ops: torch.compile and FSDP see each pass as one opaque node with a fake (shape-only) kernel

@torch.library.custom_op("virchow_fast_triton::head_row_lse", mutates_args=())
def _row_lse_op(z: torch.Tensor, w: torch.Tensor, scale: float, beta: Optional[torch.Tensor]) -> torch.Tensor:
    return _lse(z, w, scale, beta)


@_row_lse_op.register_fake
def _(z, w, scale, beta):
    return z.new_empty(z.shape[0], dtype=torch.float32)


@torch.library.custom_op("virchow_fast_triton::head_row_expect", mutates_args=())
def _row_expect_op(z: torch.Tensor, w: torch.Tensor, scale: float, beta: Optional[torch.Tensor],
                   alpha: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _expect(z, w, scale, beta, alpha, v).contiguous()


@_row_expect_op.register_fake
def _(z, w, scale, beta, alpha, v):
    return z.new_empty(z.shape[0], v.shape[1], dtype=torch.float32)


@torch.library.custom_op("virchow_fast_triton::head_row_softmax_expect", mutates_args=())
def _row_softmax_expect_op(z: torch.Tensor, w: torch.Tensor, scale: float, beta: Optional[torch.Tensor],
                           v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _softmax_expect(z, w, scale, beta, v)


@_row_softmax_expect_op.register_fake
def _(z, w, scale, beta, v):
    return z.new_empty(z.shape[0], v.shape[1], dtype=torch.float32), z.new_empty(z.shape[0], dtype=torch.float32)


@torch.library.custom_op("virchow_fast_triton::head_col_sum", mutates_args=())
def _col_sum_op(z: torch.Tensor, w: torch.Tensor, scale: float, beta: Optional[torch.Tensor],
                alpha: torch.Tensor) -> torch.Tensor:
    return _col_reduce(z, w, scale, beta, alpha)


@_col_sum_op.register_fake
def _(z, w, scale, beta, alpha):
    return w.new_empty(w.shape[0], dtype=torch.float32)


@torch.library.custom_op("virchow_fast_triton::head_col_reduce", mutates_args=())
def _col_reduce_op(z: torch.Tensor, w: torch.Tensor, scale: float, beta: Optional[torch.Tensor],
                   alpha: torch.Tensor, v: torch.Tensor, coef: float) -> torch.Tensor:
    return _col_reduce(z, w, scale, beta, alpha, v, coef)


@_col_reduce_op.register_fake
def _(z, w, scale, beta, alpha, v, coef):
    return w.new_empty(w.shape[0], v.shape[1], dtype=torch.float32)


@torch.library.custom_op("virchow_fast_triton::head_col_reduce_add_", mutates_args=("out",))
def _col_reduce_add_op(out: torch.Tensor, z: torch.Tensor, w: torch.Tensor, scale: float,
                       beta: Optional[torch.Tensor], alpha: torch.Tensor, v: torch.Tensor, coef: float) -> None:
    _col_reduce(z, w, scale, beta, alpha, v, coef, out=out)


@_col_reduce_add_op.register_fake
def _(out, z, w, scale, beta, alpha, v, coef):
    return None


def teacher_scalings(teacher_z, teacher_w, teacher_temp: float, centering: str, center=None,
                     sinkhorn_iters: int = 3, all_reduce: AllReduce = None, total_rows: int | None = None,
                     values=None):
    """(alpha [M], beta [K]) with teacher probs p_mk = exp(T_mk / t_t + beta_k + alpha_m), fp32.

    Equals :func:`reference.teacher_probs` without storing [M, K]; all_reduce sums the [K] column
    sums (and the grand total when sinkhorn_iters == 0) across ranks, as the reference does.
    With values [K, E] (the student prototypes) the last row pass also accumulates y = P @ values
    and (alpha, beta, y [M, E]) is returned.
    """
    M, K = teacher_z.shape[0], teacher_w.shape[0]
    inv_t = 1.0 / teacher_temp

    def last_row_pass(beta):  # rows to 1; with values, P @ values in the same pass
        if values is None:
            return -_row_lse_op(teacher_z, teacher_w, inv_t, beta), None
        y, lse = _row_softmax_expect_op(teacher_z, teacher_w, inv_t, beta, values)
        return -lse, y

    if centering == "softmax":
        beta = -center.float() * inv_t
        alpha, y = last_row_pass(beta)
        return (alpha, beta) if values is None else (alpha, beta, y)
    if centering != "sinkhorn":
        raise ValueError(f"centering {centering!r}: expected 'sinkhorn' or 'softmax'")
    # max(., 1): with no rows anywhere nothing uses it; a rank without rows still joins every all-reduce
    n_rows = max(1.0, float(total_rows if total_rows is not None else M))
    alpha = torch.zeros(M, device=teacher_z.device, dtype=torch.float32)
    beta = y = None
    for it in range(sinkhorn_iters):
        col = _col_sum_op(teacher_z, teacher_w, inv_t, None, alpha)  # [K] sum_m exp(T / t_t + alpha)
        if all_reduce is not None:
            all_reduce(col)
        beta = -torch.log(col * K)
        if it < sinkhorn_iters - 1:
            # rows to 1 / total_rows as the reference does: without it (alpha, beta) drift by log(M)
            # per iteration (the scaling's gauge freedom) and overflow after a few dozen iterations
            alpha = -_row_lse_op(teacher_z, teacher_w, inv_t, beta) - math.log(n_rows)
        else:  # the reference's final q * total_rows undoes the 1 / total_rows: rows sum to 1
            alpha, y = last_row_pass(beta)
    if sinkhorn_iters == 0:  # exp(T / t_t) / total * total_rows
        total = _col_sum_op(teacher_z, teacher_w, inv_t, None, alpha).sum().reshape(1)
        if all_reduce is not None:
            all_reduce(total)
        alpha = alpha + math.log(n_rows) - torch.log(total)
        if values is not None:
            y = _row_expect_op(teacher_z, teacher_w, inv_t, None, alpha, values)
    return (alpha, beta) if values is None else (alpha, beta, y)


def _loss_and_grads(student_z, student_w, teacher_z, teacher_w, s_idx, t_idx, pair_weight,
                    student_temp, teacher_temp, centering, center, sinkhorn_iters, all_reduce,
                    total_rows, need_grad: bool):
    inv_ts, inv_tt = 1.0 / student_temp, 1.0 / teacher_temp
    with torch.no_grad():
        alpha, beta, y = teacher_scalings(teacher_z, teacher_w, teacher_temp, centering, center, sinkhorn_iters,
                                          all_reduce, total_rows, values=student_w)  # y = P @ W, [M, b]
        if need_grad:  # softmax(S / t_s) @ W for dZ, and the logsumexp, in one pass
            soft_w, lse = _row_softmax_expect_op(student_z, student_w, inv_ts, None, student_w)
        else:
            lse = _row_lse_op(student_z, student_w, inv_ts, None)  # [N]
        zs = student_z.float().index_select(0, s_idx)  # [P, b]
        yt = y.index_select(0, t_idx)  # [P, b]
        w = pair_weight.float()
        loss = (w * (lse.index_select(0, s_idx) - inv_ts * (zs * yt).sum(1))).sum()
        # mean_m T_mk [K], for the softmax center's EMA only (Sinkhorn has no center): an empty
        # tensor otherwise, so no fp32 copy of teacher_w ([K, b]) is made for nothing
        logit_mean = (teacher_z.float().mean(0) @ teacher_w.float().t() if centering == "softmax"
                      else teacher_z.new_zeros(0, dtype=torch.float32))
        if not need_grad:
            return loss, logit_mean, None, None
        N, M = student_z.shape[0], teacher_z.shape[0]
        g = torch.zeros(N, device=w.device).index_add_(0, s_idx, w)  # [N]
        ybar = torch.zeros_like(student_z, dtype=torch.float32).index_add_(0, s_idx, w[:, None] * yt)
        zbar = torch.zeros(M, zs.shape[1], device=w.device).index_add_(0, t_idx, w[:, None] * zs)
        d_z = (g[:, None] * soft_w - ybar) * inv_ts
        gz = (g[:, None] * student_z.float()).to(student_w.dtype)
        d_w = _col_reduce_op(student_z, student_w, inv_ts, None, -lse, gz, inv_ts)
        _col_reduce_add_op(d_w, teacher_z, teacher_w, inv_tt, beta, alpha, zbar.to(student_w.dtype), -inv_ts)
    return loss, logit_mean, d_z, d_w


class _PrototypeLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_z, student_w, teacher_z, teacher_w, s_idx, t_idx, pair_weight, student_temp,
                teacher_temp, centering, center, sinkhorn_iters, all_reduce, total_rows):
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, logit_mean, d_z, d_w = _loss_and_grads(
            student_z, student_w, teacher_z, teacher_w, s_idx, t_idx, pair_weight, student_temp,
            teacher_temp, centering, center, sinkhorn_iters, all_reduce, total_rows, need)
        # kept as attributes, not saved tensors: backward scales them in place (no second [K, b])
        ctx.grads = (d_z.to(student_z.dtype), d_w.to(student_w.dtype)) if need else None
        ctx.mark_non_differentiable(logit_mean)
        return loss, logit_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_mean):
        if ctx.grads is None:
            raise RuntimeError("fused prototype_loss: backward runs once per forward (its gradients are "
                               "computed in the forward and handed over); call the loss again instead")
        d_z, d_w = ctx.grads
        ctx.grads = None
        return (d_z.mul_(grad_loss), d_w.mul_(grad_loss)) + (None,) * 12


def prototype_loss(student_z: torch.Tensor, student_w: torch.Tensor, teacher_z: torch.Tensor,
                   teacher_w: torch.Tensor, s_idx: torch.Tensor, t_idx: torch.Tensor,
                   pair_weight: torch.Tensor, student_temp: float, teacher_temp: float,
                   centering: str, center: torch.Tensor | None = None, sinkhorn_iters: int = 3,
                   all_reduce: AllReduce = None, total_rows: int | None = None):
    """Fused head loss; same contract as :func:`virchow_fast.ops.reference.prototype_loss`.

    student_z: [N, b], student_w: [K, b] (both may require grad); teacher_z: [M, b],
    teacher_w: [K, b] (no grad); s_idx, t_idx: [P] int64 pair rows; pair_weight: [P] fp32;
    center: [K] for centering="softmax". Returns (loss scalar fp32, teacher logit mean [K] fp32 for
    centering="softmax", else an empty [0] tensor).
    Memory: O((N + M + K) b + splits R b) fp32, no [N, K] or [M, K] buffer.
    """
    if centering == "softmax" and center is None:
        raise ValueError("centering='softmax' needs center [K]")
    return _PrototypeLoss.apply(student_z, student_w, teacher_z, teacher_w, s_idx, t_idx, pair_weight,
                                student_temp, teacher_temp, centering, center, sinkhorn_iters,
                                all_reduce, total_rows)


__all__ = ["prototype_loss", "teacher_scalings"]
