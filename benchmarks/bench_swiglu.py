"""SwiGLU (SiLU(gate) * value on the packed fc1 output), forward and backward, in GB/s.

Rows: all tokens of one GPU step (30528 for ViT-H, fc1 width 2 x 3416; 31808 for ViT-G, 2 x 5464),
bf16. Bytes: forward reads 2H, writes H per row (3 R H e); backward reads x and dy, writes dx
(5 R H e). Side by side: our Triton kernel, the torch reference eagerly and under torch.compile,
and Liger's SiLU-mul when installed; the roof is the measured copy bandwidth.

    python benchmarks/bench_swiglu.py              # GPU
    python benchmarks/bench_swiglu.py --cpu-smoke  # tiny shapes, Triton interpreter (automatic without CUDA)
"""
from __future__ import annotations

from _common import copy_bandwidth, print_table, setup, skip, time_fn, try_run, write_json

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
        def fwd(fn=fn):
            with torch.no_grad():
                return fn(x)
        t_f = try_run(skipped, f"{model} {impl} forward", lambda: time_fn(fwd, device, args.iters, args.warmup))
        if t_f is None:
            continue
        y = try_run(skipped, f"{model} {impl} backward", lambda fn=fn: fn(xg))
        t_b = None
        if y is not None:
            t_b = try_run(skipped, f"{model} {impl} backward", lambda: time_fn(
                lambda: torch.autograd.grad(y, [xg], dy, retain_graph=True), device, args.iters, args.warmup))
        gbs_f = fwd_bytes / (t_f["ms"] * 1e-3) / 1e9
        gbs_b = bwd_bytes / (t_b["ms"] * 1e-3) / 1e9 if t_b else None
        rows.append({"model": model, "impl": impl, "fwd_ms": t_f["ms"], "fwd_GBs": gbs_f,
                     "fwd_%copy": 100 * gbs_f / copy, "bwd_ms": t_b["ms"] if t_b else None, "bwd_GBs": gbs_b,
                     "bwd_%copy": 100 * gbs_b / copy if gbs_b else None, "copy_GBs": copy})
        print(f"  {impl}: fwd {t_f['ms']:.3f} ms" + (f", bwd {t_b['ms']:.3f} ms" if t_b else ""), flush=True)

print()
print_table(rows, ["model", "impl", "fwd_ms", "fwd_GBs", "fwd_%copy", "bwd_ms", "bwd_GBs", "bwd_%copy", "copy_GBs"])
if skipped:
    print(f"\nskipped ({len(skipped)}):")
    for s in skipped:
        print(f"  - {s['what']}: {s['reason']}")
if args.smoke:
    print("\nCPU SMOKE RUN: tiny shapes, Triton interpreter; the numbers say only that the script works.")
print("goal (issue 3, H200): triton >= 80 % of copy bandwidth")
write_json("bench_swiglu", {"smoke": args.smoke, "dtype": str(DTYPE), "shapes": SHAPES,
                            "rows": rows, "skipped": skipped}, args.out, device)
