"""Tissue mask, tile index round trip / re-run, the tiles command and its bad inputs."""
import numpy as np
import pytest
from click.testing import CliRunner

from virchow_fast.data.index import IndexSettings, index_slide, is_done, load_index, write_index
from virchow_fast.data.slides import Slide
from virchow_fast.data.tissue import tile_fractions, tissue_mask


def test_tissue_fraction_known_layout(slides):
    s = Slide(slides["halves"])  # 3136 x 1568: left half tissue, right half glass
    level = s.thumbnail_level(1024)
    lev = s.levels[level]
    mask = tissue_mask(s.read(0, 0, level, lev.width, lev.height), s.level_mpp(level))
    assert mask[:, : lev.width // 2 - 8].mean() > 0.97
    assert mask[:, lev.width // 2 + 8:].mean() < 0.01
    side = 784.0  # a 5x3 ... 4x2 grid of 784 px squares
    xs = np.array([0, 784, 1568, 2352, 1176], float)
    ys = np.zeros(5)
    frac = tile_fractions(mask, lev.downsample, xs, ys, side)
    np.testing.assert_allclose(frac, [1, 1, 0, 0, 0.5], atol=0.03)


def test_blank_slide_has_no_tissue(slides):
    s = Slide(slides["blank"])
    level = s.thumbnail_level(1024)
    lev = s.levels[level]
    assert tissue_mask(s.read(0, 0, level, lev.width, lev.height), s.level_mpp(level)).sum() == 0
    cols, _, _ = index_slide(str(slides["blank"]), IndexSettings())
    assert len(cols["x"]) == 0


def test_index_round_trip_and_rerun(slides, tmp_path):
    st = IndexSettings(min_tissue=0.65)
    target = write_index(str(slides["generic"]), tmp_path, st)  # 2048 x 1536, all tissue
    assert is_done(str(slides["generic"]), tmp_path)
    (part,) = load_index(tmp_path)
    assert set(np.unique(part["mag"])) == {40.0, 20.0}  # 10x and 5x contexts exceed the slide
    m40 = part["mag"] == 40.0
    assert m40.sum() == (2048 // 392) * (1536 // 392)
    assert (part["level"][m40] == 0).all() and (part["level"][part["mag"] == 20.0] == 1).all()
    assert (part["tissue"] >= 0.65).all() and (part["read"] == 392).all()
    assert ((part["x"] + 392 * part["mag"].astype(float) ** -1 * 10 / 0.25) <= 2048 + 1).all()
    assert str(part["slide"]).endswith("generic.tiff") and float(part["slide_mpp"]) == pytest.approx(0.25)
    assert target.with_suffix(".png").is_file()
    # a touched slide is redone
    import os

    os.utime(slides["generic"], (1, 1))
    assert not is_done(str(slides["generic"]), tmp_path)


def test_cmu_index(cmu, tmp_path):
    write_index(str(cmu), tmp_path, IndexSettings())
    (part,) = load_index(tmp_path)
    assert 40.0 not in set(part["mag"].tolist())  # a 20x scan gives no 40x tiles
    assert (part["mag"] == 20.0).sum() >= 4
    assert (part["read"][part["mag"] == 10.0] == round(392 * 1.0 / 0.499)).all()


def test_tiles_command_bad_inputs_and_rerun(slides, tmp_path):
    from virchow_fast.cli import main

    bad = tmp_path / "in"
    bad.mkdir()
    data = slides["aperio"].read_bytes()
    (bad / "truncated.svs").write_bytes(data[: len(data) // 3])
    (bad / "notaslide.svs").write_text("hello\n" * 100)
    (bad / "empty.svs").write_bytes(b"")
    args = ["tiles", str(bad), str(slides["generic"]), str(slides["tiny"]), str(slides["blank"]),
            "--out", str(tmp_path / "out"), "--workers", "2"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "tiles: 3 indexed, 0 already done, 2 without tiles, 3 unreadable" in out
    for name in ("truncated.svs", "notaslide.svs", "empty.svs"):
        lines = [line for line in out.splitlines() if "skipped" in line and name in line]
        assert len(lines) == 1, out
    for name in ("tiny.tiff", "blank.tiff"):
        assert len([line for line in out.splitlines() if "no tiles kept" in line and name in line]) == 1, out
    res = CliRunner().invoke(main, args)
    assert "0 indexed, 3 already done" in res.output


def test_tiles_takes_its_settings_from_the_config(slides, tmp_path):
    """--config / --set data.* decide the index; a short option sets its key; train finds the index current."""
    from virchow_fast.cli import main
    from virchow_fast.config import load_config
    from virchow_fast.data.factory import index_settings
    from virchow_fast.data.index import index_file, index_state

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("data:\n  source: slides\n  paths: [%s]\n  index_dir: %s\n  mags: [20.0]\n"
                        "  mag_weights: [1.0]\n  mag_mpp: [0.5]\n  min_tissue: 0.5\n  crops:\n    context_size: 256\n"
                        % (slides["generic"], tmp_path / "idx"))
    res = CliRunner().invoke(main, ["tiles", "--config", str(cfg_file)])  # slides and folder from the config
    assert res.exit_code == 0 and "tiles: 1 indexed" in res.output, res.output
    data = load_config(str(cfg_file)).data
    assert index_state(str(slides["generic"]), tmp_path / "idx", index_settings(data)) == "current"
    with np.load(index_file(str(slides["generic"]), tmp_path / "idx")) as z:
        assert int(z["context"]) == 256 and float(z["min_tissue"]) == 0.5
        assert z["settings_mags"].tolist() == [20.0] and set(z["mag"].tolist()) == {20.0}
    # --set and a short option on top of the config: each changes its key, the rest stays the config's
    res = CliRunner().invoke(main, ["tiles", "--config", str(cfg_file), "--set", "data.min_tissue=0.9",
                                    "--context", "300"])
    assert res.exit_code == 0 and "1 rebuilt" in res.output, res.output
    with np.load(index_file(str(slides["generic"]), tmp_path / "idx")) as z:
        assert int(z["context"]) == 300 and float(z["min_tissue"]) == 0.9 and z["settings_mags"].tolist() == [20.0]
    # the config's validation refuses an impossible value, in one line naming the option and the key
    res = CliRunner().invoke(main, ["tiles", "--config", str(cfg_file), "--mags", "20,20"])
    assert res.exit_code != 0 and res.output.strip().splitlines() == [
        f"Error: --mags 20,20: {cfg_file}: data.mags: must be distinct, got [20.0, 20.0]"], res.output


def _rank(rank, store, slide, idx, bad, out):
    import time

    import torch.distributed as dist

    from virchow_fast.config import DataConfig
    from virchow_fast.data import DataError, prepare_index

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        if rank == 1:
            time.sleep(1.0)  # arrive at the collective well before rank 0 has finished indexing
        _, files = prepare_index(DataConfig(source="slides", paths=[slide], index_dir=idx), None, rank)
        result = {"files": [str(f) for f in files], "at": time.time()}
        try:
            prepare_index(DataConfig(source="slides", paths=[bad], index_dir=idx), None, rank)
        except DataError as exc:
            result["error"] = str(exc)
        out.put((rank, result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes with a gloo group: ~18 s on 2 cores
def test_other_ranks_wait_for_rank0_index(slides, tmp_path):
    """Rank 1 waits in a collective (a READY file left by an earlier run used to let it through) and
    receives rank 0's index files, or rank 0's error as one line."""
    import multiprocessing as mp

    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "READY").write_text("ok\n")  # stale, from an earlier run
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, tmp_path / "store", str(slides["generic"]), str(idx), str(bad), out))
             for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert got[0]["files"] == got[1]["files"] and len(got[0]["files"]) == 1
    mtime = (idx / got[0]["files"][0].split("/")[-1]).stat().st_mtime
    assert got[1]["at"] >= mtime  # rank 1 returned after rank 0 wrote the index
    assert "no slide of data.paths could be indexed" in got[0]["error"]
    assert got[1]["error"].startswith("rank 0 could not prepare the data") and "\n" not in got[1]["error"]
