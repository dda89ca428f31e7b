"""virchow-fast: fast DINOv2 / Virchow 2 pretraining for pathology foundation models.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and are installed
as the subpackage ``virchow_fast.kernels`` (a top-level ``kernels`` would collide with another
PyPI project). The optional CUDA extension ``virchow_fast._C`` is built from ``csrc/`` when
torch has CUDA; see ``_cuda_extension()``.
"""
import os
import sys

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["virchow_fast", "virchow_fast.*"]) + ["virchow_fast.kernels"]
PACKAGE_DIR = {"virchow_fast.kernels": "kernels"}


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

setup(
    name="virchow-fast",
    version="0.1.0",
    description="Fast DINOv2 / Virchow 2 pretraining for pathology foundation models",
    python_requires=">=3.11",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"virchow_fast": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.11",
        "numpy>=1.26,<2.4",
        "click>=8.1",
        "pyyaml>=6.0",
        "tqdm>=4.66",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "slides": ["cucim-cu13>=26.10", "openslide-python>=1.4", "openslide-bin>=4.0",
                   "tiffslide>=3.0", "tifffile", "imagecodecs", "pillow", "scikit-image"],
        "dali": ["nvidia-dali-cuda130>=2.4"],
        "test": ["pytest>=8", "timm>=1.0.20"],
    },
    entry_points={"console_scripts": ["virchow-fast=virchow_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
