"""Per-step metrics: JSON lines, TensorBoard (pinned in requirements/base.txt), MFU and peak memory.

MFU counts *model* FLOPs (``model.info.flops_per_tile``: student forward + backward on all crops,
teacher forward on the global crops, heads; no recompute) per second per device, against the
device's dense peak; ``hfu`` adds the forward recomputed by activation checkpointing (hardware
FLOPs). The peak is ``train.peak_tflops`` when set, else looked up from the CUDA device name
(vendor dense figures, no sparsity); on a CPU there is no peak and both are null.
"""
from __future__ import annotations

import json
import logging
import math
import resource
from pathlib import Path

import torch

from ..config import Config, ParallelConfig
from ..model.info import flops_per_tile
from .parallelize import recomputed_blocks

log = logging.getLogger("virchow_fast.train")

# Dense tensor-core peaks, TFLOP/s per device: (bf16, tf32). Vendor datasheets; SXM parts.
_PEAKS = (
    ("H200", (989.4, 494.7)), ("H100", (989.4, 494.7)), ("H800", (989.4, 494.7)), ("GH200", (989.4, 494.7)),
    ("B200", (2250.0, 1100.0)), ("A100", (312.0, 156.0)), ("A800", (312.0, 156.0)), ("L40S", (362.1, 183.0)),
    ("A10G", (70.0, 35.0)), ("L4", (121.0, 60.0)), ("V100", (125.0, 15.7)),
)


def detect_peak_tflops(device: torch.device, precision: str = "bf16") -> float | None:
    """Dense peak of ``device`` for ``precision`` (bf16 | fp32 = TF32), or None when unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in _PEAKS:
        if key in name:
            return bf16 if precision == "bf16" else tf32
    log.warning("unknown GPU %r: set train.peak_tflops for MFU", name)
    return None


def flops_per_tile_step(cfg: Config, parallel: ParallelConfig | None = None) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs with checkpointing's recompute) per tile per training step.

    parallel: the run's resolved parallel settings (``activation_checkpointing: auto`` replaced by
    the policy it picked, train/parallelize.py); default ``cfg.parallel``, where auto counts as off.
    """
    model = flops_per_tile(cfg, recompute=False)
    frac = len(recomputed_blocks(parallel or cfg.parallel, cfg.model.depth)) / cfg.model.depth
    return model, model + frac * (flops_per_tile(cfg, recompute=True) - model)


def peak_memory_gib(device: torch.device, reset: bool = True) -> float:
    """Peak allocated device memory since the last call (CUDA), or the process's peak RSS (CPU)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class Throughput:
    """Tiles/s, MFU and HFU of a step from its wall time."""

    def __init__(self, cfg: Config, world_size: int, device: torch.device, parallel: ParallelConfig | None = None):
        """parallel: the resolved parallel settings the networks were built with (see flops_per_tile_step)."""
        self.tiles = cfg.data.batch_size * world_size
        self.world = world_size
        self.model_flops, self.hw_flops = flops_per_tile_step(cfg, parallel)
        peak = cfg.train.peak_tflops if cfg.train.peak_tflops > 0 else \
            detect_peak_tflops(device, cfg.parallel.mixed_precision)
        self.peak = peak * 1e12 if peak else None

    def __call__(self, seconds: float) -> dict:
        tiles_s = self.tiles / seconds
        per_device = tiles_s / self.world
        out = {"tiles_per_s": tiles_s, "mfu": None, "hfu": None}
        if self.peak:
            out["mfu"] = per_device * self.model_flops / self.peak
            out["hfu"] = per_device * self.hw_flops / self.peak
        return out


def tag(key: str) -> str:
    """TensorBoard tag of a metrics key: eval_knn_acc -> eval/knn_acc, anything else -> train/<key>."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


class MetricsWriter:
    """Per-step metrics as JSON lines in <run>/metrics.jsonl (rank 0); resume drops later lines.

    Mirrors every finite numeric field to TensorBoard (<run>/tensorboard): ``train/<key>`` (loss
    terms, lr and the other schedules, tiles/s, MFU, memory), ``eval/<name>`` for ``eval_<name>``
    (kNN accuracy and RankMe from ``eval.every``).
    """

    def __init__(self, path: Path, start_step: int, enabled: bool, tensorboard: bool = True):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < start_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._f = open(path, "a") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # not in the pinned stack's install: say so once, keep the JSON lines
                log.warning("tensorboard is not installed: metrics go to %s only", path)
            else:
                self._tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=start_step)

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    self._tb.add_scalar(tag(key), value, record["step"])

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
