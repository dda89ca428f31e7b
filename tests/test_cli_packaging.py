"""The CLI delegates correctly, and a plain (non-editable) install imports from outside the repo."""
import os
import subprocess
import sys
import zipfile

from click.testing import CliRunner

from virchow_fast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_reports_params_tokens_and_flops():
    res = CliRunner().invoke(main, ["info", "--config", "vit_h14_virchow2"])  # a shipped config, by name
    assert res.exit_code == 0, res.output
    assert "backbone parameters:   631.24M" in res.output
    assert "global 261, local 54" in res.output
    assert "TFLOP per tile/step:   4.39" in res.output


def test_info_bad_override_names_key():
    res = CliRunner().invoke(main, ["info", "--config", "debug", "--set", "model.width=3"])
    assert res.exit_code != 0
    assert "debug: model.width: unknown key" in res.output


def test_config_help_documents_every_key():
    res = CliRunner().invoke(main, ["config-help"])
    assert res.exit_code == 0
    assert "loss.kde_kappa = 5.0  # KDE concentration kappa" in res.output
    assert all("#" in line for line in res.output.strip().splitlines())


def test_wheel_installs_kernels_as_subpackage(tmp_path):
    env = dict(os.environ, VIRCHOW_FAST_NO_CUDA_EXT="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ROOT,
                    "-w", str(tmp_path / "dist")], check=True, env=env, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("virchow_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "virchow_fast/kernels/__init__.py" in names
    assert {f"virchow_fast/configs/{n}.yaml" for n in ("debug", "vit_h14_virchow2", "vit_g14_virchow2g")} <= set(names)
    assert not any(n.startswith("kernels/") for n in names)  # never a top-level `kernels`
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import virchow_fast, virchow_fast.kernels, virchow_fast.cli; print(virchow_fast.__file__)\n"
            "from virchow_fast.config import load_config, resolve_config_path\n"
            "print(resolve_config_path('vit_g14_virchow2g')); print(load_config('vit_g14_virchow2g').model.embed_dim)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(target)),
                         capture_output=True, text=True, check=True)
    module, config, width = out.stdout.split()
    assert module.startswith(str(target))
    assert config.startswith(str(target)) and width == "1664"  # the installed wheel ships its configs
