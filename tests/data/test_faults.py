"""Tile indexes that lie, reads that fail again and again, the tiles command's bad options and inputs."""
import os
import shutil
import signal

import numpy as np
import pytest
from click.testing import CliRunner

from virchow_fast.cli import main
from virchow_fast.config import ConfigError, DataConfig
from virchow_fast.data.index import IndexSettings, index_name, load_index, write_index


def _tiles(*args):
    return CliRunner().invoke(main, ["tiles", *map(str, args)])


def _only_index(d):
    (f,) = [p for p in d.glob("*.npz")]
    with np.load(f) as z:
        return {k: z[k] for k in z.files}


def _cfg(index_dir, paths, **kw):
    return DataConfig(source="slides", paths=[str(p) for p in paths], index_dir=str(index_dir), batch_size=2,
                      num_workers=1, device="cpu", pipeline="torch", **kw)


# -- 6. an index records its settings -------------------------------------------------------------------------

@pytest.mark.parametrize("first, second, key, want", [
    (["--context", "392"], ["--context", "256"], "context", 256),
    (["--mags", "40,20"], ["--mags", "40"], "settings_mags", [40.0]),
    (["--min-tissue", "0.65"], ["--min-tissue", "0.9"], "min_tissue", 0.9),
    (["--mpp", "0.25"], ["--mpp", "0.5"], "slide_mpp", 0.5),
])
def test_tiles_rebuilds_an_index_built_with_other_settings(slides, tmp_path, first, second, key, want):
    slide = slides["nompp"] if key == "slide_mpp" else slides["generic"]
    out = tmp_path / "out"
    assert _tiles(slide, "--out", out, "--workers", "1", *first).exit_code == 0
    res = _tiles(slide, "--out", out, "--workers", "1", *second)
    assert res.exit_code == 0, res.output
    assert "1 indexed, 0 already done, 1 rebuilt" in res.output, res.output
    assert f"rebuilt the index of {slide}" in res.output
    np.testing.assert_allclose(_only_index(out)[key], want)
    res = _tiles(slide, "--out", out, "--workers", "1", *second)  # same settings again: nothing to do
    assert "0 indexed, 1 already done" in res.output, res.output


def test_train_makes_the_index_match_its_context(slides, tmp_path, capfd):
    """An index of context 256 under a config of 392 (DALI segfaulted on it): rebuilt, said in one line."""
    from virchow_fast.data import build_loader

    idx = tmp_path / "idx"
    write_index(str(slides["generic"]), idx, IndexSettings(context=256))
    loader = build_loader(_cfg(idx, [slides["generic"]]), 14)
    assert int(_only_index(idx)["context"]) == 392
    assert "1 of them rebuilt (settings context 256 -> 392)" in capfd.readouterr().err
    batch = next(loader)
    assert batch.global_crops.shape == (4, 3, 224, 224)


def test_train_refuses_an_index_it_cannot_rebuild(slides, tmp_path):
    from virchow_fast.data import DataError, build_loader

    copy = tmp_path / "gone.tiff"
    shutil.copy(slides["generic"], copy)
    idx = tmp_path / "idx"
    write_index(str(copy), idx, IndexSettings(context=256))
    copy.write_bytes(b"")  # the slide is now unusable: its old index (context 256) must not be used
    with pytest.raises(DataError) as e:
        build_loader(_cfg(idx, [copy]), 14)
    assert str(idx) in str(e.value) and "\n" not in str(e.value)


# -- 7. training reads what it was given ----------------------------------------------------------------------

def test_train_reads_only_the_indexes_of_its_paths(slides, tmp_path):
    from virchow_fast.data.factory import prepare_index
    from virchow_fast.data.sampling import TileTable

    idx = tmp_path / "idx"
    write_index(str(slides["halves"]), idx, IndexSettings())  # another slide's index, left from earlier
    (idx / "stray.npz").write_bytes(b"PK\x03\x04 broken")  # and a broken stray file
    d, files = prepare_index(_cfg(idx, [slides["generic"]]), None)
    table = TileTable.from_index(d, files)
    assert table.slides == [os.path.abspath(slides["generic"])]
    assert len(load_index(idx, files)) == 1


