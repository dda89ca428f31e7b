"""eval end to end: tiles whose classes differ in texture and stain; a random-init ViT's features
beat chance clearly, a constant model (no patch embedding: every tile gives the same tokens) does not."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import labelled_tile, random_backbone, save_model, write_image_folder

from virchow_fast.downstream.datasets import DatasetError, open_labelled
from virchow_fast.downstream.evaluate import evaluate

FAST = dict(seeds=2, max_steps=400, patience=20, val_every=5, progress=False)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    return {split: write_image_folder(root / split, n, seed=s)
            for split, n, s in (("train", 24, 0), ("val", 10, 100), ("test", 10, 200))}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    rand = random_backbone(0)
    const = random_backbone(0)
    with torch.no_grad():
        const.patch_embed.proj.weight.zero_()
        const.patch_embed.proj.bias.zero_()
    return {"random": save_model(root / "random" / "model.safetensors", rand),
            "constant": save_model(root / "constant" / "model.safetensors", const)}


def test_random_features_beat_chance_constant_model_does_not(tiles, models, tmp_path):
    got = {}
    for name, path in models.items():
        res = evaluate(str(path), str(tiles["train"]), str(tiles["val"]), str(tiles["test"]),
                       out=str(tmp_path / f"{name}.json"), **FAST)
        got[name] = res["results"]
        assert json.loads((tmp_path / f"{name}.json").read_text())["results"] == res["results"]
        assert res["tiles"] == {"train": 72, "val": 30, "test": 30} and res["embedding_dim"] == 96
    knn, probe = "knn (k=20, cosine)", "linear probe (2 seeds)"
    chance = 1 / 3
    assert got["random"][knn]["balanced_accuracy"] > 0.8
    assert got["random"][probe]["balanced_accuracy"]["mean"] > 0.8
    assert got["constant"][knn]["balanced_accuracy"] == pytest.approx(chance)
    assert got["constant"][probe]["balanced_accuracy"]["mean"] == pytest.approx(chance)


def _pcam(root, split, n, seed):
    import h5py

    ys = np.arange(n) % 2
    xs = np.stack([labelled_tile(int(c), seed + i, 96) for i, c in enumerate(ys)])
    with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
        f["x"] = xs
    with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
        f["y"] = ys.reshape(-1, 1, 1, 1).astype(np.uint8)
    return root / f"camelyonpatch_level_2_split_{split}_x.h5"


def test_pcam_and_csv_sets_and_the_cli(tiles, models, tmp_path):
    from virchow_fast.cli import main

    train, val = _pcam(tmp_path, "train", 30, 0), _pcam(tmp_path, "valid", 16, 500)
    csv = tmp_path / "test.csv"
    rows = [p for c in ("0_stroma", "1_tumour") for p in sorted((tiles["test"] / c).glob("*.png"))[:8]]
    csv.write_text("path,label\n" + "".join(f"{p},{p.parent.name[0]}\n" for p in rows))
    assert open_labelled(csv, ["0", "1"]).labels.tolist() == [0] * 8 + [1] * 8
    out = tmp_path / "pcam.json"
    res = CliRunner().invoke(main, ["eval", "--model", str(models["random"]), "--train", str(train), "--val", str(val),
                                    "--test", str(csv), "--out", str(out), "--seeds", "2", "--max-steps", "300",
                                    "--patience", "20", "--val-every", "5"])
    assert res.exit_code == 0, res.output
    assert "balanced_accuracy" in res.output and "auroc" in res.output and "+-" in res.output
    result = json.loads(out.read_text())
    assert result["classes"] == ["0", "1"] and result["tiles"]["test"] == 16
    assert result["results"]["knn (k=20, cosine)"]["auroc"] > 0.9


def test_bad_sets_are_one_line(tiles, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{next((tiles['val'] / '0_stroma').glob('*.png'))},unknown\n")
    with pytest.raises(DatasetError, match="bad.csv: label 'unknown' is not a class of the training set"):
        open_labelled(bad, ["0_stroma", "1_tumour"])
    txt = tmp_path / "labels.txt"
    txt.write_text("a,b\n")
    with pytest.raises(DatasetError, match="labels.txt: expected an ImageFolder tree"):
        open_labelled(txt)


def test_undecodable_tiles_are_skipped_and_counted(tiles, models, tmp_path):
    import shutil

    train = tmp_path / "train"
    shutil.copytree(tiles["train"], train)
    (train / "0_stroma" / "broken.png").write_bytes(b"not a png")
    res = evaluate(str(models["random"]), str(train), str(tiles["val"]), **dict(FAST, seeds=1))
    assert res["skipped_tiles"]["train"] == 1 and res["tiles"]["train"] == 72
