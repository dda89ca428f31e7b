"""Fixtures for the benchmark scripts' CPU smoke runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench_smoke(tmp_path):
    """``run(name) -> (stdout, json)``: benchmarks/<name>.py --cpu-smoke in a subprocess (Triton's
    interpreter, no GPU), its exit status asserted 0, and the one JSON it wrote under tmp_path."""
    def run(name: str):
        env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
        res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--cpu-smoke",
                              "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        (path,) = tmp_path.glob(f"{name}_*.json")
        return res.stdout, json.loads(path.read_text())
    return run
