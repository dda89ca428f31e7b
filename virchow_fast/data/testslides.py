"""Generated whole-slide images for tests, benchmarks and the demo.

A generated slide is what the readers meet in the wild, small: a pyramidal, tiled, JPEG-compressed
TIFF with levels at downsample 2, an Aperio-style ImageDescription (``AppMag``, ``MPP``) and
resolution tags in centimetres, so cuCIM, OpenSlide and tiffslide all see the levels and the mpp.
Content is H&E-like (pink stroma with purple nuclei from :mod:`.synthetic`) inside a tissue layout
on a near-white background; the layout is returned so tests know the true tissue mask.

Layouts: ``blobs`` (a few irregular tissue pieces), ``halves`` (left half tissue, right half
glass: the known layout of the tissue test), ``blank`` (glass only, with noise).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .synthetic import BACKGROUND, he_image

_BLOCK = 512


def tissue_layout(layout: str, height: int, width: int, seed: int = 0) -> np.ndarray:
    """The true tissue mask [height, width] bool of a generated slide."""
    if layout == "blank":
        return np.zeros((height, width), dtype=bool)
    if layout == "halves":
        mask = np.zeros((height, width), dtype=bool)
        mask[:, : width // 2] = True
        return mask
    if layout == "full":
        return np.ones((height, width), dtype=bool)
    if layout != "blobs":
        raise ValueError(f"unknown layout {layout!r} (blobs | halves | full | blank)")
    rng = np.random.default_rng([seed, 11])
    step = 8  # the layout is drawn on a grid 8x coarser, then repeated (fast, edges 8 px steps)
    hc, wc = -(-height // step), -(-width // step)
    yy, xx = np.mgrid[0:hc, 0:wc].astype(np.float32) * step
    mask = np.zeros((hc, wc), dtype=bool)
    for _ in range(3):  # ellipses with wobbly edges
        cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.18, 0.3) * height, rng.uniform(0.12, 0.25) * width
        angle = np.arctan2(yy - cy, xx - cx)
        wobble = 1 + 0.12 * np.sin(3 * angle + rng.uniform(0, 6)) + 0.06 * np.sin(7 * angle + rng.uniform(0, 6))
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < wobble ** 2
    return np.repeat(np.repeat(mask, step, 0), step, 1)[:height, :width]


def render_level0(height: int, width: int, mpp: float, layout: str = "blobs", seed: int = 0) -> np.ndarray:
    """H&E-like RGB [height, width, 3] uint8 at ``mpp``, tissue where the layout says."""
    mask = tissue_layout(layout, height, width, seed)
    mag = 10.0 / mpp
    # a pool of rendered tissue blocks, placed with random flips/transposes: seconds, not minutes
    pool_rng = np.random.default_rng([seed, 5])
    pool = [he_image(pool_rng, _BLOCK, mag, tissue_fraction=1.01) for _ in range(12)]
    glass_pool = [np.clip(BACKGROUND + pool_rng.normal(0, 3.0, (_BLOCK, _BLOCK, 3)), 0, 255).astype(np.uint8)
                  for _ in range(4)]
    img = np.empty((height, width, 3), dtype=np.uint8)
    for y in range(0, height, _BLOCK):
        for x in range(0, width, _BLOCK):
            h, w = min(_BLOCK, height - y), min(_BLOCK, width - x)
            rng = np.random.default_rng([seed, y, x])
            block = mask[y:y + h, x:x + w]
            glass = np.rot90(glass_pool[int(rng.integers(len(glass_pool)))], int(rng.integers(4)))[:h, :w]
            if block.any():
                tile = pool[int(rng.integers(len(pool)))]
                tile = np.rot90(tile, int(rng.integers(4)))[:h, :w]
                img[y:y + h, x:x + w] = np.where(block[..., None], tile, glass)
            else:
                img[y:y + h, x:x + w] = glass
    return img


def _halve(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    x = img[:h, :w].astype(np.uint16)
    return ((x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2] + 2) // 4).astype(np.uint8)


def write_slide(path: str | Path, level0: np.ndarray, mpp: float | None, tile: int = 256, quality: int = 85,
                min_level_side: int = 512, aperio: bool = True, reduced_subfiletype: int | None = None) -> Path:
    """Write ``level0`` as a pyramidal tiled JPEG TIFF; levels halve until a side < ``min_level_side``.

    ``mpp=None`` writes neither the MPP key nor resolution tags (a slide without mpp).
    NewSubfileType of reduced levels (measured with cuCIM 26.10, OpenSlide 4.0.1, tiffslide 3.0.1):
    in an Aperio-style file 0, as scanners write it (1 hides the levels from tiffslide), with the
    stripped thumbnail as page 1; in a generic pyramidal TIFF 1 (0 makes cuCIM refuse the file).
    """
    if reduced_subfiletype is None:
        reduced_subfiletype = 0 if aperio else 1
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = level0.shape[:2]
    if aperio:
        desc = (f"Aperio Image Library v10.0.51\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
                f"JPEG/RGB Q={quality}")
        desc += f"|AppMag = {round(10.0 / mpp) if mpp else 20}"
        if mpp:
            desc += f"|MPP = {mpp:.4f}"
    else:
        desc = "virchow-fast generated slide"
    levels = [level0]
    while min(levels[-1].shape[:2]) // 2 >= min_level_side:
        levels.append(_halve(levels[-1]))
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=False) as tw:
        for i, lev in enumerate(levels):
            if i == 1 and aperio:
                # Aperio files carry a stripped thumbnail as their second page; tifffile (hence
                # tiffslide) reads page 1 of an Aperio file as that thumbnail, never as a level.
                thumb = levels[-1]
                tw.write(thumb, compression="jpeg", compressionargs={"level": quality}, photometric="rgb",
                         subfiletype=1, rowsperstrip=16, description=desc.split("|")[0] + " -> thumbnail",
                         metadata=None)
            kw = {}
            if mpp:
                res = 1e4 / (mpp * level0.shape[1] / lev.shape[1])
                kw = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tw.write(lev, tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                     photometric="rgb", subfiletype=0 if i == 0 else reduced_subfiletype,
                     description=desc if i == 0 else None, metadata=None, **kw)
    tmp.replace(path)
    return path


def make_slide(path: str | Path, width: int = 8192, height: int = 6144, mpp: float | None = 0.25,
               layout: str = "blobs", seed: int = 0, **kw) -> Path:
    """Render and write one generated slide; returns its path. ~8k x 6k takes seconds, a few MB."""
    img = render_level0(height, width, mpp or 0.25, layout, seed)
    return write_slide(path, img, mpp, **kw)


def make_demo_slides(folder: str | Path, n: int = 3, width: int = 4096, height: int = 3072,
                     mpp: float = 0.25, seed: int = 0) -> list[Path]:
    """A few small generated slides in ``folder`` (written once; existing ones are kept)."""
    folder = Path(folder)
    out = []
    for i in range(n):
        p = folder / f"demo_{i}.tiff"
        if not p.exists():
            make_slide(p, width, height, mpp, "blobs", seed + i)
        out.append(p)
    return out
