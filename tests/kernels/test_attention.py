"""Packed varlen attention kernel vs ops/reference.py: forward, dQ, dK, dV; and its launch plan.

Head dims 64 / 128 (one chunk), 80 (64 + 16) and 104 (64 + 32 + 16, last 8 columns masked); 54- and
261-token segments mixed in one packed batch; 1-token, prime and empty segments; segment lengths
on each side of a block boundary; the packed [T, 3, H, D] qkv (the model's projection), also as a
view of a wider one; strides that are not 16-byte multiples (the unaligned path); one d(qkv)
gradient, no stack. The interpreter runs small blocks (32 x 32) so short
segments cover several full blocks and a padded last one; one case runs 64 x 64 blocks.
attention_qkv's keep / seg_ids / pad (per-crop scaled output written into a [T, C + pad] buffer for
the block's residual GEMM): forward, gradients, exact zeros of a dropped crop, argument checks.
"""
import math

import pytest
import torch

from virchow_fast.ops import reference

attn = pytest.importorskip("virchow_fast.kernels.attention")

# (atol, rtol) of the kernel against the fp32 reference on the same (rounded) inputs. fp16/bf16:
# the dot operands (P, dS) are rounded to the input dtype, as in FlashAttention, plus one rounding
# of each output; gradients sum more terms.
TOL = {
    torch.float32: {"o": (2e-5, 2e-5), "grad": (1e-4, 1e-4)},
    torch.float16: {"o": (2e-3, 2e-3), "grad": (5e-3, 5e-3)},
    torch.bfloat16: {"o": (1.6e-2, 1.6e-2), "grad": (4e-2, 3e-2)},
}
DTYPES = list(TOL)


def _cu(lengths, device):
    return torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)


def _check(lengths, H, D, dtype, device, close, scale=None, head_pad=0, qkv_pad=0):
    """The kernel's o and d(qkv) against the fp32 reference's, on one packed [T, 3, H, D] qkv.

    head_pad > 0: head stride D + head_pad (not a multiple of 16 bytes); qkv_pad > 0: q, k, v
    further apart than H (D + head_pad) elements (a view of a wider projection).
    """
    T = sum(lengths)
    cu = _cu(lengths, device)
    max_len = max(lengths)
    qkv = torch.randn(T, 3 + qkv_pad, H, D + head_pad, device=device, dtype=dtype)[:, :3, :, :D]
    do = torch.randn(T, H, D, device=device, dtype=dtype)

    ins = qkv.detach().requires_grad_()  # the strided view itself: the kernel reads its strides
    o = attn.attention(ins, cu, max_len, scale)
    (dqkv,) = torch.autograd.grad(o, ins, do)

    ref_in = qkv.detach().float().requires_grad_()
    o_ref = reference.attention(ref_in, cu, max_len, scale)
    (dqkv_ref,) = torch.autograd.grad(o_ref, ref_in, do.float())

    tol = TOL[dtype]
    assert o.dtype == dtype and o.shape == (T, H, D)
    assert dqkv.dtype == dtype and dqkv.shape == (T, 3, H, D)
    close(o, o_ref, tol["o"], "o")
    for i, name in enumerate(("dq", "dk", "dv")):
        close(dqkv[:, i], dqkv_ref[:, i], tol["grad"], name)


def test_backward_returns_one_packed_gradient(device):
    """The op's backward yields d(qkv) itself: no unbind / stack node in the graph (the model's call)."""
    qkv = torch.randn(12, 3, 2, 16, device=device, requires_grad=True)
    o = attn.attention(qkv, _cu([5, 7], device), 7)
    names, todo = set(), [o.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None:
            names.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
    assert not any("Stack" in n or "Unbind" in n for n in names), names


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [80, 104])
def test_mixed_crops(D, dtype, device, close):
    """One global (261) and two local (54) crops of a tile, packed: the model's call."""
    _check([54, 261, 54], 1, D, dtype, device, close)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 80, 104, 128])
