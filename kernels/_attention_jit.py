"""Triton kernels of the packed varlen attention (launchers, cost and custom ops: attention.py).

The head dim is processed as up to three power-of-two column chunks D0 >= D1 >= D2 (0 = unused):
80 = 64 + 16, 104 -> 64 + 32 + 16 (the last 8 columns masked), so every ``tl.dot`` has tensor-core
sized operands and at most 15 padded columns instead of a next-power-of-two block. Unused chunk
slots are passed as aliases of chunk 0 and never touched (the compiler drops them). Each chunk has
its own load statement, so a chunk too narrow for 128-bit accesses per thread (16 columns at 8
warps) is reported on its own source line by the compile checks.

KEEP (with the constexpr HAS_KEEP): the per-segment stochastic-depth factor k (0 or 1 / (1 - p)).
Every fwd / dkdv / dq program belongs to one segment (program_id(1)), so k is one scalar per
program: the forward stores O' = k O (LSE unchanged). The gradient dO' that comes back for O' gives
the true dO = k dO', applied in fp32 to dP (both kernels) and once to the dV accumulators, never by
rescaling the low-precision dO tile; delta = rowsum(dO' O') is unchanged (dO' O' = dO O). k = 0
gives exact zeros. The delta kernel's blocks can cross segments: its v-bias column sums take k per
row (KEEP[SEG[token]]).

ALIGN (elements) is a promise from the launcher that every token and head stride is a multiple of
it, so loads and stores of head-dim rows vectorise to 16 bytes even when a stride (104 elements)
is not a multiple of 16.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _ptrs(base, tok, stride_t, C0: tl.constexpr, W: tl.constexpr):
    """[R, W] pointers to columns C0 .. C0 + W of rows ``tok``."""
    return base + tok[:, None] * stride_t + (C0 + tl.arange(0, W))[None, :]


@triton.jit
def _mask(row_mask, C0: tl.constexpr, W: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows in ``row_mask``; columns below HEAD_DIM (only the last chunk can cross it)."""
    if C0 + W > HEAD_DIM:
        return row_mask[:, None] & (C0 + tl.arange(0, W) < HEAD_DIM)[None, :]
    else:
        return row_mask[:, None]


@triton.jit
def _hint(stride, ALIGN: tl.constexpr):
    """``stride``, provably a multiple of ALIGN to the compiler (exact: the launcher checked it).

    Rounding it (two shifts, once per program) gives the axis analysis the divisibility that
    ``tl.multiple_of`` cannot attach to a kernel argument.
    """
    if ALIGN > 1:
        stride = stride // ALIGN * ALIGN
    return stride


