"""benchmarks/bench_update.py's CPU smoke run: ours (kernels/adamw_ema.py under the interpreter), the
torch sequence the trainer ran before it and the eager reference, on awkward sizes; the script asserts
that all three give the same weights and that ours' bf16 copies are exact, and writes its JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_update_smoke_agrees_and_writes_its_rows(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_update.py"), "--cpu-smoke",
                          "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("(asserted)") == 2  # both cases' weights checked against torch and the reference
    (path,) = tmp_path.glob("bench_update_*.json")
    data = json.loads(path.read_text())
    assert data["smoke"] is True
    impls = {(r["case"], r["impl"].split(" ")[0]) for r in data["rows"]}
    assert {(c, i) for c in ("one_gpu", "fsdp_rank") for i in ("ours", "torch", "eager")} <= impls