def test_head_dims_odd_lengths(D, dtype, device, close):
    """1-token and prime segments at every head-dim chunking (one, two and three chunks)."""
    _check([1, 37, 5, 17], 2, D, dtype, device, close)


@pytest.mark.usefixtures("poison_outputs")
def test_block_boundaries(device, close):
    """Segments of whole 32-blocks, one token past and short of one, and shorter than a block."""
    _check([32, 33, 64, 63, 16, 15], 1, 80, torch.float16, device, close)


@pytest.mark.usefixtures("poison_outputs")
def test_64_row_blocks(device, close, monkeypatch):
    """64 x 64 blocks (GPU candidates): 261 = 4 x 64 + 5, 67 = 64 + 3, 54 (one padded block)."""
    monkeypatch.setattr(attn, "INTERPRET_CANDIDATE", (64, 64, 4, 1))
    _check([54, 261, 67], 1, 104, torch.bfloat16, device, close)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_segment_prime_length(dtype, device, close):
    _check([131], 1, 80, dtype, device, close, scale=0.3)


@pytest.mark.usefixtures("poison_outputs")
def test_short_and_empty_segments_wide_projection(device, close):
    _check([1, 0, 5, 67], 3, 104, torch.float32, device, close, qkv_pad=1)


@pytest.mark.usefixtures("poison_outputs")
def test_unaligned_strides(device, close):
    """Head stride 105 elements: no 16-byte promise (ALIGN 1), still exact."""
    q = torch.empty(4, 2, 105, dtype=torch.bfloat16)[..., :104]
    qkv = torch.empty(4, 3, 2, 104, dtype=torch.bfloat16).unbind(1)
    assert attn._consts(104, q.dtype, q)["ALIGN"] == 1
    assert attn._consts(104, q.dtype, *qkv)["ALIGN"] == 8
    _check([37, 20], 2, 104, torch.bfloat16, device, close, head_pad=1)


def test_int64_cu_seqlens_and_bad_shapes(device, close):
    qkv = torch.randn(20, 3, 1, 16, device=device)
    cu = torch.tensor([0, 7, 20], device=device)
    close(attn.attention(qkv, cu, 13), reference.attention(qkv, cu, 13), TOL[torch.float32]["o"], "o")
    for bad in (qkv[:, :2], qkv[:, 0]):
        with pytest.raises(ValueError, match=r"\[T, 3, H, D\]"):
            attn.attention(bad, cu, 13)


# ------------------------------------------------------------------------------------------------
# launch plan (what the cost model reads)
# ------------------------------------------------------------------------------------------------

def test_head_chunks_cover_the_head_dim():
    for D in range(1, 257):
        chunks = [c for c in attn.head_chunks(D) if c]
        assert all(c >= 16 and c & (c - 1) == 0 for c in chunks) and chunks == sorted(chunks, reverse=True), D
        # padding below one 16-column MMA step, except where 16-rounding needs four chunks (240 = 128+64+32+16)
        assert sum(chunks) == 256 if 225 <= D <= 240 else D <= sum(chunks) < D + 16, (D, chunks)


def test_plan_flops_against_hand_count():
    """ViT-H/14 tile: 2 x 261 + 8 x 54 tokens, 16 heads of 80, default blocks: 64 rows, 32 inner."""
    H, D, lens = 16, 80, [261, 261] + [54] * 8
    p = attn.launch_plan(lens, H, D)
    useful = 4 * H * D * (2 * 261 ** 2 + 8 * 54 ** 2)
    assert p["fwd"]["flops_useful"] == useful and p["bwd"]["flops_useful"] == 2 * useful
    # rows in 64-blocks (261 -> 320, 54 -> 64), inner columns in 32-blocks (261 -> 288, 54 -> 64)
    assert p["head_chunks"] == (64, 16, 0)
    assert p["kernels"]["fwd"]["flops_issued"] == 4 * H * 80 * (2 * 320 * 288 + 8 * 64 * 64)
    assert p["kernels"]["bwd_dkdv"]["flops_issued"] == 8 * H * 80 * (2 * 320 * 288 + 8 * 64 * 64)
    assert p["kernels"]["bwd_dq"]["flops_issued"] == 6 * H * 80 * (2 * 320 * 288 + 8 * 64 * 64)
    assert p["kernels"]["fwd"]["grid"] == (5, 10, 16)
    same = attn.launch_plan(None, H, D, cu_seqlens=torch.tensor([0] + lens).cumsum(0))
    assert same["fwd"] == p["fwd"] and same["bwd"] == p["bwd"]


