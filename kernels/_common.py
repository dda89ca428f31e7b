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


def patch_interpreter_bf16_dot() -> None:
    """Make ``tl.dot`` on bf16 operands right in Triton 3.6's interpreter (triton-lang/triton#11584).

    The interpreter stores bf16 as raw uint16 bits, so a bf16 ``tl.dot`` multiplies the bit
    patterns as integers (off by ~1e10); casts bf16 <-> fp32 are exact there. The kernels never do
    other arithmetic in bf16 (they upcast after every load and accumulate in fp32), but their dots
    take bf16 operands on purpose, as the tensor cores want on a GPU. So in the interpreter only,
    the dot converts bf16 operands to fp32 before numpy's matmul; the kernels stay exactly what
    runs on a GPU. Applied when this module is imported with TRITON_INTERPRET=1; idempotent.
    """
    if not interpreting():
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if getattr(builder.create_dot, "_virchow_bf16_patch", False):
        return
    original = builder.create_dot

    def to_fp32(h):
        if h.dtype.scalar == tl.bfloat16:
            data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interp.TensorHandle(data.reshape(h.data.shape), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, to_fp32(a), to_fp32(b), d, input_precision, max_num_imprecise_acc)

    create_dot._virchow_bf16_patch = True
    builder.create_dot = create_dot


patch_interpreter_bf16_dot()


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


def check_keep_pad(op: str, rows: int, keep: torch.Tensor | None, seg_ids: torch.Tensor | None, pad,
                   segments: int | None = None) -> int:
    """The arguments of an op whose output feeds a block's residual GEMM (attention, SwiGLU): the
    per-crop factors ``keep`` ([S] floating, S = ``segments`` when known), each row's crop ``seg_ids``
    ([rows] int64 / int32) and ``pad`` (0 or a positive multiple of 8). One-line ValueErrors naming
    ``op``; returns pad as an int."""
    if isinstance(pad, bool) or int(pad) != pad or pad < 0 or pad % 8:
        raise ValueError(f"{op}: pad must be 0 or a positive multiple of 8; got {pad} (16-byte rows for the GEMM)")
    if keep is None:
        if seg_ids is not None:
            raise ValueError(f"{op}: seg_ids given without keep")
        return int(pad)
    if seg_ids is None:
        raise ValueError(f"{op}: keep needs seg_ids (keep given without seg_ids: the crop of each of the {rows} rows)")
    if keep.dim() != 1 or not keep.is_floating_point() or (segments is not None and keep.shape[0] != segments):
        size = f" = [{segments}]" if segments is not None else ""
        raise ValueError(f"{op}: keep must be a floating [S]{size} tensor (one factor per crop); "
                         f"got {keep.dtype} {tuple(keep.shape)}")
    if seg_ids.shape != (rows,) or seg_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: seg_ids must be an int64 [T] = [{rows}] tensor of crop ids (int32 also taken); "
                         f"got {seg_ids.dtype} {tuple(seg_ids.shape)}")
    return int(pad)
