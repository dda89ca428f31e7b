"""Batch reads: one cuCIM read_region per group gives the pixels of single reads; bad regions fail alone."""
import os
import signal

import numpy as np
import pytest

from virchow_fast.data.index import IndexSettings, write_index
from virchow_fast.data.slides import Slide
from virchow_fast.data.workers import ReadFailure, ReadPool, SlideCache, read_task


@pytest.fixture(scope="module")
def index_dir(slides, tmp_path_factory):
    d = tmp_path_factory.mktemp("batch_index")
    write_index(str(slides["aperio"]), d, IndexSettings())
    return d


def _positions(slide, level, size, n, seed):
    rng = np.random.default_rng(seed)
    lev = slide.levels[level]
    ds = lev.downsample
    pos = [(int(rng.integers(0, (lev.width - size) * ds)), int(rng.integers(0, (lev.height - size) * ds)))
           for _ in range(n)]  # level-0 coordinates, not level-aligned
    return pos + [(int((lev.width - size // 2) * ds), 0)]  # one past the right edge: white, read on its own


def test_batch_equals_single_reads_at_each_level(slides):
    s = Slide(slides["aperio"], backend="cucim")
    for level in range(len(s.levels)):
        pos = _positions(s, level, 224, 12, level)
        batch = s.read_batch(pos, level, 224, 224)
        assert len(batch) == len(pos)
        for (x, y), got in zip(pos, batch, strict=False):
            np.testing.assert_array_equal(got, s.read(x, y, level, 224, 224))
        assert (batch[-1][:, 112:] == 255).all()  # the edge policy holds in a batch
    o = Slide(slides["aperio"], backend="openslide")  # per region there, same answers
    pos = _positions(o, 1, 100, 3, 9)
    for (x, y), got in zip(pos, o.read_batch(pos, 1, 100, 100), strict=False):
        np.testing.assert_array_equal(got, o.read(x, y, 1, 100, 100))


def test_pool_groups_tasks_into_batches(slides, monkeypatch):
    calls = []
    real = Slide.read_batch

    def spy(self, xys, level, w, h, **kw):
        calls.append((level, len(xys)))
        return real(self, xys, level, w, h, **kw)

    monkeypatch.setattr(Slide, "read_batch", spy)
    path = str(slides["aperio"])
    s = Slide(path)
    tasks = []
    for level, (read_px, out_px) in enumerate([(392, 392), (392, 392), (300, 392)]):  # level 2: resized
        tasks += [(path, x, y, level, read_px, out_px, 0.25) for x, y in _positions(s, level, read_px, 5, 10 + level)]
    order = np.random.default_rng(0).permutation(len(tasks))  # a step's tiles come in any order
    tasks = [tasks[i] for i in order]
    got = ReadPool(0).map(tasks)
    assert sorted(calls) == [(0, 6), (1, 6), (2, 6)]
    cache = SlideCache()
    for task, g in zip(tasks, got, strict=False):
        assert g.shape == (392, 392, 3)
        np.testing.assert_array_equal(g, read_task(cache, task))


def test_bad_region_in_a_batch_fails_alone(slides, corrupt_tile_slide):
    """A corrupt JPEG tile in a batch (cuCIM only prints an error): the group is read per region."""
    path = corrupt_tile_slide
    xys = [(0, 512), (5 * 256, 0), (300, 700), (1024, 1024)]  # the second covers tile 5 of level 0
    tasks = [(str(path), x, y, 0, 256, 256, 0.25) for x, y in xys]
    lines = []
    pool = ReadPool(1, log=lines.append)
    got = pool.map(tasks)
    pool.close()
    assert isinstance(got[1], ReadFailure) and str(path) in got[1].message and "JPEG" in got[1].message
    assert pool.failed == 1 and not lines and "\n" not in got[1].message  # the getter reports, not the pool
    clean = Slide(slides["generic"])
    for i in (0, 2, 3):
        np.testing.assert_array_equal(got[i], clean.read(*xys[i], 0, 256, 256))


def test_crash_inside_a_batch_blames_no_region(slides, index_dir):
    """A worker that dies in a batch read: its regions are read again one by one, none is failed."""
    from virchow_fast.data.sampling import TileTable

    table = TileTable.from_index(index_dir)
    rows = [r for r in range(len(table)) if table.slide[r] == 0 and table.level[r] == table.level[0]][:3]
    lines = []
    pool = ReadPool(1, log=lines.append)
    w = pool._workers[0]
    os.kill(w.proc.pid, signal.SIGSEGV)
    w.proc.join(5)
    ids = pool.submit([table.task(r) for r in rows])
    w.in_batch = True  # as if it had said "batch" before dying
    got = pool.collect(ids)
    assert all(g.shape == (392, 392, 3) for g in got) and pool.failed == 0
    assert any("in a batch read of 3 regions" in line for line in lines)
    pool.close()
