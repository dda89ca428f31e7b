"""Labelled tile sets for evaluation: an ImageFolder tree, a CSV of path,label, or PCam's HDF5 files.

- ImageFolder (NCT-CRC-HE-100K's layout): ``root/<class>/<tile>.{png,jpg,jpeg,tif,tiff}``; classes
  are the sub-folder names, sorted.
- CSV: rows ``path,label`` (a ``path,label`` header is skipped); relative paths are relative to
  the CSV's folder; classes are the labels, sorted.
- PCam: ``..._x.h5`` (dataset ``x``: [N, 96, 96, 3] uint8) with its ``..._y.h5`` beside it (dataset
  ``y``: [N, 1, 1, 1]), or one ``.h5`` holding both; classes "0" and "1" (1 = metastatic tissue).

Validation and test sets take the training set's class list; a label it does not know is an
error naming the file and the label. A tile that does not decode is skipped and counted.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class DatasetError(ValueError):
    """A labelled set that cannot be used; ``str()`` is one line naming the file."""


@dataclass
class LabelledSet:
    source: str
    classes: list[str]
    labels: np.ndarray  # [N] int64 indices into classes
    paths: list[str] = field(default_factory=list)  # image files (ImageFolder, CSV)
    h5: tuple[str, str] | None = None  # (file, dataset) of the images (PCam)
    index: np.ndarray | None = None  # [N] rows of the HDF5 dataset

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """Tile i as RGB uint8 [H, W, 3]; raises on a file that does not decode."""
        if self.h5 is not None:
            import h5py

            if not hasattr(self, "_h5"):
                self._h5 = h5py.File(self.h5[0], "r")[self.h5[1]]
            return np.asarray(self._h5[int(self.index[i])])[..., :3]
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return np.asarray(im.convert("RGB"))

    def subset(self, rows: np.ndarray) -> "LabelledSet":
        out = LabelledSet(self.source, self.classes, self.labels[rows],
                          [self.paths[i] for i in rows] if self.paths else [], self.h5,
                          self.index[rows] if self.index is not None else None)
        return out

    def balanced_subset(self, n: int, seed: int = 0) -> "LabelledSet":
        """At most ``n`` tiles, classes as even as the set allows (seeded)."""
        if len(self) <= n:
            return self
        rng = np.random.default_rng(seed)
        per_class = [rng.permutation(np.flatnonzero(self.labels == c)) for c in range(len(self.classes))]
        order = [rows[i] for i in range(max(map(len, per_class))) for rows in per_class if i < len(rows)]
        return self.subset(np.sort(np.array(order[:n])))


def _indices(names: list[str], classes: list[str], source: str) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    for name in names:
        if name not in lookup:
            raise DatasetError(f"{source}: label {name!r} is not a class of the training set ({', '.join(classes)})")
    return np.array([lookup[n] for n in names], dtype=np.int64)


def _image_folder(root: Path, classes: list[str] | None) -> LabelledSet:
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    paths, names = [], []
    for d in dirs:
        for f in sorted(d.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(f))
                names.append(d.name)
    if not paths:
        raise DatasetError(f"{root}: no class folders with {'/'.join(IMAGE_SUFFIXES)} images")
    classes = classes or sorted(set(names))
    return LabelledSet(str(root), classes, _indices(names, classes, str(root)), paths)


def _csv(path: Path, classes: list[str] | None) -> LabelledSet:
    rows = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or (i == 0 and [c.strip().lower() for c in row[:2]] == ["path", "label"]):
                continue
            if len(row) < 2:
                raise DatasetError(f"{path}: line {i + 1}: expected path,label, got {row!r}")
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise DatasetError(f"{path}: no path,label rows")
    paths = [str(p if Path(p).is_absolute() else path.parent / p) for p, _ in rows]
    names = [label for _, label in rows]
    classes = classes or sorted(set(names))
    return LabelledSet(str(path), classes, _indices(names, classes, str(path)), paths)


def _pcam(path: Path, classes: list[str] | None) -> LabelledSet:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            keys = set(f.keys())
            y_file = path if "y" in keys else path.with_name(path.name.replace("_x.h5", "_y.h5"))
            if "x" not in keys:
                raise DatasetError(f"{path}: no 'x' dataset (PCam images)")
            n = f["x"].shape[0]
        if y_file == path and "y" not in keys or not y_file.is_file():
            raise DatasetError(f"{path}: no labels: expected a 'y' dataset or {y_file.name} beside it")
        with h5py.File(y_file, "r") as f:
            y = np.asarray(f["y"]).reshape(-1).astype(np.int64)
    except OSError as exc:
        raise DatasetError(f"{path}: not a readable HDF5 file ({str(exc).splitlines()[0]})") from None
    if len(y) != n:
        raise DatasetError(f"{y_file}: {len(y)} labels for {n} images")
    classes = classes or ["0", "1"]
    return LabelledSet(str(path), classes, _indices([str(v) for v in y], classes, str(y_file)),
                       h5=(str(path), "x"), index=np.arange(n))


def open_labelled(path: str | Path, classes: list[str] | None = None) -> LabelledSet:
    """The labelled set at ``path`` (format from its kind); ``classes`` from the training set."""
    p = Path(path)
    if p.is_dir():
        return _image_folder(p, classes)
    if not p.is_file():
        raise DatasetError(f"{p}: no such file or folder")
    if p.suffix.lower() == ".csv":
        return _csv(p, classes)
    if p.suffix.lower() in (".h5", ".hdf5"):
        return _pcam(p, classes)
    raise DatasetError(f"{p}: expected an ImageFolder tree, a .csv of path,label or a PCam .h5")
