"""Fused head loss (kernels/prototype_loss.py) against ops/reference.py: loss, teacher logit mean,
d student_z, d student_w; both centerings; the DINO and iBOT pairings built the way losses/ builds
them; the all-reduce hook. CPU runs Triton's interpreter, so the shapes are small (K 1000-4096)."""
import pytest
import torch
import torch.nn.functional as F

from virchow_fast import ops
from virchow_fast.kernels import prototype_loss as pl
from virchow_fast.ops import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 reference vs fp32 kernel: the small-shape tests run the kernel's dots in IEEE fp32 (the
# fixture below); tests marked tf32 run the default TF32 dots with their own tolerance.
TOL = dict(rtol=1e-4, atol=1e-5)
TF32_TOL = dict(rtol=2e-2, atol=2e-3)
T_S, T_T = 0.1, 0.04


# every test: kernel outputs and partial buffers NaN-poisoned (an element never written shows)
pytestmark = pytest.mark.usefixtures("poison_outputs")


@pytest.fixture(autouse=True)
def _ieee_dots(request, monkeypatch):
    """IEEE fp32 dots unless the test is marked ``tf32`` (it then checks the production precision)."""
    if request.node.get_closest_marker("tf32") is None:
        monkeypatch.setattr(pl, "_PRECISION", "ieee")


def _unit(*shape):
    return F.normalize(torch.randn(*shape, device=DEVICE), dim=-1)


def _heads(n, m, k, b):
    sz = _unit(n, b).requires_grad_()
    sw = _unit(k, b).requires_grad_()
    return sz, sw, _unit(m, b), _unit(k, b)


def _check(args, kwargs, tol=TOL):
    sz, sw = args[0], args[1]
    loss, mean = pl.prototype_loss(*args, **kwargs)
    g = torch.autograd.grad(loss, [sz, sw])
    loss_r, mean_r = ref.prototype_loss(*args, **kwargs)
    g_r = torch.autograd.grad(loss_r, [sz, sw])
    torch.testing.assert_close(loss, loss_r, **tol)
    torch.testing.assert_close(mean, mean_r, **TOL)
    assert mean.shape == ((sw.shape[0],) if args[9] == "softmax" else (0,))  # only the softmax center reads it
    for got, want in zip(g, g_r, strict=True):
        torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * want.abs().max().item())


@pytest.mark.parametrize("centering", ["sinkhorn", "softmax"])
@pytest.mark.parametrize("n, m, k, b", [(37, 11, 1000, 48), (1, 1, 1000, 16), (23, 13, 4096, 64)])
def test_matches_reference(centering, n, m, k, b):
    torch.manual_seed(n + k)
    sz, sw, tz, tw = _heads(n, m, k, b)
    p = 2 * n + 1
    s_idx = torch.randint(0, n, (p,), device=DEVICE)
    t_idx = torch.randint(0, m, (p,), device=DEVICE)
    weight = torch.rand(p, device=DEVICE)
    center = 0.1 * torch.randn(k, device=DEVICE)
    _check((sz, sw, tz, tw, s_idx, t_idx, weight, T_S, T_T, centering),
           dict(center=center if centering == "softmax" else None))


def test_dino_pairs_same_view_skipped():
    """Student crop c of tile i vs teacher global g of tile i, c != g, weight 1 / (B * n_pairs)."""
    torch.manual_seed(1)
    B, n_global, n_crops, k, b = 3, 2, 5, 1000, 32
    sz, sw, tz, tw = _heads(n_crops * B, n_global * B, k, b)  # rows crop-major: crop * B + tile
    n_pairs = n_global * n_crops - n_global
    pairs = [(c * B + i, g * B + i) for g in range(n_global) for c in range(n_crops) if c != g for i in range(B)]
    s_idx, t_idx = (torch.tensor(v, device=DEVICE) for v in zip(*pairs, strict=True))
    weight = torch.full((len(pairs),), 1.0 / (B * n_pairs), device=DEVICE)
    loss, _ = pl.prototype_loss(sz, sw, tz, tw, s_idx, t_idx, weight, T_S, T_T, "sinkhorn")
    # the DINOv2 loop, written out
    with torch.no_grad():
        probs = ref.teacher_probs(tz, tw, T_T, "sinkhorn").view(n_global, B, k)
    s_logits = ref.prototype_logits(sz, sw).view(n_crops, B, k)
    want = sum(ref.soft_cross_entropy(s_logits[c], probs[g], T_S).mean()
               for g in range(n_global) for c in range(n_crops) if c != g) / n_pairs
    torch.testing.assert_close(loss, want, **TOL)
    g, g_r = (torch.autograd.grad(x, [sz, sw]) for x in (loss, want))
    for got, exp in zip(g, g_r, strict=True):
        torch.testing.assert_close(got, exp, rtol=TOL["rtol"], atol=TOL["atol"] * exp.abs().max().item())


