"""The data rate a GPU needs, in CPU cores: context reads + multi-crop augmentation per tile, per core.

A GPU that trains at R tiles/s needs R contexts read (392 px, at the magnification mix of
data.mag_weights) and R x (n_global + n_local) crops cut per second. This script measures, on one
core and side by side:

1. reads: cuCIM (single and batched) against OpenSlide, random 392 px contexts at 40x/20x/10x/5x from
   a generated pyramidal slide (bench_slides.py);
2. augmentation: our DALI CPU graph, our torch reference and dinov2's torchvision/PIL chain cutting
   the same crops with the same settings (bench_pipeline.py);
3. the trainer's slide loader end to end (torch DataLoader path and DALI path) at 0, 1, 2 workers.

Then, per tile: ``cpu_s = sum_m w_m / reads_m + 1 / aug`` (w: data.mag_weights over the
magnifications; rates per CPU second), ``cores per GPU = R x cpu_s`` and ``x gpus_per_node`` per
node, for R = the cost model's predicted tiles/s of each config (benchmarks/cost_model.py: read from
its JSON in benchmarks/results/ when one is there, else run; ``--gpu-rates`` overrides). Those GPU
rates are predictions, not measurements. The end-to-end loader rows give the same figure from the
loader's own tiles per CPU second (reader processes and workers included).

The read and augmentation rows run pinned to one CPU (``--core``); the loader rows on every CPU this
process may use. Rates are per second of process CPU time (all threads; children read from /proc), which stays a
per-core figure on a shared, loaded machine; wall-clock rates are recorded beside them. The DALI GPU
path needs a GPU machine with DALI installed and is not measured here.

    python benchmarks/bench_data_rate.py [--reads 200] [--tiles 64] [--workers 0,1,2] [--core 1] [--out DIR]
    python benchmarks/bench_data_rate.py --gpu-rates vit_h14_virchow2=100,vit_g14_virchow2g=33
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, print_table, setup, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("configs/vit_h14_virchow2.yaml", "configs/vit_g14_virchow2g.yaml")
READ_BACKENDS = ("cucim", "cucim_batch", "openslide")


def _extra(p):
    p.add_argument("--reads", type=int, default=200, help="timed reads per backend and magnification")
    p.add_argument("--size", default="12288x9216", help="read-benchmark slide size WxH at 0.25 um/px")
    p.add_argument("--tiles", type=int, default=64, help="contexts per augmentation row")
    p.add_argument("--batch", type=int, default=16, help="DALI batch")
    p.add_argument("--batches", type=int, default=4, help="timed DALI batches")
    p.add_argument("--workers", default="0,1,2", help="loader worker counts to measure ('' = skip the loader rows)")
    p.add_argument("--loader-batch", type=int, default=8)
    p.add_argument("--loader-batches", type=int, default=8, help="timed loader batches per window")
    p.add_argument("--loader-windows", type=int, default=3, help="timed windows per worker count (best wall rate)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="configs whose predicted GPU rate is used")
    p.add_argument("--gpu-rates", default="", help="name=tiles_s,... instead of the cost model's predictions")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--core", type=int, default=None, help="pin the per-core rows (reads, augmentation) to this CPU "
                   "(default: the last one allowed); the loader rows run on every allowed CPU")
    p.add_argument("--cache", default="/tmp/virchow_fast_bench", help="folder for the generated slides")


# -- GPU rates -----------------------------------------------------------------------------------

def rate_from_cost_json(path: str | Path) -> float:
    """The predicted tiles/s per GPU in a cost_model.py JSON."""
    return float(json.loads(Path(path).read_text())["tiles_per_s"])


def predicted_rate(config: str, results: str | Path = RESULTS_DIR) -> dict:
    """{"name", "tiles_s", "source"} for a config: its newest one-GPU cost_model JSON under ``results``,
    else a fresh cost_model.py run; tiles_s None (with the reason) when neither works."""
    from virchow_fast.config import load_config

    name = load_config(str(ROOT / config)).name
    found = sorted(Path(results).glob(f"cost_model_{name}_b*_w1.json"), key=lambda p: p.stat().st_mtime)
    if found:
        return {"name": name, "tiles_s": rate_from_cost_json(found[-1]), "source": str(found[-1].relative_to(ROOT))
                if found[-1].is_relative_to(ROOT) else str(found[-1])}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cost.json"
        cmd = [sys.executable, str(ROOT / "benchmarks/cost_model.py"), "--config", str(ROOT / config), "--json",
               str(out)]
        run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if run.returncode != 0 or not out.exists():
            why = (run.stderr.strip().splitlines() or ["no output"])[-1][:200]
            return {"name": name, "tiles_s": None, "source": f"cost_model.py failed: {why}"}
        return {"name": name, "tiles_s": rate_from_cost_json(out),
                "source": f"python benchmarks/cost_model.py --config {config}"}


def gpu_rates(configs: list[str], override: str = "") -> list[dict]:
    """The GPU rates to size for: ``override`` ("name=tiles_s,...") or each config's predicted rate."""
    if not override:
        return [predicted_rate(c) for c in configs]
    out = []
    for item in (i for i in override.split(",") if i):
        name, _, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = -1.0
        if not name or not rate > 0:
            raise SystemExit(f"bench_data_rate: --gpu-rates {item!r}: expected name=tiles_per_s with tiles_per_s > 0")
        out.append({"name": name, "tiles_s": rate, "source": "--gpu-rates"})
    return out


