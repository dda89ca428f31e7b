"""``--resume``: the newest intact checkpoint, and what may change since it was written.

A checkpoint that fails its manifest (a truncated, empty, missing or altered file) is renamed to
``checkpoints/damaged-step_XXXXXXXX`` (kept, never deleted, and never pruned or picked again) with
one line naming it, and the one before it is tried.

Each checkpoint carries the resolved config it was trained with (``config.yaml``) and the
schedules the run was following (``schedules.npz``). Resuming compares them with the config now:
- may not change (refused in one line naming the keys): ``model.*`` and ``heads.*`` (the shapes of
  the weights and of the optimizer state; ``model.drop_path`` and ``model.init_from`` excepted)
  and the optimizer-group settings the checkpoint restores (``optim.layer_decay``,
  ``optim.patch_embed_lr_mult``, ``optim.betas``, ``optim.eps``);
- the run's length (``train.epochs``, ``train.steps_per_epoch``): the schedules keep their values
  up to the resume step and their remaining part is stretched (or squeezed) over the new number of
  remaining steps, so nothing jumps;
- a schedule setting (``optim.base_lr``, the global batch through the sqrt-scaled peak lr,
  warmups, ``min_lr``, weight decay, teacher momentum and temperature ...): from the resume step
  the schedules it shapes follow the new config (on the run's stretched timeline);
- anything else takes effect from the resume step.
Every change is said in one line at resume.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: not caught by Exception

from ..config import Config, Derived, to_dict
from .checkpoint import list_checkpoints, load_checkpoint
from .distributed import from_main
from .errors import RunError
from .integrity import verify
from .schedules import Schedules, build_schedules

log = logging.getLogger("virchow_fast.train")

CONFIG, SCHEDULES = "config.yaml", "schedules.npz"
_FIXED_SECTIONS = ("model.", "heads.")
_FREE_IN_FIXED = {"model.drop_path", "model.init_from"}
_FIXED_KEYS = {"optim.layer_decay", "optim.patch_embed_lr_mult", "optim.betas", "optim.eps"}
_LENGTH_KEYS = ("train.epochs", "train.steps_per_epoch")


@dataclass
class Resumed:
    path: Path
    step: int
    data: dict | None  # this rank's data position (None: taken from the step)
    schedules: Schedules


def checkpoint_files(cfg: Config, derived: Derived, sched: Schedules) -> dict:
    """The files the loop adds to each checkpoint (``save_checkpoint(extras=...)``)."""
    def write_config(path: Path) -> None:
        path.write_text(yaml.safe_dump({"config": to_dict(cfg), "derived": to_dict(derived)}, sort_keys=False))

    def write_schedules(path: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, **{f.name: getattr(sched, f.name) for f in dataclasses.fields(sched)})
        path.write_bytes(buf.getvalue())

    return {CONFIG: write_config, SCHEDULES: write_schedules}


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def find_intact(run_dir: str | os.PathLike, is_main: bool) -> Path | None:
    """The newest checkpoint that passes its manifest (every rank gets the same); damaged ones set aside."""
    candidates = from_main([str(p) for p in list_checkpoints(run_dir)] if is_main else None)
    damaged = []
    for path in map(Path, reversed(candidates)):
        problem, has_manifest = verify(path)
        if problem is None:
            if not has_manifest and is_main:
                log.warning("%s has no manifest (written before checkpoints had checksums): loaded unverified", path)
            return path
        aside = path.with_name(f"damaged-{path.name}")
        if is_main:
            os.replace(path, aside)
            log.warning("checkpoint %s is damaged (%s): kept as %s, trying the one before it",
                        path, problem, aside.name)
        from_main(None)  # the others wait for the rename
        damaged.append(path.name)
    if damaged:
        raise RunError(f"--resume: no intact checkpoint in {Path(run_dir) / 'checkpoints'} (damaged: "
                       f"{', '.join(damaged)}); start a new run with --overwrite")
    return None


def _with_values(cfg: Config, flat: dict) -> Config:
    """``cfg`` with the values of ``flat`` (dotted keys) where today's config has those keys."""
    out = copy.deepcopy(cfg)
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = getattr(node, part, None)
        if node is not None and dataclasses.is_dataclass(node) and hasattr(node, leaf):
            setattr(node, leaf, value)
    return out


def _refuse_fixed(changed: dict, path: Path) -> None:
    fixed = sorted(k for k in changed if (k.startswith(_FIXED_SECTIONS) and k not in _FREE_IN_FIXED)
                   or k in _FIXED_KEYS)
    if fixed:
        said = ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in fixed)
        raise RunError(f"--resume from {path}: {said}: cannot change on resume (the checkpoint's weights and "
                       "optimizer state have the old shapes and groups); put them back, or start a new run with "
                       "--overwrite or another train.output_dir")


