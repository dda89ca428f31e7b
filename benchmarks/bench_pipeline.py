"""Multi-crop tiles/s per core: our DALI graph, our torch reference, and dinov2's torchvision/PIL way, same crops.

Contexts (392 px, read once from a generated slide at 40x/20x/10x/5x through the tile index) are
held in memory, so the augmentation rows measure the augmentation and not the reads. Every row cuts
the same crops from each context with the config's settings (data.crops): 2 x 224 + 8 x 98 ECT
crops (area scale 0.9-1.1 of the crop's own size, aspect 0.95-1.05), flips, rot90, colour jitter,
grayscale, solarise on the second global crop, blur per config, normalise.

- ``torch reference``: virchow_fast/data/multicrop.py (bilinear, antialiased), one tile at a time.
- ``DALI graph + torch finish``: virchow_fast/data/dali_pipeline.py on the CPU with one thread, its
  per-crop parameters drawn in the timed loop (as the loader's feed does).
- ``torchvision/PIL``: the transform chain dinov2's DataAugmentationDINO is built from, on PIL
  images: RandomResizedCrop (its area scale relative to the context: 0.9-1.1 x crop^2 / 392^2, so
  the boxes have the distribution of our ECT boxes) + flips + a random rot90 + ColorJitter
  (RandomApply) + RandomGrayscale + GaussianBlur (RandomApply, only when data.crops.blur > 0) +
  RandomSolarize on the second global crop + ToTensor + Normalize. dinov2 resizes with bicubic
  interpolation (that row); the bilinear row shows what the interpolation costs.

"per_cpu_s" rates divide by the process's CPU time (time.process_time, all its threads), which stays
meaningful on a shared, loaded machine where wall-clock rates measure the neighbours too; both are
recorded. ``--loader``: also the trainer's slide loader end to end (see :func:`loader_rows`).

    python benchmarks/bench_pipeline.py [--tiles 64] [--batch 16] [--batches 4] [--loader] [--out DIR]
    taskset -c 1 python benchmarks/bench_pipeline.py     # one core
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, setup, skip, write_json  # noqa: E402


def _extra(p):
    p.add_argument("--tiles", type=int, default=64, help="distinct contexts held in memory (and tiles per CPU row)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=4, help="timed DALI / loader batches")
    p.add_argument("--loader", action="store_true", help="also the slide loader end to end (1 reader process)")
    p.add_argument("--cache", default="/tmp/virchow_fast_bench", help="folder for the generated slide")


# -- contexts ------------------------------------------------------------------------------------

def pipeline_slide(cache: str | Path, context: int = 392) -> tuple[Path, Path]:
    """(generated slide, its tile index folder), written once into ``cache``."""
    from virchow_fast.data.index import IndexSettings, write_index
    from virchow_fast.data.testslides import make_slide

    cache = Path(cache)
    slide_path = cache / "pipeline_6144x4608.svs"
    if not slide_path.exists():
        make_slide(slide_path, 6144, 4608, 0.25, "full", seed=1)
    index_dir = cache / f"pipeline_index_{context}"
    if not list(index_dir.glob("*.npz")):
        write_index(str(slide_path), index_dir, IndexSettings(context=context))
    return slide_path, index_dir


def load_contexts(cache: str | Path, n: int, context: int = 392, seed: int = 0) -> list[np.ndarray]:
    """``n`` uint8 contexts [context, context, 3] drawn from the index of the generated slide."""
    from virchow_fast.data import sampling as S
    from virchow_fast.data.slides import Slide, resize

    slide_path, index_dir = pipeline_slide(cache, context)
    table = S.TileTable.from_index(index_dir)
    slide = Slide(slide_path)
    out = []
    for r in np.random.default_rng(seed).integers(0, len(table), n):
        t = table.task(int(r))
        region = slide.read(t.x, t.y, t.level, t.read_px, t.read_px)
        out.append(region if t.read_px == t.out_px else resize(region, t.out_px))
    return out


# -- augmentation rows ---------------------------------------------------------------------------

def _row(name: str, n: int, wall: float, cpu: float, threads: int = 1, device: str = "cpu") -> dict:
    return {"pipeline": name, "device": device, "threads": threads, "tiles": n,
            "tiles_s_wall": n / wall, "tiles_s_per_cpu_s": n / max(cpu, 1e-9) if cpu is not None else None}


def torch_reference_row(contexts: list[np.ndarray], crops) -> dict:
    from virchow_fast.data.multicrop import multicrop

    for c in contexts[:2]:
        multicrop(c, np.random.default_rng(1), crops)
    t0, c0 = time.perf_counter(), time.process_time()
    for i, c in enumerate(contexts):
        g, loc = multicrop(c, np.random.default_rng([2, i]), crops)
    assert g.shape == (crops.n_global, 3, crops.global_size, crops.global_size), g.shape
    return _row("torch reference (multicrop.py)", len(contexts), time.perf_counter() - t0, time.process_time() - c0)


class _Rot90:
    """A uniformly random multiple of 90 degrees on a PIL image (torchvision has no such transform)."""

    def __call__(self, img):
        from PIL import Image

        k = random.randrange(4)
        return img if k == 0 else img.transpose((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                                 Image.Transpose.ROTATE_270)[k - 1])


def torchvision_multicrop(crops, interpolation: str = "bicubic"):
    """PIL image -> (globals [n_global, 3, G, G], locals [n_local, 3, L, L]), from torchvision transforms
    configured with ``crops`` (see the module docstring)."""
    import torch
    from torchvision import transforms as T

    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    c2 = crops.context_size ** 2
    log_r = (crops.ect_ratio[0], crops.ect_ratio[1])

    def chain(size: int, solarize: float):
        scale = (crops.ect_scale[0] * size * size / c2, crops.ect_scale[1] * size * size / c2)
        t = [T.RandomResizedCrop(size, scale=scale, ratio=log_r, interpolation=mode),
             T.RandomHorizontalFlip(crops.hflip), T.RandomVerticalFlip(crops.vflip)]
        if crops.rot90:
            t.append(_Rot90())
        t += [T.RandomApply([T.ColorJitter(crops.brightness, crops.contrast, crops.saturation, crops.hue)],
                            p=crops.color_jitter),
              T.RandomGrayscale(crops.grayscale)]
        if crops.blur > 0:
            t.append(T.RandomApply([T.GaussianBlur(9, (0.1, 2.0))], p=crops.blur))
        if solarize > 0:
            t.append(T.RandomSolarize(128, p=solarize))
        t += [T.ToTensor(), T.Normalize(crops.mean, crops.std)]
        return T.Compose(t)

    globals_ = [chain(crops.global_size, crops.solarize if i == 1 else 0.0) for i in range(crops.n_global)]
    local = chain(crops.local_size, 0.0)

    def apply(img):
        g = torch.stack([t(img) for t in globals_])
        loc = torch.stack([local(img) for _ in range(crops.n_local)]) if crops.n_local else None
        return g, loc

    apply.chains = (*globals_, local)  # for inspection: the Compose of each global crop, then the local one
    return apply


def torchvision_row(contexts: list[np.ndarray], crops, interpolation: str = "bicubic") -> dict:
    import torch
    from PIL import Image

    aug = torchvision_multicrop(crops, interpolation)
    random.seed(0)
    torch.manual_seed(0)
    for c in contexts[:2]:
        aug(Image.fromarray(c))
    t0, c0 = time.perf_counter(), time.process_time()
    for c in contexts:
        g, loc = aug(Image.fromarray(c))  # the PIL image is made in the loop: dinov2's datasets hand over PIL
    assert g.shape == (crops.n_global, 3, crops.global_size, crops.global_size), g.shape
    return _row(f"torchvision/PIL as dinov2 ({interpolation})", len(contexts), time.perf_counter() - t0,
                time.process_time() - c0)


def dali_row(contexts: list[np.ndarray], crops, batch: int, batches: int, dev: str = "cpu",
             threads: int = 1) -> dict:
    """The DALI graph + :func:`finish` over ``batches`` batches of ``batch`` tiles (parameters drawn per tile)."""
    import torch

    from virchow_fast.data import sampling as S
    from virchow_fast.data.dali_pipeline import build_pipeline, feed_outputs, finish

    n, state = len(contexts), {"i": 0, "feed_s": 0.0, "finish_s": 0.0}

    def feed():
        c0 = time.thread_time()  # the feed's own thread: DALI's threads may run meanwhile
        ctx, par = [], []
        for _ in range(batch):
            i = state["i"]
            state["i"] += 1
            ctx.append(contexts[i % n])
            par.append(np.stack(S.tile_params(np.random.default_rng([2, i]), crops)))
        out = feed_outputs(ctx, par, [np.float32(20.0)] * batch, [np.int64(0)] * batch, crops)
        state["feed_s"] += time.thread_time() - c0
        return out

    pipe = build_pipeline(feed, crops, batch, dev, num_threads=threads)
    n_crops = crops.n_global + crops.n_local

    def step():  # DALI graph + the torch finishing step (transpose, clamp, solarise, CHW), as the loader does
        out = pipe.run()
        c0 = time.thread_time()
        if dev == "gpu":
            tensors = [torch.from_dlpack(o.as_tensor()) for o in out[:n_crops]]
        else:
            tensors = [torch.from_numpy(np.asarray(o.as_tensor())) for o in out[:n_crops]]
        flags = torch.from_numpy(np.asarray(out[n_crops].as_tensor()))
        got = finish(tensors, flags, crops)
        state["finish_s"] += time.thread_time() - c0
        return got

    for _ in range(2):
        step()
    _wait_idle(timeout_s=5.0)  # DALI's prefetch queue full: the window then makes exactly ``batches`` batches
    t0, c0 = time.perf_counter(), time.process_time()
    state["feed_s"] = state["finish_s"] = 0.0
    for _ in range(batches):
        g, _ = step()
    if dev == "gpu":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    _wait_idle(timeout_s=5.0)
    cpu = time.process_time() - c0
    assert g.shape == (crops.n_global * batch, 3, crops.global_size, crops.global_size), g.shape
    row = _row("DALI graph + torch finish", batches * batch, wall, None if dev == "gpu" else cpu, threads, dev)
    if dev == "cpu":  # where a tile's CPU time goes: parameters + feed, the DALI graph, the torch finish
        tiles = batches * batch
        row.update({"feed_ms": 1e3 * state["feed_s"] / tiles, "finish_ms": 1e3 * state["finish_s"] / tiles,
                    "graph_ms": 1e3 * (cpu - state["feed_s"] - state["finish_s"]) / tiles})
    return row


def aug_rows(contexts: list[np.ndarray], crops, batch: int, batches: int) -> tuple[list[dict], list[dict]]:
    """(rows, skipped): torch reference, torchvision/PIL bicubic and bilinear, DALI CPU (and GPU with CUDA)."""
    import torch

    rows, skipped = [torch_reference_row(contexts, crops)], []
    for interp in ("bicubic", "bilinear"):
        rows.append(torchvision_row(contexts, crops, interp))
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        skip(skipped, "DALI", str(exc))
        return rows, skipped
    rows.append(dali_row(contexts, crops, batch, batches))
    if torch.cuda.is_available():
        rows.append(dali_row(contexts, crops, batch, batches, "gpu", 2))
    else:
        skip(skipped, "DALI gpu", "no CUDA device here")
    ref = rows[0]["tiles_s_per_cpu_s"]
    for r in rows:
        r["crops_per_cpu_s"] = r["tiles_s_per_cpu_s"] * (crops.n_global + crops.n_local) \
            if r["tiles_s_per_cpu_s"] else None
        r["vs_reference_per_cpu_s"] = r["tiles_s_per_cpu_s"] / ref if r["tiles_s_per_cpu_s"] else None
    return rows, skipped


# -- the trainer's loader, end to end ------------------------------------------------------------

def _tree_cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) so far of process ``pid`` and all its live descendants (from /proc)."""
    pid = pid or os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)  # ppid, utime + stime
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0.0))[1]
        todo += [c for c, (pp, _) in stats.items() if pp == p]
    return total