@pytest.mark.parametrize("D", [64, 128])
def test_plan_no_padding_issues_exactly_the_useful_flops(D):
    """Segments of whole 64-blocks at a power-of-two head dim: only the backward's recompute is extra."""
    p = attn.launch_plan([128, 64, 192], 4, D)
    assert p["fwd"]["flops_issued"] == p["fwd"]["flops_useful"]
    assert math.isclose(p["bwd"]["flops_issued"], p["bwd"]["flops_useful"] * 14 / 8)


def test_plan_bytes_and_config_override():
    T, H, D = 261 + 54, 16, 104
    p = attn.launch_plan([261, 54], H, D, configs={"fwd": attn.CANDIDATES["fwd"][1][0]})
    assert p["kernels"]["fwd"]["bytes"] == 4 * T * H * D * 2 + 4 * T * H  # q, k, v, o in bf16 + fp32 lse
    assert p["kernels"]["fwd"]["config"]["BLOCK_N"] == attn.CANDIDATES["fwd"][1][0][1]
    assert attn.launch_plan([261, 54], H, D, torch.float32)["kernels"]["fwd"]["config"]["BLOCK_M"] == 32


@pytest.mark.gpu  # larger shapes; skipped without CUDA (tests/conftest.py)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 80, 104, 128])
def test_attention_gpu(D, dtype, close):
    """Four tiles of the ViT-H crops: 4 x (2 x 261 + 8 x 54), 16 heads."""
    _check([261, 261] + [54] * 8 + [261, 261] + [54] * 8, 16, D, dtype, torch.device("cuda"), close)
    _check(([261] * 2 + [54] * 8) * 2, 16, D, dtype, torch.device("cuda"), close, head_pad=8)


def _check_qkv(lengths, H, D, dtype, device, close, has_bias=True):
    """attention_qkv (projection + attention, the bias gradient from the kernels' own sums) against
    the reference's linear + attention: o and the gradients of x, weight and bias."""
    torch.manual_seed(1)
    T, C = sum(lengths), H * D
    cu = _cu(lengths, device)
    x = torch.randn(T, C, device=device, dtype=dtype)
    w = (torch.randn(3 * C, C, device=device) / C ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(3 * C, device=device)).to(dtype).requires_grad_() if has_bias else None
    do = torch.randn(T, H, D, device=device, dtype=dtype)
    params = [w] + ([b] if has_bias else [])

    xk = x.clone().requires_grad_()
    o = attn.attention_qkv(xk, w, b, H, cu, max(lengths))
    grads = torch.autograd.grad(o, [xk] + params, do)

    xr = x.float().requires_grad_()
    wr, br = w.detach().float().requires_grad_(), (b.detach().float().requires_grad_() if has_bias else None)
    qkv_r = torch.nn.functional.linear(xr, wr, br).view(T, 3, H, D)
    o_ref = reference.attention(qkv_r, cu, max(lengths))
    ref_grads = torch.autograd.grad(o_ref, [xr, wr] + ([br] if has_bias else []), do.float())

    # the same op unfused, in the same dtype: projection, then the attention op, autograd's bias sum
    xp = x.clone().requires_grad_()
    o_plain = attn.attention(torch.nn.functional.linear(xp, w, b).view(T, 3, H, D), cu, max(lengths))
    plain = torch.autograd.grad(o_plain, [xp] + params, do)

    tol = TOL[dtype]
    # o, dx and dweight come from the same kernels and GEMMs as the unfused ops: identical
    assert torch.equal(o, o_plain) and torch.equal(grads[0], plain[0]) and torch.equal(grads[1], plain[1])
    # against the fp32 reference (bf16 / fp16 also round the projection's output): the [C] and
    # [3C, C] sums over T rows are checked relative to their largest entry
    close(o, o_ref, tol["o"] if dtype == torch.float32 else tol["grad"], "o")
    close(grads[0], ref_grads[0], tol["grad"], "dx")

    def close_sum(a, r, name):
        close(a, r, (tol["grad"][1] * r.abs().max().item(), tol["grad"][1]), name)

    close_sum(grads[1], ref_grads[1], "dweight")
    if has_bias:
        db, db_ref = grads[2].view(3, C), ref_grads[2].view(3, C)
        close_sum(db[0], db_ref[0], "dbias q")
        assert not db[1].any()  # a key bias never changes the softmax: its gradient is exactly 0
        assert db_ref[1].abs().max() <= 1e-3 * db_ref[2].abs().max()  # (the reference's is rounding noise)
        close_sum(db[2], db_ref[2], "dbias v")


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [80, 104])
def test_qkv_projection_and_bias_gradient(D, dtype, device, close):
    """Segments of several 32-row blocks, a padded last block and a 1-token crop; 2 heads."""
    _check_qkv([37, 5, 70, 1], 2, D, dtype, device, close)