# ------------------------------------------------------------------------------------------------
# Forward: one program per (query block, segment, head)
# ------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_step(q0, q1, q2, acc0, acc1, acc2, m_i, l_i, K, V, start, n0, seqlen, stride_kt, stride_vt, qk_scale,
              BN: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, HEAD_DIM: tl.constexpr,
              DOT_PREC: tl.constexpr):
    cols = n0 + tl.arange(0, BN)
    n_mask = cols < seqlen
    tok = (start + cols).to(tl.int64)
    k = tl.load(_ptrs(K, tok, stride_kt, 0, D0), mask=_mask(n_mask, 0, D0, HEAD_DIM), other=0.0)
    s = tl.dot(q0, tl.trans(k), input_precision=DOT_PREC)  # [M, BN]
    if D1 > 0:
        k = tl.load(_ptrs(K, tok, stride_kt, D0, D1), mask=_mask(n_mask, D0, D1, HEAD_DIM), other=0.0)
        s = tl.dot(q1, tl.trans(k), s, input_precision=DOT_PREC)
    if D2 > 0:
        k = tl.load(_ptrs(K, tok, stride_kt, D0 + D1, D2), mask=_mask(n_mask, D0 + D1, D2, HEAD_DIM), other=0.0)
        s = tl.dot(q2, tl.trans(k), s, input_precision=DOT_PREC)
    s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))  # log2 units
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(q0.dtype)
    v = tl.load(_ptrs(V, tok, stride_vt, 0, D0), mask=_mask(n_mask, 0, D0, HEAD_DIM), other=0.0)
    acc0 = tl.dot(p, v, acc0 * alpha[:, None], input_precision=DOT_PREC)
    if D1 > 0:
        v = tl.load(_ptrs(V, tok, stride_vt, D0, D1), mask=_mask(n_mask, D0, D1, HEAD_DIM), other=0.0)
        acc1 = tl.dot(p, v, acc1 * alpha[:, None], input_precision=DOT_PREC)
    if D2 > 0:
        v = tl.load(_ptrs(V, tok, stride_vt, D0 + D1, D2), mask=_mask(n_mask, D0 + D1, D2, HEAD_DIM), other=0.0)
        acc2 = tl.dot(p, v, acc2 * alpha[:, None], input_precision=DOT_PREC)
    return acc0, acc1, acc2, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # [T, H, D] each; token stride stride_*t, head stride stride_*h, unit last dim
    Out,  # [T, H, D] (out)
    LSE,  # [H, T] fp32 (out): natural-log row log-sum-exp of the scaled scores
    CU,  # [S + 1] int32 segment offsets
    KEEP,  # [S] per-segment output factor (read with HAS_KEEP)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_lse,  # LSE head stride (= T)
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_KEEP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    start = tl.load(CU + seg)
    seqlen = tl.load(CU + seg + 1) - start
    if pid_m * BLOCK_M >= seqlen:
        return
    Q += h * _hint(stride_qh, ALIGN)
    K += h * _hint(stride_kh, ALIGN)
    V += h * _hint(stride_vh, ALIGN)
    Out += h * _hint(stride_oh, ALIGN)
    stride_qt = _hint(stride_qt, ALIGN)
    stride_kt = _hint(stride_kt, ALIGN)
    stride_vt = _hint(stride_vt, ALIGN)
    stride_ot = _hint(stride_ot, ALIGN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seqlen
    tok_m = (start + offs_m).to(tl.int64)
    q0 = tl.load(_ptrs(Q, tok_m, stride_qt, 0, D0), mask=_mask(m_mask, 0, D0, HEAD_DIM), other=0.0)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    q1, q2, acc1, acc2 = q0, q0, acc0, acc0
    if D1 > 0:
        q1 = tl.load(_ptrs(Q, tok_m, stride_qt, D0, D1), mask=_mask(m_mask, D0, D1, HEAD_DIM), other=0.0)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    if D2 > 0:
        q2 = tl.load(_ptrs(Q, tok_m, stride_qt, D0 + D1, D2), mask=_mask(m_mask, D0 + D1, D2, HEAD_DIM), other=0.0)
        acc2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        acc0, acc1, acc2, m_i, l_i = _fwd_step(q0, q1, q2, acc0, acc1, acc2, m_i, l_i, K, V, start, n0, seqlen,
                                               stride_kt, stride_vt, qk_scale, BLOCK_N, D0, D1, D2, HEAD_DIM,
                                               DOT_PREC)
    inv = 1.0 / l_i[:, None]
    if HAS_KEEP:  # the segment's stochastic-depth factor: O' = k O (the LSE stays that of the softmax)
        inv = inv * tl.load(KEEP + seg).to(tl.float32)
    ty = Out.dtype.element_ty
    tl.store(_ptrs(Out, tok_m, stride_ot, 0, D0), (acc0 * inv).to(ty), mask=_mask(m_mask, 0, D0, HEAD_DIM))
    if D1 > 0:
        tl.store(_ptrs(Out, tok_m, stride_ot, D0, D1), (acc1 * inv).to(ty), mask=_mask(m_mask, D0, D1, HEAD_DIM))
    if D2 > 0:
        tl.store(_ptrs(Out, tok_m, stride_ot, D0 + D1, D2), (acc2 * inv).to(ty),
                 mask=_mask(m_mask, D0 + D1, D2, HEAD_DIM))
    tl.store(LSE + h * stride_lse + tok_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_mask)


# ------------------------------------------------------------------------------------------------
# Backward: delta = rowsum(dO * O); dK/dV per key block; dQ per query block
# ------------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_delta_kernel(
    Out, DO,  # [T, H, D], token stride stride_*t, head stride stride_*h
    DELTA,  # [H, T] fp32 (out): rowsum(dO * O)
    DBV,  # [P, H, HEAD_DIM] fp32 (out, with HAS_DB): per program, the column sums of dO (v's bias gradient)
    KEEP, SEG,  # [S] per-segment factor, [T] segment of each token (read with HAS_DB and HAS_KEEP)
    stride_ot, stride_oh, stride_dot, stride_doh, stride_delta, T,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    HAS_DB: tl.constexpr, HAS_KEEP: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    m_mask = offs_m < T
    tok = offs_m.to(tl.int64)
    o = tl.load(_ptrs(Out + h * _hint(stride_oh, ALIGN), tok, _hint(stride_ot, ALIGN), 0, BLOCK_D),
                mask=_mask(m_mask, 0, BLOCK_D, HEAD_DIM), other=0.0)
    do = tl.load(_ptrs(DO + h * _hint(stride_doh, ALIGN), tok, _hint(stride_dot, ALIGN), 0, BLOCK_D),
                 mask=_mask(m_mask, 0, BLOCK_D, HEAD_DIM), other=0.0).to(tl.float32)
    delta = tl.sum(o.to(tl.float32) * do, axis=1)  # with HAS_KEEP: dO' O' = dO O, unchanged
    tl.store(DELTA + h * stride_delta + tok, delta, mask=m_mask)
    if HAS_DB:  # o = P (v + b_v) with rows of P summing to 1, so d b_v = sum over tokens of dO
        if HAS_KEEP:  # the true dO = k dO', k of each row's segment (a block can cross segments)
            seg = tl.load(SEG + tok, mask=m_mask, other=0)
            do = do * tl.load(KEEP + seg, mask=m_mask, other=0.0).to(tl.float32)[:, None]
        cols = tl.arange(0, BLOCK_D)
        row = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + h
        tl.store(DBV + row * HEAD_DIM + cols, tl.sum(do, axis=0), mask=cols < HEAD_DIM)


@triton.jit
def _store_col_sums(DB, row, acc, C0: tl.constexpr, W: tl.constexpr, HEAD_DIM: tl.constexpr, scale):
    """Column sums of an fp32 [rows, W] chunk (times ``scale``) into row ``row`` of DB [P, HEAD_DIM]."""
    cols = C0 + tl.arange(0, W)
    tl.store(DB + row * HEAD_DIM + cols, tl.sum(acc, axis=0) * scale, mask=cols < HEAD_DIM)


@triton.jit
def _dkdv_step(k0, k1, k2, v0, v1, v2, dk0, dk1, dk2, dv0, dv1, dv2, n_mask, Q, DO, LSE, DELTA, start, m0, seqlen,
               stride_qt, stride_dot, qk_scale, kf, BM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
               D2: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr, HAS_KEEP: tl.constexpr):
    rows = m0 + tl.arange(0, BM)
    m_mask = rows < seqlen
    tok = (start + rows).to(tl.int64)
    lse = tl.load(LSE + tok, mask=m_mask, other=0.0) * LOG2E
    delta = tl.load(DELTA + tok, mask=m_mask, other=0.0)
    q0 = tl.load(_ptrs(Q, tok, stride_qt, 0, D0), mask=_mask(m_mask, 0, D0, HEAD_DIM), other=0.0)
    sT = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)  # [N, BM]
    if D1 > 0:
        q1 = tl.load(_ptrs(Q, tok, stride_qt, D0, D1), mask=_mask(m_mask, D0, D1, HEAD_DIM), other=0.0)
        sT = tl.dot(k1, tl.trans(q1), sT, input_precision=DOT_PREC)
    if D2 > 0:
        q2 = tl.load(_ptrs(Q, tok, stride_qt, D0 + D1, D2), mask=_mask(m_mask, D0 + D1, D2, HEAD_DIM), other=0.0)
        sT = tl.dot(k2, tl.trans(q2), sT, input_precision=DOT_PREC)
    pT = tl.exp2(sT * qk_scale - lse[None, :])
    pT = tl.where(n_mask[:, None] & m_mask[None, :], pT, 0.0)
    p16 = pT.to(q0.dtype)
    do0 = tl.load(_ptrs(DO, tok, stride_dot, 0, D0), mask=_mask(m_mask, 0, D0, HEAD_DIM), other=0.0)
    dv0 = tl.dot(p16, do0, dv0, input_precision=DOT_PREC)
    dpT = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
    if D1 > 0:
        do1 = tl.load(_ptrs(DO, tok, stride_dot, D0, D1), mask=_mask(m_mask, D0, D1, HEAD_DIM), other=0.0)
        dv1 = tl.dot(p16, do1, dv1, input_precision=DOT_PREC)
        dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=DOT_PREC)
    if D2 > 0:
        do2 = tl.load(_ptrs(DO, tok, stride_dot, D0 + D1, D2), mask=_mask(m_mask, D0 + D1, D2, HEAD_DIM), other=0.0)
        dv2 = tl.dot(p16, do2, dv2, input_precision=DOT_PREC)
        dpT = tl.dot(v2, tl.trans(do2), dpT, input_precision=DOT_PREC)
    if HAS_KEEP:  # dP of the true dO = kf dO' (fp32; dv's factor is applied once, after the loop)
        dpT = dpT * kf
    ds16 = (pT * (dpT - delta[None, :])).to(q0.dtype)
    dk0 = tl.dot(ds16, q0, dk0, input_precision=DOT_PREC)
    if D1 > 0:
        dk1 = tl.dot(ds16, q1, dk1, input_precision=DOT_PREC)
    if D2 > 0:
        dk2 = tl.dot(ds16, q2, dk2, input_precision=DOT_PREC)
    return dk0, dk1, dk2, dv0, dv1, dv2


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # [T, H, D] each (strided as in the forward; DO has its own strides)
    LSE, DELTA,  # [H, T] fp32, head stride stride_lse
    DK, DV,  # [T, H, D] (out), token stride stride_dkt, head stride stride_dkh (same for DV)
    CU,  # [S + 1] int32
    KEEP,  # [S] per-segment output factor of the forward (read with HAS_KEEP)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_lse,
    qk_scale, scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_KEEP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    start = tl.load(CU + seg)
    seqlen = tl.load(CU + seg + 1) - start
    if pid_n * BLOCK_N >= seqlen:
        return
    Q += h * _hint(stride_qh, ALIGN)
    K += h * _hint(stride_kh, ALIGN)
    V += h * _hint(stride_vh, ALIGN)
    DO += h * _hint(stride_doh, ALIGN)
    DK += h * _hint(stride_dkh, ALIGN)
    DV += h * _hint(stride_dkh, ALIGN)
    LSE += h * stride_lse
    DELTA += h * stride_lse
    stride_qt = _hint(stride_qt, ALIGN)
    stride_dot = _hint(stride_dot, ALIGN)
    stride_kt = _hint(stride_kt, ALIGN)
    stride_vt = _hint(stride_vt, ALIGN)
    stride_dkt = _hint(stride_dkt, ALIGN)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < seqlen
    tok_n = (start + offs_n).to(tl.int64)
    k0 = tl.load(_ptrs(K, tok_n, stride_kt, 0, D0), mask=_mask(n_mask, 0, D0, HEAD_DIM), other=0.0)
    v0 = tl.load(_ptrs(V, tok_n, stride_vt, 0, D0), mask=_mask(n_mask, 0, D0, HEAD_DIM), other=0.0)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    k1, k2, v1, v2, dk1, dk2 = k0, k0, v0, v0, dk0, dk0
    if D1 > 0:
        k1 = tl.load(_ptrs(K, tok_n, stride_kt, D0, D1), mask=_mask(n_mask, D0, D1, HEAD_DIM), other=0.0)
        v1 = tl.load(_ptrs(V, tok_n, stride_vt, D0, D1), mask=_mask(n_mask, D0, D1, HEAD_DIM), other=0.0)
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    if D2 > 0:
        k2 = tl.load(_ptrs(K, tok_n, stride_kt, D0 + D1, D2), mask=_mask(n_mask, D0 + D1, D2, HEAD_DIM), other=0.0)
        v2 = tl.load(_ptrs(V, tok_n, stride_vt, D0 + D1, D2), mask=_mask(n_mask, D0 + D1, D2, HEAD_DIM), other=0.0)
        dk2 = tl.zeros([BLOCK_N, D2], dtype=tl.float32)
    dv0, dv1, dv2 = dk0, dk1, dk2
    kf = 1.0
    if HAS_KEEP:
        kf = tl.load(KEEP + seg).to(tl.float32)
    for m0 in range(0, seqlen, BLOCK_M):
        dk0, dk1, dk2, dv0, dv1, dv2 = _dkdv_step(k0, k1, k2, v0, v1, v2, dk0, dk1, dk2, dv0, dv1, dv2, n_mask, Q, DO,
                                                  LSE, DELTA, start, m0, seqlen, stride_qt, stride_dot, qk_scale, kf,
                                                  BLOCK_M, D0, D1, D2, HEAD_DIM, DOT_PREC, HAS_KEEP)
    if HAS_KEEP:  # dV = P^T dO with the true dO = kf dO'
        dv0 = dv0 * kf
        if D1 > 0:
            dv1 = dv1 * kf
        if D2 > 0:
            dv2 = dv2 * kf
    ty = DK.dtype.element_ty
    tl.store(_ptrs(DK, tok_n, stride_dkt, 0, D0), (dk0 * scale).to(ty), mask=_mask(n_mask, 0, D0, HEAD_DIM))
    tl.store(_ptrs(DV, tok_n, stride_dkt, 0, D0), dv0.to(ty), mask=_mask(n_mask, 0, D0, HEAD_DIM))
    if D1 > 0:
        tl.store(_ptrs(DK, tok_n, stride_dkt, D0, D1), (dk1 * scale).to(ty), mask=_mask(n_mask, D0, D1, HEAD_DIM))
        tl.store(_ptrs(DV, tok_n, stride_dkt, D0, D1), dv1.to(ty), mask=_mask(n_mask, D0, D1, HEAD_DIM))
    if D2 > 0:
        tl.store(_ptrs(DK, tok_n, stride_dkt, D0 + D1, D2), (dk2 * scale).to(ty),
                 mask=_mask(n_mask, D0 + D1, D2, HEAD_DIM))
        tl.store(_ptrs(DV, tok_n, stride_dkt, D0 + D1, D2), dv2.to(ty), mask=_mask(n_mask, D0 + D1, D2, HEAD_DIM))