def _wait_idle(quiet_s: float = 0.1, polls: int = 2, timeout_s: float = 60.0) -> float:
    """Wait until this process tree stops using CPU (``polls`` quiet intervals of ``quiet_s`` in a row:
    every prefetch queue of the loader is full again). Returns the perf_counter time at which it was
    last seen busy (the call's start when it was idle already)."""
    t_end, quiet, last = time.perf_counter() + timeout_s, 0, _tree_cpu_s()
    busy_at = time.perf_counter()
    while quiet < polls and time.perf_counter() < t_end:
        time.sleep(quiet_s)
        now = _tree_cpu_s()
        if now - last <= 0.011:  # at most one clock tick
            quiet += 1
        else:
            quiet, busy_at = 0, time.perf_counter()
        last = now
    return busy_at


def loader_rows(slide_path: str | Path, index_dir: str | Path, batch: int, batches: int,
                workers=(0, 1, 2), pipelines=("torch", "dali"), repeats: int = 1) -> list[dict]:
    """The trainer's loader (virchow_fast.data.build_loader, source slides, CPU augmentation) per worker count.

    The torch path reads and augments in DataLoader workers (0 = in this process); the DALI path reads
    in ``max(1, workers)`` reader processes and augments here. One batch first (process start, slide
    opening), then ``repeats`` windows: each opens when the loader is idle with its prefetch queues
    full, takes ``batches`` batches, and closes when the queues are full again, so exactly ``batches``
    batches were made inside it. Rates: tiles per wall second (to the last 0.1 s poll that saw the
    loader busy; the best window, as neighbours on a shared machine only ever slow it down) and per CPU
    second of this process and its children (reader / DataLoader worker processes, read from /proc;
    over all windows), the figure that stays meaningful on a loaded machine.
    """
    from virchow_fast.config import DataConfig
    from virchow_fast.data import build_loader

    rows = []
    for pipe in pipelines:
        for w in workers:
            cfg = DataConfig(source="slides", paths=[str(slide_path)], index_dir=str(index_dir), batch_size=batch,
                             num_workers=w, device="cpu", pipeline=pipe)
            loader = build_loader(cfg, 14, seed=0)
            walls, cpu = [], 0.0
            try:
                next(loader)
                for _ in range(repeats):
                    _wait_idle()
                    t0, c0 = time.perf_counter(), _tree_cpu_s()
                    for _ in range(batches):
                        b = next(loader)
                    walls.append(_wait_idle() - t0)
                    cpu += _tree_cpu_s() - c0
            finally:
                if hasattr(loader, "close"):
                    loader.close()
                loader._it = None  # ends the DataLoader's worker processes
            n = batches * batch
            assert b.n_tiles == batch
            rows.append({"loader": pipe, "num_workers": w,
                         "processes": 1 + (w if pipe == "torch" else max(1, w)), "tiles": n, "windows": repeats,
                         "tiles_s_wall": n / min(walls), "tiles_s_wall_worst": n / max(walls),
                         "tiles_s_per_cpu_s": n * repeats / max(cpu, 1e-9)})
    return rows


