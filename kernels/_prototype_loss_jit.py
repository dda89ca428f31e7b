"""Triton kernels of the fused head loss (kernels/prototype_loss.py launches them).

Notation as there: features z [R, D], prototypes w [C, D]; every kernel recomputes its logit tile
scale * z w^T from the features (nothing of size [R, C] is stored).
"""
import triton
import triton.language as tl


@triton.jit
def _logit_tile(z_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_z, stride_w,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    """[BLOCK_R, BLOCK_C] fp32 tile of z[rows] @ w[cols]^T; z: [R, D], w: [C, D]."""
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        zt = tl.load(z_ptr + rows[:, None] * stride_z + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[:, None] * stride_w + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(zt, tl.trans(wt), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _row_lse_kernel(z_ptr,      # [R, D] features
                    w_ptr,      # [C, D] prototypes
                    beta_ptr,   # [C] fp32 column bias (unused without HAS_BETA)
                    m_ptr,      # [SPLITS, R] fp32 out: partial running max
                    l_ptr,      # [SPLITS, R] fp32 out: partial sum of exp(x - max)
                    R, C, D, stride_z, stride_w, scale, cols_per_split,
                    HAS_BETA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    pid_r = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    lsum = tl.zeros((BLOCK_R,), tl.float32)
    c_lo = split * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, C)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < c_hi
        x = _logit_tile(z_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_z, stride_w,
                        BLOCK_R, BLOCK_C, BLOCK_D, PRECISION) * scale
        if HAS_BETA:
            x += tl.load(beta_ptr + cols, mask=col_ok, other=0.0)[None, :]
        x = tl.where(col_ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        lsum = lsum * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    tl.store(m_ptr + split * R + rows, m, mask=row_ok)
    tl.store(l_ptr + split * R + rows, lsum, mask=row_ok)


@triton.jit
def _row_expect_kernel(z_ptr,      # [R, D] features
                       w_ptr,      # [C, D] prototypes
                       beta_ptr,   # [C] fp32 column bias (unused without HAS_BETA)
                       alpha_ptr,  # [R] fp32 row bias (unused with ONLINE)
                       v_ptr,      # [C, E] values (student prototypes)
                       out_ptr,    # [SPLITS, R, E] fp32 out: sum_k p_rk v_k over this split
                       m_ptr,      # [SPLITS, R] fp32 out with ONLINE: running max
                       l_ptr,      # [SPLITS, R] fp32 out with ONLINE: sum of exp(x - max)
                       R, C, D, E, stride_z, stride_w, stride_v, scale, cols_per_split,
                       HAS_BETA: tl.constexpr, ONLINE: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
                       BLOCK_E1: tl.constexpr, SPLIT_E: tl.constexpr, PRECISION: tl.constexpr):
    """p = exp(x + alpha) with a known row bias, or ONLINE (flash-attention style): p = exp(x - max)
    with the accumulator rescaled as the max grows, and (max, sum) written for the host to normalise:
    softmax @ V and its logsumexp in one pass over K."""
    pid_r = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    alpha = tl.zeros((BLOCK_R,), tl.float32)
    if not ONLINE:
        alpha = tl.load(alpha_ptr + rows, mask=row_ok, other=0.0)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    lsum = tl.zeros((BLOCK_R,), tl.float32)
    # E in two power-of-two column chunks (384 = 256 + 128): no accumulator padded to 512
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    e1 = BLOCK_E + tl.arange(0, BLOCK_E1)
    e1_ok = e1 < E
    acc = tl.zeros((BLOCK_R, BLOCK_E), tl.float32)
    acc1 = tl.zeros((BLOCK_R, BLOCK_E1), tl.float32)
    c_lo = split * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, C)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < c_hi
        x = _logit_tile(z_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_z, stride_w,
                        BLOCK_R, BLOCK_C, BLOCK_D, PRECISION) * scale + alpha[:, None]
        if HAS_BETA:
            x += tl.load(beta_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if ONLINE:
            x = tl.where(col_ok[None, :], x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=1))
            corr = tl.exp(m - m_new)
            p = tl.exp(x - m_new[:, None])
            lsum = lsum * corr + tl.sum(p, axis=1)
            acc = acc * corr[:, None]
            acc1 = acc1 * corr[:, None]
            m = m_new
        else:
            p = tl.where(col_ok[None, :], tl.exp(x), 0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_v + e[None, :], mask=col_ok[:, None] & e_ok[None, :], other=0.0)
        p = p.to(v.dtype)
        acc = tl.dot(p, v, acc, input_precision=PRECISION)
        if SPLIT_E:
            v1 = tl.load(v_ptr + cols[:, None] * stride_v + e1[None, :], mask=col_ok[:, None] & e1_ok[None, :],
                         other=0.0)
            acc1 = tl.dot(p, v1, acc1, input_precision=PRECISION)
    out = out_ptr + split * R * E + rows[:, None] * E
    tl.store(out + e[None, :], acc, mask=row_ok[:, None] & e_ok[None, :])
    if SPLIT_E:
        tl.store(out + e1[None, :], acc1, mask=row_ok[:, None] & e1_ok[None, :])
    if ONLINE:
        tl.store(m_ptr + split * R + rows, m, mask=row_ok)
        tl.store(l_ptr + split * R + rows, lsum, mask=row_ok)


@triton.jit
def _col_reduce_kernel(z_ptr,      # [R, D] features
                       w_ptr,      # [C, D] prototypes
                       beta_ptr,   # [C] fp32 column bias (unused without HAS_BETA)
                       alpha_ptr,  # [R] fp32 row bias
                       v_ptr,      # [R, E] row values (HAS_V) or unused
                       out_ptr,    # [C, E] fp32 (HAS_V) or [C] fp32: (out +) coef * sum_r p_rc (v_r)
                       R, C, D, E, stride_z, stride_w, stride_v, scale, coef,
                       HAS_BETA: tl.constexpr, HAS_V: tl.constexpr, ACCUMULATE: tl.constexpr,
                       BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
                       BLOCK_E1: tl.constexpr, SPLIT_E: tl.constexpr, PRECISION: tl.constexpr):
    pid_c = tl.program_id(0)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    beta = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_BETA:
        beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0)
    e = tl.arange(0, BLOCK_E)  # E in two power-of-two chunks, as in _row_expect_kernel
    e_ok = e < E
    e1 = BLOCK_E + tl.arange(0, BLOCK_E1)
    e1_ok = e1 < E
    acc_v = tl.zeros((BLOCK_C, BLOCK_E), tl.float32)
    acc_v1 = tl.zeros((BLOCK_C, BLOCK_E1), tl.float32)
    acc_s = tl.zeros((BLOCK_C,), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        alpha = tl.load(alpha_ptr + rows, mask=row_ok, other=0.0)
        # the transposed tile [BLOCK_C, BLOCK_R] = w[cols] z[rows]^T: prototypes are the MMA's M side
        # (64 rows: wgmma) and p^T feeds the value dot without a transpose
        x = _logit_tile(w_ptr, z_ptr, cols, rows, col_ok, row_ok, D, stride_w, stride_z,
                        BLOCK_C, BLOCK_R, BLOCK_D, PRECISION) * scale
        pt = tl.exp(x + beta[:, None] + alpha[None, :])
        pt = tl.where(col_ok[:, None] & row_ok[None, :], pt, 0.0)
        if HAS_V:
            v = tl.load(v_ptr + rows[:, None] * stride_v + e[None, :], mask=row_ok[:, None] & e_ok[None, :], other=0.0)
            pt = pt.to(v.dtype)
            acc_v = tl.dot(pt, v, acc_v, input_precision=PRECISION)
            if SPLIT_E:
                v1 = tl.load(v_ptr + rows[:, None] * stride_v + e1[None, :], mask=row_ok[:, None] & e1_ok[None, :],
                             other=0.0)
                acc_v1 = tl.dot(pt, v1, acc_v1, input_precision=PRECISION)
        else:
            acc_s += tl.sum(pt, axis=1)
    if HAS_V:
        out = out_ptr + cols[:, None] * E + e[None, :]
        out_ok = col_ok[:, None] & e_ok[None, :]
        acc_v = acc_v * coef
        if ACCUMULATE:
            acc_v += tl.load(out, mask=out_ok, other=0.0)
        tl.store(out, acc_v, mask=out_ok)
        if SPLIT_E:
            out1 = out_ptr + cols[:, None] * E + e1[None, :]
            out1_ok = col_ok[:, None] & e1_ok[None, :]
            acc_v1 = acc_v1 * coef
            if ACCUMULATE:
                acc_v1 += tl.load(out1, mask=out1_ok, other=0.0)
            tl.store(out1, acc_v1, mask=out1_ok)
    else:
        acc_s = acc_s * coef
        if ACCUMULATE:
            acc_s += tl.load(out_ptr + cols, mask=col_ok, other=0.0)
        tl.store(out_ptr + cols, acc_s, mask=col_ok)
