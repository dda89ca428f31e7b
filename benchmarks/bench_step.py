"""The trainer's own step on one GPU: tiles/s, MFU and peak memory, exactly as `virchow-fast train` runs it.

The model, optimizer and losses come from the trainer's ``build()`` and each step is the trainer's
own step (see ``trainer_step``): so a one-GPU run here takes whatever path the trainer takes
(``train/parallelize.py`` decides sharding and precision for one process), with the shipped
config (configs/vit_h14_virchow2.yaml, configs/vit_g14_virchow2g.yaml) and only these overrides:
batch size, activation checkpointing, ``data.source=synthetic`` (no slides on a benchmark box).

Two data modes per activation-checkpointing mode:
- ``memory``: one batch cut by the trainer's own loader (H&E-like synthetic tiles, multi-crop,
  iBOT masks), put on the device once and fed to every step: data loading excluded;
- ``loader``: the trainer's loader in its worker processes (``data.num_workers``) feeding each
  step through the loop's batch staging, as in a run: tiles/s including the wait for data; the
  wait = loader step time - memory step time, beside the host's time inside the loader. Slides need
  cuCIM / OpenSlide, which a benchmark box may lack, so the tiles are the synthetic source's
  (slide decoding excluded; the multi-crop, collation and host-to-device copy included).

MFU = model FLOPs (model/info.py: student 3x forward, teacher 1x forward, no recompute) per second
against the dense bf16 datasheet peak (989.4 TFLOP/s for H100/H200, or ``--peak-tflops``) and,
when benchmarks/bench_ceilings.py has run (``--ceilings``, default $OUT/ceilings.json), against the
bf16 GEMM rate measured at this model's own GEMM shapes.

    python3 benchmarks/bench_step.py                                   # GPU: ViT-H/14, 32 tiles, AC full + off
    python3 benchmarks/bench_step.py --model vit_g14 --ac full --data memory
    python3 benchmarks/bench_step.py --cpu-smoke                       # tiny config (automatic without CUDA)

Last line: ``SUMMARY step <model> ...`` (read by gpu_check.sh).
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, setup, skip, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"vit_h14": "configs/vit_h14_virchow2.yaml", "vit_g14": "configs/vit_g14_virchow2g.yaml",
           "tiny": "configs/debug.yaml"}
# The CPU smoke model: the debug config shrunk so a step takes well under a second on one core.
TINY = ["model.embed_dim=48", "model.depth=2", "model.num_heads=2", "model.mlp_hidden=64", "model.img_size=42",
        "heads.dino_prototypes=256", "heads.ibot_prototypes=256", "heads.hidden_dim=64", "heads.bottleneck_dim=32",
        "heads.ibot_bottleneck_dim=32", "data.crops.global_size=42", "data.crops.local_size=14",
        "data.crops.context_size=48", "data.masks.min_block_patches=1", "train.threads=1"]


def trainer_config(model: str, device_type: str, batch: int | None = None, ac: str | None = None,
                   ops: str | None = None, num_workers: int | None = None, extra: tuple[str, ...] = ()):
    """The shipped config of ``model`` with only the benchmark's overrides (see the module doc)."""
    from virchow_fast.config import load_config

    sets = list(TINY) if model == "tiny" else []
    sets += ["data.source=synthetic", "data.paths=[]", f"train.device={device_type}"]
    if batch is not None:
        sets.append(f"data.batch_size={batch}")
    if ac is not None:
        mode, every = ("every_k", int(ac[len("every_k"):])) if ac.startswith("every_k") else (ac, 2)
        sets += [f"parallel.activation_checkpointing={mode}", f"parallel.ac_every={every}"]
    if ops is not None:
        from virchow_fast.ops import OPS

        sets += [f"ops.{op}={ops}" for op in OPS]
    if num_workers is not None:
        sets.append(f"data.num_workers={num_workers}")
    return load_config(ROOT / CONFIGS[model], sets + list(extra))


