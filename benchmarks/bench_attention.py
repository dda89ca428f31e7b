"""Packed multi-crop attention, forward and forward+backward, on the model's real shapes.

One step of one GPU, each tile 2 global + 8 local crops, all packed into one sequence (ViT-H: 32
tiles of 261 / 54 tokens, 16 heads of 80; ViT-G: 24 tiles of 265 / 58 tokens with 8 registers, 16
heads of 104; the shipped configs' batch sizes).
Side by side: our Triton kernel (one launch for every crop), the torch reference eagerly and under
torch.compile, SDPA with each backend (flash, efficient, cuDNN) on the same per-crop work (crops of
equal length batched, inputs pre-gathered into [B, H, L, D], so SDPA is not charged for packing),
FlexAttention over the packed sequence with a block-diagonal block mask, and flash-attn's varlen
function when it is installed. TFLOP/s: forward 4 * sum(L^2) * H * D, backward 2.5 x forward (useful
work; our row's note adds the FLOPs our kernels issue with tile and head-dim padding, from
``kernels.attention.launch_plan``, and the launch configs the autotuner picked).

    python benchmarks/bench_attention.py              # GPU: real shapes
    python benchmarks/bench_attention.py --cpu-smoke  # tiny shapes, Triton interpreter (automatic without CUDA)
"""
from __future__ import annotations

from _common import report, setup, skip, time_fn, try_run, write_json

args, device = setup("bench_attention", __doc__)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from virchow_fast.ops import reference  # noqa: E402

DTYPE = torch.float32 if args.smoke else torch.bfloat16
if args.smoke:  # tiny: 1 tile of 2 "global" + 2 "local" crops, 2 heads
    MODELS = {"vit_h_tiny": dict(heads=2, dim=80, crops=[21] * 2 + [9] * 2, tiles=1)}
else:
    MODELS = {
        "vit_h14": dict(heads=16, dim=80, crops=[261] * 2 + [54] * 8, tiles=32),
        "vit_g14": dict(heads=16, dim=104, crops=[265] * 2 + [58] * 8, tiles=24),
    }
rows, skipped = [], []


def packed_inputs(cfg):
    lengths = cfg["crops"] * cfg["tiles"]
    T = sum(lengths)
    qkv = torch.randn(T, 3, cfg["heads"], cfg["dim"], device=device, dtype=DTYPE)  # the model's packed projection
    do = torch.randn(T, cfg["heads"], cfg["dim"], device=device, dtype=DTYPE)
    cu = F.pad(torch.tensor(lengths, device=device).cumsum(0), (1, 0)).to(torch.int32)
    return lengths, cu, (qkv,), do


def measure(model, impl, fwd, inputs, do, flops_fwd, note=""):
    """Time fwd() and fwd + backward w.r.t. inputs; one row."""
    plain = [t.detach() for t in inputs]
    inputs = [t.detach().requires_grad_() for t in inputs]

    def fwd_only():
        with torch.no_grad():
            return fwd(*plain)

    def fwd_bwd():
        out = fwd(*inputs)
        return torch.autograd.grad(out, inputs, do)

    t_f = try_run(skipped, f"{model} {impl} forward", lambda: time_fn(fwd_only, device, args.iters, args.warmup))
    if t_f is None:
        return
    t_fb = try_run(skipped, f"{model} {impl} fwd+bwd", lambda: time_fn(fwd_bwd, device, args.iters, args.warmup))
    rows.append({
        "model": model, "impl": impl,
        "fwd_ms": t_f["ms"], "fwd_TFLOPs": flops_fwd / (t_f["ms"] * 1e-3) / 1e12,
        "fwdbwd_ms": t_fb["ms"] if t_fb else None,
        "fwdbwd_TFLOPs": 3.5 * flops_fwd / (t_fb["ms"] * 1e-3) / 1e12 if t_fb else None,
        "note": note,
    })
    print(f"  {model} {impl}: fwd {t_f['ms']:.3f} ms" + (f", fwd+bwd {t_fb['ms']:.3f} ms" if t_fb else ""), flush=True)


def sdpa_batched(lengths, heads, dim, do_packed):
    """Per distinct crop length: pre-gathered [B, H, L, D] q, k, v and dO (same work as the packed call)."""
    groups = {}
    for n in lengths:
        groups[n] = groups.get(n, 0) + 1
    ins, dos = [], []
    for n, b in groups.items():
        ins.extend(torch.randn(b, heads, n, dim, device=device, dtype=DTYPE) for _ in range(3))
        dos.append(torch.randn(b, heads, n, dim, device=device, dtype=DTYPE))
    return ins, torch.cat([d.flatten() for d in dos])


json_path = None


def save():
    global json_path
    json_path = write_json("bench_attention", {"smoke": args.smoke, "dtype": str(DTYPE), "models": MODELS,
                                               "rows": rows, "skipped": skipped}, args.out, device, json_path)


