"""Regression tests of the bugs fixed in 26adc64 ("Callbacks compose ...").

Each test failed on the commit before (ebee197), except the control
``test_callbacks_keep_each_module_mode_and_the_training[monitor_train]`` (no extra pass). Names
of the new API (``OutputDirError``, ``lightning_memo.io``) are imported inside the tests, so the
file still collects on old code.
DDP (item 4) is covered by the *_ddp test files.
"""

from __future__ import annotations

import os
import stat

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_memo import (
    PSMI,
    ConceptErasure,
    IndexedDataset,
    InfluenceAnalysis,
    LeaceFitter,
    MemorizationMonitor,
    TracIn,
)
from lightning_memo.influence.features import GradientFeaturizer
from tests.callbacks.helpers import TinyMLP, make_data, make_loader, read_csv, trainer

LR = 0.05  # TinyMLP's SGD learning rate


# ----------------------------------------------------------------------------- shared helpers
class PSMLP(TinyMLP):
    """TinyMLP with a per-sample loss and a count of training steps."""

    steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)

    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")


def fit(tmp_path, callbacks, epochs=1, model=None, loader=None, ckpt_path=None, **kw):
    """Seeded fit; returns the model."""
    L.seed_everything(0, verbose=False)
    model = model or PSMLP()
    tr = trainer(tmp_path, callbacks, max_epochs=epochs, **kw)
    tr.fit(model, loader or make_loader(), ckpt_path=ckpt_path)
    return model


def monitor(layers="net.0", **kw):
    return MemorizationMonitor(layers, **{"n_estimators": 64, "progress": False, **kw})


def tuple_loader(x, y, batch_size=20, index=None):
    """(x, y, index) batches; ``index`` overrides the IndexedDataset positions."""
    if index is None:
        return DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=batch_size)
    return DataLoader(TensorDataset(x, y, index), batch_size=batch_size)


def query_loader(n=20, batch_size=20):
    xq, yq = make_data(n, seed=1)
    return DataLoader(TensorDataset(xq, yq), batch_size=batch_size)


def brute_sq_norms(model, x, y, params):
    """(N,) squared norm of each sample's gradient w.r.t. ``params``, one autograd call each,
    on the model as it runs (its forward hooks included)."""
    out = []
    for i in range(x.shape[0]):
        loss = model.per_sample_loss((x[i : i + 1], y[i : i + 1]))[0]
        grads = torch.autograd.grad(loss, params)
        out.append(sum(g.double().square().sum() for g in grads))
    return torch.stack(out)


def erasers_state(cb):
    return {k: e.state_dict() for k, e in cb.erasers.items()}


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for name in a[k]:
            if a[k][name] is None:
                assert b[k][name] is None
            else:
                torch.testing.assert_close(a[k][name], b[k][name], rtol=0, atol=0)


