"""Kernel-test fixtures: NaN-poisoned output allocation and the bf16 interpreter fix.

bf16 under TRITON_INTERPRET=1 (triton 3.6, upstream issue 11584): the interpreter stores bf16 as
raw uint16 bits, so ``tl.dot`` on bf16 operands multiplies the bit patterns as integers and bf16
arithmetic is integer arithmetic: silently wrong numbers. Casts bf16 <-> fp32 are exact there.
Our kernels never do arithmetic in bf16 (LayerNorm and SwiGLU upcast to fp32 right after every
load; attention keeps softmax statistics and accumulators in fp32), but attention's ``tl.dot``
takes bf16 operands on purpose, since that is what the tensor cores want on a GPU. So here, and
only in the interpreter, we patch ``InterpreterBuilder.create_dot`` to convert bf16 operands to
fp32 before the numpy matmul. The kernels stay exactly what runs on the GPU.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch


def _patch_interpreter_bf16_dot() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if getattr(builder.create_dot, "_virchow_bf16_patch", False):
        return
    original = builder.create_dot

    def to_fp32(h):
        if h.dtype.scalar == tl.bfloat16:
            data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interp.TensorHandle(data.reshape(h.data.shape), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, to_fp32(a), to_fp32(b), d, input_precision, max_num_imprecise_acc)

    create_dot._virchow_bf16_patch = True
    builder.create_dot = create_dot


_patch_interpreter_bf16_dot()


def _nan_fill(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype in (torch.int32, torch.int64):
        return t.fill_(-(2 ** 30))
    return t


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every torch.empty / empty_like / new_empty during the test comes back NaN-filled.

    The kernels allocate their outputs (and partial-sum buffers) this way, so any element a kernel
    forgets to write shows up as NaN in the comparison against the reference.
    """
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _nan_fill(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _nan_fill(new_empty(self, *a, **k)))
    yield


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float], name: str) -> None:
    atol, rtol = tol
    assert not torch.isnan(actual).any(), f"{name}: NaN in the kernel output (an element never written?)"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


@pytest.fixture
def close():
    """close(actual, expected, (atol, rtol), name): compare in fp32; any NaN fails."""
    return _assert_close
