"""The TracIn demo (`lightning-memo demo tracin`) on digits with 10 % flipped labels."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lightning_memo.cli import main, parse_args
from lightning_memo.demos import run_tracin_demo
from lightning_memo.demos.tracin import PNG_NAME
from tests.helpers import png_size

pytest.importorskip("sklearn")

# The picture: 4 rows of [query | gap | 5 proponents | gap | 5 opponents], rows separated by a
# gap of 12 px. A tile is the 8x8 digit scaled 6x (48 px) plus image_grid's 2 px padding on each
# side and its 14 px caption strip: 52 px wide, 66 px high.
PNG_W = 11 * 52 + 2 * 12  # 596
PNG_H = 4 * 66 + 3 * 12  # 300
FILES = ("self_influence.csv", "top_k.csv", "store.pt", "config.json")


def auroc(r, name):
    return next(row["auroc"] for row in r["rows"] if row["score"].startswith(name))


def test_checkpoints_demo_finds_flipped_labels_and_draws_the_picture(tmp_path):
    r = run_tracin_demo(epochs=6, out_dir=str(tmp_path), verbose=False)
    assert r["n_train"] + r["n_val"] == 1797 and r["n_flipped"] == int(r["flipped"].sum()) > 100
    assert r["n_checkpoints"] == 6 and r["feature_dim"] <= 1024
    # AUROC of self-influence for the flipped training labels. Measured (seeds 0-4, 3 and 6
    # epochs): 0.979-0.994 in checkpoints mode, 0.969-0.993 online. Floor 0.95 (issue: > 0.8).
    assert auroc(r, "TracIn self-influence") > 0.95
    assert {"TracIn self-influence", "loss, final model (epoch 6)", "loss after epoch 1"} <= {
        row["score"] for row in r["rows"]
    }
    for row in r["rows"]:
        assert 0 <= row["recall"] <= 1
    # the picture and TracIn's files
    assert r["png"] == os.path.join(str(tmp_path), PNG_NAME) and os.path.exists(r["png"])
    assert png_size(r["png"]) == (PNG_W, PNG_H) and r["png_shape"] == (PNG_H, PNG_W, 3)
    for f in FILES:
        assert os.path.exists(os.path.join(r["tracin_dir"], f)), f
    assert len(r["examples"]) == 4
    for ex in r["examples"]:
        assert len(ex["proponents"]) == 5 and len(ex["opponents"]) == 5
        assert np.all(np.diff(ex["proponent_scores"]) <= 0)  # most influential first
        assert np.all(np.diff(ex["opponent_scores"]) >= 0)
        assert ex["proponent_scores"][-1] > ex["opponent_scores"][-1]
    assert r["tracin_seconds"] > 0 and r["tracin_seconds"] < r["fit_seconds"]


def test_online_demo(tmp_path):
    r = run_tracin_demo(epochs=3, out_dir=str(tmp_path), mode="online", verbose=False)
    assert r["n_checkpoints"] is None
    assert auroc(r, "TracIn self-influence") > 0.95  # measured 0.969-0.987 (seeds 0-4)
    assert png_size(r["png"]) == (PNG_W, PNG_H)
    assert not os.path.exists(os.path.join(r["tracin_dir"], "store.pt"))  # no store online


def test_self_influence_beats_the_final_loss_once_flips_are_memorized(tmp_path):
    """At lr 3e-3 the MLP fits most flipped labels by epoch 40: their final loss is low, but
    TracIn sums over the checkpoints. Measured (seeds 0, 1, 2): fitted 73-83 % of the flips;
    AUROC TracIn 0.998 / 0.990 / 0.993, final loss 0.924 / 0.899 / 0.920."""
    r = run_tracin_demo(epochs=40, out_dir=str(tmp_path), verbose=False)
    assert r["fitted_flipped"] > 0.5 and r["n_checkpoints"] == 10
    tracin, final = auroc(r, "TracIn self-influence"), auroc(r, "loss, final model")
    assert tracin > 0.97 and tracin > final + 0.03


def test_cli_demo_tracin_prints_the_table(tmp_path, capsys):
    assert main(["demo", "tracin", "--epochs", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for words in ("AUROC", "TracIn self-influence", "loss, final model", "proponents", PNG_NAME):
        assert words in out
    assert png_size(os.path.join(str(tmp_path), PNG_NAME)) == (PNG_W, PNG_H)
    assert parse_args(["demo"]).which == "memorization"
    assert parse_args(["demo", "tracin"]).which == "tracin"


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mode='offline'"):
        run_tracin_demo(epochs=1, out_dir=str(tmp_path), mode="offline", verbose=False)
    with pytest.raises(ValueError, match="epochs=0"):
        run_tracin_demo(epochs=0, out_dir=str(tmp_path), verbose=False)
