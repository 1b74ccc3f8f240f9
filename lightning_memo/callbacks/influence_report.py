"""Files and TensorBoard output of :class:`~lightning_memo.callbacks.influence.InfluenceAnalysis`
(global rank 0 only; every file written atomically)."""

from __future__ import annotations

import os
from typing import Any, List, Optional

import numpy as np
import torch

from ..influence.tracin import top_k as top_k_of
from ..io import (
    atomic_write_csv,
    atomic_write_json,
    tensorboard_writer,
)
from ..viz import dataset_grid

__all__ = ["write_report", "proponent_images"]


def write_report(analysis: Any, trainer: Any, config: dict, train: Any, queries: Any) -> None:
    """self_influence.csv, top_k.csv, config.json; TensorBoard histogram, image grid or table."""
    out = analysis.out_dir
    os.makedirs(out, exist_ok=True)
    si = analysis.self_influence.numpy()
    norm = analysis.hinv_norm.numpy()
    labels = analysis.labels.numpy()
    order = np.argsort(-si, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    atomic_write_csv(
        os.path.join(out, "self_influence.csv"),
        ["index", "label", "self_influence", "hinv_norm", "rank"],
        [[i, int(labels[i]), float(si[i]), float(norm[i]), int(rank[i])] for i in range(len(si))],
    )
    rows = []
    if analysis.scores is not None and analysis.top_k:
        for q in range(analysis.scores.shape[0]):
            row = analysis.scores[q]
            pro, opp = top_k_of(row, analysis.top_k)
            for r, (p, o) in enumerate(zip(pro.tolist(), opp.tolist())):
                rows.append([q, r, p, float(row[p]), o, float(row[o])])
        atomic_write_csv(
            os.path.join(out, "top_k.csv"),
            ["query", "rank", "proponent", "proponent_score", "opponent", "opponent_score"],
            rows,
        )
    est = analysis.estimator
    atomic_write_json(
        os.path.join(out, "config.json"),
        {
            **config,
            "damping_used": est.damping_used(),
            "num_query": None if analysis.scores is None else int(analysis.scores.shape[0]),
            "reused": dict(analysis.reused),
        },
    )
    writer = tensorboard_writer(trainer)
    if writer is None:
        return
    step = trainer.global_step
    writer.add_histogram(f"influence/{analysis.method}/self_influence", si, step)
    if analysis.scores is None:
        return
    grid = proponent_images(analysis, train, queries)
    if grid is not None:
        writer.add_image(f"influence/{analysis.method}/proponents_opponents", grid, step)
    else:
        writer.add_text(f"influence/{analysis.method}/top_k", _table(rows, analysis.n_show), step)


def _table(rows: List[list], n_show: int) -> str:
    lines = ["| query | rank | proponent | score | opponent | score |", "|---|---|---|---|---|---|"]
    for q, r, p, ps, o, os_ in rows:
        if q < n_show:
            lines.append(f"| {q} | {r} | {p} | {ps:.3g} | {o} | {os_:.3g} |")
    return "\n".join(lines)


def proponent_images(analysis: Any, train: Any, queries: Any, k: int = 5) -> Optional[torch.Tensor]:
    """(3, H, W) grid: per shown query, the query then its k proponents and k opponents (caption:
    label); ``None`` when the inputs are not images."""
    ds = train.dataset
    qds = getattr(queries, "dataset", None)
    if qds is None:
        return None
    n_show = min(analysis.n_show, analysis.scores.shape[0], len(qds))
    items, captions = [], []
    for q in range(n_show):
        pro, opp = top_k_of(analysis.scores[q], k)
        items += [qds[q]] + [ds[int(i)] for i in pro] + [ds[int(i)] for i in opp]
    try:
        captions = [str(int(torch.as_tensor(analysis._get_label(it)))) for it in items]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return dataset_grid(items, analysis._get_input, captions, analysis.image_shape, 1 + 2 * k)
