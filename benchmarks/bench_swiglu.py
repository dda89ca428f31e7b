"""SwiGLU (SiLU(gate) * value on the packed fc1 output), forward and backward, in GB/s.

Rows: all tokens of one GPU step (30528 for ViT-H, fc1 width 2 x 3416; 31808 for ViT-G, 2 x 5464),
bf16. Bytes: forward reads 2H, writes H per row (3 R H e); backward reads x and dy, writes dx
(5 R H e). Side by side: our Triton kernel, the torch reference eagerly and under torch.compile,
and Liger's SiLU-mul when installed; the roof is the measured copy bandwidth.

    python benchmarks/bench_swiglu.py              # GPU
    python benchmarks/bench_swiglu.py --cpu-smoke  # tiny shapes, Triton interpreter (automatic without CUDA)
"""
from __future__ import annotations

from _common import BANDWIDTH_COLUMNS, bench_bandwidth, copy_bandwidth, report, setup, skip

args, device = setup("bench_swiglu", __doc__)

import torch  # noqa: E402

from virchow_fast.ops import reference  # noqa: E402

DTYPE = torch.float32 if args.smoke else torch.bfloat16
SHAPES = {"vit_tiny": (37, 2 * 1037)} if args.smoke else {"vit_h14": (30528, 2 * 3416), "vit_g14": (31808, 2 * 5464)}
rows, skipped = [], []


def impls():
    out = {}
    try:
        from virchow_fast.kernels.swiglu import swiglu as triton_swiglu
        out["triton (ours)"] = triton_swiglu
    except ImportError as exc:
        skip(skipped, "triton", f"ImportError: {exc}")
    out["torch reference (eager)"] = reference.swiglu
    if args.compile:
        out["torch.compile(reference)"] = torch.compile(reference.swiglu)
    else:
        skip(skipped, "torch.compile(reference)", "compile baselines off (--compile to run them)")
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        def liger(x):
            gate, value = x.chunk(2, dim=-1)
            return LigerSiLUMulFunction.apply(gate, value)
        out["Liger (SiLU-mul on chunk views)"] = liger
    except ImportError:
        skip(skipped, "Liger swiglu", "liger_kernel not installed")
    return out


IMPLS = impls()
for model, (R, W) in SHAPES.items():
    H = W // 2
    e = torch.tensor([], dtype=DTYPE).element_size()
    fwd_bytes, bwd_bytes = 3 * R * H * e, 5 * R * H * e
    copy = copy_bandwidth(device, R * W * e, args.iters, args.warmup)
    print(f"{model}: R={R} 2H={W} {DTYPE}; copy bandwidth {copy:.1f} GB/s", flush=True)
    x = torch.randn(R, W, device=device, dtype=DTYPE)
    dy = torch.randn(R, H, device=device, dtype=DTYPE)
    xg = x.clone().requires_grad_()
    for impl, fn in IMPLS.items():
        def fwd(fn=fn, x=x):
            with torch.no_grad():
                return fn(x)
        bench_bandwidth(rows, skipped, model, impl, fwd, lambda fn=fn, xg=xg: fn(xg), [xg], dy,
                        fwd_bytes, bwd_bytes, copy, device, args)

report("bench_swiglu", rows, BANDWIDTH_COLUMNS, skipped, args, device, {"dtype": str(DTYPE), "shapes": SHAPES},
       goal="goal (H200): triton >= 80 % of copy bandwidth")
