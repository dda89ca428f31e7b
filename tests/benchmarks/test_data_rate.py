"""bench_data_rate's pieces on tiny inputs: reads, the three augmentation rows, the loader, and the
cores-per-GPU arithmetic recomputed by hand from the measured rates."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_data_rate as bdr  # noqa: E402
import bench_pipeline as bpipe  # noqa: E402
import bench_slides as bslides  # noqa: E402

from virchow_fast.config import CropConfig, DataConfig  # noqa: E402


def bdr_has_dali() -> bool:
    from virchow_fast.data.factory import dali_available

    return dali_available()


@pytest.fixture(scope="module")
def tiny_slide(tmp_path_factory):
    from virchow_fast.data.testslides import make_slide

    # levels 2048 / 1024 / 512 / 256 px: one per magnification 40x..5x
    return make_slide(tmp_path_factory.mktemp("slide") / "s.svs", 2048, 2048, 0.25, "full", seed=0,
                      min_level_side=256)


@pytest.fixture(scope="module")
def measured(tiny_slide):
    from virchow_fast.data.synthetic import he_image

    pytest.importorskip("cucim")
    pytest.importorskip("openslide")
    read_rows = bslides.read_rows(tiny_slide, reads=4, px=128, backends=("cucim", "openslide"))
    crops = CropConfig()
    rng = np.random.default_rng(0)
    contexts = [he_image(rng, crops.context_size, 20.0) for _ in range(3)]
    aug_rows = [bpipe.torch_reference_row(contexts, crops), bpipe.torchvision_row(contexts, crops, "bicubic")]
    if bdr_has_dali():
        aug_rows.append(bpipe.dali_row(contexts, crops, batch=2, batches=1))
    return read_rows, aug_rows


def test_read_rows_cover_every_magnification_and_backend(measured):
    read_rows, _ = measured
    assert {(r["mag"], r["backend"]) for r in read_rows} == {(f"{m}x", b) for m in (40, 20, 10, 5)
                                                             for b in ("cucim", "openslide")}
    assert [r["level"] for r in read_rows if r["backend"] == "cucim"] == [0, 1, 2, 3]
    assert all(r["reads_per_cpu_s"] > 0 and r["reads_s_wall"] > 0 for r in read_rows)


def test_torchvision_chain_cuts_our_crops():
    """Same crop count and sizes as ours, normalised with our mean/std, boxes within our ECT range."""
    from PIL import Image
    from torchvision import transforms as T

    crops = CropConfig()
    aug = bpipe.torchvision_multicrop(crops)
    g, loc = aug(Image.fromarray(np.full((392, 392, 3), 128, np.uint8)))
    assert g.shape == (crops.n_global, 3, crops.global_size, crops.global_size)
    assert loc.shape == (crops.n_local, 3, crops.local_size, crops.local_size)
    # mid grey through jitter / grayscale / flips stays one colour per crop, normalised with our mean / std
    assert float(g.std(dim=(2, 3)).max()) < 1e-5
    # solarise only on the second global crop, as ours
    kinds = [[type(t).__name__ for t in c.transforms] for c in aug.chains]
    assert ["RandomSolarize" in k for k in kinds] == [False, True] + [False]
    ctx = Image.new("RGB", (crops.context_size,) * 2)
    for chain, size in zip(aug.chains, (crops.global_size, crops.global_size, crops.local_size), strict=True):
        rrc = chain.transforms[0]
        assert isinstance(rrc, T.RandomResizedCrop) and tuple(rrc.size) == (size, size)
        for _ in range(50):  # the box: our ECT area (0.9-1.1 x size^2) and aspect (0.95-1.05), up to rounding
            _, _, h, w = rrc.get_params(ctx, rrc.scale, rrc.ratio)
            assert crops.ect_scale[0] * size ** 2 - size <= h * w <= crops.ect_scale[1] * size ** 2 + size
            assert crops.ect_ratio[0] - 2 / size <= w / h <= crops.ect_ratio[1] + 2 / size


def test_cores_per_gpu_matches_a_hand_computation(measured):
    read_rows, aug_rows = measured
    data = DataConfig()
    rates = [{"name": "h", "tiles_s": 82.0, "source": "test"}, {"name": "g", "tiles_s": 27.0, "source": "test"}]
    rows = bdr.cores_rows(read_rows, aug_rows, data.mags, data.mag_weights, rates, gpus_per_node=8,
                          backends=("cucim", "openslide"))
    assert len(rows) == 2 * len(aug_rows)
    for row in rows:
        reads = {r["mag"]: r["reads_per_cpu_s"] for r in read_rows if r["backend"] == row["reads"]}
        aug = next(a["tiles_s_per_cpu_s"] for a in aug_rows if a["pipeline"] == row["augmentation"])
        # data.mag_weights 0.2 / 0.4 / 0.2 / 0.2 at 40x / 20x / 10x / 5x, one context and one multi-crop per tile
        per_tile = 0.2 / reads["40x"] + 0.4 / reads["20x"] + 0.2 / reads["10x"] + 0.2 / reads["5x"] + 1 / aug
        assert row["cores_per_gpu h"] == pytest.approx(82.0 * per_tile, rel=1e-9)
        assert row["cores_per_node g"] == pytest.approx(8 * 27.0 * per_tile, rel=1e-9)
        assert row["tiles_per_core_s"] == pytest.approx(1 / per_tile, rel=1e-9)


def test_mag_mix_renormalises_over_measured_mags():
    rows = [{"mag": "40x", "backend": "b", "reads_per_cpu_s": 100.0}, {"mag": "20x", "backend": "b",
                                                                       "reads_per_cpu_s": 400.0}]
    # 5x / 10x not measured: weights 0.2 and 0.4 become 1/3 and 2/3
    got = bdr.read_cpu_s_per_tile(rows, "b", [40.0, 20.0, 10.0, 5.0], [0.2, 0.4, 0.2, 0.2])
    assert got == pytest.approx((1 / 3) / 100 + (2 / 3) / 400)
    assert bdr.read_cpu_s_per_tile(rows, "other", [40.0], [1.0]) is None


def test_gpu_rate_read_from_the_cost_model_json(tmp_path):
    p = tmp_path / "cost_model_x_b32_full_w1.json"
    p.write_text(json.dumps({"tiles_per_s": 81.5, "mfu": 0.36}))
    assert bdr.rate_from_cost_json(p) == 81.5
    assert bdr.gpu_rates([], "a=100,b=33") == [{"name": "a", "tiles_s": 100.0, "source": "--gpu-rates"},
                                              {"name": "b", "tiles_s": 33.0, "source": "--gpu-rates"}]
    for bad in ("a", "a=fast", "a=0", "=5"):
        with pytest.raises(SystemExit, match="--gpu-rates"):
            bdr.gpu_rates([], bad)


def test_loader_rows_end_to_end(tmp_path):
    """The trainer's torch-path loader in this process: tiles/s and tiles per CPU second."""
    from virchow_fast.data.index import IndexSettings, write_index
    from virchow_fast.data.testslides import make_slide

    slide = make_slide(tmp_path / "s.svs", 2048, 1536, 0.25, "full", seed=1)
    write_index(str(slide), tmp_path / "idx", IndexSettings(mags=(40.0, 20.0), mag_mpp=(0.25, 0.5)))
    rows = bpipe.loader_rows(slide, tmp_path / "idx", batch=2, batches=1, workers=(0,), pipelines=("torch",),
                             repeats=2)
    assert len(rows) == 1 and rows[0]["tiles"] == 2 and rows[0]["tiles_s_per_cpu_s"] > 0
    assert rows[0]["tiles_s_wall"] >= rows[0]["tiles_s_wall_worst"] > 0  # the best of two windows
    (cores,) = bdr.loader_cores_rows(rows, [{"name": "h", "tiles_s": 50.0}], gpus_per_node=4)
    assert cores["cores_per_gpu h"] == pytest.approx(50.0 / rows[0]["tiles_s_per_cpu_s"])
    assert cores["cores_per_node h"] == pytest.approx(4 * cores["cores_per_gpu h"])
