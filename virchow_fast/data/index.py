"""The tile index: for each slide, every context tile worth reading, at every magnification.

One ``.npz`` per slide (numpy's zip of columns, no extra dependency), columns of equal length:
``mag`` float32, ``level`` int16, ``x`` ``y`` int64 (level-0 top-left of the context),
``read`` int32 (px read at ``level``; != context size means a resize), ``tissue`` float32; plus
scalars ``slide`` (path), ``slide_mpp``, ``width``, ``height``, ``backend``, ``source_size`` and
``source_mtime``; and the settings it was built with: ``context``, ``settings_mags``,
``settings_mag_mpp``, ``min_tissue``, ``mpp_from`` ("metadata" or "given": a user-given mpp only
matters for a slide without one). A re-run skips a slide whose index matches the file and the
settings, and rebuilds the index (a derived file) when either changed.

Tiles form a grid of contexts (``context`` px at the target mpp) lying wholly inside the slide,
so no tile ever reads past an edge; the tissue fraction is measured over the whole context.
A magnification finer than the slide's own mpp is not indexed (it would be an upsampled fake).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .records import DataError
from .slides import Slide, SlideError
from .tissue import tile_fractions, tissue_mask

INDEX_VERSION = 2  # 2: the build settings are stored
MAX_TILES_PER_MAG = 2_000_000  # a grid larger than this is a bogus header, not a slide


@dataclass
class IndexSettings:
    mags: tuple[float, ...] = (40.0, 20.0, 10.0, 5.0)
    mag_mpp: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    context: int = 392
    min_tissue: float = 0.65
    mpp: float | None = None  # user-given mpp for slides without one

    def differences(self, z, exact: bool = True) -> list[str]:
        """How the index ``z`` (npz columns) was built differently from these settings ([] = current).

        ``exact=False`` (training): an index that also holds other magnifications serves too.
        """
        out = []
        if int(z["context"]) != self.context:
            out.append(f"context {int(z['context'])} -> {self.context}")
        have = {float(m): float(v) for m, v in zip(z["settings_mags"], z["settings_mag_mpp"], strict=True)}
        want = {float(m): float(v) for m, v in zip(self.mags, self.mag_mpp, strict=True)}
        same = all(m in have and abs(have[m] - v) <= 1e-6 * v for m, v in want.items())
        if not same or (exact and set(have) != set(want)):
            out.append(f"mags/mpp {_fmt(have)} -> {_fmt(want)}")
        if abs(float(z["min_tissue"]) - self.min_tissue) > 1e-9:
            out.append(f"min-tissue {float(z['min_tissue']):g} -> {self.min_tissue:g}")
        if str(z["mpp_from"]) == "given" and abs(float(z["slide_mpp"]) - (self.mpp or 0.0)) > 1e-12:
            out.append(f"mpp {float(z['slide_mpp']):g} -> {self.mpp or 'none'}")
        return out


def _fmt(mags: dict[float, float]) -> str:
    return ",".join(f"{m:g}@{v:g}" for m, v in mags.items())


def index_name(slide_path: str) -> str:
    """<stem>-<8 hex of the absolute path>: unique per file, readable."""
    digest = hashlib.sha1(os.path.abspath(slide_path).encode()).hexdigest()[:8]
    return f"{Path(slide_path).stem}-{digest}"


def _tissue_level(slide: Slide) -> tuple[np.ndarray, int]:
    level = slide.thumbnail_level(2048)
    lev = slide.levels[level]
    if lev.width * lev.height > 8192 * 8192:
        raise SlideError(f"{slide.path}: no level small enough for a tissue mask (coarsest {lev.width}x{lev.height})")
    return slide.read(0, 0, level, lev.width, lev.height), level


def index_slide(path: str, settings: IndexSettings) -> tuple[dict, np.ndarray, np.ndarray]:
    """(columns, thumbnail RGB, tissue mask) for one slide; raises SlideError with one line."""
    with Slide(path, mpp=settings.mpp) as slide:
        thumb, tlevel = _tissue_level(slide)
        scale = slide.levels[tlevel].downsample
        mask = tissue_mask(thumb, slide.level_mpp(tlevel))
        width, height = slide.dimensions
        cols: dict[str, list] = {k: [] for k in ("mag", "level", "x", "y", "read", "tissue")}
        for mag, target in zip(settings.mags, settings.mag_mpp, strict=False):
            choice = slide.choose_level(target)
            if choice is None:
                continue
            level, factor = choice
            side = settings.context * target / slide.mpp  # context side in level-0 px
            nx, ny = int((width - side) // side) + 1, int((height - side) // side) + 1
            if side > width or side > height or nx * ny == 0:
                continue
            if nx * ny > MAX_TILES_PER_MAG:
                raise SlideError(f"{path}: {nx * ny} tiles at {mag}x: refusing (cap {MAX_TILES_PER_MAG})")
            gx, gy = np.meshgrid(np.arange(nx) * side, np.arange(ny) * side)
            xs, ys = gx.ravel(), gy.ravel()
            frac = tile_fractions(mask, scale, xs, ys, side)
            keep = frac >= settings.min_tissue
            n = int(keep.sum())
            read_px = settings.context if factor == 1.0 else int(round(settings.context * factor))
            cols["mag"].append(np.full(n, mag, np.float32))
            cols["level"].append(np.full(n, level, np.int16))
            cols["x"].append(np.floor(xs[keep]).astype(np.int64))
            cols["y"].append(np.floor(ys[keep]).astype(np.int64))
            cols["read"].append(np.full(n, read_px, np.int32))
            cols["tissue"].append(frac[keep])
        dtypes = {"mag": np.float32, "level": np.int16, "x": np.int64, "y": np.int64, "read": np.int32,
                  "tissue": np.float32}
        out = {k: (np.concatenate(v).astype(dtypes[k]) if v else np.zeros(0, dtypes[k])) for k, v in cols.items()}
        st = os.stat(path)
        out.update(slide=np.array(os.path.abspath(path)), slide_mpp=np.float64(slide.mpp), width=np.int64(width),
                   height=np.int64(height), backend=np.array(slide.backend), context=np.int32(settings.context),
                   source_size=np.int64(st.st_size), source_mtime=np.float64(st.st_mtime),
                   version=np.int32(INDEX_VERSION), settings_mags=np.asarray(settings.mags, np.float64),
                   settings_mag_mpp=np.asarray(settings.mag_mpp, np.float64),
                   min_tissue=np.float64(settings.min_tissue),
                   mpp_from=np.array("given" if slide.mpp_given else "metadata"))
        return out, thumb, np.float64(scale)


THUMB_SIDE = (512, 1024)  # the thumbnail's longer side is brought into this range (px)
MAG_COLOURS = {40.0: (0, 160, 0), 20.0: (0, 0, 220), 10.0: (230, 120, 0), 5.0: (200, 0, 0)}


def draw_thumbnail(thumb: np.ndarray, cols: dict, scale: float, context: int, slide_mpp: float,
                   mag_mpp: dict[float, float]) -> "Image.Image":  # noqa: F821
    """The low-res level, 512-1024 px on its longer side, each kept tile outlined in its
    magnification's colour, and a legend below: colour, magnification, um/px and tile count."""
    from PIL import Image, ImageDraw

    h, w = thumb.shape[:2]
    zoom = min(max(1.0, THUMB_SIDE[0] / max(h, w)), THUMB_SIDE[1] / max(h, w))
    img = Image.fromarray(thumb)
    if zoom != 1.0:
        img = img.resize((max(1, round(w * zoom)), max(1, round(h * zoom))), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(img)
    mags = sorted({float(m) for m in cols["mag"]} | set(mag_mpp), reverse=True)
    for mag in sorted(mags):  # coarse (large) tiles first, fine ones drawn over them
        side = context * mag_mpp.get(mag, slide_mpp) / slide_mpp / scale * zoom
        width = 2 if side >= 8 else 1
        for x, y in zip(cols["x"][cols["mag"] == mag], cols["y"][cols["mag"] == mag], strict=True):
            x0, y0 = x / scale * zoom, y / scale * zoom
            draw.rectangle([x0, y0, x0 + side, y0 + side], outline=MAG_COLOURS.get(mag, (0, 0, 0)), width=width)
    row = 18
    canvas = Image.new("RGB", (max(img.width, 260), img.height + row * len(mags) + 6), (255, 255, 255))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, mag in enumerate(mags):
        y = img.height + 4 + i * row
        n = int(np.count_nonzero(cols["mag"] == mag))
        draw.rectangle([6, y + 2, 20, y + 14], outline=MAG_COLOURS.get(mag, (0, 0, 0)), width=3)
        draw.text((28, y + 2), f"{mag:g}x ({mag_mpp.get(mag, slide_mpp):g} um/px): {n} tiles", fill=(0, 0, 0))
    return canvas


def write_index(path: str, out_dir: str | Path, settings: IndexSettings) -> Path:
    """Index one slide into ``out_dir`` (npz + png, written atomically); returns the npz path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = index_name(path)
    cols, thumb, scale = index_slide(path, settings)
    png = draw_thumbnail(thumb, cols, float(scale), settings.context, float(cols["slide_mpp"]),
                         dict(zip(settings.mags, settings.mag_mpp, strict=False)))
    png.save(out_dir / f"{name}.png")
    target = out_dir / f"{name}.npz"
    tmp = out_dir / f"{name}.tmp.npz"
    np.savez(tmp, **cols)
    os.replace(tmp, target)
    return target


def index_file(slide_path: str, out_dir: str | Path) -> Path:
    return Path(out_dir) / f"{index_name(slide_path)}.npz"


def index_state(path: str, out_dir: str | Path, settings: IndexSettings, exact: bool = True) -> str:
    """"current", "missing", or why the index of ``path`` in ``out_dir`` must be rebuilt (one phrase)."""
    target = index_file(path, out_dir)
    if not target.is_file():
        return "missing"
    try:
        with np.load(target) as z:
            if int(z["version"]) != INDEX_VERSION:
                return f"index format {int(z['version'])} -> {INDEX_VERSION}"
            st = os.stat(path)
            if int(z["source_size"]) != st.st_size or float(z["source_mtime"]) != st.st_mtime:
                return "the slide changed since"
            diff = settings.differences(z, exact)
            return "settings " + ", ".join(diff) if diff else "current"
    except Exception as exc:  # noqa: BLE001 (a broken index is rebuilt)
        return f"unreadable index ({type(exc).__name__})"


def is_done(path: str, out_dir: str | Path, settings: IndexSettings | None = None) -> bool:
    """True when ``out_dir`` holds a complete index of ``path``, current for the file and ``settings``."""
    return index_state(path, out_dir, settings or IndexSettings()) == "current"


def read_part(f: str | Path) -> dict:
    """One slide index as a dict of numpy columns; :class:`DataError` with one line naming the file."""
    try:
        with np.load(f) as z:
            part = {k: z[k] for k in z.files}
        missing = {"mag", "level", "x", "y", "read", "slide", "slide_mpp", "context"} - part.keys()
        if missing:
            raise ValueError(f"missing columns {sorted(missing)}")
    except Exception as exc:  # noqa: BLE001 (any unreadable file is one line naming it)
        raise DataError(f"{f}: not a usable tile index ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    return part


def load_index(index_dir: str | Path, files: list[Path] | None = None) -> list[dict]:
    """The slide indexes ``files`` (default: every ``.npz`` in ``index_dir``, sorted by file name)."""
    if files is None:
        files = [f for f in sorted(Path(index_dir).glob("*.npz")) if not f.name.endswith(".tmp.npz")]
    return [read_part(f) for f in files]
