"""Preemption and failures: SIGKILL then --resume, SIGTERM on one rank, non-finite losses."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from distrun import TINY, assert_losses_close, cached, command, environment, launch, metrics

from virchow_fast.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before {what}:\n{proc.stderr.read()[-5000:]}")
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def _lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (a direct child with RANK=rank in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher_pid}")


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    want = metrics(cached(2))  # 4 steps on 2 processes, checkpoints at 2 and 4
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(2, out), env=environment(VF_TEST_SLEEP="0.5"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / "checkpoints" / "step_00000002").is_dir(), proc, "the step-2 checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, at once
        proc.wait()
    assert _lines(out) < 4
    res = launch(2, out, resume=True)
    assert "resumed from" in res.stdout + res.stderr
    assert_losses_close(metrics(out), want, 1e-6, keys=("loss", "dino", "ibot", "reg", "grad_norm"))


def test_sigterm_on_one_rank_stops_all_ranks_with_a_checkpoint(tmp_path):
    """SIGTERM reaches rank 1 only: both ranks stop at the same step, checkpoint it, exit 0.

    The same run has a NaN loss on rank 1 at step 1: both ranks skip that step together.
    """
    out = tmp_path / "term"
    extra = ["train.steps_per_epoch=200", "train.checkpoint_every=1000"]
    proc = subprocess.Popen(command(2, out, extra), env=environment(VF_TEST_SLEEP="0.2", VF_TEST_NAN="1:1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _lines(out) >= 3, proc, "three steps")
        os.kill(_worker_pid(proc.pid, 1), signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    records = metrics(out)
    done = len(records)
    assert 3 <= done < 200
    assert [p.name for p in list_checkpoints(out)] == [f"step_{done:08d}"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert [r["skipped"] for r in records[:3]] == [False, True, False]
    assert records[1]["nonfinite_total"] == 1 and records[-1]["nonfinite_total"] == 1
    # (that a signal-stop checkpoint resumes exactly: the process-group test below)


def test_nonfinite_losses_in_a_row_stop_with_a_clear_error(tmp_path, monkeypatch):
    from virchow_fast.config import load_config
    from virchow_fast.train import loop, step

    forward = step.SSLLoss.forward

    def nan_from_step_1(self, student, teacher, batch, *args, **kwargs):
        out = forward(self, student, teacher, batch, *args, **kwargs)
        if batch.step >= 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(step.SSLLoss, "forward", nan_from_step_1)
    cfg = load_config("configs/debug.yaml", TINY + ["data.batch_size=4", f"train.output_dir={tmp_path}",
                                                    "train.max_nonfinite_steps=2"])
    with pytest.raises(loop.NonFiniteLossError, match="2 non-finite losses in a row up to step 2"):
        loop.run(cfg)
    records = metrics(tmp_path)
    assert [(r["step"], r["skipped"], r["nonfinite_total"]) for r in records] == [(0, False, 0), (1, True, 1),
                                                                                   (2, True, 2)]


def test_sigterm_to_every_process_with_loader_workers_then_resume_equals_uninterrupted(tmp_path):
    """SLURM-style preemption: SIGTERM to the trainer *and* its data-loader worker at once.

    The step in progress is discarded and checkpointed; resuming gives the uninterrupted losses.
    """
    want = metrics(cached(1))
    out = tmp_path / "group"
    proc = subprocess.Popen(command(1, out, ["data.num_workers=1"]), env=environment(VF_TEST_SLEEP="0.5"),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _lines(out) >= 1, proc, "the first step")
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-5000:]
    assert "stopped on a signal" in stdout + stderr
    done = _lines(out)
    assert 1 <= done < 4
    assert list_checkpoints(out)[-1].name == f"step_{done:08d}"
    launch(1, out, ["data.num_workers=1"], resume=True)
    assert_losses_close(metrics(out), want, 1e-6, keys=("loss", "dino", "ibot", "reg", "grad_norm"))
