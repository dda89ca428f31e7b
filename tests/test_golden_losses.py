"""The debug config's per-step losses equal the committed golden values (tests/golden/debug_losses.json).

Absolute values, so any change to the model, the losses, the data pipeline or the optimizer that moves
the numbers shows here; regenerate with `python tests/golden/make_golden.py` when that is intended.
Tolerance: 1e-3 relative (float summation order differs across CPUs and library builds; a real change
moves the loss by far more within 20 steps).
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
from make_golden import GOLDEN, KEYS, run_debug  # noqa: E402

pytestmark = pytest.mark.slow


def test_debug_run_matches_the_golden_losses(tmp_path):
    want = json.loads(GOLDEN.read_text())["steps"]
    got = run_debug(tmp_path / "run")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for key in KEYS:
            assert g[key] == pytest.approx(w[key], rel=1e-3, abs=1e-6), (g["step"], key, g[key], w[key])
    assert want[-1]["loss"] < want[0]["loss"]  # the golden run itself trains