@triton.jit
def _dq_step(q0, q1, q2, do0, do1, do2, dq0, dq1, dq2, lse, delta, m_mask, K, V, start, n0, seqlen, stride_kt,
             stride_vt, qk_scale, kf, BN: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
             HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr, HAS_KEEP: tl.constexpr):
    cols = n0 + tl.arange(0, BN)
    n_mask = cols < seqlen
    tok = (start + cols).to(tl.int64)
    k0 = tl.load(_ptrs(K, tok, stride_kt, 0, D0), mask=_mask(n_mask, 0, D0, HEAD_DIM), other=0.0)
    v = tl.load(_ptrs(V, tok, stride_vt, 0, D0), mask=_mask(n_mask, 0, D0, HEAD_DIM), other=0.0)
    s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)  # [M, BN]
    dp = tl.dot(do0, tl.trans(v), input_precision=DOT_PREC)
    if D1 > 0:
        k1 = tl.load(_ptrs(K, tok, stride_kt, D0, D1), mask=_mask(n_mask, D0, D1, HEAD_DIM), other=0.0)
        v = tl.load(_ptrs(V, tok, stride_vt, D0, D1), mask=_mask(n_mask, D0, D1, HEAD_DIM), other=0.0)
        s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
        dp = tl.dot(do1, tl.trans(v), dp, input_precision=DOT_PREC)
    if D2 > 0:
        k2 = tl.load(_ptrs(K, tok, stride_kt, D0 + D1, D2), mask=_mask(n_mask, D0 + D1, D2, HEAD_DIM), other=0.0)
        v = tl.load(_ptrs(V, tok, stride_vt, D0 + D1, D2), mask=_mask(n_mask, D0 + D1, D2, HEAD_DIM), other=0.0)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
        dp = tl.dot(do2, tl.trans(v), dp, input_precision=DOT_PREC)
    p = tl.exp2(s * qk_scale - lse[:, None])
    p = tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)
    if HAS_KEEP:  # dP of the true dO = kf dO' (fp32)
        dp = dp * kf
    ds16 = (p * (dp - delta[:, None])).to(q0.dtype)
    dq0 = tl.dot(ds16, k0, dq0, input_precision=DOT_PREC)
    if D1 > 0:
        dq1 = tl.dot(ds16, k1, dq1, input_precision=DOT_PREC)
    if D2 > 0:
        dq2 = tl.dot(ds16, k2, dq2, input_precision=DOT_PREC)
    return dq0, dq1, dq2


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # [T, H, D] each
    LSE, DELTA,  # [H, T] fp32, head stride stride_lse
    DQ,  # [T, H, D] (out), token stride stride_dqt, head stride stride_dqh
    DBQ,  # [P, HEAD_DIM] fp32 (out, with HAS_DB): per program, the column sums of its dQ rows (q's bias gradient)
    CU,  # [S + 1] int32
    KEEP,  # [S] per-segment output factor of the forward (read with HAS_KEEP)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lse,
    qk_scale, scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_DB: tl.constexpr, HAS_KEEP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    # every program owns one row of DBQ (grid order: head, segment, query block), written even when empty
    db_row = (h * tl.num_programs(1) + seg) * tl.num_programs(0) + pid_m
    start = tl.load(CU + seg)
    seqlen = tl.load(CU + seg + 1) - start
    if pid_m * BLOCK_M >= seqlen:
        if HAS_DB:
            _store_col_sums(DBQ, db_row, tl.zeros([1, D0], dtype=tl.float32), 0, D0, HEAD_DIM, 1.0)
            if D1 > 0:
                _store_col_sums(DBQ, db_row, tl.zeros([1, D1], dtype=tl.float32), D0, D1, HEAD_DIM, 1.0)
            if D2 > 0:
                _store_col_sums(DBQ, db_row, tl.zeros([1, D2], dtype=tl.float32), D0 + D1, D2, HEAD_DIM, 1.0)
        return
    Q += h * _hint(stride_qh, ALIGN)
    K += h * _hint(stride_kh, ALIGN)
    V += h * _hint(stride_vh, ALIGN)
    DO += h * _hint(stride_doh, ALIGN)
    DQ += h * _hint(stride_dqh, ALIGN)
    stride_qt = _hint(stride_qt, ALIGN)
    stride_dot = _hint(stride_dot, ALIGN)
    stride_kt = _hint(stride_kt, ALIGN)
    stride_vt = _hint(stride_vt, ALIGN)
    stride_dqt = _hint(stride_dqt, ALIGN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seqlen
    tok_m = (start + offs_m).to(tl.int64)
    lse = tl.load(LSE + h * stride_lse + tok_m, mask=m_mask, other=0.0) * LOG2E
    delta = tl.load(DELTA + h * stride_lse + tok_m, mask=m_mask, other=0.0)
    q0 = tl.load(_ptrs(Q, tok_m, stride_qt, 0, D0), mask=_mask(m_mask, 0, D0, HEAD_DIM), other=0.0)
    do0 = tl.load(_ptrs(DO, tok_m, stride_dot, 0, D0), mask=_mask(m_mask, 0, D0, HEAD_DIM), other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    q1, q2, do1, do2, dq1, dq2 = q0, q0, do0, do0, dq0, dq0
    if D1 > 0:
        q1 = tl.load(_ptrs(Q, tok_m, stride_qt, D0, D1), mask=_mask(m_mask, D0, D1, HEAD_DIM), other=0.0)
        do1 = tl.load(_ptrs(DO, tok_m, stride_dot, D0, D1), mask=_mask(m_mask, D0, D1, HEAD_DIM), other=0.0)
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    if D2 > 0:
        q2 = tl.load(_ptrs(Q, tok_m, stride_qt, D0 + D1, D2), mask=_mask(m_mask, D0 + D1, D2, HEAD_DIM), other=0.0)
        do2 = tl.load(_ptrs(DO, tok_m, stride_dot, D0 + D1, D2), mask=_mask(m_mask, D0 + D1, D2, HEAD_DIM), other=0.0)
        dq2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    kf = 1.0
    if HAS_KEEP:
        kf = tl.load(KEEP + seg).to(tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        dq0, dq1, dq2 = _dq_step(q0, q1, q2, do0, do1, do2, dq0, dq1, dq2, lse, delta, m_mask, K, V, start, n0,
                                 seqlen, stride_kt, stride_vt, qk_scale, kf, BLOCK_N, D0, D1, D2, HEAD_DIM, DOT_PREC,
                                 HAS_KEEP)
    ty = DQ.dtype.element_ty
    tl.store(_ptrs(DQ, tok_m, stride_dqt, 0, D0), (dq0 * scale).to(ty), mask=_mask(m_mask, 0, D0, HEAD_DIM))
    if D1 > 0:
        tl.store(_ptrs(DQ, tok_m, stride_dqt, D0, D1), (dq1 * scale).to(ty), mask=_mask(m_mask, D0, D1, HEAD_DIM))
    if D2 > 0:
        tl.store(_ptrs(DQ, tok_m, stride_dqt, D0 + D1, D2), (dq2 * scale).to(ty),
                 mask=_mask(m_mask, D0 + D1, D2, HEAD_DIM))
    if HAS_DB:  # rows past the segment are zero in dq (their P is masked to 0)
        _store_col_sums(DBQ, db_row, dq0, 0, D0, HEAD_DIM, scale)
        if D1 > 0:
            _store_col_sums(DBQ, db_row, dq1, D0, D1, HEAD_DIM, scale)
        if D2 > 0:
            _store_col_sums(DBQ, db_row, dq2, D0 + D1, D2, HEAD_DIM, scale)
