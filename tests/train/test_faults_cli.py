"""Mistakes said in one line by ``virchow-fast train``, never as a traceback."""
import pytest
import torch
from click.testing import CliRunner
from faults import cli_args

from virchow_fast.cli import main


def _one_error(res) -> str:
    errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert res.exit_code == 1 and len(errors) == 1 and "Traceback" not in res.output, (res.exit_code, res.output)
    return errors[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_device_without_a_gpu(tmp_path):
    line = _one_error(CliRunner().invoke(main, cli_args(tmp_path / "run", "train.device=cuda")))
    assert "train.device: cuda, but no CUDA device is visible" in line
    assert not (tmp_path / "run").exists()


def test_duplicate_key_and_empty_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # had either been accepted, its run would land in ./runs here
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  epochs: 2\n  epochs: 3\n")
    line = _one_error(CliRunner().invoke(main, ["train", "--config", str(dup)]))
    assert line == f"Error: {dup}: line 3: duplicate key 'epochs' (first on line 2)"
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert "is empty" in _one_error(CliRunner().invoke(main, ["train", "--config", str(empty)]))
