"""The demos package (lightning_memo.demos): its place in the API, the shared helpers
(load_digits_flipped, the AUROC of ranks), PNG writing (lightning_memo.viz.save_png) and the error
without scikit-learn. Oracles: scikit-learn's own ``load_digits``, Pillow's decoder, brute-force
AUROC, the modules' own source (for the import rules)."""

from __future__ import annotations

import ast
import importlib
import os
import sys

import numpy as np
import pytest
import torch

import lightning_memo
from lightning_memo import viz
from lightning_memo.demos import _common
from lightning_memo.demos._common import MissingDemoDependency, auroc, require_sklearn
from tests.helpers import png_size

DEMO_DIR = os.path.dirname(_common.__file__)
DEMO_MODULES = ("memorization", "erasure", "tracin", "influence")


# ---------------------------------------------------------------------------------- the API
def test_load_digits_flipped_lives_in_demos_only():
    with pytest.raises(ImportError):
        exec("from lightning_memo import load_digits_flipped", {})
    assert "load_digits_flipped" not in lightning_memo.__all__
    data = importlib.import_module("lightning_memo.data")
    assert not hasattr(data, "load_digits_flipped") and "load_digits_flipped" not in data.__all__
    from lightning_memo.demos import load_digits_flipped

    assert load_digits_flipped is _common.load_digits_flipped


def test_demos_package_exports_the_run_functions():
    demos = importlib.import_module("lightning_memo.demos")
    for name in DEMO_MODULES:
        fn = getattr(demos, f"run_{name}_demo")
        assert fn.__module__ == f"lightning_memo.demos.{name}"
        assert f"run_{name}_demo" in demos.__all__
    for old in ("demo", "demo_erasure", "demo_tracin", "demo_influence"):
        with pytest.raises(ImportError):
            importlib.import_module(f"lightning_memo.{old}")


def test_no_demo_imports_another_demo():
    """Shared helpers live in _common; a demo module imports no other demo module, and no
    private (underscore) name from anywhere in the package."""
    for name in (*DEMO_MODULES, "_common"):
        with open(os.path.join(DEMO_DIR, f"{name}.py")) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                mod = (node.module or "").split(".")[0]
                if node.level == 1:
                    assert mod in ("", "_common") and mod != name, (name, node.module)
                for alias in node.names:
                    assert not alias.name.startswith("_"), (name, node.module, alias.name)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("lightning_memo"), (name, node.module)


def test_version_comes_from_the_installed_metadata():
    from importlib.metadata import version

    assert lightning_memo.__version__ == version("lightning_memo")
    tomllib = pytest.importorskip("tomllib")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["version"] == lightning_memo.__version__
    pkg = os.path.dirname(lightning_memo.__file__)
    assert os.path.isfile(os.path.join(pkg, "py.typed"))


# ---------------------------------------------------------------------------------- the data
def test_load_digits_flipped():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from lightning_memo.demos import load_digits_flipped

    ref = sklearn_datasets.load_digits()
    x, y_noisy, y_true, flipped = load_digits_flipped(flip_fraction=0.1, seed=0)
    n = 1797
    assert x.shape == (n, 64) and x.dtype == np.float32
    assert y_noisy.shape == y_true.shape == flipped.shape == (n,)
    assert y_noisy.dtype == y_true.dtype == np.int64 and flipped.dtype == bool
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() == 1.0
    np.testing.assert_allclose(x, ref.data / 16.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(y_true, ref.target)
    assert flipped.sum() == round(0.1 * n) == 180
    assert np.all(y_noisy[flipped] != y_true[flipped])
    assert np.all((y_noisy >= 0) & (y_noisy <= 9))
    np.testing.assert_array_equal(y_noisy[~flipped], y_true[~flipped])
    np.testing.assert_array_equal(flipped, y_noisy != y_true)


def test_load_digits_flipped_seeded():
    pytest.importorskip("sklearn")
    from lightning_memo.demos import load_digits_flipped

    a = load_digits_flipped(seed=3)
    b = load_digits_flipped(seed=3)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    c = load_digits_flipped(seed=4)
    assert not np.array_equal(a[3], c[3])
    assert not np.array_equal(a[1], c[1])
    np.testing.assert_array_equal(a[2], c[2])  # the true labels do not depend on the seed


def test_load_digits_flipped_fraction():
    pytest.importorskip("sklearn")
    from lightning_memo.demos import load_digits_flipped

    _, y_noisy, y_true, flipped = load_digits_flipped(flip_fraction=0.0)
    assert flipped.sum() == 0 and np.array_equal(y_noisy, y_true)
    _, _, _, flipped = load_digits_flipped(flip_fraction=0.25, seed=1)
    assert flipped.sum() == round(0.25 * 1797)


@pytest.fixture
def no_sklearn(monkeypatch):
    """scikit-learn made unimportable (a None entry in sys.modules raises ImportError)."""
    for mod in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "sklearn", None)


