"""The heads' prototype weight norm (rows of W divided by their L2 norm), forward and backward, in GB/s.

Rows: the DINO and iBOT prototype matrices of the shipped configs, [131072, 384] and [131072, 256],
bf16 (the compute copies). Bytes: forward reads w, writes y (2 R C e) plus a fp32 factor per row;
backward reads dy and w, writes dw (3 R C e). Side by side: our Triton kernel
(kernels/l2_normalize.py, the model's call), ``F.normalize`` eagerly (the reference) and under
torch.compile; the roof is the measured copy bandwidth. In the CPU smoke mode the script asserts
that ours and the reference agree (output and gradient).

    python benchmarks/bench_l2_normalize.py              # GPU
    python benchmarks/bench_l2_normalize.py --cpu-smoke  # tiny shapes, Triton interpreter (automatic without CUDA)
"""
from __future__ import annotations

from _common import BANDWIDTH_COLUMNS, bench_bandwidth, copy_bandwidth, report, setup, skip

args, device = setup("bench_l2_normalize", __doc__)

import torch  # noqa: E402

from virchow_fast.ops import reference  # noqa: E402

DTYPE = torch.float32 if args.smoke else torch.bfloat16
SHAPES = {"tiny_dino": (37, 384)} if args.smoke else {"dino": (131072, 384), "ibot": (131072, 256)}
rows, skipped = [], []

IMPLS = {}
try:
    from virchow_fast.kernels.l2_normalize import l2_normalize as triton_l2

    IMPLS["triton (ours), the model's call"] = triton_l2
except ImportError as exc:
    skip(skipped, "triton", f"ImportError: {exc}")
IMPLS["F.normalize (eager, the reference)"] = reference.l2_normalize
if args.compile:
    IMPLS["torch.compile(F.normalize)"] = torch.compile(reference.l2_normalize)
else:
    skip(skipped, "torch.compile(reference)", "compile baselines off (--compile to run them)")

for head, (R, C) in SHAPES.items():
    e = torch.tensor([], dtype=DTYPE).element_size()
    fwd_bytes, bwd_bytes = 2 * R * C * e + 4 * R, 3 * R * C * e + 4 * R
    copy = copy_bandwidth(device, R * C * e, args.iters, args.warmup)
    print(f"{head}: [{R}, {C}] {DTYPE}; copy bandwidth {copy:.1f} GB/s", flush=True)
    w = torch.randn(R, C, device=device, dtype=DTYPE)
    dy = torch.randn(R, C, device=device, dtype=DTYPE)
    wg = w.clone().requires_grad_()
    for impl, fn in IMPLS.items():
        def fwd(fn=fn, w=w):
            with torch.no_grad():
                return fn(w)
        bench_bandwidth(rows, skipped, head, impl, fwd, lambda fn=fn, wg=wg: fn(wg), [wg], dy, fwd_bytes, bwd_bytes,
                        copy, device, args)
    if args.smoke and len(IMPLS) > 1:
        outs = []
        for fn in list(IMPLS.values())[:2]:
            wk = w.clone().requires_grad_()
            y = fn(wk)
            outs.append((y.detach(), torch.autograd.grad(y, wk, dy)[0]))
        (y0, g0), (y1, g1) = outs
        torch.testing.assert_close(y0, y1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)
        print("  smoke check: ours == F.normalize (output and gradient)", flush=True)

report("bench_l2_normalize", rows, BANDWIDTH_COLUMNS, skipped, args, device, {"dtype": str(DTYPE), "shapes": SHAPES},
       goal="goal (H200): triton >= 80 % of copy bandwidth")
