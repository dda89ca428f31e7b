"""Residual add + LayerScale (z = x + gamma * (y + bias)), and that add fused with the LayerNorm after
it, forward and backward, in GB/s against the copy bandwidth.

Rows: all tokens of one GPU step (30528 x 1280 for ViT-H, 31808 x 1664 for ViT-G); the residual
stream x in fp32, the branch output y in bf16 (mixed precision), gamma and biases fp32.

- residual_layer_scale: forward reads x and y, writes z; backward reads dz and y, writes dy (dx is
  dz itself). Our fused Triton kernel without and with the branch bias (the model's call: its
  gradient summed in the backward), the reference eagerly and under torch.compile.
- residual_layer_norm (the attention branch's add and norm2): bytes are the fused op's, forward
  reads x, y, writes z, h; backward reads z, dh, dz, y, writes dx, dy. Our fused kernel, our two
  separate kernels (residual_layer_scale, then layer_norm_branch) and the reference composition,
  so the GB/s column compares time for the same work.

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

# {name: fn(x, y, gamma, bias)}; rows without "bias" in their name leave it out
IMPLS, NORM_IMPLS = {}, {}
try:
    from virchow_fast.kernels.layer_norm import layer_norm_branch as triton_branch
    from virchow_fast.kernels.layer_scale import residual_layer_scale as triton_rls
    from virchow_fast.kernels.residual_norm import residual_layer_norm as triton_rn

    IMPLS["triton (ours, fused)"] = lambda x, y, g, b: triton_rls(x, y, g)
    IMPLS["triton (ours, fused) + branch bias, the model's call"] = lambda x, y, g, b: triton_rls(x, y, g, bias=b)
    NORM_IMPLS["triton (ours): residual + norm2 in one kernel"] = triton_rn

    def separate(x, y, g, keep, seg, b, w, lnb, eps):
        h, z = triton_branch(triton_rls(x, y, g, keep, seg, b), w, lnb, eps)
        return z, h
    NORM_IMPLS["triton (ours): residual, then layer_norm_branch"] = separate
except ImportError as exc:
    skip(skipped, "triton", f"ImportError: {exc}")
IMPLS["torch reference (eager)"] = lambda x, y, g, b: reference.residual_layer_scale(x, y, g)
IMPLS["torch reference (eager) + branch bias"] = lambda x, y, g, b: reference.residual_layer_scale(x, y, g, bias=b)
NORM_IMPLS["torch reference (eager)"] = reference.residual_layer_norm
if args.compile:
    compiled = torch.compile(reference.residual_layer_scale)
    IMPLS["torch.compile(reference)"] = lambda x, y, g, b: compiled(x, y, g)
    NORM_IMPLS["torch.compile(reference)"] = torch.compile(reference.residual_layer_norm)
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
    bias = torch.randn(C, device=device, requires_grad=True)
    dz = torch.randn(R, C, device=device, dtype=X_DTYPE)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    for impl, fn in IMPLS.items():
        def fwd(fn=fn, x=x, y=y, gamma=gamma, bias=bias):
            with torch.no_grad():
                return fn(x, y, gamma, bias)
        bench_bandwidth(rows, skipped, model, f"residual_layer_scale: {impl}", fwd,
                        lambda fn=fn, xg=xg, yg=yg, gamma=gamma, bias=bias: fn(xg, yg, gamma, bias),
                        [xg, yg, gamma] + ([bias] if "bias" in impl else []), dz,
                        fwd_bytes, bwd_bytes, copy, device, args)
    w, lnb = torch.ones(C, device=device, requires_grad=True), torch.zeros(C, device=device, requires_grad=True)
    dh = torch.randn(R, C, device=device, dtype=X_DTYPE)
    # z and h in the promoted dtype (x's): forward reads x, y, writes z, h; backward reads z, dh, dz, y, writes dx, dy
    norm_fwd, norm_bwd = R * C * (3 * ex + ey), R * C * (4 * ex + 2 * ey)
    for impl, fn in NORM_IMPLS.items():
        def fwd(fn=fn, x=x, y=y, gamma=gamma, bias=bias, w=w, lnb=lnb):
            with torch.no_grad():
                return fn(x, y, gamma, None, None, bias, w, lnb, 1e-6)
        bench_bandwidth(rows, skipped, model, f"residual_layer_norm: {impl}", fwd,
                        lambda fn=fn, xg=xg, yg=yg, gamma=gamma, bias=bias, w=w, lnb=lnb:
                        fn(xg, yg, gamma, None, None, bias, w, lnb, 1e-6),
                        [xg, yg, gamma, bias, w, lnb], (dz, dh), norm_fwd, norm_bwd, copy, device, args)

report("bench_layer_scale", rows, BANDWIDTH_COLUMNS, skipped, args, device,
       {"x_dtype": str(X_DTYPE), "y_dtype": str(Y_DTYPE), "shapes": SHAPES})
