"""MemorizationMonitor's defaults (eval source, orthogonal directions), its eval pass (inference
mode, early stop, the loader's worker settings)."""

from __future__ import annotations

import inspect
import json
import os
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_memo import PSMI, ConceptErasure, IndexedDataset, MemorizationMonitor
from lightning_memo.callbacks.common import inference_context, sequential_loader
from tests.callbacks.helpers import TinyMLP, make_data, make_loader, read_csv, seeded_fit


def _fit(tmp_path, monitor, epochs=2, **kw):
    return seeded_fit(tmp_path, monitor, epochs=epochs, **kw)


# ---------------------------------------------------------------- defaults
def test_monitor_defaults_and_psmi_keeps_the_reference_defaults(tmp_path):
    mon = MemorizationMonitor("net.3", output_dir=str(tmp_path / "o"))
    assert (mon.source, mon.n_estimators, mon.directions) == ("eval", 1000, "orthogonal")
    assert mon.eval_stop_early is False and not hasattr(mon, "warn_on")
    params = inspect.signature(PSMI).parameters  # the estimator stays psmi-compatible
    assert params["directions"].default == "gaussian"
    assert params["n_estimators"].default == "auto"
    _fit(tmp_path, mon, epochs=1)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["source"] == "eval" and cfg["directions"] == "orthogonal"
    assert cfg["n_estimators"] == 1000 and "warn_on" not in cfg
    assert mon.history[0]["layers"]["net.3"]["n_estimators"] == 1000
    # psmi_kwargs may still name the same directions (the older spelling)
    MemorizationMonitor("net.3", psmi_kwargs={"directions": "orthogonal"})
    mon = MemorizationMonitor(
        "net.3", directions="gaussian", psmi_kwargs={"directions": "gaussian"}
    )
    assert mon.directions == "gaussian" and "directions" not in mon.psmi_kwargs


# ---------------------------------------------------------------- the eval pass
def test_eval_stop_early_same_features_no_head_no_baselines(tmp_path):
    runs = {}
    for stop in (False, True):
        torch.manual_seed(0)  # the same weights in both runs
        model = TinyMLP(lr=0.0)
        calls = []
        model.net[4].register_forward_hook(lambda *a, calls=calls: calls.append(1))
        mon = MemorizationMonitor(
            "net.1",
            n_estimators=100,
            eval_stop_early=stop,
            output_dir=str(tmp_path / f"o{stop}"),
        )
        _fit(tmp_path, mon, epochs=1, model=model)
        runs[stop] = (mon, read_csv(tmp_path / f"o{stop}" / "epoch_0.csv"), len(calls))
    (full, csv_full, n_full), (early, csv_early, n_early) = runs[False], runs[True]
    np.testing.assert_array_equal(early.scores_at(0), full.scores_at(0))
    # 6 training batches + the first-batch check run the head either way; the pass: 6 or none
    assert (n_full, n_early) == (13, 7)
    assert {"loss", "margin"} <= set(csv_full) and "risk" not in csv_full
    assert not {"loss", "margin"} & set(csv_early)
    cfg = json.loads((tmp_path / "oTrue" / "config.json").read_text())
    assert cfg["eval_stop_early"] is True


