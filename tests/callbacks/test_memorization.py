"""MemorizationMonitor in real Trainer.fit runs on tiny models."""

from __future__ import annotations

import json
import os

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_memo import (
    PSMI,
    IndexedDataset,
    LayerNotFoundError,
    MemorizationMonitor,
    MissingIndexError,
    MissingLabelError,
    SampleIndexError,
)
from tests.callbacks.helpers import TinyMLP, make_data, make_loader, read_csv, seeded_fit, trainer


def _fit(tmp_path, monitor, epochs=3, **kw):
    return seeded_fit(tmp_path, monitor, epochs=epochs, **kw)


def test_eval_source_scores_equal_independent_recomputation(tmp_path):
    """Last epoch's CSV == PSMI/loss/margin recomputed from the final model by hand."""
    mon = MemorizationMonitor(
        layers=["net.3"],
        source="eval",
        n_estimators=300,
        seed=7,
        output_dir=str(tmp_path / "out"),
        psmi_kwargs={"dtype": torch.float64},
    )
    tr, model = _fit(tmp_path, mon, epochs=3)
    files = sorted(os.listdir(tmp_path / "out"))
    assert {
        "config.json",
        "epoch_0.csv",
        "epoch_1.csv",
        "epoch_2.csv",
        "flagged.csv",
        "history.json",
    } <= set(files)
    csv = read_csv(tmp_path / "out" / "epoch_2.csv")
    x, y = make_data()
    model.eval()
    with torch.no_grad():
        feats = model.net[:4](x)
        logits = model(x).double()
    mean, std, _ = PSMI(
        n_estimators=300,
        seed=mon.direction_seed(2, 0),
        dtype=torch.float64,
        directions="orthogonal",
    ).fit_transform(feats, y)
    order = csv["index"].astype(int)
    np.testing.assert_array_equal(order, np.arange(120))
    np.testing.assert_allclose(csv["net.3/psmi_mean"], mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(csv["net.3/psmi_std"], std.numpy(), atol=1e-6)
    loss = F.cross_entropy(logits, y, reduction="none").numpy()
    np.testing.assert_allclose(csv["loss"], loss, rtol=1e-5, atol=1e-6)
    top2 = logits.topk(2, dim=1).values
    own = logits[torch.arange(120), y]
    other = torch.where(own == top2[:, 0], top2[:, 1], top2[:, 0])
    np.testing.assert_allclose(csv["margin"], (own - other).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(csv["label"], y.numpy())
    np.testing.assert_allclose(mon.scores[2]["net.3"], mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(mon.scores_at(2), mean.numpy(), atol=1e-6)  # the flag layer
    assert mon.epochs == [0, 1, 2]
    assert torch.equal(mon.labels, y) and mon.labels_seen.all()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["layers"] == ["net.3"] and cfg["num_samples"] == 120 and cfg["seed"] == 7
    assert len(mon.history) == 3
    assert tr.callback_metrics["memo/net.3/psmi_mean"] == pytest.approx(
        float(mean.mean()), abs=1e-6
    )


def test_train_source_records_training_forward_features(tmp_path):
    """source='train' scores the features of the training passes (lr=0: weights never move)."""
    mon = MemorizationMonitor(
        layers=["net.1", "net.3"],
        source="train",
        n_estimators=200,
        output_dir=str(tmp_path / "out"),
    )
    _, model = _fit(tmp_path, mon, epochs=1, model=TinyMLP(lr=0.0))
    x, y = make_data()
    with torch.no_grad():
        f1 = model.net[:2](x)
    est = PSMI(n_estimators=200, seed=mon.direction_seed(0, 0), directions=mon.directions)
    mean, _, _ = est.fit_transform(f1, y)
    csv = read_csv(tmp_path / "out" / "epoch_0.csv")
    np.testing.assert_allclose(csv["net.1/psmi_mean"], mean.numpy(), atol=1e-5)
    assert "net.3/psmi_mean" in csv and "loss" in csv
    assert not np.isnan(csv["net.3/psmi_mean"]).any()
    assert mon.capture is not None and not mon.capture.attached  # hooks removed at the end
    assert not model.net[1]._forward_hooks and not model._forward_hooks


def test_every_n_epochs_and_glob(tmp_path):
    mon = MemorizationMonitor(
        layers="net.*", every_n_epochs=2, n_estimators=100, output_dir=str(tmp_path / "out")
    )
    _fit(tmp_path, mon, epochs=4)
    assert sorted(mon.scores) == [1, 3] == mon.epochs
    assert set(mon.scores[1]) == {f"net.{i}" for i in range(5)}
    # scores_at: the flag layer (the last resolved) by default, a copy, clear errors
    np.testing.assert_array_equal(mon.scores_at(3), mon.scores[3]["net.4"])
    np.testing.assert_array_equal(mon.scores_at(1, "net.2"), mon.scores[1]["net.2"])
    mon.scores_at(1)[:] = 0
    assert not (mon.scores[1]["net.4"] == 0).all()
    with pytest.raises(KeyError, match=r"no scores for epoch 2; evaluated epochs .*\[1, 3\]"):
        mon.scores_at(2)
    with pytest.raises(ValueError, match="layer='net.9' is not one of the monitored layers"):
        mon.scores_at(1, "net.9")
    assert not (tmp_path / "out" / "epoch_0.csv").exists()
    assert (tmp_path / "out" / "epoch_3.csv").exists()


def test_early_warning_patience_on_flag_and_stop(tmp_path):
    seen = []
    mon = MemorizationMonitor(
        layers=["net.3"],
        n_estimators=100,
        warn_below=100.0,
        patience=2,
        on_flag=lambda idx: seen.append(idx.copy()),
        stop_on_flag=True,
        output_dir=str(tmp_path / "out"),
    )
    with pytest.warns(UserWarning, match="early warning .*120 training samples"):
        tr, _ = _fit(tmp_path, mon, epochs=5)
    assert tr.current_epoch == 2  # stopped after the second evaluation (epoch 1)
    assert len(seen) == 1 and len(seen[0]) == 120
    np.testing.assert_array_equal(mon.flagged, np.arange(120))
    assert mon.history[0]["n_flagged"] == 0 and mon.history[1]["n_flagged"] == 120
    flagged = read_csv(tmp_path / "out" / "flagged.csv")
    assert (flagged["epoch_flagged"] == 1).all()


def test_flags_need_consecutive_evaluations(tmp_path):
    """A sample is flagged only after `patience` consecutive evaluations below the threshold."""
    mon = MemorizationMonitor(layers=["net.3"], n_estimators=100, patience=3)
    mon.below_count = torch.zeros(4, dtype=torch.long)
    mon.flagged_epoch = torch.full((4,), -1)
    seq = [
        np.array([-1.0, -1.0, 1.0, np.nan]),
        np.array([-1.0, 1.0, -1.0, -1.0]),
        np.array([-1.0, -1.0, -1.0, -1.0]),
    ]
    news = [mon._update_flags(s, e).tolist() for e, s in enumerate(seq)]
    assert news == [[], [], [0]]
    assert mon.below_count.tolist() == [3, 1, 2, 2]


def test_tensorboard_histogram_image_grid_and_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    mon = MemorizationMonitor(
        layers=["net.3"], n_estimators=100, n_show=4, image_shape=(2, 4), input_key=0
    )
    _fit(tmp_path, mon, epochs=1, logger=logger)
    assert mon.out_dir.startswith(logger.log_dir)
    ev = EventAccumulator(
        logger.log_dir, size_guidance={"images": 0, "histograms": 0, "tensors": 0}
    )
    ev.Reload()
    tags = ev.Tags()
    assert "memo/net.3/psmi" in tags["histograms"]
    assert "memo/net.3/psmi_mean" in tags["scalars"] and "memo/flagged" in tags["scalars"]
    assert "memo/net.3/lowest_psmi" in tags["images"]
    assert any("lowest_psmi" in t for t in tags["tensors"])  # text summary
    hist = ev.Histograms("memo/net.3/psmi")[0].histogram_value
    assert hist.num == 120


def test_no_tensorboard_logger_warns_once(tmp_path):
    csv_logger = L.pytorch.loggers.CSVLogger(str(tmp_path))
    mon = MemorizationMonitor(layers=["net.3"], n_estimators=50)
    with pytest.warns(UserWarning, match="need a TensorBoardLogger"):
        _fit(tmp_path, mon, epochs=2, logger=csv_logger)


def test_resume_equals_uninterrupted(tmp_path):
    def run(folder, epochs, ckpt=None, checkpoint=False):
        mon = MemorizationMonitor(
            layers=["net.3"], n_estimators=200, warn_below=0.3, output_dir=str(folder / "out")
        )
        cbs = [mon]
        if checkpoint:
            cbs.append(
                L.pytorch.callbacks.ModelCheckpoint(dirpath=str(folder / "ck"), save_last=True)
            )
        L.seed_everything(0, verbose=False)
        tr = trainer(folder, cbs, max_epochs=epochs, enable_checkpointing=checkpoint)
        tr.fit(TinyMLP(), make_loader(), ckpt_path=ckpt)
        return mon

    full = run(tmp_path / "full", 6)
    run(tmp_path / "part", 3, checkpoint=True)
    resumed = run(tmp_path / "part", 6, ckpt=str(tmp_path / "part" / "ck" / "last.ckpt"))
    for e in range(3, 6):
        a = read_csv(tmp_path / "full" / "out" / f"epoch_{e}.csv")
        b = read_csv(tmp_path / "part" / "out" / f"epoch_{e}.csv")
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-12, err_msg=key)
    assert len(resumed.history) == 6
    assert [h["n_flagged"] for h in resumed.history] == [h["n_flagged"] for h in full.history]
    np.testing.assert_array_equal(resumed.flagged, full.flagged)
    assert torch.equal(resumed.below_count, full.below_count)


def test_missing_samples_are_counted(tmp_path):
    mon = MemorizationMonitor(
        layers=["net.3"], source="train", n_estimators=50, output_dir=str(tmp_path / "o")
    )
    with pytest.warns(UserWarning, match="60 of 120 training samples were never seen"):
        _fit(tmp_path, mon, epochs=1, limit_train_batches=3)
    csv = read_csv(tmp_path / "o" / "epoch_0.csv")
    assert len(csv["index"]) == 60
    assert mon.history[0]["layers"]["net.3"]["n_missing"] == 60


class _NaNLayer(torch.nn.Module):
    """Identity, but rows whose first input is > 2.5 become NaN."""

    def forward(self, x):
        bad = (x[:, :1] > 2.5).expand_as(x)
        return torch.where(bad, torch.full_like(x, float("nan")), x)


class _NaNModel(TinyMLP):
    def __init__(self):
        super().__init__()
        self.probe = _NaNLayer()

    def training_step(self, batch, batch_idx):
        self.probe(batch[0])
        return super().training_step(batch, batch_idx)


def test_nonfinite_features_are_excluded_and_counted(tmp_path):
    x, _ = make_data()
    n_bad = int((x[:, 0] > 2.5).sum())
    assert 0 < n_bad < 100
    mon = MemorizationMonitor(  # the probe runs in training_step only: the train source
        layers=["probe"], source="train", n_estimators=50, output_dir=str(tmp_path / "o")
    )
    with pytest.warns(UserWarning, match=f"{n_bad} samples have NaN/inf features"):
        _fit(tmp_path, mon, epochs=1, model=_NaNModel())
    s = mon.scores[0]["probe"]
    assert int(np.isnan(s).sum()) == n_bad and np.isfinite(s[~np.isnan(s)]).all()
    assert mon.history[0]["layers"]["probe"]["n_nonfinite"] == n_bad


def test_singleton_class_is_excluded_with_warning(tmp_path):
    x, y = make_data()
    y = y.clone()
    y[5] = 3  # class 3 has one sample
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=20)
    model = TinyMLP(n_classes=4)
    mon = MemorizationMonitor(layers=["net.3"], n_estimators=50)
    with pytest.warns(UserWarning, match=r"class\(es\) \[3\] have a single scored sample"):
        _fit(tmp_path, mon, epochs=1, loader=loader, model=model)
    assert np.isnan(mon.scores[0]["net.3"][5])
    assert np.isfinite(np.delete(mon.scores[0]["net.3"], 5)).all()


# ---------------------------------------------------------------- bad input
def test_unknown_layer_lists_close_names(tmp_path):
    mon = MemorizationMonitor(layers=["net.33"])
    with pytest.raises(LayerNotFoundError, match=r"'net\.33'.*Closest names: .*net\.3"):
        _fit(tmp_path, mon, epochs=1)


def test_batch_without_index_shows_how_to_wrap(tmp_path):
    x, y = make_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    for source in ("train", "eval"):
        mon = MemorizationMonitor(layers=["net.3"], source=source)
        with pytest.raises(MissingIndexError, match="IndexedDataset"):
            _fit(tmp_path, mon, epochs=1, loader=loader)


def test_float_labels_are_refused(tmp_path):
    x, y = make_data()
    loader = DataLoader(IndexedDataset(TensorDataset(x, y.float())), batch_size=20)
    with pytest.raises(MissingLabelError, match="integer class ids"):
        _fit(tmp_path, MemorizationMonitor(layers=["net.3"]), epochs=1, loader=loader)


def test_index_out_of_range_and_duplicates(tmp_path):
    x, y = make_data()
    loader = DataLoader(TensorDataset(x, y, torch.arange(120) + 5), batch_size=20)
    with pytest.raises(SampleIndexError, match=r"out of range \[0, 120\)"):
        _fit(tmp_path, MemorizationMonitor(layers=["net.3"]), epochs=1, loader=loader)
    loader = DataLoader(TensorDataset(x, y, torch.arange(120) // 2), batch_size=20)
    with pytest.raises(SampleIndexError, match="more than once"):
        _fit(tmp_path, MemorizationMonitor(layers=["net.3"]), epochs=1, loader=loader)


class _Stream(IterableDataset):
    def __iter__(self):
        x, y = make_data()
        for i in range(120):
            yield x[i], y[i], i


def test_iterable_dataset_is_refused(tmp_path):
    loader = DataLoader(_Stream(), batch_size=20)
    with pytest.raises(TypeError, match="map-style"):
        _fit(tmp_path, MemorizationMonitor(layers=["net.3"]), epochs=1, loader=loader)


def test_empty_dataloader_is_refused(tmp_path):
    x, y = make_data()
    loader = DataLoader(IndexedDataset(TensorDataset(x[:0], y[:0])), batch_size=20)
    with pytest.raises(ValueError, match="training dataloader is empty"):
        _fit(tmp_path, MemorizationMonitor(layers=["net.3"]), epochs=1, loader=loader)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_epochs": 0}, "every_n_epochs=0"),
        ({"pooling": "max"}, "pooling='max' is not supported"),
        ({"source": "val"}, "source='val'"),
        ({"patience": 0}, "patience=0"),
        ({"n_estimators": 0}, "n_estimators=0"),
        ({"layers": []}, "empty"),
        ({"directions": "sobol"}, "directions='sobol'"),
        ({"psmi_kwargs": {"directions": "gaussian"}}, "pass directions='gaussian'"),
        ({"eval_stop_early": True, "source": "train"}, "eval_stop_early=True with source='train'"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"layers": ["net.3"], **kwargs}
    with pytest.raises(ValueError, match=match):
        MemorizationMonitor(**args)


def test_keyword_only_and_top_k_renamed_n_show():
    with pytest.raises(TypeError, match="positional"):
        MemorizationMonitor(["net.3"], 2)
    with pytest.warns(DeprecationWarning, match="top_k=.*deprecated.*n_show="):
        mon = MemorizationMonitor(layers=["net.3"], top_k=3)
    assert mon.n_show == 3
    with pytest.warns(DeprecationWarning, match="use n_show"):
        assert mon.top_k == 3
    with pytest.raises(ValueError, match="pass n_show= only"):
        MemorizationMonitor(layers=["net.3"], top_k=3, n_show=5)
    with pytest.raises(ValueError, match="n_show=-1"):
        MemorizationMonitor(layers=["net.3"], n_show=-1)


@pytest.mark.parametrize(
    "bar, progress, shown",
    [(False, None, False), (True, None, True), (False, True, True), (True, False, False)],
)
def test_progress_follows_the_trainer(tmp_path, capfd, bar, progress, shown):
    """The eval pass's bar: progress=None follows Trainer(enable_progress_bar=...)."""
    mon = MemorizationMonitor(layers=["net.3"], source="eval", n_estimators=50, progress=progress)
    capfd.readouterr()
    _fit(tmp_path, mon, epochs=1, enable_progress_bar=bar)
    assert ("MemorizationMonitor: eval pass" in capfd.readouterr().err) == shown


def test_hooks_removed_on_exception(tmp_path):
    class Boom(TinyMLP):
        def training_step(self, batch, batch_idx):
            if self.current_epoch == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Boom()
    mon = MemorizationMonitor(layers=["net.3"], n_estimators=50)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, mon, epochs=3, model=model)
    assert not model.net[3]._forward_hooks and not model._forward_hooks
    assert 0 in mon.scores
