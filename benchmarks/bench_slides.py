"""Random context reads per second per magnification: cuCIM vs OpenSlide (and tiffslide), one thread each.

A generated pyramidal JPEG slide (Aperio-style, 0.25 um/px, levels at downsample 2) is written once
to a cache folder; each backend then reads the same seeded random ``--px`` squares (392: the
training context) at the level that serves each magnification (40x/20x/10x/5x = level 0/1/2/3).
One untimed pass over all positions warms the page cache, so the rows measure decoding, not the
disk. ``cucim_batch``: the same regions through cuCIM's batch API, ``--batch`` locations per
``read_region`` call with one cuCIM thread (what a reader worker does with a step's tiles of one
slide and level, virchow_fast/data/workers.py), copied out of cuCIM's buffers as the worker does.

Each row has two rates: ``reads_s_wall`` (wall clock) and ``reads_per_cpu_s`` (reads per second of
this process's CPU time, all threads: time.process_time). On a shared, loaded machine the second
is the per-core figure; pinned to an idle core the two agree.

    python benchmarks/bench_slides.py [--size 12288x9216] [--reads 200] [--px 392] [--batch 32] [--out DIR]
    taskset -c 1 python benchmarks/bench_slides.py      # pinned to one core

At 10x / 5x the levels are small enough for OpenSlide's tile cache (32 MB default) to hold much of
them, so random reads there partly measure its cache; at 40x / 20x they do not.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, setup, write_json  # noqa: E402

MAGS = ((40, 0.25), (20, 0.5), (10, 1.0), (5, 2.0))
BACKENDS = ("cucim", "cucim_batch", "openslide", "tiffslide")


def _extra(p):
    p.add_argument("--size", default="12288x9216", help="slide size WxH at 0.25 um/px")
    p.add_argument("--reads", type=int, default=200, help="timed reads per backend and magnification")
    p.add_argument("--px", type=int, default=392, help="side of each read, pixels (the training context: 392)")
    p.add_argument("--batch", type=int, default=32, help="locations per cuCIM batch read_region call")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of " + ",".join(BACKENDS))
    p.add_argument("--cache", default="/tmp/virchow_fast_bench", help="folder for the generated slide")


def bench_slide(cache: str | Path, width: int, height: int) -> Path:
    """The generated benchmark slide (written once per size into ``cache``)."""
    from virchow_fast.data.testslides import make_slide

    path = Path(cache) / f"bench_{width}x{height}.svs"
    if not path.exists():
        t0 = time.perf_counter()
        make_slide(path, width, height, 0.25, "full", seed=0)
        print(f"generated {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def _readers(path: str, px: int, batch: int, backends) -> dict:
    """backend -> read(positions, level) -> list of arrays (one read per position)."""
    out = {}
    if "cucim" in backends or "cucim_batch" in backends:
        from virchow_fast.data.slides import _import_cucim

        cu = _import_cucim()(path)
        out["cucim"] = lambda pos, lv: [np.asarray(cu.read_region(location=p, size=(px, px), level=lv)) for p in pos]

        def batched(pos, lv):
            got = []
            for k in range(0, len(pos), batch):
                locs = pos[k:k + batch]
                for a in cu.read_region(location=locs, size=(px, px), level=lv, num_workers=1, batch_size=len(locs)):
                    a = np.array(a, copy=True)  # cuCIM reuses its buffers
                    got.extend(a.reshape(-1, px, px, a.shape[-1]))
            return got

        out["cucim_batch"] = batched
    if "openslide" in backends:
        import openslide

        osl = openslide.OpenSlide(path)
        out["openslide"] = lambda pos, lv: [np.asarray(osl.read_region(p, lv, (px, px))) for p in pos]
    if "tiffslide" in backends:
        import tiffslide

        ts = tiffslide.TiffSlide(path)
        out["tiffslide"] = lambda pos, lv: [ts.read_region(p, lv, (px, px), as_array=True) for p in pos]
    return {k: v for k, v in out.items() if k in backends}


def read_rows(path: str | Path, reads: int, px: int = 392, batch: int = 32, backends=BACKENDS,
              mags=MAGS) -> list[dict]:
    """One row per (magnification, backend): reads_s_wall, reads_per_cpu_s, and the level read."""
    from virchow_fast.data.slides import Slide

    slide = Slide(path)
    readers = _readers(str(path), px, batch, backends)
    rows = []
    for mag, mpp in mags:
        choice = slide.choose_level(mpp)
        if choice is None or choice[1] != 1.0:
            continue  # no level at this mpp: a resize would be measured too
        level = choice[0]
        lev = slide.levels[level]
        rng = np.random.default_rng(mag)
        pos = [(int(rng.integers(0, lev.width - px) * lev.downsample), int(rng.integers(0, lev.height - px)
                * lev.downsample)) for _ in range(reads)]
        next(iter(readers.values()))(pos, level)  # page cache
        for name, read in readers.items():
            read(pos[:min(10, reads)], level)  # decoder state, handles
            t0, c0 = time.perf_counter(), time.process_time()
            got = read(pos, level)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert len(got) == reads and got[0].shape[:2] == (px, px), (name, len(got), got[0].shape)
            rows.append({"mag": f"{mag}x", "level": level, "backend": name, "px": px, "reads": reads,
                         "reads_s_wall": reads / wall, "reads_per_cpu_s": reads / max(cpu, 1e-9)})
    return rows


def versions() -> dict:
    out = {}
    for mod, attr in (("cucim", "__version__"), ("openslide", "__library_version__"), ("tiffslide", "__version__")):
        try:
            out[mod] = getattr(__import__(mod), attr)
        except Exception:  # noqa: BLE001 (a backend missing here is recorded as absent)
            out[mod] = None
    return out


def main() -> None:
    args, device = setup("bench_slides", __doc__, _extra)
    w, h = (int(v) for v in args.size.split("x"))
    path = bench_slide(args.cache, w, h)
    backends = [b for b in args.backends.split(",") if b]
    rows = read_rows(path, args.reads, args.px, args.batch, backends)
    by = {(r["mag"], r["backend"]): r["reads_per_cpu_s"] for r in rows}
    for r in rows:
        r["vs_openslide_per_cpu_s"] = r["reads_per_cpu_s"] / by[(r["mag"], "openslide")] \
            if (r["mag"], "openslide") in by else None
    print_table(rows)
    write_json("bench_slides", {"slide": {"size": [w, h], "mpp": 0.25, "tile": 256, "jpeg_quality": 85},
                                "reads_per_config": args.reads, "px": args.px, "threads": 1, "batch": args.batch,
                                "rows": rows, "cpu_affinity": sorted(os.sched_getaffinity(0)),
                                "loadavg": os.getloadavg(), "versions": versions()}, args.out, device)


if __name__ == "__main__":
    main()
