"""Damaged checkpoints: found by their manifest, set aside with one line, and the run resumes from the one before."""
import json
import shutil
import subprocess
import zlib

import pytest
from distrun import assert_losses_close, cached, command, environment, launch
from faults import config, metrics, tree_digest

from virchow_fast.train.checkpoint import list_checkpoints
from virchow_fast.train.errors import RunError
from virchow_fast.train.loop import run


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run(config(out))  # 4 steps, checkpoints 2 and 4
    return metrics(out)


def _shard(ckpt):
    return next(p for p in ckpt.iterdir() if p.suffix == ".distcp")


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p):  # same size, 64 bytes in the middle inverted
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    p.write_bytes(bytes(data))


DAMAGE = {
    "truncated shard": lambda ck: _truncate(_shard(ck)),
    "empty shard": lambda ck: _shard(ck).write_bytes(b""),
    "missing shard": lambda ck: _shard(ck).unlink(),
    "truncated metadata": lambda ck: _truncate(ck / ".metadata"),
    "same-size corruption": lambda ck: _flip(_shard(ck)),
}


def test_every_file_of_a_checkpoint_is_in_its_manifest(tmp_path):
    run(config(tmp_path))
    for ckpt in list_checkpoints(tmp_path):
        files = json.loads((ckpt / "manifest.json").read_text())["files"]
        on_disk = {p.name for p in ckpt.iterdir() if p.name != "manifest.json"}
        assert set(files) == on_disk and ".metadata" in on_disk
        for name, entry in files.items():
            data = (ckpt / name).read_bytes()
            assert entry == {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys, full, kind):
    run(config(tmp_path))
    DAMAGE[kind](tmp_path / "checkpoints" / "step_00000004")
    capsys.readouterr()
    run(config(tmp_path), resume=True)
    said = capsys.readouterr().err
    bad = [line for line in said.splitlines() if " is damaged " in line]
    assert len(bad) == 1 and "step_00000004" in bad[0], said
    assert "resumed from" in said and "step_00000002 at step 2" in said
    assert (tmp_path / "checkpoints" / "damaged-step_00000004").is_dir()  # kept, not deleted
    assert_losses_close(metrics(tmp_path), full, 1e-6, keys=("loss", "dino", "ibot", "reg", "grad_norm"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]


def test_no_intact_checkpoint_is_one_line_naming_them(tmp_path):
    run(config(tmp_path))
    for ckpt in list_checkpoints(tmp_path):
        _truncate(_shard(ckpt))
    with pytest.raises(RunError, match=r"no intact checkpoint .*step_00000004, step_00000002"):
        run(config(tmp_path), resume=True)


@pytest.mark.slow
def test_two_processes_agree_on_a_damaged_shard_of_rank_1(tmp_path):
    """Rank 1 wrote and checksummed __1_*.distcp; on resume the ranks split the checks and share the verdict."""
    two = cached(2)  # 4 steps on 2 x 4 tiles, checkpoints 2 and 4
    out = tmp_path / "two"
    shutil.copytree(two, out)
    files = json.loads((out / "checkpoints" / "step_00000004" / "manifest.json").read_text())["files"]
    assert any(name.startswith("__1_") for name in files) and ".metadata" in files
    _flip(next((out / "checkpoints" / "step_00000004").glob("__1_*.distcp")))
    res = launch(2, out, resume=True)
    said = res.stdout + res.stderr
    assert said.count(" is damaged (__1_") == 1 and "step_00000002 at step 2" in said
    assert_losses_close(metrics(out), metrics(two), 1e-6, keys=("loss", "dino", "ibot", "grad_norm"))


@pytest.mark.slow
def test_two_processes_refuse_an_occupied_run_directory_together(tmp_path):
    out = tmp_path / "two"
    shutil.copytree(cached(2), out)
    before = tree_digest(out)
    res = subprocess.run(command(2, out), env=environment(), capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert res.stderr.count("holds an earlier run") == 2  # each rank says it once, and neither trains
    assert tree_digest(out) == before
