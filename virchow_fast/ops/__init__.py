"""The one door the model and the losses use for every fused op.

Each op has backends: ``torch`` (the reference in :mod:`virchow_fast.ops.reference`), and where
they exist ``triton`` (kernels/) and ``cuda`` (csrc/, the ``virchow_fast._C`` extension).
Choice per op, made at call time, never at import time:

1. an explicit choice from the config (``ops.<op>``) set with :func:`configure`;
2. else the environment variable ``VIRCHOW_FAST_<OP>`` (e.g. ``VIRCHOW_FAST_ATTENTION=torch``);
3. else ``auto``: the backend listed first in ``_AUTO`` that is available for the tensor's
   device (see the evidence noted beside ``_AUTO``), falling back to ``torch``.

The choice is logged once per (op, backend, device type).
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from . import reference

log = logging.getLogger("virchow_fast.ops")

OPS = ("attention", "layer_norm", "swiglu", "residual_layer_scale", "head_loss", "centering")
BACKENDS = ("torch", "triton", "cuda")

# auto order per op on CUDA tensors; CPU tensors always take torch (the interpreter is for tests).
_AUTO: dict[str, tuple[str, ...]] = {
    "attention": ("triton", "torch"),
    "layer_norm": ("triton", "cuda", "torch"),
    "swiglu": ("triton", "torch"),
    "residual_layer_scale": ("triton", "torch"),
    # head_loss triton / centering cuda / layer_norm cuda: not yet measured on a GPU (issue 4, no
    # device lent); the order is the design's expectation until benchmarks/bench_head_loss.py and
    # bench_layer_norm.py give H200 numbers. CPU peak-RSS evidence for the fused head loss:
    # benchmarks/results/bench_head_loss_cpu_*.json.
    "head_loss": ("triton", "torch"),
    "centering": ("cuda", "torch"),
}

_configured: dict[str, str] = {}
_logged: set[tuple[str, str, str]] = set()
# (op, backend) -> implementation; filled lazily by _load_backend so importing ops is cheap.
_impls: dict[tuple[str, str], Callable] = {}


def configure(choices: dict[str, str] | object) -> None:
    """Set per-op backends from a dict or an ``OpsConfig`` ("auto" clears a choice)."""
    items = choices.items() if isinstance(choices, dict) else vars(choices).items()
    for op, backend in items:
        if op not in OPS:
            raise ValueError(f"ops.{op}: unknown op (known: {', '.join(OPS)})")
        if backend == "auto":
            _configured.pop(op, None)
        elif backend in BACKENDS:
            _configured[op] = backend
        else:
            raise ValueError(f"ops.{op}: unknown backend {backend!r} (known: auto, {', '.join(BACKENDS)})")


def register(op: str, backend: str, fn: Callable) -> None:
    """Make ``fn`` the ``backend`` implementation of ``op``."""
    _impls[(op, backend)] = fn


def _load_backend(op: str, backend: str) -> Callable | None:
    """Import the backend's module on first use; None when it cannot run here."""
    if (op, backend) in _impls:
        return _impls[(op, backend)]
    try:
        if backend == "torch":
            from . import _torch_backend  # noqa: F401
        elif backend == "triton":
            from . import _triton_backend  # noqa: F401
        elif backend == "cuda":
            from . import _cuda_backend  # noqa: F401
    except ImportError as exc:
        log.debug("backend %s unavailable: %s", backend, exc)
        return None
    return _impls.get((op, backend))


def _available(op: str, backend: str, device_type: str) -> bool:
    if backend == "torch":
        return True
    if backend == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if backend == "cuda" and device_type != "cuda":
        return False
    return _load_backend(op, backend) is not None


def backend_for(op: str, device: torch.device | str) -> str:
    """The backend ``op`` uses for tensors on ``device``."""
    device_type = torch.device(device).type
    choice = _configured.get(op) or os.environ.get(f"VIRCHOW_FAST_{op.upper()}", "auto")
    if choice == "auto":
        choice = "torch"
        if device_type == "cuda":
            for candidate in _AUTO[op]:
                if _available(op, candidate, device_type):
                    choice = candidate
                    break
    elif choice not in BACKENDS:
        raise ValueError(f"VIRCHOW_FAST_{op.upper()}={choice!r}: expected auto, {', '.join(BACKENDS)}")
    elif not _available(op, choice, device_type):
        raise RuntimeError(f"ops.{op}: backend {choice!r} is not available for {device_type} tensors "
                           f"(triton on CPU needs TRITON_INTERPRET=1; cuda needs the built extension and a GPU)")
    key = (op, choice, device_type)
    if key not in _logged:
        _logged.add(key)
        log.info("ops.%s -> %s on %s", op, choice, device_type)
    return choice


@torch.compiler.assume_constant_result
def _traced_backend(op: str, device_type: str) -> str:
    """backend_for, run for real while torch.compile traces (imports, logging and env lookups
    cannot be traced); the choice is baked into the graph, so call torch._dynamo.reset() after
    changing backends for an already compiled module."""
    backend = backend_for(op, device_type)
    _load_backend(op, backend)
    return backend


def _dispatch(op: str, device: torch.device) -> Callable:
    if torch.compiler.is_compiling():
        return _impls[(op, _traced_backend(op, device.type))]
    backend = backend_for(op, device)
    fn = _load_backend(op, backend)
    if fn is None:
        raise RuntimeError(f"ops.{op}: backend {backend!r} has no implementation")
    return fn


def attention(q, k, v, cu_seqlens, max_seqlen, scale=None, host_offsets=None):
    """Packed varlen attention; see :func:`reference.attention` for shapes.

    host_offsets: cu_seqlens as a sequence of ints, when the caller knows them; the torch backend
    then groups segments by length from them instead of reading cu_seqlens back from the device.
    """
    fn = _dispatch("attention", q.device)
    if host_offsets is not None and fn is _impls.get(("attention", "torch")):
        cu_seqlens = host_offsets
    return fn(q, k, v, cu_seqlens, max_seqlen, scale)


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim; see :func:`reference.layer_norm`."""
    return _dispatch("layer_norm", x.device)(x, weight, bias, eps)


def swiglu(x):
    """SiLU(first half) * second half; see :func:`reference.swiglu`."""
    return _dispatch("swiglu", x.device)(x)


def residual_layer_scale(x, y, gamma, keep=None, seg_ids=None):
    """x + keep[seg_ids] * gamma * y: the residual add fused with LayerScale and per-crop stochastic
    depth; see :func:`reference.residual_layer_scale`."""
    return _dispatch("residual_layer_scale", x.device)(x, y, gamma, keep, seg_ids)


def prototype_loss(*args, **kwargs):
    """DINO / iBOT head loss from bottleneck features; see :func:`reference.prototype_loss`."""
    return _dispatch("head_loss", args[0].device)(*args, **kwargs)


def teacher_probs(*args, **kwargs):
    """Materialised teacher targets [M, K]; see :func:`reference.teacher_probs`."""
    return _dispatch("centering", args[0].device)(*args, **kwargs)


__all__ = ["attention", "layer_norm", "swiglu", "residual_layer_scale", "prototype_loss", "teacher_probs", "configure",
           "backend_for", "register", "reference", "OPS", "BACKENDS"]
