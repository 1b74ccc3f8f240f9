"""The `lightning-memo demo` command on shipped data."""

from __future__ import annotations

import os

import pytest

from lightning_memo.cli import build_parser, main
from lightning_memo.demo import run_memorization_demo

pytest.importorskip("sklearn")


def test_demo_predicts_memorization_early(tmp_path):
    from lightning_memo.demo import _auroc

    r = run_memorization_demo(epochs=4, out_dir=str(tmp_path), n_estimators=300, verbose=False)
    assert r["n_flipped"] == 180 and r["flipped"].sum() == 180
    assert [row["epoch"] for row in r["rows"]] == list(range(4))
    # flipped samples carry little information on their (wrong) label from epoch 1 on
    assert _auroc(-r["psmi"][1], r["flipped"]) > 0.85
    for row in r["rows"]:  # each AUROC is a number in [0, 1] or NaN when nothing is memorized
        assert r["n_memorized"] == 0 or 0 <= row["auroc_psmi"] <= 1
    assert 0 < r["recall"] <= 1 and 0 < r["precision"] <= 1
    assert os.path.exists(os.path.join(r["monitor_dir"], "epoch_3.csv"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(r["log_dir"]))


def test_cli_prints_the_table(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--n-estimators", "100", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "AUROC" in out and "-PSMI" in out and "tensorboard --logdir" in out


def test_cli_rejects_unknown_demo():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "nope"])
