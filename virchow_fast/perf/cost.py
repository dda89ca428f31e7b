"""A traced step priced on a device: per-category FLOPs, bytes and time, tiles/s and MFU.

Each op is priced as a roofline, ``max(FLOPs / rate, bytes / bandwidth)``, at ceilings given as
fractions of measured rates (defaults: one H200):

- library GEMMs (cuBLAS: matmuls, the patch-embedding convolution) at 80 % of 790 TFLOP/s, the
  dense bf16 rate measured on an H200, on their FLOPs;
- our Triton MMA kernels (attention, the fused head-loss passes) at 50 % of 790 TFLOP/s on the
  FLOPs they issue (tile and head-dim padding included);
- everything else at 80 % of 4.3 TB/s, the measured copy rate, on the bytes it reads and writes;
- matmuls on fp32 operands at half their rate (TF32 tensor cores).

Ops run one after another (no overlap) and launch overhead is not counted. MFU is the model's
FLOPs (``model/info.py``: student 3x forward, teacher 1x, no recompute) over the predicted time,
against the 989 TFLOP/s datasheet peak. Collectives are kept apart (they overlap with compute
under FSDP's prefetch); :func:`collective_times` prices them on a network.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import Config
from ..model.info import flops_per_tile
from .counter import CATEGORIES, COLLECTIVES, COMM, GEMM, KERNEL_MMA, MEMORY, OpRecord
from .trace import StepTrace


@dataclass(frozen=True)
class Device:
    name: str = "H200"
    gemm_flops: float = 0.8 * 790e12  # library GEMMs: 80 % of the measured dense bf16 rate
    kernel_flops: float = 0.5 * 790e12  # our Triton MMA kernels, on issued FLOPs
    bandwidth: float = 0.8 * 4.3e12  # memory-bound ops: 80 % of the measured copy rate, bytes/s
    peak_flops: float = 989e12  # datasheet dense bf16, the MFU reference
    memory_bytes: float = 141e9  # HBM


H200 = Device()
# (name, bytes/s per GPU): NVLink 4 within a node, InfiniBand NDR (one 400 Gb/s NIC per GPU) across nodes
NETWORKS = (("NVLink", 450e9), ("InfiniBand", 50e9))


def op_time(r: OpRecord, device: Device) -> float:
    """Seconds of one op on ``device`` (0 for a collective: priced by :func:`collective_times`)."""
    mem = r.bytes / device.bandwidth
    slow = 0.5 if r.fp32 else 1.0  # fp32 operands run TF32 tensor cores, half the bf16 rate
    if r.kind == GEMM:
        return max(r.issued_flops / (slow * device.gemm_flops), mem)
    if r.kind == KERNEL_MMA:
        return max(r.issued_flops / (slow * device.kernel_flops), mem)
    if r.kind == MEMORY:
        return mem
    return 0.0


def profile_category(r: OpRecord) -> str:
    """The category benchmarks/bench_profile.py gives the kernel(s) this op launches on a GPU."""
    if r.kind == COMM:
        return "communication"
    if r.phase in ("optimizer", "ema"):
        return "optimizer and EMA"
    if r.kind == GEMM:
        return "GEMM"
    if "attention" in r.op:
        return "attention"
    if ".head_" in r.op:
        return "head loss (fused)"
    if r.op.startswith("virchow_fast") or r.op.startswith("virchow_fast_triton"):
        return "Triton glue"
    return "other elementwise"


def summarize(trace: StepTrace, cfg: Config, device: Device = H200) -> dict:
    """The step's table (per category: count, FLOPs, issued FLOPs, bytes, seconds) and bottom line."""
    cats = {c: {"ops": 0, "flops": 0.0, "issued_flops": 0.0, "bytes": 0.0, "seconds": 0.0} for c in CATEGORIES}
    by_profile: dict[str, float] = {}
    glue = 0.0
    comm_bytes = 0.0
    for r in trace.records:
        if r.category == COLLECTIVES:
            comm_bytes += r.bytes
            continue
        t = op_time(r, device)
        row = cats[r.category]
        row["ops"] += 1
        row["flops"] += r.flops
        row["issued_flops"] += r.issued_flops
        row["bytes"] += r.bytes
        row["seconds"] += t
        by_profile[profile_category(r)] = by_profile.get(profile_category(r), 0.0) + t
        if r.kind == MEMORY:
            glue += t
    total = sum(row["seconds"] for row in cats.values())
    model_flops = flops_per_tile(cfg) * trace.tiles
    return {
        "config": cfg.name, "tiles_per_gpu": trace.tiles, "world_size": trace.world_size,
        "activation_checkpointing": trace.ac_mode, "device": asdict(device), "categories": cats,
        "by_profile_category": by_profile, "step_seconds": total, "memory_bound_seconds": glue,
        "memory_bound_share": glue / total if total else 0.0,
        "collective_bytes": comm_bytes, "model_flops": model_flops,
        "tiles_per_s": trace.tiles / total if total else 0.0,
        "mfu": model_flops / total / device.peak_flops if total else 0.0,
    }


def collective_times(trace: StepTrace, gpus: tuple[int, ...] = (8, 64, 512)) -> list[dict]:
    """Seconds of this rank's collective traffic per step, per network and GPU count (ring algorithms).

    ``trace`` is a trace at one world size; its payloads are full (unsharded) sizes, so they hold
    for any N: each rank sends and receives (N - 1) / N of every all-gather and reduce-scatter
    payload, twice that for an all-reduce.
    """
    rows = []
    for n in gpus:
        moved = 0.0
        for r in trace.records:
            if r.category != COLLECTIVES:
                continue
            factor = 2.0 if "allreduce" in r.op or "all_reduce" in r.op else 1.0
            moved += factor * r.bytes * (n - 1) / n
        for name, rate in NETWORKS:
            if name == "NVLink" and n > 8:
                continue  # one node holds 8 GPUs
            rows.append({"gpus": n, "network": name, "bytes_per_gpu": moved, "seconds": moved / rate})
    return rows


def measured_profiles(results: Path, cfg: Config, tiles: int, ac: str | tuple[str, ...]) -> list[dict]:
    """bench_profile.py results for this config, batch and AC mode(s) (not CPU smoke runs).

    Format (benchmarks/bench_profile.py's JSON): ``{"model", "batch", "ac", "smoke", "step_ms",
    "rows": [{"category", "ms", "%step"}], "meta": {...}}``; categories are its own
    (:func:`profile_category` maps ours onto them).
    """
    found = []
    for path in sorted(Path(results).glob("bench_profile_*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        modes = ac if isinstance(ac, tuple) else (ac,)
        if data.get("smoke") or int(data.get("batch", -1)) != tiles or data.get("ac") not in modes:
            continue
        model = str(data.get("model", ""))
        if model and model.split("_")[:2] != cfg.name.split("_")[:2]:
            continue
        data["path"] = str(path)
        found.append(data)
    return found
