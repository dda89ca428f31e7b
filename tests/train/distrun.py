"""Launching tiny training runs for the multi-process tests (1 plain process, or torchrun on gloo).

Runs go through ``dist_driver.py`` (the CLI with test hooks, see there). Runs that
several tests compare against are made once per pytest session (``cached``).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("dist_driver.py")

# 48-wide, 2 blocks, K 256; 2 x 42 px global + 2 x 14 px local crops (patch 14: 9 + 1 patches)
TINY = [
    "model.embed_dim=48", "model.depth=2", "model.num_heads=2", "model.mlp_hidden=64", "model.img_size=42",
    "model.drop_path=0", "heads.dino_prototypes=256", "heads.ibot_prototypes=256", "heads.hidden_dim=64",
    "heads.bottleneck_dim=32", "heads.ibot_bottleneck_dim=32", "data.num_workers=0",
    "data.crops.global_size=42", "data.crops.local_size=14", "data.crops.n_local=2", "data.crops.context_size=48",
    "data.masks.min_block_patches=1", "data.masks.ratio_min=0.2", "train.threads=1", "train.device=cpu",
    "optim.base_lr=5e-3", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0",
    "loss.warmup_teacher_temp_epochs=1",
    # KDE stays computed and logged, but out of the loss: it is per rank by design (RECIPE), so a
    # 2-process run's regulariser differs from a 1-process run's on the same global batch
    "loss.regularizer=kde", "loss.regularizer_weight=0",
    "train.epochs=1", "train.steps_per_epoch=4", "train.checkpoint_every=2", "train.keep_checkpoints=3",
]
TILES = 8  # global batch of every comparison: 1 process x 8 tiles, or 2 processes x 4


def command(nproc: int, out: Path, extra: list[str] = (), resume: bool = False) -> list[str]:
    overrides = TINY + [f"data.batch_size={TILES // nproc}", f"train.output_dir={out}"] + list(extra)
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
    args = launcher + [str(DRIVER), "train", "--config", str(ROOT / "configs" / "debug.yaml")]
    for item in overrides:
        args += ["--set", item]
    return args + (["--resume"] if resume else [])


def environment(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("VF_TEST_NAN", None)
    env.pop("VF_TEST_SLEEP", None)
    env.update(extra)
    return env


def launch(nproc: int, out: Path, extra: list[str] = (), resume: bool = False, timeout: float = 300,
           **env: str) -> subprocess.CompletedProcess:
    res = subprocess.run(command(nproc, out, extra, resume), env=environment(**env), cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]


_session_dir: Path | None = None
_cache: dict[tuple, Path] = {}


def scratch() -> Path:
    global _session_dir
    if _session_dir is None:
        _session_dir = Path(tempfile.mkdtemp(prefix="vf-dist-"))
        atexit.register(shutil.rmtree, _session_dir, True)
    return _session_dir


def cached(nproc: int, extra: tuple[str, ...] = ()) -> Path:
    """Run (once per session) and return the run directory."""
    key = (nproc, tuple(extra))
    if key not in _cache:
        out = scratch() / f"run{len(_cache)}-{nproc}p"
        launch(nproc, out, list(extra))
        _cache[key] = out
    return _cache[key]


def assert_losses_close(got: list[dict], want: list[dict], rel: float, abs_: float = 0.0,
                        keys=("loss", "dino", "ibot")) -> float:
    """Same steps and per-step terms within tolerance; returns the largest relative difference seen."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        for key in keys:
            diff = abs(a[key] - b[key])
            worst = max(worst, diff / max(abs(b[key]), 1e-12))
            assert diff <= rel * abs(b[key]) + abs_, (a["step"], key, a[key], b[key])
    return worst
