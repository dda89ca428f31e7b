"""LayerNorm kernel vs ops/reference.py: forward, dX, dW, db; awkward widths and row counts."""
import pytest
import torch

from virchow_fast.ops import reference

ln = pytest.importorskip("virchow_fast.kernels.layer_norm")

# (atol, rtol) of the kernel against the fp32 reference, per input dtype. fp16/bf16: the output
# rounding (2^-11 / 2^-8 relative) dominates; dW/db sum R rows, so their atol grows with R a little.
TOL = {
    torch.float32: {"y": (1e-5, 1e-5), "dx": (1e-4, 1e-4), "dw": (1e-4, 1e-4)},
    torch.float16: {"y": (4e-3, 4e-3), "dx": (8e-3, 8e-3), "dw": (2e-2, 1e-2)},
    torch.bfloat16: {"y": (3e-2, 2e-2), "dx": (6e-2, 3e-2), "dw": (1e-1, 2e-2)},
}
DTYPES = list(TOL)


def _check(shape, dtype, device, close, has_bias=True, eps=1e-6):
    C = shape[-1]
    x = torch.randn(shape, device=device, dtype=dtype) * 2 + 0.5
    w = (torch.randn(C, device=device) * 0.5 + 1).requires_grad_()
    b = (torch.randn(C, device=device) * 0.1).requires_grad_() if has_bias else None
    dy = torch.randn(shape, device=device, dtype=dtype)
    params = [w] + ([b] if has_bias else [])

    xk = x.clone().requires_grad_()
    y = ln.layer_norm(xk, w, b, eps)
    grads = torch.autograd.grad(y, [xk] + params, dy)

    xr = x.float().requires_grad_()
    yr = reference.layer_norm(xr, w, b, eps)
    ref_grads = torch.autograd.grad(yr, [xr] + params, dy.float())

    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    close(y, yr, tol["y"], "y")
    close(grads[0], ref_grads[0], tol["dx"], "dx")
    close(grads[1], ref_grads[1], tol["dw"], "dw")
    if has_bias:
        close(grads[2], ref_grads[2], tol["dw"], "db")


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1280), (1, 1664), (37, 1280), (2, 7, 1664), (13, 100), (5, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_layer_norm(shape, dtype, device, close):
    _check(shape, dtype, device, close)


@pytest.mark.usefixtures("poison_outputs")
def test_layer_norm_no_bias_and_strided_rows(device, close):
    _check((11, 96), torch.float32, device, close, has_bias=False)
    x = torch.randn(23, 2, 64, device=device)[:, 1]  # row stride 128, unit column stride
    w, b = torch.randn(64, device=device), torch.randn(64, device=device)
    close(ln.layer_norm(x, w, b, 1e-5), reference.layer_norm(x, w, b, 1e-5), TOL[torch.float32]["y"], "y")


@pytest.mark.gpu  # larger shapes; skipped without CUDA (tests/conftest.py)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(30528, 1280), (30528, 1664), (4099, 1664)], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_gpu(shape, dtype, close):
    _check(shape, dtype, torch.device("cuda"), close)


def _check_branch(shape, dtype, device, close, has_bias=True, uses=("norm", "residual"), copy=False):
    """layer_norm_branch's (y, x) and x's summed gradient vs the reference's LayerNorm plus autograd's add.

    copy: the stream comes back as a new buffer, which is then updated in place (``add_``, as the
    block's addmm_ does): the gradient through it still reaches x, and x itself is untouched."""
    C = shape[-1]
    x = torch.randn(shape, device=device, dtype=dtype) * 2 + 0.5
    w = (torch.randn(C, device=device) * 0.5 + 1).requires_grad_()
    b = (torch.randn(C, device=device) * 0.1).requires_grad_() if has_bias else None
    dy, dres = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
    params = [w] + ([b] if has_bias else [])

    def loss(y, passed):  # what uses each output downstream
        terms = []
        if "norm" in uses:
            terms.append((y.float() * dy.float()).sum())
        if "residual" in uses:
            terms.append((passed.float() * dres.float()).sum())
        return sum(terms)

    xk = x.clone().requires_grad_()
    xin = xk * 1  # a non-leaf input, as in the model
    y, passed = ln.layer_norm_branch(xin, w, b, 1e-6, copy=copy)
    if copy:
        assert passed.data_ptr() != xin.data_ptr() and torch.equal(passed, x)
        passed = passed.add_(1.0)  # in place, then used: its gradient is still dres
        assert torch.equal(xin, x)
    grads = torch.autograd.grad(loss(y, passed), [xk] + params, allow_unused=True)
    xr = x.float().requires_grad_()
    yr = reference.layer_norm(xr, w, b, 1e-6)
    ref_grads = torch.autograd.grad(loss(yr, xr), [xr] + params, allow_unused=True)

    tol = TOL[dtype]
    assert passed.dtype == dtype and torch.equal(passed, x + 1.0 if copy else x)
    close(y, yr, tol["y"], "y")
    close(grads[0], ref_grads[0], tol["dx"], "dx (norm + residual)")
    for name, g, gr in zip(("dw", "db")[:len(params)], grads[1:], ref_grads[1:], strict=True):
        if gr is None:  # the norm's output unused: no weight gradient either way
            assert g is None or not g.any(), name
        else:
            close(g, gr, tol["dw"], name)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1280), (37, 1280), (2, 7, 1664), (5, 3)], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_branch_sums_both_gradients(shape, dtype, device, close):
    _check_branch(shape, dtype, device, close)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 1280), (5, 3)], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_branch_copy_updated_in_place(shape, dtype, device, close):
    _check_branch(shape, dtype, device, close, copy=True)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("uses", [("norm",), ("residual",)], ids=lambda u: u[0] + "_only")
def test_layer_norm_branch_one_output_used(uses, device, close):
    _check_branch((13, 100), torch.float32, device, close, has_bias=False, uses=uses)


def test_layer_norm_branch_kernel_does_the_add(device):
    """With both gradients, the backward is one kernel call (the LayerNorm backward with the
    residual's gradient as input), not a LayerNorm backward plus an add."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(9, 64, device=device, requires_grad=True)
    w, b = torch.randn(64, device=device, requires_grad=True), torch.randn(64, device=device, requires_grad=True)
    y, passed = ln.layer_norm_branch(x * 1, w, b, 1e-6)
    loss = (y * 2).sum() + (passed * 3).sum()
    with Ops() as seen:
        loss.backward()
    assert any("layer_norm_bwd" in n for n in seen.names), seen.names
    adds = [n for n in seen.names if n.startswith(("aten.add.Tensor", "aten.add_.Tensor"))]
    assert not adds, adds
