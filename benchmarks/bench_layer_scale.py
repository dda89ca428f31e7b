"""Residual add + LayerScale (z = x + gamma * y), forward and backward, in GB/s against the copy bandwidth.

Rows: all tokens of one GPU step (30528 x 1280 for ViT-H, 31808 x 1664 for ViT-G); the residual
stream x in fp32, the branch output y in bf16 (mixed precision), gamma fp32. Bytes: forward reads
x and y, writes z; backward reads dz and y, writes dy (dx is dz itself). Side by side: our fused
Triton kernel, the reference eagerly (two kernels + a reduction) and under torch.compile.

    python benchmarks/bench_layer_scale.py              # GPU
    python benchmarks/bench_layer_scale.py --cpu-smoke  # tiny shapes, Triton interpreter (automatic without CUDA)
"""
from __future__ import annotations

from _common import BANDWIDTH_COLUMNS, bench_bandwidth, copy_bandwidth, report, setup, skip

args, device = setup("bench_layer_scale", __doc__)

import torch  # noqa: E402

from virchow_fast.ops import reference  # noqa: E402

X_DTYPE, Y_DTYPE = (torch.float32, torch.float32) if args.smoke else (torch.float32, torch.bfloat16)
SHAPES = {"vit_tiny": (37, 1280)} if args.smoke else {"vit_h14": (30528, 1280), "vit_g14": (31808, 1664)}
rows, skipped = [], []

IMPLS = {}
try:
    from virchow_fast.kernels.layer_scale import residual_layer_scale as triton_rls
    IMPLS["triton (ours, fused)"] = triton_rls
except ImportError as exc:
    skip(skipped, "triton", f"ImportError: {exc}")
IMPLS["torch reference (eager)"] = reference.residual_layer_scale
if args.compile:
    IMPLS["torch.compile(reference)"] = torch.compile(reference.residual_layer_scale)
else:
    skip(skipped, "torch.compile(reference)", "compile baselines off (--compile to run them)")

for model, (R, C) in SHAPES.items():
    ex, ey = torch.tensor([], dtype=X_DTYPE).element_size(), torch.tensor([], dtype=Y_DTYPE).element_size()
    fwd_bytes = R * C * (2 * ex + ey)  # read x, y; write z (x's dtype after promotion)
    bwd_bytes = R * C * (ex + 2 * ey)  # read dz, y; write dy
    copy = copy_bandwidth(device, R * C * ex, args.iters, args.warmup)
    print(f"{model}: R={R} C={C} x {X_DTYPE} y {Y_DTYPE}; copy bandwidth {copy:.1f} GB/s", flush=True)
    x = torch.randn(R, C, device=device, dtype=X_DTYPE)
    y = torch.randn(R, C, device=device, dtype=Y_DTYPE)
    gamma = torch.full((C,), 1e-5, device=device, requires_grad=True)
    dz = torch.randn(R, C, device=device, dtype=X_DTYPE)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    for impl, fn in IMPLS.items():
        def fwd(fn=fn, x=x, y=y, gamma=gamma):
            with torch.no_grad():
                return fn(x, y, gamma)
        bench_bandwidth(rows, skipped, model, impl, fwd, lambda fn=fn, xg=xg, yg=yg, gamma=gamma: fn(xg, yg, gamma),
                        [xg, yg, gamma], dz,
                        fwd_bytes, bwd_bytes, copy, device, args)

report("bench_layer_scale", rows, BANDWIDTH_COLUMNS, skipped, args, device,
       {"x_dtype": str(X_DTYPE), "y_dtype": str(Y_DTYPE), "shapes": SHAPES})
