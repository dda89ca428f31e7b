"""``embed``: tile embeddings of whole slides or tile folders, one HDF5 file per slide (CLAM / TRIDENT).

Slides are read by the training reader (data/slides.py) and tiled by the training index
(data/index.py: Otsu tissue mask, a grid of ``tile`` px squares at the magnification's mpp,
``min_tissue`` kept); a folder of tile images (png / jpg / tif) becomes one "slide" per folder.

Each output ``<name>.h5`` holds ``features`` [N, D] float32 and ``coords`` [N, 2] int64 (level-0
x, y of each tile's top-left; -1 for tile images without ``x_y`` in their name, whose file names
are in ``names``), with attributes ``name``, ``magnification``, ``mpp`` (of the tiles), ``slide_mpp``,
``patch_size`` (px at the magnification), ``patch_size_level0``, ``embedding``, ``model``.

Resumable: a finished slide's file is never rewritten (``--overwrite`` to redo). A file is written
as ``.tmp`` and renamed when complete; a ``.started`` marker left by a run that died inside a slide
(a reader crash) skips that slide next time with one line. Bad slides and tiles are skipped,
counted and named in one line each.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..logs import ensure_logging
from .datasets import IMAGE_SUFFIXES
from .features import embed_batch, fit_tile, normalise

logger = logging.getLogger("virchow_fast.embed")

COORDS = re.compile(r"(\d+)[_-](\d+)$")


@dataclass
class EmbedReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished earlier
    failed: list[tuple[str, str]] = field(default_factory=list)
    tiles: int = 0
    bad_tiles: int = 0
    seconds: float = 0.0


@dataclass
class Job:
    name: str
    kind: str  # slide | tiles
    path: str
    files: list[str] = field(default_factory=list)  # kind tiles


def _is_tile_image(p: Path) -> bool:
    """A .tif(f) is a tile image unless it is tiled and large (a slide); png / jpg always are."""
    if p.suffix.lower() not in (".tif", ".tiff"):
        return p.suffix.lower() in IMAGE_SUFFIXES
    try:
        import tifffile

        with tifffile.TiffFile(p) as t:
            page = t.pages[0]
            return not (page.is_tiled and max(page.shape[:2]) > 4096) and len(t.pages) == 1
    except Exception:  # noqa: BLE001 (not a TIFF we can read: let the slide reader decide)
        return False


def find_jobs(paths: list[str]) -> list[Job]:
    """Slides (files, or slide files under folders) and tile folders (folders holding tile images)."""
    from ..data.slides import SLIDE_SUFFIXES

    jobs: list[Job] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            jobs.append(Job(p.stem, "slide", str(p)))
            continue
        groups: dict[Path, list[str]] = {}
        for f in sorted(p.rglob("*")) if p.is_dir() else []:
            if not f.is_file():
                continue
            if f.suffix.lower() in IMAGE_SUFFIXES and _is_tile_image(f):
                groups.setdefault(f.parent, []).append(str(f))
            elif f.suffix.lower() in SLIDE_SUFFIXES:
                jobs.append(Job(f.stem, "slide", str(f)))
        for folder, files in groups.items():
            jobs.append(Job(folder.name, "tiles", str(folder), files))
        if not p.exists():
            jobs.append(Job(p.stem, "slide", str(p)))  # reported as a failure
    seen: dict[str, int] = {}
    for j in jobs:  # two slides with one stem: the later ones get a path hash
        seen[j.name] = seen.get(j.name, 0) + 1
        if seen[j.name] > 1:
            from ..data.index import index_name

            j.name = index_name(j.path)
    return jobs


def _write(out: Path, feats: list[np.ndarray], coords: list, names: list[str] | None, attrs: dict, dim: int) -> None:
    import h5py

    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=np.concatenate(feats) if feats else np.zeros((0, dim), np.float32))
        c = f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        if names is not None:
            f.create_dataset("names", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
        for k, v in attrs.items():
            f.attrs[k] = v
            c.attrs[k] = v
    os.replace(tmp, out)


class Embedder:
    def __init__(self, model, weights, mag: float = 20.0, tile: int = 224, mode: str = "cls+mean",
                 batch_size: int = 64, min_tissue: float = 0.65, mpp: float | None = None,
                 device: torch.device | str = "cpu", log=None, progress: bool = True):
        self.model, self.w, self.mag, self.tile, self.mode = model, weights, mag, tile, mode
        self.batch_size, self.min_tissue, self.mpp = batch_size, min_tissue, mpp
        self.device = torch.device(device)
        self.size = weights.model.img_size  # the model's input side: tiles are resized to it
        self.target_mpp = 10.0 / mag  # 40x = 0.25 um/px, 20x = 0.5
        self.log = log or logger.warning  # its lines are about skipped tiles
        self.progress = progress

    def _forward(self, tiles: list[np.ndarray]) -> np.ndarray:
        x = normalise(np.stack([fit_tile(t, self.size) for t in tiles]), self.w.mean, self.w.std, self.device)
        return embed_batch(self.model, x, self.mode).cpu().numpy()

    def _bar(self, total: int, desc: str):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc[:30], unit="tile", file=sys.stderr, leave=False, dynamic_ncols=True)

    def _run_batches(self, n: int, read, desc: str) -> tuple[list[np.ndarray], list[int], int]:
        """read(i) -> RGB tile or raises; returns (feature blocks, kept indices, bad count)."""
        feats, kept, buf, idx, bad = [], [], [], [], 0
        bar = self._bar(n, desc)
        for i in range(n):
            try:
                buf.append(read(i))
                idx.append(i)
            except Exception as exc:  # noqa: BLE001 (a bad tile is skipped, counted, named once)
                bad += 1
                if bad <= 3:
                    self.log(f"embed: skipped tile {i} of {desc}: {str(exc).splitlines()[0] if str(exc) else exc}")
            if len(buf) == self.batch_size or (i == n - 1 and buf):
                feats.append(self._forward(buf))
                kept.extend(idx)
                if bar is not None:
                    bar.update(len(buf))
                buf, idx = [], []
        if bar is not None:
            bar.close()
        return feats, kept, bad

    def slide(self, job: Job, out: Path) -> tuple[int, int]:
        from ..data.index import IndexSettings, index_slide
        from ..data.slides import Slide, SlideError, sane_region

        settings = IndexSettings(mags=(self.mag,), mag_mpp=(self.target_mpp,), context=self.tile,
                                 min_tissue=self.min_tissue, mpp=self.mpp)
        cols, _, _ = index_slide(job.path, settings)
        xs, ys = cols["x"], cols["y"]
        if len(xs) == 0:
            raise SlideError(f"{job.path}: no {self.tile} px tile with >= {self.min_tissue:.2f} tissue at "
                             f"{self.mag:g}x (or the scan is coarser than {self.target_mpp:g} um/px)")
        with Slide(job.path, mpp=self.mpp) as s:
            choice = s.choose_level(self.target_mpp)

            def read(i: int) -> np.ndarray:
                region = s.read_context(int(xs[i]), int(ys[i]), self.target_mpp, self.tile, choice)
                why = sane_region(region, (self.tile, self.tile))
                if why:
                    raise SlideError(f"{job.path} ({xs[i]}, {ys[i]}): {why}")
                return region

            feats, kept, bad = self._run_batches(len(xs), read, job.name)
            slide_mpp = float(s.mpp)
        attrs = self._attrs(job, slide_mpp, self.tile * self.target_mpp / slide_mpp)
        _write(out, feats, np.stack([xs[kept], ys[kept]], axis=1), None, attrs, self._dim())
        return len(kept), bad

    def tiles(self, job: Job, out: Path) -> tuple[int, int]:
        from PIL import Image

        def read(i: int) -> np.ndarray:
            with Image.open(job.files[i]) as im:
                return np.asarray(im.convert("RGB"))

        feats, kept, bad = self._run_batches(len(job.files), read, job.name)
        names = [Path(job.files[i]).name for i in kept]
        coords = []
        for n in names:
            m = COORDS.search(Path(n).stem)
            coords.append((int(m.group(1)), int(m.group(2))) if m else (-1, -1))
        _write(out, feats, coords, names, self._attrs(job, -1.0, -1.0), self._dim())
        return len(kept), bad

    def _dim(self) -> int:
        c = self.w.model.embed_dim
        return 2 * c if self.mode == "cls+mean" else c

    def _attrs(self, job: Job, slide_mpp: float, level0: float) -> dict:
        tiles = job.kind == "tiles"
        return {"name": job.name, "source": job.path, "magnification": -1.0 if tiles else float(self.mag),
                "mpp": -1.0 if tiles else float(self.target_mpp), "slide_mpp": slide_mpp,
                "patch_size": self.tile, "patch_size_level0": float(level0), "embedding": self.mode,
                "model": self.w.source}


def embed(inputs: list[str], model_path: str, out_dir: str, mag: float = 20.0, tile: int = 224,
          mode: str = "cls+mean", batch_size: int = 64, min_tissue: float = 0.65, mpp: float | None = None,
          device: str = "auto", overwrite: bool = False, step: int | None = None, progress: bool = True,
          log=None) -> EmbedReport:
    from .weights import load_model

    ensure_logging()
    warn, log = log or logger.warning, log or logger.info  # a caller's callback gets both kinds
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model, w = load_model(model_path, step, device=str(dev))
    emb = Embedder(model, w, mag, tile, mode, batch_size, min_tissue, mpp, dev, log, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report, t0 = EmbedReport(), time.perf_counter()
    jobs = find_jobs(inputs)
    for k, job in enumerate(jobs):
        target, marker = out / f"{job.name}.h5", out / f"{job.name}.h5.started"
        if target.exists() and not overwrite:
            report.skipped.append(job.path)
            continue
        if marker.exists() and not overwrite:
            report.failed.append((job.path, "a previous run died inside it"))
            warn(f"embed: skipped {job.path}: a previous run died inside it (reader crash?); delete {marker} "
                "or pass --overwrite to retry")
            continue
        marker.write_text(job.path + "\n")
        try:
            n, bad = (emb.slide if job.kind == "slide" else emb.tiles)(job, target)
        except Exception as exc:  # noqa: BLE001 (one bad slide never stops the run)
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            report.failed.append((job.path, msg))
            warn(f"embed: skipped {msg if job.path in msg else f'{job.path}: {msg}'}")
            marker.unlink(missing_ok=True)
            continue
        marker.unlink(missing_ok=True)
        report.done.append(job.path)
        report.tiles += n
        report.bad_tiles += bad
        log(f"embed [{k + 1}/{len(jobs)}] {job.name}: {n} tiles" + (f", {bad} bad tiles skipped" if bad else "")
            + f" -> {target}")
    report.seconds = time.perf_counter() - t0
    return report
