"""What tile index ``i`` is, and how its crops are augmented: pure functions of (seed, i).

Tile ``i`` of step ``s`` on rank ``r`` is global index ``(s * world + r) * B + i`` (loader.py), so
ranks never draw the same index and a resumed run draws exactly what it would have drawn. For
index ``i``: the magnification by ``mag_weights`` (renormalised over the magnifications the index
holds), then a tile uniformly among that magnification's tiles (with replacement: at millions of
tiles this is an epoch in all but name), then every augmentation parameter of every crop. The
DALI graph only executes these parameters, so its output is deterministic too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import CropConfig, DataConfig
from .index import load_index
from .multicrop import ect_box
from .records import DataError, ReadTask

# columns of the per-crop parameter row fed to the DALI graph; P_MT: the colour transform [M | T] (3 x 4).
# Flips and a transposition, each a fair coin, give the 8 symmetries of the square uniformly: the same
# distribution as a random rot90 after random flips (the torch reference), without a warp.
P_Y0, P_X0, P_Y1, P_X1, P_HFLIP, P_VFLIP, P_TRANSPOSE, P_SOLAR, P_BLUR, P_SIGMA, P_MT = range(11)
N_PARAMS = P_MT + 12

_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = np.linalg.inv(_TO_YIQ)
_GRAY = np.array([0.299, 0.587, 0.114])


def colour_transform(brightness: float, contrast: float, saturation: float, hue_turns: float) -> np.ndarray:
    """[M | T] (3 x 4) applying brightness, contrast (around mid-gray 128), saturation, hue in that order.

    All four are linear in RGB (hue as a rotation in YIQ, the same rotation the torch reference uses;
    saturation 0 is grayscale), so one matrix does the whole colour jitter: DALI's coord_transform
    runs it ~3x faster on the CPU than color_twist. Clamping happens once, at the end (uint8 output).
    """
    a = 2 * np.pi * hue_turns
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    hue = _FROM_YIQ @ rot @ _TO_YIQ
    sat = saturation * np.eye(3) + (1 - saturation) * np.tile(_GRAY, (3, 1))
    m = hue @ sat * (brightness * contrast)
    t = np.full(3, 128.0 * (1 - contrast))  # gray is a fixed point of sat and hue
    return np.concatenate([m, t[:, None]], 1).astype(np.float32)


def normalising(mt: np.ndarray, mean, std) -> np.ndarray:
    """[M | T] on 0-255 values followed by (x / 255 - mean) / std, as one [M | T]."""
    scale = 1.0 / (255.0 * np.asarray(std, np.float64))
    out = mt.astype(np.float64) * scale[:, None]
    out[:, 3] -= np.asarray(mean, np.float64) / np.asarray(std, np.float64)
    return out.astype(np.float32)


@dataclass
class TileTable:
    """All indexed tiles of all slides, one row per tile, grouped by magnification."""

    slides: list[str]
    slide_mpp: np.ndarray  # [n_slides] float64
    slide: np.ndarray  # [N] int32
    mag: np.ndarray  # [N] float32
    level: np.ndarray  # [N] int16
    x: np.ndarray  # [N] int64
    y: np.ndarray  # [N] int64
    read: np.ndarray  # [N] int32
    context: int
    by_mag: dict[float, np.ndarray]
    where: str = ""  # the index folder, for messages
    stamps: list | None = None  # [n_slides] (size, mtime) of each slide when indexed

    @classmethod
    def from_index(cls, index_dir: str | Path, files: list[Path] | None = None) -> "TileTable":
        """The tiles of the index ``files`` (default: every index in ``index_dir``), one context size."""
        parts = load_index(index_dir, files)
        if not parts:
            raise DataError(f"{index_dir}: no tile index (run `virchow-fast tiles` first)")
        contexts = {int(p["context"]) for p in parts}
        if len(contexts) > 1:
            raise DataError(f"{index_dir}: indexes with different context sizes {sorted(contexts)}")
        slides = [str(p["slide"]) for p in parts]
        cat = lambda k: np.concatenate([p[k] for p in parts])  # noqa: E731
        slide = np.concatenate([np.full(len(p["x"]), i, np.int32) for i, p in enumerate(parts)])
        mag = cat("mag")
        by_mag = {float(m): np.flatnonzero(mag == m) for m in np.unique(mag)}
        return cls(slides, np.array([float(p["slide_mpp"]) for p in parts]), slide, mag, cat("level"), cat("x"),
                   cat("y"), cat("read"), int(parts[0]["context"]), by_mag, str(index_dir),
                   [(int(p["source_size"]), float(p["source_mtime"])) if "source_size" in p else None for p in parts])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def task(self, row: int, mpp_override: float | None = None) -> ReadTask:
        """The reader task of one row."""
        i = self.slide[row]
        return ReadTask(self.slides[i], int(self.x[row]), int(self.y[row]), int(self.level[row]), int(self.read[row]),
                        self.context, mpp_override or float(self.slide_mpp[i]), self.stamps[i] if self.stamps else None)


class MagSampler:
    """Draws (magnification, row) for an index from ``cfg.mags`` / ``cfg.mag_weights``."""

    def __init__(self, table: TileTable, cfg: DataConfig):
        mags, weights = [], []
        for m, w in zip(cfg.mags, cfg.mag_weights, strict=False):
            if w > 0 and float(m) in table.by_mag and len(table.by_mag[float(m)]):
                mags.append(float(m))
                weights.append(w)
        if not mags:
            have = {m: len(r) for m, r in sorted(table.by_mag.items()) if len(r)}
            where = getattr(table, "where", "") or "the tile index"
            raise DataError(f"{where}: no tiles at the sampled magnifications data.mags={list(cfg.mags)} with "
                            f"weight > 0 (tiles per magnification: {have or 'none'})")
        self.table, self.mags = table, mags
        self.p = np.asarray(weights, np.float64) / sum(weights)

    def draw(self, rng: np.random.Generator) -> tuple[float, int]:
        k = int(rng.choice(len(self.mags), p=self.p))
        rows = self.table.by_mag[self.mags[k]]
        return self.mags[k], int(rows[int(rng.integers(len(rows)))])


def crop_params(rng: np.random.Generator, cfg: CropConfig, size: int, solarize_p: float) -> np.ndarray:
    """One crop's parameter row (see the P_* columns); draws in a fixed order."""
    top, left, h, w = ect_box(rng, cfg.context_size, size, tuple(cfg.ect_scale), tuple(cfg.ect_ratio))
    p = np.zeros(N_PARAMS, np.float32)
    p[P_Y0], p[P_X0], p[P_Y1], p[P_X1] = top, left, top + h, left + w
    p[P_HFLIP] = rng.random() < cfg.hflip
    p[P_VFLIP] = rng.random() < cfg.vflip
    p[P_TRANSPOSE] = (rng.random() < 0.5) if cfg.rot90 else 0.0
    jitter = rng.random() < cfg.color_jitter
    u = rng.uniform(-1, 1, 4)
    gray = rng.random() < cfg.grayscale
    b, c, s, h = (1 + cfg.brightness * u[0], 1 + cfg.contrast * u[1], 1 + cfg.saturation * u[2], cfg.hue * u[3]) \
        if jitter else (1.0, 1.0, 1.0, 0.0)
    p[P_MT:P_MT + 12] = colour_transform(b, c, 0.0 if gray else s, h).reshape(-1)
    p[P_SOLAR] = rng.random() < solarize_p
    p[P_BLUR] = rng.random() < cfg.blur
    p[P_SIGMA] = rng.uniform(0.1, 2.0)
    return p


def tile_params(rng: np.random.Generator, cfg: CropConfig) -> list[np.ndarray]:
    """Parameter rows of the n_global + n_local crops of one tile; solarise on the 2nd global only."""
    out = [crop_params(rng, cfg, cfg.global_size, cfg.solarize if i == 1 else 0.0) for i in range(cfg.n_global)]
    out += [crop_params(rng, cfg, cfg.local_size, 0.0) for _ in range(cfg.n_local)]
    return out


def index_of(step: int, rank: int, world: int, batch: int, i: int) -> int:
    return (step * world + rank) * batch + i
