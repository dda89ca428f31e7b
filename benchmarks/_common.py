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
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
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


BANDWIDTH_COLUMNS = ["model", "impl", "fwd_ms", "fwd_GBs", "fwd_%copy", "bwd_ms", "bwd_GBs", "bwd_%copy", "copy_GBs"]


def bench_bandwidth(rows: list, skipped: list, model: str, impl: str, fwd: Callable[[], object],
                    make_out: Callable[[], object], grad_inputs: list, grad_out, fwd_bytes: int, bwd_bytes: int,
                    copy_gbs: float, device, args) -> None:
    """Time a memory-bound op forward (``fwd``, no grad) and backward (autograd.grad of the output of
    ``make_out`` w.r.t. ``grad_inputs``), and append a row in GB/s and % of copy bandwidth."""
    import torch

    t_f = try_run(skipped, f"{model} {impl} forward", lambda: time_fn(fwd, device, args.iters, args.warmup))
    if t_f is None:
        return
    out = try_run(skipped, f"{model} {impl} backward", make_out)
    t_b = None
    if out is not None:
        t_b = try_run(skipped, f"{model} {impl} backward", lambda: time_fn(
            lambda: torch.autograd.grad(out, grad_inputs, grad_out, retain_graph=True), device, args.iters,
            args.warmup))
    gbs_f = fwd_bytes / (t_f["ms"] * 1e-3) / 1e9
    gbs_b = bwd_bytes / (t_b["ms"] * 1e-3) / 1e9 if t_b else None
    rows.append({"model": model, "impl": impl, "fwd_ms": t_f["ms"], "fwd_GBs": gbs_f,
                 "fwd_%copy": 100 * gbs_f / copy_gbs,
                 "bwd_ms": t_b["ms"] if t_b else None, "bwd_GBs": gbs_b,
                 "bwd_%copy": 100 * gbs_b / copy_gbs if gbs_b else None, "copy_GBs": copy_gbs})
    print(f"  {impl}: fwd {t_f['ms']:.3f} ms" + (f", bwd {t_b['ms']:.3f} ms" if t_b else ""), flush=True)


def report(name: str, rows: list[dict], columns: Iterable[str], skipped: list, args, device, payload: dict,
           goal: str | None = None, path: str | os.PathLike | None = None) -> Path:
    """Print the table, what was skipped and why, the smoke-run caveat and the goal; write the JSON."""
    print()
    print_table(rows, columns)
    if skipped:
        print(f"\nskipped ({len(skipped)}):")
        for s in skipped:
            print(f"  - {s['what']}: {s['reason']}")
    if args.smoke:
        print("\nCPU SMOKE RUN: tiny shapes, Triton interpreter; the numbers say only that the script works.")
    if goal:
        print(goal)
    out = write_json(name, {"smoke": args.smoke, **payload, "rows": rows, "skipped": skipped}, args.out, device, path)
    print(summary_line(name, rows, skipped, args.smoke), flush=True)
    return out


def summary_line(name: str, rows: list[dict], skipped: list, smoke: bool) -> str:
    """``SUMMARY <name>: ...`` (gpu_check.sh's one line per step): per model, each impl's forward and
    backward share of copy bandwidth when the rows have it, else the row and skip counts."""
    parts = []
    for r in rows:
        if "fwd_%copy" in r:
            bwd = f"/{r['bwd_%copy']:.0f}" if r.get("bwd_%copy") is not None else ""
            parts.append(f"{r.get('model', '')} {r.get('impl', '')} {r['fwd_%copy']:.0f}{bwd}%")
    text = ("fwd/bwd % of copy bandwidth: " + ", ".join(parts)) if parts else f"{len(rows)} rows"
    return f"SUMMARY {name}{' (CPU smoke)' if smoke else ''}: {text}; {len(skipped)} skipped"
