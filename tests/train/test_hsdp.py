"""Hybrid sharding (HSDP): 2 replicas x 2 shards == 1 x 4 FSDP == 1 process, per step; resharding on resume.

Four gloo processes on one machine stand for two nodes of two GPUs: ``parallel.shard_size=2`` makes
a ("replicate", "shard") mesh, so parameters are gathered inside each pair and gradients are
reduce-scattered inside it and all-reduced across the pairs. The global batch is the same 8 tiles
in every run (4 x 2, or 1 x 8), so the per-step losses agree to the order of the reductions.
"""
import shutil

import pytest
from distrun import assert_losses_close, cached, launch, metrics

pytestmark = pytest.mark.slow

FP32_REL = 1e-5
KEYS = ("loss", "dino", "ibot", "grad_norm")


def test_hsdp_2x2_and_fsdp_1x4_equal_one_process():
    one = metrics(cached(1))
    fsdp = metrics(cached(4))  # LOCAL_WORLD_SIZE=4: the default shard group is the whole "node"
    hsdp = metrics(cached(4, ("parallel.shard_size=2",)))
    assert len(one) == 4 and one[-1]["loss"] != one[0]["loss"]
    assert_losses_close(fsdp, one, FP32_REL, keys=KEYS)
    assert_losses_close(hsdp, one, FP32_REL, keys=KEYS)


def test_hsdp_checkpoint_resumes_on_a_1x2_layout(tmp_path):
    hsdp = cached(4, ("parallel.shard_size=2",))  # checkpoints at steps 2 and 4
    out = tmp_path / "resharded"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(hsdp / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002")
    res = launch(2, out, resume=True)  # 2 processes x 4 tiles: the same global batch, plain FSDP
    assert "resumed from" in res.stdout + res.stderr
    got = metrics(out)
    assert [r["step"] for r in got] == [2, 3]
    assert_losses_close(got, metrics(hsdp)[2:], FP32_REL, keys=KEYS)


def test_shard_size_must_divide_the_launch(tmp_path):
    import subprocess

    from distrun import command, environment

    res = subprocess.run(command(2, tmp_path / "bad", ["parallel.shard_size=3"]), env=environment(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "parallel.shard_size: 3 does not divide the 2 processes of this launch" in res.stderr
