"""LayerNorm forward and backward on the model's token rows, in GB/s against the copy bandwidth.

Rows: all tokens of one GPU step (32 tiles x (2 x 261 + 8 x 54) = 30528 for ViT-H at width 1280;
32 x (2 x 265 + 8 x 58) = 31808 for ViT-G at 1664), bf16 activations, fp32 weight and bias (as
FSDP2 mixed precision leaves them in the reference path). Bytes: forward reads x, writes y
(2 R C e); backward reads x and dy, writes dx (3 R C e); weights and the fp32 statistics are
counted too. Side by side: our Triton kernel (also in the block's branch form, with the residual
stream's copy the block's in-place GEMM updates: one more write forward, the residual gradient's
read backward), the torch reference (fp32 upcast) eagerly and
under torch.compile, torch's native F.layer_norm in bf16, and Liger / apex when installed.

    python benchmarks/bench_layer_norm.py              # GPU
    python benchmarks/bench_layer_norm.py --cpu-smoke  # tiny shapes, Triton interpreter (automatic without CUDA)
"""
from __future__ import annotations

from _common import BANDWIDTH_COLUMNS, bench_bandwidth, copy_bandwidth, report, setup, skip

args, device = setup("bench_layer_norm", __doc__)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from virchow_fast.ops import reference  # noqa: E402

DTYPE = torch.float32 if args.smoke else torch.bfloat16
SHAPES = {"vit_tiny": (37, 1280)} if args.smoke else {"vit_h14": (30528, 1280), "vit_g14": (31808, 1664)}
EPS = 1e-6
rows, skipped = [], []


def impls():
    out = {}
    try:
        from virchow_fast.kernels.layer_norm import layer_norm as triton_ln
        out["triton (ours)"] = triton_ln
    except ImportError as exc:
        skip(skipped, "triton", f"ImportError: {exc}")
    try:  # csrc/layer_norm.cu through the virchow_fast._C extension (python setup.py build_ext --inplace)
        from virchow_fast.ops.cuda_ops import layer_norm as cuda_ln
        out["cuda (ours, csrc)"] = cuda_ln
    except ImportError as exc:
        skip(skipped, "cuda (csrc)", f"ImportError: {exc}")
    out["torch reference (eager)"] = reference.layer_norm
    if args.compile:
        out["torch.compile(reference)"] = torch.compile(reference.layer_norm)
    else:
        skip(skipped, "torch.compile(reference)", "compile baselines off (--compile to run them)")
    out["F.layer_norm (native, x dtype)"] = lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w.to(x.dtype),
                                                                           b.to(x.dtype), eps)
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        out["Liger"] = lambda x, w, b, eps: LigerLayerNormFunction.apply(x, w, b, eps)
    except ImportError:
        skip(skipped, "Liger layer_norm", "liger_kernel not installed")
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
        out["apex"] = lambda x, w, b, eps: fused_layer_norm_affine(x, w, b, (x.shape[-1],), eps)
    except ImportError:
        skip(skipped, "apex fused_layer_norm", "apex not installed")
    return out


IMPLS = impls()
for model, (R, C) in SHAPES.items():
    e = torch.tensor([], dtype=DTYPE).element_size()
    fwd_bytes = 2 * R * C * e + 2 * C * 4 + 2 * R * 4
    bwd_bytes = 3 * R * C * e + 2 * R * 4 + 2 * C * 4
    copy = copy_bandwidth(device, R * C * e, args.iters, args.warmup)
    print(f"{model}: R={R} C={C} {DTYPE}; copy bandwidth {copy:.1f} GB/s", flush=True)
    x = torch.randn(R, C, device=device, dtype=DTYPE)
    dy = torch.randn(R, C, device=device, dtype=DTYPE)
    w = torch.randn(C, device=device, requires_grad=True)
    b = torch.randn(C, device=device, requires_grad=True)
    xg = x.clone().requires_grad_()
    for impl, fn in IMPLS.items():
        def fwd(fn=fn, x=x, w=w, b=b):
            with torch.no_grad():
                return fn(x, w, b, EPS)
        bench_bandwidth(rows, skipped, model, impl, fwd, lambda fn=fn, xg=xg, w=w, b=b: fn(xg, w, b, EPS),
                        [xg, w, b], dy,
                        fwd_bytes, bwd_bytes, copy, device, args)
    if "triton (ours)" in IMPLS:  # the block's call: the branch form, with the stream's copy (one more write)
        from virchow_fast.kernels.layer_norm import layer_norm_branch

        def branch_fwd(x=x, w=w, b=b):
            with torch.no_grad():
                return layer_norm_branch(x, w, b, EPS, copy=True)
        # backward: the norm's and the residual stream's gradients, summed in the one kernel (one more read)
        bench_bandwidth(rows, skipped, model, "triton (ours) branch + stream copy, the model's call", branch_fwd,
                        lambda xg=xg, w=w, b=b: layer_norm_branch(xg, w, b, EPS, copy=True), [xg, w, b], (dy, dy),
                        fwd_bytes + R * C * e, bwd_bytes + R * C * e, copy, device, args)

report("bench_layer_norm", rows, BANDWIDTH_COLUMNS, skipped, args, device,
       {"dtype": str(DTYPE), "shapes": SHAPES, "eps": EPS},
       goal="goal (H200): triton >= 85 % of copy bandwidth forward, >= 75 % backward")