def bench_model(model, cfg):
    """All rows of one model (a function, so the timed lambdas bind this model's values)."""
    lengths, cu, qkv, do = packed_inputs(cfg)
    H, D = cfg["heads"], cfg["dim"]
    max_len = max(lengths)
    flops = 4 * sum(n * n for n in lengths) * H * D
    print(f"{model}: {len(lengths)} crops, T={sum(lengths)}, H={H}, D={D}, {DTYPE}, "
          f"{flops / 1e9:.2f} GFLOP forward", flush=True)
    scale = D ** -0.5

    try:
        from virchow_fast.kernels import attention as A
        with torch.no_grad():  # a correctness spot check on the real shapes, recorded with the timing
            err = (A.attention(*qkv, cu, max_len, scale).float()
                   - reference.attention(*(t.float() for t in qkv), cu, max_len, scale)).abs().max().item()
        plan = A.launch_plan(lengths, H, D, DTYPE)
        issued = {k: plan[k]["flops_issued"] / plan[k]["flops_useful"] for k in ("fwd", "bwd")}
        measure(model, "triton (ours, packed)", lambda qkv: A.attention(qkv, cu, max_len, scale),
                qkv, do, flops, ("interpreter; " if args.smoke else "") + f"max|o - ref32| {err:.1e}; issued/useful "
                f"fwd {issued['fwd']:.2f} bwd {issued['bwd']:.2f} (default configs)")
        if rows and rows[-1]["impl"] == "triton (ours, packed)":  # the configs the timing runs picked
            rows[-1]["note"] += "; chosen " + ", ".join(f"{key[0]} {cfg}" for key, cfg in A._chosen.items())

        class WithBiasSums(torch.autograd.Function):  # the backward ops.attention_qkv runs (projection left out)
            @staticmethod
            def forward(ctx, qkv):
                o, lse = A._attention_fwd(qkv, cu, max_len, scale)
                ctx.save_for_backward(qkv, o, lse)
                return o

            @staticmethod
            def backward(ctx, do):
                qkv, o, lse = ctx.saved_tensors
                return A._attention_bwd_bias(do, qkv, o, lse, cu, max_len, scale)[0]
        measure(model, "triton (ours, packed), backward with the qkv bias sums", WithBiasSums.apply, qkv, do, flops,
                "ops.attention_qkv's kernels without its projection GEMMs")
        # the model's call: each crop's drop-path factor (0.4) and proj's [T, C + 8] rows for the residual GEMM
        from virchow_fast.model.vit import PAD

        seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
        keep = (torch.rand(len(lengths), device=device) >= 0.4).float() / 0.6
        do_pad = torch.randn(sum(lengths), H * D + PAD, device=device, dtype=DTYPE)
        measure(model, "triton (ours, packed), keep + padded rows: the model's call",
                lambda qkv: A._attention_fwd(qkv, cu, max_len, scale, keep, seg, PAD)[0], qkv, do_pad, flops,
                "per-crop factors in the epilogue, [T, C + 8] output (the backward without the bias sums)")
    except ImportError as exc:
        skip(skipped, f"{model} triton", f"ImportError: {exc}")

    ref = lambda qkv: reference.attention(qkv, cu, max_len, scale)  # noqa: E731
    measure(model, "torch reference (eager)", ref, qkv, do, flops, "gather + SDPA default per length")

    # SDPA per backend on pre-batched crops: no packing copies charged to it
    ins, do_flat = sdpa_batched(lengths, H, D, do)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
        def sdpa_all(*t, backend=backend):
            with sdpa_kernel(backend):
                outs = [F.scaled_dot_product_attention(t[i], t[i + 1], t[i + 2], scale=scale)
                        for i in range(0, len(t), 3)]
            return torch.cat([o.flatten() for o in outs])
        measure(model, f"SDPA {name} (per length)", sdpa_all, ins, do_flat, flops, f"{len(ins) // 3} calls")

    save()  # partial results survive a timeout in the compiled baselines below
    try:
        from flash_attn import flash_attn_varlen_qkvpacked_func
        measure(model, "flash-attn varlen", lambda qkv: flash_attn_varlen_qkvpacked_func(
            qkv, cu, max_len, softmax_scale=scale), qkv, do, flops)
    except ImportError:
        skip(skipped, f"{model} flash-attn varlen", "flash_attn not installed")

    # compiled baselines last: slow to build, so the rows above are saved first
    if args.compile:
        compiled_ref = torch.compile(ref)
        measure(model, "torch.compile(reference)", compiled_ref, qkv, do, flops)
    else:
        skip(skipped, f"{model} torch.compile(reference)", "compile baselines off (--compile to run them)")

    if args.compile:
        def flex_setup():
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            seg = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                          torch.tensor(lengths, device=device))
            T = seg.numel()
            mask = create_block_mask(lambda b, h, qi, ki: seg[qi] == seg[ki], None, None, T, T, device=device)
            flex = torch.compile(flex_attention)
            return lambda qkv: flex(*(t.transpose(0, 1)[None] for t in qkv.unbind(1)),
                                    block_mask=mask, scale=scale)[0].transpose(0, 1)
        flex_fn = try_run(skipped, f"{model} FlexAttention", flex_setup)
        if flex_fn is not None:
            measure(model, "FlexAttention (block mask)", flex_fn, qkv, do, flops, "packed, compiled")
    else:
        skip(skipped, f"{model} FlexAttention", "needs torch.compile; compile baselines off (--compile)")

    save()


for model, cfg in MODELS.items():
    bench_model(model, cfg)

report("bench_attention", rows, ["model", "impl", "fwd_ms", "fwd_TFLOPs", "fwdbwd_ms", "fwdbwd_TFLOPs", "note"],
       skipped, args, device, {"dtype": str(DTYPE), "models": MODELS}, path=json_path,
       goal="goal (H200): packed attention fwd+bwd faster than every SDPA / Flex option on the same work")
