"""Output shared by the callbacks: atomic files, the output folder, TensorBoard pictures."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from typing import Any, Iterable, List, Optional, Sequence

import torch

__all__ = [
    "atomic_write_text",
    "atomic_write_csv",
    "atomic_write_json",
    "resolve_output_dir",
    "tensorboard_writer",
    "image_grid",
    "as_image",
]


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV atomically. Floats are written with full precision (``repr``); NaN as empty."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    atomic_write_text(path, buf.getvalue())


def atomic_write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (sorted keys, indented)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def resolve_output_dir(trainer: Any, explicit: Optional[str], name: str) -> str:
    """The callback's folder: ``explicit``, else ``trainer.log_dir``, else ``default_root_dir``,
    plus ``lightning_memo/<name>``. Call it on every rank: ``trainer.log_dir`` broadcasts."""
    if explicit is not None:
        return os.path.abspath(explicit)
    base = trainer.log_dir or trainer.default_root_dir
    return os.path.join(os.path.abspath(base), "lightning_memo", name)


def tensorboard_writer(trainer: Any) -> Any:
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger, or ``None``."""
    from torch.utils.tensorboard import SummaryWriter

    for lg in getattr(trainer, "loggers", []) or []:
        exp = getattr(lg, "experiment", None)
        if isinstance(exp, SummaryWriter):
            return exp
    return None


def as_image(
    x: torch.Tensor, image_shape: Optional[Sequence[int]] = None
) -> Optional[torch.Tensor]:
    """A sample's input as a ``(C, H, W)`` image in [0, 1], or ``None`` if it is not an image.

    Images: ``(H, W)``, ``(C, H, W)`` with C in {1, 3}, or any tensor of ``prod(image_shape)``
    elements when ``image_shape`` is given (e.g. ``(8, 8)`` for flattened digits).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() and x.dtype != torch.uint8:
        return None
    x = x.detach().float().cpu()
    if image_shape is not None:
        if x.numel() != math.prod(image_shape):
            return None
        x = x.reshape(*image_shape)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        return None
    if image_shape is None and min(x.shape[1:]) < 4:
        return None  # a small tensor is not taken for an image unless image_shape says so
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


# 3x5 bitmap digits (and '-') to print labels under the grid's tiles without a font library
_GLYPHS = {
    "0": "111101101101111",
    "1": "010110010010111",
    "2": "111001111100111",
    "3": "111001111001111",
    "4": "101101111001001",
    "5": "111100111001111",
    "6": "111100111101111",
    "7": "111001010010010",
    "8": "111101111101111",
    "9": "111101111001111",
    "-": "000000111000000",
}


def render_text(text: str, size: int = 2) -> torch.Tensor:
    """``text`` (digits and '-') as a ``(5 * size, 4 * size * len(text))`` ink mask in {0, 1}."""
    cols = []
    for ch in text:
        bits = _GLYPHS.get(ch, "0" * 15)
        glyph = torch.tensor([float(b) for b in bits]).reshape(5, 3)
        cols += [glyph, torch.zeros(5, 1)]
    mask = torch.cat(cols, dim=1) if cols else torch.zeros(5, 0)
    return mask.repeat_interleave(size, 0).repeat_interleave(size, 1)


def image_grid(
    images: List[torch.Tensor],
    captions: Optional[Sequence[str]] = None,
    pad: int = 2,
    scale: int = 1,
    ncol: Optional[int] = None,
) -> torch.Tensor:
    """Tile ``(C, H, W)`` images of one size into a ``(3, H', W')`` grid, nearly square (or
    ``ncol`` columns), with an optional caption (digits, e.g. the label) under each tile."""
    k = len(images)
    ncol = ncol or max(1, math.ceil(math.sqrt(k)))
    nrow = math.ceil(k / ncol)
    h, w = images[0].shape[1] * scale, images[0].shape[2] * scale
    cap_h = 14 if captions is not None else 0
    cell_h = h + cap_h
    grid = torch.ones(3, nrow * (cell_h + pad) + pad, ncol * (w + pad) + pad)
    for i, im in enumerate(images):
        im = im.expand(3, *im.shape[1:])
        if scale > 1:
            im = im.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        r, c = divmod(i, ncol)
        top, left = pad + r * (cell_h + pad), pad + c * (w + pad)
        grid[:, top : top + h, left : left + w] = im
        if captions is not None:
            ink = render_text(str(captions[i]))[:, :w]
            y0 = top + h + 2
            grid[:, y0 : y0 + ink.shape[0], left : left + ink.shape[1]] -= ink
    return grid.clamp_(0, 1)
