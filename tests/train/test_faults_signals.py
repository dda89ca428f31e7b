"""Ctrl-C: the first one stops like SIGTERM (step discarded, checkpoint, clean exit), a second one quits at once."""
import os
import signal
import subprocess
import time

import pytest
from distrun import assert_losses_close, command, environment
from faults import config, metrics

from virchow_fast.train import step as step_module
from virchow_fast.train.checkpoint import list_checkpoints
from virchow_fast.train.loop import run


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run(config(out))
    return metrics(out)


def test_ctrl_c_checkpoints_the_step_it_discards_and_resumes_exactly(tmp_path, monkeypatch, capsys, full):
    forward = step_module.SSLLoss.forward
    sent = []

    def ctrl_c_in_step_1(self, student, teacher, batch, *args, **kwargs):
        if batch.step == 1 and not sent:  # one Ctrl-C, during step 1's forward
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        return forward(self, student, teacher, batch, *args, **kwargs)

    monkeypatch.setattr(step_module.SSLLoss, "forward", ctrl_c_in_step_1)
    assert run(config(tmp_path)) == tmp_path  # no KeyboardInterrupt: a clean return
    assert "received SIGINT" in capsys.readouterr().err
    done = len(metrics(tmp_path))  # the step the signal came in, or the one after it, is discarded
    assert 1 <= done <= 2 and [r["step"] for r in metrics(tmp_path)] == list(range(done))
    assert list_checkpoints(tmp_path)[-1].name == f"step_{done:08d}"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the run
    monkeypatch.setattr(step_module.SSLLoss, "forward", forward)
    run(config(tmp_path), resume=True)
    assert_losses_close(metrics(tmp_path), full, 1e-6, keys=("loss", "dino", "ibot", "reg", "grad_norm"))


def _start(out, extra=()):
    proc = subprocess.Popen(command(1, out, ["data.source=synthetic", "data.batch_size=4", *extra]),
                            env=environment(VF_TEST_SLEEP="0.5"), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no step within 120 s"
        time.sleep(0.05)
    return proc


def test_a_second_ctrl_c_quits_at_once(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, ["train.steps_per_epoch=200", "train.checkpoint_every=1000"])
    try:
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
        time.sleep(0.3)
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGINT, (proc.returncode, stderr[-3000:])
    assert time.time() - t0 < 5
    assert "Ctrl-C again to quit at once" in stdout + stderr  # a print or a log line
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_ctrl_c_to_the_group_with_reader_workers_exits_cleanly(tmp_path):
    """A terminal's Ctrl-C also reaches the slide-reader processes: they must not die before the checkpoint."""
    out = tmp_path / "run"
    proc = subprocess.Popen(command(1, out, ["data.num_workers=1", "train.steps_per_epoch=200"]),
                            env=environment(VF_TEST_SLEEP="0.5"), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    said = stdout + stderr
    assert "stopped on a signal" in said and said.count("received SIGINT") == 1
    assert "Traceback" not in stderr, stderr[-3000:]
    assert list_checkpoints(out)[-1].name == f"step_{len(metrics(out)):08d}"
