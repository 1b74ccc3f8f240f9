"""Atomic files, output folder, image helpers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lightning_memo.io import (
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    resolve_output_dir,
)
from lightning_memo.viz import as_image, image_grid, render_text


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    atomic_write_text(str(p), "one")
    atomic_write_text(str(p), "two")
    assert p.read_text() == "two"
    assert os.listdir(p.parent) == ["a.txt"]


def test_atomic_write_crash_keeps_previous_file(tmp_path):
    p = tmp_path / "a.csv"
    atomic_write_csv(str(p), ["a", "b"], [[1, 2.5]])

    def rows():
        yield [3, 4.0]
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash"):
        atomic_write_csv(str(p), ["a", "b"], rows())
    assert p.read_text() == "a,b\n1,2.5\n"
    assert os.listdir(tmp_path) == ["a.csv"]


def test_csv_nan_is_empty_and_floats_round_trip(tmp_path):
    p = tmp_path / "x.csv"
    v = 0.1 + 0.2
    atomic_write_csv(str(p), ["v", "w"], [[v, float("nan")]])
    line = p.read_text().splitlines()[1]
    assert line.endswith(",") and float(line.split(",")[0]) == v


def test_json(tmp_path):
    atomic_write_json(str(tmp_path / "c.json"), {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": [1, 2], "b": 1}


class _T:
    def __init__(self, log_dir, root):
        self.log_dir, self.default_root_dir = log_dir, root


def test_resolve_output_dir(tmp_path):
    assert resolve_output_dir(_T("/x/y", "/r"), None, "memorization") == os.path.join(
        "/x/y", "lightning_memo", "memorization"
    )
    assert resolve_output_dir(_T(None, "/r"), None, "m") == "/r/lightning_memo/m"
    assert resolve_output_dir(_T("/x", "/r"), str(tmp_path), "m") == str(tmp_path)


def test_as_image_cases():
    assert as_image(torch.rand(8, 8)).shape == (1, 8, 8)
    assert as_image(torch.rand(3, 5, 6)).shape == (3, 5, 6)
    assert as_image(torch.rand(64)) is None
    assert as_image(torch.rand(64), (8, 8)).shape == (1, 8, 8)
    assert as_image(torch.rand(10), (8, 8)) is None
    assert as_image(torch.arange(5)) is None  # integer token ids are not images
    im = as_image(torch.tensor([[0.0, 2.0, 4.0, 6.0]] * 4))
    assert float(im.min()) == 0.0 and float(im.max()) == 1.0


def test_render_text_glyphs():
    one = render_text("1", size=1)
    assert one.shape == (5, 4)
    assert one[:, :3].tolist() == [
        [0, 1, 0],
        [1, 1, 0],
        [0, 1, 0],
        [0, 1, 0],
        [1, 1, 1],
    ]
    assert render_text("12", size=2).shape == (10, 16)


def test_image_grid_layout_and_captions():
    ims = [torch.full((1, 4, 4), float(i) / 4) for i in range(5)]
    g = image_grid(ims, pad=1)
    assert g.shape == (3, 2 * 5 + 1, 3 * 5 + 1)  # 5 images -> 2 rows of 3
    assert torch.allclose(g[:, 1:5, 6:10], torch.full((3, 4, 4), 0.25))
    gc = image_grid(ims, [str(i) for i in range(5)], pad=1, scale=3)
    assert gc.shape == (3, 2 * (12 + 14 + 1) + 1, 3 * (12 + 1) + 1)
    caption = gc[0, 1 + 12 + 2 : 1 + 12 + 2 + 10, 1 : 1 + 8]
    assert torch.equal(caption == 0, render_text("0") == 1)  # ink is black
