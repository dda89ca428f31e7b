"""DINO / iBOT / KoLeo / KDE against hand computations on small inputs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from virchow_fast.losses import DINOLoss, IBOTLoss, dino_pairs, ibot_pairs, kde_loss, koleo_loss
from virchow_fast.ops import reference


def _np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _np_sinkhorn(logits, temp, iters):
    """The SwAV/DINOv2 algorithm written out with loops over numpy arrays."""
    q = np.exp(logits / temp).T  # [K, M]
    k, m = q.shape
    q = q / q.sum()
    for _ in range(iters):
        for r in range(k):
            q[r] /= q[r].sum() * k
        for c in range(m):
            q[:, c] /= q[:, c].sum() * m
    return (q * m).T


def _unit(n, b, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, b, generator=g, dtype=torch.float64), dim=-1)


def test_dino_pairs_skip_same_view_and_average():
    s, t, w = dino_pairs(n_global=2, n_crops=4, batch=3)
    pairs = {(int(a), int(b)) for a, b in zip(s, t, strict=True)}
    assert len(pairs) == 3 * (2 * 4 - 2)
    for a, b in pairs:
        assert a % 3 == b % 3  # same tile
        assert a // 3 != b // 3  # never the same view
    assert torch.allclose(w.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn"])
def test_dino_loss_matches_hand_computation(centering):
    k, b, batch, n_global, n_crops = 5, 4, 2, 2, 3
    sz, tz = _unit(n_crops * batch, b, 0), _unit(n_global * batch, b, 1)
    sw, tw = _unit(k, b, 2), _unit(k, b, 3)
    center = torch.linspace(-0.1, 0.1, k, dtype=torch.float64)
    t_temp, s_temp = 0.05, 0.1
    loss_fn = DINOLoss(k, centering, s_temp, 0.9, 3).double()
    loss_fn.center.copy_(center)
    got = loss_fn(sz, sw, tz, tw, n_global, t_temp)

    t_logits = (tz @ tw.T).numpy()
    if centering == "softmax":
        probs = np.stack([_np_softmax((row - center.numpy()) / t_temp) for row in t_logits])
    else:
        probs = _np_sinkhorn(t_logits, t_temp, 3)
    s_logits = (sz @ sw.T).numpy() / s_temp
    total, n = 0.0, 0
    for tile in range(batch):
        for t in range(n_global):
            for s in range(n_crops):
                if s == t:
                    continue
                logp = s_logits[s * batch + tile] - np.log(np.exp(s_logits[s * batch + tile]).sum())
                total += -(probs[t * batch + tile] * logp).sum()
                n += 1
    assert got.item() == pytest.approx(total / n, rel=1e-5)  # the reference computes in fp32
    if centering == "softmax":  # the center moved towards the batch mean of teacher logits
        expected = 0.9 * center.numpy() + 0.1 * t_logits.mean(0)
        np.testing.assert_allclose(loss_fn.center.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_sinkhorn_marginals_and_hand_values():
    logits = torch.tensor([[0.9, -0.2, 0.1], [0.3, 0.5, -0.7], [-0.4, 0.2, 0.8], [0.1, 0.1, 0.0]], dtype=torch.float64)
    q = reference.sinkhorn_knopp(logits, 0.1, n_iters=3)
    np.testing.assert_allclose(q.numpy(), _np_sinkhorn(logits.numpy(), 0.1, 3), rtol=1e-5)
    torch.testing.assert_close(q.sum(1), torch.ones(4), rtol=1e-5, atol=1e-6)  # each row a distribution
    q_many = reference.sinkhorn_knopp(logits, 0.1, n_iters=200)
    torch.testing.assert_close(q_many.sum(0), torch.full((3,), 4 / 3), rtol=1e-5, atol=1e-5)


def test_sinkhorn_all_reduce_hook_sees_global_batch():
    """Two 'ranks' of 3 rows with an all-reduce equal one rank of 6 rows."""
    logits = torch.randn(6, 7, dtype=torch.float64)
    whole = reference.sinkhorn_knopp(logits, 0.07, 3)
    halves = [logits[:3], logits[3:]]
    # simulate the all-reduce by running both halves in lockstep threads of a generator
    import threading
    barrier = threading.Barrier(2)
    buf, out = {}, {}

    def worker(r):
        def all_reduce(t):
            buf[r] = t.clone()
            barrier.wait()
            t.copy_(buf[0] + buf[1])
            barrier.wait()
        out[r] = reference.sinkhorn_knopp(halves[r], 0.07, 3, all_reduce, total_rows=6)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    torch.testing.assert_close(torch.cat([out[0], out[1]]), whole)


def test_ibot_weights_average_per_image_then_over_images():
    masks = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    s, t, w = ibot_pairs(masks)
    assert torch.equal(s, t) and s.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(w, torch.tensor([1 / 9, 1 / 9, 1 / 9, 1 / 3]))


def test_ibot_loss_matches_hand_computation():
    k, b = 6, 4
    masks = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    n = int(masks.sum())
    sz, tz, sw, tw = _unit(n, b, 4), _unit(n, b, 5), _unit(k, b, 6), _unit(k, b, 7)
    loss_fn = IBOTLoss(k, "softmax", 0.1, 0.9, 3).double()
    got = loss_fn(sz, sw, tz, tw, masks, 0.04)
    t_logits, s_logits = (tz @ tw.T).numpy(), (sz @ sw.T).numpy() / 0.1
    ce = [-(_np_softmax(t_logits[i] / 0.04) * (s_logits[i] - np.log(np.exp(s_logits[i]).sum()))).sum()
          for i in range(n)]
    expected = ((ce[0] + ce[1]) / 2 + ce[2] / 1) / 3
    assert got.item() == pytest.approx(expected, rel=1e-5)  # the reference computes in fp32


def test_ibot_loss_without_masks_is_zero_and_differentiable():
    loss_fn = IBOTLoss(8, "sinkhorn", 0.1, 0.9, 3)
    sw = torch.randn(8, 4, requires_grad=True)
    no_masks = torch.zeros(2, 4, dtype=torch.bool)
    loss = loss_fn(torch.zeros(0, 4), sw, torch.zeros(0, 4), torch.randn(8, 4), no_masks, 0.04)
    loss.backward()
    assert loss.item() == 0.0 and sw.grad is not None


def test_koleo_hand_computation():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.cos(0.1), math.sin(0.1)]])
    d01 = math.sqrt(2.0)
    d02 = 2 * math.sin(0.05)
    d12 = 2 * math.sin((math.pi / 2 - 0.1) / 2)
    nearest = [min(d01, d02), min(d01, d12), min(d02, d12)]
    expected = -sum(math.log(d + 1e-8) for d in nearest) / 3
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-5)


def test_kde_hand_computation():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    kappa = 5.0
    cos = [[1, 0, -1], [0, 1, 0], [-1, 0, 1]]
    expected = np.mean([math.log(sum(math.exp(kappa * cos[i][j]) for j in range(3) if j != i)) for i in range(3)])
    assert kde_loss(x * 3.0, kappa).item() == pytest.approx(expected, rel=1e-6)  # scale-free: normalised inside


def test_minimising_kde_spreads_clustered_features():
    torch.manual_seed(0)
    x = (torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.05 * torch.randn(32, 4)).requires_grad_(True)

    def mean_pairwise_distance(v):
        z = F.normalize(v.detach(), dim=-1)
        return torch.pdist(z).mean().item()

    before, kde_before = mean_pairwise_distance(x), kde_loss(x, 5.0).item()
    opt = torch.optim.SGD([x], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        kde_loss(x, 5.0).backward()
        opt.step()
    after = mean_pairwise_distance(x)
    assert after > 3 * before
    # and the loss itself went down: clustered it starts near its maximum log(n - 1) + kappa = 8.43
    assert kde_before > 8.0 and kde_loss(x, 5.0).item() < kde_before - 0.4


def test_torch_backend_is_the_pure_reference(monkeypatch):
    """ops.prototype_loss on torch never goes through another op's backend (a forced reference is the
    reference); its teacher targets are reference.teacher_probs's."""
    from virchow_fast import ops
    from virchow_fast.ops import dispatch, reference

    assert ops.implementation("prototype_loss", "torch") is reference.prototype_loss
    called = []
    real = dispatch._dispatch

    def spy(op, device):
        called.append(op)
        return real(op, device)

    monkeypatch.setattr(dispatch, "_dispatch", spy)
    loss_fn = DINOLoss(5, "sinkhorn", 0.1, 0.9, 3)
    loss_fn(_unit(6, 4, 0).float(), _unit(5, 4, 1).float(), _unit(4, 4, 2).float(), _unit(5, 4, 3).float(), 2, 0.04)
    assert called == ["prototype_loss"]
