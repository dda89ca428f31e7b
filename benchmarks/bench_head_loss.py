"""DINO / iBOT head loss: fused Triton kernel (kernels/prototype_loss.py) against the eager reference
and torch.compile of it. Forward + backward (d student_z, d student_w), time and peak memory.

GPU: the ViT-H (K 65536, b 256) and ViT-G (K 131072, b 384 DINO / 256 iBOT) heads at 32 tiles per
GPU: DINO N = 320 student crops, M = 64 teacher crops, 576 pairs; iBOT N = M = 2458 masked tokens
(2 globals x half masked x mean ratio 0.3 x 256 patches). Goal: peak <= 1/10 of eager, time <= eager.

CPU (automatic without CUDA): the DINO and iBOT pairings with K, b and tiles scaled down (--cpu-k,
--cpu-b, --cpu-tiles; the interpreter needs minutes even so), each variant in its own process; peak memory =
the process's peak RSS above its
resident size after the inputs exist (VmHWM reset through /proc/self/clear_refs; glibc's mmap
threshold fixed at 64 KiB so freed buffers leave RSS), which counts every allocation (torch, numpy
in the Triton interpreter). Times there are the interpreter's: they
prove the script runs, nothing more.

    python benchmarks/bench_head_loss.py [--no-compile] [--shapes vit_h_dino,vit_g_ibot] [--out DIR]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, setup, skip, time_fn, try_run, write_json  # noqa: E402

SHAPES = {  # name: (kind, K, b)
    "vit_h_dino": ("dino", 65536, 256),
    "vit_h_ibot": ("ibot", 65536, 256),
    "vit_g_dino": ("dino", 131072, 384),
    "vit_g_ibot": ("ibot", 131072, 256),
}
T_S, T_T = 0.1, 0.04


def make_inputs(kind: str, k: int, b: int, tiles: int, device, seed: int = 0):
    """Features, prototypes and the pairing the losses build (see tests/kernels/test_prototype_loss.py)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device)

    if kind == "dino":
        n_global, n_crops = 2, 10
        n, m = n_crops * tiles, n_global * tiles
        pairs = [(c * tiles + i, gl * tiles + i) for gl in range(n_global) for c in range(n_crops) if c != gl
                 for i in range(tiles)]
        s_idx, t_idx = (torch.tensor(v, device=device) for v in zip(*pairs, strict=True))
        weight = torch.full((len(pairs),), 1.0 / len(pairs), device=device)
    else:
        n = m = round(tiles * 2 * 0.5 * 0.3 * 256)
        s_idx = t_idx = torch.arange(n, device=device)
        weight = torch.full((n,), 1.0 / n, device=device)
    sz, sw = unit(n, b).requires_grad_(), unit(k, b).requires_grad_()
    return dict(sz=sz, sw=sw, tz=unit(m, b), tw=unit(k, b), s_idx=s_idx, t_idx=t_idx, weight=weight, n=n, m=m)


def loss_fn(variant: str):
    import torch

    from virchow_fast.ops import reference

    if variant == "eager":
        return reference.prototype_loss
    if variant == "compile":
        return torch.compile(reference.prototype_loss)
    if variant == "fused":
        from virchow_fast.kernels.prototype_loss import prototype_loss

        return prototype_loss
    raise ValueError(variant)


def make_step(fn, x):
    def step():
        x["sz"].grad = x["sw"].grad = None
        loss, _ = fn(x["sz"], x["sw"], x["tz"], x["tw"], x["s_idx"], x["t_idx"], x["weight"], T_S, T_T, "sinkhorn")
        loss.backward()
        return loss.detach()
    return step


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

def bench_gpu(args, device, shapes):
    import torch

    rows, skipped = [], []
    for name in shapes:
        kind, k, b = SHAPES[name]
        x = make_inputs(kind, k, b, 32, device)
        eager_loss = eager_ms = eager_peak = None
        for variant in ["eager", "compile", "fused"]:
            if variant == "compile" and not args.compile:
                skip(skipped, f"{name} compile", "--no-compile")
                continue
            fn = try_run(skipped, f"{name} {variant} build", lambda variant=variant: loss_fn(variant))
            if fn is None:
                continue
            step = make_step(fn, x)
            loss = try_run(skipped, f"{name} {variant}", step)  # also compiles / autotunes
            if loss is None:
                continue
            x["sz"].grad = x["sw"].grad = None  # the peak then includes this step's gradients
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            t = time_fn(step, device, args.iters, args.warmup)
            if variant == "eager":
                eager_loss, eager_ms, eager_peak = loss.item(), t["ms"], peak
            rows.append(dict(shape=name, K=k, b=b, N=x["n"], M=x["m"], variant=variant, ms=t["ms"],
                             peak_MiB=peak, x_eager_time=eager_ms / t["ms"] if eager_ms else None,
                             mem_vs_eager=peak / eager_peak if eager_peak else None,
                             rel_err=abs(loss.item() - eager_loss) / abs(eager_loss) if eager_loss else None))
            print_table(rows[-1:])
        del x
        torch.cuda.empty_cache()
    return rows, skipped


