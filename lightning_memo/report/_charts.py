"""The report's charts (matplotlib, Agg, no pyplot state): each function returns a ``Figure``."""

from __future__ import annotations

import io
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["require_matplotlib", "to_png"]

INSTALL = "pip install lightning_memo[report]"
_DPI = 80


def require_matplotlib() -> None:
    """Fail with the install command when matplotlib (the report's one extra) is missing."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"The lightning_memo report draws its charts with matplotlib, which is not installed "
            f"({err}). Install it with `{INSTALL}` (or `pip install matplotlib`)."
        ) from err


def new(width: float, height: float, ncols: int = 1, nrows: int = 1) -> Tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def to_png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def psmi_distributions(
    epochs: Sequence[int], values: Dict[str, List[np.ndarray]], threshold: Optional[float]
) -> Any:
    """One panel per layer: a violin (with median) of the PSMI of every scored sample per epoch."""
    fig, axes = new(10.5, 2.6 * len(values), nrows=len(values))
    for ax, (layer, per_epoch) in zip(axes[:, 0], values.items()):
        pos = [i for i, v in enumerate(per_epoch) if len(v) > 1]
        if pos:  # the KDE costs O(samples): 2000 quantiles draw the same shape
            data = [_thin(per_epoch[i]) for i in pos]
            parts = ax.violinplot(data, positions=pos, showmedians=True, widths=0.8)
            for body in parts["bodies"]:
                body.set_alpha(0.45)
        if threshold is not None:
            ax.axhline(threshold, color="#d62728", ls="--", lw=1, label=f"warn_below={threshold}")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
        ax.set_xlim(-0.6, len(epochs) - 0.4)
        ax.set_ylabel("PSMI")
        ax.set_title(f"PSMI per evaluated epoch, layer {layer}", fontsize=10)
    axes[-1, 0].set_xlabel("epoch")
    return fig


def _thin(v: np.ndarray, k: int = 2000) -> np.ndarray:
    """``v`` itself when short, else its ``k`` evenly spaced quantiles (min and max included)."""
    return v if len(v) <= k else np.quantile(v, np.linspace(0, 1, k))


def flag_counts(epochs: Sequence[int], newly: Sequence[float], total: Sequence[float]) -> Any:
    fig, axes = new(6.0, 2.6)
    ax = axes[0, 0]
    x = np.arange(len(epochs))
    ax.bar(x, newly, color="#f0a020", label="newly flagged")
    ax.plot(x, total, "o-", color="#d62728", label="flagged so far")
    ax.set_xticks(x, [str(e) for e in epochs])
    ax.set_xlabel("epoch")
    ax.set_ylabel("samples")
    ax.set_title("Samples flagged per evaluated epoch", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def trajectories(
    epochs: Sequence[int],
    layers: Dict[str, np.ndarray],
    flagged: np.ndarray,
    threshold: Optional[float],
) -> Any:
    """Per layer: median and 10-90 % band over epochs of the flagged samples and of the others.

    Args:
        layers: layer -> PSMI ``(N, E)`` (NaN: not scored).
        flagged: ``(N,)`` bool.
    """
    n = len(layers)
    fig, axes = new(min(5.2 * n, 10.5), 3.0, ncols=n)
    x = np.asarray(epochs)
    for ax, (layer, m) in zip(axes[0], layers.items()):
        for mask, name, col in ((~flagged, "other", "#1f77b4"), (flagged, "flagged", "#d62728")):
            rows = m[mask]
            if rows.shape[0] == 0:
                continue
            with warnings.catch_warnings():  # an epoch where no sample of the group is scored
                warnings.simplefilter("ignore", RuntimeWarning)
                q10, q50, q90 = np.nanquantile(rows, [0.1, 0.5, 0.9], axis=0)
            ax.fill_between(x, q10, q90, color=col, alpha=0.18, lw=0)
            ax.plot(x, q50, "o-", color=col, label=f"{name} (n={rows.shape[0]}): median, 10–90 %")
        if threshold is not None:
            ax.axhline(threshold, color="#777", ls="--", lw=1)
        ax.set_xticks(x)
        ax.set_xlabel("epoch")
        ax.set_ylabel("PSMI")
        ax.set_title(f"PSMI trajectories, layer {layer}", fontsize=10)
        ax.legend(fontsize=7.5, loc="best")
    return fig


def roc_curves(curves: Dict[str, List[Tuple[int, np.ndarray, np.ndarray, float]]]) -> Any:
    """One panel per score: the ROC curve of each shown epoch (label: epoch and AUROC)."""
    n = len(curves)
    fig, axes = new(min(3.6 * n, 10.8), 3.4, ncols=n)
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for ax, (score, per_epoch) in zip(axes[0], curves.items()):
        for j, (epoch, fpr, tpr, auc) in enumerate(per_epoch):
            col = cmap(j / max(1, len(per_epoch) - 1))
            ax.plot(fpr, tpr, color=col, lw=1.4, label=f"epoch {epoch}: {auc:.3f}")
        ax.plot([0, 1], [0, 1], color="#aaa", ls=":", lw=1)
        ax.axhline(0.75, color="#d62728", ls="--", lw=0.8)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_title(f"ROC of {score}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right", title="AUROC", title_fontsize=7)
        ax.set_aspect("equal")
    return fig


def auroc_by_epoch(epochs: Sequence[int], series: Dict[str, Sequence[float]]) -> Any:
    fig, axes = new(6.0, 2.8)
    ax = axes[0, 0]
    for name, vals in series.items():
        ax.plot(epochs, vals, "o-", label=name)
    ax.axhline(0.5, color="#aaa", ls=":", lw=1)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(list(epochs))
    ax.set_xlabel("epoch")
    ax.set_ylabel("AUROC")
    ax.set_title("AUROC against the truth flags, per epoch", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def histogram(values: np.ndarray, top: np.ndarray, title: str, xlabel: str) -> Any:
    """Histogram of ``values`` (log counts) with the ``top`` values marked in red."""
    fig, axes = new(6.0, 2.8)
    ax = axes[0, 0]
    v = values[np.isfinite(values)]
    ax.hist(v, bins=min(60, max(10, int(np.sqrt(len(v))) * 2)), color="#1f77b4", alpha=0.8)
    ax.set_yscale("log")
    for i, t in enumerate(top):
        ax.axvline(t, color="#d62728", lw=0.8, alpha=0.7, label="top samples" if i == 0 else None)
    if len(top):
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples (log)")
    ax.set_title(title, fontsize=10)
    return fig


def erasure_bars(rows: List[Dict[str, Any]], kind: str) -> Any:
    """Probe score before / after erasure per (layer, epoch) against the majority rate (or R²),
    and the mean edit norm.

    Args:
        rows: dicts with ``label``, ``before``, ``after``, ``majority`` (may be NaN), ``edit``.
        kind: ``"accuracy"`` or ``"R²"``.
    """
    fig, axes = new(min(10.5, 7.0 + 1.2 * len(rows)), 3.0, ncols=2)
    ax, ax2 = axes[0]
    x = np.arange(len(rows))
    for a in (ax, ax2):
        a.set_xlim(-0.9, len(rows) - 0.1)
    w = 0.38
    ax.bar(x - w / 2, [r["before"] for r in rows], w, color="#1f77b4", label="before erasure")
    ax.bar(x + w / 2, [r["after"] for r in rows], w, color="#2ca02c", label="after erasure")
    maj = [r["majority"] for r in rows]
    if any(np.isfinite(maj)):
        ax.hlines(maj, x - 0.48, x + 0.48, colors="#d62728", linestyles="--", label="majority rate")
    ax.set_xticks(x, [r["label"] for r in rows], fontsize=8, rotation=20 if len(rows) > 4 else 0)
    vals = [v for r in rows for v in (r["before"], r["after"]) if np.isfinite(v)]
    ax.set_ylim(min([0.0] + vals) * 1.1, 1.3)
    ax.set_ylabel(f"probe {kind}")
    ax.set_title(f"Probe {kind} of the concept", fontsize=10)
    ax.legend(fontsize=7.5, loc="upper center", ncol=3)
    ax2.bar(x, [r["edit"] for r in rows], 0.6, color="#9467bd")
    ax2.set_xticks(x, [r["label"] for r in rows], fontsize=8, rotation=20 if len(rows) > 4 else 0)
    ax2.set_ylabel("mean ‖x − x′‖")
    ax2.set_title("Edit norm", fontsize=10)
    return fig
