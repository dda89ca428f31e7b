"""Golden per-step losses of the debug config: `python tests/golden/make_golden.py` rewrites debug_losses.json.

The run is the README's main job (configs/debug.yaml: generated slides, DALI's CPU pipeline, 20 steps)
launched as `virchow-fast train` would be, in a fresh process with one torch thread, so the numbers do
not depend on the machine's core count. Regenerate when a change is meant to move the losses, and say
why in the commit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GOLDEN = HERE / "debug_losses.json"
KEYS = ("loss", "dino", "ibot", "reg", "grad_norm")


def run_debug(out: Path) -> list[dict]:
    """The debug config's per-step terms, from a fresh `virchow-fast train` process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "virchow_fast.cli", "train", "--config", str(ROOT / "configs" / "debug.yaml"),
           "--set", f"train.output_dir={out}", "--set", "train.threads=1"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"debug run failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{"step": r["step"], **{k: r[k] for k in KEYS}} for r in map(json.loads, lines) if r]


def main() -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        steps = run_debug(Path(tmp) / "run")
    GOLDEN.write_text(json.dumps({"config": "configs/debug.yaml", "torch": torch.__version__, "steps": steps},
                                 indent=1) + "\n")
    first, last = steps[0]["loss"], steps[-1]["loss"]
    print(f"wrote {GOLDEN.relative_to(ROOT)}: {len(steps)} steps, loss {first:.4f} -> {last:.4f}")


if __name__ == "__main__":
    main()
