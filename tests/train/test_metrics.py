"""Metrics: JSONL kept consistent on resume, TensorBoard mirroring, MFU / HFU arithmetic."""
import json
import sys
import types

import pytest
import torch

from virchow_fast.config import load_config
from virchow_fast.model.info import flops_per_tile
from virchow_fast.train.metrics import MetricsWriter, Throughput, detect_peak_tflops, flops_per_tile_step


def test_jsonl_resume_drops_later_steps_and_tensorboard_gets_finite_scalars(tmp_path, monkeypatch):
    scalars = []

    class FakeWriter:
        def __init__(self, logdir, purge_step=None):
            scalars.append(("open", logdir, purge_step))

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path, 0, True)
    for step in range(4):
        w.write({"step": step, "loss": float(step), "skipped": False, "mfu": None})
    w.close()
    w = MetricsWriter(path, 2, True)  # resumed at step 2: steps 2 and 3 will be written again
    w.write({"step": 2, "loss": float("nan"), "skipped": True, "mfu": None})
    w.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2] and records[2]["skipped"]
    assert ("open", str(tmp_path / "tensorboard"), 2) in scalars
    assert ("train/loss", 3.0, 3) in scalars
    tags = {s[0] for s in scalars}
    assert "train/skipped" not in tags and "train/mfu" not in tags  # bools and nulls stay out
    assert [s[1] for s in scalars if s[0] == "train/loss"] == [0.0, 1.0, 2.0, 3.0]  # the NaN stays out


def test_mfu_counts_model_flops_and_hfu_adds_recompute():
    cfg = load_config("configs/vit_h14_virchow2.yaml", ["data.batch_size=32", "train.peak_tflops=1000",
                                                         "parallel.activation_checkpointing=every_k",
                                                         "parallel.ac_every=2", "train.device=cpu"])
    model, hw = flops_per_tile_step(cfg)
    assert model == flops_per_tile(cfg) and model / 1e12 == pytest.approx(4.39, abs=0.01)  # RECIPE: ~4.4
    assert hw == pytest.approx(model + 0.5 * (flops_per_tile(cfg, recompute=True) - model))
    rate = Throughput(cfg, world_size=8, device=torch.device("cpu"))(seconds=2.0)
    assert rate["tiles_per_s"] == 128.0  # 32 tiles x 8 processes / 2 s
    assert rate["mfu"] == pytest.approx(16.0 * model / 1e15)  # per device: 16 tiles/s
    assert rate["hfu"] > rate["mfu"]
    assert detect_peak_tflops(torch.device("cpu")) is None


def test_hfu_counts_the_policy_auto_resolved_to():
    """With activation_checkpointing: auto the run passes the resolved policy: HFU follows it, not auto."""
    import dataclasses

    cfg = load_config("configs/vit_h14_virchow2.yaml", ["data.batch_size=32", "train.peak_tflops=1000",
                                                         "parallel.activation_checkpointing=auto", "train.device=cpu"])
    model = flops_per_tile(cfg)
    full = dataclasses.replace(cfg.parallel, activation_checkpointing="full")
    assert flops_per_tile_step(cfg, full) == (model, pytest.approx(flops_per_tile(cfg, recompute=True)))
    rate = Throughput(cfg, 1, torch.device("cpu"), full)(seconds=1.0)
    assert rate["hfu"] == pytest.approx(32.0 * flops_per_tile(cfg, recompute=True) / 1e15)
    off = dataclasses.replace(cfg.parallel, activation_checkpointing="off")
    assert Throughput(cfg, 1, torch.device("cpu"), off)(seconds=1.0)["hfu"] == pytest.approx(32.0 * model / 1e15)


def test_run_passes_the_resolved_policy_to_throughput(tmp_path, monkeypatch):
    """The run resolves auto once and gives the policy it built the networks with to Throughput."""
    import dataclasses

    from faults import config

    from virchow_fast.train import loop

    seen = {}

    def resolve(cfg, info):
        seen["resolved"] = dataclasses.replace(cfg.parallel, activation_checkpointing="full")
        return seen["resolved"]

    class Stop(Exception):
        pass

    def throughput(cfg, world_size, device, parallel=None):
        seen["throughput"] = parallel
        raise Stop  # the networks are built: nothing after this is under test

    monkeypatch.setattr(loop, "resolve_activation_checkpointing", resolve)
    monkeypatch.setattr(loop, "Throughput", throughput)
    with pytest.raises(Stop):
        loop.run(config(tmp_path, "parallel.activation_checkpointing=auto"))
    assert seen["throughput"] is seen["resolved"]