def versions() -> dict:
    import PIL
    import torch
    import torchvision

    out = {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}
    try:
        import nvidia.dali as dali

        out["dali"] = dali.__version__
    except ImportError:
        out["dali"] = None
    return out


def crops_summary(crops) -> str:
    return (f"{crops.n_global}x{crops.global_size} + {crops.n_local}x{crops.local_size} from {crops.context_size}, "
            f"ECT scale {crops.ect_scale} aspect {crops.ect_ratio}, flips {crops.hflip}/{crops.vflip}, "
            f"rot90 {crops.rot90}, jitter {crops.color_jitter} ({crops.brightness}, {crops.contrast}, "
            f"{crops.saturation}, {crops.hue}), gray {crops.grayscale}, solarize {crops.solarize}, blur {crops.blur}")


def main() -> None:
    args, device = setup("bench_pipeline", __doc__, _extra)
    import torch

    torch.set_num_threads(1)
    from virchow_fast.config import CropConfig

    crops = CropConfig()
    contexts = load_contexts(args.cache, args.tiles, crops.context_size)
    rows, skipped = aug_rows(contexts, crops, args.batch, args.batches)
    print_table(rows)
    payload = {"crops": crops_summary(crops), "tiles_in_memory": len(contexts), "batch": args.batch, "rows": rows}
    if args.loader:
        slide, index = pipeline_slide(args.cache, crops.context_size)
        payload["loader_rows"] = loader_rows(slide, index, args.batch, args.batches, workers=(1,))
        print_table(payload["loader_rows"])
    write_json("bench_pipeline", {**payload, "cpu_affinity": sorted(os.sched_getaffinity(0)),
                                  "loadavg": os.getloadavg(), "skipped": skipped, "versions": versions()},
               args.out, device)


if __name__ == "__main__":
    main()