class _ModeProbe(nn.Module):
    """Identity that records (inference mode, grad mode) of the passes in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.modes = []

    def forward(self, x):
        if not self.training:
            self.modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return x


class _ProbedMLP(TinyMLP):
    def __init__(self):
        super().__init__()
        self.probe = _ModeProbe()

    def forward(self, x):
        return self.net(self.probe(x))


@pytest.mark.parametrize("inference_mode", [True, False])
def test_eval_pass_runs_in_inference_mode_and_training_goes_on(tmp_path, inference_mode):
    """Only copies leave the inference-mode pass: training differentiates on after each pass,
    the buffers are normal tensors; Trainer(inference_mode=False) gives a no_grad pass."""
    model = _ProbedMLP()
    before = [p.detach().clone() for p in model.parameters()]
    mon = MemorizationMonitor(["net.1", "net.3"], n_estimators=100)
    _fit(tmp_path, mon, epochs=3, model=model, inference_mode=inference_mode)
    assert mon.epochs == [0, 1, 2]
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the first-batch check (no_grad) and then the three eval passes (6 batches each)
    assert model.probe.modes[0] == (False, False)
    assert set(model.probe.modes[1:]) == {(inference_mode, False)}
    assert len(model.probe.modes) == 1 + 3 * 6
    for buf in list(mon.capture.buffers.values()) + list(mon.capture.seen.values()):
        assert not buf.is_inference()
    assert not mon._loss.is_inference() and not mon.labels.is_inference()


def test_inference_context_follows_lightning():
    trainer = SimpleNamespace(strategy=None, accelerator=None)
    with inference_context(trainer):
        assert torch.is_inference_mode_enabled()
    trainer.validate_loop = SimpleNamespace(inference_mode=False)
    with inference_context(trainer):
        assert not torch.is_inference_mode_enabled() and not torch.is_grad_enabled()


def test_eval_pass_with_concept_erasure_on_the_same_layer(tmp_path):
    """An eraser (a 'modify' hook) on the monitored layer, inside the inference-mode pass."""

    def concept(batch):
        return (batch[0][:, 0] > 0).long()

    erasure = ConceptErasure(
        "net.1", concept=concept, when="fit_start", output_dir=str(tmp_path / "e")
    )
    mon = MemorizationMonitor("net.1", n_estimators=100, output_dir=str(tmp_path / "m"))
    L.seed_everything(0, verbose=False)
    _fit(tmp_path, [erasure, mon], epochs=2)
    assert mon.epochs == [0, 1] and np.isfinite(mon.scores_at(1)).all()


def _init_fn(worker_id):  # module level: picklable
    pass


def test_sequential_loader_keeps_the_worker_settings():
    x, y = make_data()
    ds = IndexedDataset(TensorDataset(x, y))
    gen = torch.Generator().manual_seed(0)
    dl = DataLoader(
        ds,
        batch_size=7,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
        prefetch_factor=3,
        worker_init_fn=_init_fn,
        timeout=5,
        generator=gen,
    )
    trainer = SimpleNamespace(train_dataloader=dl, strategy=None)
    seq = sequential_loader(trainer)
    assert (seq.batch_size, seq.num_workers, seq.persistent_workers) == (7, 2, True)
    assert (seq.prefetch_factor, seq.worker_init_fn, seq.timeout) == (3, _init_fn, 5)
    assert seq.generator is None  # drawing from the training generator would change the shuffle
    assert isinstance(seq.sampler, torch.utils.data.SequentialSampler)
    plain = sequential_loader(SimpleNamespace(train_dataloader=make_loader(), strategy=None))
    assert plain.num_workers == 0 and not plain.persistent_workers


def test_eval_pass_reuses_its_loader_with_persistent_workers(tmp_path):
    x, y = make_data()
    loader = DataLoader(
        IndexedDataset(TensorDataset(x, y)), batch_size=20, num_workers=1, persistent_workers=True
    )
    seen = []

    class Spy(MemorizationMonitor):
        def _eval_pass(self, trainer, pl_module):
            super()._eval_pass(trainer, pl_module)
            seen.append(self._loader)

    mon = Spy("net.3", n_estimators=50, output_dir=str(tmp_path / "o"))
    with pytest.warns(UserWarning):  # Lightning: "does not have many workers"
        _fit(tmp_path, mon, epochs=2, loader=loader)
    assert len(seen) == 2 and seen[0] is seen[1]
    assert seen[0].num_workers == 1 and seen[0].persistent_workers
    assert mon._loader is None  # dropped at the end of training: its workers end
    assert np.isfinite(mon.scores_at(1)).all()


def test_orthogonal_default_scores_equal_psmi_with_orthogonal_directions(tmp_path):
    mon = MemorizationMonitor("net.3", n_estimators=300, psmi_kwargs={"dtype": torch.float64})
    _, model = _fit(tmp_path, mon, epochs=1)
    x, y = make_data()
    model.eval()
    with torch.no_grad():
        feats = model.net[:4](x)
    est = PSMI(300, seed=mon.direction_seed(0, 0), directions="orthogonal", dtype=torch.float64)
    mean, _, _ = est.fit_transform(feats, y)
    np.testing.assert_allclose(mon.scores_at(0), mean.numpy(), atol=1e-6)
    assert os.path.isdir(mon.out_dir)


class _NoForward(TinyMLP):
    """Trains through self.net; no forward() of its own."""

    forward = L.LightningModule.forward

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])


def test_model_without_forward_says_what_to_do(tmp_path):
    """The default eval pass calls the LightningModule: a clear error at the first batch."""
    mon = MemorizationMonitor("net.3", n_estimators=50)
    with pytest.raises(ValueError, match=r"the default forward.*source='train'"):
        _fit(tmp_path, mon, epochs=1, model=_NoForward())
    mon = MemorizationMonitor("net.3", n_estimators=50, source="train")
    _fit(tmp_path, mon, epochs=1, model=_NoForward())
    assert np.isfinite(mon.scores_at(0)).all()