def test_clear_error_without_sklearn(no_sklearn, tmp_path):
    from lightning_memo.demos import (
        load_digits_flipped,
        run_erasure_demo,
        run_influence_demo,
        run_memorization_demo,
        run_tracin_demo,
    )

    with pytest.raises(MissingDemoDependency, match=r"pip install lightning_memo\[demo\]"):
        require_sklearn()
    with pytest.raises(ImportError, match=r"load_digits_flipped .*pip install lightning_memo"):
        load_digits_flipped()
    for run in (run_memorization_demo, run_erasure_demo, run_tracin_demo, run_influence_demo):
        with pytest.raises(MissingDemoDependency, match=r"demo loads its data from scikit-learn"):
            run(epochs=1, out_dir=str(tmp_path), verbose=False)
    assert not os.listdir(tmp_path)  # refused before any training or output


# ---------------------------------------------------------------------------------- AUROC
def test_auroc_of_large_scores_is_not_saturated():
    """torchmetrics applies a sigmoid to scores outside [0, 1]; large self-influence values would
    tie at 1.0. The demo ranks them first: same AUROC at every scale."""
    rng = np.random.default_rng(0)
    target = rng.random(500) < 0.1
    score = np.round(rng.normal(size=500) + 3 * target, 1)
    ref = auroc(score, target)
    # brute-force AUROC: P(positive > negative) + 0.5 P(tie)
    pos, neg = score[target][:, None], score[~target][None, :]
    brute = float(np.mean(pos > neg) + 0.5 * np.mean(pos == neg))
    assert ref == pytest.approx(brute, abs=1e-6)
    for scale in (1e3, 1e9):
        assert auroc(score * scale, target) == pytest.approx(ref, abs=1e-6)


def test_auroc_exact_values_with_large_scores_and_nan():
    """torchmetrics applies a sigmoid to scores outside [0, 1]; ranks keep the AUROC exact."""
    target = np.array([0, 0, 1, 0, 1, 1])
    score = np.array([100.0, 300.0, 200.0, 150.0, 250.0, 400.0])  # 7 of 9 pairs ordered
    assert auroc(score, target) == pytest.approx(7 / 9)
    assert auroc(score * 1e-3, target) == pytest.approx(7 / 9)
    assert auroc(np.array([np.nan, 1, 2, 0, 3, 4.0]), target) == pytest.approx(1.0)
    assert np.isnan(auroc(np.array([1.0, 2.0]), np.array([1, 1])))  # one class only


# ---------------------------------------------------------------------------------- save_png
def test_zlib_png_writer_matches_pillow(tmp_path):
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    path = str(tmp_path / "x.png")
    viz._write_png_zlib(img, path)
    assert png_size(path) == (5, 7)
    np.testing.assert_array_equal(np.asarray(image.open(path).convert("RGB")), img)


def test_save_png_with_and_without_pillow(tmp_path, monkeypatch):
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(9, 4, 3), dtype=np.uint8)
    a = str(tmp_path / "sub" / "pil.png")  # the folder is created
    assert viz.save_png(img, a) == "PIL"
    assert viz.save_png(torch.from_numpy(img), str(tmp_path / "t.png")) == "PIL"
    monkeypatch.setitem(sys.modules, "PIL", None)
    b = str(tmp_path / "zlib.png")
    assert viz.save_png(img, b) == "zlib"
    monkeypatch.undo()
    for path in (a, b, str(tmp_path / "t.png")):
        assert png_size(path) == (4, 9)
        np.testing.assert_array_equal(np.asarray(image.open(path).convert("RGB")), img)
    assert sorted(os.listdir(tmp_path)) == ["sub", "t.png", "zlib.png"]  # no temporary files


def test_save_png_refuses_other_images(tmp_path):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        viz.save_png(np.zeros((3, 4, 4), dtype=np.uint8), str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="float32"):
        viz.save_png(np.zeros((4, 4, 3), dtype=np.float32), str(tmp_path / "x.png"))
    assert not os.listdir(tmp_path)
