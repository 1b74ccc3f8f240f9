"""The memorization section: PSMI distributions, flags, trajectories, flagged samples and, with
truth flags, the ROC / AUROC of -PSMI, loss and -margin per epoch."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import _charts as charts
from ._common import Context, evenly, figure_name, last_finite
from ._files import ResultDir, Table, read_csv, read_json
from ._html import Info, Raw, esc, fmt, kv_table, note, sample_cell, sparkline, table
from ._metrics import auroc, fpr_at_tpr, roc_curve

__all__ = ["build"]

_EPOCH = re.compile(r"epoch_(\d+)\.csv")
_MAX_VIOLIN_EPOCHS = 24
_MAX_ROC_EPOCHS = 6


@dataclass
class Run:
    """The monitor's files as arrays over samples ``(N,)`` and evaluated epochs ``(N, E)``."""

    epochs: List[int]
    n: int
    psmi: Dict[str, np.ndarray]
    loss: Optional[np.ndarray]
    margin: Optional[np.ndarray]
    labels: np.ndarray
    flag_col: Optional[np.ndarray]
    flag_layer: str
    rd: ResultDir
    flagged: Dict[int, int] = field(default_factory=dict)  # index -> first flagged epoch


def _psmi_columns(header: List[str], cfg: Dict[str, Any]) -> Dict[str, str]:
    cols = {h[: -len("/psmi_mean")]: h for h in header if h.endswith("/psmi_mean")}
    if not cols:  # older single-layer files
        for h in ("psmi_mean", "psmi"):
            if h in header:
                cols[str(cfg.get("flag_layer") or "psmi")] = h
                break
    return cols


def _load(rd: ResultDir, cfg: Dict[str, Any], notes: List[str]) -> Optional[Run]:
    files = sorted(
        (int(m.group(1)), f) for f in os.listdir(rd.path) if (m := _EPOCH.fullmatch(f)) is not None
    )
    tables: Dict[int, Table] = {}
    for e, f in files:
        t = read_csv(os.path.join(rd.path, f), notes)
        if t is None:
            continue
        if not t.numeric("index") or not _psmi_columns(t.header, cfg):
            notes.append(f"{f} has no index or PSMI column (header: {', '.join(t.header)}).")
            continue
        t = t.valid_index(notes, f)
        if t.n_rows == 0:
            notes.append(f"{f} has no rows (no sample was scored in epoch {e}).")
            continue
        tables[e] = t
    if not tables:
        return None
    epochs = sorted(tables)
    layers: Dict[str, None] = {}
    for e in epochs:
        layers.update(dict.fromkeys(_psmi_columns(tables[e].header, cfg)))
    idx = {e: tables[e].get("index").astype(np.int64) for e in epochs}
    n = int(max(int(v.max()) for v in idx.values()) + 1)
    E = len(epochs)

    def matrix(col_of) -> Optional[np.ndarray]:
        m = np.full((n, E), np.nan)
        found = False
        for j, e in enumerate(epochs):
            col = col_of(tables[e])
            if col is not None and col.dtype != object:
                m[idx[e], j] = col
                found = True
        return m if found else None

    psmi = {}
    for layer in layers:
        m = matrix(lambda t, la=layer: t.cols.get(_psmi_columns(t.header, cfg).get(la)))
        if m is None:
            notes.append(f"The PSMI column of layer {layer!r} holds no numbers; it is skipped.")
        else:
            psmi[layer] = m
    if not psmi:
        return None
    layers = dict.fromkeys(psmi)
    loss = matrix(lambda t: t.cols.get("loss"))
    margin = matrix(lambda t: t.cols.get("margin"))
    flag_col = matrix(lambda t: t.cols.get("flagged"))
    labels = np.full(n, np.nan)
    for e in epochs:
        lab = tables[e].cols.get("label")
        if lab is not None and lab.dtype != object:
            ok = np.isfinite(lab)
            labels[idx[e][ok]] = lab[ok]
    flag_layer = str(cfg.get("flag_layer") or list(layers)[-1])
    if flag_layer not in psmi:
        notes.append(
            f"config.json names flag layer {flag_layer!r}, which the CSVs do not have; the "
            f"trajectories use {list(layers)[-1]!r}."
        )
        flag_layer = list(layers)[-1]
    missing = [h for h in ("loss", "margin") if not any(tables[e].has(h) for e in epochs)]
    if missing:
        notes.append(
            f"No {' / '.join(missing)} column in the epoch CSVs (the model output is not class "
            "logits, or the files come from an older version): those baselines are not shown."
        )
    return Run(epochs, n, psmi, loss, margin, labels, flag_col, flag_layer, rd)