@pytest.mark.usefixtures("poison_outputs")
def test_qkv_projection_without_bias_and_64_row_blocks(device, close, monkeypatch):
    _check_qkv([54, 67], 1, 64, torch.float32, device, close, has_bias=False)
    monkeypatch.setattr(attn, "INTERPRET_CANDIDATE", (64, 64, 4, 1))
    _check_qkv([54, 67, 3], 2, 80, torch.float32, device, close)


def test_qkv_projection_under_autocast(device, close):
    """fp32 x and parameters under bf16 autocast (the ``parallel.fsdp: off`` path): the projection runs
    in bf16 as autocast's linear does, the gradients come back in fp32, equal to the unfused ops'."""
    torch.manual_seed(2)
    T, C, H = 40, 64, 2
    lengths = [17, 23]
    cu = _cu(lengths, device)
    x = torch.randn(T, C, device=device, requires_grad=True)
    w = (torch.randn(3 * C, C, device=device) / C ** 0.5).requires_grad_()
    b = torch.randn(3 * C, device=device, requires_grad=True)
    do = torch.randn(T, H, C // H, device=device, dtype=torch.bfloat16)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        o = attn.attention_qkv(x, w, b, H, cu, max(lengths))
        o_plain = attn.attention(torch.nn.functional.linear(x, w, b).view(T, 3, H, C // H), cu, max(lengths))
    assert o.dtype == torch.bfloat16 and torch.equal(o, o_plain)
    grads = torch.autograd.grad(o, [x, w, b], do)
    plain = torch.autograd.grad(o_plain, [x, w, b], do)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    torch.testing.assert_close(grads[0], plain[0], atol=1e-2, rtol=1e-2)  # autograd's dx stays in bf16's rounding
    torch.testing.assert_close(grads[1], plain[1], atol=1e-2, rtol=1e-2)
    db, db_plain = grads[2].view(3, C), plain[2].view(3, C)
    torch.testing.assert_close(db[0], db_plain[0], atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(db[2], db_plain[2], atol=5e-2, rtol=2e-2)
    assert not db[1].any()


def test_qkv_bad_shapes(device):
    x = torch.randn(5, 32, device=device)
    with pytest.raises(ValueError, match="attention_qkv"):
        attn.attention_qkv(x, torch.randn(96, 32, device=device), torch.randn(95, device=device), 2,
                           _cu([5], device), 5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [80, 104])
def test_qkv_projection_gpu(D, dtype, close):
    """Two tiles of the ViT-H crops, 16 heads (the launcher's tuned configurations)."""
    _check_qkv(([261] * 2 + [54] * 8) * 2, 16, D, dtype, torch.device("cuda"), close)


# ------------------------------------------------------------------------------------------------
# keep / pad: the per-crop stochastic-depth factor and the [T, C + pad] output of the block's
# residual GEMM (addmm(residual, a, w_ext.t()))
# ------------------------------------------------------------------------------------------------

KEEP_LENGTHS = [14, 9, 9, 14, 9]  # 2 crops of 14 tokens and 3 of 9, mixed
KEEP_FACTORS = [2.0, 0.0, 1.25, 2.0, 1.25]  # segment 1 dropped; 1 / (1 - 0.5) and 1.25 kept


def _seg_ids(lengths, device):
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))


def _padded_ref(o, keep_row, pad):
    """The reference output of attention_qkv(..., keep, seg_ids, pad) from the plain [T, H, D] o."""
    T = o.shape[0]
    a = o.reshape(T, -1) * keep_row[:, None]
    if not pad:
        return a.view_as(o)
    return torch.cat([a, keep_row[:, None], a.new_zeros(T, pad - 1)], dim=1)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("pad", [0, 8])
def test_qkv_keep_and_pad(pad, has_bias, device, close):
    """Scaled (keep 2, 0, 1.25 per crop), padded output against the reference + torch scaling: a,
    and the gradients of x, weight and bias for a loss that also reads a's extra columns."""
    torch.manual_seed(3)
    lengths, H, D = KEEP_LENGTHS, 2, 80  # head dim 80: chunks 64 + 16
    T, C = sum(lengths), H * D
    cu, seg = _cu(lengths, device), _seg_ids(lengths, device)
    keep = torch.tensor(KEEP_FACTORS, device=device)
    x = torch.randn(T, C, device=device)
    w = (torch.randn(3 * C, C, device=device) / C ** 0.5).requires_grad_()
    b = torch.randn(3 * C, device=device, requires_grad=True) if has_bias else None
    params = [w] + ([b] if has_bias else [])
    proj = torch.randn(T, C + pad, device=device)  # the loss: a random projection of all of a

    xk = x.clone().requires_grad_()
    a = attn.attention_qkv(xk, w, b, H, cu, max(lengths), keep=keep, seg_ids=seg, pad=pad)
    assert a.dtype == x.dtype and a.shape == ((T, C + pad) if pad else (T, H, D))
    grads = torch.autograd.grad((a.reshape(T, -1) * proj).sum(), [xk] + params)

    xr = x.clone().requires_grad_()
    wr, br = w.detach().clone().requires_grad_(), (b.detach().clone().requires_grad_() if has_bias else None)
    o_ref = reference.attention(torch.nn.functional.linear(xr, wr, br).view(T, 3, H, D), cu, max(lengths))
    a_ref = _padded_ref(o_ref, keep[seg], pad)
    ref_grads = torch.autograd.grad((a_ref.reshape(T, -1) * proj).sum(), [xr, wr] + ([br] if has_bias else []))

    tol = TOL[torch.float32]
    close(a, a_ref, tol["o"], "a")
    if pad:
        assert torch.equal(a[:, C], keep[seg]) and not a[:, C + 1:].any()
    dropped = seg == 1
    assert not a.reshape(T, -1)[dropped, :C].any()
    close(grads[0], ref_grads[0], tol["grad"], "dx")
    assert not grads[0][dropped].any()  # a dropped crop's dq, dk, dv are exact zeros
    close(grads[1], ref_grads[1], (tol["grad"][1] * ref_grads[1].abs().max().item(), tol["grad"][1]), "dweight")
    if has_bias:
        db, db_ref = grads[2].view(3, C), ref_grads[2].view(3, C)
        for i, name in ((0, "dbias q"), (2, "dbias v")):
            close(db[i], db_ref[i], (tol["grad"][1] * db_ref[i].abs().max().item(), tol["grad"][1]), name)
        assert not db[1].any()


@pytest.mark.usefixtures("poison_outputs")
def test_attention_fwd_op_keep_pad_exact_zeros(device, close):
    """The forward custom op with keep and pad on its own (its registered autograd): d(qkv) against
    the reference's, exact zeros for the dropped crop."""
    torch.manual_seed(4)
    lengths, H, D, pad = KEEP_LENGTHS, 1, 80, 8
    T, C = sum(lengths), H * D
    cu, seg = _cu(lengths, device), _seg_ids(lengths, device)
    keep = torch.tensor(KEEP_FACTORS, device=device)
    qkv = torch.randn(T, 3, H, D, device=device, requires_grad=True)
    proj = torch.randn(T, C + pad, device=device)
    a, _ = attn._attention_fwd(qkv, cu, max(lengths), D ** -0.5, keep, seg, pad)
    (dqkv,) = torch.autograd.grad((a * proj).sum(), qkv)
    qr = qkv.detach().clone().requires_grad_()
    a_ref = _padded_ref(reference.attention(qr, cu, max(lengths)), keep[seg], pad)
    (dqkv_ref,) = torch.autograd.grad((a_ref * proj).sum(), qr)
    close(a, a_ref, TOL[torch.float32]["o"], "a")
    for i, name in enumerate(("dq", "dk", "dv")):
        close(dqkv[:, i], dqkv_ref[:, i], TOL[torch.float32]["grad"], name)
    assert not dqkv[seg == 1].any()


@pytest.mark.usefixtures("poison_outputs")
def test_qkv_pad_without_keep(device):
    """keep=None, pad=8: the plain output in the first C columns, column C all ones, the rest zeros;
    the gradients equal the unpadded call's (the extra columns' gradient ignored)."""
    torch.manual_seed(5)
    lengths, H, D, pad = [14, 9], 2, 16, 8
    T, C = sum(lengths), H * D
    cu = _cu(lengths, device)
    x = torch.randn(T, C, device=device, requires_grad=True)
    w = (torch.randn(3 * C, C, device=device) / C ** 0.5).requires_grad_()
    b = torch.randn(3 * C, device=device, requires_grad=True)
    a = attn.attention_qkv(x, w, b, H, cu, max(lengths), pad=pad)
    o = attn.attention_qkv(x, w, b, H, cu, max(lengths))
    assert a.shape == (T, C + pad) and torch.equal(a[:, :C], o.reshape(T, C))
    assert torch.equal(a[:, C], torch.ones(T, device=device)) and not a[:, C + 1:].any()
    # the kernels' 16-byte promise holds for the padded view (token stride C + pad, head stride D)
    view = attn._heads(torch.empty(T, 2 * 80 + pad, dtype=torch.bfloat16), 2, 80)
    assert view.stride() == (2 * 80 + pad, 80, 1) and attn._consts(80, view.dtype, view)["ALIGN"] == 8
    proj = torch.randn(T, C + pad, device=device)
    grads = torch.autograd.grad((a * proj).sum(), [x, w, b])
    plain = torch.autograd.grad((o.reshape(T, C) * proj[:, :C]).sum(), [x, w, b])
    for g, p in zip(grads, plain, strict=True):
        torch.testing.assert_close(g, p, atol=1e-6, rtol=1e-6)


def test_opcheck_keep_pad(device):
    """Schema, fake (the [T, C + pad] output), autograd registration of the ops with the new arguments."""
    cu, seg = _cu([5, 7], device), _seg_ids([5, 7], device)
    keep = torch.tensor([0.0, 2.0], device=device)
    qkv = torch.randn(12, 3, 2, 16, device=device, requires_grad=True)
    torch.library.opcheck(attn._attention_fwd, (qkv, cu, 7, 0.25, keep, seg, 8))
    torch.library.opcheck(attn._attention_fwd, (qkv, cu, 7, 0.25, None, None, 8))
    torch.library.opcheck(attn._attention_fwd, (qkv, cu, 7, 0.25, keep, seg, 0))


def test_qkv_keep_pad_bad_args(device):
    T, C, H = 12, 32, 2
    x, w = torch.randn(T, C, device=device), torch.randn(3 * C, C, device=device)
    cu, seg = _cu([5, 7], device), _seg_ids([5, 7], device)
    keep = torch.tensor([1.0, 2.0], device=device)
    bad = [
        (dict(keep=keep[:1], seg_ids=seg), r"keep must be a floating \[S\] = \[2\]"),
        (dict(keep=torch.tensor([1, 2], device=device), seg_ids=seg), "keep must be a floating"),
        (dict(pad=4), "pad must be 0 or a positive multiple of 8; got 4"),
        (dict(pad=-8), "pad must be 0 or a positive multiple of 8; got -8"),
        (dict(keep=keep), "keep needs seg_ids"),
        (dict(keep=keep, seg_ids=seg[:-1]), r"seg_ids must be an int64 \[T\] = \[12\]"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(ValueError, match=msg) as err:
            attn.attention_qkv(x, w, None, H, cu, 7, **kwargs)
        assert "\n" not in str(err.value) and str(err.value).startswith("attention_qkv: ")
    assert attn.attention_qkv.supports_keep_pad and attn.attention.qkv is attn.attention_qkv


@pytest.mark.gpu  # the model's call at ViT-H / ViT-G head dims; skipped without CUDA (tests/conftest.py)
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("D", [80, 104])
def test_qkv_keep_pad_gpu(D, dtype, close):
    """Two tiles of the ViT-H crops, 16 heads, drop path 0.4 per crop (keep 0 or 1 / 0.6) and the
    [T, C + 8] rows of the residual GEMM, in the training dtypes, against the fp32 reference."""
    torch.manual_seed(5)
    device = torch.device("cuda")
    lengths, H = ([261] * 2 + [54] * 8) * 2, 16
    T, C, pad = sum(lengths), H * D, 8
    cu, seg = _cu(lengths, device), _seg_ids(lengths, device)
    keep = ((torch.rand(len(lengths), device=device) >= 0.4).float() / 0.6)
    keep[0], keep[3] = 0.0, 1 / 0.6  # at least one crop dropped and one kept
    x = torch.randn(T, C, device=device).to(dtype)
    w = (torch.randn(3 * C, C, device=device) / C ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(3 * C, device=device).to(dtype).requires_grad_()
    proj = torch.randn(T, C + pad, device=device)
    xk = x.clone().requires_grad_()
    a = attn.attention_qkv(xk, w, b, H, cu, max(lengths), keep=keep, seg_ids=seg, pad=pad)
    grads = torch.autograd.grad((a.float() * proj).sum(), [xk, w, b])
    xr, wr, br = (t.detach().float().requires_grad_() for t in (x, w, b))
    o_ref = reference.attention(torch.nn.functional.linear(xr, wr, br).view(T, 3, H, D), cu, max(lengths))
    a_ref = _padded_ref(o_ref, keep[seg], pad)
    ref_grads = torch.autograd.grad((a_ref * proj).sum(), [xr, wr, br])
    tol = TOL[dtype]  # as test_qkv_projection_gpu: the projection's output is rounded too
    close(a, a_ref, tol["grad"], "a")
    assert torch.equal(a[:, C].float(), keep[seg].to(dtype).float()) and not a[:, C + 1:].any()
    close(grads[0], ref_grads[0], tol["grad"], "dx")
    assert not grads[0][seg == 0].any()  # the dropped crop: exact zeros
    for name, g, r in (("dweight", grads[1], ref_grads[1]), ("dbias", grads[2], ref_grads[2])):
        close(g, r, (tol["grad"][1] * r.abs().max().item(), tol["grad"][1]), name)  # sums over T rows
