"""``eval.every``: the teacher's kNN accuracy and RankMe on a small labelled set during training.

The tiles are read once at the start (a class-balanced subset of ``eval.max_tiles``), resized to
the global crop size and normalised as training normalises. Every rank embeds an equal share
through the teacher's own forward (FSDP gathers as in training: every rank must take part), the
cls tokens are gathered, and each rank computes the same numbers: kNN (k = ``eval.k``, cosine)
from ``eval.train`` to ``eval.val``, or leave-one-out on ``eval.train`` alone, and the RankMe of
the ``eval.train`` embeddings (a collapse alarm: it falls towards 1 as the features collapse).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from .datasets import open_labelled
from .features import fit_tile, normalise
from .probe import classification_metrics, knn_predict, rankme

log = logging.getLogger("virchow_fast.eval")

BATCH = 32


def _load(ds, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    imgs, labels, bad = [], [], 0
    for i in range(len(ds)):
        try:
            imgs.append(fit_tile(ds.image(i), size))
            labels.append(int(ds.labels[i]))
        except Exception:  # noqa: BLE001 (counted and reported once)
            bad += 1
    return np.stack(imgs), np.array(labels, np.int64), bad


class TrainingEval:
    def __init__(self, cfg, info):
        ev = cfg.eval
        self.every, self.k, self.info = ev.every, ev.k, info
        self.mean, self.std = cfg.data.crops.mean, cfg.data.crops.std
        size = cfg.data.crops.global_size
        train = open_labelled(ev.train).balanced_subset(ev.max_tiles, cfg.train.seed)
        self.n_classes = len(train.classes)
        self.train = _load(train, size)
        self.val = _load(open_labelled(ev.val, train.classes).balanced_subset(ev.max_tiles, cfg.train.seed),
                         size) if ev.val else None
        if info.is_main:
            bad = self.train[2] + (self.val[2] if self.val else 0)
            log.info("%s", f"eval: every {ev.every} steps on {len(self.train[1])} tiles of {ev.train}"
                     + (f" -> {len(self.val[1])} of {ev.val}" if self.val else " (leave-one-out kNN)")
                     + (f"; {bad} unreadable tiles skipped" if bad else ""))

    @classmethod
    def maybe(cls, cfg, info) -> "TrainingEval | None":
        return cls(cfg, info) if cfg.eval.every > 0 else None

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0

    @torch.no_grad()
    def _embed(self, teacher, images: np.ndarray) -> np.ndarray:
        """cls tokens [N, C] of all images, each rank embedding an equal (padded) share."""
        n, world, rank = len(images), self.info.world_size, self.info.rank
        per = math.ceil(n / world)
        rows = np.minimum(np.arange(rank * per, (rank + 1) * per), n - 1)  # padding repeats the last tile
        device = self.info.device
        out = []
        for start in range(0, per, BATCH):
            x = normalise(images[rows[start:start + BATCH]], self.mean, self.std, device)
            out.append(teacher(x)["cls_tokens"].float())
        local = torch.cat(out)
        if world > 1:
            import torch.distributed as dist

            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local)
            local = torch.cat(parts)
        return local[:n].cpu().numpy()

    def __call__(self, teacher, step: int) -> dict:
        was_training = teacher.training
        teacher.eval()
        train_x = self._embed(teacher, self.train[0])
        train_y = self.train[1]
        if self.val is not None:
            pred, _ = knn_predict(train_x, train_y, self._embed(teacher, self.val[0]), self.n_classes, self.k)
            truth = self.val[1]
        else:
            pred, _ = knn_predict(train_x, train_y, None, self.n_classes, self.k, leave_one_out=True)
            truth = train_y
        m = classification_metrics(truth, pred)
        out = {"eval_knn_acc": m["accuracy"], "eval_knn_balanced_acc": m["balanced_accuracy"],
               "eval_rankme": rankme(train_x)}
        teacher.train(was_training)
        if self.info.is_main:
            log.info("eval step %d: kNN accuracy %.4f (balanced %.4f), RankMe %.1f", step + 1,
                     out["eval_knn_acc"], out["eval_knn_balanced_acc"], out["eval_rankme"])
        return out