def _flags(rd: ResultDir, run: Run, notes: List[str]) -> bool:
    """Fill ``run.flagged`` from flagged.csv, else from the CSVs' flagged column."""
    t = read_csv(os.path.join(rd.path, "flagged.csv"), notes)
    if t is not None and t.numeric("index", "epoch_flagged"):
        t = t.valid_index(notes, "flagged.csv")
        labels = t.get("label") if t.numeric("label") else np.full(t.n_rows, np.nan)
        for i, e, lab in zip(t.get("index"), t.get("epoch_flagged"), labels):
            if not np.isfinite(i):
                continue
            run.flagged[int(i)] = int(e) if np.isfinite(e) else -1
            if 0 <= i < run.n and not np.isfinite(run.labels[int(i)]):
                run.labels[int(i)] = lab if isinstance(lab, float) else np.nan
        return True
    if run.flag_col is not None:
        notes.append(
            "flagged.csv is missing or has no epoch_flagged column: the first-flag epochs are "
            "read from the epoch CSVs' flagged column."
        )
        for i in np.flatnonzero(np.nan_to_num(run.flag_col).max(axis=1) > 0):
            j = int(np.flatnonzero(np.nan_to_num(run.flag_col[i]) > 0)[0])
            run.flagged[int(i)] = run.epochs[j]
        return True
    notes.append("No flagged.csv and no flagged column: which samples were flagged is unknown.")
    return False


def _check_epochs(run: Run, cfg: Dict[str, Any], hist: Any, notes: List[str]) -> None:
    expected = set()
    if isinstance(hist, list):
        expected |= {h.get("epoch") for h in hist if isinstance(h, dict)}
    every = cfg.get("every_n_epochs")
    if isinstance(every, int) and every > 0:
        expected |= {e for e in range(max(run.epochs) + 1) if (e + 1) % every == 0}
    lost = sorted(e for e in expected if isinstance(e, int) and e not in run.epochs)
    if lost:
        notes.append(
            f"Evaluated epoch(s) {fmt(lost)} have no readable epoch_<E>.csv (a partial or "
            "interrupted run): the charts show the other epochs only."
        )


def build(rd: ResultDir, ctx: Context) -> Tuple[str, List[str]]:
    notes: List[str] = []
    out: List[str] = []
    cfg = read_json(os.path.join(rd.path, "config.json"), notes)
    if not isinstance(cfg, dict):
        notes.append("No config.json: the monitor's settings (warn_below, patience) are unknown.")
        cfg = {}
    hist = read_json(os.path.join(rd.path, "history.json"), notes)
    run = _load(rd, cfg, notes)
    if run is None:
        notes.append(
            "No readable epoch_<E>.csv: the monitor scored no epoch yet (the run stopped before "
            "the first evaluated epoch, or every_n_epochs is larger than the epochs run)."
        )
        if cfg:
            out.append("<h3>Settings</h3>" + kv_table(cfg))
        return "".join(out), notes
    _check_epochs(run, cfg, hist, notes)
    have_flags = _flags(rd, run, notes)
    for i in run.flagged:
        ctx.flagged.add(i)
    thr = cfg.get("warn_below")
    thr = float(thr) if isinstance(thr, (int, float)) else None
    out.append(
        f'<p class="meta">{run.n} samples · evaluated epochs {esc(fmt(run.epochs))} · layers '
        f"{esc(', '.join(run.psmi))} · flag layer <code>{esc(run.flag_layer)}</code> · "
        f"warn_below={esc(fmt(thr))}, patience={esc(fmt(cfg.get('patience')))} · "
        f"<b>{len(run.flagged)} flagged</b></p>"
    )
    out.append(_distributions(run, thr, ctx, notes))
    out.append('<div class="pair">')
    if have_flags:
        out.append("<div>" + _flag_chart(run, hist, ctx) + "</div>")
    out.append("<div>" + _trajectories(run, thr, ctx, notes) + "</div></div>")
    out.append(_flag_table(run, thr, ctx))
    if ctx.truth is not None:
        out.append(_truth(run, ctx, notes))
    if cfg:
        out.append("<details><summary>Settings (config.json)</summary>" + kv_table(cfg))
        out.append("</details>")
    return "".join(out), notes


