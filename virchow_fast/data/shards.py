"""WebDataset tar shards of JPEG contexts, with DALI's index files, validated as they are written.

Each sample is ``<key>.jpg`` (a ``context`` px square at the target mpp, JPEG), ``<key>.json``
(slide, magnification, level, x, y, tissue) and ``<key>.mag`` (the magnification, float32, for
DALI's webdataset reader). Beside each ``shard-NNNNNN.tar`` lies its DALI index
``shard-NNNNNN.idx`` (wds2idx format v1.2: ``ext offset size name`` per component), and the folder
holds ``catalogue.npz`` (shard, jpg offset/size, magnification, key per sample) for the trainer's
seeded, magnification-weighted sampling.

Validation at write time, so no bad member reaches DALI (one bad JPEG fails a whole DALI batch):
every JPEG is decoded back before it is written, tiles that fail their read or decode are
reported and left out, and each finished tar is re-opened and checked against its index.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np

from .index import load_index
from .sources import decode_jpeg
from .workers import ReadFailure, ReadPool


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpeg8_encode(rgb, level=quality))


class ShardWriter:
    def __init__(self, out_dir: str | Path, samples_per_shard: int = 1000):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.per_shard = samples_per_shard
        self.shards: list[str] = []
        self.rows: dict[str, list] = {"shard": [], "offset": [], "size": [], "mag": [], "key": []}
        self._tar = None
        self._idx_lines: list[str] = []
        self._n = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):06d}.tar"
        self.shards.append(name)
        self._tar = tarfile.open(self.dir / (name + ".tmp"), "w", format=tarfile.USTAR_FORMAT)
        self._idx_lines, self._n = [], 0

    def add(self, key: str, jpeg: bytes, meta: dict) -> None:
        if self._tar is None:
            self._open()
        members = []
        mag = np.float32(meta["mag"]).tobytes()  # for DALI's webdataset reader (dtypes FLOAT)
        for ext, data in (("jpg", jpeg), ("json", json.dumps(meta).encode()), ("mag", mag)):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            off = self._tar.offset + len(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
            self._tar.addfile(info, io.BytesIO(data))
            members.append(f"{ext} {off} {len(data)} {key}.{ext}")
            if ext == "jpg":
                self.rows["shard"].append(len(self.shards) - 1)
                self.rows["offset"].append(off)
                self.rows["size"].append(len(data))
                self.rows["mag"].append(float(meta["mag"]))
                self.rows["key"].append(key)
        self._idx_lines.append(" ".join(members))
        self._n += 1
        if self._n >= self.per_shard:
            self._close()

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = self.shards[-1]
        tmp = self.dir / (name + ".tmp")
        idx = self.dir / name.replace(".tar", ".idx")
        idx.write_text(f"v1.2 {len(self._idx_lines)}\n" + "\n".join(self._idx_lines) + "\n")
        validate_shard(tmp, idx)
        os.replace(tmp, self.dir / name)
        self._tar = None

    def close(self) -> Path:
        self._close()
        cat = self.dir / "catalogue.npz"
        np.savez(cat, shards=np.array(self.shards), shard=np.array(self.rows["shard"], np.int32),
                 offset=np.array(self.rows["offset"], np.int64), size=np.array(self.rows["size"], np.int64),
                 mag=np.array(self.rows["mag"], np.float32), key=np.array(self.rows["key"]))
        return cat


def validate_shard(tar_path: str | Path, idx_path: str | Path) -> int:
    """Re-read a tar against its DALI index: member names, offsets and sizes, JPEGs decodable."""
    lines = Path(idx_path).read_text().splitlines()
    version, count = lines[0].split()
    if version != "v1.2" or int(count) != len(lines) - 1:
        raise ValueError(f"{idx_path}: bad index header {lines[0]!r}")
    with tarfile.open(tar_path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for line in lines[1:]:
            parts = line.split()
            for j in range(0, len(parts), 4):
                ext, off, size, name = parts[j:j + 4]
                m = members.get(name)
                if m is None or m.offset_data != int(off) or m.size != int(size):
                    raise ValueError(f"{tar_path}: member {name} does not match its index entry")
                if ext == "jpg":
                    f = tar.extractfile(m)
                    decode_jpeg(f.read())
    return int(count)


def write_shards(index_dir: str | Path, out_dir: str | Path, workers: int = 2, samples_per_shard: int = 1000,
                 quality: int = 90, log=None) -> tuple[int, int]:
    """Every indexed tile as a JPEG context in shards; returns (written, skipped)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    writer = ShardWriter(out_dir, samples_per_shard)
    pool = ReadPool(workers)
    written = skipped = 0
    try:
        for part in load_index(index_dir):
            slide = str(part["slide"])
            context = int(part["context"])
            n = len(part["x"])
            for start in range(0, n, 64):
                sl = slice(start, min(n, start + 64))
                tasks = [(slide, int(x), int(y), int(lv), int(r), context, float(part["slide_mpp"]))
                         for x, y, lv, r in zip(part["x"][sl], part["y"][sl], part["level"][sl], part["read"][sl])]
                for k, (task, res) in enumerate(zip(tasks, pool.map(tasks))):
                    if isinstance(res, ReadFailure):
                        skipped += 1
                        continue
                    jpeg = encode_jpeg(res, quality)
                    try:
                        decode_jpeg(jpeg)
                    except Exception as exc:  # noqa: BLE001
                        log(f"shards: skipped {slide} ({task[1]}, {task[2]}): encoded JPEG does not decode: {exc}")
                        skipped += 1
                        continue
                    i = start + k
                    mag = float(part["mag"][i])
                    key = f"{Path(slide).stem.replace('.', '_')}_{int(mag)}x_{task[1]}_{task[2]}"
                    writer.add(key, jpeg, {"slide": slide, "mag": mag, "level": int(part["level"][i]),
                                           "x": task[1], "y": task[2], "tissue": float(part["tissue"][i]),
                                           "mpp": float(part["slide_mpp"])})
                    written += 1
    finally:
        pool.close()
        writer.close()
    return written, skipped