def test_broken_index_of_a_configured_slide_is_rebuilt(slides, tmp_path):
    from virchow_fast.data.factory import prepare_index

    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / f"{index_name(str(slides['generic']))}.npz").write_bytes(b"garbage")
    _, files = prepare_index(_cfg(idx, [slides["generic"]]), None)
    assert len(load_index(idx, files)[0]["x"]) > 0


def test_slide_deleted_after_indexing_is_reported_once(slides, tmp_path, capfd):
    from virchow_fast.data.sampling import MagSampler, TileTable
    from virchow_fast.data.sources import SlideTiles
    from virchow_fast.data.workers import ReadPool

    gone = tmp_path / "gone.tiff"
    shutil.copy(slides["generic"], gone)
    idx = tmp_path / "idx"
    for s in (gone, slides["halves"]):
        write_index(str(s), idx, IndexSettings(mags=(40.0,), mag_mpp=(0.25,)))
    table = TileTable.from_index(idx)
    gone.unlink()
    cfg = DataConfig(batch_size=8, mags=[40.0], mag_weights=[1.0], mag_mpp=[0.25])
    tiles = SlideTiles(table, MagSampler(table, cfg), ReadPool(1), seed=0)
    got = [t for s in range(4) for t in tiles(s, list(range(8 * s, 8 * s + 8)))]
    tiles.close()
    assert len(got) == 32 and all(c.shape == (392, 392, 3) for c, _ in got)
    lines = [line for line in capfd.readouterr().err.splitlines() if str(gone) in line]
    assert len(lines) == 1 and "from now on" in lines[0], lines
    assert tiles.counters["slides_unusable"] == 1


def test_slide_replaced_after_indexing_is_refused_once(slides, tmp_path, capfd):
    """Another file under an indexed slide's name: its tiles would read the wrong places, silently."""
    from virchow_fast.data.sampling import MagSampler, TileTable
    from virchow_fast.data.sources import SlideTiles
    from virchow_fast.data.workers import ReadPool

    swapped = tmp_path / "swapped.tiff"
    shutil.copy(slides["generic"], swapped)
    idx = tmp_path / "idx"
    for s in (swapped, slides["halves"]):
        write_index(str(s), idx, IndexSettings(mags=(40.0,), mag_mpp=(0.25,)))
    table = TileTable.from_index(idx)
    shutil.copy(slides["aperio"], swapped)  # a readable slide, but not the one indexed
    cfg = DataConfig(batch_size=8, mags=[40.0], mag_weights=[1.0], mag_mpp=[0.25])
    tiles = SlideTiles(table, MagSampler(table, cfg), ReadPool(1), seed=0)
    got = [t for s in range(3) for t in tiles(s, list(range(8 * s, 8 * s + 8)))]
    tiles.close()
    assert len(got) == 24 and tiles.counters["slides_unusable"] == 1
    lines = [line for line in capfd.readouterr().err.splitlines() if str(swapped) in line]
    assert len(lines) == 1 and "changed since it was indexed" in lines[0], lines


# -- 8. known-bad tiles are remembered and counted --------------------------------------------------------------

@pytest.fixture
def corrupt_index(corrupt_tile_slide, tmp_path):
    idx = tmp_path / "cidx"
    write_index(str(corrupt_tile_slide), idx, IndexSettings(mags=(40.0,), mag_mpp=(0.25,)))
    return idx


def test_known_bad_tile_is_read_once(corrupt_index):
    from virchow_fast.data.sampling import MagSampler, TileTable
    from virchow_fast.data.sources import SlideTiles
    from virchow_fast.data.workers import ReadPool

    table = TileTable.from_index(corrupt_index)
    bad_rows = [r for r in range(len(table)) if table.x[r] <= 5 * 256 < table.x[r] + 392 and table.y[r] == 0]
    assert len(bad_rows) == 1
    cfg = DataConfig(batch_size=8, mags=[40.0], mag_weights=[1.0], mag_mpp=[0.25])
    sampler = MagSampler(table, cfg)
    drawn = sum(sampler.draw(np.random.default_rng([0, i]))[1] == bad_rows[0] for i in range(48))
    assert drawn >= 2  # the bad tile is drawn again and again by these indices
    lines = []
    tiles = SlideTiles(table, sampler, ReadPool(1), seed=0, log=lines.append)
    for s in range(48):  # one tile per step: a tile drawn twice in one step is read twice (not yet known bad)
        tiles(s, [s])
    tiles.close()
    assert tiles.pool.failed == 1, lines  # read once, then skipped unread
    assert tiles.counters["tiles_failed"] == 1 and tiles.counters["tiles_known_bad"] >= 1
    assert len(lines) == 1 and str(table.slides[0]) in lines[0]


