"""The TracIn and influence sections: settings and timings, the self-influence histogram with
its top samples, and the top proponents / opponents of a few queries."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import numpy as np

from . import _charts as charts
from ._common import Context, figure_name
from ._files import ResultDir, Table, read_csv, read_json
from ._html import Info, Raw, esc, fmt, kv_table, note, sample_cell, table
from ._metrics import auroc

__all__ = ["build"]

_FIRST = ("method", "mode", "layers", "damping", "damping_used", "projection_dim", "checkpoints")
_TIMING_WORDS = ("time", "seconds", "_s")


def _settings(kind: str, cfg: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(settings in display order, timings) from config.json."""
    timings: Dict[str, Any] = {}
    for k, v in cfg.items():
        if k in ("timings", "timing") and isinstance(v, dict):
            timings.update(v)
        elif any(w in k for w in _TIMING_WORDS[:2]) or k.endswith(_TIMING_WORDS[2]):
            timings[k] = v
    main = {k: cfg[k] for k in _FIRST if k in cfg and cfg[k] is not None}
    if kind == "tracin" and "method" not in main:
        main = {"method": "TracIn", **main}
    rest = {k: v for k, v in cfg.items() if k not in main and k not in timings}
    return {**main, **rest}, timings


def build(rd: ResultDir, ctx: Context) -> Tuple[str, List[str]]:
    notes: List[str] = []
    out: List[str] = []
    cfg = read_json(os.path.join(rd.path, "config.json"), notes)
    if not isinstance(cfg, dict):
        notes.append("No config.json: the method, layers and damping of this run are unknown.")
        cfg = {}
    settings, timings = _settings(rd.kind, cfg)
    if settings:
        top = {k: settings[k] for k in list(settings)[:4]}
        out.append(
            '<p class="meta">'
            + " · ".join(f"{esc(k)} <code>{esc(fmt(v))}</code>" for k, v in top.items())
            + "</p>"
        )
    if timings:
        out.append("<h3>Timings</h3>" + kv_table(timings))
    elif cfg:
        notes.append(
            Info("config.json records no timings (written by a version that did not time).")
        )
    si = read_csv(os.path.join(rd.path, "self_influence.csv"), notes)
    if si is not None and si.numeric("index", "self_influence"):
        si = si.valid_index(notes, "self_influence.csv")
    if si is None or not si.numeric("index", "self_influence") or si.n_rows == 0:
        what = "has no numeric index / self_influence column" if si is not None else "is missing"
        notes.append(
            f"self_influence.csv {what}: no self-influence chart (the run ended before the "
            "analysis, or the files come from an older version)."
        )
    else:
        out.append(_self_influence(rd, si, ctx, notes))
    tk = read_csv(os.path.join(rd.path, "top_k.csv"), notes)
    need = ("query", "rank", "proponent", "proponent_score", "opponent", "opponent_score")
    if tk is None:
        notes.append("No top_k.csv: the run had no queries= (or top_k=0), so no proponents.")
    elif not tk.numeric(*need) or tk.n_rows == 0:
        notes.append(f"top_k.csv is empty or lacks numeric columns {', '.join(need)}.")
    else:
        out.append(_queries(tk, si if si is not None and si.numeric("index") else None, ctx))
    if settings:
        out.append("<details><summary>Settings (config.json)</summary>" + kv_table(settings))
        out.append("</details>")
    return "".join(out), notes


def _labels(si: Table) -> Dict[int, Any]:
    if not si.numeric("label"):
        return {}
    return {int(i): int(v) for i, v in zip(si.get("index"), si.get("label")) if np.isfinite(v)}


