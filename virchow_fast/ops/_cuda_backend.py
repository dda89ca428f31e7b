"""Registers the CUDA extension's ops (``virchow_fast._C``, built from csrc/) as the ``cuda`` backend.

Importing this raises ImportError when the extension was not built; ops then has no cuda backend.
"""
from . import register
from . import cuda_ops  # noqa: F401  (wraps torch.ops.virchow_fast_cuda.*; ImportError when not built)

for _op, _fn in cuda_ops.IMPLEMENTATIONS.items():
    register(_op, "cuda", _fn)
