"""WebDataset tar shards of JPEG contexts, with DALI's index files, validated as they are written.

Each sample is ``<key>.jpg`` (a ``context`` px square at the target mpp, JPEG), ``<key>.json``
(slide, magnification, level, x, y, tissue) and ``<key>.mag`` (the magnification, float32, for
DALI's webdataset reader). Beside each ``shard-NNNNNN.tar`` lies its DALI index
``shard-NNNNNN.idx`` (wds2idx format v1.2: ``ext offset size name`` per component), and the folder
holds ``catalogue.npz`` (shard, jpg offset/size/CRC-32, magnification, key per sample) for the
trainer's seeded, magnification-weighted sampling.

Validation, so no bad member reaches DALI (one bad JPEG fails a whole DALI batch, a truncated tar
fails the reader): when written, every JPEG is decoded back and compared with the pixels it
encodes (scrambled entropy data decodes without an error, to garbage), tiles that fail are
reported and left out, and each finished tar is re-opened and checked against its index and the
checksums. When first opened for training (:func:`checked_indexes`), each shard is checked again
(member headers, sizes, checksums) and a DALI index holding only its intact samples is written
beside the run: a damaged shard loses its damaged samples, counted, never the run.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np

from .index import load_index
from .records import DataError, ReadFailure
from .sources import decode_jpeg
from .workers import ReadPool

logger = logging.getLogger("virchow_fast.data")

MAX_JPEG_ERROR = 12.0  # mean |decoded - source|: 3.3-3.7 at q 90-50 on generated H&E (measured), ~100 for garbage


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpeg8_encode(rgb, level=quality))


class ShardWriter:
    def __init__(self, out_dir: str | Path, samples_per_shard: int = 1000):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.per_shard = samples_per_shard
        self.shards: list[str] = []
        self.rows: dict[str, list] = {"shard": [], "offset": [], "size": [], "mag": [], "key": [], "crc": []}
        self._tar = None
        self._idx_lines: list[str] = []
        self._n = 0
        self.context = 0  # px side of every context written (the trainer checks it against its config)

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
                self.rows["crc"].append(zlib.crc32(data))
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
        validate_shard(tmp, idx, dict(zip(self.rows["key"], self.rows["crc"], strict=False)))
        os.replace(tmp, self.dir / name)
        self._tar = None

    def close(self) -> Path:
        self._close()
        cat = self.dir / "catalogue.npz"
        np.savez(cat, shards=np.array(self.shards), shard=np.array(self.rows["shard"], np.int32),
                 offset=np.array(self.rows["offset"], np.int64), size=np.array(self.rows["size"], np.int64),
                 mag=np.array(self.rows["mag"], np.float32), key=np.array(self.rows["key"]),
                 crc=np.array(self.rows["crc"], np.uint32), context=np.int32(self.context))
        return cat


def _parse_index(idx_path: Path) -> list[list[tuple[str, int, int, str]]]:
    """A DALI wds index: per sample, its components (ext, offset, size, name)."""
    lines = Path(idx_path).read_text().splitlines()
    if not lines or len(lines[0].split()) != 2 or lines[0].split()[0] != "v1.2":
        raise ValueError(f"{idx_path}: bad index header {lines[:1]!r}")
    if int(lines[0].split()[1]) != len(lines) - 1:
        raise ValueError(f"{idx_path}: header says {lines[0].split()[1]} samples, {len(lines) - 1} listed")
    out = []
    for line in lines[1:]:
        parts = line.split()
        if not parts or len(parts) % 4:
            raise ValueError(f"{idx_path}: malformed line {line[:80]!r}")
        out.append([(parts[j], int(parts[j + 1]), int(parts[j + 2]), parts[j + 3]) for j in range(0, len(parts), 4)])
    return out


def _sample_problem(f, file_size: int, sample, crc: dict[str, int] | None) -> str | None:
    """Why one sample of an open tar cannot be read as indexed, or None. Reads the member headers and
    the JPEG; checks the CRC-32 when known, else decodes."""
    for ext, off, size, name in sample:
        if off < 512 or off + size > file_size:
            return f"{name}: past the end of the file (truncated shard)"
        f.seek(off - 512)
        head = f.read(512)
        short = head[:100].rstrip(b"\x00").decode(errors="replace")  # a long name keeps a part of it here
        if not short or short not in name:
            return f"{name}: no tar header for it at its offset"
        if ext == "jpg":
            data = f.read(size)
            key = name[:-4]
            try:
                if crc is not None and key in crc:
                    if zlib.crc32(data) != crc[key]:
                        return f"{name}: CRC-32 differs from the one written"
                else:
                    decode_jpeg(data)
            except Exception as exc:  # noqa: BLE001
                return f"{name}: {exc}".splitlines()[0]
    return None


def validate_shard(tar_path: str | Path, idx_path: str | Path, crc: dict[str, int] | None = None) -> int:
    """Re-read a tar against its DALI index: member names, offsets and sizes, JPEGs (checksums when
    given, and decodable); returns the number of samples, raises ValueError naming the first bad one."""
    samples = _parse_index(Path(idx_path))
    size = os.path.getsize(tar_path)
    with open(tar_path, "rb") as f:
        for sample in samples:
            why = _sample_problem(f, size, sample, crc)
            if why:
                raise ValueError(f"{tar_path}: {why}")
    with tarfile.open(tar_path) as tar:  # the tar itself must also parse end to end
        tar.getmembers()
    return len(samples)


def checked_indexes(tars: list[str], out_dir: str | Path, catalogue: str | Path | None = None,
                    log=None) -> tuple[list[str], list[str], int]:
    """(tars, DALI index paths, samples dropped) for the webdataset reader: each shard checked once per
    file version, its intact samples listed in an index under ``out_dir`` (shards without any are left
    out). A shard that cannot be parsed at all loses all its samples, with one line naming it."""
    log = log or logger.warning  # damaged samples and skipped tiles
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    crc = None
    if catalogue and Path(catalogue).is_file():
        try:
            with np.load(catalogue) as z:
                if "crc" in z.files:
                    crc = dict(zip((str(k) for k in z["key"]), (int(c) for c in z["crc"]), strict=False))
        except Exception as exc:  # noqa: BLE001
            log(f"data: {catalogue}: unreadable ({type(exc).__name__}); shards checked by decoding")
    keep_tars, keep_idx, dropped = [], [], 0
    for tar in tars:
        idx = Path(tar[:-4] + ".idx")
        st = os.stat(tar)
        ist = os.stat(idx) if idx.is_file() else None
        stamp = f"{os.path.abspath(tar)} {st.st_size} {st.st_mtime_ns} {ist.st_size if ist else 0} " \
                f"{ist.st_mtime_ns if ist else 0} {crc is not None}"
        name = f"{Path(tar).stem}-{hashlib.sha1(stamp.encode()).hexdigest()[:12]}"
        checked = out_dir / f"{name}.idx"
        note = out_dir / f"{name}.json"
        if checked.is_file() and note.is_file():
            info = json.loads(note.read_text())
        else:
            info = {"good": 0, "bad": 0, "first": ""}
            try:
                samples = _parse_index(idx) if ist else None
                if samples is None:
                    raise ValueError(f"{idx}: missing (write shards with `virchow-fast tiles --shards`)")
                lines = []
                with open(tar, "rb") as f:
                    for sample in samples:
                        why = _sample_problem(f, st.st_size, sample, crc)
                        if why:
                            info["bad"] += 1
                            info["first"] = info["first"] or why
                        else:
                            lines.append(" ".join(f"{e} {o} {s} {n}" for e, o, s, n in sample))
                info["good"] = len(lines)
            except (OSError, ValueError) as exc:
                lines, info["first"] = [], str(exc).splitlines()[0]
                info["bad"] = info["bad"] or 1
            tmp = checked.with_suffix(".tmp")
            tmp.write_text(f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))
            os.replace(tmp, checked)
            note.write_text(json.dumps(info))
            if info["bad"]:
                log(f"data: {tar}: dropped {info['bad']} damaged samples, kept {info['good']} "
                    f"(first: {info['first']})")
        dropped += info["bad"]
        if info["good"]:
            keep_tars.append(tar)
            keep_idx.append(str(checked))
    if not keep_tars:
        raise DataError(f"{Path(tars[0]).parent if tars else out_dir}: no intact shard samples in {len(tars)} shards")
    return keep_tars, keep_idx, dropped


def write_shards(index_dir: str | Path, out_dir: str | Path, workers: int = 2, samples_per_shard: int = 1000,
                 quality: int = 90, log=None, files: list[Path] | None = None) -> tuple[int, int]:
    """Every tile of the indexes ``files`` (default: all in ``index_dir``) as a JPEG context in shards;
    returns (written, skipped)."""
    log = log or logger.warning  # damaged samples and skipped tiles
    writer = ShardWriter(out_dir, samples_per_shard)
    pool = ReadPool(workers, log=log)
    written = skipped = 0
    try:
        for part in load_index(index_dir, files):
            slide = str(part["slide"])
            context = int(part["context"])
            if writer.context and context != writer.context:
                raise DataError(f"{index_dir}: indexes of context {writer.context} and {context} px; "
                                "shards hold one context size")
            writer.context = context
            n = len(part["x"])
            for start in range(0, n, 64):
                sl = slice(start, min(n, start + 64))
                tasks = [(slide, int(x), int(y), int(lv), int(r), context, float(part["slide_mpp"]))
                         for x, y, lv, r in zip(part["x"][sl], part["y"][sl], part["level"][sl], part["read"][sl],
                                                strict=True)]
                for k, (task, res) in enumerate(zip(tasks, pool.map(tasks), strict=False)):
                    if isinstance(res, ReadFailure):
                        log(f"shards: skipped tile: {res.message}")
                        skipped += 1
                        continue
                    jpeg = encode_jpeg(res, quality)
                    try:
                        err = float(np.abs(decode_jpeg(jpeg).astype(np.int16) - res).mean())
                        if err > MAX_JPEG_ERROR:
                            raise ValueError(f"decodes {err:.1f} grey levels off its pixels (scrambled data)")
                    except Exception as exc:  # noqa: BLE001
                        log(f"shards: skipped {slide} ({task[1]}, {task[2]}): encoded JPEG does not decode back: {exc}")
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
