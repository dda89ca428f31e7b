"""``eval``: a frozen backbone on labelled tile sets, by kNN and by eva's linear probe.

Embeddings of train / val / test are computed once; the kNN classifies val (and test) from train;
the probe trains on train, stops early on val and reports test (val when no test is given), mean
and sd over seeds. The table is printed and everything is written as JSON.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..logs import ensure_logging
from .datasets import open_labelled
from .features import embed_set
from .probe import classification_metrics, knn_predict, linear_probe, rankme
from .weights import load_model

logger = logging.getLogger("virchow_fast.eval")

METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "auroc")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _summary(runs: list[dict]) -> dict:
    out = {}
    for key in METRICS:
        vals = [r[key] for r in runs if key in r]
        if vals:
            out[key] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
    return out


def format_table(result: dict) -> str:
    cols = [m for m in METRICS if any(m in r for r in result["results"].values())]
    head = f"{'method':<26}" + "".join(f"{c:>20}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in result["results"].items():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else (f"{v['mean']:.4f} +- {v['sd']:.4f}" if isinstance(v, dict)
                                               else f"{v:.4f}"))
        lines.append(f"{name:<26}" + "".join(f"{x:>20}" for x in cells))
    return "\n".join(lines)


def evaluate(model_path: str, train: str, val: str, test: str | None = None, out: str | None = None,
             seeds: int = 5, k: int = 20, mode: str = "cls+mean", batch_size: int = 64, device: str = "auto",
             max_steps: int = 12500, patience: int = 0, val_every: int = 0, step: int | None = None,
             progress: bool = True, log=None) -> dict:
    ensure_logging()
    log = log or logger.warning  # its lines are about unreadable tiles
    dev = _device(device)
    model, w = load_model(model_path, step, device=str(dev))
    size = w.model.img_size
    sets = {"train": open_labelled(train)}
    classes = sets["train"].classes
    sets["val"] = open_labelled(val, classes)
    if test:
        sets["test"] = open_labelled(test, classes)
    feats, skipped = {}, {}
    t0 = time.perf_counter()
    for name, ds in sets.items():
        x, y, bad = embed_set(model, ds, size, w.mean, w.std, mode, batch_size, dev, progress, desc=f"embed {name}")
        if bad:
            log(f"eval: skipped {len(bad)} unreadable tiles in {ds.source} (first: {bad[0]})")
        if len(y) == 0:
            raise FileNotFoundError(f"{ds.source}: no readable tiles")
        feats[name], skipped[name] = (x, y), len(bad)
    embed_s = time.perf_counter() - t0
    n_classes = len(classes)
    target = "test" if test else "val"
    results = {}
    pred, probs = knn_predict(feats["train"][0], feats["train"][1], feats[target][0], n_classes, k)
    results[f"knn (k={k}, cosine)"] = classification_metrics(feats[target][1], pred, probs, n_classes)
    runs = [linear_probe(feats["train"], feats["val"], feats.get("test"), n_classes, seed=s, max_steps=max_steps,
                         patience=patience, val_every=val_every, device=str(dev)) for s in range(seeds)]
    results[f"linear probe ({seeds} seeds)"] = _summary(runs)
    result = {
        "model": str(model_path), "weights": w.source, "embedding": mode,
        "embedding_dim": int(feats["train"][0].shape[1]),
        "classes": classes, "reported_on": target,
        "tiles": {n: int(len(f[1])) for n, f in feats.items()}, "skipped_tiles": skipped,
        "rankme_train": rankme(feats["train"][0]), "embed_seconds": embed_s,
        "results": results, "probe_runs": runs,
    }
    if out:
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, p)
    return result
