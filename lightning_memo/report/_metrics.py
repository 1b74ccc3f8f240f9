"""Ranking metrics of a detection score against known flags (numpy only): AUROC from average
ranks (the Mann-Whitney U statistic), the ROC curve, and the false-positive rate at a fixed TPR."""

from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["auroc", "roc_curve", "fpr_at_tpr"]


def _clean(scores: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Scores and bool labels as flat arrays, rows with a NaN score dropped."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    ok = ~np.isnan(s)
    return s[ok], y[ok]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x: (n,)``, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1], True])
    avg = (starts[:-1] + starts[1:] + 1) / 2.0  # mean of the 1-based ranks start+1 .. end
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, np.diff(starts))
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores: (n,)`` (higher = more likely flagged) for
    ``labels: (n,)`` (truthy = positive), ties counted one half; NaN scores are dropped.

    Returns NaN when one of the two classes is empty. Equal to
    ``sklearn.metrics.roc_auc_score(labels, scores)``.
    """
    s, y = _clean(scores, labels)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the threshold rule ``score >= t`` over every distinct score, from
    ``(0, 0)`` to ``(1, 1)``; NaN scores dropped. Empty arrays when a class is empty."""
    s, y = _clean(scores, labels)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last row of each run of equal scores
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def fpr_at_tpr(scores: np.ndarray, labels: np.ndarray, tpr: float = 0.75) -> float:
    """The smallest false-positive rate of a threshold that finds at least ``tpr`` of the
    positives (NaN when a class is empty)."""
    fpr_c, tpr_c = roc_curve(scores, labels)
    if len(fpr_c) == 0:
        return float("nan")
    hit = np.flatnonzero(tpr_c >= tpr - 1e-12)
    return float(fpr_c[hit[0]])
