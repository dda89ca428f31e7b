"""End to end on the CPU: the loss falls, a killed run resumes to the same per-step losses."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from virchow_fast.config import load_config
from virchow_fast.train.checkpoint import list_checkpoints
from virchow_fast.train.loop import run

TINY = [
    "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "model.mlp_hidden=64", "model.img_size=112",
    "heads.dino_prototypes=256", "heads.ibot_prototypes=256", "heads.hidden_dim=64", "heads.bottleneck_dim=32",
    "heads.ibot_bottleneck_dim=32", "data.crops.context_size=196", "data.crops.global_size=112",
    "data.crops.local_size=56", "data.crops.n_local=4", "data.batch_size=4", "data.num_workers=0",
    "train.epochs=2", "train.steps_per_epoch=4", "train.checkpoint_every=3", "train.threads=1",
    "optim.base_lr=2e-2", "optim.warmup_epochs=0.5", "optim.freeze_last_layer_epochs=0",
    "loss.warmup_teacher_temp_epochs=1",
]


def _losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    cfg = load_config("configs/debug.yaml", TINY + [f"train.output_dir={out}"])
    run(cfg)
    return out


def test_run_writes_config_metrics_checkpoints_and_loss_falls(uninterrupted):
    records = _losses(uninterrupted)
    assert [r["step"] for r in records] == list(range(8))
    for key in ("loss", "dino", "ibot", "reg", "lr", "momentum", "teacher_temp", "tiles_per_s"):
        assert key in records[0]
    first = sum(r["loss"] for r in records[:2]) / 2
    last = sum(r["loss"] for r in records[-2:]) / 2
    assert last < first - 0.05, (first, last)
    resolved = yaml.safe_load((uninterrupted / "resolved_config.yaml").read_text())
    assert resolved["derived"]["total_steps"] == 8
    assert resolved["derived"]["peak_lr"] == pytest.approx(2e-2 * (4 / 1024) ** 0.5)
    names = [p.name for p in list_checkpoints(uninterrupted)]
    assert names == ["step_00000006", "step_00000008"]  # keep_checkpoints=2


def test_killed_run_resumes_to_identical_losses(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "virchow_fast.cli", "train", "--config", "configs/debug.yaml"]
    for item in TINY + [f"train.output_dir={out}"]:
        args += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step_00000003").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(_losses(out))
    assert killed_at < 8

    resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    got, want = _losses(out), _losses(uninterrupted)
    assert [r["step"] for r in got] == list(range(8))
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "dino", "ibot", "reg", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def test_bad_config_key_fails_before_work(tmp_path):
    args = [sys.executable, "-m", "virchow_fast.cli", "train", "--config", "configs/debug.yaml",
            "--set", "optim.lr=1", "--set", f"train.output_dir={tmp_path / 'x'}"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "configs/debug.yaml: optim.lr: unknown key" in res.stderr
    assert not (tmp_path / "x").exists()


def test_missing_slide_folder_fails_before_work(tmp_path):
    args = [sys.executable, "-m", "virchow_fast.cli", "train", "--config", "configs/debug.yaml",
            "--set", "data.source=slides", "--set", f"data.paths=[{tmp_path / 'absent'}]",
            "--set", f"train.output_dir={tmp_path / 'run'}"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert f"configs/debug.yaml: data.paths[0]: {tmp_path / 'absent'} does not exist" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()