def trainer_step(cfg, info, student, teacher, optimizer, loss_fn):
    """``step(batch, step_index, prefetch=None) -> dict`` of floats: the trainer's own step on a device batch.

    That is ``train.step.train_step``, the loop's whole per-step body (schedules, losses, backward,
    clipping, the one statistics read, optimizer step and EMA), with the loop's schedules.
    """
    from virchow_fast.config import derive
    from virchow_fast.train.schedules import build_schedules
    from virchow_fast.train.step import Trainee, train_step

    derived = derive(cfg, info.world_size)
    sched = build_schedules(cfg, derived.peak_lr, derived.total_steps)
    trainee = Trainee(cfg=cfg, info=info, student=student, teacher=teacher, optimizer=optimizer, loss_fn=loss_fn)

    def step(batch, i: int, prefetch=None) -> dict:
        res = train_step(trainee, batch, i, sched, stop_pending=False, prefetch=prefetch)
        return {**res.terms, "grad_norm": res.grad_norm}

    return step


class Trainer:
    """The trainer's objects for one config, built once; ``close()`` frees the device."""

    def __init__(self, cfg):
        import torch

        from virchow_fast.train.distributed import init_distributed
        from virchow_fast.train.loop import build
        from virchow_fast.train.parallelize import resolve_activation_checkpointing

        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.cfg = cfg
        self.info = init_distributed(cfg)
        self.device = self.info.device
        # activation_checkpointing: auto resolved once, as the trainer does; rows name the policy it picked
        self.parallel = resolve_activation_checkpointing(cfg, self.info)
        self.student, self.teacher, self.optimizer, self.loss_fn = build(cfg, self.info, self.parallel)
        self.student.train()
        self.teacher.eval()
        self.step = trainer_step(cfg, self.info, self.student, self.teacher, self.optimizer, self.loss_fn)

    def loader(self, num_workers: int | None = None):
        """The trainer's own loader (``virchow_fast.data.build_loader``) for this config."""
        import dataclasses

        from virchow_fast.data import build_loader

        data = self.cfg.data if num_workers is None else dataclasses.replace(self.cfg.data, num_workers=num_workers)
        return build_loader(data, self.cfg.model.patch_size, self.info.rank, self.info.world_size,
                            self.cfg.train.seed)

    def batch_in_memory(self):
        """One batch from the trainer's loader (built in this process), on the device."""
        return next(self.loader(num_workers=0)).pin_memory().to(self.device) if self.device.type == "cuda" \
            else next(self.loader(num_workers=0))

    def close(self) -> None:
        import torch

        from virchow_fast.train.distributed import shutdown_distributed

        self.student = self.teacher = self.optimizer = self.loss_fn = self.step = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        shutdown_distributed()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_memory(tr: Trainer, iters: int, warmup: int) -> dict:
    """Steps on one batch held on the device: per-step ms (CUDA events), peak memory."""
    import statistics

    import torch

    batch = tr.batch_in_memory()
    for i in range(warmup):
        last = tr.step(batch, i)
    _sync(tr.device)
    if tr.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(tr.device)
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        if tr.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            last = tr.step(batch, warmup + i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            last = tr.step(batch, warmup + i)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "loss": last["loss"], **_memory(tr.device)}


def run_loader(tr: Trainer, iters: int, warmup: int) -> dict:
    """Steps fed as the loop feeds them (its BatchStager: the next batch fetched, pinned and copied
    while this step runs): wall ms per step, and the host's time in the loader (``next`` plus the
    in-step prefetch), which is the data wait whenever it exceeds what the device has queued."""
    import statistics

    import torch

    if tr.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(tr.device)
    from virchow_fast.train.staging import BatchStager

    loader = tr.loader()
    stager = BatchStager(loader, tr.device)
    fetch_s = [0.0]

    def timed(fn):
        def run():
            t = time.perf_counter()
            out = fn()
            fetch_s[0] += time.perf_counter() - t
            return out
        return run

    get, prefetch = timed(stager.next), timed(stager.prefetch)
    walls, waits = [], []
    _sync(tr.device)
    t_prev = time.perf_counter()
    for i in range(warmup + iters):
        fetch_s[0] = 0.0
        batch = get()
        last = tr.step(batch, i, prefetch)
        _sync(tr.device)
        t = time.perf_counter()
        if i >= warmup:
            walls.append((t - t_prev) * 1e3)
            waits.append(fetch_s[0] * 1e3)
        t_prev = t
    del stager, loader
    return {"ms": statistics.median(walls), "ms_min": min(walls), "host_fetch_ms": statistics.median(waits),
            "host_fetch_max_ms": max(waits), "loss": last["loss"], **_memory(tr.device)}