def unwritable(tmp_path):
    """A folder path that cannot be created: under a 0500 folder, or (as root, who writes there
    anyway) under a regular file."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):
        return str(ro / "out")
    (tmp_path / "afile").write_text("not a folder")
    return str(tmp_path / "afile" / "sub")


# ----------------------------------------------------------------------------- 1: erasure + grads
@pytest.mark.parametrize("erasure_first", [True, False])
def test_tracin_gradients_are_those_of_the_erased_model(tmp_path, erasure_first):
    """TracIn on the erased Linear layer: lr * ||d loss_i / d (W, b)||^2 of the model with the
    erasure hook active (d loss / d pre-erasure output x input), whatever the callback order."""
    er = ConceptErasure("net.0", when="fit_start", probe=False, progress=False)
    tr = TracIn(layers="net.0", projection_dim=None, mode="checkpoints", progress=False)
    model = fit(tmp_path, [er, tr] if erasure_first else [tr, er])
    assert "net.0" in er.erasers and len(tr.store) == 1
    er.install(model)  # teardown removed the hooks
    x, y = make_data(120)
    want = LR * brute_sq_norms(model.eval(), x, y, list(model.net[0].parameters()))
    torch.testing.assert_close(tr.self_influence, want, rtol=1e-5, atol=0)


def test_gradient_featurizer_differentiates_through_an_installed_eraser():
    """grad_dict (the gradient path of InfluenceAnalysis) with an eraser installed first."""
    torch.manual_seed(0)
    model = PSMLP().eval()
    x, y = make_data(30)
    er = ConceptErasure("net.0")
    with torch.no_grad():
        er.erasers = {"net.0": LeaceFitter.fit(model.net[0](x), y).eraser}
    er.install(model)
    feats = GradientFeaturizer({"net.0": model.net[0]}, projection_dim=None, factored=False)
    got = feats.grad_dict(model, (x, y), lambda m, b: m.per_sample_loss(b))
    for i in (0, 7, 29):
        loss = model.per_sample_loss((x[i : i + 1], y[i : i + 1]))[0]
        w, b = torch.autograd.grad(loss, [model.net[0].weight, model.net[0].bias])
        torch.testing.assert_close(got["net.0.weight"][i], w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["net.0.bias"][i], b, rtol=1e-5, atol=1e-7)
    er.remove()


# ----------------------------------------------------------------------------- 2: extra passes
def composed_run(tmp_path, query_batch_size=None):
    """Monitor + every-epoch erasure on net.0, with an online TracIn (queries) on net.0 or not."""
    mon = monitor(source="train")
    er = ConceptErasure("net.0", when="every_epoch", probe=False, progress=False)
    cbs = [mon, er]
    if query_batch_size is not None:
        queries = query_loader(batch_size=query_batch_size)
        cbs.insert(0, TracIn(layers="net.0", projection_dim=None, mode="online", queries=queries,
                             progress=False))  # fmt: skip
    fit(tmp_path, cbs, epochs=2)
    return mon, er


@pytest.mark.parametrize("query_batch_size", [7, 20], ids=["other_batch_size", "same_batch_size"])
def test_online_tracin_query_passes_are_invisible(tmp_path, query_batch_size):
    base_mon, base_er = composed_run(tmp_path / "base")
    mon, er = composed_run(tmp_path / "tracin", query_batch_size)
    for epoch in (0, 1):
        np.testing.assert_allclose(
            mon.scores[epoch]["net.0"], base_mon.scores[epoch]["net.0"], rtol=1e-6, equal_nan=True
        )
    assert not np.isnan(mon.scores[1]["net.0"]).any()
    assert_states_equal(erasers_state(er), erasers_state(base_er))


# ----------------------------------------------------------------------------- 3: labels -1 / +1
class PlusMinusMLP(PSMLP):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), (batch[1] + 1) // 2)


def test_monitor_scores_labels_minus_one_and_plus_one(tmp_path):
    x, y01 = make_data(60, n_classes=2)
    y = 2 * y01 - 1
    mon = monitor(source="eval")
    model = fit(tmp_path, [mon], model=PlusMinusMLP(n_classes=2), loader=tuple_loader(x, y))
    got = mon.scores[0]["net.0"]
    assert not np.isnan(got).any()
    with torch.no_grad():
        feats = model.eval().net[0](x)
    est = PSMI(
        n_estimators=64, seed=mon.direction_seed(0, 0), directions=mon.directions, return_full=False
    )
    want = est.fit_transform(feats, y)[0]
    np.testing.assert_allclose(got, want.double().numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------- 5: folders
def test_two_monitors_write_their_own_folders(tmp_path):
    a, b = monitor("net.0"), monitor("net.2")
    fit(tmp_path, [a, b])
    root = tmp_path / "lightning_memo" / "memorization"
    assert a.out_dir != b.out_dir
    for cb, layer, other in ((a, "net.0", "net.2"), (b, "net.2", "net.0")):
        assert os.path.dirname(cb.out_dir) == str(root) and layer in os.path.basename(cb.out_dir)
        cols = read_csv(os.path.join(cb.out_dir, "epoch_0.csv"))
        assert f"{layer}/psmi_mean" in cols and f"{other}/psmi_mean" not in cols
        assert len(cols["index"]) == 120
    files = [open(os.path.join(cb.out_dir, "epoch_0.csv")).read() for cb in (a, b)]
    assert files[0] != files[1]


def test_two_tracins_write_their_own_folders(tmp_path):
    a, b = (TracIn(layers=n, projection_dim=None, progress=False) for n in ("net.0", "net.4"))
    fit(tmp_path, [a, b])
    assert a.out_dir != b.out_dir
    si = [
        read_csv(os.path.join(cb.out_dir, "self_influence.csv"))["self_influence"] for cb in (a, b)
    ]
    np.testing.assert_allclose(si[0], a.self_influence.numpy(), rtol=1e-6)
    np.testing.assert_allclose(si[1], b.self_influence.numpy(), rtol=1e-6)
    assert not np.allclose(si[0], si[1])


def test_two_monitors_with_one_explicit_folder_are_refused(tmp_path):
    from lightning_memo.exceptions import OutputDirError

    out = str(tmp_path / "same")
    with pytest.raises(OutputDirError, match="same folder"):
        fit(tmp_path, [monitor("net.0", output_dir=out), monitor("net.2", output_dir=out)])


# ----------------------------------------------------------------------------- 6: stale influence
def test_influence_refuses_changed_weights(tmp_path):
    ia = InfluenceAnalysis(method="exact", layers="net.4", queries=query_loader(6, 3),
                           damping=0.05, progress=False)  # fmt: skip
    model = fit(tmp_path, [ia])
    ia.top_k_for(0)  # fine before the change
    with torch.no_grad():
        model.net[4].bias.add_(0.1)
    with pytest.raises(RuntimeError, match=r"(?s)changed.*run\("):
        ia.group_influence([[0, 1, 2]])
    with pytest.raises(RuntimeError, match=r"(?s)changed.*run\("):
        ia.top_k_for(0)


# ----------------------------------------------------------------------------- 7: flatten width
class VariableWidthMLP(PSMLP):
    """``feat`` sees 8 input columns on full batches of 20, 6 on the shorter last batch."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Identity()

    def forward(self, x):
        w = 8 if x.shape[0] == 20 else 6
        return self.net(F.pad(self.feat(x[:, :w]), (0, 8 - w)))


