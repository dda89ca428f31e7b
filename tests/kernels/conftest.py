"""Kernel-test fixtures: NaN-poisoned output allocation; the bf16 interpreter fix is applied.

bf16 under TRITON_INTERPRET=1 (triton 3.6): the interpreter's bf16 ``tl.dot`` is wrong; the fix
has one home, :func:`virchow_fast.kernels._common.patch_interpreter_bf16_dot`, applied when the
kernels are imported. It is applied here too so a test that runs an interpreted kernel before
importing any kernel module still gets it.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture(scope="session")
def built_extension(tmp_path_factory) -> str:
    """virchow_fast._C built once per session by ``setup.py build_ext`` (csrc_build: sm_90a + sm_80);
    the tests that need it share it (an nvcc build takes minutes on 2 cores). Skips without nvcc."""
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    import csrc_build

    nvcc = os.path.join(csrc_build.cuda_home() or "/usr/local/cuda", "bin", "nvcc")
    if not os.path.exists(nvcc) or torch.version.cuda is None:
        pytest.skip("needs nvcc (CUDA_HOME) and a CUDA build of torch")
    out = tmp_path_factory.mktemp("cuda_ext")
    env = dict(os.environ, MAX_JOBS="1", OMP_NUM_THREADS="1")
    env.pop("VIRCHOW_FAST_NO_CUDA_EXT", None)
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out / "lib"),
                          "--build-temp", str(out / "tmp")], cwd=root, env=env, capture_output=True, text=True)
    built = glob.glob(str(out / "lib" / "virchow_fast" / "_C*.so"))
    assert res.returncode == 0 and built, (res.stdout + res.stderr)[-6000:]
    return built[0]
