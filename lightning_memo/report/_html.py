"""HTML pieces of the report, standard library only: escaping, tables, notes, inline SVG
sparklines, PNG data URIs. Every string from a file goes through :func:`esc`."""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

__all__ = [
    "Info",
    "Raw",
    "Page",
    "esc",
    "fmt",
    "kv_table",
    "note",
    "png_bytes",
    "sample_cell",
    "sparkline",
    "table",
]


class Raw(str):
    """Markup that :func:`table` inserts as is (already escaped)."""


class Info(str):
    """A section note that is information, not something the page could not show."""


def esc(x: Any) -> str:
    return x if isinstance(x, Raw) else html.escape(str(x), quote=True)


def fmt(v: Any, digits: int = 4) -> str:
    """A number for a table cell: ints as ints, floats with ``digits`` significant digits, NaN
    and ``None`` as an en dash."""
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "–"
        if float(v).is_integer() and abs(v) < 1e6:
            return str(int(v))
        return f"{float(v):.{digits}g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x, digits) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt(x, digits)}" for k, x in v.items()) or "–"
    return str(v)


def note(text: str, level: str = "warn") -> str:
    """A visible note (``level``: ``warn`` for what could not be shown, ``info`` otherwise)."""
    label = "Not shown" if level == "warn" else "Note"
    return f'<p class="note {level}"><b>{label}:</b> {esc(text)}</p>'


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    """A table; cells are escaped unless :class:`Raw`, numbers formatted by :func:`fmt`."""

    def cell(v: Any) -> str:
        if isinstance(v, Raw):
            return v
        if isinstance(v, (int, float, np.integer, np.floating, type(None))):
            return esc(fmt(v))
        return esc(v)

    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>\n" for r in rows)
    return (
        f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>'
        "</table>\n"
    )


def kv_table(items: Dict[str, Any]) -> str:
    """A two-column key/value table (a config)."""
    return table(["setting", "value"], [(k, fmt(v)) for k, v in items.items()], "kv")


def sparkline(
    values: Sequence[float],
    threshold: Optional[float] = None,
    mark: Optional[int] = None,
    width: int = 120,
    height: int = 28,
) -> str:
    """An inline SVG line of ``values`` (NaN: a gap), a dashed line at ``threshold`` and a red dot
    at position ``mark`` (e.g. the epoch a sample was flagged)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return ""
    lo, hi = float(finite.min()), float(finite.max())
    if threshold is not None and math.isfinite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
    span = (hi - lo) or 1.0
    pad = 3
    n = len(v)

    def xy(i: int, y: float) -> str:
        x = pad + (i * (width - 2 * pad) / (n - 1) if n > 1 else (width - 2 * pad) / 2)
        yy = pad + (hi - y) * (height - 2 * pad) / span
        return f"{x:.1f},{yy:.1f}"

    parts = [
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'xmlns="http://www.w3.org/2000/svg" role="img">'
    ]
    if threshold is not None and math.isfinite(threshold):
        y = xy(0, threshold).split(",")[1]
        parts.append(
            f'<line x1="0" x2="{width}" y1="{y}" y2="{y}" stroke="#999" stroke-dasharray="3,2"/>'
        )
    run: List[str] = []
    for i, y in enumerate(v.tolist()):
        if math.isfinite(y):
            run.append(xy(i, y))
        elif run:
            parts.append(_poly(run))
            run = []
    if run:
        parts.append(_poly(run))
    for i, y in enumerate(v.tolist()):
        if math.isfinite(y):
            x, yy = xy(i, y).split(",")
            r, col = (3, "#d62728") if i == mark else (1.6, "#1f77b4")
            parts.append(f'<circle cx="{x}" cy="{yy}" r="{r}" fill="{col}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _poly(points: List[str]) -> str:
    pts = " ".join(points)
    return f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>'


def png_bytes(image: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as PNG bytes (matplotlib's writer)."""
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, np.ascontiguousarray(image), format="png")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def sample_cell(samples: Any, index: Any, max_text: int = 160, size: int = 32) -> Raw:
    """A recorded sample as an inline thumbnail, or its (escaped, shortened) text; empty when the
    sample was not recorded."""
    if samples is None:
        return Raw("")
    im = samples.images.get(index)
    if im is not None:
        h, w = im.shape[:2]
        scale = max(1, size // max(h, w))
        return Raw(
            f'<img class="thumb" width="{w * scale}" height="{h * scale}" '
            f'alt="sample {index}" src="{data_uri(png_bytes(im))}">'
        )
    text = samples.texts.get(index)
    if text:
        short = text if len(text) <= max_text else text[: max_text - 1] + "…"
        return Raw(f'<span class="text" title="{esc(text)}">{esc(short)}</span>')
    return Raw("")


class Page:
    """The figures of one report: each figure is inlined as a data URI and kept to be written
    as ``<files_dir>/<name>.png`` beside the HTML."""

    def __init__(self) -> None:
        self.files: Dict[str, bytes] = {}

    def figure(self, fig: Any, name: str, caption: str = "", alt: str = "") -> str:
        from ._charts import to_png

        png = to_png(fig)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "figure"
        base, k = stem, 2
        while stem in self.files:
            stem, k = f"{base}_{k}", k + 1
        self.files[stem] = png
        cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
        return (
            f'<figure><img class="chart" alt="{esc(alt or caption or stem)}" '
            f'data-file="{esc(stem)}.png" src="{data_uri(png)}">{cap}</figure>\n'
        )

    def write_files(self, folder: str) -> List[str]:
        from ..io import atomic_write_bytes, clear_files

        clear_files(folder, r"[A-Za-z0-9._-]+\.png")  # the figures of an earlier report
        paths = []
        for stem, png in self.files.items():
            path = os.path.join(folder, f"{stem}.png")
            atomic_write_bytes(path, png)
            paths.append(path)
        return paths


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:0;color:#222;background:#fafafa;line-height:1.45}
main{max-width:1120px;margin:0 auto;padding:16px 24px 48px;background:#fff}
h1{font-size:1.6em;margin:.4em 0 .1em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;
margin-top:2em}h3{margin:1.4em 0 .4em;font-size:1.1em}
.meta{color:#666;font-size:.9em}code{background:#f2f2f2;padding:0 3px;border-radius:3px}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.86em}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:middle}
th{background:#f3f5f8}tbody tr:nth-child(even){background:#fbfbfb}
table.kv td:first-child{font-family:monospace;color:#555}
.note{padding:6px 10px;border-radius:4px;margin:.5em 0;font-size:.9em}
.note.warn{background:#fff4e5;border-left:4px solid #f0a020}
.note.info{background:#eef5fc;border-left:4px solid #5b9bd5}
figure{margin:.6em 0 1.2em}figure img.chart{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.85em}
img.thumb{image-rendering:pixelated;border:1px solid #ccc;vertical-align:middle}
span.text{font-family:monospace;font-size:.9em;white-space:pre-wrap}
.toc a{margin-right:1em}.pair{display:flex;gap:16px;flex-wrap:wrap}.pair>div{flex:1 1 420px}
section{margin-bottom:2em}.queries{display:flex;gap:18px;flex-wrap:wrap}
.query{flex:0 1 auto}table.query td{padding:2px 6px}
details{margin:.6em 0}summary{cursor:pointer;color:#345}
"""


def page_html(title: str, header: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n<main>\n{header}\n{body}\n</main>\n</body>\n"
        "</html>\n"
    )
