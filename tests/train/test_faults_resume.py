"""Resuming with changed settings: the length and schedule settings may change (said in one line), shapes may not."""
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from faults import cli_args, config, metrics

from virchow_fast.cli import main
from virchow_fast.config import derive
from virchow_fast.train.errors import RunError
from virchow_fast.train.loop import run
from virchow_fast.train.schedules import build_schedules


@pytest.fixture
def at_step_2(tmp_path):
    """A 4-step run whose newest checkpoint is step 2 (killed after it), and its per-step records."""
    run(config(tmp_path))
    records = metrics(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000004")
    return tmp_path, records


def test_longer_run_continues_the_schedules_without_a_jump(at_step_2, capsys):
    out, before = at_step_2
    capsys.readouterr()
    run(config(out, "train.epochs=2"), resume=True)  # 4 -> 8 steps
    said = capsys.readouterr().err
    assert "4 -> 8 steps" in said and "train.epochs" in said
    got = metrics(out)
    assert [r["step"] for r in got] == list(range(8))
    for key in ("lr", "momentum", "weight_decay", "teacher_temp"):
        assert got[2][key] == pytest.approx(before[2][key], rel=1e-12)  # no jump at the resume step
        assert got[7][key] == pytest.approx(before[3][key], rel=1e-12)  # and the same end values
    lrs = [r["lr"] for r in got[2:]]
    assert np.all(np.diff(lrs) <= 0) and lrs[0] > lrs[-1]
    # the stretched plan is saved with the checkpoints: resuming again follows it, step for step
    shutil.rmtree(out / "checkpoints" / "step_00000008")
    run(config(out, "train.epochs=2"), resume=True)
    again = metrics(out)
    assert [r["lr"] for r in again[6:]] == [r["lr"] for r in got[6:]]


def test_changed_global_batch_rescales_the_lr_and_says_so(at_step_2, capsys):
    out, before = at_step_2
    capsys.readouterr()
    cfg = config(out, "data.batch_size=2")
    run(cfg, resume=True)
    said = capsys.readouterr().err
    assert "global batch 4 -> 2" in said and "peak lr" in said
    derived = derive(cfg)
    assert derived.peak_lr == pytest.approx(cfg.optim.base_lr * math.sqrt(2 / 1024))
    want = build_schedules(cfg, derived.peak_lr, 4).lr
    assert [r["lr"] for r in metrics(out)[2:]] == pytest.approx(list(want[2:]), rel=1e-12)
    assert metrics(out)[2]["lr"] < before[2]["lr"]


def test_changed_base_lr_applies_from_the_resume_step_and_says_so(at_step_2, capsys):
    out, before = at_step_2
    capsys.readouterr()
    cfg = config(out, "optim.base_lr=1e-3")
    run(cfg, resume=True)
    said = capsys.readouterr().err
    assert "optim.base_lr 0.005 -> 0.001" in said and "lr " in said
    want = build_schedules(cfg, derive(cfg).peak_lr, 4).lr
    assert np.allclose([r["lr"] for r in metrics(out)[2:]], want[2:], rtol=1e-12)


def test_changed_model_is_refused_in_one_line_naming_the_keys(at_step_2):
    out, _ = at_step_2
    with pytest.raises(RunError, match=r"heads\.hidden_dim 64 -> 32, model\.depth 2 -> 3: cannot change on resume"):
        run(config(out, "model.depth=3", "heads.hidden_dim=32"), resume=True)
    res = CliRunner().invoke(main, cli_args(out, "model.depth=3") + ["--resume"])
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "model.depth 2 -> 3" in errors[0] and "Traceback" not in res.output, res.output


def test_checkpoint_without_saved_config_that_does_not_fit_is_one_line(at_step_2):
    """A checkpoint from before manifests and saved configs: the load itself fails, said in one line."""
    out, _ = at_step_2
    for name in ("manifest.json", "config.yaml", "schedules.npz"):
        (out / "checkpoints" / "step_00000002" / name).unlink()
    with pytest.raises(RunError) as err:
        run(config(out, "model.depth=3"), resume=True)
    said = str(err.value)
    assert said.startswith("--resume: cannot load") and "step_00000002" in said and "\n" not in said
    assert "blocks.2" in said  # the missing key of the third block, not DCP's wrapper text