# ---------------------------------------------------------------------------------------------
# CPU: one process per variant, peak RSS
# ---------------------------------------------------------------------------------------------

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_worker(spec: dict) -> dict:
    """Runs in a child process: inputs, one warm-up step, then one measured step."""
    import time

    import torch

    fn = loss_fn(spec["variant"])
    make_step(fn, make_inputs(spec["kind"], 256, spec["b"], 1, "cpu"))()  # imports, first calls: small
    x = make_inputs(spec["kind"], spec["k"], spec["b"], spec["tiles"], "cpu")
    step = make_step(fn, x)
    rss = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    loss = step()
    ms = (time.perf_counter() - t0) * 1e3
    peak_mib = (_status_kib("VmHWM") - rss) / 1024
    return dict(loss=loss.item(), ms=ms, peak_MiB=peak_mib, torch_threads=torch.get_num_threads())


def bench_cpu(args, shapes):
    rows, skipped = [], []
    for name in shapes:
        kind, k, b = SHAPES[name][0], args.cpu_k, args.cpu_b
        eager = None
        for variant in ["eager"] + (["compile"] if args.compile else []) + ["fused"]:
            spec = dict(kind=kind, k=k, b=b, tiles=args.cpu_tiles, variant=variant)
            # a fixed mmap threshold: glibc then maps every buffer >= 64 KiB on its own and unmaps it on
            # free, so RSS follows the live large buffers instead of a heap that only grows
            env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
            res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                 capture_output=True, text=True)
            if res.returncode != 0:
                skip(skipped, f"{name} {variant}", res.stderr.strip().splitlines()[-1][:200])
                continue
            out = json.loads(res.stdout.strip().splitlines()[-1])
            if variant == "eager":
                eager = out
            n = args.cpu_tiles * 10 if kind == "dino" else round(args.cpu_tiles * 76.8)
            m = args.cpu_tiles * 2 if kind == "dino" else n
            rows.append(dict(shape=name, K=k, b=b, N=n, M=m, variant=variant, ms_interp=out["ms"],
                             peak_MiB=out["peak_MiB"],
                             nk_fp32_MiB=n * k * 4 / 2**20,  # one [N, K] fp32 buffer, for scale
                             mem_vs_eager=out["peak_MiB"] / eager["peak_MiB"] if eager else None,
                             rel_err=abs(out["loss"] - eager["loss"]) / abs(eager["loss"]) if eager else None))
            print_table(rows[-1:])
    return rows, skipped


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        print(json.dumps(cpu_worker(json.loads(sys.argv[2]))))
        return

    def extra(p):
        p.add_argument("--shapes", default=None, help="comma-separated subset of " + ", ".join(SHAPES)
                       + " (default: all on a GPU, vit_h_dino,vit_h_ibot on the CPU)")
        p.add_argument("--cpu-k", type=int, default=4096, help="prototypes in the CPU memory run")
        p.add_argument("--cpu-b", type=int, default=64, help="bottleneck width in the CPU memory run")
        p.add_argument("--cpu-tiles", type=int, default=8, help="tiles per rank in the CPU memory run")

    args, device = setup("bench_head_loss", __doc__, extra)
    default = ",".join(SHAPES) if device.type == "cuda" else "vit_h_dino,vit_h_ibot"
    shapes = [s for s in (args.shapes or default).split(",") if s]
    if device.type == "cuda":
        rows, skipped = bench_gpu(args, device, shapes)
        mode = "gpu"
    else:
        rows, skipped = bench_cpu(args, shapes)
        mode = (f"cpu peak RSS, K={args.cpu_k}, b={args.cpu_b}, tiles={args.cpu_tiles} "
                "(Triton interpreter: times are not speeds)")
    print()
    print_table(rows)
    write_json("bench_head_loss", {"mode": mode, "rows": rows, "skipped": skipped}, args.out, device)


if __name__ == "__main__":
    main()
