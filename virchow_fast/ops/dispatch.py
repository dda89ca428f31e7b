"""Dispatch for the fused ops (``virchow_fast.ops`` re-exports this module's public names).

The ops, their backends and their ``auto`` order are listed once, in :mod:`virchow_fast.ops.table`.
Choice per op, made at call time, never at import time:

1. an explicit choice from the config (``ops.<op>``) set with :func:`configure`;
2. else the environment variable ``VIRCHOW_FAST_<OP>`` (e.g. ``VIRCHOW_FAST_ATTENTION=torch``);
3. else ``auto``: on CUDA tensors the first backend of the op's ``auto`` order that is available
   (the evidence is beside it in the table), on CPU tensors the reference.

The choice is logged once per (op, backend, device type); :func:`plan` lists it for every op.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Callable

import torch

from . import reference
from .table import BACKENDS, RENAMED, TABLE

log = logging.getLogger("virchow_fast.ops")

OPS = tuple(TABLE)

_configured: dict[str, str] = {}
_logged: set[tuple[str, str, str]] = set()
# (op, backend) -> implementation, imported from the table on first use so importing ops is cheap
_impls: dict[tuple[str, str], Callable] = {}


def _known(op: str) -> None:
    if op not in TABLE:
        hint = f" (renamed: ops.{RENAMED[op]})" if op in RENAMED else f" (known: {', '.join(OPS)})"
        raise ValueError(f"ops.{op}: unknown op{hint}")


def check_choice(op: str, backend: str, where: str) -> None:
    """``backend`` is auto or one of the op's own backends, else one line naming ``where``."""
    _known(op)
    allowed = ("auto",) + TABLE[op].backends()
    if backend not in allowed:
        raise ValueError(f"{where}: {backend!r} is not a backend of {op} (choose from {', '.join(allowed)})")


def configure(choices: dict[str, str] | object) -> None:
    """Set per-op backends from a dict or an ``OpsConfig`` ("auto" clears a choice)."""
    items = choices.items() if isinstance(choices, dict) else vars(choices).items()
    for op, backend in items:
        check_choice(op, backend, f"ops.{op}")
        if backend == "auto":
            _configured.pop(op, None)
        else:
            _configured[op] = backend


def implementation(op: str, backend: str) -> Callable | None:
    """The table's ``backend`` implementation of ``op``, imported on first use; None when it cannot be
    imported here (no triton, the extension not built)."""
    key = (op, backend)
    if key not in _impls:
        path = getattr(TABLE[op], backend)
        if path is None:
            return None
        module, name = path.split(":")
        try:
            _impls[key] = getattr(importlib.import_module(module), name)
        except ImportError as exc:
            log.debug("ops.%s: backend %s unavailable: %s", op, backend, exc)
            return None
    return _impls[key]


def _available(op: str, backend: str, device_type: str) -> bool:
    if backend == "torch":
        return True
    if backend == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if backend == "cuda" and device_type != "cuda":
        return False
    return implementation(op, backend) is not None


def backend_for(op: str, device: torch.device | str) -> str:
    """The backend ``op`` uses for tensors on ``device``."""
    _known(op)
    device_type = torch.device(device).type
    spec = TABLE[op]
    choice = _configured.get(op)
    if choice is None:
        choice = os.environ.get(spec.env, "auto")
        check_choice(op, choice, spec.env)
    if choice == "auto":
        choice = "torch"
        if device_type == "cuda":
            choice = next((b for b in spec.auto if _available(op, b, device_type)), "torch")
    elif not _available(op, choice, device_type):
        raise RuntimeError(f"ops.{op}: backend {choice!r} is not available for {device_type} tensors "
                           f"(triton on CPU needs TRITON_INTERPRET=1; cuda needs the built extension and a GPU)")
    key = (op, choice, device_type)
    if key not in _logged:
        _logged.add(key)
        log.debug("ops.%s -> %s on %s", op, choice, device_type)
    return choice


def plan(device: torch.device | str) -> dict[str, str]:
    """{op: backend} that tensors on ``device`` get now, for every op (logged once at start)."""
    return {op: backend_for(op, device) for op in OPS}


@torch.compiler.assume_constant_result
def _traced_backend(op: str, device_type: str) -> str:
    """backend_for, run for real while torch.compile traces (imports, logging and env lookups
    cannot be traced); the choice is baked into the graph, so call torch._dynamo.reset() after
    changing backends for an already compiled module."""
    for other in OPS:  # every op's implementation is in _impls before Dynamo first reads the dict
        implementation(other, backend_for(other, device_type))
    return backend_for(op, device_type)


def _dispatch(op: str, device: torch.device) -> Callable:
    if torch.compiler.is_compiling():
        backend = _traced_backend(op, device.type)  # first: it fills _impls, which Dynamo then reads
        return _impls[(op, backend)]
    backend = backend_for(op, device)
    fn = implementation(op, backend)
    if fn is None:
        raise RuntimeError(f"ops.{op}: backend {backend!r} has no implementation")
    return fn


