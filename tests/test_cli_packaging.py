"""The CLI delegates correctly, and a plain (non-editable) install imports from outside the repo."""
import os
import subprocess
import sys
import zipfile

from click.testing import CliRunner

from virchow_fast.cli import main


def test_info_reports_params_tokens_and_flops():
    res = CliRunner().invoke(main, ["info", "--config", "configs/vit_h14_virchow2.yaml"])
    assert res.exit_code == 0, res.output
    assert "backbone parameters:   631.24M" in res.output
    assert "global 261, local 54" in res.output
    assert "TFLOP per tile/step:   4.39" in res.output


def test_info_bad_override_names_key():
    res = CliRunner().invoke(main, ["info", "--config", "configs/debug.yaml", "--set", "model.width=3"])
    assert res.exit_code != 0
    assert "configs/debug.yaml: model.width: unknown key" in res.output


def test_config_help_documents_every_key():
    res = CliRunner().invoke(main, ["config-help"])
    assert res.exit_code == 0
    assert "loss.kde_kappa = 5.0  # KDE concentration kappa" in res.output
    assert all("#" in line for line in res.output.strip().splitlines())


def test_wheel_installs_kernels_as_subpackage(tmp_path):
    env = dict(os.environ, VIRCHOW_FAST_NO_CUDA_EXT="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".",
                    "-w", str(tmp_path / "dist")], check=True, env=env, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("virchow_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "virchow_fast/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names)  # never a top-level `kernels`
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = "import virchow_fast, virchow_fast.kernels, virchow_fast.cli; print(virchow_fast.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(target)),
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith(str(target))
