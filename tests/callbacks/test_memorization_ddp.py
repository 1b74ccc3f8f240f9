"""MemorizationMonitor under DDP (2 CPU processes, gloo) equals the single-process run."""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import pytest
import torch

from lightning_memo import MemorizationMonitor
from tests.callbacks.helpers import TinyMLP, fit_one_or_two_ranks, read_csv

pytestmark = pytest.mark.slow


def _run(folder, devices, batch_size, source, epochs=3, **mon_kw):
    L.seed_everything(0, verbose=False)
    mon = MemorizationMonitor(
        layers=["net.1", "net.3"],
        source=source,
        n_estimators=300,
        output_dir=str(folder / "out"),
        psmi_kwargs={"dtype": torch.float64},
        feature_dtype=torch.float64,
        **mon_kw,
    )
    model = TinyMLP().double()
    fit_one_or_two_ranks(folder, [mon], model, devices, batch_size, epochs=epochs)
    return mon


@pytest.mark.parametrize("source", ["eval", "train"])
def test_ddp_scores_equal_single_process(tmp_path, source):
    # one process with batches of 40 == two processes with 20 each (rank-strided order: the
    # union of the ranks' batches is the single-process batch; gradients are averaged)
    _run(tmp_path / "single", 1, 40, source)
    _run(tmp_path / "ddp", 2, 20, source)
    for epoch in range(3):
        a = read_csv(tmp_path / "single" / "out" / f"epoch_{epoch}.csv")
        b = read_csv(tmp_path / "ddp" / "out" / f"epoch_{epoch}.csv")
        assert len(b["index"]) == 120
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["label"], b["label"])
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)


def test_ddp_stop_on_flag_stops_every_rank(tmp_path):
    _run(tmp_path, 2, 20, "train", epochs=5, warn_below=100.0, patience=2, stop_on_flag=True)
    out = tmp_path / "out"
    assert (out / "epoch_1.csv").exists() and not (out / "epoch_2.csv").exists()
    flagged = read_csv(out / "flagged.csv")
    assert len(flagged["index"]) == 120 and (flagged["epoch_flagged"] == 1).all()
    assert sorted(os.listdir(out)) == sorted(
        ["config.json", "epoch_0.csv", "epoch_1.csv", "flagged.csv", "history.json", "samples.json"]
    )
