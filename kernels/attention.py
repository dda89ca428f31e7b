"""Packed variable-length attention (non-causal, flash-style), forward and backward.

Spec: :func:`virchow_fast.ops.reference.attention`. One launch covers every segment of a packed
batch (all crops of a step: 2 x 261 + 8 x 54 tokens per ViT-H tile); each segment attends only to
itself. Program grid: (query or key block within a segment, segment, head); programs whose block
starts past their segment's end exit at once. The jit kernels are in ``_attention_jit.py``.

Cost (segment length L, H heads, head dim D): forward 4 L^2 H D FLOPs per segment, backward
14 L^2 H D issued (S recomputed in both backward kernels, dP in the dQ kernel, as in
FlashAttention-2) for 8 useful; :func:`launch_plan` adds the tile and head-dim padding. Memory:
reads qkv, writes o and the fp32 row log-sum-exp [H, T]; the backward reads qkv, o, do, lse and
writes dqkv. Nothing of size L x L is ever stored. Only O and LSE are saved.

Head dims that are not powers of two (80, 104) are split into power-of-two column chunks
(:func:`head_chunks`: 64 + 16, 64 + 32 + 16) with one ``tl.dot`` per chunk: no padded copies in
memory, at most 15 padded columns of MMA work. The op takes the packed [T, 3, H, D] qkv projection
(any strides, unit last dim) and reads q, k, v as strided views of it; its backward writes dq, dk,
dv into one [T, 3, H, D] gradient (no stack of three). Softmax statistics and all
accumulators are fp32; ``tl.dot`` takes the input dtype (fp16 / bf16 tensor cores, full-precision
fp32 for fp32 inputs).

Backward = three kernels: delta = rowsum(dO * O); dK/dV per key block looping over query blocks;
dQ per query block looping over key blocks. No atomics, so results are deterministic for a given
launch configuration.

Scaled, padded output (:func:`attention_qkv` ``keep=``, ``seg_ids=``, ``pad=``): so that a ViT block
can run its residual add, proj bias, LayerScale and per-crop stochastic depth in one cuBLAS GEMM,
``addmm(residual, a, w_ext.t())``, the op can scale each segment's output rows by its keep factor
(in the kernels: one scalar per program, applied in fp32; the backward applies it to dP and dV) and
write them straight into the first C columns of a [T, C + pad] buffer whose column C holds the
factor (the bias column of w_ext) and the rest zeros. The buffer is the forward op's output and
what its backward saves (the GEMM saves it too: no extra memory).

Order: launch plan and cost -> launchers -> custom ops (autograd) -> public function.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.testing

from . import _attention_jit as J
from ._common import check_float, check_keep_pad, interpreting, last_dim_contiguous, next_pow2

LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------------------
# Launch plan and cost (pure Python: the cost model imports these without a GPU)
# ------------------------------------------------------------------------------------------------

# Launch candidates per kernel: ((BLOCK_M, BLOCK_N, num_warps, num_stages), widest padded head dim);
# the first of each list is the default. Rows of a program (queries for fwd / dq, keys for dkdv)
# come in 64-row blocks: the smallest wgmma tile (one warp group), which fits a 54- or 58-token
# local crop in one block. The inner loop (keys for fwd / dq, queries for dkdv) defaults to 32-wide
# blocks, so a 261- or 265-token global crop costs 9 x 32 = 288 inner columns, not 5 x 64 = 320 (a
# 54-token crop: 64 either way). The widest padded head dim (sum of ``head_chunks``) is the largest
# at which the candidate compiled for sm_90a without register spills (bf16, triton 3.6; compiled at
# 80, 112, 128, 192 and 256, all within 197 KB of shared memory): wider heads skip it. On a GPU the
# launcher times the candidates once per (kernel, head-dim chunks, dtype, max_seqlen bucket,
# device) and keeps the fastest; VIRCHOW_FAST_ATTN_TUNE=0 always takes the default.
CANDIDATES = {
    "fwd": [((64, 32, 4, 2), 192), ((64, 64, 4, 2), 192), ((64, 64, 8, 2), 256)],
    "dkdv": [((32, 64, 4, 2), 128), ((64, 64, 8, 2), 128), ((32, 64, 8, 2), 256)],
    "dq": [((64, 32, 4, 2), 256), ((64, 64, 4, 2), 128), ((64, 64, 8, 2), 256)],
}
# fp32 (tests, not training): one small unpipelined tile, on CUDA cores (it spills; not a training
# dtype). The interpreter runs one configuration; small blocks make the tests' short segments cover
# several full blocks and a padded last block.
FP32_CANDIDATE = (32, 32, 4, 1)
INTERPRET_CANDIDATE = (32, 32, 4, 1)
DELTA_BLOCK_M = 64
_chosen: dict[tuple, tuple[int, ...]] = {}


def candidates(kind: str, dtype: torch.dtype, head_dim: int = 128) -> list[tuple[int, int, int, int]]:
    """Launch candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel ``kind`` ("fwd",
    "dkdv", "dq") for ``dtype`` inputs of ``head_dim``: those of :data:`CANDIDATES` whose widest head
    dim covers it (every one up to 128)."""
    if dtype == torch.float32:
        return [FP32_CANDIDATE]
    dp = sum(head_chunks(head_dim))
    return [c for c, widest in CANDIDATES[kind] if dp <= widest]


def head_chunks(head_dim: int) -> tuple[int, int, int]:
    """Power-of-two column chunks (>= 16, at most three, 0 = unused) covering ``head_dim``.

    64 -> (64, 0, 0); 80 -> (64, 16, 0); 104 -> (64, 32, 16); 128 -> (128, 0, 0). At most 15 columns
    of padding for head dims up to 256 (240 -> 128 + 64 + 64 is the exception: 16 padded).
    """
    rest, out = -(-int(head_dim) // 16) * 16, []
    while rest > 0:
        w = next_pow2(rest) if len(out) == 2 else 1 << (rest.bit_length() - 1)
        out.append(w)
        rest -= w
    return tuple(out + [0] * (3 - len(out)))


def launch_plan(seqlens=None, num_heads: int = 1, head_dim: int = 64, dtype: torch.dtype = torch.bfloat16, *,
                cu_seqlens=None, configs: dict | None = None) -> dict:
    """What one packed attention call launches, and the FLOPs it issues versus the useful ones.

    seqlens: segment lengths (sequence of ints), or ``cu_seqlens=`` the [S + 1] offsets (list or
        tensor); num_heads H, head_dim D, dtype of q / k / v. configs: {kind: candidate tuple}
        overrides the default (first) candidate of "fwd", "dkdv", "dq" (e.g. what autotuning picked).
    Returns a dict:
        "head_chunks": (D0, D1, D2), "head_dim_padded": D0 + D1 + D2,
        "kernels": {"fwd" | "bwd_delta" | "bwd_dkdv" | "bwd_dq": {"config": {BLOCK_M, BLOCK_N,
            num_warps, num_stages} (bwd_delta: BLOCK_M, BLOCK_D), "grid": (x, y, z),
            "flops_issued", "flops_useful", "bytes"}},
        "fwd" / "bwd": {"flops_issued", "flops_useful", "bytes"} summed over their kernels.
    Useful FLOPs are the model's: forward 4 L^2 H D per segment of L tokens (QK^T and PV), backward
    twice that (dV, dP, dS K, dS^T Q). Issued FLOPs are the tensor-core work on padded tiles:
    each segment's rows and inner columns padded to whole blocks (a 64-row block is the smallest
    wgmma tile), D padded to its chunks; the backward also recomputes S in both kernels and dP
    in the dQ kernel (14 L^2 H D issued per 8 useful without padding). Bytes: each tensor's unique
    HBM reads and writes (re-reads of K / V by other blocks of a segment are assumed to hit L2).
    """
    if seqlens is None:
        cu = [int(x) for x in (cu_seqlens.tolist() if hasattr(cu_seqlens, "tolist") else cu_seqlens)]
        seqlens = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    lens = [int(n) for n in seqlens]
    H, D = int(num_heads), int(head_dim)
    chunks = head_chunks(D)
    dp = sum(chunks)
    T, S, maxlen = sum(lens), len(lens), max(lens, default=0)
    esize = torch.empty((), dtype=dtype).element_size()
    tensor, rowstat = T * H * D * esize, T * H * 4
    useful = 4.0 * H * D * sum(n * n for n in lens)
    kernels = {}

    def add(name, kind, matmuls, useful_share, nbytes):
        c = tuple((configs or {}).get(kind) or candidates(kind, dtype, D)[0])
        bm, bn = c[:2]
        rows, inner = (bn, bm) if kind == "dkdv" else (bm, bn)
        issued = sum(2.0 * matmuls * -(-n // rows) * rows * -(-n // inner) * inner * dp * H for n in lens)
        kernels[name] = {"config": dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), c, strict=True)),
                         "grid": (-(-maxlen // rows), S, H), "flops_issued": issued,
                         "flops_useful": useful * useful_share, "bytes": nbytes}

    add("fwd", "fwd", 2, 1.0, 3 * tensor + tensor + rowstat)
    kernels["bwd_delta"] = {"config": {"BLOCK_M": DELTA_BLOCK_M, "BLOCK_D": next_pow2(max(D, 16))},
                            "grid": (-(-T // DELTA_BLOCK_M), H, 1), "flops_issued": 0.0, "flops_useful": 0.0,
                            "bytes": 2 * tensor + rowstat}
    add("bwd_dkdv", "dkdv", 4, 1.5, 4 * tensor + 2 * rowstat + 2 * tensor)
    add("bwd_dq", "dq", 3, 0.5, 4 * tensor + 2 * rowstat + tensor)

    def total(names):
        return {f: sum(kernels[n][f] for n in names) for f in ("flops_issued", "flops_useful", "bytes")}

    return {"head_chunks": chunks, "head_dim_padded": dp, "kernels": kernels,
            "fwd": total(["fwd"]), "bwd": total(["bwd_delta", "bwd_dkdv", "bwd_dq"])}


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _meta(c: tuple[int, ...]) -> dict:
    if interpreting():
        c = INTERPRET_CANDIDATE
    return dict(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])


def _launch(kind: str, kernel, grid, args: tuple, consts: dict, dtype: torch.dtype, max_seqlen: int,
            device: torch.device) -> dict:
    """Launch ``kernel[grid(meta)](*args, **consts, **meta)`` with the chosen configuration; returns
    its meta (BLOCK_M, BLOCK_N, num_warps, num_stages).

    The kernels only write their outputs, so timing a candidate by running it is harmless.
    """
    cands = candidates(kind, dtype, consts["HEAD_DIM"])
    key = (kind, consts["D0"], consts["D1"], consts["D2"], consts["ALIGN"], consts.get("HAS_KEEP"), dtype,
           next_pow2(max_seqlen), str(device))
    choice = _chosen.get(key)
    if choice is None:
        choice = cands[0]
        if len(cands) > 1 and not interpreting() and os.environ.get("VIRCHOW_FAST_ATTN_TUNE", "1") != "0":
            times = []
            for c in cands:
                meta = _meta(c)
                try:
                    times.append(triton.testing.do_bench(lambda meta=meta: kernel[grid(meta)](*args, **consts, **meta),
                                                         warmup=5, rep=20))
                except Exception:  # noqa: BLE001 (a candidate that cannot launch here is just not chosen)
                    times.append(float("inf"))
            if min(times) < float("inf"):
                choice = cands[times.index(min(times))]
        _chosen[key] = choice
    meta = _meta(choice)
    kernel[grid(meta)](*args, **consts, **meta)
    return meta


def _consts(D: int, dtype: torch.dtype, *tensors: torch.Tensor) -> dict:
    """Head-dim chunks, dot precision and the stride alignment the kernels may assume.

    ALIGN = elements per 16 bytes when every tensor's token / head strides and base address allow it
    (the model's [T, 3, H, 104] qkv views do), else 1 (correct, with narrower loads).
    """
    vec = 16 // tensors[0].element_size()
    ok = all(t.stride(0) % vec == 0 and t.stride(1) % vec == 0 and t.data_ptr() % 16 == 0 for t in tensors)
    d0, d1, d2 = head_chunks(D)
    # fp32 inputs get full-precision dots (the reference's numbers); fp16/bf16 ignore this.
    prec = "ieee" if dtype == torch.float32 else "tf32"
    return dict(HEAD_DIM=D, D0=d0, D1=d1, D2=d2, ALIGN=vec if ok else 1, DOT_PREC=prec)


def _split(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[T, 3, H, D] -> q, k, v: [T, H, D] strided views (unit stride in D)."""
    qkv = last_dim_contiguous(qkv)
    return qkv[:, 0], qkv[:, 1], qkv[:, 2]


def _forward(qkv, cu_seqlens, max_seqlen: int, scale: float, keep=None, seg_ids=None, pad: int = 0):
    """qkv: [T, 3, H, D] -> o [T, H, D] (qkv.dtype, contiguous), lse [H, T] fp32.

    keep: None or [S] per-segment factors: o's rows of segment s are keep[s] * the attention output.
    pad > 0: o is instead a [T, C + pad] buffer (C = H D): the kernel writes the (scaled) output into
    its [T, H, D] view of the first C columns; column C is keep[seg_ids] (ones without keep), the
    rest zeros.
    """
    q, k, v = _split(qkv)
    T, H, D = q.shape
    C = H * D
    if pad:
        out = torch.empty((T, C + pad), dtype=q.dtype, device=q.device)
        o = _heads(out, H, D)
    else:
        out = o = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, T), dtype=torch.float32, device=q.device)
    n_seg = cu_seqlens.numel() - 1
    if T > 0 and n_seg > 0 and max_seqlen > 0:
        args = (q, k, v, o, lse, cu_seqlens, lse if keep is None else keep,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
                lse.stride(0), scale * LOG2E)
        _launch("fwd", J._attn_fwd_kernel, lambda m: (triton.cdiv(max_seqlen, m["BLOCK_M"]), n_seg, H), args,
                {**_consts(D, q.dtype, q, k, v, o), "HAS_KEEP": keep is not None}, q.dtype, max_seqlen, q.device)
    if pad:  # T x pad elements: the GEMM's bias column (the keep factor) and zeros
        if keep is None:
            out[:, C].fill_(1.0)
        else:
            out[:, C].copy_(keep.index_select(0, seg_ids))
        out[:, C + 1:].zero_()
    return out, lse


