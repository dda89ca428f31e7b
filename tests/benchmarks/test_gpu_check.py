"""benchmarks/gpu_check.sh in a simulated H200 environment, on the CPU.

The lent H200 has only ``python3`` (no ``python``) and no DALI, cuCIM, OpenSlide or imagecodecs.
Here: a PATH whose only Python is a ``python3`` wrapper around this interpreter, and the import
blocker in tests/benchmarks/blocker (a sitecustomize on PYTHONPATH) that makes those packages
unimportable and logs every attempt. Asserted: every step of the script is listed, each either
ran (ok) or says why it did not (SKIPPED with a reason; a TIMEOUT only where the budget ran out),
no log holds a traceback, nothing tried to import the blocked packages, and at most 8 files come
back under $OUT (the device tool's limit).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BLOCKER = Path(__file__).resolve().parent / "blocker"


def _steps() -> dict[str, str]:
    """{step name: when} from the script's STEPS table."""
    return dict(re.findall(r'^\s+"(\w+)\|\d+\|(\w+)\|', SCRIPT.read_text(), re.M))


def _h200_env(tmp_path: Path, budget_s: int, **extra) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    path = f"{bin_dir}:/usr/bin:/bin"
    if shutil.which("python", path=path):
        pytest.skip(f"this machine has a system 'python' at {shutil.which('python', path=path)}")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHON")}
    # GPU_CHECK_INSTALL=no: the script's `pip install -e .` would re-point the caller's environment at
    # this tree (a test must not change the environment it runs in); the real run installs
    env.update(PATH=path, PYTHONPATH=str(BLOCKER), VF_BLOCK_IMPORTS_LOG=str(tmp_path / "blocked.log"),
               GPU_CHECK_INSTALL="no",
               OUT=str(tmp_path / "out"), GPU_CHECK_BUDGET_S=str(budget_s), OMP_NUM_THREADS="1", **extra)
    return env


def _run(tmp_path: Path, budget_s: int, timeout_s: int, **extra) -> tuple[dict[str, str], str]:
    env = _h200_env(tmp_path, budget_s, **extra)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    summary = (out / "summary.txt").read_text()
    lines = {m.group(1): m.group(2) for m in re.finditer(r"^(\w+)\s+(\S.*)$", summary, re.M)
             if m.group(1) in _steps()}
    assert set(lines) == set(_steps()), f"steps missing from the summary:\n{summary}"
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        logs = {Path(m.name).name: tar.extractfile(m).read().decode(errors="replace") for m in tar.getmembers()
                if m.isfile() and m.name.endswith(".log")}
    for name, text in logs.items():
        assert "Traceback" not in text, f"{name}:\n{text[-3000:]}"
    blocked = tmp_path / "blocked.log"
    assert not blocked.exists() or not blocked.read_text(), f"blocked imports attempted:\n{blocked.read_text()}"
    return lines, summary


def _check_statuses(lines: dict[str, str], summary: str, allow_budget_cut: bool) -> list[str]:
    ran = []
    for name, rest in lines.items():
        status = rest.split()[0]
        if status == "ok":
            ran.append(name)
        elif status == "SKIPPED":
            assert re.match(r"SKIPPED \(.{8,}\)", rest) or re.match(r"SKIPPED\s+\d+s\s+\S", rest), \
                f"{name}: no reason given: {rest}"
            if _steps()[name] == "gpu":
                assert "needs a GPU" in rest or "budget" in rest, rest
        elif status == "TIMEOUT":
            assert allow_budget_cut, f"{name} timed out within its cap:\n{summary}"
        else:
            raise AssertionError(f"{name}: {rest}\n{summary}")
    return ran


def test_blocker_blocks_and_logs(tmp_path):
    env = _h200_env(tmp_path, 10)
    code = "import importlib\nfor m in ('nvidia.dali', 'cucim', 'openslide', 'imagecodecs'):\n" \
           "    try:\n        importlib.import_module(m)\n    except ModuleNotFoundError as e:\n" \
           "        assert 'simulated H200' in str(e), e\n    else:\n        raise SystemExit(m + ' imported')\n"
    proc = subprocess.run(["python3", "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    logged = (tmp_path / "blocked.log").read_text().split("\n")
    assert {line.split()[0] for line in logged if line} == {"nvidia.dali", "cucim", "openslide", "imagecodecs"}


def test_gpu_check_tiny_budget(tmp_path):
    """A budget that lets only the first steps start: they run (or are cut at the budget), every later
    step says it was skipped for the budget or for want of a GPU."""
    lines, summary = _run(tmp_path, budget_s=15, timeout_s=120, GPU_CHECK_MIN_START_S="4")
    ran = _check_statuses(lines, summary, allow_budget_cut=True)
    assert ran or lines["env"].startswith("TIMEOUT"), summary  # the first step started
    assert "budget" in lines["bench_residual"], summary


@pytest.mark.slow
def test_gpu_check_full_cpu_run(tmp_path):
    """Every step that can run on a CPU runs clean (smoke mode); the GPU-only ones say why they skip."""
    lines, summary = _run(tmp_path, budget_s=1200, timeout_s=1500)
    ran = _check_statuses(lines, summary, allow_budget_cut=False)
    assert set(ran) == {n for n, when in _steps().items() if when == "all"}, summary


def test_headline_first_and_within_the_default_budget():
    """The headline steps (install, ceilings, the ViT-H step) lead the table and their caps fit the budget."""
    text = SCRIPT.read_text()
    headline = re.search(r'^HEADLINE="([^"]+)"', text, re.M).group(1).split()
    budget = int(re.search(r"GPU_CHECK_BUDGET_S:-(\d+)", text).group(1))
    caps = dict(re.findall(r'^\s+"(\w+)\|(\d+)\|', text, re.M))
    assert list(caps)[:len(headline)] == headline
    assert sum(int(caps[n]) for n in headline) <= budget
    assert budget <= 540  # one device call of at most 9 minutes
