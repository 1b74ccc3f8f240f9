"""Result writers shared by the callbacks: the samples a report shows beside their scores
(``samples.json`` / ``samples.npz``) and the truth flags it scores the detectors against
(``truth.csv``). Global rank 0 calls them; every file is written atomically."""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..influence.tracin import top_k as top_k_of
from ..io import atomic_write_bytes, atomic_write_csv, atomic_write_json, tensorboard_writer
from ..viz import as_image, dataset_grid

__all__ = [
    "write_samples",
    "write_truth",
    "write_influence_results",
    "proponent_images",
    "maybe_write_report",
    "MAX_TEXT",
]

MAX_TEXT = 1000  # characters of a sample's text kept in samples.json
_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError)


def _label(item: Any, get_label: Optional[Callable[[Any], Any]]) -> Any:
    if get_label is None:
        return None
    try:
        lab = get_label(item)
    except _ERRORS:
        return None
    if isinstance(lab, (str, int, float)):
        return lab
    try:
        t = torch.as_tensor(lab)
    except _ERRORS + (RuntimeError,):
        return str(lab)
    if t.numel() != 1:
        return None
    v = t.item()
    return int(v) if isinstance(v, bool) or float(v).is_integer() else float(v)


def _thumbnail(image: torch.Tensor, max_side: int) -> np.ndarray:
    """A ``(C, H, W)`` image in [0, 1] as ``(H', W', C)`` uint8, longest side at most
    ``max_side`` (area-averaged)."""
    c, h, w = image.shape
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        image = F.interpolate(image[None], size=size, mode="area")[0]
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _short(x: Any, max_values: int = 12) -> Optional[str]:
    """A numeric input as a short text (``[0.12, -1.3, ...] (64 values)``), else ``None``."""
    try:
        t = torch.as_tensor(x)
    except _ERRORS + (RuntimeError,):
        return None
    if t.numel() == 0 or not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
        return None
    flat = t.detach().flatten()[:max_values].tolist()
    body = ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in flat)
    more = f", … ({t.numel()} values)" if t.numel() > max_values else ""
    return f"[{body}{more}]"


def write_samples(
    out_dir: str,
    items: Mapping[int, Any],
    get_input: Optional[Callable[[Any], Any]],
    get_label: Optional[Callable[[Any], Any]],
    describe: Optional[Callable[[Any], str]] = None,
    image_shape: Optional[Sequence[int]] = None,
    *,
    name: str = "samples",
    max_side: int = 32,
    merge: bool = True,
) -> List[str]:
    """Record samples for the report: ``<name>.json`` (index -> ``{"label", "text"}``) and, when
    the inputs are images, ``<name>.npz`` (index -> ``(H, W, C)`` uint8 thumbnail, C in {1, 3}).

    The text of a sample is ``describe(item)``, else the item's ``"text"`` field (a dict item),
    else, for a non-image input, its first values (``[0.12, -1.3, …] (64 values)``).

    Args:
        out_dir: the callback's result folder.
        items: sample index -> dataset item (e.g. ``{i: dataset[i] for i in flagged}``).
        get_input: item -> input (the callback's input accessor); ``None``: no picture.
        get_label: item -> label (the callback's label accessor); ``None``: no label.
        describe: item -> text shown for the sample (e.g. decoded tokens).
        image_shape: reshape flat inputs to this image shape (e.g. ``(8, 8)``).
        name: file stem; ``"queries"`` for the query samples of TracIn / influence (their index is
            the position in the query set).
        max_side: longest side of a thumbnail in pixels.
        merge: keep the samples already recorded in ``out_dir`` (new ones replace old ones).

    Returns:
        The paths written.
    """
    meta: Dict[str, Dict[str, Any]] = {}
    images: Dict[str, np.ndarray] = {}
    for index, item in items.items():
        entry: Dict[str, Any] = {"label": _label(item, get_label), "text": None}
        x = None
        if get_input is not None:
            try:
                x = get_input(item)
                im = as_image(torch.as_tensor(x), image_shape)
            except _ERRORS + (RuntimeError,):
                im = None
            if im is not None:
                images[str(int(index))] = _thumbnail(im, max_side)
        if describe is not None:
            entry["text"] = str(describe(item))
        elif isinstance(item, Mapping) and "text" in item:
            entry["text"] = str(item["text"])
        elif str(int(index)) not in images and x is not None:
            entry["text"] = _short(x)
        if entry["text"] is not None and len(entry["text"]) > MAX_TEXT:
            entry["text"] = entry["text"][: MAX_TEXT - 1] + "…"
        meta[str(int(index))] = entry
    json_path = os.path.join(out_dir, f"{name}.json")
    npz_path = os.path.join(out_dir, f"{name}.npz")
    if merge:
        meta = {**_read_json(json_path), **meta}
        images = {**_read_npz(npz_path), **images}
    atomic_write_json(json_path, dict(sorted(meta.items(), key=lambda kv: int(kv[0]))))
    written = [json_path]
    if images:
        buf = io.BytesIO()
        np.savez_compressed(buf, **images)
        atomic_write_bytes(npz_path, buf.getvalue())
        written.append(npz_path)
    return written


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}
    return old if isinstance(old, dict) else {}


