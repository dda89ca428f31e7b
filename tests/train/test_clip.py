"""Gradient clipping folded into fused AdamW (its grad_scale) against torch's clip-then-step."""
import pytest
import torch

from virchow_fast.train.step import clip_grad_norm, fused_clip


def _model_and_grads(seed: int, grad_size: float):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * grad_size
    return model


def _step(fused: bool, fold: bool, max_norm: float, grad_size: float):
    model = _model_and_grads(0, grad_size)
    params = list(model.parameters())
    # eps comparable to the gradients: Adam's first step is otherwise blind to a uniform gradient scale
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05, eps=0.1, fused=fused or None)
    grads_before = [p.grad.clone() for p in params]
    norm = clip_grad_norm(params, max_norm, opt if fold else None)
    if fold:  # the gradients are not touched: the optimizer applies the clip as it reads them
        assert all(torch.equal(g, p.grad) for g, p in zip(grads_before, params, strict=True))
    opt.step()
    return norm, [p.detach().clone() for p in params], opt


@pytest.mark.parametrize("grad_size", [10.0, 1e-3], ids=["clipped", "below_max_norm"])
def test_fused_grad_scale_equals_clip_then_step(grad_size):
    norm_ref, ref, _ = _step(fused=True, fold=False, max_norm=1.0, grad_size=grad_size)
    norm, got, opt = _step(fused=True, fold=True, max_norm=1.0, grad_size=grad_size)
    assert torch.equal(norm, norm_ref)
    expected = torch.nn.utils.get_total_norm([p.grad for p in _model_and_grads(0, grad_size).parameters()])
    assert torch.equal(norm, expected)  # the norm before clipping, as before
    if grad_size < 1:  # not clipped: grad_scale is exactly 1, so the update is bit for bit the same
        assert float(opt.grad_scale) == 1.0
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    else:  # g / (1 / c) instead of g * c: equal to the rounding of one division
        assert float(opt.grad_scale) == pytest.approx(float(norm) + 1e-6)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # and both differ from not clipping at all (the test can see a missing clip)
    _, unclipped, _ = _step(fused=True, fold=False, max_norm=0.0, grad_size=grad_size)
    if grad_size > 1:
        assert not torch.allclose(unclipped[0], got[0])


def test_only_fused_adam_folds_the_clip():
    params = list(_model_and_grads(0, 10.0).parameters())
    assert fused_clip(torch.optim.AdamW(params, fused=True))
    assert not fused_clip(torch.optim.AdamW(params, foreach=True))
    assert not fused_clip(torch.optim.SGD(params, lr=0.1))
    assert not fused_clip(None)
    # a non-fused optimizer gets clipped gradients, scaled in place, and no grad_scale
    opt = torch.optim.AdamW(params, foreach=True)
    norm = clip_grad_norm(params, 1.0, opt)
    assert getattr(opt, "grad_scale", None) is None
    clipped = torch.nn.utils.get_total_norm([p.grad for p in params])
    assert float(clipped) == pytest.approx(1.0, rel=1e-5) and float(norm) > 10
    # max_norm 0: no clip either way
    opt = torch.optim.AdamW(params, fused=True)
    opt.grad_scale = torch.tensor(3.0)  # left over from elsewhere: must not be applied
    clip_grad_norm(params, 0.0, opt)
    assert opt.grad_scale is None


@pytest.mark.slow
def test_folded_clip_under_fsdp_equals_one_process():
    """FSDP2 over 2 gloo processes (DTensor gradients, a plain grad_scale) == 1 process with fused AdamW;
    the debug run's gradient norms (~100-370) are far above optim.clip_grad 3, so every step clips."""
    from distrun import assert_losses_close, cached, metrics

    one, two = metrics(cached(1, ("optim.fused=on",))), metrics(cached(2, ("optim.fused=on",)))
    assert len(one) == 4 and all(r["grad_norm"] > 3.0 for r in one)
    assert_losses_close(two, one, 1e-5, keys=("loss", "dino", "ibot", "grad_norm"))
