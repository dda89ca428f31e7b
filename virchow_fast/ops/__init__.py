"""The one door the model and the losses use for every fused op: ``ops.attention``, ``ops.layer_norm``, ...

The ops and their backends are listed once, in :mod:`virchow_fast.ops.table` (pure data: the config
reads it without importing torch). The dispatch itself (:mod:`virchow_fast.ops.dispatch`: the
per-op choice of backend, made at call time) imports torch, so it is loaded on first use of any of
its names.
"""
from __future__ import annotations

import importlib

from .table import BACKENDS, RENAMED, TABLE

OPS = tuple(TABLE)

_LAZY = {"reference": "virchow_fast.ops.reference"}
_DISPATCH = OPS + ("attention_qkv", "layer_norm_branch",
                   "configure", "backend_for", "plan", "implementation", "check_choice")


def __getattr__(name: str):
    if name in _DISPATCH:
        value = getattr(importlib.import_module("virchow_fast.ops.dispatch"), name)
    elif name in _LAZY:
        value = importlib.import_module(_LAZY[name])
    else:
        raise AttributeError(f"module 'virchow_fast.ops' has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads (and torch.compile sees a constant)
    return value


__all__ = list(_DISPATCH) + ["reference", "OPS", "BACKENDS", "RENAMED", "TABLE"]
