"""Pure-PyTorch specification of every op the model and the losses use.

Tests, benchmarks and the CPU path all import these. Each function notes the memory traffic and
FLOPs it costs (T tokens, H heads, D head dim, C width, K prototypes, b bottleneck, M teacher rows,
N student rows, P pairs, bytes per element e), which predicts what a fused kernel can win.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

AllReduce = Optional[Callable[[torch.Tensor], None]]  # in-place sum across ranks, or None


# ---------------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------------

def attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
              scale: float | None = None) -> torch.Tensor:
    """Non-causal attention over packed variable-length segments.

    qkv: [T, 3, H, D], the packed q, k, v projection (T = total tokens of all segments, back to back).
    cu_seqlens: [S + 1] int32 cumulative segment offsets (0, len0, len0 + len1, ...), or the same
    offsets as a sequence of ints (no read from the device).
    Each segment attends only to itself. Returns o: [T, H, D] in qkv's dtype; the gradient of qkv is
    one [T, 3, H, D] tensor.

    Cost: 4 T L H D FLOPs for a segment length L; eagerly it also writes and reads the
    [H, L, L] score matrix per segment (SDPA's math path), which a flash kernel never stores.
    Segments of equal length are batched into one SDPA call.
    """
    T, _, H, D = qkv.shape
    scale = D ** -0.5 if scale is None else scale
    offsets = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    out = qkv.new_empty((T, H, D))
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(n, []).append(i)
    for n, segs in by_len.items():
        if n == 0:
            continue
        idx = torch.cat([torch.arange(offsets[s], offsets[s] + n, device=qkv.device) for s in segs])
        # [B, n, 3, H, D] -> q, k, v: [B, H, n, D]
        q, k, v = qkv.index_select(0, idx).view(len(segs), n, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)
        out.index_copy_(0, idx, o.transpose(1, 2).reshape(len(segs) * n, H, D))
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with fp32 statistics.

    x: [..., C]; weight, bias: [C]. Returns x's dtype.
    Traffic: read x, write y (2 R C e); backward reads x, dy, writes dx (3 R C e) plus dW/db.
    """
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(),
                        None if bias is None else bias.float(), eps).to(x.dtype)


def swiglu(x: torch.Tensor, bias: torch.Tensor | None = None, keep: torch.Tensor | None = None,
           seg_ids: torch.Tensor | None = None, pad: int = 0) -> torch.Tensor:
    """SiLU(g) * v, [g, v] = (x + bias) split in halves: the packed fc1 output (timm SwiGLUPacked)
    with fc1's bias added here rather than in the matmul.

    x: [..., 2H]; bias: [2H] or None -> [..., H] in x's dtype, computed in fp32. Traffic: read 2 H,
    write H per row (3 R H e); the bias ([2H]) adds nothing to the row traffic. Backward reads x
    and dy, writes dx (5 R H e) and also returns dbias, the fp32 column sums of dx over all rows
    (in bias's dtype), with no extra pass when fused.

    keep [S] / seg_ids [R], pad: see :func:`scale_rows` (the rows of fc2's input for the block's
    residual GEMM); free when fused (a factor per row, 2 pad elements per row).
    """
    xf = x.float()
    if bias is not None:
        xf = xf + bias.float()
    gate, value = xf.chunk(2, dim=-1)
    y = F.silu(gate) * value
    if keep is None and not pad:
        return y.to(x.dtype)
    return scale_rows(y.reshape(-1, y.shape[-1]), keep, seg_ids, pad).to(x.dtype).view(*x.shape[:-1], -1)


def scale_rows(y: torch.Tensor, keep: torch.Tensor | None, seg_ids: torch.Tensor | None, pad: int) -> torch.Tensor:
    """A branch's last activation as its residual GEMM takes it: rows ``[k * y, k, 0 ...]``.

    y: [R, K]; k = keep[seg_ids] (each row's crop's stochastic-depth factor), 1 without keep. pad: 0
    (then just ``k * y``) or a multiple of 8: [R, K + pad], where column K (k) multiplies the
    bias row of :func:`residual_weight` and the zeros keep rows 16-byte aligned. fp32 products.
    """
    k = keep.float()[seg_ids] if keep is not None else None
    out = y if k is None else y.float() * k[:, None]
    if pad:
        col = k[:, None] if k is not None else y.new_ones((y.shape[0], 1), dtype=torch.float32)
        out = torch.cat([out.float(), col, col.new_zeros((y.shape[0], pad - 1))], dim=1)
    return out.to(y.dtype)


