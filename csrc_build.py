"""Build helper for the optional CUDA extension virchow_fast._C (imported by setup.py).

Kept out of setup.py so that setup.py stays readable; it imports torch, which an isolated
build environment may not have (then setup.py skips the extension with one message).
"""
import glob
import os
import sys


def cuda_extension():
    """Return (ext_modules, cmdclass) or ([], {}) with one message saying why not."""
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        print("virchow-fast: torch has no CUDA, not building the CUDA extension", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    if cpp_extension.CUDA_HOME is None:
        print("virchow-fast: no CUDA toolkit found (set CUDA_HOME), not building the CUDA extension",
              file=sys.stderr)
        return [], {}
    ext = cpp_extension.CUDAExtension(
        name="virchow_fast._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=False)}
