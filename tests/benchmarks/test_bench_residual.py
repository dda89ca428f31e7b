"""benchmarks/bench_residual.py's CPU smoke run: the block's residual GEMM (addmm with
kernels/residual_weight.py under the interpreter) against timm's composition, both branches; the
script asserts that they give the same output and gradients, and writes its JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_residual_smoke_agrees_and_writes_its_rows(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_residual.py"), "--cpu-smoke",
                          "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("smoke check: ours (in place and out of place) == eager composition") == 2  # proj, fc2
    (path,) = tmp_path.glob("bench_residual_*.json")
    data = json.loads(path.read_text())
    assert data["smoke"] is True
    kinds = {(r["branch"], r["impl"].split(":")[0]) for r in data["rows"]}
    assert {(b, i) for b in ("proj", "fc2")
            for i in ("ours", "ours out of place (addmm", "timm composition, eager", "GEMM alone")} <= kinds
    assert all(r["x_ours"] == 1.0 for r in data["rows"] if r["impl"].startswith("ours:"))
