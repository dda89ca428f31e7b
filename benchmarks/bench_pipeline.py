"""Multi-crop tiles/s: the DALI graph vs the torch reference (data/multicrop.py), same contexts, same augs.

Contexts (392 px, read once from a generated slide at 40x/20x/10x through the tile index) are held
in memory, so the rows measure the augmentation (2 x 224 + 8 x 98 ECT crops, flips, rot90, colour
jitter, grayscale, solarise, normalise) and not the reads; one more row measures the whole slide
loader (reader process + DALI) end to end. CPU rows use one thread (per core); the DALI GPU row
runs where CUDA and DALI both exist. "per_cpu_s" rates divide by the process's CPU time
(time.process_time, all its threads), which stays meaningful on a shared, loaded machine where
wall-clock rates measure the neighbours too; both are recorded.

    python benchmarks/bench_pipeline.py [--tiles 64] [--batch 16] [--out DIR]
    taskset -c 1 python benchmarks/bench_pipeline.py     # one core: wall-clock rates are per core
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, setup, skip, write_json  # noqa: E402


def _extra(p):
    p.add_argument("--tiles", type=int, default=64, help="distinct contexts held in memory")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=6, help="timed DALI batches")
    p.add_argument("--cache", default="/tmp/virchow_fast_bench", help="folder for the generated slide")


def main() -> None:
    args, device = setup("bench_pipeline", __doc__, _extra)
    import torch

    torch.set_num_threads(1)
    from virchow_fast.config import CropConfig, DataConfig
    from virchow_fast.data import sampling as S
    from virchow_fast.data.index import IndexSettings, write_index
    from virchow_fast.data.multicrop import multicrop
    from virchow_fast.data.slides import Slide, resize
    from virchow_fast.data.testslides import make_slide

    cache = Path(args.cache)
    slide_path = cache / "pipeline_6144x4608.svs"
    if not slide_path.exists():
        make_slide(slide_path, 6144, 4608, 0.25, "full", seed=1)
    index_dir = cache / "pipeline_index"
    if not list(index_dir.glob("*.npz")):
        write_index(str(slide_path), index_dir, IndexSettings())
    table = S.TileTable.from_index(index_dir)
    slide = Slide(slide_path)
    rng = np.random.default_rng(0)
    rows_idx = rng.integers(0, len(table), args.tiles)
    contexts = []
    for r in rows_idx:
        _, x, y, level, read_px, out_px, _ = table.task(int(r))
        region = slide.read(x, y, level, read_px, read_px)
        contexts.append(region if read_px == out_px else resize(region, out_px))
    crops = CropConfig()
    results, skipped = [], []

    # torch reference, one thread
    n = len(contexts)
    for c in contexts[:4]:
        multicrop(c, np.random.default_rng(1), crops)
    t0, c0 = time.perf_counter(), time.process_time()
    for i, c in enumerate(contexts):
        multicrop(c, np.random.default_rng([2, i]), crops)
    ref = n / (time.process_time() - c0)
    results.append({"pipeline": "torch reference (multicrop.py)", "device": "cpu", "threads": 1,
                    "tiles_s_wall": n / (time.perf_counter() - t0), "tiles_s_per_cpu_s": ref})

    try:
        from virchow_fast.data.dali_pipeline import build_pipeline, feed_outputs, finish
    except ImportError as exc:
        build_pipeline = None
        skip(skipped, "dali", str(exc))

    def dali_rate(dev: str, threads: int) -> tuple[float, float]:
        state = {"i": 0}

        def feed():
            ctx, par = [], []
            for _ in range(args.batch):
                i = state["i"]
                state["i"] += 1
                ctx.append(contexts[i % n])
                par.append(np.stack(S.tile_params(np.random.default_rng([2, i]), crops)))
            return feed_outputs(ctx, par, [np.float32(20.0)] * args.batch, [np.int64(0)] * args.batch, crops)

        pipe = build_pipeline(feed, crops, args.batch, dev, num_threads=threads)
        n_crops = crops.n_global + crops.n_local

        def step():  # DALI graph + the torch finishing step (transpose, clamp, solarise, CHW), as the loader does
            out = pipe.run()
            if dev == "gpu":
                tensors = [torch.from_dlpack(o.as_tensor()) for o in out[:n_crops]]
            else:
                tensors = [torch.from_numpy(np.asarray(o.as_tensor())) for o in out[:n_crops]]
            flags = torch.from_numpy(np.asarray(out[n_crops].as_tensor()))
            return finish(tensors, flags, crops)

        for _ in range(2):
            step()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.batches):
            out = step()
        if dev == "gpu":
            torch.cuda.synchronize()
        del out
        n_tiles = args.batches * args.batch
        return n_tiles / (time.perf_counter() - t0), n_tiles / (time.process_time() - c0)

    if build_pipeline is not None:
        wall, per_cpu = dali_rate("cpu", 1)
        results.append({"pipeline": "DALI graph + torch finish", "device": "cpu", "threads": 1, "tiles_s_wall": wall,
                        "tiles_s_per_cpu_s": per_cpu})
        if torch.cuda.is_available():
            wall, _ = dali_rate("gpu", 2)
            results.append({"pipeline": "DALI graph + torch finish", "device": "gpu", "threads": 2, "tiles_s_wall": wall})
        else:
            skip(skipped, "DALI gpu", "no CUDA device here")

        # end to end: reader process + DALI CPU, as the trainer gets it
        from virchow_fast.data import build_loader

        cfg = DataConfig(source="slides", paths=[str(slide_path)], index_dir=str(index_dir), batch_size=args.batch,
                         num_workers=1, device="cpu", pipeline="dali")
        loader = build_loader(cfg, 14, seed=0)
        next(loader)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(loader)
        rate = args.batches * args.batch / (time.perf_counter() - t0)
        results.append({"pipeline": "slides -> 1 reader proc -> DALI -> Batch", "device": "cpu", "threads": 2,
                        "tiles_s_wall": rate})
    for r in results:
        r["vs_reference_per_cpu_s"] = (r["tiles_s_per_cpu_s"] / ref) if r.get("tiles_s_per_cpu_s") else None
    print_table(results)
    versions = {"torch": torch.__version__}
    try:
        import nvidia.dali as dali

        versions["dali"] = dali.__version__
    except ImportError:
        pass
    write_json("bench_pipeline", {"crops": "2x224 + 8x98 from 392, rot90, jitter 0.8, gray 0.2, solarize 0.2",
                                  "tiles_in_memory": n, "batch": args.batch, "rows": results,
                                  "cpu_affinity": sorted(__import__("os").sched_getaffinity(0)),
                                  "skipped": skipped, "versions": versions}, args.out, device)


if __name__ == "__main__":
    main()