def _memory(device) -> dict:
    import torch

    if device.type != "cuda":
        return {"peak_mem_gib": None}
    return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2 ** 30}


def gemm_rate(path: str | None, model: str) -> float | None:
    """The measured bf16 GEMM rate (TFLOP/s) at ``model``'s GEMM shapes from bench_ceilings' JSON."""
    if not path or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())["gemm_rate_tflops"].get(model)
    except (KeyError, ValueError, AttributeError):
        return None


def rates(cfg, device, ms: float, peak_tflops: float, gemm_tflops: float | None) -> dict:
    """tiles/s, MFU vs the datasheet peak (and HFU), MFU vs the measured GEMM rate."""
    from virchow_fast.train.metrics import Throughput, flops_per_tile_step

    thr = Throughput(cfg, 1, device)
    if peak_tflops > 0:
        thr.peak = peak_tflops * 1e12
    out = thr(ms / 1e3)
    model_flops, _ = flops_per_tile_step(cfg)
    out["model_tflops_s"] = out["tiles_per_s"] * model_flops / 1e12
    out["mfu_vs_gemm"] = out["model_tflops_s"] / gemm_tflops if gemm_tflops else None
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    def extra(p):
        p.add_argument("--model", default=None, help="vit_h14 | vit_g14 | tiny (default vit_h14; tiny on CPU)")
        p.add_argument("--batch", type=int, default=None, help="tiles per GPU (default: the config's)")
        p.add_argument("--ac", default=None, help="comma list of off, selective, full, every_k2, auto (default "
                                                    "full,off; vit_g14: full; auto: the trainer's choice, named "
                                                    "in the rows)")
        p.add_argument("--data", default="memory,loader", help="comma list of memory, loader")
        p.add_argument("--ops", default=None, help="force every op to one backend (torch | triton); default auto")
        p.add_argument("--ceilings", default=None, help="bench_ceilings JSON (default $OUT/ceilings.json)")
        p.add_argument("--peak-tflops", type=float, default=0.0, help="datasheet peak for MFU (0 = detect)")

    args, device = setup("bench_step", __doc__, extra=extra)
    import torch

    model = args.model or ("tiny" if args.smoke else "vit_h14")
    if args.smoke and model != "tiny":
        print(f"CPU SMOKE MODE: {model} is not run on a CPU; the tiny debug config instead", flush=True)
        model = "tiny"
    acs = (args.ac or ("full" if model == "vit_g14" else "full,off")).split(",")  # the shipped mode first
    modes = args.data.split(",")
    iters = args.iters if "--iters" in sys.argv else (2 if args.smoke else 6)
    warmup = args.warmup if "--warmup" in sys.argv else (1 if args.smoke else 2)
    ceilings = args.ceilings or os.path.join(args.out, "ceilings.json")
    gemm = gemm_rate(ceilings, model)
    if gemm is None and not args.smoke:
        print(f"no measured GEMM rate for {model} in {ceilings}: MFU vs GEMM left empty", flush=True)
    if "loader" in modes:
        print("loader mode: data.source=synthetic, the trainer's TileLoader (multi-crop, masks, collation in "
              "data.num_workers processes, pinned staging); slide reads excluded: they need cuCIM / OpenSlide, "
              "which a benchmark box may lack", flush=True)
    rows, skipped, path = [], [], None

    def measure(ac: str, ops: str | None) -> str:
        """Rows for one checkpointing mode; returns "ok", "oom" or "error"."""
        nonlocal path
        cfg = trainer_config(model, device.type, args.batch, ac, ops, num_workers=1 if args.smoke else None)
        label = ops or "auto"
        print(f"== {model}: batch {cfg.data.batch_size}, activation checkpointing {ac}, ops {label}, "
              f"precision {cfg.parallel.mixed_precision}, fsdp {cfg.parallel.fsdp}", flush=True)
        tr = None
        try:
            tr = Trainer(cfg)
            if ac == "auto":
                ac = f"auto->{tr.parallel.activation_checkpointing}"
                print(f"  activation checkpointing auto -> {tr.parallel.activation_checkpointing}", flush=True)
            for mode in modes:
                row = {"model": model, "batch": cfg.data.batch_size, "ac": ac, "ops": label, "data": mode}
                if mode == "loader":
                    row["workers"] = cfg.data.num_workers
                try:
                    res = (run_loader if mode == "loader" else run_memory)(tr, iters, warmup)
                except torch.OutOfMemoryError:
                    row["status"] = "OOM"
                    rows.append(row)
                    print(f"  {mode}: out of memory", flush=True)
                    return "oom"
                row.update(res)
                row.update(rates(cfg, device, res["ms"], args.peak_tflops, gemm))
                mem = [r for r in rows if r["ac"] == ac and r.get("ops") == label and r.get("data") == "memory"
                       and r.get("status") == "ok"]
                if mode == "loader" and mem:  # what feeding from the loader costs the step
                    row["data_wait_ms"] = max(0.0, row["ms"] - mem[0]["ms"])
                row["status"] = "ok"
                rows.append(row)
                print(f"  {mode}: {row['ms']:.1f} ms/step, {row['tiles_per_s']:.2f} tiles/s, MFU "
                      f"{_pct(row['mfu'])} (vs GEMM {_pct(row['mfu_vs_gemm'])}), peak {row['peak_mem_gib']} GiB"
                      + (f", host in loader {row['host_fetch_ms']:.1f} ms/step, data wait "
                         f"{row.get('data_wait_ms', float('nan')):.1f} ms/step" if mode == "loader" else ""),
                      flush=True)
                path = write_json("bench_step", _payload(args, rows, skipped), args.out, device, path)
                gc.collect()
            return "ok"
        except torch.OutOfMemoryError:
            rows.append({"model": model, "batch": cfg.data.batch_size, "ac": ac, "ops": label, "status": "OOM (build)"})
            print("  out of memory while building", flush=True)
            return "oom"
        except Exception as exc:  # noqa: BLE001 (one failing mode must not hide the others)
            traceback.print_exc()  # the log is where a first GPU run's failure gets fixed from
            skip(skipped, f"{model} ac={ac} ops={label}", f"{type(exc).__name__}: {exc}"[:300])
            return "error"
        finally:
            if tr is not None:
                tr.close()

    for ac in acs:
        if measure(ac, args.ops) == "error" and args.ops is None:
            # a kernel that fails on its first GPU must not cost the headline: the reference path instead
            print(f"  ac={ac}: retrying with every op on torch (the reference backends)", flush=True)
            measure(ac, "torch")
    print_table(rows, ["model", "batch", "ac", "ops", "data", "status", "ms", "tiles_per_s", "mfu", "mfu_vs_gemm",
                       "hfu", "peak_mem_gib", "host_fetch_ms", "data_wait_ms"])
    write_json("bench_step", _payload(args, rows, skipped), args.out, device, path)
    if args.smoke:
        print("CPU SMOKE MODE: tiny config; no GPU numbers were measured", flush=True)
    print(summary(model, rows, skipped, args.smoke), flush=True)
    if not any(r.get("status") == "ok" for r in rows):
        sys.exit(1)


