"""``lightning-memo report``: one self-contained HTML page of what a run's callbacks found.

:func:`report` searches a folder for the result folders of
:class:`~lightning_memo.MemorizationMonitor`, :class:`~lightning_memo.TracIn`,
:class:`~lightning_memo.InfluenceAnalysis` and :class:`~lightning_memo.ConceptErasure` and writes
``report.html`` (charts inlined as PNG data URIs, no JavaScript, no network) with the figures as
PNG files in ``report_files/`` beside it. A missing, partial or older file never stops the page: the
section says in a visible note what it could not show and why.
"""

from __future__ import annotations

import datetime
import os
import traceback
from typing import Callable, Dict, List, Optional, Tuple

from ..io import atomic_write_text
from . import _attribution, _erasure, _memorization
from ._charts import require_matplotlib
from ._common import Context
from ._files import KINDS, ResultDir, find_results, find_truth, load_samples, load_truth
from ._html import Info, Page, esc, note, page_html
from ._metrics import auroc, fpr_at_tpr, roc_curve

__all__ = ["report", "find_results", "load_truth", "auroc", "roc_curve", "fpr_at_tpr"]

TITLES = {
    "memorization": "Memorization (PSMI)",
    "tracin": "TracIn",
    "influence": "Influence",
    "erasure": "Concept erasure",
}
_BUILDERS: Dict[str, Callable[[ResultDir, Context], Tuple[str, List[str]]]] = {
    "memorization": _memorization.build,
    "tracin": _attribution.build,
    "influence": _attribution.build,
    "erasure": _erasure.build,
}


def report(run_dir: str, out: Optional[str] = None, truth: Optional[str] = None) -> str:
    """Write the HTML report of the run in ``run_dir``; returns the path of the HTML file.

    Args:
        run_dir: a run folder (``<log_dir>``, its ``lightning_memo/`` folder, one callback's folder
            or any folder above them): searched recursively for result folders.
        out: the HTML file (default ``<run_dir>/report.html``); the figures go to
            ``<out without .html>_files/`` (``report_files/`` by default).
        truth: a CSV ``index,flag`` (e.g. the flipped labels) to score the detectors against;
            default: a ``truth.csv`` recorded in the run, if any.

    Raises:
        ImportError: matplotlib is missing (``pip install lightning_memo[report]``).
        FileNotFoundError: ``run_dir`` or ``truth`` does not exist.
        ValueError: ``truth`` is not an ``index,flag`` CSV.
    """
    require_matplotlib()
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"report: {run_dir!r} is not a folder (give a run folder).")
    root = os.path.abspath(run_dir)
    out = os.path.abspath(out or os.path.join(root, "report.html"))
    files_dir = os.path.splitext(out)[0] + "_files"
    results, notes = find_results(root)
    ctx = Context(Page())
    folders = [r.path for r in results] + [root]
    ctx.all_samples = load_samples(folders, "samples", [])  # damage is noted per section
    if truth is not None:
        ctx.truth, ctx.truth_src = load_truth(truth), os.path.basename(truth)
    else:
        found = find_truth(root, results)
        if found is not None:
            try:
                ctx.truth = load_truth(found)
                ctx.truth_src = os.path.relpath(found, root)
            except ValueError as err:
                notes.append(f"The recorded truth.csv was not used: {err}")
    sections = [_section(rd, ctx, k) for k, rd in enumerate(results)]
    header = _header(root, results, ctx, notes, files_dir)
    atomic_write_text(out, page_html(f"lightning_memo report: {root}", header, "".join(sections)))
    ctx.page.write_files(files_dir)
    return out


def _section(rd: ResultDir, ctx: Context, k: int) -> str:
    notes: List[str] = []
    if not rd.by_content:
        notes.append(
            f"The folder {rd.rel}/ holds no result files of the {TITLES[rd.kind]} callback yet "
            "(the run stopped before it wrote any)."
        )
    try:
        ctx.samples = load_samples([rd.path], "samples", notes).merged(ctx.all_samples)
        ctx.queries = load_samples([rd.path], "queries", notes)
        body, more = _BUILDERS[rd.kind](rd, ctx)
        notes += more
    except Exception as err:  # a damaged file must not cost the rest of the page
        body = (
            "<details><summary>Traceback</summary><pre>"
            + esc(traceback.format_exc(limit=6))
            + "</pre></details>"
        )
        notes.append(
            f"This section could not be built ({type(err).__name__}: {err}); the other sections "
            "are unaffected."
        )
    where = "the run folder" if rd.rel == "." else f"{rd.rel}/"
    return (
        f'<section class="{rd.kind}" id="{rd.kind}-{k}">\n<h2>{esc(TITLES[rd.kind])}</h2>\n'
        f'<p class="meta">Files: <code>{esc(where)}</code></p>\n'
        + "".join(note(n, "info" if isinstance(n, Info) else "warn") for n in notes)
        + body
        + "\n</section>\n"
    )


def _header(
    root: str, results: List[ResultDir], ctx: Context, notes: List[str], files_dir: str
) -> str:
    from .. import __version__

    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    toc = " ".join(
        f'<a href="#{r.kind}-{k}">{esc(TITLES[r.kind])}'
        + (f" ({esc(r.rel)})" if r.rel != "." else "")
        + "</a>"
        for k, r in enumerate(results)
    )
    missing = [TITLES[k] for k in KINDS if not any(r.kind == k for r in results)]
    notes = list(notes)  # what could not be read: warnings
    info: List[str] = []
    if not results:
        notes.append(
            "No result folder of a lightning_memo callback was found in this folder or below it "
            "(no epoch_<E>.csv, self_influence.csv, history.json or config.json of a callback). "
            "Point the report at the run's log folder (e.g. lightning_logs/version_0)."
        )
    elif missing:
        info.append(f"Not in this run: {', '.join(missing)} (no result folder found).")
    if results and not ctx.all_samples:
        info.append(
            "No samples were recorded (samples.json / samples.npz): the tables show sample "
            "indices only."
        )
    truth = (
        f" · truth flags: <code>{esc(ctx.truth_src)}</code>"
        if ctx.truth is not None
        else " · no truth flags (pass --truth FILE to score the detectors)"
    )
    return (
        "<header>\n<h1>lightning_memo report</h1>\n"
        f'<p class="meta">Run: <code>{esc(root)}</code> · {esc(when)} · lightning_memo '
        f"{esc(__version__)}{truth} · figures also in "
        f"<code>{esc(os.path.basename(files_dir))}/</code></p>\n"
        + (f'<nav class="toc">{toc}</nav>\n' if toc else "")
        + "".join(note(n) for n in notes)
        + "".join(note(n, "info") for n in info)
        + "</header>\n"
    )
