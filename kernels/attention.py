"""Packed variable-length attention (non-causal, flash-style), forward and backward.

Spec: :func:`virchow_fast.ops.reference.attention`. One launch covers every segment of a packed
batch (all crops of a step: 2 x 261 + 8 x 54 tokens per ViT-H tile); each segment attends only to
itself. Program grid: (query or key block within a segment, segment, head); programs whose block
starts past their segment's end exit at once.

Cost (segment length L, H heads, head dim D): forward 4 T L H D FLOPs, backward 10 T L H D (scores
recomputed once per backward kernel, as in FlashAttention-2). Memory: reads q, k, v, writes o and
the fp32 row log-sum-exp [H, T]; the backward reads q, k, v, o, do, lse and writes dq, dk, dv.
Nothing of size L x L is ever stored. Only O and LSE are saved for the backward.

Head dims that are not powers of two (80, 104) are handled by masking a power-of-two block of the
head dim inside the kernel: no padded copies in memory. q, k, v may be strided views (e.g. the
unbound [T, 3, H, D] qkv projection); only the last dim must be contiguous. Softmax statistics
and all accumulators are fp32; ``tl.dot`` takes the input dtype (fp16 / bf16 tensor cores,
full-precision fp32 for fp32 inputs).

Backward = three kernels: delta = rowsum(dO * O); dK/dV per key block looping over query blocks;
dQ per query block looping over key blocks. No atomics, so results are deterministic for a given launch configuration.

Order: jit kernels -> launchers -> custom ops (autograd) -> public function.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
import triton.testing

from ._common import check_float, interpreting, last_dim_contiguous, next_pow2

LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # [T, H, D] each; row (token) stride stride_*t, head stride stride_*h, unit last dim
    O,  # [T, H, D] (out)
    LSE,  # [H, T] fp32 (out): natural-log row log-sum-exp of the scaled scores
    CU,  # [S + 1] int32 segment offsets
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_lse,  # LSE head stride (= T)
    qk_scale,  # softmax scale * log2(e)
    D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    start = tl.load(CU + seg)
    seqlen = tl.load(CU + seg + 1) - start
    if pid_m * BLOCK_M >= seqlen:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seqlen
    d_mask = offs_d < D
    tok_m = (start + offs_m).to(tl.int64)

    q = tl.load(Q + tok_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [M, Dp]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        cols = n0 + offs_n
        n_mask = cols < seqlen
        tok_n = (start + cols).to(tl.int64)
        kT = tl.load(K + tok_n[None, :] * stride_kt + h * stride_kh + offs_d[:, None],
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0)  # [Dp, N]
        s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale  # [M, N], log2 units
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + tok_n[:, None] * stride_vt + h * stride_vh + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [N, Dp]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + tok_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + h * stride_lse + tok_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_mask)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO,  # [T, H, D], token stride stride_*t, head stride stride_*h
    DELTA,  # [H, T] fp32 (out): rowsum(dO * O)
    stride_ot, stride_oh, stride_dot, stride_doh, stride_delta, T, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < D)[None, :]
    tok = offs_m.to(tl.int64)
    o = tl.load(O + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + tok[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + h * stride_delta + tok, delta, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # [T, H, D] each (strided as in the forward; DO has its own strides)
    LSE, DELTA,  # [H, T] fp32, head stride stride_lse
    DK, DV,  # [T, H, D] (out), token stride stride_dkt, head stride stride_dkh (same for DV)
    CU,  # [S + 1] int32
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_lse,
    qk_scale, scale, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    start = tl.load(CU + seg)
    seqlen = tl.load(CU + seg + 1) - start
    if pid_n * BLOCK_N >= seqlen:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < seqlen
    d_mask = offs_d < D
    tok_n = (start + offs_n).to(tl.int64)
    nd_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + tok_n[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=nd_mask, other=0.0)
    v = tl.load(V + tok_n[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=nd_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, seqlen, BLOCK_M):
        rows = m0 + offs_m
        m_mask = rows < seqlen
        tok_m = (start + rows).to(tl.int64)
        qT = tl.load(Q + tok_m[None, :] * stride_qt + h * stride_qh + offs_d[:, None],
                     mask=d_mask[:, None] & m_mask[None, :], other=0.0)  # [Dp, M]
        do = tl.load(DO + tok_m[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                     mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [M, Dp]
        lse = tl.load(LSE + h * stride_lse + tok_m, mask=m_mask, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + h * stride_lse + tok_m, mask=m_mask, other=0.0)
        sT = tl.dot(k, qT, input_precision=DOT_PREC) * qk_scale  # [N, M], log2 units
        pT = tl.exp2(sT - lse[None, :])
        pT = tl.where(n_mask[:, None] & m_mask[None, :], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [N, M]
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PREC)
    dk = dk * scale
    tl.store(DK + tok_n[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=nd_mask)
    tl.store(DV + tok_n[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=nd_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # [T, H, D] each
    LSE, DELTA,  # [H, T] fp32, head stride stride_lse
    DQ,  # [T, H, D] (out), token stride stride_dqt, head stride stride_dqh
    CU,  # [S + 1] int32
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lse,
    qk_scale, scale, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    start = tl.load(CU + seg)
    seqlen = tl.load(CU + seg + 1) - start
    if pid_m * BLOCK_M >= seqlen:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seqlen
    d_mask = offs_d < D
    tok_m = (start + offs_m).to(tl.int64)
    md_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + tok_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(DO + tok_m[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=md_mask, other=0.0)
    lse = tl.load(LSE + h * stride_lse + tok_m, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + h * stride_lse + tok_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        cols = n0 + offs_n
        n_mask = cols < seqlen
        tok_n = (start + cols).to(tl.int64)
        kT = tl.load(K + tok_n[None, :] * stride_kt + h * stride_kh + offs_d[:, None],
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0)  # [Dp, N]
        vT = tl.load(V + tok_n[None, :] * stride_vt + h * stride_vh + offs_d[:, None],
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0)  # [Dp, N]
        s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale  # [M, N]
        p = tl.exp2(s - lse[:, None])
        p = tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PREC)
    dq = dq * scale
    tl.store(DQ + tok_m[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=md_mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

# Launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages); the first of each list is the
# default. 64 x 64 tiles fit the model's segments (54 tokens: one block; 261: five, 82 % used)
# better than 128-row tiles. fp32 (tests, not training) gets small unpipelined tiles so its shared
# memory stays well inside the limit. On a GPU the launcher times the candidates once per
# (kernel, head-dim block, dtype, max_seqlen bucket, device) and keeps the fastest; set
# VIRCHOW_FAST_ATTN_TUNE=0 to always use the default. tests/kernels/test_sm90_compile.py compiles
# every candidate for sm_90.
CANDIDATES = {
    "fwd": [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
    "dkdv": [(64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2)],
    "dq": [(64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
}
FP32_CANDIDATE = (32, 32, 4, 1)
_chosen: dict[tuple, tuple[int, int, int, int]] = {}


def candidates(kind: str, dtype: torch.dtype) -> list[tuple[int, int, int, int]]:
    return [FP32_CANDIDATE] if dtype == torch.float32 else CANDIDATES[kind]


def _meta(c: tuple[int, int, int, int]) -> dict:
    if interpreting():
        return dict(BLOCK_M=64, BLOCK_N=64)
    return dict(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])


def _launch(kind: str, kernel, grid, args: tuple, consts: dict, dtype: torch.dtype, block_d: int,
            max_seqlen: int, device: torch.device) -> None:
    """Launch ``kernel[grid(meta)](*args, **consts, **meta)`` with the chosen configuration.

    The kernels only write their outputs, so timing a candidate by running it is harmless.
    """
    cands = candidates(kind, dtype)
    key = (kind, block_d, dtype, next_pow2(max_seqlen), str(device))
    choice = _chosen.get(key)
    if choice is None:
        choice = cands[0]
        if len(cands) > 1 and not interpreting() and os.environ.get("VIRCHOW_FAST_ATTN_TUNE", "1") != "0":
            times = []
            for c in cands:
                meta = _meta(c)
                try:
                    times.append(triton.testing.do_bench(lambda: kernel[grid(meta)](*args, **consts, **meta),
                                                         warmup=5, rep=20))
                except Exception:  # noqa: BLE001 (a candidate that cannot launch here is just not chosen)
                    times.append(float("inf"))
            if min(times) < float("inf"):
                choice = cands[times.index(min(times))]
        _chosen[key] = choice
    meta = _meta(choice)
    kernel[grid(meta)](*args, **consts, **meta)


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs get full-precision dots (the reference's numbers); fp16/bf16 ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(q, k, v, cu_seqlens, max_seqlen: int, scale: float):
    """q, k, v: [T, H, D] -> o [T, H, D] (q.dtype, contiguous), lse [H, T] fp32."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    T, H, D = q.shape
    o = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, T), dtype=torch.float32, device=q.device)
    n_seg = cu_seqlens.numel() - 1
    if T == 0 or n_seg <= 0 or max_seqlen <= 0:
        return o, lse
    block_d = next_pow2(max(D, 16))
    args = (q, k, v, o, lse, cu_seqlens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
            lse.stride(0), scale * LOG2E, D)
    _launch("fwd", _attn_fwd_kernel, lambda m: (triton.cdiv(max_seqlen, m["BLOCK_M"]), n_seg, H), args,
            dict(BLOCK_D=block_d, DOT_PREC=_dot_prec(q.dtype)), q.dtype, block_d, max_seqlen, q.device)
    return o, lse


