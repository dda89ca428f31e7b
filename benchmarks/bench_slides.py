"""Random 224 px reads per second per magnification: cuCIM vs OpenSlide vs tiffslide, one thread each.

``cucim_batch``: the same regions through cuCIM's batch API, ``--batch`` locations per
``read_region`` call with one cuCIM thread (what a reader worker does with a step's tiles of one
slide and level, virchow_fast/data/workers.py), copied out of cuCIM's buffers as the worker does.

A generated pyramidal JPEG slide (Aperio-style, 0.25 um/px, levels at downsample 2) is written once
to a cache folder; each backend then reads the same seeded random 224 px regions at the level that
serves each magnification (40x/20x/10x/5x = level 0/1/2/3). The first pass over the positions
warms the page cache and is not timed.

    python benchmarks/bench_slides.py [--size 12288x9216] [--reads 300] [--batch 32] [--out DIR]
    taskset -c 1 python benchmarks/bench_slides.py      # pinned to one core (shared machines)

At 10x / 5x the levels are small enough for OpenSlide's tile cache (32 MB default) to hold much of
them, so random reads there partly measure its cache; at 40x / 20x they do not.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, setup, write_json  # noqa: E402


def _extra(p):
    p.add_argument("--size", default="12288x9216", help="slide size WxH at 0.25 um/px")
    p.add_argument("--reads", type=int, default=300, help="timed reads per backend and magnification")
    p.add_argument("--batch", type=int, default=32, help="locations per cuCIM batch read_region call")
    p.add_argument("--cache", default="/tmp/virchow_fast_bench", help="folder for the generated slide")


def _batch_reader(path: str, batch: int):
    from cucim import CuImage

    cu = CuImage(path)

    def read(pos, lv):
        out = []
        for k in range(0, len(pos), batch):
            locs = pos[k:k + batch]
            for a in cu.read_region(location=locs, size=(224, 224), level=lv, num_workers=1, batch_size=len(locs)):
                out.append(np.array(a, copy=True))
        return out

    return read


def _readers(path: str):
    import openslide
    import tiffslide
    from cucim import CuImage

    cu = CuImage(path)
    osl = openslide.OpenSlide(path)
    ts = tiffslide.TiffSlide(path)
    return {
        "cucim": lambda x, y, lv: np.asarray(cu.read_region(location=(x, y), size=(224, 224), level=lv)),
        "openslide": lambda x, y, lv: np.asarray(osl.read_region((x, y), lv, (224, 224))),
        "tiffslide": lambda x, y, lv: ts.read_region((x, y), lv, (224, 224), as_array=True),
    }


def main() -> None:
    args, device = setup("bench_slides", __doc__, _extra)
    from virchow_fast.data.slides import Slide
    from virchow_fast.data.testslides import make_slide

    w, h = (int(v) for v in args.size.split("x"))
    path = Path(args.cache) / f"bench_{w}x{h}.svs"
    if not path.exists():
        t0 = time.perf_counter()
        make_slide(path, w, h, 0.25, "full", seed=0)
        print(f"generated {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    slide = Slide(path)
    readers = _readers(str(path))
    batch_read = _batch_reader(str(path), args.batch)
    rows = []
    for mag, mpp in ((40, 0.25), (20, 0.5), (10, 1.0), (5, 2.0)):
        choice = slide.choose_level(mpp)
        if choice is None or choice[1] != 1.0:
            continue
        level = choice[0]
        ds = slide.levels[level].downsample
        lw, lh = slide.levels[level].width, slide.levels[level].height
        rng = np.random.default_rng(mag)
        pos = [(int(rng.integers(0, lw - 224) * ds), int(rng.integers(0, lh - 224) * ds)) for _ in range(args.reads)]
        row = {"mag": f"{mag}x", "level": level}
        for name, read in readers.items():
            for x, y in pos[:50]:
                read(x, y, level)  # warm-up: page cache, decoder state
            t0 = time.perf_counter()
            for x, y in pos:
                read(x, y, level)
            row[f"{name}_reads_s"] = args.reads / (time.perf_counter() - t0)
        batch_read(pos[:50], level)  # warm-up
        t0 = time.perf_counter()
        batch_read(pos, level)
        row["cucim_batch_reads_s"] = args.reads / (time.perf_counter() - t0)
        row["cucim_vs_openslide"] = row["cucim_reads_s"] / row["openslide_reads_s"]
        row["batch_vs_single"] = row["cucim_batch_reads_s"] / row["cucim_reads_s"]
        row["batch_vs_openslide"] = row["cucim_batch_reads_s"] / row["openslide_reads_s"]
        rows.append(row)
        print_table([row])
    print()
    print_table(rows)
    import cucim
    import openslide
    import tiffslide

    write_json("bench_slides", {"slide": {"size": [w, h], "mpp": 0.25, "tile": 256, "jpeg_quality": 85},
                                "reads_per_config": args.reads, "threads": 1, "batch": args.batch, "rows": rows,
                                "cpu_affinity": sorted(__import__("os").sched_getaffinity(0)),
                                "versions": {"cucim": cucim.__version__, "openslide": openslide.__library_version__,
                                             "openslide_python": openslide.__version__,
                                             "tiffslide": tiffslide.__version__}}, args.out, device)


if __name__ == "__main__":
    main()
