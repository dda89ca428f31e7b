"""Kernel-test fixtures: NaN-poisoned output allocation; the bf16 interpreter fix is applied.

bf16 under TRITON_INTERPRET=1 (triton 3.6): the interpreter's bf16 ``tl.dot`` is wrong; the fix
has one home, :func:`virchow_fast.kernels._common.patch_interpreter_bf16_dot`, applied when the
kernels are imported. It is applied here too so a test that runs an interpreted kernel before
importing any kernel module still gets it.
"""
from __future__ import annotations

import pytest
import torch

try:
    from virchow_fast.kernels._common import patch_interpreter_bf16_dot
except ImportError:  # no triton: the kernel tests skip themselves
    pass
else:
    patch_interpreter_bf16_dot()


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