def _backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen: int, scale: float):
    """-> dq, dk, dv: [T, H, D] each, contiguous, in q's dtype."""
    do, q, k, v = (last_dim_contiguous(t) for t in (do, q, k, v))
    T, H, D = q.shape
    dq = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    n_seg = cu_seqlens.numel() - 1
    if T == 0 or n_seg <= 0 or max_seqlen <= 0:
        return dq, dk, dv
    block_d = next_pow2(max(D, 16))
    delta = torch.empty((H, T), dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(T, 64), H)](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), delta.stride(0), T, D,
        BLOCK_M=64, BLOCK_D=block_d,
    )
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1))
    consts = dict(BLOCK_D=block_d, DOT_PREC=_dot_prec(q.dtype))
    _launch("dkdv", _attn_bwd_dkdv_kernel, lambda m: (triton.cdiv(max_seqlen, m["BLOCK_N"]), n_seg, H),
            (q, k, v, do, lse, delta, dk, dv, cu_seqlens, *strides, dk.stride(0), dk.stride(1), lse.stride(0),
             scale * LOG2E, scale, D), consts, q.dtype, block_d, max_seqlen, q.device)
    _launch("dq", _attn_bwd_dq_kernel, lambda m: (triton.cdiv(max_seqlen, m["BLOCK_M"]), n_seg, H),
            (q, k, v, do, lse, delta, dq, cu_seqlens, *strides, dq.stride(0), dq.stride(1), lse.stride(0),
             scale * LOG2E, scale, D), consts, q.dtype, block_d, max_seqlen, q.device)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("virchow_fast::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                   max_seqlen: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, cu_seqlens, max_seqlen, scale)


@_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((H, T), dtype=torch.float32)


@torch.library.custom_op("virchow_fast::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale)


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _autograd_backward(ctx, do, _dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
              max_seqlen: int, scale: float | None = None) -> torch.Tensor:
    """Non-causal attention over packed variable-length segments (same contract as the reference).

    q, k, v: [T, H, D], fp32 / fp16 / bf16, same dtype; T = all segments back to back; D <= 256;
        any token and head strides, unit stride in D.
    cu_seqlens: [S + 1] int32 (int64 is converted) cumulative offsets on q's device.
    max_seqlen: the longest segment (sizes the launch grid; a larger value only costs idle programs).
    scale: softmax scale, default D ** -0.5.
    Returns o: [T, H, D] in q's dtype (contiguous).
    """
    check_float("attention q", q)
    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype and q.dim() == 3):
        raise ValueError(f"attention: q, k, v must be [T, H, D] of one dtype; got "
                         f"{tuple(q.shape)} {q.dtype}, {tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"attention: head dim {q.shape[-1]} > 256 not supported")
    if cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, _ = _attention_fwd(q, k, v, cu_seqlens, int(max_seqlen), scale)
    return o
