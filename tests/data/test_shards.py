"""Shards: write -> DALI's own webdataset reader reads them back; corrupt members never reach DALI."""
import tarfile

import numpy as np
import pytest
import torch

from virchow_fast.config import DataConfig
from virchow_fast.data import build_loader
from virchow_fast.data.index import IndexSettings, write_index
from virchow_fast.data.shards import validate_shard, write_shards
from virchow_fast.data.slides import Slide

pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def shard_dir(slides, tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_index(str(slides["generic"]), d / "index", IndexSettings())
    written, skipped = write_shards(d / "index", d / "shards", workers=1, samples_per_shard=8)
    assert written > 8 and skipped == 0
    return d / "shards"


def test_round_trip_through_dali_webdataset_reader(shard_dir, slides):
    import json

    from nvidia.dali import fn, pipeline_def

    tars = sorted(str(p) for p in shard_dir.glob("*.tar"))
    idxs = [t.replace(".tar", ".idx") for t in tars]
    for t, i in zip(tars, idxs):
        validate_shard(t, i)

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        img, meta = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "json"], random_shuffle=False)
        return fn.decoders.image(img, device="cpu"), meta

    p = pipe()
    p.build()
    imgs, metas = p.run()
    slide = Slide(slides["generic"])
    for k in range(4):
        img = np.asarray(imgs[k])
        meta = json.loads(bytes(np.asarray(metas[k])).decode())
        assert img.shape == (392, 392, 3)
        ref = slide.read_context(meta["x"], meta["y"], 10.0 / meta["mag"], 392)
        assert np.abs(img.astype(int) - ref.astype(int)).mean() < 4  # JPEG q90


def test_corrupt_member_is_counted_and_replaced(shard_dir, tmp_path, capfd):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    tar_path = bad / "shard-000000.tar"
    with tarfile.open(tar_path) as tar:
        jpgs = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
    raw = bytearray(tar_path.read_bytes())
    for m in jpgs:  # every JPEG of the first shard: its header overwritten after the SOI marker
        raw[m.offset_data + 2: m.offset_data + 200] = b"\x00" * 198
    tar_path.write_bytes(bytes(raw))
    with pytest.raises(Exception):
        validate_shard(tar_path, bad / "shard-000000.idx")
    cfg = DataConfig(source="shards", paths=[str(bad)], batch_size=4, device="cpu", pipeline="dali")
    loader = build_loader(cfg, 14, seed=0)
    batches = [next(loader) for _ in range(6)]  # 24 draws over ~20 samples: the bad one is met
    assert all(torch.isfinite(b.global_crops).all() for b in batches)
    lines = [l for l in capfd.readouterr().err.splitlines() if l.startswith("data: skipped shard member")]
    names = {m.name for m in jpgs}
    assert lines and all("shard-000000.tar:" in l and l.split(":")[2] in names for l in lines), lines


def test_shards_source_seeded(shard_dir):
    cfg = DataConfig(source="shards", paths=[str(shard_dir)], batch_size=2, device="cpu", pipeline="dali")
    a = next(build_loader(cfg, 14, seed=1))
    b = next(build_loader(cfg, 14, seed=1))
    assert torch.equal(a.global_crops, b.global_crops) and a.mags.tolist() == b.mags.tolist()


def test_webdataset_reader_source_resumes_from_dali_checkpoint(shard_dir):
    cfg = DataConfig(source="shards", paths=[str(shard_dir)], batch_size=4, device="cpu", pipeline="dali",
                     shard_reader="webdataset")
    a = build_loader(cfg, 14, seed=2)
    first = next(a)
    assert first.global_crops.shape == (8, 3, 224, 224) and set(first.mags.tolist()) <= {40.0, 20.0}
    state = a.state_dict()
    assert state["next_step"] == 1 and isinstance(state["dali_checkpoint"], str)
    later = [next(a) for _ in range(6)]  # crosses the reader's epoch (17 samples)
    b = build_loader(cfg, 14, seed=2)
    b.load_state_dict(state)
    again = [next(b) for _ in range(6)]
    for x, y in zip(later, again):
        assert x.step == y.step
        assert torch.equal(x.global_crops, y.global_crops) and torch.equal(x.mags, y.mags)
