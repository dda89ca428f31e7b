"""Frozen-feature evaluation: metrics, kNN (cosine), eva's linear probe, RankMe.

- Metrics (scikit-learn's definitions, computed here in numpy): accuracy; balanced accuracy, the
  mean recall over the classes present in y_true; macro F1 over the classes present in y_true or
  y_pred; AUROC for two classes, from the class-1 score by the rank-sum formula (ties averaged).
- kNN: the k most cosine-similar training tiles vote with weight exp(similarity / 0.07) (DINO's
  weighted kNN); leave-one-out when querying the training set itself.
- Linear probe, eva's protocol: one ``nn.Linear`` on the frozen features, cross-entropy, AdamW at
  3e-4 (torch's default weight decay, 0.01), batches of 256, at most 12,500 steps, validation every
  epoch, early stopping when the validation balanced accuracy has not improved for
  max(7 epochs, 1,250 steps) (eva waits 7 epochs on its large sets, 400 on its small BACH set:
  one rule for both), the best weights kept; repeated over several seeds, reported as mean and sd.
- RankMe: exp of the entropy of the normalised singular values of the embeddings, an effective
  rank (Garrido et al., 2023); it falls towards 1 as the features collapse.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

KNN_TEMPERATURE = 0.07
PATIENCE_STEPS = 1250


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Binary AUROC: P(score of a positive > score of a negative), ties counting one half."""
    from scipy.stats import rankdata

    y = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray | None = None,
                           n_classes: int | None = None) -> dict:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = np.unique(y_true)
    recalls = [np.mean(y_pred[y_true == c] == c) for c in present]
    f1s = []
    for c in np.union1d(present, np.unique(y_pred)):
        tp = np.sum((y_pred == c) & (y_true == c))
        denom = np.sum(y_pred == c) + np.sum(y_true == c)
        f1s.append(2 * tp / denom if denom else 0.0)
    out = {"balanced_accuracy": float(np.mean(recalls)), "accuracy": float(np.mean(y_true == y_pred)),
           "macro_f1": float(np.mean(f1s))}
    if (n_classes or (probs.shape[1] if probs is not None else 0)) == 2 and probs is not None:
        out["auroc"] = auroc(y_true == 1, probs[:, 1])
    return out


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray | None, n_classes: int,
                k: int = 20, leave_one_out: bool = False, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(predictions [M], class scores [M, n_classes]); ``query_x`` None with leave_one_out = the train set."""
    tx = F.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=-1)
    qx = tx if query_x is None else F.normalize(torch.as_tensor(query_x, dtype=torch.float32), dim=-1)
    ty = torch.as_tensor(train_y, dtype=torch.int64)
    k = min(k, tx.shape[0] - (1 if leave_one_out else 0))
    scores = []
    for start in range(0, qx.shape[0], chunk):
        sim = qx[start:start + chunk] @ tx.t()
        if leave_one_out:
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + start] = -math.inf
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], n_classes).scatter_add_(1, ty[idx], (top / KNN_TEMPERATURE).exp())
        scores.append(votes / votes.sum(dim=1, keepdim=True))
    probs = torch.cat(scores).numpy()
    return probs.argmax(axis=1), probs


def rankme(z: np.ndarray | torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of embeddings z [N, D]: exp(-sum p log p), p = singular values / their sum."""
    s = torch.linalg.svdvals(torch.as_tensor(z, dtype=torch.float64))
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def _predict(head: torch.nn.Linear, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        probs = torch.softmax(head(x), dim=1).cpu().numpy()
    return probs.argmax(axis=1), probs


def linear_probe(train: tuple, val: tuple, test: tuple | None, n_classes: int, seed: int = 0, lr: float = 3e-4,
                 batch_size: int = 256, max_steps: int = 12500, patience: int = 0, val_every: int = 0,
                 device: str = "cpu") -> dict:
    """One seed of eva's probe; returns metrics on test (val when there is no test) and the stop step."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xs = {n: torch.as_tensor(s[0], dtype=torch.float32, device=device) for n, s in
          (("train", train), ("val", val), ("test", test)) if s is not None}
    ytr = torch.as_tensor(train[1], dtype=torch.int64, device=device)
    head = torch.nn.Linear(xs["train"].shape[1], n_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    n = len(ytr)
    per_epoch = max(1, math.ceil(n / batch_size))
    every = val_every or per_epoch
    patience = patience or max(7, math.ceil(PATIENCE_STEPS / every))  # in validations
    best, best_state, best_step, waited, step = -1.0, None, 0, 0, 0
    order, pos = torch.randperm(n, generator=g), 0
    while step < max_steps:
        if pos >= n:
            order, pos = torch.randperm(n, generator=g), 0
        rows = order[pos:pos + batch_size].to(device)
        pos += batch_size
        loss = F.cross_entropy(head(xs["train"][rows]), ytr[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % every == 0 or step == max_steps:
            score = classification_metrics(val[1], _predict(head, xs["val"])[0])["balanced_accuracy"]
            if score > best:
                best, best_step, waited = score, step, 0
                best_state = {k: v.clone() for k, v in head.state_dict().items()}
            else:
                waited += 1
                if waited >= patience:
                    break
    head.load_state_dict(best_state)
    name = "test" if test is not None else "val"
    pred, probs = _predict(head, xs[name])
    out = classification_metrics((test or val)[1], pred, probs, n_classes)
    return {**out, "best_step": best_step, "stopped_step": step, "val_balanced_accuracy": best}
