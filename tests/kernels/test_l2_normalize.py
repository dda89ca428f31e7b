"""l2_normalize kernel (kernels/l2_normalize.py) vs ops/reference.py (F.normalize(w, dim=-1)):
forward and backward, at the heads' prototype widths (b = 256, 384) and awkward ones, with a zero
row and a row below eps (torch's clamped branch), in fp32 and bf16."""
import pytest
import torch

from virchow_fast.ops import reference

L2 = pytest.importorskip("virchow_fast.kernels.l2_normalize")

TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-2, 1e-2)}


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
# rows not a multiple of the program's 8; b = the heads' bottlenecks, an odd one, a tiny one
@pytest.mark.parametrize("shape", [(21, 384), (13, 256), (9, 37), (3, 4)], ids=lambda s: "x".join(map(str, s)))
def test_l2_normalize(shape, dtype, device, close):
    torch.manual_seed(0)
    w = torch.randn(shape, device=device)
    w[1] = 0.0  # a zero row: norm clamped to eps, y = 0, dw = dy / eps
    w[2] *= 1e-14  # below eps: the clamped branch with a nonzero row
    w = w.to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)
    wk = w.clone().requires_grad_()
    y = L2.l2_normalize(wk)
    (dw,) = torch.autograd.grad(y, wk, dy)
    wr = w.float().requires_grad_()
    yr = reference.l2_normalize(wr)
    (dwr,) = torch.autograd.grad(yr, wr, dy.float())
    assert y.dtype == dtype and dw.dtype == dtype
    close(y, yr, TOL[dtype], "y")
    atol, rtol = TOL[dtype]
    rows = [0] + list(range(3, shape[0]))  # the regular rows; the clamped ones have huge 1 / eps gradients
    close(dw[rows], dwr[rows], (atol, rtol), "dw")
    for r in (1, 2):
        torch.testing.assert_close(dw[r].float(), dwr[r].float(), rtol=TOL[dtype][1], atol=0,
                                   msg=lambda m, r=r: f"clamped row {r}: {m}")


def test_l2_normalize_arguments():
    with pytest.raises(ValueError, match=r"must be \[rows, C\]"):
        L2.l2_normalize(torch.ones(2, 3, 4))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        L2.l2_normalize(torch.ones(2, 3, dtype=torch.long))


def test_head_prototypes_use_it(monkeypatch):
    """The heads normalise their prototypes through ops.l2_normalize (the backend switch)."""
    from virchow_fast import ops
    from virchow_fast.model.heads import DINOHead

    head = DINOHead(16, 64, hidden_dim=32, bottleneck_dim=8)
    calls = []
    monkeypatch.setattr(ops, "l2_normalize", lambda w, eps=1e-12: calls.append(w.shape) or reference.l2_normalize(w))
    w = head.normalized_prototypes()
    assert calls == [(64, 8)]
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(64))
