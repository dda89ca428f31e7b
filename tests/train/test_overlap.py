"""FSDP2 overlap settings as parallelize applies them: one-block-ahead prefetch (forward for both networks,
backward for the student), the student's last block kept gathered after its forward (all of them on a
one-rank shard group, where resharding frees nothing), the teacher always resharded (its EMA updates
the local shards). Checked on a one-rank group in process and on two gloo ranks (this file as a
torchrun script). Numerics do not change with them: tests/train/test_fsdp.py compares 2 processes
with 1 per step.
"""
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist


def check_schedule() -> None:
    from virchow_fast.config import load_config
    from virchow_fast.model.ssl import SSLNetwork, make_teacher
    from virchow_fast.train.distributed import DistInfo, device_mesh
    from virchow_fast.train.parallelize import parallelize

    world = dist.get_world_size()
    cfg = load_config("debug", ["model.depth=3", "parallel.fsdp=on", "train.device=cpu"])
    student = SSLNetwork(cfg.model, cfg.heads, seed=0)
    teacher = make_teacher(student)
    info = DistInfo(dist.get_rank(), world, 0, torch.device("cpu"), device_mesh("cpu", world, world))
    student, teacher = parallelize(student, teacher, cfg.parallel, info)
    for net, is_teacher in ((student, False), (teacher, True)):
        states = [b._get_fsdp_state() for b in net.backbone.blocks]
        for i, st in enumerate(states):
            assert st._states_to_forward_prefetch == states[i + 1:i + 2], (is_teacher, i)
            assert st._states_to_backward_prefetch == ([] if is_teacher or i == 0 else [states[i - 1]]), (is_teacher, i)
            resharded = st._fsdp_param_group.post_forward_mesh_info is not None
            assert resharded == (is_teacher or (world > 1 and i < len(states) - 1)), (world, is_teacher, i)


def test_schedule_on_one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        check_schedule()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_schedule_on_two_ranks():
    from distrun import environment

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    res = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


if __name__ == "__main__":
    dist.init_process_group("gloo")
    check_schedule()
    dist.destroy_process_group()