def attention(qkv, cu_seqlens, max_seqlen, scale=None, host_offsets=None):
    """Packed varlen attention of the [T, 3, H, D] qkv projection; see :func:`reference.attention`.

    host_offsets: cu_seqlens as a sequence of ints, when the caller knows them; the torch backend
    then groups segments by length from them instead of reading cu_seqlens back from the device.
    """
    fn = _dispatch("attention", qkv.device)
    if host_offsets is not None and fn is implementation("attention", "torch"):
        cu_seqlens = host_offsets
    return fn(qkv, cu_seqlens, max_seqlen, scale)


def attention_qkv(x, weight, bias, num_heads, cu_seqlens, max_seqlen, scale=None, host_offsets=None,
                  keep=None, seg_ids=None, pad=0):
    """attention(linear(x, weight, bias).view(T, 3, H, D), ...): the qkv projection and attention.

    Same values as the two ops. On a backend whose ``attention`` has a fused ``qkv`` (triton), the
    backward takes the bias gradient from the attention kernels' own sums; elsewhere autograd sums
    the [T, 3C] gradient. keep [S] / seg_ids [T] / pad: the output as the block's residual GEMM
    takes it, :func:`reference.scale_rows` of o as [T, C] (in the fused kernels' epilogue; elsewhere
    torch ops after the attention). Returns [T, H, D] when pad is 0, else [T, C + pad].
    """
    fn = _dispatch("attention", x.device)
    fused = getattr(fn, "qkv", None)
    plain = keep is None and not pad
    if fused is not None and not plain and getattr(fused, "supports_keep_pad", False):
        return fused(x, weight, bias, num_heads, cu_seqlens, max_seqlen, scale, keep=keep, seg_ids=seg_ids, pad=pad)
    if fused is not None:
        o = fused(x, weight, bias, num_heads, cu_seqlens, max_seqlen, scale)
    else:
        qkv = torch.nn.functional.linear(x, weight, bias).view(x.shape[0], 3, num_heads, -1)
        o = attention(qkv, cu_seqlens, max_seqlen, scale, host_offsets=host_offsets)
    if plain:
        return o
    out = reference.scale_rows(o.reshape(o.shape[0], -1), keep, seg_ids, pad)
    return out if pad else out.view(o.shape)


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim; see :func:`reference.layer_norm`."""
    return _dispatch("layer_norm", x.device)(x, weight, bias, eps)


def layer_norm_branch(x, weight, bias, eps, copy=False):
    """(LayerNorm(x), x) at a pre-norm branch point: x goes on as the residual stream.

    Same values as ``(layer_norm(x, ...), x)``. On a backend whose ``layer_norm`` has a fused
    ``branch`` (triton), the two gradients of x (residual path and norm) are summed inside the norm's
    backward kernel; elsewhere autograd sums them. copy: the stream comes back as a new buffer (a
    copy of x the caller may update in place; the fused forward writes it as it reads x).
    """
    fn = _dispatch("layer_norm", x.device)
    branch = getattr(fn, "branch", None)
    if branch is not None:
        return branch(x, weight, bias, eps, copy=copy)
    return fn(x, weight, bias, eps), (x.clone() if copy else x)


def swiglu(x, bias=None, keep=None, seg_ids=None, pad=0):
    """SiLU(first half) * second half of x + bias (fc1's bias, or None); see :func:`reference.swiglu`
    (keep / seg_ids / pad: the rows of fc2's input as the block's residual GEMM takes them)."""
    return _dispatch("swiglu", x.device)(x, bias, keep, seg_ids, pad)


def residual_weight(weight, gamma, bias, pad=8):
    """[gamma * W | gamma * b | 0 ...]: a block's residual GEMM weight; see :func:`reference.residual_weight`."""
    return _dispatch("residual_weight", weight.device)(weight, gamma, bias, pad)


def l2_normalize(w, eps=1e-12):
    """Rows divided by their L2 norm (the prototypes' weight norm); see :func:`reference.l2_normalize`."""
    return _dispatch("l2_normalize", w.device)(w, eps)


def prototype_loss(*args, **kwargs):
    """DINO / iBOT head loss from bottleneck features; see :func:`reference.prototype_loss`."""
    return _dispatch("prototype_loss", args[0].device)(*args, **kwargs)


def teacher_probs(*args, **kwargs):
    """Materialised teacher targets [M, K]; see :func:`reference.teacher_probs`."""
    return _dispatch("teacher_probs", args[0].device)(*args, **kwargs)


__all__ = list(OPS) + ["attention_qkv", "layer_norm_branch", "configure", "backend_for", "plan", "implementation",
                       "check_choice", "reference", "OPS", "BACKENDS", "TABLE"]
