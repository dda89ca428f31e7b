"""Registers the Triton kernels (``virchow_fast.kernels``) as the ``triton`` backend.

Each op's kernel module exposes one public function with the reference's signature; an op whose
module is not there yet simply has no triton backend.
"""
import importlib

import triton  # noqa: F401  (ImportError here = no triton backend at all)

from . import register

_KERNELS = {
    # op: (module in virchow_fast.kernels, public function)
    "attention": ("attention", "attention"),
    "layer_norm": ("layer_norm", "layer_norm"),
    "swiglu": ("swiglu", "swiglu"),
    "residual_layer_scale": ("layer_scale", "residual_layer_scale"),
    "head_loss": ("prototype_loss", "prototype_loss"),
}

for _op, (_module, _fn) in _KERNELS.items():
    _name = f"virchow_fast.kernels.{_module}"
    try:
        _mod = importlib.import_module(_name)
    except ModuleNotFoundError as exc:
        if exc.name != _name:
            raise
        continue
    register(_op, "triton", getattr(_mod, _fn))
