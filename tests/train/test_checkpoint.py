"""DCP checkpoints: complete-or-absent, keep the last N, exact state back; 2 processes -> 1."""
import shutil

import pytest
import torch
import torch.nn as nn
from distrun import assert_losses_close, cached, launch, metrics

from virchow_fast.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


class _Center(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("center", torch.zeros(4))


def _objects(seed: int):
    torch.manual_seed(seed)
    student, teacher = nn.Linear(3, 4), nn.Linear(3, 4)
    opt = torch.optim.AdamW(student.parameters(), lr=0.1)
    student(torch.randn(2, 3)).sum().backward()
    opt.step()
    loss = _Center()
    loss.center.fill_(float(seed))
    return student, teacher, opt, {"dino": loss}


def test_checkpoints_complete_or_absent_keep_last_n_and_restore(tmp_path):
    student, teacher, opt, losses = _objects(1)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, student, teacher, opt, losses, {"next_step": step}, keep=2)
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]
    # a save killed before the rename, and a final-named folder without DCP's metadata: never picked
    (root / ".tmp-step_00000008").mkdir()
    (root / ".tmp-step_00000008" / "__0_0.distcp").write_bytes(b"partial")
    (root / "step_00000010").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000006"

    rng_before = torch.get_rng_state()
    other = _objects(2)
    got = load_checkpoint(latest_checkpoint(tmp_path), *other)
    assert got == {"step": 6, "data": {"next_step": 6}}
    for a, b in zip(list(student.parameters()) + list(teacher.parameters()),
                    list(other[0].parameters()) + list(other[1].parameters()), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(other[3]["dino"].center, torch.ones(4))
    assert torch.equal(other[2].state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.get_rng_state(), rng_before)  # the RNG saved with the checkpoint is back

    save_checkpoint(tmp_path, 12, student, teacher, opt, losses, {"next_step": 12}, keep=2)
    assert not (root / ".tmp-step_00000008").exists()  # the next save clears what a killed one left
    assert latest_checkpoint(tmp_path).name == "step_00000012"


@pytest.mark.slow
def test_resume_two_process_checkpoint_on_one_process(tmp_path):
    two = cached(2)  # 4 steps on 2 x 4 tiles, checkpoints at steps 2 and 4
    out = tmp_path / "one"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(two / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002")
    res = launch(1, out, resume=True)  # 1 x 8 tiles: the same global batch
    assert "resumed from" in res.stdout + res.stderr
    got = metrics(out)
    assert [r["step"] for r in got] == [2, 3]
    assert_losses_close(got, metrics(two)[2:], 1e-5, keys=("loss", "dino", "ibot", "grad_norm"))