def test_crash_counter_counts():
    """Two reader crashes in one collect: '(1 crashes so far)', then '(2 ...)' (it said 1 twice)."""
    from virchow_fast.data.workers import ReadPool

    lines = []
    pool = ReadPool(1, log=lines.append)
    os.kill(pool._workers[0].proc.pid, signal.SIGKILL)
    pool._workers[0].proc.join(5)
    ids = pool.submit([("/nonexistent.tiff", i, 0, 0, 16, 16, 0.25) for i in range(3)])
    pool._poll()  # sees the first death; the other tasks go to a new worker
    os.kill(pool._workers[0].proc.pid, signal.SIGKILL)  # which dies before answering (it is still starting)
    got = pool.collect(ids)
    pool.close()
    crashes = [line for line in lines if "crashes so far" in line]
    assert [c.split("(")[-1].split(" ")[0] for c in crashes] == ["1", "2"], lines
    assert pool.crashed == 2 and pool.counters["reader_crashes"] == 2
    assert [g.crashed for g in got] == [True, True, False]


@pytest.fixture
def mostly_bad_slide(slides, tmp_path):
    """The generic slide with its first two rows of level-0 JPEG tiles garbled: 10 of its 15 40x contexts."""
    import tifffile

    path = tmp_path / "mostly_bad.tiff"
    shutil.copy(slides["generic"], path)
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as t:
        for k in range(16):
            off, n = t.pages[0].dataoffsets[k], t.pages[0].databytecounts[k]
            raw[off + n // 2: off + n // 2 + 200] = np.random.default_rng(k).integers(0, 256, 200, np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    return path


def test_skipped_reads_in_metrics_and_summary(mostly_bad_slide, tmp_path, capfd):
    import json

    from virchow_fast.config import load_config
    from virchow_fast.train.loop import run

    cfg = load_config("configs/debug.yaml", ["data.source=slides", f"data.paths=[{mostly_bad_slide}]",
                                             "data.mags=[40.0]", "data.mag_weights=[1.0]", "data.mag_mpp=[0.25]",
                                             "data.batch_size=4", "train.epochs=1", "train.steps_per_epoch=2",
                                             f"train.output_dir={tmp_path / 'run'}", "heads.dino_prototypes=64",
                                             "heads.ibot_prototypes=64"])
    run(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    failed = [r["data_tiles_failed"] for r in records]
    assert failed == sorted(failed) and failed[-1] >= 1  # cumulative, and the bad tiles were met
    err = capfd.readouterr().err
    # a log line: "<time> WARNING virchow_fast.train: data: 12 tile reads failed ..."
    summary = [line[line.index("data: "):] for line in err.splitlines()
               if "data: " in line and "tile reads failed" in line]
    assert summary and summary[-1].startswith(f"data: {failed[-1]} tile reads failed"), err[-2000:]


def test_skips_counted_inside_dataloader_workers(mostly_bad_slide, tmp_path):
    """The torch path reads in DataLoader worker processes: their skips reach the loader's counters."""
    from virchow_fast.data import build_loader

    cfg = _cfg(tmp_path / "idx", [mostly_bad_slide], mags=[40.0], mag_weights=[1.0], mag_mpp=[0.25])
    cfg.batch_size = 4
    loader = build_loader(cfg, 14)
    batches = [next(loader) for _ in range(2)]
    assert all(b.global_crops.shape == (8, 3, 224, 224) for b in batches)
    assert loader.skips["tiles_failed"] >= 1


def test_tiles_counts_decoder_errors_in_one_line(mostly_bad_slide, tmp_path, capfd):
    """cuCIM prints two lines per corrupt tile it decodes for the tissue mask: now one line in all."""
    res = _tiles(mostly_bad_slide, "--out", tmp_path / "out", "--workers", "1")
    assert res.exit_code == 0
    assert f"tiles: {mostly_bad_slide}: 16 decoder errors" in res.output, res.output
    assert "decompressing JPEG" not in capfd.readouterr().out


# -- 11. the tiles command ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [("--context", "0"), ("--mpp", "-1"), ("--min-tissue", "1.5"),
                                           ("--mags", ","), ("--mags", "40,-20"), ("--mag-mpp", "0.25")])
