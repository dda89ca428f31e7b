"""One full training step on one GPU: tiles/s, MFU and peak memory for ViT-H/14 and ViT-G/14.

The step is the trainer's own (virchow_fast.train.loop.build + the loop's step): a synthetic batch
already on the device (2 x 224 + 8 x 98 crops per tile, iBOT masks), teacher forward on the
global crops, student forward on all crops packed, DINO + iBOT + KDE losses, backward, gradient
clipping, AdamW, EMA of the teacher. Swept: model, kernels (ops backends ``auto`` = ours where
available vs ``torch`` = the reference everywhere), activation checkpointing (off / full / every
2nd block), batch size (doubling until out of memory). bf16 compute with fp32 master weights:
``--fsdp on`` (default) runs FSDP2 on a one-rank group, the same code and numerics as a multi-GPU
run without the communication; ``--fsdp off`` uses the single-process autocast path.

MFU = model FLOPs (model/info.py: student 3x forward, teacher 1x forward, no recompute) per second
against the dense bf16 peak (``--peak-tflops``, else looked up from the device name: 989.4 for
H100/H200); HFU adds the recompute of checkpointed blocks.

    python benchmarks/bench_step.py                          # GPU: ViT-H/14 and ViT-G/14
    python benchmarks/bench_step.py --models vit_h14 --ac full --batch 32,64
    python benchmarks/bench_step.py --cpu-smoke              # tiny config on the CPU (automatic without CUDA)
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path

from _common import print_table, setup, skip, time_fn, write_json

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"vit_h14": "configs/vit_h14_virchow2.yaml", "vit_g14": "configs/vit_g14_virchow2g.yaml"}
TINY = ["model.embed_dim=48", "model.depth=2", "model.num_heads=2", "model.mlp_hidden=64", "model.img_size=42",
        "heads.dino_prototypes=256", "heads.ibot_prototypes=256", "heads.hidden_dim=64", "heads.bottleneck_dim=32",
        "heads.ibot_bottleneck_dim=32", "data.crops.global_size=42", "data.crops.local_size=14",
        "data.crops.context_size=48", "data.masks.min_block_patches=1"]


def _args(parser):
    parser.add_argument("--models", default=None, help="comma list of vit_h14, vit_g14 (default both; tiny on CPU)")
    parser.add_argument("--ops", default="auto,torch", help="kernel backends to compare: auto (ours), torch")
    parser.add_argument("--ac", default=None, help="comma list of off, full, every_k2 (default per model)")
    parser.add_argument("--batch", default=None, help="comma list of per-GPU batch sizes (default: doubling until OOM)")
    parser.add_argument("--max-batch", type=int, default=128, help="largest batch of the doubling sweep")
    parser.add_argument("--fsdp", default="on", choices=("on", "off"), help="FSDP2 on one rank, or autocast")
    parser.add_argument("--compile-blocks", action="store_true", help="parallel.compile: torch.compile each block")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (0 = detect)")


args, device = setup("bench_step", __doc__, extra=_args)

import torch  # noqa: E402

from virchow_fast.config import load_config  # noqa: E402
from virchow_fast.data.loader import Batch  # noqa: E402
from virchow_fast.data.masks import collate_masks  # noqa: E402
from virchow_fast.model.ssl import ema_update  # noqa: E402
from virchow_fast.train.distributed import init_distributed, shutdown_distributed  # noqa: E402
from virchow_fast.train.loop import build, clip_grad_norm  # noqa: E402
from virchow_fast.train.metrics import Throughput  # noqa: E402
from virchow_fast.train.optim import apply_schedules  # noqa: E402

if args.smoke:
    print("CPU SMOKE MODE: a tiny config (not ViT-H/G), fp32, no MFU; these numbers only prove the script runs",
          flush=True)
AC_DEFAULT = {"tiny": "off,full", "vit_h14": "off,full,every_k2", "vit_g14": "full,every_k2"}


def config(model: str, ops: str, ac: str, batch: int):
    base = "configs/debug.yaml" if model == "tiny" else CONFIGS[model]
    mode, every = (ac, 2) if not ac.startswith("every_k") else ("every_k", int(ac[len("every_k"):]))
    sets = TINY if model == "tiny" else []
    sets = sets + [f"data.batch_size={batch}", f"parallel.activation_checkpointing={mode}",
                   f"parallel.ac_every={every}", f"parallel.fsdp='{args.fsdp}'",
                   f"parallel.mixed_precision={'fp32' if args.smoke else 'bf16'}",
                   f"parallel.compile={str(args.compile_blocks).lower()}", f"train.device={device.type}", f"train.peak_tflops={args.peak_tflops}", "data.source=synthetic",
                   "data.paths=[]", "model.drop_path=0.4" if model != "tiny" else "model.drop_path=0.0"]
    sets += [f"ops.{op}={ops}" for op in ("attention", "layer_norm", "swiglu", "head_loss", "centering")]
    return load_config(ROOT / base, sets)


def synthetic_batch(cfg) -> Batch:
    c, b = cfg.data.crops, cfg.data.batch_size
    gen = torch.Generator().manual_seed(0)
    grid = c.global_size // cfg.model.patch_size
    mk = cfg.data.masks
    import numpy as np

    masks = collate_masks(np.random.default_rng(0), c.n_global * b, grid, mk.mask_probability, mk.ratio_min,
                          mk.ratio_max, mk.min_block_patches, mk.aspect_min)
    return Batch(torch.randn(c.n_global * b, 3, c.global_size, c.global_size, generator=gen),
                 torch.randn(c.n_local * b, 3, c.local_size, c.local_size, generator=gen),
                 torch.from_numpy(masks), torch.full((b,), 20.0), 0).to(device)


def measure(cfg) -> dict:
    info = init_distributed(cfg)
    student = teacher = optimizer = loss_fn = batch = None
    try:
        student, teacher, optimizer, loss_fn = build(cfg, info)
        params = [p for p in student.parameters() if p.requires_grad]
        apply_schedules(optimizer, 1e-5, 0.04, 1e-5)
        batch = synthetic_batch(cfg)
        student.train()
        teacher.eval()

        def step():
            out = loss_fn(student, teacher, batch, 0.07, info.reducer, info.world_size)
            out["loss"].backward()
            clip_grad_norm(params, cfg.optim.clip_grad)
            optimizer.step()
            ema_update(teacher, student, 0.999)
            optimizer.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time_fn(step, device, iters=ITERS, warmup=min(args.warmup, 2))
        rate = Throughput(cfg, 1, device)(t["ms"] / 1e3)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        return {"ms": t["ms"], "tiles_per_s": rate["tiles_per_s"], "mfu": rate["mfu"], "hfu": rate["hfu"],
                "peak_mem_gib": peak}
    finally:
        del student, teacher, optimizer, loss_fn, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        shutdown_distributed()


def plan() -> list[tuple[str, str, str, list[int] | None]]:
    """(model, ops, ac, batches or None = doubling until OOM). Explicit flags give the full cross product;
    the GPU default is a ~3-minute selection: every mode once, the batch sweep where it matters."""
    if args.smoke or args.models or args.ac or args.batch or args.ops != "auto,torch":
        models = (args.models or ("tiny" if args.smoke else "vit_h14,vit_g14")).split(",")
        batches = [int(b) for b in args.batch.split(",")] if args.batch else ([2, 4] if args.smoke else None)
        return [(m, o, a, batches) for m in models for a in (args.ac or AC_DEFAULT[m]).split(",")
                for o in args.ops.split(",")]
    return [("vit_h14", "auto", "off", None), ("vit_h14", "auto", "full", None), ("vit_h14", "auto", "every_k2", [64]),
            ("vit_h14", "torch", "full", [64]),
            ("vit_g14", "auto", "full", None), ("vit_g14", "auto", "every_k2", [32]), ("vit_g14", "torch", "full", [32])]


def payload(rows: list, skipped: list) -> dict:
    return {"smoke": args.smoke, "fsdp": args.fsdp, "compile_blocks": args.compile_blocks, "iters": ITERS,
            "rows": rows, "skipped": skipped}


ITERS = args.iters if "--iters" in sys.argv else (2 if args.smoke else 5)
rows, skipped, path = [], [], None
for model, ops, ac, batches in plan():
    for b in batches or [16 * 2 ** i for i in range(8) if 16 * 2 ** i <= args.max_batch]:
        cfg = config(model, ops, ac, b)
        row = {"model": model, "ops": ops, "ac": ac, "batch": b}
        try:
            row.update(measure(cfg))
        except torch.OutOfMemoryError:
            row["status"] = "OOM"
            rows.append(row)
            print(f"  {model} ops={ops} ac={ac} batch={b}: out of memory", flush=True)
            break
        except Exception as exc:  # noqa: BLE001 (record and go on: one failing mode must not hide the rest)
            skip(skipped, f"{model} ops={ops} ac={ac} batch={b}", f"{type(exc).__name__}: {exc}"[:300])
            break
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["status"] = "ok"
        rows.append(row)
        print(f"  {row}", flush=True)
        path = write_json("bench_step", payload(rows, skipped), args.out, device, path)

print_table(rows, ["model", "ops", "ac", "batch", "status", "ms", "tiles_per_s", "mfu", "hfu", "peak_mem_gib"])
write_json("bench_step", payload(rows, skipped), args.out, device, path)
if args.smoke:
    print("CPU SMOKE MODE: tiny config; no GPU numbers were measured", flush=True)
