"""Evaluation metrics, kNN and RankMe against hand formulas and scipy."""
import math

import numpy as np
import pytest

from virchow_fast.downstream.probe import auroc, classification_metrics, knn_predict, rankme


def test_metrics_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    # F1 per class: 2TP / (2TP + FP + FN): 0 -> 6/7, 1 -> 2/4, 2 -> 4/5
    assert m["macro_f1"] == pytest.approx((6 / 7 + 2 / 4 + 4 / 5) / 3)
    assert "auroc" not in m


def test_auroc_is_mann_whitney_u():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(y * 0.7, 1.0), 1)  # rounded: ties
    u = mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert auroc(y, s) == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()), rel=1e-12)
    probs = np.stack([1 - s, s], axis=1)
    assert classification_metrics(y, (s > 0.35).astype(int), probs, 2)["auroc"] == pytest.approx(auroc(y, s))


def test_knn_weighted_vote_by_hand():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    y = np.array([0, 0, 1, 1])
    pred, probs = knn_predict(train, y, np.array([[1.0, 0.2]]), 2, k=3)
    sims = [(train[i] @ [1.0, 0.2]) / np.linalg.norm(train[i]) / np.linalg.norm([1.0, 0.2]) for i in range(4)]
    top = np.argsort(sims)[::-1][:3]
    w = {c: sum(math.exp(sims[i] / 0.07) for i in top if y[i] == c) for c in (0, 1)}
    assert pred[0] == 0 and probs[0, 1] == pytest.approx(w[1] / (w[0] + w[1]), rel=1e-5)
    loo, _ = knn_predict(train, y, None, 2, k=1, leave_one_out=True)  # nearest other tile
    assert loo.tolist() == [0, 0, 1, 1]


def test_rankme_counts_directions():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(64, 8)))
    assert rankme(q[:, :4] * 3.0) == pytest.approx(4.0, rel=1e-5)  # 4 equal singular values
    assert rankme(np.outer(rng.normal(size=50), rng.normal(size=16))) == pytest.approx(1.0, abs=1e-4)
    s = np.array([3.0, 1.0])
    p = s / s.sum()
    assert rankme(q[:, :2] * s) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)
