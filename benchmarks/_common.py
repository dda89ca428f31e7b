"""Shared helpers for the benchmarks: setup, timing, bandwidth, a table and a JSON record.

Typical use in a bench script::

    from _common import setup, time_fn, print_table, write_json
    args, device = setup("attention", __doc__)       # --cpu-smoke, --out, --iters, --compile
    t = time_fn(lambda: f(x), device)                 # {"ms": median, "ms_min": ...}
    print_table(rows); write_json("bench_attention", {"rows": rows, "skipped": skipped}, args.out)

On a machine without CUDA, ``setup`` switches to the CPU smoke mode (tiny shapes, one timed
iteration, Triton in its interpreter): numbers from it prove the script runs, nothing more.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def setup(name: str, description: str | None = None, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """Parse the common flags; pick CUDA or the CPU smoke mode (sets TRITON_INTERPRET=1 first).

    Flags: --cpu-smoke (force tiny CPU shapes), --out DIR (default $OUT, else benchmarks/results),
    --iters N, --warmup N, --compile / --no-compile (torch.compile baselines; default on CUDA only).
    Returns (args, torch.device). ``args.smoke`` is True in the CPU smoke mode.
    """
    parser = argparse.ArgumentParser(prog=name, description=description)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (automatic without CUDA)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(RESULTS_DIR), help="folder for the JSON")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 GPU, 1 smoke)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 5 GPU, 1 smoke)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="include torch.compile / FlexAttention baselines (default: on CUDA only)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()

    import torch  # after argparse so --help is instant

    args.smoke = args.cpu_smoke or not torch.cuda.is_available()
    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first kernel import
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    device = torch.device("cpu" if args.smoke else "cuda")
    args.iters = args.iters if args.iters is not None else (1 if args.smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    args.compile = (not args.smoke) if args.compile is None else args.compile
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo, for `virchow_fast`
    print(f"[{name}] device={device_name(device)} smoke={args.smoke} iters={args.iters} "
          f"compile={args.compile}", flush=True)
    return args, device


def device_name(device) -> str:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def meta(device) -> dict:
    """Device, library versions and UTC date: recorded with every result."""
    import torch

    info = {
        "device": device_name(device),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device, iters: int = 20, warmup: int = 5) -> dict:
    """Run ``fn`` warmup + iters times; per-call times in ms (CUDA events on a GPU, else perf_counter).

    Returns {"ms": median, "ms_min": fastest, "iters": iters}.
    """
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if torch.device(device).type == "cuda":
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "iters": iters}


def copy_bandwidth(device, nbytes: int, iters: int = 20, warmup: int = 5) -> float:
    """Measured device copy bandwidth in GB/s (read + write of ``nbytes``): the roof for memory-bound ops."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, iters, warmup)
    return 2 * src.numel() * 2 / (t["ms"] * 1e-3) / 1e9


def try_run(skipped: list, what: str, fn: Callable[[], object]):
    """Run ``fn``; on any exception, record ``what`` as skipped with the reason and return None."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 (a baseline that cannot run here is a skip, not a crash)
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        skip(skipped, what, reason)
        return None


def skip(skipped: list, what: str, reason: str) -> None:
    skipped.append({"what": what, "reason": reason})
    print(f"  SKIPPED {what}: {reason}", flush=True)


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def print_table(rows: list[dict], columns: Iterable[str] | None = None) -> None:
    """Plain fixed-width table of ``rows`` (dicts); columns default to the keys of all rows in order."""
    if not rows:
        print("(no rows)")
        return
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    columns = list(columns)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    print(line)
    print("-" * len(line))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    sys.stdout.flush()


def write_json(name: str, payload: dict, out_dir: str | os.PathLike | None = None, device=None,
               path: str | os.PathLike | None = None) -> Path:
    """Write ``payload`` plus ``meta`` (device, versions, date) to <out_dir>/<name>_<device>_<date>.json.

    Pass the returned ``path`` back to rewrite the same file (a bench that saves after each shape
    keeps its partial results if it is cut off).
    """
    info = meta(device if device is not None else "cpu")
    if path is None:
        out = Path(out_dir or os.environ.get("OUT") or RESULTS_DIR)
        out.mkdir(parents=True, exist_ok=True)
        tag = "cpu" if info["device"].startswith("cpu") else info["device"].replace(" ", "-").lower()
        stamp = info["date_utc"][:19].replace(":", "").replace("-", "")
        path = out / f"{name}_{tag}_{stamp}.json"
    path = Path(path)
    path.write_text(json.dumps({"meta": info, **payload}, indent=2, default=str) + "\n")
    print(f"wrote {path}", flush=True)
    return path
