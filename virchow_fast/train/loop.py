"""The training loop: build, (resume), step, log, checkpoint. Same code on one CPU or many GPUs.

Per step (train/step.py: ``train_step``) every rank runs forward and backward (always: the FSDP
collectives must match), then one small all-reduce carries the loss terms (logged as the mean over
ranks), the gradient norm (global already) and the stop request, read on the host once: the step's
only wait for the device. From them every rank takes the same decisions:
- a non-finite loss or gradient norm skips the step (no optimizer step, no EMA, the loss centers
  restored), is counted and logged; ``train.max_nonfinite_steps`` in a row stop the run with
  :class:`NonFiniteLossError`;
- a SIGTERM / SIGUSR1 on any rank ends the run: the step in progress is discarded (no update; RNG,
  loss centers and data position as before it) and a checkpoint of that step is written (clean
  exit). Discarding rather than finishing it lets a rank that was signalled before fetching its
  batch skip the fetch (a group-wide signal may have killed the data-loader workers) and run the
  step's collectives on its previous batch, whose result nobody uses.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path

import torch

from .. import ops
from ..config import Config, derive, save_resolved
from ..data import build_loader, check_sources
from ..downstream.monitor import TrainingEval
from ..downstream.pretrained import HEADS
from ..logs import ensure_logging
from ..model.ssl import SSLNetwork
from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .distributed import StopRequest, init_distributed, shutdown_distributed
from .errors import NonFiniteLossError, NonFiniteWeightsError
from .keeper import CheckpointKeeper
from .metrics import MetricsWriter, Throughput, peak_memory_gib
from .networks import build_networks
from .optim import build_optimizer
from .parallelize import resolve_activation_checkpointing, use_fsdp
from .resume import checkpoint_files, resume_run
from .rundir import prepare_run_dir
from .schedules import build_schedules
from .staging import BatchStager
from .step import TERMS, SSLLoss, Trainee, clip_grad_norm, train_step  # noqa: F401  (public here too)

log = logging.getLogger("virchow_fast.train")

__all__ = ["run", "NonFiniteLossError", "MetricsWriter"]


def _progress(total: int, initial: int, enabled: bool):
    """A tqdm bar on a terminal; None elsewhere (batch logs get a line every train.log_every steps)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def run(cfg: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Train per ``cfg``; returns the run directory (also after a SIGINT / SIGTERM / SIGUSR1 stop).

    An output_dir that holds an earlier run needs ``resume`` or ``overwrite`` (see train/rundir.py).
    Progress goes to the ``virchow_fast`` logger (a stderr handler is installed if it has none).
    """
    ensure_logging()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    info = init_distributed(cfg)
    stop = StopRequest().install()  # before the loader forks workers: they inherit it and survive a group signal
    clean = False
    try:
        out = _run(cfg, resume, info, stop, overwrite)
        clean = True
        return out
    finally:
        stop.close()
        # after an error only this rank may be here: no barrier, let the launcher tear the rest down
        shutdown_distributed(barrier=clean)


def build(cfg: Config, info, parallel=None) -> tuple[SSLNetwork, SSLNetwork, torch.optim.Optimizer, SSLLoss]:
    """Student, teacher (parallelized per ``cfg.parallel``), optimizer and losses on ``info.device``.

    parallel: ``cfg.parallel`` already resolved (resolve_activation_checkpointing), else resolved here.

    See train/networks.py for how the networks are built (whole, or sharded from the meta device);
    the seed gives the same weights either way. Also used by benchmarks/bench_step.py.
    """
    ops.configure(cfg.ops)
    if info.is_main:
        log.info("ops on %s: %s", info.device.type,
                 ", ".join(f"{op}={backend}" for op, backend in ops.plan(info.device).items()))
    # whole on one process; under FSDP built on the meta device and initialised shard by shard
    student, teacher = build_networks(cfg, info, parallel or resolve_activation_checkpointing(cfg, info))
    optimizer = build_optimizer(student, cfg.model.depth, cfg.optim, info.device.type)
    optimizer.bind(student, teacher, HEADS)  # its update also moves the teacher and writes the compute copies
    loss_fn = SSLLoss(cfg.loss, cfg.heads.dino_prototypes,
                      cfg.heads.ibot_prototypes if cfg.heads.separate_ibot_head else cfg.heads.dino_prototypes)
    return student, teacher, optimizer, loss_fn.to(info.device)


def _run(cfg: Config, resume: bool, info, stop: StopRequest, overwrite: bool = False) -> Path:
    if info.world_size > 1 and not use_fsdp(cfg.parallel, info):
        raise ValueError(f"parallel.fsdp=off with {info.world_size} processes would train unsynchronised "
                         "replicas; use fsdp: auto or on")
    check_sources(cfg.data)
    derived = derive(cfg, info.world_size)
    run_dir = Path(cfg.train.output_dir)
    prepare_run_dir(run_dir, resume, overwrite, info.is_main)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, derived, run_dir / "resolved_config.yaml")
    parallel = resolve_activation_checkpointing(cfg, info)  # once: the HFU below counts the policy auto picked
    student, teacher, optimizer, loss_fn = build(cfg, info, parallel)
    params = [p for p in student.parameters() if p.requires_grad]
    losses_dict = {"dino": loss_fn.dino, "ibot": loss_fn.ibot}
    total_steps = derived.total_steps
    sched = build_schedules(cfg, derived.peak_lr, total_steps)

    torch.manual_seed(cfg.train.seed + 1000 * (info.rank + 1))  # per-rank stream (drop path); a resume restores it
    start_step, data_state = 0, None
    resumed = resume_run(run_dir, cfg, derived, student, teacher, optimizer, losses_dict, info.is_main) \
        if resume else None  # the newest intact checkpoint, if its settings allow (train/resume.py)
    if resumed is not None:
        start_step, data_state, sched = resumed.step, resumed.data, resumed.schedules

    loader = build_loader(cfg.data, cfg.model.patch_size, info.rank, info.world_size, cfg.train.seed,
                          start_step=start_step, run_dir=str(run_dir))
    if data_state is not None:
        loader.load_state_dict(data_state)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", start_step, info.is_main)
    monitor = TrainingEval.maybe(cfg, info)  # eval.every: kNN accuracy and RankMe of the teacher
    bar = _progress(total_steps, start_step, info.is_main)
    throughput = Throughput(cfg, info.world_size, info.device, parallel)

    keeper = CheckpointKeeper(run_dir, cfg.train.keep_checkpoints, info.is_main)  # prunes once a step confirms

    def checkpoint(step: int, data_state: dict) -> None:
        path = save_checkpoint(run_dir, step, student, teacher, optimizer, losses_dict, data_state,
                               cfg.train.keep_checkpoints, extras=checkpoint_files(cfg, derived, sched), prune=False)
        keeper.saved(path)
        if info.is_main:
            log.info("checkpoint written: %s", path)

    bad_in_a_row = bad_total = 0
    batch = None
    trainee = Trainee(cfg, info, student, teacher, optimizer, loss_fn, params)
    stager = BatchStager(loader, info.device)  # the next step's batch is copied while this one runs

    def prefetch() -> None:  # a signalled rank fetches nothing more (the workers may be gone)
        if stop.pending:
            return
        try:
            stager.prefetch()
        except Exception:
            if not stop.pending:
                raise
            # a group signal arrived during the fetch and took the loader's workers: this step is
            # discarded (the flag is read with its statistics) and nothing was staged

    student.train()
    teacher.eval()
    t_read = time.perf_counter()  # steps are timed from one statistics read to the next
    above_bar = contextlib.ExitStack()
    if bar is not None:  # log lines are written above the bar instead of through it
        from tqdm.contrib.logging import logging_redirect_tqdm

        above_bar.enter_context(logging_redirect_tqdm([logging.getLogger("virchow_fast")]))
    try:
        for step in range(start_step, total_steps):
            before = {"data": stager.state_dict(), "rng": rng_state()}  # for a discarded step
            if not (stop.pending and batch is not None):  # else: this step will be discarded anyway
                batch = stager.next()
            t1 = time.perf_counter()
            stager.prefetch_s = 0.0
            res = train_step(trainee, batch, step, sched, lambda: stop.pending,
                             prefetch if step + 1 < total_steps else None, sync=cfg.train.sync_timing)
            terms, grad_norm, finite, s = res.terms, res.grad_norm, res.finite, res.schedule
            if res.stop:  # the step was discarded: save the state from before it, leave
                set_rng_state(before["rng"])
                checkpoint(step, before["data"])
                if info.is_main:
                    log.info("stopped on a signal during step %d (discarded): checkpoint step_%08d saved; "
                             "continue with --resume", step, step)
                break
            if finite:
                bad_in_a_row = 0
                keeper.confirm()
            else:
                bad_in_a_row += 1
                bad_total += 1
                log.warning("step %d: non-finite loss %s / grad norm %s, step skipped (%d in a row, %d in all)",
                            step, terms["loss"], grad_norm, bad_in_a_row, bad_total)
            t2 = time.perf_counter()
            # without sync_timing the device runs behind the host: the step's time is the time between
            # two statistics reads (each waits for everything queued before it)
            step_s, t_read = t2 - t_read, t2
            record = {"step": step, **terms, "grad_norm": grad_norm, **s, **throughput(step_s),
                      "data_s": stager.fetch_s, "compute_s": t2 - t1 - stager.prefetch_s,
                      "peak_mem_gib": peak_memory_gib(info.device),
                      "skipped": not finite, "nonfinite_total": bad_total}
            if getattr(loader, "skips", None) is not None:  # skipped data so far (this rank's, cumulative)
                record.update({f"data_{k}": v for k, v in loader.skips.as_dict().items()})
            if monitor is not None and monitor.due(step):
                record.update(monitor(teacher, step))
                t_read = time.perf_counter()  # the evaluation is not the next step's time
            metrics.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{terms['loss']:.4f}", tiles_s=f"{record['tiles_per_s']:.1f}")
            elif info.is_main and (step % cfg.train.log_every == 0 or step + 1 == total_steps):
                log.info("step %d/%d loss %.4f (dino %.4f ibot %.4f reg %.4f) lr %.3g tiles/s %.1f",
                         step + 1, total_steps, terms["loss"], terms["dino"], terms["ibot"], terms["reg"],
                         s["lr"], record["tiles_per_s"])
            if bad_in_a_row >= cfg.train.max_nonfinite_steps:
                raise NonFiniteLossError(f"{bad_in_a_row} non-finite losses in a row up to step {step} "
                                         f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); "
                                         "lower the lr or check the data" + keeper.diverged())
            if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == total_steps:
                checkpoint(step + 1, stager.state_dict())
                t_read = time.perf_counter()  # the save is not the next step's time
        if bad_in_a_row:  # the last steps were all skipped: what was saved since the last finite one is suspect
            said = keeper.diverged()
            if info.is_main:
                log.warning("the run ended in %d non-finite steps%s", bad_in_a_row, said)
        keeper.confirm()
    except NonFiniteWeightsError as exc:
        raise NonFiniteWeightsError(str(exc) + keeper.diverged()) from None
    finally:
        if bar is not None:
            bar.close()
        above_bar.close()
        metrics.close()
        summary = loader.skips.summary() if getattr(loader, "skips", None) is not None else ""
        if summary:
            log.warning("%s", summary + (f" (rank {info.rank})" if info.world_size > 1 else ""))
    return run_dir