def _heads(t: torch.Tensor, H: int, D: int) -> torch.Tensor:
    """A [T, C + pad] output buffer (or its gradient) -> the [T, H, D] view of its first C = H D
    columns (token stride C + pad, head stride D); a [T, H, D] tensor as it is."""
    if t.dim() == 3:
        return t
    return last_dim_contiguous(t)[:, :H * D].unflatten(1, (H, D))


def _backward(do, qkv, o, lse, cu_seqlens, max_seqlen: int, scale: float, bias_grad: bool = False, keep=None,
              seg_ids=None):
    """-> dqkv: [T, 3, H, D], contiguous, in qkv's dtype; with ``bias_grad`` also the gradient of a
    bias added to qkv, [3, H, D] fp32.

    o, do: [T, H, D] (any token / head strides), or the forward's [T, C + pad] buffer and its
    gradient (their first C columns are read; the gradient of the other columns is ignored).
    keep, seg_ids: the forward's per-segment factors (o is the scaled output) and each token's
    segment (read for the v-bias gradient with ``bias_grad``).

    dq, dk and dv are written straight into their slices of one buffer: the gradient of the packed
    projection output, with no stack of three separate gradients after the kernels.

    The bias gradient is the column sums of dq, dk, dv over all tokens, from sums the kernels make
    anyway: dk's is exactly zero (a key bias shifts each query's scores by one constant, which the
    softmax ignores); dv's is the column sums of dO (o = P (v + b_v) and each row of P sums to 1),
    taken by the delta kernel as it reads dO; dq's is summed by each dQ program over its rows. Each
    program writes one fp32 partial row (no atomics: deterministic); no pass re-reads dqkv.
    """
    q, k, v = _split(qkv)
    T, H, D = q.shape
    do, o = last_dim_contiguous(_heads(do, H, D)), _heads(o, H, D)
    has_keep = keep is not None
    dqkv = torch.empty((T, 3, H, D), dtype=q.dtype, device=q.device)
    n_seg = cu_seqlens.numel() - 1
    if T == 0 or n_seg <= 0 or max_seqlen <= 0:
        dqkv.zero_()
        return (dqkv, torch.zeros((3, H, D), dtype=torch.float32, device=q.device)) if bias_grad else dqkv
    dq, dk, dv = dqkv.unbind(1)
    consts = _consts(D, q.dtype, q, k, v, o, do, dq, dk, dv)
    delta = torch.empty((H, T), dtype=torch.float32, device=q.device)
    n_delta = triton.cdiv(T, DELTA_BLOCK_M)
    dbv = torch.empty((n_delta, H, D) if bias_grad else (1,), dtype=torch.float32, device=q.device)
    row_keep = has_keep and bias_grad  # the v-bias sums take each row's factor
    J._attn_bwd_delta_kernel[(n_delta, H)](
        o, do, delta, dbv, keep if row_keep else delta, seg_ids if row_keep else delta,
        o.stride(0), o.stride(1), do.stride(0), do.stride(1), delta.stride(0), T,
        HEAD_DIM=D, BLOCK_M=DELTA_BLOCK_M, BLOCK_D=next_pow2(max(D, 16)), ALIGN=consts["ALIGN"], HAS_DB=bias_grad,
        HAS_KEEP=row_keep,
    )
    keep_ptr = keep if has_keep else lse
    consts["HAS_KEEP"] = has_keep
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1))
    _launch("dkdv", J._attn_bwd_dkdv_kernel, lambda m: (triton.cdiv(max_seqlen, m["BLOCK_N"]), n_seg, H),
            (q, k, v, do, lse, delta, dk, dv, cu_seqlens, keep_ptr, *strides, dk.stride(0), dk.stride(1),
             lse.stride(0), scale * LOG2E, scale), consts, q.dtype, max_seqlen, q.device)
    # one partial row per dQ program: sized for the candidate with the most programs (the smallest
    # BLOCK_M); the launch that runs last fills the first H * S * blocks rows
    min_bm = min(_meta(c)["BLOCK_M"] for c in candidates("dq", q.dtype, D))
    dbq = torch.empty((H * n_seg * triton.cdiv(max_seqlen, min_bm), D) if bias_grad else (1,),
                      dtype=torch.float32, device=q.device)
    meta = _launch("dq", J._attn_bwd_dq_kernel, lambda m: (triton.cdiv(max_seqlen, m["BLOCK_M"]), n_seg, H),
                   (q, k, v, do, lse, delta, dq, dbq, cu_seqlens, keep_ptr, *strides, dq.stride(0), dq.stride(1),
                    lse.stride(0), scale * LOG2E, scale), {**consts, "HAS_DB": bias_grad}, q.dtype, max_seqlen,
                   q.device)
    if not bias_grad:
        return dqkv
    rows = H * n_seg * triton.cdiv(max_seqlen, meta["BLOCK_M"])
    db_q = dbq[:rows].view(H, -1, D).sum(1)
    return dqkv, torch.stack([db_q, torch.zeros_like(db_q), dbv.sum(0)])


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------

