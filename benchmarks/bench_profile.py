"""Where one training step's time goes: torch.profiler over the trainer's own step, by category.

The step is bench_step.py's (the trainer's ``build()`` and step on a batch held on the device),
after warm-up steps (Triton compiles and autotunes there). One step is profiled; on a GPU every
kernel of that step is put in one category by its name:

  GEMM               cuBLAS / CUTLASS matmuls (nvjet, sm90 xmma, cutlass, gemm)
  attention          our Triton attention kernels (kernels/*attention*.py), SDPA / flash / cuDNN
  head loss (fused)  our Triton prototype-loss kernels (kernels/prototype_loss.py)
  Triton glue        every other Triton kernel: LayerNorm, SwiGLU, residual + LayerScale, inductor's
  optimizer and EMA  fused AdamW, the foreach passes (gradient norm and clipping, EMA lerp)
  communication      NCCL
  memcpy / memset    copies and fills issued as such
  other elementwise  the rest (torch's own elementwise, reductions, casts, index ops)
  idle               the step's wall time (host start to the last kernel's end) with no kernel running

On a CPU (smoke) there are no kernels: the categories then hold the self CPU time of torch ops.

    python3 benchmarks/bench_profile.py                          # GPU: ViT-H/14, 32 tiles, shipped AC (full)
    python3 benchmarks/bench_profile.py --model vit_h14 --ac off
    python3 benchmarks/bench_profile.py --cpu-smoke

Writes a JSON with the table and the top kernels; last line ``SUMMARY profile ...``.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, setup, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CATEGORIES = ("GEMM", "attention", "head loss (fused)", "Triton glue", "optimizer and EMA", "communication",
              "memcpy / memset", "other elementwise")


def triton_kernels(folder: Path = ROOT / "kernels") -> dict[str, str]:
    """{kernel function name: category} of every ``@triton.jit`` kernel in ``folder``."""
    names = {}
    for path in sorted(folder.glob("*.py")):
        cat = "attention" if "attention" in path.stem else "head loss (fused)" if "prototype_loss" in path.stem \
            else "Triton glue"
        for name in re.findall(r"@triton\.jit[^\n]*\n(?:@[^\n]*\n)*def (\w+)\(", path.read_text()):
            names[name] = cat
    return names


_OURS = triton_kernels()


def classify(name: str) -> str:
    """The category of a GPU kernel (or, on the CPU, a torch op) by its name."""
    low = name.lower()
    base = name.split("(")[0].split("<")[0].split()[-1] if name.split() else name
    if base in _OURS:
        return _OURS[base]
    if "nccl" in low or low.startswith("c10d::") or "all_reduce" in low or "allreduce" in low:
        return "communication"
    if "memcpy" in low or "memset" in low:
        return "memcpy / memset"
    if any(k in low for k in ("adam", "multi_tensor_apply", "_foreach_", "lerp")):
        return "optimizer and EMA"
    if any(k in low for k in ("flash", "fmha", "attention", "sdpa", "attn")):
        return "attention"
    if any(k in low for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm",
                              "aten::bmm", "aten::baddbmm")) or re.match(r"^sm\d+_", low):
        return "GEMM"
    if low.startswith("triton_") or low.startswith("virchow_fast"):
        return "Triton glue"
    return "other elementwise"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def breakdown_from_trace(trace: dict, window: tuple[float, float] | None) -> tuple[list[dict], list[dict], float]:
    """(category rows, top kernels, wall us) from a chrome trace's GPU events within ``window`` (us)."""
    gpu = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"
           and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if window is not None:
        gpu = [e for e in gpu if e["ts"] + e.get("dur", 0) >= window[0] and e["ts"] <= window[1]]
    if not gpu:
        return [], [], 0.0
    start = window[0] if window else min(e["ts"] for e in gpu)
    end = max(max(e["ts"] + e.get("dur", 0) for e in gpu), window[1] if window else 0)
    wall = end - start
    per_cat = {c: 0.0 for c in CATEGORIES}
    per_kernel: dict[str, list] = {}
    for e in gpu:
        cat = classify(e["name"])
        per_cat[cat] += e.get("dur", 0)
        k = per_kernel.setdefault(e["name"], [cat, 0.0, 0])
        k[1] += e.get("dur", 0)
        k[2] += 1
    busy = _union_us([(max(e["ts"], start), min(e["ts"] + e.get("dur", 0), end)) for e in gpu])
    rows = [{"category": c, "ms": per_cat[c] / 1e3, "%step": 100 * per_cat[c] / wall} for c in CATEGORIES]
    rows.append({"category": "idle", "ms": (wall - busy) / 1e3, "%step": 100 * (wall - busy) / wall})
    top = sorted(({"kernel": n[:90], "category": v[0], "ms": v[1] / 1e3, "calls": v[2]}
                  for n, v in per_kernel.items()), key=lambda r: -r["ms"])[:15]
    return rows, top, wall