def _payload(args, rows, skipped) -> dict:
    return {"smoke": args.smoke, "rows": rows, "skipped": skipped}


def summary(model: str, rows: list, skipped: list, smoke: bool) -> str:
    parts = []
    for r in rows:
        if r.get("status") != "ok":
            parts.append(f"ac={r['ac']} {r.get('data', '')} {r.get('status')}")
            continue
        ops = "" if r.get("ops", "auto") == "auto" else f" ops={r['ops']}"
        text = f"ac={r['ac']}{ops} {r['data']}: {r['tiles_per_s']:.1f} tiles/s"
        if r.get("mfu") is not None:
            text += f" MFU {_pct(r['mfu'])} (vs GEMM {_pct(r['mfu_vs_gemm'])})"
        if r.get("peak_mem_gib") is not None:
            text += f" peak {r['peak_mem_gib']:.1f} GiB"
        if r["data"] == "loader":
            text += f" data wait {r.get('data_wait_ms', float('nan')):.0f} ms/step (host in loader " \
                    f"{r['host_fetch_ms']:.0f} ms)"
        parts.append(text)
    parts += [f"FAILED {s['what']}: {s['reason'][:120]}" for s in skipped]
    batch = rows[0]["batch"] if rows else "?"
    return f"SUMMARY step {model} b{batch}{' (CPU smoke)' if smoke else ''}: " + ("; ".join(parts) or "no rows")


if __name__ == "__main__":
    main()
