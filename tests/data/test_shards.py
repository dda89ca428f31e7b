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
    for t, i in zip(tars, idxs, strict=False):
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
    with pytest.raises(ValueError):
        validate_shard(tar_path, bad / "shard-000000.idx")
    cfg = DataConfig(source="shards", paths=[str(bad)], batch_size=4, device="cpu", pipeline="dali")
    loader = build_loader(cfg, 14, seed=0)
    batches = [next(loader) for _ in range(6)]  # 24 draws over ~20 samples: the bad one is met
    assert all(torch.isfinite(b.global_crops).all() for b in batches)
    said = "data: skipped shard member"  # the message, after the log line's time, level and logger name
    lines = [line[line.index(said):] for line in capfd.readouterr().err.splitlines() if said in line]
    names = {m.name for m in jpgs}
    assert lines and all("shard-000000.tar:" in line and line.split(":")[2] in names for line in lines), lines


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
    for x, y in zip(later, again, strict=False):
        assert x.step == y.step
        assert torch.equal(x.global_crops, y.global_crops) and torch.equal(x.mags, y.mags)


def _copy(shard_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    return bad


def _jpgs(tar_path):
    with tarfile.open(tar_path) as tar:
        return [m for m in tar.getmembers() if m.name.endswith(".jpg")]


def _scramble(data: bytes, seed=0) -> bytes:
    """Random bytes in the entropy-coded half of a JPEG, same length; SOI/SOS/EOI markers stay valid."""
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    n = (len(data) - start) // 2
    junk = np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8)
    junk[junk == 0xFF] = 0x7F  # no stray markers: libjpeg decodes this without a word
    return data[:start] + junk.tobytes() + data[start + n:]


def _wds_cfg(d):
    return DataConfig(source="shards", paths=[str(d)], batch_size=4, device="cpu", pipeline="dali",
                      shard_reader="webdataset")


def test_webdataset_reader_drops_a_bad_jpeg_member(shard_dir, tmp_path):
    """One undecodable member: DALI's decoder failed the run; now the sample is dropped and counted."""
    bad = _copy(shard_dir, tmp_path)
    tar_path = bad / "shard-000000.tar"
    (m,) = _jpgs(tar_path)[:1]
    raw = bytearray(tar_path.read_bytes())
    raw[m.offset_data + 2: m.offset_data + 200] = b"\x00" * 198
    tar_path.write_bytes(bytes(raw))
    loader = build_loader(_wds_cfg(bad), 14, seed=0, run_dir=str(tmp_path / "run"))
    batches = [next(loader) for _ in range(6)]  # more than an epoch of the reader
    assert all(torch.isfinite(b.global_crops).all() for b in batches)
    assert loader.skips["shard_samples_dropped"] == 1


def test_webdataset_reader_survives_a_truncated_shard(shard_dir, tmp_path):
    """A shard cut in half: DALI refused the index ('malformed'); now its intact samples are kept."""
    bad = _copy(shard_dir, tmp_path)
    tar_path = bad / "shard-000001.tar"
    n_jpg = len(_jpgs(tar_path))
    tar_path.write_bytes(tar_path.read_bytes()[: tar_path.stat().st_size // 2])
    loader = build_loader(_wds_cfg(bad), 14, seed=0, run_dir=str(tmp_path / "run"))
    batches = [next(loader) for _ in range(6)]
    assert all(torch.isfinite(b.global_crops).all() for b in batches)
    assert 0 < loader.skips["shard_samples_dropped"] < n_jpg
    # checked once per shard version: a second loader reuses the check (same count, no new work)
    again = build_loader(_wds_cfg(bad), 14, seed=0, run_dir=str(tmp_path / "run"))
    assert again.skips["shard_samples_dropped"] == loader.skips["shard_samples_dropped"]


def test_scrambled_member_is_caught_by_checksum(shard_dir, tmp_path):
    """Valid markers, scrambled entropy data: decodes to garbage without an error; the CRC-32 catches it."""
    from virchow_fast.data.sampling import MagSampler
    from virchow_fast.data.sources import ShardTable, ShardTiles, decode_jpeg

    bad = _copy(shard_dir, tmp_path)
    tar_path = bad / "shard-000000.tar"
    m = _jpgs(tar_path)[0]
    raw = bytearray(tar_path.read_bytes())
    raw[m.offset_data:m.offset_data + m.size] = _scramble(bytes(raw[m.offset_data:m.offset_data + m.size]))
    tar_path.write_bytes(bytes(raw))
    decode_jpeg(bytes(raw[m.offset_data:m.offset_data + m.size]))  # the decoder sees nothing wrong
    table = ShardTable(bad)
    row = int(np.flatnonzero(table.key == m.name[:-4])[0])
    with pytest.raises(ValueError, match="CRC"):
        table.read_bytes(row)
    lines = []
    tiles = ShardTiles(table, MagSampler(table, DataConfig(mags=[40.0, 20.0], mag_weights=[1.0, 1.0],
                                                           mag_mpp=[0.25, 0.5])), 0, log=lines.append)
    got = tiles(0, list(range(300)))  # the member is drawn many times: read (and reported) once
    assert len(got) == 300 and tiles.counters["tiles_failed"] == 1 and m.name in lines[0]
    assert tiles.counters["tiles_known_bad"] >= 1
    with pytest.raises(ValueError, match="CRC"):
        crc = dict(zip(map(str, table.key), map(int, table.crc), strict=True))
        validate_shard(tar_path, bad / "shard-000000.idx", crc)


def test_writer_refuses_a_scrambled_encoding(slides, tmp_path, monkeypatch):
    """An encoder (or memory) that scrambles the entropy data: the writer compares with the pixels."""
    import virchow_fast.data.shards as shards

    write_index(str(slides["generic"]), tmp_path / "index", IndexSettings(mags=(20.0,), mag_mpp=(0.5,)))
    real = shards.encode_jpeg

    def scrambled(rgb, quality=90):
        return _scramble(real(rgb, quality))

    monkeypatch.setattr(shards, "encode_jpeg", scrambled)
    lines = []
    written, skipped = write_shards(tmp_path / "index", tmp_path / "shards", workers=1, log=lines.append)
    assert written == 0 and skipped == 2 and all("scrambled" in line for line in lines), lines


def test_shards_of_another_context_are_refused(shard_dir):
    """Shards of 392 px contexts under a config of 448: one line (DALI crashed on a context smaller
    than the crop boxes, and trained on the wrong scale on a larger one)."""
    from virchow_fast.data import DataError

    for reader in ("index", "webdataset"):
        cfg = DataConfig(source="shards", paths=[str(shard_dir)], batch_size=2, device="cpu", pipeline="torch",
                         shard_reader=reader)
        cfg.crops.context_size = 448
        with pytest.raises(DataError, match="shards of 392 px contexts, but data.crops.context_size is 448"):
            build_loader(cfg, 14)
