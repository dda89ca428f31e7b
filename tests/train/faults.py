"""Tiny in-process runs for the fault tests: synthetic tiles, 4 steps of a 48-wide ViT, well under a second each."""
from __future__ import annotations

import hashlib
from pathlib import Path

from distrun import ROOT, TINY, metrics

from virchow_fast.config import load_config

CONFIG = str(ROOT / "configs" / "debug.yaml")
FAST = TINY + ["data.source=synthetic", "data.batch_size=4"]  # 4 steps, checkpoints at 2 and 4, keep 3

__all__ = ["CONFIG", "FAST", "config", "metrics", "tree_digest", "cli_args"]


def config(out: Path, *extra: str):
    return load_config(CONFIG, FAST + [f"train.output_dir={out}", *extra])


def cli_args(out: Path, *extra: str) -> list[str]:
    args = ["train", "--config", CONFIG]
    for item in FAST + [f"train.output_dir={out}", *extra]:
        args += ["--set", item]
    return args


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (what a test compares before and after)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}
