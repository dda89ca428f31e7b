"""The CLI as the multi-process tests launch it (``python tests/train/dist_driver.py train ...``).

Test-only changes, from the environment of the launched processes:
- ``VF_TEST_NAN=rank:step[,rank:step]`` turns that rank's loss at that step into NaN;
- ``VF_TEST_SLEEP=seconds`` sleeps in every step (time for a test to signal a run mid-training).
"""
import os
import sys
import time

from virchow_fast.train import step as _step

_NAN = {tuple(int(v) for v in item.split(":")) for item in os.environ.get("VF_TEST_NAN", "").split(",") if item}
_SLEEP = float(os.environ.get("VF_TEST_SLEEP", "0"))
if _NAN or _SLEEP:
    _forward = _step.SSLLoss.forward

    def _forward_test(self, student, teacher, batch, *args, **kwargs):
        out = _forward(self, student, teacher, batch, *args, **kwargs)
        if (int(os.environ.get("RANK", "0")), batch.step) in _NAN:
            out["loss"] = out["loss"] * float("nan")
        time.sleep(_SLEEP)
        return out

    _step.SSLLoss.forward = _forward_test

if __name__ == "__main__":
    from virchow_fast.cli import main

    sys.exit(main())