def test_flatten_pooling_refuses_a_width_change_within_an_epoch(tmp_path):
    with pytest.raises(ValueError, match=r"(?s)'feat'.*width 6.*width 8"):
        fit(tmp_path, [monitor("feat", pooling="flatten")], model=VariableWidthMLP(),
            loader=make_loader(n=50))  # fmt: skip


# ----------------------------------------------------------------------------- 8: train/eval flags
class DropoutMLP(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.5))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x):
        return self.head(self.encoder(x))

    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


def dropout_fit(tmp_path, callbacks):
    """2 epochs with the encoder (and its dropout) in eval mode: (weights, modes before, after)."""
    L.seed_everything(0, verbose=False)
    model = DropoutMLP()
    model.encoder.eval()
    before = {n: m.training for n, m in model.named_modules()}
    fit(tmp_path, callbacks, epochs=2, model=model)
    return model.state_dict(), before, {n: m.training for n, m in model.named_modules()}


MODE_CALLBACKS = {
    "tracin": lambda: TracIn(layers="head.1", projection_dim=None, progress=False),
    "monitor_eval": lambda: monitor("encoder.0", source="eval"),
    "monitor_train": lambda: monitor("encoder.0", source="train"),
    "erasure_fit_end": lambda: ConceptErasure("encoder.0", when="fit_end", progress=False),
    "influence_ekfac": lambda: InfluenceAnalysis(method="ekfac", layers="head.1", progress=False),
}


@pytest.fixture(scope="module")
def dropout_baseline(tmp_path_factory):
    return dropout_fit(tmp_path_factory.mktemp("baseline"), [])


@pytest.mark.parametrize("name", list(MODE_CALLBACKS))
def test_callbacks_keep_each_module_mode_and_the_training(tmp_path, dropout_baseline, name):
    weights, before, after = dropout_fit(tmp_path, [MODE_CALLBACKS[name]()])
    base_weights, base_before, base_after = dropout_baseline
    assert not before["encoder.2"] and before["head.0"]
    assert base_after == base_before  # Lightning keeps each module's own mode
    assert after == before
    for k in base_weights:
        assert torch.equal(weights[k], base_weights[k]), k


