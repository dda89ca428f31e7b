"""virchow-fast: fast DINOv2 / Virchow 2 pretraining for pathology foundation models.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and are installed
as the subpackage ``virchow_fast.kernels`` (a top-level ``kernels`` would collide with another
PyPI project). The optional CUDA extension ``virchow_fast._C`` is built from ``csrc/`` when
torch has CUDA; see ``_cuda_extension()``.
"""
import os
import sys

from setuptools import find_packages, setup

# kernels/ and configs/ stay at the top of the repository (the layout users asked for) and install
# inside the package, so an installed wheel has its kernels and its shipped configs.
PACKAGES = find_packages(include=["virchow_fast", "virchow_fast.*"]) + ["virchow_fast.kernels", "virchow_fast.configs"]
PACKAGE_DIR = {"virchow_fast.kernels": "kernels", "virchow_fast.configs": "configs"}


def _cuda_extension():
    """Return (ext_modules, cmdclass) for virchow_fast._C, or ([], {}) when it cannot be built.

    Skipped on purpose with VIRCHOW_FAST_NO_CUDA_EXT=1; skipped with one message when torch is
    not installed in the build environment or has no CUDA, or when no nvcc is found.
    """
    if os.environ.get("VIRCHOW_FAST_NO_CUDA_EXT", "0") == "1":
        print("virchow-fast: VIRCHOW_FAST_NO_CUDA_EXT=1, not building the CUDA extension", file=sys.stderr)
        return [], {}
    try:
        from csrc_build import cuda_extension  # noqa: WPS433 (build helper beside setup.py)
    except ImportError as exc:  # torch missing in an isolated build
        print(f"virchow-fast: not building the CUDA extension ({exc})", file=sys.stderr)
        return [], {}
    return cuda_extension()


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ext_modules, cmdclass = _cuda_extension()

# Metadata, dependencies and the console script are in pyproject.toml's [project] table; only what
# needs code (the package map and the optional CUDA extension) is here.
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"virchow_fast.configs": ["*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
