"""Test-wide settings: Triton runs in its interpreter when there is no GPU; every test runs from the
repository's root, wherever pytest was started (tests name configs/ and launch tools relative to it)."""
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _at_repository_root():
    with pytest.MonkeyPatch.context() as mp:  # session-wide, so module fixtures see it too
        mp.chdir(ROOT)
        yield


def pytest_collection_modifyitems(config, items):
    """Cases marked ``gpu`` are skipped, visibly and with the reason, where there is no CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
