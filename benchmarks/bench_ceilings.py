"""What the device can do at all: copy bandwidth, bf16 GEMM rate at the model's own shapes, clocks.

- Copy: device-to-device ``copy_`` of 1 GiB (read + write counted), the roof for memory-bound ops.
- GEMM: for ViT-H/14 and ViT-G/14 at their shipped per-GPU batch, M = the student's packed tokens
  per GPU (all crops, registers included; the teacher's M for its forward), the four Linear
  layers of a block (qkv, proj, fc1 packed [gate, value], fc2), each as the three products a
  training step issues: forward ``x @ W^T`` [M, K] x [K, N], input gradient ``dy @ W`` [M, N] x [N, K]
  and weight gradient ``dy^T @ x`` [N, M] x [M, K], in bf16 with torch's default cuBLAS settings.
  ``gemm_rate_tflops[model]`` = total FLOPs / total time over one block's GEMMs as a step mixes them
  (student forward + both backward products, teacher forward): the rate the step's GEMMs could reach.
- Clocks, power and throttle reasons from nvidia-smi, before and after the GEMMs.

    python3 benchmarks/bench_ceilings.py                 # GPU
    python3 benchmarks/bench_ceilings.py --cpu-smoke     # tiny shapes on the CPU (automatic without CUDA)

Writes $OUT/ceilings.json (read by bench_step.py for MFU against the measured GEMM rate) and the
usual dated JSON; last line ``SUMMARY ceilings ...``.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth, fmt, print_table, setup, skip, time_fn, try_run, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"vit_h14": "configs/vit_h14_virchow2.yaml", "vit_g14": "configs/vit_g14_virchow2g.yaml"}
SMI_FIELDS = "name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,temperature.gpu," \
             "clocks_event_reasons.active"


def gemm_shapes(config: str, scale: int = 1, tokens_scale: int = 1) -> dict:
    """{layer: (M_student, M_teacher, K, N)} of one block; forward is [M, K] x [K, N]."""
    from virchow_fast.config import load_config
    from virchow_fast.model.info import model_info

    cfg = load_config(ROOT / config, ["data.source=synthetic", "data.paths=[]"])
    info = model_info(cfg)
    b = cfg.data.batch_size
    m_s = info["student_tokens_per_tile"] * b // tokens_scale
    m_t = info["teacher_tokens_per_tile"] * b // tokens_scale
    c, h = cfg.model.embed_dim // scale, cfg.model.mlp_hidden // scale
    return {"qkv": (m_s, m_t, c, 3 * c), "proj": (m_s, m_t, c, c), "fc1": (m_s, m_t, c, 2 * h),
            "fc2": (m_s, m_t, h, c), "_batch": b, "_depth": cfg.model.depth}


def nvidia_smi() -> dict | None:
    """One query of clocks / power / throttle reasons, or None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    if out.returncode != 0:  # an older driver without clocks_event_reasons: ask without it
        fields = SMI_FIELDS.rsplit(",", 1)[0]
        out = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    else:
        fields = SMI_FIELDS
    if out.returncode != 0:
        return {"error": out.stderr.strip()[:200]}
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields.split(","), values, strict=False))


def main() -> None:
    def extra(p):
        p.add_argument("--copy-mib", type=int, default=1024, help="copy buffer size (GPU)")

    args, device = setup("bench_ceilings", __doc__, extra=extra)
    import torch

    rows, skipped = [], []
    clocks_before = nvidia_smi()
    if clocks_before is None:
        skip(skipped, "nvidia-smi clocks", "nvidia-smi not found on PATH")
    else:
        print(f"nvidia-smi before: {clocks_before}", flush=True)

    copy_mib = 4 if args.smoke else args.copy_mib
    copy = copy_bandwidth(device, copy_mib * 2 ** 20, args.iters, args.warmup)
    print(f"copy bandwidth ({copy_mib} MiB, device to device): {copy:.1f} GB/s", flush=True)

    dtype = torch.bfloat16
    rates = {}
    for model, config in CONFIGS.items():
        shapes = gemm_shapes(config, *((16, 64) if args.smoke else (1, 1)))
        batch, depth = shapes.pop("_batch"), shapes.pop("_depth")
        flops_total = ms_total = 0.0
        for layer, (m_s, m_t, k, n) in shapes.items():
            w = torch.randn(n, k, device=device, dtype=dtype)
            x = torch.randn(m_s, k, device=device, dtype=dtype)
            dy = torch.randn(m_s, n, device=device, dtype=dtype)
            xt = x[:m_t]
            products = {
                "fwd": (lambda x=x, w=w: torch.nn.functional.linear(x, w), m_s),
                "dgrad": (lambda dy=dy, w=w: dy @ w, m_s),
                "wgrad": (lambda dy=dy, x=x: dy.t() @ x, m_s),
                "teacher_fwd": (lambda xt=xt, w=w: torch.nn.functional.linear(xt, w), m_t),
            }
            for product, (fn, m) in products.items():
                t = try_run(skipped, f"{model} {layer} {product}", lambda fn=fn: time_fn(fn, device, args.iters,
                                                                                          args.warmup))
                if t is None:
                    continue
                flops = 2.0 * m * k * n
                rate = flops / (t["ms"] * 1e-3) / 1e12
                rows.append({"model": model, "layer": layer, "product": product, "M": m, "K": k, "N": n,
                             "ms": t["ms"], "TFLOPs": rate})
                flops_total += flops
                ms_total += t["ms"]
            del products, w, x, dy, xt
        if ms_total:
            rates[model] = flops_total / (ms_total * 1e-3) / 1e12
            print(f"{model} (batch {batch}, depth {depth}): GEMM rate {rates[model]:.1f} TFLOP/s over one block's "
                  f"GEMMs", flush=True)
    clocks_after = nvidia_smi()
    if clocks_after is not None:
        print(f"nvidia-smi after: {clocks_after}", flush=True)

    print()
    print_table(rows, ["model", "layer", "product", "M", "K", "N", "ms", "TFLOPs"])
    if args.smoke:
        print("\nCPU SMOKE RUN: tiny shapes; the numbers say only that the script works.")
    payload = {"smoke": args.smoke, "copy_GBs": copy, "copy_mib": copy_mib, "gemm_rate_tflops": rates,
               "dtype": str(dtype), "nvidia_smi_before": clocks_before, "nvidia_smi_after": clocks_after,
               "rows": rows, "skipped": skipped}
    write_json("bench_ceilings", payload, args.out, device)
    write_json("ceilings", payload, device=device, path=Path(args.out) / "ceilings.json")
    slowest = {m: min(x["TFLOPs"] for x in rows if x["model"] == m) for m in rates}
    gemm_text = ", ".join(f"{m} {fmt(r)} TFLOP/s (slowest product {fmt(slowest[m])})" for m, r in rates.items())
    sm = clocks_after or {}
    clock_text = f"; SM clock {sm.get('clocks.sm', '?')} of {sm.get('clocks.max.sm', '?')}" if sm else \
        "; no nvidia-smi"
    print(f"SUMMARY ceilings{' (CPU smoke)' if args.smoke else ''}: copy {fmt(copy)} GB/s; bf16 GEMM "
          f"{gemm_text or 'none'}{clock_text}", flush=True)
    if not rates:
        sys.exit(1)


if __name__ == "__main__":
    main()
