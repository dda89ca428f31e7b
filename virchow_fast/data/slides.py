"""Whole-slide reading: cuCIM first, OpenSlide for what cuCIM cannot open.

Decisions that follow the measured behaviour of the readers (docs/design.md, "What the slide readers do with
bad files"):
- mpp comes from the Aperio description, then the backend's resolution (OpenSlide's
  ``openslide.mpp-x``, cuCIM's spacing only with a real unit: an empty unit is "no mpp", never
  1 um/px). No mpp and none given -> :class:`SlideError`, one line naming the file.
- Coordinates are level-0 pixels (OpenSlide's convention). Whatever lies outside the slide reads
  as white glass (255): the readers disagree there (transparent / black / exception), ours does not.
- An OpenSlide handle is reopened after any failed read (it stays broken otherwise).
- Absurd headers are refused: a side above ``MAX_SIDE`` or almost no bytes per pixel.
- Every decoded region passes :func:`sane_region` (cuCIM may hand back leftover buffer contents
  for a corrupt tile without an exception). Reads that may crash belong in :mod:`.workers`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_SIDE = 400_000  # px at level 0; the largest real slides are ~200k
MIN_BYTES_PER_PIXEL = 1e-5  # JPEG slides hold ~0.05-1 B/px; a 200k x 200k header over a few KB is not a slide
MAG_TOLERANCE = 0.02  # a level within 2 % of the target mpp serves it without a resize (downsample 2.0003)
BATCH_THREADS = 1  # cuCIM threads per batch read: the reader processes are the parallelism (one core each)
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")


def _import_cucim():
    """``cucim.CuImage``, imported with fds 1/2 silenced: without a GPU driver cuCIM's import prints
    three lines about libcuda/cuFile on every process start, which would drown our one-line reports."""
    import sys

    if "cucim" in sys.modules:
        from cucim import CuImage

        return CuImage
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        from cucim import CuImage
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)
    return CuImage


class SlideError(RuntimeError):
    """A slide that cannot be used; ``str()`` is one line naming the file."""


def _aperio_mpp(description: str) -> float | None:
    m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description or "")
    if m:
        try:
            v = float(m.group(1))
            return v if v > 0 else None
        except ValueError:
            return None
    return None


@dataclass
class Level:
    width: int
    height: int
    downsample: float  # level-0 px per level px, measured from the sizes (non-integral allowed)


class Slide:
    """One opened slide. ``backend`` is "cucim" or "openslide"; ``mpp`` is at level 0."""

    def __init__(self, path: str | os.PathLike, mpp: float | None = None, backend: str = "auto"):
        self.path = str(path)
        p = Path(self.path)
        if not p.is_file():
            raise SlideError(f"{self.path}: no such file")
        size = p.stat().st_size
        if size == 0:
            raise SlideError(f"{self.path}: empty file")
        self._handle = None
        self.backend = ""
        errors = []
        for name in (("cucim", "openslide") if backend == "auto" else (backend,)):
            try:
                self._open(name)
                break
            except Exception as exc:  # noqa: BLE001 (each reader raises its own types)
                errors.append(f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        if not self.backend:
            kind = sniff(self.path)
            what = f"not a slide: {kind}" if kind else "not a readable slide"
            raise SlideError(f"{self.path}: {what} ({'; '.join(errors)})")
        w, h = self.levels[0].width, self.levels[0].height
        if w <= 0 or h <= 0 or max(w, h) > MAX_SIDE:
            raise SlideError(f"{self.path}: refusing absurd size {w} x {h} (max side {MAX_SIDE})")
        if size / (float(w) * h) < MIN_BYTES_PER_PIXEL:
            raise SlideError(f"{self.path}: {w} x {h} px in {size} bytes: header and data disagree "
                             "(truncated or bogus)")
        found = self._find_mpp()
        self.mpp = found or (float(mpp) if mpp else None)  # a given mpp fills in, never overrides metadata
        self.mpp_given = not found
        if not self.mpp:
            raise SlideError(f"{self.path}: no microns-per-pixel in its metadata; give it with --mpp")

    # -- opening -------------------------------------------------------------------------------

    def _open(self, name: str) -> None:
        if name == "cucim":
            img = _import_cucim()(self.path)
            res = img.resolutions
            dims = res["level_dimensions"]
            self._meta = img.metadata if isinstance(img.metadata, dict) else {}
            self._spacing = (img.spacing(), img.spacing_units())
        elif name == "openslide":
            import openslide

            img = openslide.OpenSlide(self.path)
            dims = img.level_dimensions
            self._props = dict(img.properties)
        else:
            raise ValueError(f"unknown backend {name!r}")
        self._handle, self.backend = img, name
        w0 = dims[0][0]
        self.levels = [Level(int(w), int(h), w0 / float(w)) for w, h in dims]

    def _reopen(self) -> None:
        try:
            self.close()
        finally:
            self._open(self.backend)

    def close(self) -> None:
        h, self._handle = self._handle, None
        if h is not None and hasattr(h, "close"):
            h.close()

    def _find_mpp(self) -> float | None:
        if self.backend == "cucim":
            aperio = self._meta.get("aperio", {}) if isinstance(self._meta, dict) else {}
            if aperio.get("MPP"):
                try:
                    return float(aperio["MPP"]) or None
                except ValueError:
                    pass
            tiff = self._meta.get("tiff", {})
            mpp = _aperio_mpp(str(tiff.get("image_description", "")))
            if mpp:
                return mpp
            spacing, units = self._spacing
            unit = (units[0] or "").lower() if units else ""
            factor = {"micrometer": 1.0, "um": 1.0, "micron": 1.0, "millimeter": 1e3, "mm": 1e3,
                      "centimeter": 1e4, "cm": 1e4, "nanometer": 1e-3, "nm": 1e-3}.get(unit)
            if factor and spacing and spacing[0] > 0:
                return float(spacing[0]) * factor
            return None
        v = self._props.get("openslide.mpp-x") or ""
        try:
            return float(v) or None
        except ValueError:
            return _aperio_mpp(self._props.get("tiff.ImageDescription", ""))

    # -- geometry ------------------------------------------------------------------------------

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.levels[0].width, self.levels[0].height

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.levels[level].downsample

    def choose_level(self, target_mpp: float) -> tuple[int, float] | None:
        """(level, resize factor) for ``target_mpp``; None when even level 0 is coarser than it.

        The level is the one whose mpp is closest at or below the target (a level within
        MAG_TOLERANCE of the target counts as matching: factor 1, no resize). Otherwise the region is
        read at that finer level, ``factor = target / level mpp`` larger, and resized down.
        """
        best = None
        for i in range(len(self.levels)):
            m = self.level_mpp(i)
            if m <= target_mpp * (1 + MAG_TOLERANCE) and (best is None or m > self.level_mpp(best)):
                best = i
        if best is None:
            return None
        m = self.level_mpp(best)
        factor = 1.0 if abs(m / target_mpp - 1) <= MAG_TOLERANCE else target_mpp / m
        return best, factor

    # -- reading -------------------------------------------------------------------------------

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 [height, width, 3] at ``level`` from level-0 position (x, y); outside = white."""
        lev = self.levels[level]
        ds = lev.downsample
        # the part inside the slide, in level pixels
        lx0, ly0 = int(np.floor(x / ds)), int(np.floor(y / ds))
        ix0, iy0 = max(lx0, 0), max(ly0, 0)
        ix1, iy1 = min(lx0 + width, lev.width), min(ly0 + height, lev.height)
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        if ix1 <= ix0 or iy1 <= iy0:
            return out
        loc = (int(round(ix0 * ds)), int(round(iy0 * ds))) if (ix0, iy0) != (lx0, ly0) else (int(x), int(y))
        try:
            region = self._read_raw(loc, level, ix1 - ix0, iy1 - iy0)
        except Exception as exc:  # noqa: BLE001
            if self.backend == "openslide":
                try:
                    self._reopen()
                except Exception:  # noqa: BLE001
                    pass
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SlideError(f"{self.path}: read failed at level {level} ({x}, {y}) {width}x{height}: {msg}") from None
        out[iy0 - ly0:iy1 - ly0, ix0 - lx0:ix1 - lx0] = region
        return out

    def inside(self, x: int, y: int, level: int, width: int, height: int) -> bool:
        """Whether the region lies wholly inside ``level`` (what :meth:`read` would read unpadded from (x, y))."""
        lev = self.levels[level]
        lx0, ly0 = int(np.floor(x / lev.downsample)), int(np.floor(y / lev.downsample))
        return lx0 >= 0 and ly0 >= 0 and lx0 + width <= lev.width and ly0 + height <= lev.height

    def read_batch(self, xys: list[tuple[int, int]], level: int, width: int, height: int,
                   num_workers: int = BATCH_THREADS) -> list[np.ndarray]:
        """:meth:`read` of many regions of one size at one level, the same pixels.

        cuCIM: the regions wholly inside the level in one batch ``read_region`` (a list of
        locations; cuCIM yields arrays from its own buffers, copied here at once), the others (the
        white edge policy) one by one. OpenSlide: one by one. A failed batch raises
        :class:`SlideError` for the whole batch: the caller reads per region to isolate the bad one.
        """
        out: list[np.ndarray | None] = [None] * len(xys)
        batch = [i for i, (x, y) in enumerate(xys) if self.inside(x, y, level, width, height)]
        if self.backend != "cucim" or len(batch) < 2:
            batch = []
        if batch:
            locs = [(int(xys[i][0]), int(xys[i][1])) for i in batch]
            try:
                it = self._handle.read_region(location=locs, size=(width, height), level=level,
                                              num_workers=max(1, num_workers), batch_size=len(locs))
                arrs = [np.array(a, copy=True) for a in it]  # cuCIM reuses its buffers: copy at once
                arrs = [a.reshape(-1, height, width, a.shape[-1]) for a in arrs]
                arr = np.concatenate(arrs) if len(arrs) > 1 else arrs[0]
            except Exception as exc:  # noqa: BLE001
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise SlideError(f"{self.path}: batch read of {len(locs)} regions failed at level {level}: "
                                 f"{msg}") from None
            if arr.shape[0] != len(locs):
                raise SlideError(f"{self.path}: cuCIM returned {arr.shape[0]} regions for {len(locs)}")
            for k, i in enumerate(batch):
                out[i] = np.ascontiguousarray(arr[k, ..., :3])
        for i, (x, y) in enumerate(xys):
            if out[i] is None:
                out[i] = self.read(int(x), int(y), level, width, height)
        return out

    def _read_raw(self, loc: tuple[int, int], level: int, w: int, h: int) -> np.ndarray:
        if self.backend == "cucim":
            a = np.asarray(self._handle.read_region(location=loc, size=(w, h), level=level))
            if a.ndim != 3 or a.shape[:2] != (h, w):
                raise SlideError(f"{self.path}: cuCIM returned shape {a.shape} for {w}x{h}")
            return a[..., :3]
        rgba = np.asarray(self._handle.read_region(loc, level, (w, h)))
        rgb = rgba[..., :3].astype(np.uint16)
        alpha = rgba[..., 3:4].astype(np.uint16)
        # OpenSlide returns premultiplied-then-unpremultiplied RGBA; composite on white
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)

    def read_context(self, x: int, y: int, target_mpp: float, size: int,
                     choice: tuple[int, float] | None = None) -> np.ndarray:
        """A ``size`` px square at ``target_mpp`` whose top-left is level-0 (x, y)."""
        choice = choice or self.choose_level(target_mpp)
        if choice is None:
            raise SlideError(f"{self.path}: {target_mpp} um/px is finer than the slide's {self.mpp:.4f}")
        level, factor = choice
        if factor == 1.0:
            return self.read(x, y, level, size, size)
        n = int(round(size * factor))
        region = self.read(x, y, level, n, n)
        return resize(region, size)

    def thumbnail_level(self, max_side: int = 2048) -> int:
        """The finest level whose larger side is at most ``max_side`` (the coarsest when none is)."""
        for i, lev in enumerate(self.levels):
            if max(lev.width, lev.height) <= max_side:
                return i
        return len(self.levels) - 1

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resize(region: np.ndarray, size: int) -> np.ndarray:
    """Antialiased (area/bicubic) resize of an RGB uint8 square to ``size``."""
    from PIL import Image

    return np.asarray(Image.fromarray(region).resize((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0))


def sane_region(region: np.ndarray, shape: tuple[int, int]) -> str | None:
    """Why a decoded region is not trustworthy, or None. Cheap: shape, dtype, zero-filled area.

    Glass is white and stained tissue is never pure black, so a region that is more than a quarter
    exact (0, 0, 0) is a failed decode (leftover or zeroed buffer), not tissue.
    """
    if region is None or region.dtype != np.uint8 or region.shape != (shape[0], shape[1], 3):
        return f"bad shape/dtype {None if region is None else (region.shape, region.dtype)}"
    sub = region[::4, ::4]
    black = np.count_nonzero(sub.max(axis=-1) == 0) / (sub.shape[0] * sub.shape[1])
    if black > 0.25:
        return f"{black:.0%} of the region is exact black (failed decode)"
    return None


# leading bytes of files people mistake for slides (a slide is a TIFF, or a vendor format OpenSlide knows)
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"PK\x03\x04", "a ZIP archive"),
          (b"\x1f\x8b", "a gzip file"), (b"%PDF", "a PDF document"), (b"GIF8", "a GIF image"), (b"BM", "a BMP image"),
          (b"\x89HDF", "an HDF5 file"), (b"<?xml", "an XML file"), (b"7z\xbc\xaf", "a 7-Zip archive"),
          (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"), (b"DICM", "a DICOM file"))


def sniff(path: str | os.PathLike) -> str | None:
    """What a file that no reader opens looks like from its first bytes ("a PNG image", ...), or None for
    a TIFF (a damaged slide, most likely) or something unrecognised."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return None
    if head[128:132] == b"DICM":
        return "a DICOM file"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text[:200]:
        return "an HTML page (a download that failed?)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "a text file"


def gather_slides(paths: list[str] | tuple[str, ...]) -> tuple[list[str], list[tuple[str, str]]]:
    """(slide files, problems): the files given, plus slide files (by suffix) under the folders given,
    sorted; problems are (path, one line): a path that does not exist, a folder without slides, a folder
    named like a slide file (its contents are searched too)."""
    out: list[str] = []
    problems: list[tuple[str, str]] = []
    for p in paths:
        q = Path(p)
        if q.is_dir():
            found = []
            for f in sorted(q.rglob("*")):
                if f.suffix.lower() in SLIDE_SUFFIXES:
                    if f.is_file():
                        found.append(str(f))
                    elif f.is_dir() and f.suffix.lower() != ".mrxs":
                        problems.append((str(f), f"{f}: a folder named like a slide file, not a slide"))
            if not found:
                what = "a folder named like a slide file" if q.suffix.lower() in SLIDE_SUFFIXES else "a folder"
                problems.append((str(q), f"{q}: {what}, with no slide files ({', '.join(SLIDE_SUFFIXES)}) in it"))
            out.extend(found)
        elif not q.exists():
            problems.append((str(q), f"{q}: no such file or folder"))
        else:
            out.append(str(q))
    seen: set[str] = set()  # a slide named twice (or inside two given folders) is indexed once
    unique = [f for f in out if not (os.path.realpath(f) in seen or seen.add(os.path.realpath(f)))]
    return unique, problems


def find_slides(paths: list[str] | tuple[str, ...]) -> list[str]:
    """The slide files of :func:`gather_slides`."""
    return gather_slides(paths)[0]