def breakdown_cpu(prof, wall_us: float) -> tuple[list[dict], list[dict]]:
    """Categories by self CPU time of torch ops (the CPU smoke run has no kernels)."""
    per_cat = {c: 0.0 for c in CATEGORIES}
    top = []
    for evt in prof.key_averages():
        cat = classify(evt.key)
        per_cat[cat] += evt.self_cpu_time_total
        top.append({"kernel": evt.key[:90], "category": cat, "ms": evt.self_cpu_time_total / 1e3,
                    "calls": evt.count})
    busy = sum(per_cat.values())
    rows = [{"category": c, "ms": per_cat[c] / 1e3, "%step": 100 * per_cat[c] / wall_us} for c in CATEGORIES]
    rows.append({"category": "idle (python, not in torch ops)", "ms": max(wall_us - busy, 0) / 1e3,
                 "%step": 100 * max(wall_us - busy, 0) / wall_us})
    return rows, sorted(top, key=lambda r: -r["ms"])[:15]


def main() -> None:
    def extra(p):
        p.add_argument("--model", default=None, help="vit_h14 | vit_g14 | tiny (default vit_h14; tiny on CPU)")
        p.add_argument("--batch", type=int, default=None, help="tiles per GPU (default: the config's)")
        p.add_argument("--ac", default=None, help="off | full | every_k2 (default: the config's)")
        p.add_argument("--ops", default=None, help="force every op to one backend (torch | triton); default auto")

    args, device = setup("bench_profile", __doc__, extra=extra)
    import torch
    from bench_step import Trainer, trainer_config
    from torch.profiler import ProfilerActivity, profile, record_function

    model = "tiny" if args.smoke else (args.model or "vit_h14")

    def profiled_step(ops: str | None):
        cfg = trainer_config(model, device.type, args.batch, args.ac, ops, num_workers=0 if args.smoke else None)
        print(f"== {model}: batch {cfg.data.batch_size}, activation checkpointing "
              f"{cfg.parallel.activation_checkpointing}, ops {ops or 'auto'}", flush=True)
        tr = Trainer(cfg)
        try:
            batch = tr.batch_in_memory()
            warmup = args.warmup if "--warmup" in sys.argv else 2
            for i in range(warmup):
                tr.step(batch, i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                with record_function("bench_profile_step"):
                    tr.step(batch, warmup)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                wall_us = (time.perf_counter() - t0) * 1e6
        finally:
            tr.close()
        return cfg, prof, wall_us

    ops = args.ops
    try:
        cfg, prof, wall_host_us = profiled_step(ops)
    except torch.OutOfMemoryError:
        raise
    except Exception:  # noqa: BLE001 (a kernel failing on its first GPU: profile the reference path instead)
        if ops is not None:
            raise
        traceback.print_exc()
        ops = "torch"
        print("retrying with every op on torch (the reference backends)", flush=True)
        cfg, prof, wall_host_us = profiled_step(ops)
    ac = cfg.parallel.activation_checkpointing

    if device.type == "cuda":
        with tempfile.TemporaryDirectory() as tmp:
            trace_path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(trace_path)
            trace = json.loads(Path(trace_path).read_text())
        marks = [e for e in trace.get("traceEvents", []) if e.get("name") == "bench_profile_step"
                 and e.get("ph") == "X" and e.get("cat") == "user_annotation"]  # the host's range, not the GPU's
        window = (marks[0]["ts"], marks[0]["ts"] + marks[0]["dur"]) if marks else None
        rows, top, wall = breakdown_from_trace(trace, window)
    else:
        rows, top = breakdown_cpu(prof, wall_host_us)
        wall = wall_host_us
    print(f"\none step: {wall / 1e3:.1f} ms (profiled; the profiler adds a little)")
    print_table(rows, ["category", "ms", "%step"])
    print("\ntop kernels" if device.type == "cuda" else "\ntop torch ops (self CPU time)")
    print_table(top, ["kernel", "category", "ms", "calls"])
    if args.smoke:
        print("\nCPU SMOKE RUN: tiny config, CPU op times; the numbers say only that the script works.")
    write_json("bench_profile", {"smoke": args.smoke, "model": model, "batch": cfg.data.batch_size, "ac": ac,
                                 "ops": ops or "auto",
                                 "step_ms": wall / 1e3, "rows": rows, "top": top}, args.out, device)
    parts = ", ".join(f"{r['category'].split(' (')[0]} {r['%step']:.0f}%" for r in rows if r["%step"] >= 0.5)
    print(f"SUMMARY profile {model} b{cfg.data.batch_size} ac={ac}{'' if ops is None else ' ops=' + ops}"
          f"{' (CPU smoke)' if args.smoke else ''}: "
          f"{wall / 1e3:.0f} ms: {parts or 'no events'}", flush=True)
    if not rows:
        sys.exit(1)


if __name__ == "__main__":
    main()