# The arguments added for the scaled / padded output (keep, seg_ids, pad) come last: the cost model
# reads qkv, cu_seqlens and max_seqlen by position. The backward ops take o and do as [T, H, D]
# (strided views of a padded buffer included, see ``_heads``).

@torch.library.custom_op("virchow_fast_triton::attention_fwd", mutates_args=())
def _attention_fwd(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
                   keep: torch.Tensor | None = None, seg_ids: torch.Tensor | None = None,
                   pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(qkv, cu_seqlens, max_seqlen, scale, keep, seg_ids, pad)


@_attention_fwd.register_fake
def _(qkv, cu_seqlens, max_seqlen, scale, keep=None, seg_ids=None, pad=0):
    T, _, H, D = qkv.shape
    out = qkv.new_empty((T, H * D + pad) if pad else (T, H, D))
    return out, qkv.new_empty((H, T), dtype=torch.float32)


@torch.library.custom_op("virchow_fast_triton::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                   cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
                   keep: torch.Tensor | None = None, seg_ids: torch.Tensor | None = None) -> torch.Tensor:
    return _backward(do, qkv, o, lse, cu_seqlens, max_seqlen, scale, keep=keep, seg_ids=seg_ids)


@_attention_bwd.register_fake
def _(do, qkv, o, lse, cu_seqlens, max_seqlen, scale, keep=None, seg_ids=None):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, scale, keep, seg_ids, _pad = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse, cu_seqlens, keep, seg_ids)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _autograd_backward(ctx, do, _dlse):
    qkv, o, lse, cu_seqlens, keep, seg_ids = ctx.saved_tensors
    H, D = qkv.shape[2:]
    dqkv = _attention_bwd(_heads(do, H, D), qkv, _heads(o, H, D), lse, cu_seqlens, ctx.max_seqlen, ctx.scale,
                          keep, seg_ids)
    return dqkv, None, None, None, None, None, None


_attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


@torch.library.custom_op("virchow_fast_triton::attention_bwd_bias", mutates_args=())
def _attention_bwd_bias(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                        cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
                        keep: torch.Tensor | None = None,
                        seg_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(do, qkv, o, lse, cu_seqlens, max_seqlen, scale, bias_grad=True, keep=keep, seg_ids=seg_ids)


@_attention_bwd_bias.register_fake
def _(do, qkv, o, lse, cu_seqlens, max_seqlen, scale, keep=None, seg_ids=None):
    T, _, H, D = qkv.shape
    return qkv.new_empty(qkv.shape), qkv.new_empty((3, H, D), dtype=torch.float32)


class _QKVAttention(torch.autograd.Function):
    """o = attention(linear(x, weight, bias).view(T, 3, H, D)): the qkv projection and attention.

    The forward is the projection (one GEMM, bias in its epilogue) and the attention op. The
    backward runs the attention backward that also returns the bias gradient (see ``_backward``)
    and the projection's two GEMMs, so the [T, 3C] gradient is never re-read for its column sums.
    With keep / pad the output is the scaled (and padded, [T, C + pad]) one of :func:`attention_qkv`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, num_heads, cu_seqlens, max_seqlen, scale, keep=None, seg_ids=None, pad=0):
        T = x.shape[0]
        qkv = torch.nn.functional.linear(x, weight, bias).view(T, 3, num_heads, -1)
        o, lse = _attention_fwd(qkv, cu_seqlens, max_seqlen, scale, keep, seg_ids, pad)
        ctx.save_for_backward(x, weight, qkv, o, lse, cu_seqlens, keep, seg_ids)
        ctx.max_seqlen, ctx.scale, ctx.bias_dtype = max_seqlen, scale, None if bias is None else bias.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        x, weight, qkv, o, lse, cu_seqlens, keep, seg_ids = ctx.saved_tensors
        H, D = qkv.shape[2:]
        # with pad: the [T, H, D] views of the first C columns (the extra columns' gradient is ignored)
        dqkv, dbias = _attention_bwd_bias(_heads(do, H, D), qkv, _heads(o, H, D), lse, cu_seqlens, ctx.max_seqlen,
                                          ctx.scale, keep, seg_ids)
        d2 = dqkv.view(x.shape[0], -1)
        # in qkv's dtype, as autograd's own linear backward runs them (under autocast the forward's
        # GEMM took bf16 copies of fp32 x and weight); autograd casts each gradient to its input's dtype
        dx = (d2 @ weight.to(d2.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = (d2.t() @ x.to(d2.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = dbias.reshape(-1).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------

def attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float | None = None) -> torch.Tensor:
    """Non-causal attention over packed variable-length segments (same contract as the reference).

    qkv: [T, 3, H, D], fp32 / fp16 / bf16 (the packed projection output, viewed); T = all segments
        back to back; D <= 256; any token, q/k/v and head strides, unit stride in D. Its gradient
        comes back as one [T, 3, H, D] tensor.
    cu_seqlens: [S + 1] int32 (int64 is converted) cumulative offsets on qkv's device.
    max_seqlen: the longest segment (sizes the launch grid; a larger value only costs idle programs).
    scale: softmax scale, default D ** -0.5.
    Returns o: [T, H, D] in qkv's dtype (contiguous).
    """
    check_float("attention qkv", qkv)
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"attention: qkv must be [T, 3, H, D]; got {tuple(qkv.shape)}")
    cu_seqlens, scale = _launch_inputs(qkv.shape[-1], cu_seqlens, scale)
    o, _ = _attention_fwd(qkv, cu_seqlens, int(max_seqlen), scale)
    return o


def _launch_inputs(head_dim: int, cu_seqlens: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, float]:
    """(int32 cu_seqlens, softmax scale) for the custom ops; a head dim the kernels cannot take is an error."""
    if head_dim > 256:
        raise ValueError(f"attention: head dim {head_dim} > 256 not supported")
    if cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    return cu_seqlens, head_dim ** -0.5 if scale is None else float(scale)


def attention_qkv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
                  cu_seqlens: torch.Tensor, max_seqlen: int, scale: float | None = None,
                  keep: torch.Tensor | None = None, seg_ids: torch.Tensor | None = None,
                  pad: int = 0) -> torch.Tensor:
    """attention(linear(x, weight, bias).view(T, 3, H, D), ...): the block's qkv projection and attention.

    x: [T, C]; weight: [3C, C]; bias: [3C] or None. Same values as the two ops; the backward gets
    the bias gradient from the attention kernels' own sums (no pass over the [T, 3C] gradient).
    keep: None, or [S] floating per-segment (per-crop) stochastic-depth factors (0 or 1 / (1 - p);
        S = cu_seqlens.numel() - 1): segment s's output rows are multiplied by keep[s]. No gradient.
    seg_ids: [T] int64 (or int32) segment of each token; required with keep.
    pad: 0, or a positive multiple of 8: the output is then a = [T, C + pad] (qkv's dtype) with
        a[:, :C] = the (scaled) output, a[:, C] = keep[seg_ids] (ones without keep), a[:, C + 1:] = 0,
        ready for the block's ``addmm(residual, a, w_ext.t())`` (proj bias, LayerScale and stochastic
        depth folded into w_ext). The gradient of a's extra columns is ignored.
    Returns o: [T, H, D] (pad 0) or a: [T, C + pad].
    """
    check_float("attention x", x)
    T, C = x.shape
    if (weight.shape[0] % (3 * num_heads) or weight.shape[1] != C
            or (bias is not None and bias.shape != weight.shape[:1])):
        raise ValueError(f"attention_qkv: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)} for {num_heads} heads")
    pad = check_keep_pad("attention_qkv", T, keep, seg_ids, pad, segments=cu_seqlens.numel() - 1)
    cu_seqlens, scale = _launch_inputs(weight.shape[0] // (3 * num_heads), cu_seqlens, scale)
    keep = None if keep is None else keep.detach()
    return _QKVAttention.apply(x, weight, bias, int(num_heads), cu_seqlens, int(max_seqlen), scale, keep, seg_ids,
                               pad)


attention.qkv = attention_qkv  # what ops.attention_qkv runs on this backend
attention_qkv.supports_keep_pad = True  # it takes keep=, seg_ids=, pad= (the block's residual GEMM)
