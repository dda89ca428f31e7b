"""The training loop: build, (resume), step, log, checkpoint. Same code on one CPU or many GPUs."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from .. import ops
from ..config import Config, derive, save_resolved
from ..data import build_loader
from ..model.ssl import SSLNetwork, ema_update, make_teacher
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import init_distributed, shutdown_distributed
from .optim import apply_schedules, build_optimizer
from .parallelize import parallelize
from .schedules import build_schedules
from .step import SSLLoss

log = logging.getLogger("virchow_fast.train")


class NonFiniteLossError(RuntimeError):
    pass


class MetricsWriter:
    """Per-step metrics as JSON lines in <run>/metrics.jsonl (rank 0); resume drops later lines."""

    def __init__(self, path: Path, start_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < start_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._f = open(path, "a") if enabled else None

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def run(cfg: Config, resume: bool = False, config_path: str | None = None) -> Path:
    """Train per ``cfg``; returns the run directory."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    info = init_distributed(cfg)
    try:
        return _run(cfg, resume, info)
    finally:
        shutdown_distributed()


def _run(cfg: Config, resume: bool, info) -> Path:
    derived = derive(cfg, info.world_size)
    run_dir = Path(cfg.train.output_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, derived, run_dir / "resolved_config.yaml")
    ops.configure(cfg.ops)
    torch.manual_seed(cfg.train.seed)  # same init on every rank
    student = SSLNetwork(cfg.model, cfg.heads)
    teacher = make_teacher(student)
    student, teacher = parallelize(student, teacher, cfg.parallel, info)
    student.to(info.device)
    teacher.to(info.device)
    optimizer = build_optimizer(student, cfg.model.depth, cfg.optim, info.device.type)
    loss_fn = SSLLoss(cfg.loss, cfg.heads.dino_prototypes,
                      cfg.heads.ibot_prototypes if cfg.heads.separate_ibot_head else cfg.heads.dino_prototypes)
    loss_fn.to(info.device)
    total_steps = derived["total_steps"]
    sched = build_schedules(cfg, derived["peak_lr"], total_steps)

    torch.manual_seed(cfg.train.seed + 1000 * (info.rank + 1))  # per-rank stream (drop path); a resume restores it
    start_step, data_state = 0, None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            log.warning("--resume: no complete checkpoint in %s, starting from step 0", run_dir)
        else:
            loaded = load_checkpoint(ckpt, student, teacher, optimizer, {"dino": loss_fn.dino, "ibot": loss_fn.ibot})
            start_step, data_state = loaded["step"], loaded["data"]
            if info.is_main:
                print(f"resumed from {ckpt} at step {start_step}", flush=True)

    loader = build_loader(cfg.data, cfg.model.patch_size, info.rank, info.world_size, cfg.train.seed,
                          start_step=start_step, run_dir=str(run_dir))
    if data_state is not None:
        loader.load_state_dict(data_state)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", start_step, info.is_main)
    bar = _progress(total_steps, start_step, info.is_main)
    losses_dict = {"dino": loss_fn.dino, "ibot": loss_fn.ibot}

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir, step, student, teacher, optimizer, losses_dict, loader.state_dict(),
                        cfg.train.keep_checkpoints)

    bad_in_a_row = 0
    tiles = cfg.data.batch_size * info.world_size
    student.train()
    teacher.eval()
    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            batch = next(loader).to(info.device)
            t1 = time.perf_counter()
            s = sched.at(step)
            apply_schedules(optimizer, s["lr"], s["weight_decay"], s["last_layer_lr"])
            out = loss_fn(student, teacher, batch, s["teacher_temp"], info.reducer, info.world_size)
            optimizer.zero_grad(set_to_none=True)
            loss = out["loss"]
            if not torch.isfinite(loss).item():
                bad_in_a_row += 1
                log.warning("step %d: non-finite loss %s, skipped (%d in a row)", step, loss.item(), bad_in_a_row)
                if bad_in_a_row >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(f"{bad_in_a_row} non-finite losses in a row up to step {step}")
                continue
            bad_in_a_row = 0
            loss.backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.clip_grad)
                         if cfg.optim.clip_grad > 0 else torch.zeros(()))
            optimizer.step()
            ema_update(teacher, student, s["momentum"])
            if info.device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            record = {"step": step, **{k: float(v.detach()) for k, v in out.items()},
                      "grad_norm": float(grad_norm), **s, "tiles_per_s": tiles / (t2 - t0),
                      "data_s": t1 - t0, "compute_s": t2 - t1}
            metrics.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tiles_s=f"{record['tiles_per_s']:.1f}")
            if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == total_steps:
                checkpoint(step + 1)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    return run_dir
