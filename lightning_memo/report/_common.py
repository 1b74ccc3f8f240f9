"""What every section builder shares: the build context and small helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

import numpy as np

from ._files import ResultDir, Samples
from ._html import Page

__all__ = ["Context", "evenly", "figure_name", "last_finite"]


@dataclass
class Context:
    """The state of one report build, shared by the sections.

    Attributes:
        page: collects the figures.
        all_samples: the training samples recorded in any result folder of the run.
        samples: those the current section shows: its own folder's first, then the others.
        queries: the query samples recorded in the current section's folder.
        truth: index -> flag (e.g. the flipped labels), or ``None``.
        truth_src: where ``truth`` came from (shown in the page).
        flagged: samples flagged by a MemorizationMonitor of the run (filled by its section, read
            by the attribution sections to cross-reference).
    """

    page: Page
    all_samples: Samples = field(default_factory=Samples)
    samples: Samples = field(default_factory=Samples)
    queries: Samples = field(default_factory=Samples)
    truth: Optional[Dict[int, bool]] = None
    truth_src: str = ""
    flagged: Set[int] = field(default_factory=set)
    max_rows: int = 100
    n_queries: int = 3
    top_n: int = 10
    query_rows: int = 5


def last_finite(m: np.ndarray) -> np.ndarray:
    """The last finite value of each row of ``m: (N, E)`` (NaN when none)."""
    out = np.full(m.shape[0], np.nan)
    for j in range(m.shape[1]):
        col = m[:, j]
        ok = np.isfinite(col)
        out[ok] = col[ok]
    return out


def evenly(items: List[int], k: int) -> List[int]:
    """At most ``k`` of ``items``, evenly spaced, first and last included."""
    if len(items) <= k:
        return list(items)
    pos = np.unique(np.round(np.linspace(0, len(items) - 1, k)).astype(int))
    return [items[i] for i in pos]


def figure_name(rd: ResultDir, chart: str) -> str:
    """``<kind>_<chart>``, with the folder's name in between when it is not the callback's
    (an instance subfolder or an ``output_dir=``): ``memorization_layers=net.1_psmi``."""
    base = rd.rel.rstrip("/").split("/")[-1]
    return f"{rd.kind}_{chart}" if base in (rd.kind, ".") else f"{rd.kind}_{base}_{chart}"