# -- the arithmetic ------------------------------------------------------------------------------

def read_cpu_s_per_tile(read_rows: list[dict], backend: str, mags, weights) -> float | None:
    """CPU seconds to read one context with ``backend`` at the magnification mix (weights renormalised
    over the magnifications measured); None when the backend has no row."""
    rate = {r["mag"]: r["reads_per_cpu_s"] for r in read_rows if r["backend"] == backend}
    mix = [(w, rate[f"{m:g}x"]) for m, w in zip(mags, weights, strict=True) if w > 0 and f"{m:g}x" in rate]
    if not mix:
        return None
    total = sum(w for w, _ in mix)
    return sum(w / total / r for w, r in mix)


def cores_rows(read_rows: list[dict], aug_rows: list[dict], mags, weights, rates: list[dict],
               gpus_per_node: int = 8, backends=READ_BACKENDS) -> list[dict]:
    """One row per (read backend, augmentation pipeline): CPU ms per tile, tiles per core-second,
    cores per GPU and per node at each GPU rate."""
    rows = []
    for backend in backends:
        read_s = read_cpu_s_per_tile(read_rows, backend, mags, weights)
        if read_s is None:
            continue
        for a in aug_rows:
            if not a.get("tiles_s_per_cpu_s") or a.get("device", "cpu") != "cpu":
                continue
            cpu_s = read_s + 1.0 / a["tiles_s_per_cpu_s"]
            row = {"reads": backend, "augmentation": a["pipeline"], "read_ms": 1e3 * read_s,
                   "aug_ms": 1e3 / a["tiles_s_per_cpu_s"], "tiles_per_core_s": 1.0 / cpu_s,
                   "cores_per_100_tiles_s": 100 * cpu_s}
            for g in rates:
                if g["tiles_s"]:
                    row[f"cores_per_gpu {g['name']}"] = g["tiles_s"] * cpu_s
                    row[f"cores_per_node {g['name']}"] = g["tiles_s"] * cpu_s * gpus_per_node
            rows.append(row)
    return rows


def loader_cores_rows(loader_rows: list[dict], rates: list[dict], gpus_per_node: int = 8) -> list[dict]:
    """Cores per GPU from the end-to-end loader's tiles per CPU second."""
    out = []
    for r in loader_rows:
        row = {"loader": r["loader"], "num_workers": r["num_workers"], "tiles_per_core_s": r["tiles_s_per_cpu_s"],
               "cores_per_100_tiles_s": 100 / r["tiles_s_per_cpu_s"]}
        for g in rates:
            if g["tiles_s"]:
                row[f"cores_per_gpu {g['name']}"] = g["tiles_s"] / r["tiles_s_per_cpu_s"]
                row[f"cores_per_node {g['name']}"] = g["tiles_s"] / r["tiles_s_per_cpu_s"] * gpus_per_node
        out.append(row)
    return out