# ----------------------------------------------------------------------------- 9: unwritable dir
WRITERS = {
    "tracin": lambda out: TracIn(layers="net.4", projection_dim=None, output_dir=out),
    "influence": lambda out: InfluenceAnalysis(method="ekfac", layers="net.4", output_dir=out),
    "erasure": lambda out: ConceptErasure("net.0", when="fit_end", output_dir=out),
    "monitor": lambda out: monitor(output_dir=out),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_unwritable_output_dir_fails_before_training(tmp_path, name):
    from lightning_memo.exceptions import OutputDirError

    model = PSMLP()
    with pytest.raises(OutputDirError, match="output_dir"):
        fit(tmp_path, [WRITERS[name](unwritable(tmp_path))], model=model)
    assert model.steps == 0


# ----------------------------------------------------------------------------- 10-11: small fixes
def test_influence_damping_auto_is_refused():
    with pytest.raises(ValueError, match=r"damping='auto'.*None"):
        InfluenceAnalysis(damping="auto")


def test_result_files_are_0644_and_atomic(tmp_path):
    from lightning_memo.io import atomic_torch_save, atomic_write_csv

    old = os.umask(0o022)
    try:
        atomic_write_csv(str(tmp_path / "a.csv"), ["i", "v"], [[0, 1.5], [1, float("nan")]])
        obj = {"w": torch.arange(6.0).reshape(2, 3), "n": 3}
        atomic_torch_save(obj, str(tmp_path / "b.pt"))
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["a.csv", "b.pt"]  # no temp file left
    for f in ("a.csv", "b.pt"):
        assert stat.S_IMODE(os.stat(tmp_path / f).st_mode) == 0o644, f
    back = torch.load(tmp_path / "b.pt", weights_only=False)
    assert back["n"] == 3 and torch.equal(back["w"], obj["w"])
    assert (tmp_path / "a.csv").read_text().splitlines() == ["i,v", "0,1.5", "1,"]


# ----------------------------------------------------------------------------- 12-16: monitor
def test_fresh_run_into_the_same_folder_leaves_no_stale_epoch_files(tmp_path):
    out = str(tmp_path / "out")
    fit(tmp_path, [monitor(output_dir=out)], epochs=3)
    assert {f"epoch_{e}.csv" for e in range(3)} <= set(os.listdir(out))
    fit(tmp_path, [monitor(output_dir=out)], epochs=1)
    assert sorted(f for f in os.listdir(out) if f.startswith("epoch_")) == ["epoch_0.csv"]


class DictBatches(Dataset):
    """Dict items with a key the model's forward does not take."""

    def __init__(self, n=60):
        self.x, self.y = make_data(n)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "token_type_ids": torch.zeros(4), "label": self.y[i]}


class DictMLP(PSMLP):
    def training_step(self, batch, batch_idx):
        self.steps += 1
        return F.cross_entropy(self(batch["x"]), batch["label"])


def test_eval_pass_forward_failure_is_raised_at_the_first_batch(tmp_path):
    model = DictMLP()
    loader = DataLoader(IndexedDataset(DictBatches()), batch_size=20)
    with pytest.raises(ValueError, match=r"(?s)forward_fn.*token_type_ids"):
        fit(tmp_path, [monitor(source="eval")], model=model, loader=loader)
    assert model.steps == 0


def test_indices_repeated_across_batches_warn(tmp_path):
    x, y = make_data(40)
    loader = tuple_loader(x, y, batch_size=10, index=torch.arange(40) % 10)
    with pytest.warns(UserWarning, match="more than one batch"):
        fit(tmp_path, [monitor(num_samples=40)], loader=loader)


def test_integer_feature_dtype_is_refused():
    with pytest.raises(ValueError, match="feature_dtype"):
        MemorizationMonitor("net.0", feature_dtype=torch.int32)


def test_single_class_warns_that_psmi_is_zero(tmp_path):
    x, _ = make_data(40)
    loader = tuple_loader(x, torch.zeros(40, dtype=torch.long))
    with pytest.warns(UserWarning, match="0 by construction"):
        fit(tmp_path, [monitor()], loader=loader)


# ----------------------------------------------------------------------------- 17: resume folder
def test_resumed_run_writes_into_the_first_runs_folder(tmp_path):
    """Default TensorBoard logger: the resumed run's logger is version_1, the files stay in
    version_0's folder."""
    ck = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first, second = monitor(), monitor()
    fit(tmp_path, [first, ck], epochs=2, logger=True, enable_checkpointing=True)
    fit(tmp_path, [second], epochs=4, logger=True, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert "version_0" in first.out_dir
    assert second.out_dir == first.out_dir
    names = set(os.listdir(first.out_dir))
    assert {f"epoch_{e}.csv" for e in range(4)} <= names
