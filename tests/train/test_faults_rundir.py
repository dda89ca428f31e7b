"""A run directory that holds a run is never trained over: refused, or moved aside whole with --overwrite."""
import pytest
from click.testing import CliRunner
from faults import cli_args, config, metrics, tree_digest

from virchow_fast.cli import main
from virchow_fast.train.checkpoint import latest_checkpoint, list_checkpoints
from virchow_fast.train.errors import RunError
from virchow_fast.train.loop import run


@pytest.fixture
def earlier(tmp_path):
    out = tmp_path / "run"
    run(config(out))  # 4 steps, checkpoints 2 and 4
    return out


def _runs_only(root):
    return {k: v for k, v in tree_digest(root).items() if k.startswith(("checkpoints", "metrics"))}


def test_second_run_without_resume_is_refused_and_changes_nothing(earlier):
    before = _runs_only(earlier)
    with pytest.raises(RunError, match=r"holds an earlier run .*--resume.*--overwrite"):
        run(config(earlier, "train.steps_per_epoch=2"))
    assert _runs_only(earlier) == before
    assert [r["step"] for r in metrics(earlier)] == [0, 1, 2, 3]


def test_overwrite_moves_the_earlier_run_aside_and_starts_fresh(earlier):
    before = tree_digest(earlier)
    run(config(earlier, "train.steps_per_epoch=2"), overwrite=True)
    (aside,) = earlier.parent.glob("run.old-*")
    assert tree_digest(aside) == before  # the earlier run, whole and unchanged
    assert [r["step"] for r in metrics(earlier)] == [0, 1]
    assert [p.name for p in list_checkpoints(earlier)] == ["step_00000002"]
    assert latest_checkpoint(earlier).name == "step_00000002"  # a later --resume continues the new run


def test_cli_refuses_in_one_line_and_resume_or_overwrite_go_on(earlier):
    runner = CliRunner()
    res = runner.invoke(main, cli_args(earlier, "train.steps_per_epoch=2"))
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "holds an earlier run" in errors[0] and "Traceback" not in res.output, res.output
    res = runner.invoke(main, cli_args(earlier) + ["--resume", "--overwrite"])
    assert res.exit_code == 1 and "give one" in res.output
    res = runner.invoke(main, cli_args(earlier, "train.steps_per_epoch=2") + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert len(list(earlier.parent.glob("run.old-*"))) == 1


def test_overwrite_refuses_to_move_the_working_directory(earlier, monkeypatch):
    monkeypatch.chdir(earlier)
    before = _runs_only(earlier)
    with pytest.raises(RunError, match="working directory"):
        run(config(".", "train.steps_per_epoch=2"), overwrite=True)
    assert _runs_only(earlier) == before and not list(earlier.parent.glob("*.old-*"))