def test_ibot_masked_tokens_matched():
    """Each masked student patch vs the teacher token at the same place, weight 1 / (n_masked_i * n_images)."""
    torch.manual_seed(2)
    n_img, n_patch, k, b = 4, 16, 1000, 32
    masks = torch.zeros(n_img, n_patch, dtype=torch.bool)
    masks[0, [1, 2, 5]] = True
    masks[2, 3:11] = True
    masks[3, 15] = True  # image 1 is not masked
    masks = masks.to(DEVICE)
    student_tokens, teacher_tokens = _unit(n_img * n_patch, b), _unit(n_img * n_patch, b)
    flat = masks.flatten().nonzero().squeeze(1)
    sz = student_tokens[flat].clone().requires_grad_()
    sw = _unit(k, b).requires_grad_()
    tz, tw = teacher_tokens[flat], _unit(k, b)  # teacher rows = teacher tokens at the masked places
    n_masked = masks.sum(1)
    weight = (1.0 / (n_masked.float() * n_img)).repeat_interleave(n_masked)
    idx = torch.arange(flat.numel(), device=DEVICE)
    loss, _ = pl.prototype_loss(sz, sw, tz, tw, idx, idx, weight, T_S, T_T, "sinkhorn")
    with torch.no_grad():
        probs = ref.teacher_probs(tz, tw, T_T, "sinkhorn")
    ce = ref.soft_cross_entropy(ref.prototype_logits(sz, sw), probs, T_S)
    per_image = [ce[(flat // n_patch) == i].mean() for i in range(n_img) if n_masked[i] > 0]
    want = torch.stack(per_image).sum() / n_img
    torch.testing.assert_close(loss, want, **TOL)
    torch.testing.assert_close(torch.autograd.grad(loss, sz)[0], torch.autograd.grad(want, sz)[0],
                               rtol=TOL["rtol"], atol=1e-4)


def _materialise(tz, tw, alpha, beta, temp):
    return torch.exp(ref.prototype_logits(tz, tw) / temp + beta + alpha[:, None])


@pytest.mark.parametrize("iters", [0, 3])
def test_sinkhorn_targets_equal_reference(iters):
    torch.manual_seed(3)
    m, k, b = 19, 1000, 32
    tz, tw = _unit(m, b), _unit(k, b)
    alpha, beta = pl.teacher_scalings(tz, tw, T_T, "sinkhorn", sinkhorn_iters=iters)
    beta = torch.zeros(k, device=DEVICE) if beta is None else beta
    got = _materialise(tz, tw, alpha, beta, T_T)
    want = ref.sinkhorn_knopp(ref.prototype_logits(tz, tw), T_T, iters)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_sinkhorn_marginals_uniform():
    """Rows sum to 1 after any number of iterations; columns converge to M / K."""
    torch.manual_seed(4)
    m, k, b, temp = 64, 1000, 32, 0.5
    tz, tw = _unit(m, b), _unit(k, b)
    alpha, beta = pl.teacher_scalings(tz, tw, temp, "sinkhorn", sinkhorn_iters=3)
    q = _materialise(tz, tw, alpha, beta, temp)
    torch.testing.assert_close(q.sum(1), torch.ones(m, device=DEVICE), rtol=1e-5, atol=1e-5)
    alpha, beta = pl.teacher_scalings(tz, tw, temp, "sinkhorn", sinkhorn_iters=12)
    assert alpha.isfinite().all() and beta.isfinite().all() and alpha.abs().max() < 50
    cols = _materialise(tz, tw, alpha, beta, temp).sum(0)
    torch.testing.assert_close(cols, torch.full_like(cols, m / k), rtol=1e-3, atol=0)


def test_all_reduce_hook_sees_global_batch():
    """A second rank holding identical teacher rows (hook doubles the sums) == one rank with both."""
    torch.manual_seed(5)
    m, k, b = 9, 1000, 32
    tz, tw = _unit(m, b), _unit(k, b)
    calls = []

    def double(t):
        calls.append(t.shape)
        t.mul_(2)

    alpha, beta = pl.teacher_scalings(tz, tw, T_T, "sinkhorn", 3, all_reduce=double, total_rows=2 * m)
    assert calls == [torch.Size([k])] * 3
    want = ref.sinkhorn_knopp(ref.prototype_logits(torch.cat([tz, tz]), tw), T_T, 3)[:m]
    torch.testing.assert_close(_materialise(tz, tw, alpha, beta, T_T), want, rtol=1e-4, atol=1e-7)


def test_softmax_center_targets():
    torch.manual_seed(6)
    m, k, b = 7, 1000, 32
    tz, tw, center = _unit(m, b), _unit(k, b), 0.2 * torch.randn(k, device=DEVICE)
    alpha, beta = pl.teacher_scalings(tz, tw, T_T, "softmax", center)
    want = ref.softmax_center(ref.prototype_logits(tz, tw), center, T_T)
    torch.testing.assert_close(_materialise(tz, tw, alpha, beta, T_T), want, rtol=1e-4, atol=1e-7)


def test_ops_dispatch_uses_fused_kernel(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VIRCHOW_FAST_PROTOTYPE_LOSS", "triton")
    assert ops.backend_for("prototype_loss", DEVICE) == "triton"
    torch.manual_seed(7)
    sz, sw, tz, tw = _heads(5, 3, 1000, 16)
    idx = torch.tensor([0, 1, 2, 3, 4], device=DEVICE)
    t_idx = torch.tensor([0, 1, 2, 0, 1], device=DEVICE)
    weight = torch.full((5,), 0.2, device=DEVICE)
    loss, _ = ops.prototype_loss(sz, sw, tz, tw, idx, t_idx, weight, T_S, T_T, "sinkhorn")
    loss_r, _ = ref.prototype_loss(sz, sw, tz, tw, idx, t_idx, weight, T_S, T_T, "sinkhorn")
    torch.testing.assert_close(loss, loss_r, **TOL)


def test_no_grad_path_and_grad_scaling():
    torch.manual_seed(8)
    sz, sw, tz, tw = _heads(6, 2, 1000, 16)
    idx, t_idx = torch.arange(6, device=DEVICE), torch.tensor([0, 1] * 3, device=DEVICE)
    weight = torch.rand(6, device=DEVICE)
    args = (idx, t_idx, weight, T_S, T_T, "softmax", torch.zeros(1000, device=DEVICE))
    with torch.no_grad():
        loss_ng, _ = pl.prototype_loss(sz, sw, tz, tw, *args)
    loss, _ = pl.prototype_loss(sz, sw, tz, tw, *args)
    torch.testing.assert_close(loss_ng, loss)
    (g1,) = torch.autograd.grad(loss, sz, retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        torch.autograd.grad(loss, sz)
    loss3, _ = pl.prototype_loss(sz, sw, tz, tw, *args)
    (g3,) = torch.autograd.grad(3 * loss3, sz)
    torch.testing.assert_close(g3, 3 * g1)


def test_custom_ops_opcheck():
    """The kernel passes are registered custom ops with fake kernels (torch.compile / FSDP trace them)."""
    torch.manual_seed(9)
    z, w, v = _unit(5, 16), _unit(40, 16), torch.randn(5, 16, device=DEVICE)
    beta, alpha = torch.randn(40, device=DEVICE), torch.randn(5, device=DEVICE)
    ops_ = torch.ops.virchow_fast_triton
    for op, args in [(ops_.head_row_lse, (z, w, 2.0, beta)), (ops_.head_row_expect, (z, w, 2.0, None, alpha, w)),
                     (ops_.head_row_softmax_expect, (z, w, 2.0, beta, w)),
                     (ops_.head_col_sum, (z, w, 2.0, beta, alpha)),
                     (ops_.head_col_reduce, (z, w, 2.0, beta, alpha, v, 0.5)),
                     (ops_.head_col_reduce_add_,
                      (torch.zeros(40, 16, device=DEVICE), z, w, 2.0, None, alpha, v, -1.0))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("centering", ["sinkhorn", "softmax"])
def test_bf16_features(centering):
    """bf16 heads (autocast): grads come back in bf16; the kernels' bf16 dots run as bf16 (in the
    interpreter through kernels/_common.py's bf16 dot fix)."""
    torch.manual_seed(10)
    n, m, k, b = 19, 7, 1000, 32
    sz, sw = (_unit(r, b).bfloat16().requires_grad_() for r in (n, k))
    tz, tw = _unit(m, b).bfloat16(), _unit(k, b).bfloat16()
    s_idx, t_idx = torch.randint(0, n, (30,), device=DEVICE), torch.randint(0, m, (30,), device=DEVICE)
    weight, center = torch.rand(30, device=DEVICE), 0.1 * torch.randn(k, device=DEVICE)
    args = (sz, sw, tz, tw, s_idx, t_idx, weight, T_S, T_T, centering, center)
    loss, _ = pl.prototype_loss(*args)
    g = torch.autograd.grad(loss, [sz, sw])
    loss_r, _ = ref.prototype_loss(*args)
    g_r = torch.autograd.grad(loss_r, [sz, sw])
    torch.testing.assert_close(loss, loss_r, rtol=1e-2, atol=1e-3)
    for got, want in zip(g, g_r, strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=1e-2 * want.float().abs().max().item())


@pytest.mark.tf32
@pytest.mark.gpu  # model-size head shapes; skipped without CUDA (tests/conftest.py)
@pytest.mark.parametrize("kind, k, b", [("dino", 65536, 256), ("ibot", 131072, 256), ("dino", 131072, 384)])
def test_model_shapes_on_gpu(kind, k, b):
    """ViT-H / ViT-G head sizes at 8 tiles (the benchmark runs 32): multi-split K, b = 384 tiles,
    the default TF32 dots (the small-shape tests pin IEEE fp32)."""
    torch.manual_seed(11)
    tiles = 8
    if kind == "dino":
        n, m = 10 * tiles, 2 * tiles
        pairs = [(c * tiles + i, g * tiles + i) for g in range(2) for c in range(10) if c != g for i in range(tiles)]
        s_idx, t_idx = (torch.tensor(v, device=DEVICE) for v in zip(*pairs, strict=True))
    else:
        n = m = 614
        s_idx = t_idx = torch.arange(n, device=DEVICE)
    weight = torch.full((s_idx.numel(),), 1.0 / s_idx.numel(), device=DEVICE)
    sz, sw, tz, tw = _heads(n, m, k, b)
    _check((sz, sw, tz, tw, s_idx, t_idx, weight, T_S, T_T, "sinkhorn"), {}, TF32_TOL)


def test_traces_under_torch_compile():
    """Dynamo + AOTAutograd capture the whole loss in one graph (the passes are custom ops)."""
    torch.manual_seed(12)
    sz, sw, tz, tw = _heads(9, 3, 1000, 16)
    s_idx, t_idx = torch.arange(9, device=DEVICE), torch.tensor([0, 1, 2] * 3, device=DEVICE)
    weight = torch.full((9,), 1 / 9, device=DEVICE)
    args = (sz, sw, tz, tw, s_idx, t_idx, weight, T_S, T_T, "sinkhorn")
    compiled = torch.compile(pl.prototype_loss, backend="aot_eager", fullgraph=True)
    loss, _ = compiled(*args)
    g = torch.autograd.grad(loss, [sz, sw])
    loss_r, _ = ref.prototype_loss(*args)
    g_r = torch.autograd.grad(loss_r, [sz, sw])
    torch.testing.assert_close(loss, loss_r, **TOL)
    for got, want in zip(g, g_r, strict=True):
        torch.testing.assert_close(got, want, rtol=TOL["rtol"], atol=TOL["atol"] * want.abs().max().item())


@pytest.mark.parametrize("centering", ["sinkhorn", "softmax"])
def test_rank_without_rows(centering):
    """iBOT on a rank with no masked token: loss 0, zero gradients, and (Sinkhorn) the rank still
    joins every all-reduce so the other ranks do not hang."""
    k, b = 1000, 16
    sz = torch.zeros(0, b, device=DEVICE, requires_grad=True)
    sw = _unit(k, b).requires_grad_()
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    calls = []
    loss, mean = pl.prototype_loss(sz, sw, torch.zeros(0, b, device=DEVICE), _unit(k, b), empty, empty,
                                   torch.zeros(0, device=DEVICE), T_S, T_T, centering, torch.zeros(k, device=DEVICE),
                                   all_reduce=calls.append, total_rows=40)
    assert loss.item() == 0 and mean.shape == ((k,) if centering == "softmax" else (0,))
    assert len(calls) == (3 if centering == "sinkhorn" else 0)
    g = torch.autograd.grad(loss, [sz, sw])
    assert g[0].shape == (0, b) and g[1].abs().max().item() == 0