def _self_influence(rd: ResultDir, si: Table, ctx: Context, notes: List[str]) -> str:
    idx = si.get("index").astype(np.int64)
    val = si.get("self_influence")
    labels = _labels(si)
    ok = np.isfinite(val)
    if (~ok).any():
        notes.append(f"{int((~ok).sum())} samples have no finite self-influence.")
    order = idx[ok][np.argsort(-val[ok], kind="stable")]
    by_index = dict(zip(idx.tolist(), val.tolist()))
    top = order[: ctx.top_n]
    name = "TracIn" if rd.kind == "tracin" else "influence"
    fig = charts.histogram(
        val[ok],
        np.array([by_index[int(i)] for i in top]),
        f"{name} self-influence",
        "self-influence",
    )
    cap = f"Self-influence of {int(ok.sum())} training samples (red: the top {len(top)})."
    out = [
        '<h3>Self-influence</h3><div class="pair"><div>',
        ctx.page.figure(fig, figure_name(rd, "self_influence"), cap),
    ]
    if ctx.truth is not None:
        y = np.array([ctx.truth.get(int(i), False) for i in idx[ok]])
        a = auroc(val[ok], y)
        if np.isfinite(a):
            out.append(
                f'<p class="meta">AUROC of self-influence against the truth flags '
                f"({esc(ctx.truth_src)}): <b>{a:.3f}</b></p>"
            )
    header = ["rank", "index", "label", "self-influence"]
    header += ["flagged (monitor)"] if ctx.flagged else []
    header += ["truth"] if ctx.truth is not None else []
    header += ["sample"] if ctx.samples else []
    rows = []
    for r, i in enumerate(top.tolist()):
        row: List[Any] = [r + 1, i, labels.get(i, ctx.samples.labels.get(i)), by_index[i]]
        row += [fmt(i in ctx.flagged)] if ctx.flagged else []
        row += [fmt(ctx.truth.get(i))] if ctx.truth is not None else []
        row += [sample_cell(ctx.samples, i)] if ctx.samples else []
        rows.append(row)
    out.append(f"</div><div><b>Top {len(top)} self-influence samples</b>")
    out.append(table(header, rows, "top") + "</div></div>")
    return "".join(out)


def _queries(tk: Table, si: Any, ctx: Context) -> str:
    labels = _labels(si) if si is not None else {}
    q_all = sorted({int(q) for q in tk.get("query") if np.isfinite(q)})
    shown = q_all[: ctx.n_queries]
    out = [f"<h3>Proponents and opponents of {len(shown)} of {len(q_all)} queries</h3>"]
    out.append('<div class="queries">')
    for q in shown:
        sel = np.flatnonzero(tk.get("query") == q)
        sel = sel[np.argsort(tk.get("rank")[sel], kind="stable")]
        qs = sample_cell(ctx.queries, q)
        qlab = ctx.queries.labels.get(q)
        head = f"Query {q}" + (f" (label {esc(fmt(qlab))})" if qlab is not None else "")
        out.append(f'<div class="query"><p><b>{head}</b> {qs}</p>')
        header = ["rank", "proponent", "label", "score", "opponent", "label", "score"]
        rows = []
        for j in sel[: ctx.query_rows]:
            p, o = _int(tk.get("proponent")[j]), _int(tk.get("opponent")[j])
            rank = _int(tk.get("rank")[j])
            row: List[Any] = [None if rank is None else rank + 1]
            row += [_with_sample(ctx, p), labels.get(p, ctx.samples.labels.get(p))]
            row += [tk.get("proponent_score")[j]]
            row += [_with_sample(ctx, o), labels.get(o, ctx.samples.labels.get(o))]
            row += [tk.get("opponent_score")[j]]
            rows.append(row)
        out.append(table(header, rows, "query") + "</div>")
    out.append("</div>")
    if len(q_all) > len(shown):
        out.append(note(f"{len(q_all) - len(shown)} more queries are in top_k.csv.", "info"))
    return "".join(out)


def _with_sample(ctx: Context, index: Any) -> Raw:
    """A sample's index with its thumbnail or text beside it (when recorded)."""
    return Raw(f"{esc(fmt(index))} {sample_cell(ctx.samples, index, max_text=60)}")


def _int(v: float) -> Any:
    return int(v) if np.isfinite(v) else None