def _stretch(values: np.ndarray, start: int, total: int) -> np.ndarray:
    """``values`` (one per step of the old length) kept up to ``start``, its rest spread over ``start..total``."""
    last = len(values) - 1
    steps = np.arange(total)
    if start >= last or total - 1 <= start:
        src = np.minimum(steps, last) if start >= last else np.full(total, start)
    else:
        src = start + np.rint((steps - start) * (last - start) / (total - 1 - start)).astype(int)
    src = np.where(steps < start, np.minimum(steps, last), np.clip(src, 0, last))
    return values[src]


def plan_schedules(cfg: Config, derived: Derived, saved: dict, saved_arrays: dict | None, step: int,
                   path: Path) -> tuple[Schedules, list[str]]:
    """The schedules from ``step`` on and the lines that say what changed (see the module docstring)."""
    old_flat, new_flat = _flatten(saved["config"]), _flatten(to_dict(cfg))
    changed = {k: (old_flat[k], new_flat[k]) for k in old_flat.keys() & new_flat.keys() if old_flat[k] != new_flat[k]}
    _refuse_fixed(changed, path)
    old_total, new_total = int(saved["derived"]["total_steps"]), int(derived.total_steps)
    if new_total < step:
        raise RunError(f"--resume from {path}: the run is at step {step}, train.epochs x train.steps_per_epoch = "
                       f"{new_total} ends before it")
    old_cfg = _with_values(cfg, old_flat)
    timeline = _with_values(cfg, {k: old_flat[k] for k in _LENGTH_KEYS if k in old_flat})
    old_def = build_schedules(old_cfg, float(saved["derived"]["peak_lr"]), old_total)
    new_def = build_schedules(timeline, float(derived.peak_lr), old_total)
    names = [f.name for f in dataclasses.fields(Schedules)]
    arrays, moved = {}, []
    for name in names:
        base = saved_arrays[name] if saved_arrays is not None and name in saved_arrays else getattr(old_def, name)
        same = np.array_equal(getattr(old_def, name), getattr(new_def, name))
        arrays[name] = _stretch(base if same else getattr(new_def, name), step, new_total) \
            if new_total != old_total else (base if same else getattr(new_def, name))
        was, now = float(base[min(step, old_total - 1)]), float(arrays[name][min(step, new_total - 1)])
        if not np.isclose(was, now, rtol=1e-9, atol=0.0):
            moved.append(f"{name} {was:.3g} -> {now:.3g}")
    notes = []
    if new_total != old_total:
        notes.append(f"resume: {old_total} -> {new_total} steps ({', '.join(k for k in _LENGTH_KEYS if k in changed)}):"
                     f" the schedules keep their values up to step {step} and their remaining steps "
                     f"{min(step, old_total)}-{old_total} are spread over steps {step}-{new_total} (no jump)")
    if saved["derived"].get("global_batch") != derived.global_batch:
        notes.append(f"resume: global batch {saved['derived'].get('global_batch')} -> {derived.global_batch}: "
                     f"peak lr {float(saved['derived']['peak_lr']):.3g} -> {float(derived.peak_lr):.3g} "
                     "(optim.base_lr x sqrt(global batch / 1024))")
    if moved:
        notes.append(f"resume: at step {step} the schedules follow the new settings: {', '.join(moved)}")
    other = sorted(k for k in changed if k not in _LENGTH_KEYS)
    if other:
        notes.append(f"resume: changed since {path.name}, in effect from step {step}: "
                     + ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in other))
    return Schedules(**arrays), notes


def resume_run(run_dir: str | os.PathLike, cfg: Config, derived: Derived, student, teacher, optimizer, losses: dict,
               is_main: bool) -> Resumed | None:
    """Load the newest intact checkpoint of ``run_dir`` if its settings allow (every rank); None without one."""
    path = find_intact(run_dir, is_main)
    if path is None:
        if is_main:
            log.warning("--resume: no complete checkpoint in %s, starting from step 0", run_dir)
        return None
    saved = yaml.safe_load((path / CONFIG).read_text()) if (path / CONFIG).is_file() else None
    arrays = None
    if (path / SCHEDULES).is_file():
        with np.load(path / SCHEDULES) as z:
            arrays = {k: z[k] for k in z.files}
    step = int(path.name.split("_")[-1])
    if saved is not None:
        sched, notes = plan_schedules(cfg, derived, saved, arrays, step, path)
    else:
        sched, notes = build_schedules(cfg, derived.peak_lr, derived.total_steps), []
        if is_main:
            log.warning("%s has no saved config: the settings were not compared", path)
    try:
        loaded = load_checkpoint(path, student, teacher, optimizer, losses)
    except (Exception, CheckpointException) as exc:  # any failure to load, in one line naming the checkpoint
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        # DCP wraps each rank's error with its traceback: its last line is the error itself
        said = lines[-1] if lines[0].startswith("CheckpointException") else f"{type(exc).__name__}: {lines[0]}"
        raise RunError(f"--resume: cannot load {path} into this model ({said[:300]})") from exc
    if is_main:
        for line in notes:
            log.info("%s", line)
        log.info("resumed from %s at step %d", path, loaded["step"])
    return Resumed(path, loaded["step"], loaded["data"], sched)