def main() -> None:
    args, device = setup("bench_data_rate", __doc__, _extra)
    import torch

    torch.set_num_threads(1)
    import bench_pipeline as bpipe
    import bench_slides as bslides

    from virchow_fast.config import CropConfig, DataConfig

    load0 = os.getloadavg()
    t_start = time.perf_counter()
    crops, data = CropConfig(), DataConfig()
    rates = gpu_rates(args.configs.split(","), args.gpu_rates)
    for g in rates:
        print(f"GPU rate {g['name']}: {g['tiles_s']} tiles/s (predicted; {g['source']})", flush=True)

    allowed = sorted(os.sched_getaffinity(0))
    core = args.core if args.core is not None else allowed[-1]
    if core not in allowed:
        raise SystemExit(f"bench_data_rate: --core {core}: this process may run on CPUs {allowed} only")
    os.sched_setaffinity(0, {core})  # threads started from here on (DALI's, cuCIM's) inherit it
    w, h = (int(v) for v in args.size.split("x"))
    read_rows = bslides.read_rows(bslides.bench_slide(args.cache, w, h), args.reads, crops.context_size,
                                  backends=READ_BACKENDS)
    print_table(read_rows)
    contexts = bpipe.load_contexts(args.cache, args.tiles, crops.context_size)
    aug_rows, skipped = bpipe.aug_rows(contexts, crops, args.batch, args.batches)
    print_table(aug_rows)
    os.sched_setaffinity(0, set(allowed))
    loader_rows = []
    workers = [int(v) for v in args.workers.split(",") if v != ""]
    if workers:
        slide, index = bpipe.pipeline_slide(args.cache, crops.context_size)
        loader_rows = bpipe.loader_rows(slide, index, args.loader_batch, args.loader_batches, workers,
                                       repeats=args.loader_windows)
        print_table(loader_rows)

    cores = cores_rows(read_rows, aug_rows, data.mags, data.mag_weights, rates, args.gpus_per_node)
    loader_cores = loader_cores_rows(loader_rows, rates, args.gpus_per_node)
    n_crops = crops.n_global + crops.n_local
    print("\nCPU cores needed (reads + augmentation, per core-second measured here; GPU rates are the cost "
          "model's predictions):")
    for g in rates:
        if g["tiles_s"]:
            print(f"  {g['name']}: {g['tiles_s']:.1f} tiles/s per GPU -> a node of {args.gpus_per_node} needs "
                  f"{g['tiles_s'] * args.gpus_per_node:.0f} contexts read and "
                  f"{g['tiles_s'] * args.gpus_per_node * n_crops:.0f} crops cut per second")
    print_table(cores)
    if loader_cores:
        print("\nend to end, the trainer's loader (all its processes' CPU time):")
        print_table(loader_cores)
    print(f"\n(this machine: {os.cpu_count()} cores; reads and augmentation pinned to CPU {core}, the loader on "
          f"CPUs {allowed}; load average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; the DALI "
          "GPU path is not measured here: no GPU with DALI)")
    write_json("bench_data_rate", {
        "context": crops.context_size, "crops": bpipe.crops_summary(crops), "crops_per_tile": n_crops,
        "mags": list(data.mags), "mag_weights": list(data.mag_weights), "gpus_per_node": args.gpus_per_node,
        "gpu_rates": rates, "gpu_rates_are": "predictions of benchmarks/cost_model.py (one H200), not measurements",
        "reads": args.reads, "read_rows": read_rows, "aug_rows": aug_rows, "loader_rows": loader_rows,
        "cores_rows": cores, "loader_cores_rows": loader_cores, "skipped": skipped,
        "not_measured": "DALI GPU path (no GPU with DALI on this machine)",
        "per_core_rows_on_cpu": core, "loader_rows_on_cpus": allowed, "cpu_count": os.cpu_count(),
        "loadavg_start": load0, "loadavg_end": os.getloadavg(), "seconds": time.perf_counter() - t_start,
        "versions": {**bslides.versions(), **bpipe.versions()}}, args.out, device)


if __name__ == "__main__":
    main()
