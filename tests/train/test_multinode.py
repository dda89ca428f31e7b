"""The multi-node launches of docs/multinode.md, as far as one machine allows: two "nodes" on localhost.

- torchrun with ``--nnodes 2``: two agents meet at a c10d rendezvous on 127.0.0.1, one worker each;
- scripts/slurm_train.sbatch as SLURM would run it, with stand-ins for ``srun`` (starts the tasks with
  SLURM's variables) and ``scontrol`` (names localhost, records requeues).
Both give HSDP with one shard group per node (LOCAL_WORLD_SIZE = 1 here: 2 replicas x 1 shard) and
the same per-step losses as one process on the same global batch.
"""
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from distrun import DRIVER, ROOT, TILES, TINY, assert_losses_close, cached, environment, metrics

pytestmark = pytest.mark.slow

KEYS = ("loss", "dino", "ibot", "grad_norm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(out=None) -> list[str]:
    args = []
    for item in TINY + [f"data.batch_size={TILES // 2}"] + ([f"train.output_dir={out}"] if out else []):
        args += ["--set", item]
    return args


def test_torchrun_two_nodes_localhost_rendezvous(tmp_path):
    out, port = tmp_path / "run", _free_port()
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "vf-test",
             str(DRIVER), "train", "--config", str(ROOT / "configs" / "debug.yaml"), *_overrides(out)]
    procs = [subprocess.Popen(agent, env=environment(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, results, strict=True):
        assert p.returncode == 0, f"{o[-2000:]}\n{e[-4000:]}"
    assert "HSDP: 2 replicas x 1 shards" in "".join(e for _, e in results)
    assert_losses_close(metrics(out), metrics(cached(1)), 1e-5, keys=KEYS)


FAKE_SRUN = textwrap.dedent('''\
    #!{python}
    """srun stand-in: start SLURM_NTASKS copies of the command with SLURM's per-task variables."""
    import os, subprocess, sys
    args = [a for a in sys.argv[1:]]
    while args and args[0].startswith("--"):
        args.pop(0)
    n, per_node = int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
    procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i % per_node),
                                              SLURM_NODEID=str(i // per_node))) for i in range(n)]
    sys.exit(max(p.wait() for p in procs))
    ''')

FAKE_SCONTROL = textwrap.dedent('''\
    #!/bin/sh
    case "$1" in
      show) echo localhost ;;
      requeue) echo "$2" >> "$VF_REQUEUED" ;;
    esac
    ''')


def test_slurm_script_two_nodes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    for tool in ("srun", "scontrol"):
        os.chmod(bin_dir / tool, 0o755)
    out, requeued = tmp_path / "run", tmp_path / "requeued"
    env = environment(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
                      SLURM_JOB_NODELIST="node[0-1]", SLURM_JOB_ID="4242", CONFIG=str(ROOT / "configs" / "debug.yaml"),
                      RUN_DIR=str(out), PYTHON=sys.executable, MASTER_PORT=str(_free_port()),
                      VF_REQUEUED=str(requeued))
    extra = _overrides()  # the script sets train.output_dir from RUN_DIR
    res = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_train.sbatch"), *extra], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert "HSDP: 2 replicas x 1 shards" in res.stderr
    assert_losses_close(metrics(out), metrics(cached(1)), 1e-5, keys=KEYS)
    assert not requeued.exists()  # it reached its last checkpoint: nothing to requeue