def _distributions(run: Run, thr: Optional[float], ctx: Context, notes: List[str]) -> str:
    cols = evenly(list(range(len(run.epochs))), _MAX_VIOLIN_EPOCHS)
    if len(cols) < len(run.epochs):
        notes.append(Info(f"The PSMI distributions show {len(cols)} of {len(run.epochs)} epochs."))
    vals = {layer: [m[:, j][np.isfinite(m[:, j])] for j in cols] for layer, m in run.psmi.items()}
    fig = charts.psmi_distributions([run.epochs[j] for j in cols], vals, thr)
    cap = "Distribution of the per-sample PSMI over the training set (line: median)."
    return "<h3>PSMI per epoch and layer</h3>" + ctx.page.figure(
        fig, figure_name(run.rd, "psmi"), cap
    )


def _flag_chart(run: Run, hist: Any, ctx: Context) -> str:
    by_epoch = (
        {h.get("epoch"): h for h in hist if isinstance(h, dict)} if isinstance(hist, list) else {}
    )
    newly, total = [], []
    for e in run.epochs:
        h = by_epoch.get(e, {})
        if isinstance(h.get("n_flagged"), (int, float)):
            total.append(float(h["n_flagged"]))
            new = h.get("new_flagged")
            newly.append(float(len(new)) if isinstance(new, list) else float("nan"))
        else:
            newly.append(float(sum(1 for v in run.flagged.values() if v == e)))
            total.append(float(sum(1 for v in run.flagged.values() if 0 <= v <= e)))
    fig = charts.flag_counts(run.epochs, newly, total)
    return "<h3>Flagged samples</h3>" + ctx.page.figure(fig, figure_name(run.rd, "flagged"))


def _trajectories(run: Run, thr: Optional[float], ctx: Context, notes: List[str]) -> str:
    mask = np.zeros(run.n, dtype=bool)
    mask[[i for i in run.flagged if 0 <= i < run.n]] = True
    if not mask.any():
        notes.append(
            Info("No sample was flagged: the trajectories show the unflagged samples only.")
        )
    layers = [run.flag_layer] + [la for la in run.psmi if la != run.flag_layer]
    shown = {la: run.psmi[la] for la in layers[:2]}
    fig = charts.trajectories(run.epochs, shown, mask, thr)
    cap = "Median (line) and 10–90 % quantile band of PSMI: flagged samples vs the others."
    return "<h3>Trajectories</h3>" + ctx.page.figure(fig, figure_name(run.rd, "trajectories"), cap)


