"""Build helper for the optional CUDA extension virchow_fast._C (imported by setup.py).

Kept out of setup.py so that setup.py stays readable. Builds csrc/*.cu + csrc/*.cpp for sm_90a
(H100 / H200) and sm_80 (A100) when torch has CUDA and a CUDA toolkit is found; otherwise returns
no extension with one message. The extension is `optional`: a compiler failure prints a warning
and the install goes on (ops then has no cuda backend). VIRCHOW_FAST_NO_CUDA_EXT=1 skips it
(checked in setup.py and again here).
"""
import glob
import importlib.util
import os
import shutil
import sys

GENCODE = ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]
HERE = os.path.dirname(os.path.abspath(__file__))


def _say(why: str):
    print(f"virchow-fast: not building the CUDA extension ({why})", file=sys.stderr)
    return [], {}


def cuda_home() -> str | None:
    """CUDA_HOME from the environment, else /usr/local/cuda when it has nvcc; exported for torch."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if home:
        os.environ["CUDA_HOME"] = home  # before torch.utils.cpp_extension reads it
    return home


def wheel_cuda_includes() -> list[str]:
    """The include folder of torch's CUDA wheel (site-packages/nvidia/cu13/include with torch 2.11).

    ATen/cuda/CUDAContext.h includes cublas_v2.h and cusparse.h, which a bare toolkit may lack.
    Only the host compiler gets it, as -isystem, so the toolkit's own headers still win for nvcc.
    """
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return [p for root in roots for p in sorted(glob.glob(os.path.join(root, "cu1*", "include")))]


def sources() -> list[str]:
    """csrc/*.cu and the one binding .cpp, relative to the repository root (setup.py's folder)."""
    files = sorted(glob.glob(os.path.join(HERE, "csrc", "*.cu")) + glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    return [os.path.relpath(f, HERE) if os.getcwd() == HERE else f for f in files]


def extension_kwargs() -> dict:
    """Compiler arguments shared by setup.py and the build test (torch.utils.cpp_extension.load)."""
    wheel = [flag for p in wheel_cuda_includes() for flag in ("-isystem", p)]
    return dict(
        extra_include_paths=[os.path.join(HERE, "csrc")],
        extra_cflags=["-O3", *wheel],
        extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", *GENCODE],
    )


def cuda_extension():
    """Return (ext_modules, cmdclass) or ([], {}) with one message saying why not."""
    if os.environ.get("VIRCHOW_FAST_NO_CUDA_EXT", "0") == "1":
        return _say("VIRCHOW_FAST_NO_CUDA_EXT=1")
    home = cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # an isolated build environment without torch
        return _say(f"torch is not importable: {exc}")
    if torch.version.cuda is None:
        return _say("torch has no CUDA")
    if not home or cpp_extension.CUDA_HOME is None:
        return _say("no CUDA toolkit found; set CUDA_HOME")
    srcs = sources()
    if not srcs:
        return _say("no sources in csrc/")
    kw = extension_kwargs()
    ext = cpp_extension.CUDAExtension(
        name="virchow_fast._C",
        sources=srcs,
        include_dirs=kw["extra_include_paths"],
        extra_compile_args={"cxx": kw["extra_cflags"], "nvcc": kw["extra_cuda_cflags"]},
        optional=True,  # a failed compile must not fail the install: ops falls back to triton / torch
    )
    # ninja when installed (parallel, MAX_JOBS bounds it), else one file after another
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}