def residual_weight(weight: torch.Tensor, gamma: torch.Tensor | None, bias: torch.Tensor | None,
                    pad: int = 8) -> torch.Tensor:
    """The weight of a block's residual GEMM: ``[gamma * W | gamma * b | 0 ...]``, [N, K + pad].

    weight [N, K] (a Linear's, y = a W^T + b); gamma [N] LayerScale (None: 1); bias [N] or None.
    ``x + keep * gamma * (a W^T + b)`` is then ``addmm(x, scale_rows(a, keep, ..., pad), W_ext^T)``:
    the residual add, bias, LayerScale and drop path inside one GEMM. Computed in fp32, returned in
    weight's dtype. Traffic: read W, write W_ext (2 N K e) per forward; backward (dW, dgamma, dbias
    from dW_ext) reads dW_ext, W, writes dW (3 N K e).
    """
    w = weight.float()
    g = None if gamma is None else gamma.float()
    b = w.new_zeros(w.shape[0]) if bias is None else bias.float()
    if g is not None:
        w, b = w * g[:, None], b * g
    return torch.cat([w, b[:, None], w.new_zeros((w.shape[0], pad - 1))], dim=1).to(weight.dtype)


def l2_normalize(w: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows of w [R, C] divided by max(their L2 norm, eps): ``F.normalize(w, dim=-1)`` (the heads'
    prototype weight norm). Eagerly a norm pass and a division forward, about eight passes backward;
    fused, read w, write y (2 R C e) and read dy, w, write dw (3 R C e)."""
    return F.normalize(w, dim=-1, eps=eps)


# ---------------------------------------------------------------------------------------------
# DINO / iBOT heads: teacher centering and prototype cross-entropy
# ---------------------------------------------------------------------------------------------

def prototype_logits(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """z: [N, b] (L2-normalised), w: [K, b] (unit rows) -> logits [N, K] in fp32.

    2 N K b FLOPs; writes N K fp32 (131072 columns: 512 KiB per row).
    """
    return z.float() @ w.float().t()


def softmax_center(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """softmax((t - c) / temp) over K. teacher_logits [M, K], center [K] -> probs [M, K]."""
    return torch.softmax((teacher_logits.float() - center.float()) / temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iters: int = 3,
                   all_reduce: AllReduce = None, total_rows: int | None = None) -> torch.Tensor:
    """Sinkhorn-Knopp teacher probabilities (DINOv2 / SwAV): rows sum to 1, columns to M/K.

    teacher_logits: [M, K] (this rank's rows). total_rows: rows across all ranks (default M;
    for iBOT the all-reduced masked-token count). all_reduce sums the [K] column sums and the
    scalar total across ranks so the batch is the global batch.
    Q = exp(t / temp), then n_iters x (columns to 1/K, rows to 1/B), finally rows scaled to 1.
    Logits of unit vectors lie in [-1, 1], so exp(1 / 0.04) is safe in fp32.
    """
    q = torch.exp(teacher_logits.float() / temp)  # [M, K]
    n_rows = float(total_rows if total_rows is not None else q.shape[0])
    n_protos = q.shape[1]
    total = q.sum().reshape(1)
    if all_reduce is not None:
        all_reduce(total)
    q = q / total
    for _ in range(n_iters):
        col = q.sum(dim=0)  # [K]
        if all_reduce is not None:
            all_reduce(col)
        q = q / col / n_protos
        q = q / q.sum(dim=1, keepdim=True) / n_rows
    return q * n_rows


def soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """-sum_k p_k log softmax(s / t_s)_k per row. student_logits, teacher_probs: [P, K] -> [P]."""
    return -(teacher_probs * torch.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)


def teacher_probs(teacher_z: torch.Tensor, teacher_w: torch.Tensor, teacher_temp: float, centering: str,
                  center: torch.Tensor | None = None, sinkhorn_iters: int = 3,
                  all_reduce: AllReduce = None, total_rows: int | None = None) -> torch.Tensor:
    """Teacher targets [M, K] from bottleneck features [M, b] and prototypes [K, b]."""
    logits = prototype_logits(teacher_z, teacher_w)
    if centering == "sinkhorn":
        return sinkhorn_knopp(logits, teacher_temp, sinkhorn_iters, all_reduce, total_rows)
    if centering == "softmax":
        return softmax_center(logits, center, teacher_temp)
    raise ValueError(f"centering {centering!r}: expected 'sinkhorn' or 'softmax'")


def prototype_loss(student_z: torch.Tensor, student_w: torch.Tensor, teacher_z: torch.Tensor,
                   teacher_w: torch.Tensor, s_idx: torch.Tensor, t_idx: torch.Tensor,
                   pair_weight: torch.Tensor, student_temp: float, teacher_temp: float,
                   centering: str, center: torch.Tensor | None = None, sinkhorn_iters: int = 3,
                   all_reduce: AllReduce = None, total_rows: int | None = None,
                   targets: Callable[..., torch.Tensor] | None = None):
    """The whole head loss from bottleneck features: the op the fused kernel replaces.

    student_z: [N, b], student_w: [K, b] (gets gradients); teacher_z: [M, b], teacher_w: [K, b]
    (no gradients). Pairs p = 0..P-1 score student row s_idx[p] against teacher row t_idx[p]
    with weight pair_weight[p] ([P] fp32); the loss is sum_p w_p CE_p.
    Returns (loss scalar, teacher logit mean [K] over this rank's rows, for the softmax center's
    EMA; the caller all-reduces it; with another centering nothing reads it and it is an empty
    [0] tensor: no pass over teacher_w for it). ``targets`` computes the teacher probabilities with
    :func:`teacher_probs`'s signature (default: it, so this is the pure reference; the ``cuda``
    backend of the op, ops/cuda_ops.py, passes the CUDA centering kernels).
    Eagerly: [N, K] student logits, [M, K] teacher logits and probabilities, [P, K] gathered
    copies and their gradients; the fused kernel keeps none of them.
    """
    with torch.no_grad():
        probs = (targets or teacher_probs)(teacher_z, teacher_w, teacher_temp, centering, center, sinkhorn_iters,
                                           all_reduce, total_rows)
        # mean over rows of z W^T = (mean of z) W^T: no second [M, K] pass
        logit_mean = (prototype_logits(teacher_z.float().mean(dim=0, keepdim=True), teacher_w)[0]
                      if centering == "softmax" else teacher_z.new_zeros(0, dtype=torch.float32))
    s_logits = prototype_logits(student_z, student_w)
    ce = soft_cross_entropy(s_logits.index_select(0, s_idx), probs.index_select(0, t_idx), student_temp)
    return (ce * pair_weight).sum(), logit_mean


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def adamw_ema_reference(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                        exp_avg_sqs: list[torch.Tensor], teachers: list[torch.Tensor], copies: list[torch.Tensor],
                        teacher_copies: list[torch.Tensor], hyper: torch.Tensor, grad_scale: torch.Tensor,
                        bad: torch.Tensor, beta1: float, beta2: float, eps: float, step: int,
                        momentum: float) -> None:
    """One AdamW step of every tensor (torch.optim.AdamW's single-tensor step, amsgrad and maximize
    off) with the clip, the EMA teacher, the bf16 copies and a non-finite check; the spec of
    kernels/adamw_ema.py (same arguments and effects, in place).

    params, exp_avgs, exp_avg_sqs, teachers: N fp32 tensors; grads: N bf16 or fp32 tensors, divided
    by ``grad_scale`` (0-dim fp32) before use; copies / teacher_copies: empty or N bf16 tensors that
    receive the updated params / teachers; hyper: [N, 3] fp32 (lr, weight_decay, ema flag 0 / 1) per
    tensor: where the flag is 1 the teacher moves ``lerp(teacher, param, 1 - momentum)``; bad: [1]
    int32, increased when an updated param holds a NaN or inf. step: the step count after
    incrementing. Reads ``hyper`` on the host (one sync; the kernel reads it on the device).
    Eagerly ~12 passes over each tensor; the fused kernel reads param, grad, both moments and the
    teacher once and writes them and the two copies once: (36 + e) bytes per parameter.
    """
    bc1, bc2_sqrt = 1.0 - beta1 ** step, (1.0 - beta2 ** step) ** 0.5
    flags = hyper.tolist()
    nonfinite = torch.zeros((), dtype=torch.bool, device=bad.device)
    for i, (p, m, v, t) in enumerate(zip(params, exp_avgs, exp_avg_sqs, teachers, strict=True)):
        lr, wd, ema = flags[i]
        g = grads[i].float() / grad_scale
        p.mul_(1.0 - lr * wd)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        p.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-lr / bc1)
        if ema:
            t.lerp_(p, 1.0 - momentum)
        if copies:
            copies[i].copy_(p)
        if teacher_copies:
            teacher_copies[i].copy_(t)
        nonfinite |= ~torch.isfinite(p).all()
    bad.add_(nonfinite.to(bad.dtype))
