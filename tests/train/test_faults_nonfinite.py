"""A diverging update: found at the next statistics read, never saved over a finite checkpoint, said in one line."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from faults import cli_args, config, metrics

from virchow_fast.cli import main
from virchow_fast.train import loop
from virchow_fast.train import step as step_module
from virchow_fast.train.checkpoint import list_checkpoints, load_checkpoint
from virchow_fast.train.errors import RunError
from virchow_fast.train.integrity import nonfinite_count
from virchow_fast.train.schedules import build_schedules


def _lr_from(monkeypatch, first: int, lr: float):
    """From step ``first`` on the schedule's lr is ``lr``: the update is computed from finite losses and
    gradients and wrecks the weights (AdamW moves each weight by about lr)."""
    def build(cfg, peak_lr, total_steps):
        s = build_schedules(cfg, peak_lr, total_steps)
        s.lr[first:] = lr
        return s

    monkeypatch.setattr(loop, "build_schedules", build)


def _finite(cfg, ckpt) -> bool:
    student, teacher, opt, losses = loop.build(cfg, loop.init_distributed(cfg))
    load_checkpoint(ckpt, student, teacher, opt, {"dino": losses.dino, "ibot": losses.ibot})
    return float(nonfinite_count(list(student.parameters()) + list(teacher.parameters()))) == 0


def test_nonfinite_count_is_the_number_of_tensors_with_nan_or_inf():
    ts = [torch.zeros(3), torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf")]), torch.ones(2, 2),
          torch.tensor([3.0e38, -3.0e38])]  # huge but finite: a max-abs reduction does not overflow
    assert float(nonfinite_count(ts)) == 2.0
    assert float(nonfinite_count([t.double() for t in ts[3:]])) == 0.0


def test_blow_up_to_finite_garbage_never_rotates_the_good_checkpoint_out(tmp_path, monkeypatch, capsys):
    """lr 1e30 from step 3: the weights stay finite but every later loss is NaN (skipped). The checkpoints
    written from then on must not displace step_2, the last one a finite step ran from."""
    _lr_from(monkeypatch, 3, 1e30)
    cfg = config(tmp_path, "train.epochs=2", "train.keep_checkpoints=2", "train.max_nonfinite_steps=100")
    loop.run(cfg)
    said = capsys.readouterr().err
    assert [r["skipped"] for r in metrics(tmp_path)] == [False] * 4 + [True] * 4
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]
    assert "--resume continues from step_00000002" in said
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("suspect-*")) == [
        "suspect-step_00000004", "suspect-step_00000006", "suspect-step_00000008"]  # kept, not deleted
    assert _finite(cfg, list_checkpoints(tmp_path)[-1])


def test_nonfinite_weights_are_found_at_the_next_step_and_never_saved(tmp_path, monkeypatch):
    _lr_from(monkeypatch, 3, float("inf"))  # step 3's update writes inf/nan; step_4 is due right after it
    cfg = config(tmp_path, "train.epochs=2", "train.keep_checkpoints=1", "train.max_nonfinite_steps=100")
    with pytest.raises(RunError, match=r"step 4: the weights hold NaN or infinity .* not written"):
        loop.run(cfg)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]
    assert _finite(cfg, list_checkpoints(tmp_path)[-1])
    out = tmp_path / "between"
    _lr_from(monkeypatch, 0, float("inf"))  # step 0's update; no checkpoint is due before step 2
    with pytest.raises(RunError, match=r"step 1: the weights are non-finite after the update of step 0"):
        loop.run(config(out, "train.max_nonfinite_steps=100"))
    assert [r["step"] for r in metrics(out)] == [0] and list_checkpoints(out) == []


def test_nonfinite_losses_reach_the_command_line_as_one_line(tmp_path, monkeypatch):
    forward = step_module.SSLLoss.forward

    def nan_loss(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(step_module.SSLLoss, "forward", nan_loss)
    res = CliRunner().invoke(main, cli_args(tmp_path, "train.max_nonfinite_steps=2"))
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "2 non-finite losses in a row" in errors[0] and "Traceback" not in res.output
    assert np.isnan([r["loss"] for r in metrics(tmp_path)]).all()
