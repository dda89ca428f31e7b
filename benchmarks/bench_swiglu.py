"""SwiGLU (SiLU(gate) * value on the packed fc1 output), forward and backward, in GB/s.

Rows: all tokens of one GPU step (30528 for ViT-H, fc1 width 2 x 3416; 31808 for ViT-G, 2 x 5464),
bf16. Bytes: forward reads 2H, writes H per row (3 R H e); backward reads x and dy, writes dx
(5 R H e). Side by side: our Triton kernel, also with fc1's bias added in it and its gradient
summed in the backward, and with the per-crop drop-path factors and the 8 columns of the block's
residual GEMM as well (``keep``, ``pad``: the model's call, fc2's rows ``[k y | k | 0]``), the torch
reference eagerly (with and without the bias) and under torch.compile, and Liger's SiLU-mul when
installed; the roof is the measured copy bandwidth.

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
    """{name: fn(x, bias)}: ``bias`` is fc1's, which the model passes (rows without it ignore it)."""
    out = {}
    try:
        from virchow_fast.kernels.swiglu import swiglu as triton_swiglu
        out["triton (ours)"] = lambda x, b: triton_swiglu(x)
        out["triton (ours) + fc1 bias"] = triton_swiglu
    except ImportError as exc:
        skip(skipped, "triton", f"ImportError: {exc}")
    out["torch reference (eager)"] = lambda x, b: reference.swiglu(x)
    out["torch reference (eager) + fc1 bias"] = reference.swiglu
    if args.compile:
        compiled = torch.compile(reference.swiglu)
        out["torch.compile(reference)"] = lambda x, b: compiled(x)
    else:
        skip(skipped, "torch.compile(reference)", "compile baselines off (--compile to run them)")
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        def liger(x, b):
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
    bias = torch.randn(W, device=device, dtype=DTYPE, requires_grad=True)  # its [2H] read and sums: no row traffic
    for impl, fn in IMPLS.items():
        def fwd(fn=fn, x=x, bias=bias):
            with torch.no_grad():
                return fn(x, bias)
        grads = [xg, bias] if "bias" in impl else [xg]
        bench_bandwidth(rows, skipped, model, impl, fwd, lambda fn=fn, xg=xg, bias=bias: fn(xg, bias), grads, dy,
                        fwd_bytes, bwd_bytes, copy, device, args)
    if "triton (ours)" in IMPLS:  # the model's call: 54-row crops, drop path 0.4, fc2's padded rows
        from virchow_fast.kernels.swiglu import swiglu as triton_swiglu
        from virchow_fast.model.vit import PAD

        seg = torch.arange(R, device=device) // 54
        keep = (torch.rand(int(seg[-1]) + 1, device=device) >= 0.4).float() / 0.6
        dy_pad = torch.randn(R, H + PAD, device=device, dtype=DTYPE)

        def fwd_model(x=x, bias=bias, keep=keep, seg=seg):
            with torch.no_grad():
                return triton_swiglu(x, bias, keep, seg, PAD)
        bench_bandwidth(rows, skipped, model, "triton (ours) + fc1 bias, keep, pad 8: the model's call", fwd_model,
                        lambda xg=xg, bias=bias, keep=keep, seg=seg: triton_swiglu(xg, bias, keep, seg, PAD),
                        [xg, bias], dy_pad,
                        fwd_bytes, bwd_bytes, copy, device, args)

report("bench_swiglu", rows, BANDWIDTH_COLUMNS, skipped, args, device, {"dtype": str(DTYPE), "shapes": SHAPES},
       goal="goal (H200): triton >= 80 % of copy bandwidth")