def test_tiles_refuses_impossible_options(slides, tmp_path, option, value):
    res = _tiles(slides["generic"], "--out", tmp_path / "out", option, value)
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], res.output
    assert not (tmp_path / "out").exists()  # refused before any work


def test_tiles_fails_when_a_path_is_missing_or_nothing_indexed(slides, tmp_path):
    out = tmp_path / "out"
    res = _tiles(slides["generic"], tmp_path / "nope.svs", "--out", out, "--workers", "1")
    assert res.exit_code != 0 and "nope.svs" in res.output.splitlines()[-1], res.output
    assert len(list(out.glob("*.npz"))) == 1  # the good slide was still indexed
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.svs").write_text("x" * 100)
    (bad / "b.svs").write_bytes(b"")
    res = _tiles(bad, "--out", tmp_path / "out2", "--workers", "1")
    assert res.exit_code != 0 and "no tile indexed" in res.output, res.output


@pytest.mark.parametrize("payload, kind", [
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, "a PNG image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 200, "a JPEG image"),
    (b"PK\x03\x04" + b"\x00" * 200, "a ZIP archive"),
    (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "an HTML page"),
])
def test_tiles_says_what_a_non_slide_is(tmp_path, payload, kind):
    d = tmp_path / "in"
    d.mkdir()
    (d / "scan.svs").write_bytes(payload)
    res = _tiles(d, "--out", tmp_path / "out", "--workers", "1")
    lines = [line for line in res.output.splitlines() if "scan.svs" in line]
    assert len(lines) == 1 and f"not a slide: {kind}" in lines[0], res.output


def test_tiles_reports_a_folder_named_like_a_slide(slides, tmp_path):
    d = tmp_path / "in"
    (d / "folder.svs").mkdir(parents=True)
    shutil.copy(slides["generic"], d / "real.tiff")
    res = _tiles(d, "--out", tmp_path / "out", "--workers", "1")
    lines = [line for line in res.output.splitlines() if "folder.svs" in line]
    assert len(lines) == 1 and "folder named like a slide" in lines[0], res.output
    assert "1 indexed" in res.output


def test_tiles_indexes_a_slide_named_twice_once(slides, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(slides["generic"], d / "a.tiff")
    res = _tiles(d / "a.tiff", d, tmp_path / "in" / ".." / "in" / "a.tiff", "--out", tmp_path / "out", "--workers", "2")
    assert res.exit_code == 0 and "tiles: 1 indexed" in res.output, res.output


# -- 12. one line instead of a traceback ------------------------------------------------------------------------

def test_no_tiles_at_the_sampled_magnifications_is_one_line(slides, tmp_path):
    """The generic slide has 40x and 20x tiles only; a config sampling 10x/5x only gets one line."""
    res = CliRunner().invoke(main, ["train", "--config", "configs/debug.yaml", "--set", "data.source=slides",
                                    "--set", f"data.paths=[{slides['generic']}]",
                                    "--set", "data.mag_weights=[0,0,1,1]",
                                    "--set", f"train.output_dir={tmp_path / 'run'}"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception  # not a traceback
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "no tiles at the sampled magnifications" in last, res.output


def test_index_dir_that_is_a_file_is_one_line(slides, tmp_path):
    from virchow_fast.data import check_sources

    f = tmp_path / "index.txt"
    f.write_text("not a folder")
    cfg = _cfg(f, [slides["generic"]])
    with pytest.raises(ConfigError, match="data.index_dir"):
        check_sources(cfg)
    res = CliRunner().invoke(main, ["train", "--config", "configs/debug.yaml", "--set", "data.source=slides",
                                    "--set", f"data.paths=[{slides['generic']}]", "--set", f"data.index_dir={f}",
                                    "--set", f"train.output_dir={tmp_path / 'run'}"])
    assert res.exit_code == 1 and "data.index_dir" in res.output.strip().splitlines()[-1], res.output
