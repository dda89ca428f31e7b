"""Small helpers shared by the Triton kernel files (launch sizes, dtype checks, interpreter)."""
from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton

# Triton element types a kernel accepts; everything is computed in fp32 inside.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(int(n))


@lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int | None:
    """SMs of a CUDA device (cached per device); None for other devices (the interpreter)."""
    return _cuda_sms(device.index or 0) if device.type == "cuda" else None


def num_programs(device: torch.device, rows: int, per_sm: int = 4, cpu: int = 4) -> int:
    """Programs for a persistent-style row loop: a few per SM on a GPU, a handful in the interpreter.

    Bounds the number of fp32 partial sums a backward reduction writes (one [C] row per program).
    """
    sms = sm_count(device)
    n = per_sm * sms if sms else cpu
    return max(1, min(rows, n))


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (fp32, fp16, bf16)")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take arbitrary row strides but need a unit stride in the last dim."""
    return t if t.stride(-1) == 1 else t.contiguous()
