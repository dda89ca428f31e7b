"""What makes a checkpoint worth keeping: its bytes as written, and finite weights.

Every checkpoint folder gets a ``manifest.json`` (size and CRC-32 of each file) before it is
renamed to its final name. Each rank checksums the DCP files it wrote itself (``__<rank>_*``,
streamed in 8 MiB blocks while they are still in the page cache); rank 0 also takes ``.metadata``
and the rest, gathers the entries and writes the manifest. Verifying splits the files over the
ranks of the resuming job and shares the verdict, so every rank agrees. CRC-32 (zlib, about
2.3 GB/s on one core here) finds truncation and flipped bytes; it is not meant to resist tampering.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

MANIFEST = "manifest.json"
_WRITER = re.compile(r"^__(\d+)_")
_BLOCK = 8 << 20


def _group() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def file_entry(path: Path) -> dict:
    """{"bytes", "crc32"} of one file, read in blocks (a multi-GB shard never sits in memory)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def _writer_of(name: str, world: int) -> int:
    m = _WRITER.match(name)
    rank = int(m.group(1)) if m else 0
    return rank if rank < world else 0


def write_manifest(folder: str | os.PathLike) -> None:
    """Checksum ``folder`` (a written, not yet renamed checkpoint) into its manifest; call on every rank."""
    root = Path(folder)
    rank, world = _group()
    names = sorted(p.name for p in root.iterdir() if p.is_file() and p.name != MANIFEST)
    mine = {n: file_entry(root / n) for n in names if _writer_of(n, world) == rank}
    parts = [None] * world if rank == 0 else None
    if world > 1:
        dist.gather_object(mine, parts, dst=0)
    else:
        parts = [mine]
    if rank == 0:
        files = {k: v for part in parts for k, v in part.items()}
        tmp = root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True))
        os.replace(tmp, root / MANIFEST)


def _check_files(root: Path, files: dict, names: list[str]) -> str | None:
    for name in names:
        want = files[name]
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, {want['bytes']} were written"
        if file_entry(path)["crc32"] != want["crc32"]:
            return f"{name} does not match its checksum"
    return None


def verify(folder: str | os.PathLike, collective: bool = True) -> tuple[str | None, bool]:
    """(what is wrong with the checkpoint ``folder`` or None, whether it had a manifest).

    collective: call on every rank; checksums are split over the ranks, the verdict shared. Without
    it this process checks every file alone (a reader outside the training job). Sizes are checked
    first (cheap).
    """
    root = Path(folder)
    rank, world = _group() if collective else (0, 1)
    problem, has_manifest = None, (root / MANIFEST).is_file()
    if has_manifest:
        try:
            files = json.loads((root / MANIFEST).read_text())["files"]
        except (ValueError, KeyError, TypeError):
            files, problem = {}, f"{MANIFEST} is damaged"
        names = sorted(files)
        problem = problem or _check_files(root, files, names[rank::world])
    if world > 1:
        found = [None] * world
        dist.all_gather_object(found, problem)
        problem = next((p for p in found if p), None)
    return problem, has_manifest


def nonfinite_count(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Number of ``tensors`` holding a NaN or an infinity, as a 0-dim float tensor left on the device.

    One fused max-abs reduction per dtype (``torch._foreach_norm`` with ord=inf, which cannot
    overflow the way a sum of squares can); FSDP2 DTensors count their local shards. Nothing is read
    on the host here.
    """
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    local = [t.detach() for t in local if t.numel() > 0]
    if not local:
        return torch.zeros(())
    norms = torch._foreach_norm(local, float("inf"))
    return (~torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms]))).sum().float()
