"""The erasure section: linear-probe score of the concept before / after erasure per layer and
epoch against the majority rate, and the edit norm (chart and table)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

from . import _charts as charts
from ._common import Context, figure_name
from ._files import ResultDir, read_json
from ._html import esc, fmt, kv_table, table

__all__ = ["build"]


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def build(rd: ResultDir, ctx: Context) -> Tuple[str, List[str]]:
    notes: List[str] = []
    out: List[str] = []
    cfg = read_json(os.path.join(rd.path, "config.json"), notes)
    if not isinstance(cfg, dict):
        notes.append("No config.json: the erased layers and method are unknown.")
        cfg = {}
    if cfg:
        keys = ("method", "layers", "when", "pooling")
        out.append(
            '<p class="meta">'
            + " · ".join(f"{k} <code>{esc(fmt(cfg[k]))}</code>" for k in keys if k in cfg)
            + "</p>"
        )
    hist = read_json(os.path.join(rd.path, "history.json"), notes)
    records = [h for h in hist if isinstance(h, dict)] if isinstance(hist, list) else []
    if not records:
        notes.append(
            "No history.json (or it is empty): the erasers were never fitted (the run stopped "
            "before the fitting epoch), so there is no probe result."
        )
    rows: List[Dict[str, Any]] = []
    no_probe = set()
    for rec in records:
        layers = rec.get("layers") if isinstance(rec.get("layers"), dict) else {}
        for name, info in layers.items():
            if not isinstance(info, dict):
                continue
            r2 = "probe_r2_before" in info and "probe_acc_before" not in info
            b = "probe_r2_before" if r2 else "probe_acc_before"
            a = "probe_r2_after" if r2 else "probe_acc_after"
            if b not in info:
                no_probe.add(name)
            rows.append(
                {
                    "epoch": rec.get("epoch"),
                    "layer": name,
                    "label": f"{name} @ {rec.get('epoch')}",
                    "kind": "R²" if r2 else "accuracy",
                    "before": _num(info.get(b)),
                    "after": _num(info.get(a)),
                    "majority": _num(info.get("majority_rate")),
                    "edit": _num(info.get("edit_norm")),
                    "rank": info.get("rank"),
                    "n_rows": info.get("n_rows"),
                }
            )
    if no_probe:
        notes.append(
            f"Layer(s) {', '.join(sorted(no_probe))} have no probe score (probe=False, or no "
            "probe rows were kept): their bars are empty."
        )
    for kind in ("accuracy", "R²"):
        part = [r for r in rows if r["kind"] == kind]
        if not part:
            continue
        fig = charts.erasure_bars(part, kind)
        cap = (
            "A linear probe predicts the concept from the layer's features before and after "
            "erasure; after should fall to the majority rate (chance)."
            if kind == "accuracy"
            else "R² of a linear probe of the (continuous) concept; after should be near 0."
        )
        out.append(f"<h3>Probe {kind}</h3>")
        out.append(ctx.page.figure(fig, figure_name(rd, "probe_" + kind[:3]), cap))
    if rows:
        header = ["epoch", "layer", "probe before", "probe after", "majority rate"]
        header += ["edit norm", "eraser rank", "rows fitted"]
        body = [
            [r["epoch"], r["layer"], r["before"], r["after"], r["majority"], r["edit"]]
            + [r["rank"], r["n_rows"]]
            for r in rows
        ]
        out.append(table(header, body, "erasure"))
    if os.path.isfile(os.path.join(rd.path, "erasers.pt")):
        size = os.path.getsize(os.path.join(rd.path, "erasers.pt"))
        out.append(
            f'<p class="meta">Fitted erasers: <code>erasers.pt</code> ({size / 1024:.1f} KiB); '
            "load them with <code>torch.load</code>.</p>"
        )
    if cfg:
        out.append("<details><summary>Settings (config.json)</summary>" + kv_table(cfg))
        out.append("</details>")
    return "".join(out), notes
