"""Images and figures shared by the callbacks, the demos and the report (torch and numpy; PNG
files through Pillow when it is installed, else a built-in encoder)."""

from __future__ import annotations

import io
import math
import struct
import zlib
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np
import torch

from .io import atomic_write_bytes

__all__ = ["as_image", "image_grid", "render_text", "dataset_grid", "save_png"]


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


def dataset_grid(
    items: Sequence[Any],
    get_input: Callable[[Any], Any],
    captions: Sequence[str],
    image_shape: Optional[Sequence[int]] = None,
    ncol: Optional[int] = None,
) -> Optional[torch.Tensor]:
    """Dataset items as one captioned ``(3, H', W')`` grid, or ``None`` when an item's input is
    not an image (then a text table is the picture).

    Args:
        items: dataset items (e.g. ``[ds[i] for i in idx]``).
        get_input: item -> input tensor (the callback's input accessor).
        captions: one caption (digits and '-') per item, e.g. the label.
        image_shape: reshape flat inputs to this shape (e.g. ``(8, 8)``).
        ncol: columns (default: nearly square).
    """
    images: List[torch.Tensor] = []
    for item in items:
        try:
            im = as_image(torch.as_tensor(get_input(item)), image_shape)
        except (KeyError, IndexError, TypeError, ValueError):
            return None
        if im is None or (images and im.shape != images[0].shape):
            return None
        images.append(im)
    if not images:
        return None
    scale = max(1, 64 // max(images[0].shape[1:]))
    return image_grid(images, list(captions), scale=scale, ncol=ncol)


def save_png(image: Union[np.ndarray, torch.Tensor], path: str) -> str:
    """Write an RGB image as a PNG file, atomically (a crash never leaves a half-written file).

    Pillow encodes it when installed; otherwise a minimal built-in encoder (zlib) does, so no image
    library is needed. Both give the same pixels.

    Args:
        image: (H, W, 3) uint8 array or tensor, e.g. ``(grid * 255).round().byte().permute(1, 2,
            0)`` for a ``(3, H, W)`` grid in [0, 1] from :func:`image_grid`.
        path: the file to write; its folder is created if missing.

    Returns:
        The encoder used: ``"PIL"`` or ``"zlib"``.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"save_png needs an (H, W, 3) uint8 image; got shape {tuple(image.shape)} and dtype "
            f"{image.dtype}. Convert a (3, H, W) image in [0, 1] with "
            "(x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)."
        )
    try:
        from PIL import Image
    except ImportError:
        atomic_write_bytes(path, _png_bytes_zlib(image))
        return "zlib"
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), "RGB").save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return "PIL"


def _png_bytes_zlib(img: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as the bytes of an 8-bit RGB PNG (no image library needed)."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(img[r]).tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _write_png_zlib(img: np.ndarray, path: str) -> None:
    """Write an (H, W, 3) uint8 array as PNG with the built-in encoder (atomically)."""
    atomic_write_bytes(path, _png_bytes_zlib(img))