def _flag_table(run: Run, thr: Optional[float], ctx: Context) -> str:
    m = run.psmi[run.flag_layer]
    last = last_finite(m)
    loss = last_finite(run.loss) if run.loss is not None else np.full(run.n, np.nan)
    margin = last_finite(run.margin) if run.margin is not None else np.full(run.n, np.nan)
    if run.flagged:
        title = "Flagged samples (first flagged first)"
        rows_idx = sorted(
            (i for i in run.flagged if 0 <= i < run.n),
            key=lambda i: (run.flagged[i], np.nan_to_num(last[i], nan=np.inf)),
        )
    else:
        title = "Lowest-PSMI samples at the last epoch (none was flagged)"
        order = np.argsort(np.where(np.isfinite(last), last, np.inf), kind="stable")
        rows_idx = [int(i) for i in order[: ctx.top_n] if np.isfinite(last[i])]
    header = ["index", "label", "flagged at", f"PSMI ({run.flag_layer}) per epoch"]
    header += ["last PSMI", "last loss", "last margin"]
    header += ["truth"] if ctx.truth is not None else []
    header += ["sample"] if ctx.samples else []
    rows = []
    for i in rows_idx[: ctx.max_rows]:
        e = run.flagged.get(i)
        mark = run.epochs.index(e) if e in run.epochs else None
        lab = run.labels[i] if np.isfinite(run.labels[i]) else ctx.samples.labels.get(i)
        r = [i, lab, e if e is None or e >= 0 else "?", Raw(sparkline(m[i], thr, mark))]
        r += [last[i], loss[i], margin[i]]
        r += [fmt(ctx.truth.get(i))] if ctx.truth is not None else []
        r += [sample_cell(ctx.samples, i)] if ctx.samples else []
        rows.append(r)
    more = ""
    if len(rows_idx) > ctx.max_rows:
        more = note(f"The table shows the first {ctx.max_rows} of {len(rows_idx)} samples.", "info")
    return f"<h3>{esc(title)}</h3>" + table(header, rows, "flagged") + more


def _truth(run: Run, ctx: Context, notes: List[str]) -> str:
    idx = np.array(sorted(i for i in ctx.truth if 0 <= i < run.n), dtype=np.int64)
    y = np.array([ctx.truth[int(i)] for i in idx], dtype=bool)
    if len(idx) == 0 or y.all() or not y.any():
        notes.append(
            f"The truth flags ({ctx.truth_src}) have {int(y.sum())} positive and "
            f"{int((~y).sum())} negative samples of this run: ROC / AUROC need both."
        )
        return ""
    scores: Dict[str, np.ndarray] = {f"-PSMI ({la})": -m for la, m in run.psmi.items()}
    if run.loss is not None:
        scores["loss"] = run.loss
    if run.margin is not None:
        scores["-margin"] = -run.margin
    rows, series, curves = [], {k: [] for k in scores}, {k: [] for k in scores}
    show = set(evenly(list(range(len(run.epochs))), _MAX_ROC_EPOCHS))
    for j, e in enumerate(run.epochs):
        row: List[Any] = [e]
        for k, m in scores.items():
            s = m[idx, j]
            a, f = auroc(s, y), fpr_at_tpr(s, y, 0.75)
            row += [a, f]
            series[k].append(a)
            if j in show and np.isfinite(a):
                fpr, tpr = roc_curve(s, y)
                curves[k].append((e, fpr, tpr, a))
        rows.append(row)
    header = ["epoch"] + [f"{k} {w}" for k in scores for w in ("AUROC", "FPR@TPR=0.75")]
    flagged = [i for i in run.flagged if i in ctx.truth]
    hit = sum(1 for i in flagged if ctx.truth[i])
    prec = f"{hit} of the {len(flagged)} flagged samples are true" if flagged else "none flagged"
    out = [
        "<h3>Against the truth flags</h3>",
        f'<p class="meta">{int(y.sum())} true / {len(y)} samples from {esc(ctx.truth_src)}; '
        f"{esc(prec)}; the flags find {hit} of {int(y.sum())} true samples.</p>",
        table(header, rows, "auroc"),
    ]
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        cap = "ROC curves (dashed: TPR = 0.75); higher score = more likely memorized."
        out.append(ctx.page.figure(charts.roc_curves(curves), figure_name(run.rd, "roc"), cap))
    if len(run.epochs) > 1:
        fig = charts.auroc_by_epoch(run.epochs, series)
        out.append(ctx.page.figure(fig, figure_name(run.rd, "auroc")))
    return "".join(out)