def _read_npz(path: str) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return {}


def write_truth(
    out_dir: str,
    flags: Union[Mapping[int, Any], Sequence[Any], np.ndarray, torch.Tensor],
    filename: str = "truth.csv",
) -> str:
    """Record known flags (e.g. which labels were flipped) as ``truth.csv`` (``index,flag``);
    the report then scores PSMI, loss, margin and self-influence against them.

    Args:
        out_dir: a folder of the run (the run folder or a result folder).
        flags: index -> flag, or a ``(N,)`` bool array / tensor (position = index).
        filename: the file name.

    Returns:
        The path written.
    """
    if isinstance(flags, Mapping):
        pairs = sorted((int(i), bool(f)) for i, f in flags.items())
    else:
        arr = torch.as_tensor(flags).flatten().tolist()
        pairs = [(i, bool(f)) for i, f in enumerate(arr) if not _isnan(f)]
    path = os.path.join(out_dir, filename)
    atomic_write_csv(path, ["index", "flag"], [(i, int(f)) for i, f in pairs])
    return path


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


# ---------------------------------------------------------------------- InfluenceAnalysis
def write_influence_results(
    analysis: Any, trainer: Any, config: dict, train: Any, queries: Any
) -> None:
    """InfluenceAnalysis's files (rank 0): self_influence.csv, top_k.csv, config.json, the samples
    the report shows (top self-influence, the first queries' proponents / opponents, the queries);
    TensorBoard histogram, image grid or table."""
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
    _record_influence_samples(analysis, order, train, queries)
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


def _record_influence_samples(analysis: Any, order: np.ndarray, train: Any, queries: Any) -> None:
    """The training samples the report shows (top 10 self-influence, proponents and opponents of
    the first 3 queries) and those queries, in samples.json / queries.json."""
    ds = getattr(train, "dataset", None)
    if ds is None:
        return
    keep = [int(i) for i in order[:10]]
    qds = getattr(queries, "dataset", None)
    n_q = 0 if analysis.scores is None or qds is None else min(3, analysis.scores.shape[0])
    for q in range(n_q):
        pro, opp = top_k_of(analysis.scores[q], min(5, analysis.top_k or 5))
        keep += [int(i) for i in pro] + [int(i) for i in opp]
    get_in, get_lab = analysis._get_input, analysis._get_label
    write_samples(analysis.out_dir, {i: ds[i] for i in dict.fromkeys(keep)}, get_in, get_lab,
                  image_shape=analysis.image_shape, merge=False)  # fmt: skip
    if n_q:
        write_samples(analysis.out_dir, {q: qds[q] for q in range(n_q)}, get_in, get_lab,
                      image_shape=analysis.image_shape, name="queries", merge=False)  # fmt: skip


def maybe_write_report(callback: Any, trainer: Any) -> Optional[str]:
    """With ``report=True`` on a callback: write / update ``report.html`` of the run on global
    rank 0 at fit end (the run folder is the parent of ``lightning_memo/``, else the callback's
    own folder). Several callbacks with ``report=True`` each rebuild it; the last one's page has
    everything. A missing matplotlib is a warning, not a failed fit."""
    if not getattr(callback, "write_report", False) or not trainer.is_global_zero:
        return None
    out = getattr(callback, "out_dir", None)
    if not out:
        return None
    parts = os.path.abspath(out).split(os.sep)
    run_dir = (
        os.sep.join(parts[: parts.index("lightning_memo")]) if "lightning_memo" in parts else out
    )
    from ..report import report  # lazily: the report imports matplotlib

    try:
        return report(run_dir or os.sep)
    except ImportError as err:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"{type(callback).__name__}(report=True): no HTML report: {err}")
        return None
