"""The influence demo (`lightning-memo demo influence`) on digits with 10 % flipped labels."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from lightning_memo.cli import build_parser, main
from lightning_memo.demo_influence import PNG_NAME, _auroc, run_influence_demo

pytest.importorskip("sklearn")

# Small settings: 10 epochs of a 64-64-64-10 MLP (8,970 parameters), curvature from 500 samples,
# Arnoldi 60 / 30: about 3-4 s for the four methods plus TracIn on one core.
SMALL = dict(epochs=10, hidden=64, max_examples=500, arnoldi_dim=60, arnoldi_k=30, verbose=False)
# The picture: 2 rows of [query | gap | 5 proponents | gap | 5 opponents] (see test_demo_tracin).
PNG_W = 11 * 52 + 2 * 12  # 596
PNG_H = 2 * 66 + 12  # 144
FILES = ("self_influence.csv", "top_k.csv", "factors.pt", "scores.pt", "config.json")


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def row(r, key):
    return next(x for x in r["rows"] if x["key"] == key)


def test_all_methods_find_flipped_labels_and_write_files(tmp_path):
    r = run_influence_demo(method="all", out_dir=str(tmp_path), n_show=2, **SMALL)
    assert r["methods"] == ["ekfac", "kfac", "arnoldi", "exact"]
    assert [x["key"] for x in r["rows"]] == [*r["methods"], "tracin", "loss", "margin"]
    assert r["n_train"] + r["n_val"] == 1797 and r["n_flipped"] == int(r["flipped"].sum()) > 100
    # Measured with SMALL, seeds 0-4: AUROC EK-FAC 0.989-0.997, K-FAC 0.989-0.997, Arnoldi
    # 0.993-0.999, exact (net.4) 0.992-0.998, TracIn 0.991-0.996; recall in the top 10 %
    # 0.85-0.96. The self-influence / hinv_norm ratio: 0.988-0.999.
    for key in ("ekfac", "kfac", "arnoldi", "exact", "tracin"):
        x = row(r, key)
        assert x["auroc"] > 0.95, (key, x)
        assert x["recall"] > 0.7, (key, x)
        assert x["seconds"] > 0
        if key != "tracin":
            assert x["auroc_relatif"] > 0.95, (key, x)
    for key in ("loss", "margin"):
        assert np.isnan(row(r, key)["seconds"]) and np.isnan(row(r, key)["auroc_relatif"])
    for m in r["methods"]:
        si, norm = r["self_influence"][m], r["hinv_norm"][m]
        assert si.shape == norm.shape == (r["n_train"],)
        assert np.all(np.isfinite(si)) and np.all(si >= 0) and np.all(norm > 0)
        assert r["reused"][m] == {"factors": False, "scores": False}
        for f in FILES:
            assert os.path.exists(os.path.join(r["out_dirs"][m], f)), (m, f)
        with open(os.path.join(r["out_dirs"][m], "config.json")) as fh:
            cfg = json.load(fh)
        assert cfg["method"] == m and cfg["num_query"] == r["n_val"]
        assert cfg["layers"] == (["net.4"] if m == "exact" else ["net.0", "net.2", "net.4"])
        assert os.path.exists(r["pngs"][m])
    # top-5 lists over all queries. Measured (seed 0): proponents with the query's label 95-98 %,
    # flipped opponents 92-95 % (a clean query's opponents: flipped look-alikes)
    for m in r["methods"]:
        assert r["top5"][m]["proponent_label_share"] > 0.8, m
        assert r["top5"][m]["opponent_flipped_share"] > 0.6, m
    assert isinstance(r["damping_used"]["ekfac"], dict) and r["damping_used"]["arnoldi"] > 0
    # the picture: EK-FAC's proponents / opponents of 2 validation images
    assert r["png"] == os.path.join(str(tmp_path), PNG_NAME) and r["png_method"] == "ekfac"
    assert png_size(r["png"]) == (PNG_W, PNG_H) and r["png_shape"] == (PNG_H, PNG_W, 3)
    assert len(r["examples"]) == 2
    for ex in r["examples"]:
        assert len(ex["proponents"]) == 5 and len(ex["opponents"]) == 5
        assert np.all(np.diff(ex["proponent_scores"]) <= 0)
        assert np.all(np.diff(ex["opponent_scores"]) >= 0)
        assert ex["proponent_scores"][0] > 0 > ex["opponent_scores"][0]
    assert 0 < r["train_seconds"] < r["fit_seconds"]


def test_single_method_and_cli(tmp_path, capsys):
    args = build_parser().parse_args(["demo", "influence", "--method", "ekfac"])
    assert (args.which, args.method) == ("influence", "ekfac")
    assert build_parser().parse_args(["demo", "influence"]).method == "all"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "influence", "--method", "lissa"])
    out_dir = str(tmp_path / "cli")
    argv = ["demo", "influence", "--method", "exact", "--epochs", "3", "--out", out_dir]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for words in ("AUROC", "recall@10%", "exact Hessian (net.4) self-influence", PNG_NAME):
        assert words in out
    assert "EK-FAC" not in out and "TracIn" not in out  # one method, no TracIn
    assert os.path.exists(os.path.join(out_dir, PNG_NAME))
    assert not os.path.exists(os.path.join(out_dir, "influence_proponents_exact.png"))


def test_auroc_of_large_scores_is_not_saturated():
    """torchmetrics applies a sigmoid to scores outside [0, 1]; large self-influence values would
    tie at 1.0. The demo ranks them first: same AUROC at every scale."""
    rng = np.random.default_rng(0)
    target = rng.random(500) < 0.1
    score = np.round(rng.normal(size=500) + 3 * target, 1)
    ref = _auroc(score, target)
    # brute-force AUROC: P(positive > negative) + 0.5 P(tie)
    pos, neg = score[target][:, None], score[~target][None, :]
    brute = float(np.mean(pos > neg) + 0.5 * np.mean(pos == neg))
    assert ref == pytest.approx(brute, abs=1e-6)
    for scale in (1e3, 1e9):
        assert _auroc(score * scale, target) == pytest.approx(ref, abs=1e-6)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="method='lissa'"):
        run_influence_demo(method="lissa", out_dir=str(tmp_path), verbose=False)
    with pytest.raises(ValueError, match="epochs=0"):
        run_influence_demo(method="ekfac", epochs=0, out_dir=str(tmp_path), verbose=False)


def test_auroc_exact_values_with_large_scores_and_nan():
    """torchmetrics applies a sigmoid to scores outside [0, 1]; ranks keep the AUROC exact."""
    target = np.array([0, 0, 1, 0, 1, 1])
    score = np.array([100.0, 300.0, 200.0, 150.0, 250.0, 400.0])  # 7 of 9 pairs ordered
    assert _auroc(score, target) == pytest.approx(7 / 9)
    assert _auroc(score * 1e-3, target) == pytest.approx(7 / 9)
    assert _auroc(np.array([np.nan, 1, 2, 0, 3, 4.0]), target) == pytest.approx(1.0)
