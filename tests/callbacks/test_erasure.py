"""ConceptErasure in real Trainer runs on tiny models, checked against independent LEACE fits."""

from __future__ import annotations

import collections
import copy
import json

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_memo import ConceptErasure, IndexedDataset, LeaceEraser, LeaceFitter
from tests.callbacks.helpers import TinyMLP, make_data, make_loader, read_csv, seeded_fit, trainer

pytestmark = pytest.mark.usefixtures("one_thread")

N = 120


# ---------------------------------------------------------------------------- helpers
class PredMLP(TinyMLP):
    """TinyMLP with predict / test steps returning (and keeping) the logits."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.test_outputs = []

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def test_step(self, batch, batch_idx):
        out = self(batch[0])
        self.test_outputs.append(out.detach().clone())
        return F.cross_entropy(out, batch[1])


def _cb(layers, tmp_path=None, **kw) -> ConceptErasure:
    kw.setdefault("progress", False)
    if tmp_path is not None:
        kw.setdefault("output_dir", str(tmp_path / "out"))
    return ConceptErasure(layers=layers, **kw)


def _fit(tmp_path, cb, epochs=2, **kw):
    return seeded_fit(tmp_path, cb, epochs=epochs, **kw)


def _ref(x, z, **kw) -> LeaceEraser:
    """Independent one-shot LEACE fit (the callback's defaults unless overridden)."""
    kw.setdefault("constrain_cov_trace", False)
    return LeaceFitter.fit(x, z, **kw).eraser


def _assert_same_eraser(a: LeaceEraser, b: LeaceEraser, atol=1e-5):
    """Same affine map: linear parts I - L R^T (sign-free) and biases agree."""
    assert a.dim == b.dim
    torch.testing.assert_close(a.P.double(), b.P.double(), rtol=0, atol=atol)
    torch.testing.assert_close(a.bias.double(), b.bias.double(), rtol=0, atol=atol)


def _cross_cov(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Cov(x, z): (d, k), z one-hot when it holds integer classes."""
    x = x.double().reshape(-1, x.shape[-1])
    if z.ndim == 1 and not z.is_floating_point():
        z = F.one_hot(z, int(z.max()) + 1)
    z = z.double().reshape(z.shape[0], -1)
    return (x - x.mean(0)).T @ (z - z.mean(0)) / (x.shape[0] - 1)


def _rel_cross_cov(erased, raw, z) -> float:
    return float(_cross_cov(erased, z).norm() / _cross_cov(raw, z).norm())


def _erased_output(cb: ConceptErasure, model: nn.Module, module: nn.Module, *inputs):
    """What the layer after ``module`` receives when ``cb``'s erasers are installed on ``model``:
    our own hook, registered after ConceptErasure's, records ``module``'s output of one no-grad
    forward pass of ``inputs``; both hooks are removed after."""
    out = []
    cb.install(model)
    handle = module.register_forward_hook(lambda m, i, o: out.append(o))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        handle.remove()
        cb.remove()
    return out[0]


# ---------------------------------------------------------------------------- 1. fit_start
def test_fit_start_erases_initial_activations_and_logs_probes(tmp_path):
    L.seed_everything(0, verbose=False)
    model = TinyMLP()
    init = copy.deepcopy(model)
    x, y = make_data()
    seen = {}

    class FirstBatch(Callback):  # what net.2 receives in the very first training step
        def on_train_start(self, trainer, pl_module):
            def pre(m, inputs):
                seen.setdefault("net.2", inputs[0].detach().clone())

            self.h = pl_module.net[2].register_forward_pre_hook(pre)

        def on_train_end(self, trainer, pl_module):
            self.h.remove()

    cb = _cb(["net.1"], constrain_cov_trace=False)  # default folder under trainer.log_dir
    logger = CSVLogger(str(tmp_path))
    _fit(tmp_path, [cb, FirstBatch()], model=model, epochs=2, logger=logger)

    # fitted once, on the activations of the INITIAL model
    with torch.no_grad():
        raw0 = init.net[:2](x)
    ref = _ref(raw0, y)
    _assert_same_eraser(cb.erasers["net.1"], ref, atol=1e-6)
    assert len(cb.history) == 1 and cb.history[0]["epoch"] == 0
    assert cb.history[0]["layers"]["net.1"]["n_rows"] == N
    # the initial model's fitting data, run through the model with our hooks: zero cross-cov
    erased = _erased_output(cb, init, init.net[1], x)
    assert _rel_cross_cov(erased, raw0, y) < 1e-6
    assert _rel_cross_cov(raw0, raw0, y) == pytest.approx(1.0)
    torch.testing.assert_close(erased, ref(raw0), rtol=0, atol=1e-6)
    # training ran on erased activations from its first step (batch 0 = samples 0..19)
    torch.testing.assert_close(seen["net.2"], ref(raw0[:20]), rtol=0, atol=1e-6)
    # probes: after = majority rate, before > majority; a nonzero edit
    majority = float(torch.bincount(y).max()) / N
    m = cb.metrics
    assert m["erasure/net.1/majority_rate"] == pytest.approx(majority)
    assert m["erasure/net.1/probe_acc_after"] == pytest.approx(majority, abs=1e-6)
    assert m["erasure/net.1/probe_acc_before"] > majority + 0.2
    edit = float((raw0 - ref(raw0)).square().sum(1).mean())
    assert m["erasure/net.1/edit_norm"] == pytest.approx(edit, rel=1e-4) and edit > 0
    # ... and the same numbers reached the logger
    csv = read_csv(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    for key, val in m.items():
        col = csv[key][~np.isnan(csv[key])]
        assert len(col) == 1 and col[0] == pytest.approx(val, abs=1e-6), key
    # files in the default folder: trainer.log_dir/lightning_memo/erasure
    out = tmp_path / "lightning_logs" / "version_0" / "lightning_memo" / "erasure"
    saved = torch.load(out / "erasers.pt")
    _assert_same_eraser(LeaceEraser.from_state_dict(saved["net.1"]), cb.erasers["net.1"], 0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layers"] == ["net.1"] and cfg["when"] == "fit_start"
    assert cfg["constrain_cov_trace"] is False
    hist = json.loads((out / "history.json").read_text())
    assert hist[0]["layers"]["net.1"]["n_rows"] == N


# ---------------------------------------------------------------------------- 2. sequential
@pytest.mark.parametrize("sequential", [True, False])
def test_sequential_fits_each_layer_with_the_previous_erased(tmp_path, sequential):
    L.seed_everything(0, verbose=False)
    model = TinyMLP()
    init = copy.deepcopy(model)
    cb = _cb(["net.1", "net.3"], tmp_path, constrain_cov_trace=False, sequential=sequential)
    _fit(tmp_path, cb, model=model, epochs=1)
    x, y = make_data()
    with torch.no_grad():
        a1 = init.net[:2](x)
        e1 = _ref(a1, y)
        _assert_same_eraser(cb.erasers["net.1"], e1, atol=1e-6)
        # input of net.3's fit: net.1 erased by the callback's own eraser (sequential) or raw
        a3 = init.net[2:4](cb.erasers["net.1"](a1) if sequential else a1)
        e3 = _ref(a3, y)
        other = _ref(init.net[2:4](a1 if sequential else cb.erasers["net.1"](a1)), y)
    _assert_same_eraser(cb.erasers["net.3"], e3, atol=1e-6)
    assert (cb.erasers["net.3"].P - other.P).abs().max() > 1e-3  # the two oracles differ
    assert len(cb.history) == (2 if sequential else 1)
    # sequential: in the erased network, net.3's output carries no linear trace of the concept
    rel = _rel_cross_cov(_erased_output(cb, init, init.net[3], x), a3, y)
    if sequential:
        assert rel < 1e-6
    else:  # fitted on the unerased network: erasing net.1 upstream breaks net.3's guarantee
        assert rel > 1e-4


# ---------------------------------------------------------------------------- 3. every_epoch
class Recorder(Callback):
    """Per training epoch: raw (pre-erasure) outputs of net.1 / net.3, what net.2 / net.4 receive
    (erased), the batch labels and indices, and a snapshot of the erasers at epoch end."""

    def __init__(self, model: TinyMLP, cb: ConceptErasure) -> None:
        self.cb, self.active, self.epoch = cb, False, 0
        self.rec = collections.defaultdict(list)
        self.snap = []
        # registered before fit, so before ConceptErasure's hooks: they see the raw outputs
        model.net[1].register_forward_hook(lambda m, i, o: self._add("raw.net.1", o))
        model.net[3].register_forward_hook(lambda m, i, o: self._add("raw.net.3", o))
        model.net[2].register_forward_pre_hook(lambda m, i: self._add("in.net.2", i[0]))
        model.net[4].register_forward_pre_hook(lambda m, i: self._add("in.net.4", i[0]))

    def _add(self, key, t):
        if self.active:
            self.rec[(self.epoch, key)].append(t.detach().clone())

    def get(self, epoch, key):
        return torch.cat(self.rec[(epoch, key)])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active, self.epoch = True, trainer.current_epoch
        self._add("y", batch[1])
        self._add("index", batch[2])

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.active = False

    def on_train_epoch_end(self, trainer, pl_module):  # runs after ConceptErasure's
        self.snap.append({k: e.to(dtype=torch.float64) for k, e in self.cb.erasers.items()})


@pytest.mark.parametrize("lr", [0.0, 0.05])
def test_every_epoch_refits_on_each_epochs_training_activations(tmp_path, lr):
    L.seed_everything(0, verbose=False)
    model = TinyMLP(lr=lr)
    init = copy.deepcopy(model)
    cb = _cb(["net.1", "net.3"], tmp_path, when="every_epoch", constrain_cov_trace=False)
    rec = Recorder(model, cb)
    _fit(tmp_path, [cb, rec], model=model, epochs=3, loader=make_loader(shuffle=True))
    assert [h["epoch"] for h in cb.history] == [0, 1, 2] and len(rec.snap) == 3
    # epoch 0 trains unerased
    for layer, nxt in (("net.1", "in.net.2"), ("net.3", "in.net.4")):
        assert torch.equal(rec.get(0, f"raw.{layer}"), rec.get(0, nxt))
    for e in range(3):
        y = rec.get(e, "y")
        assert sorted(rec.get(e, "index").tolist()) == list(range(N))
        for layer in ("net.1", "net.3"):
            # the eraser fitted at epoch e == LEACE of that epoch's (pre-erasure) activations
            _assert_same_eraser(rec.snap[e][layer], _ref(rec.get(e, f"raw.{layer}"), y), 1e-5)
            assert cb.history[e]["layers"][layer]["n_rows"] == N
            assert cb.history[e]["layers"][layer]["probe_acc_after"] == pytest.approx(1 / 3)
        if e > 0:  # ... and it is applied from the next epoch on
            prev = rec.snap[e - 1]
            for layer, nxt in (("net.1", "in.net.2"), ("net.3", "in.net.4")):
                want = prev[layer](rec.get(e, f"raw.{layer}").double())
                torch.testing.assert_close(rec.get(e, nxt).double(), want, rtol=0, atol=1e-5)
    # the final eraser is the refit on the last epoch's recorded activations
    for layer in ("net.1", "net.3"):
        _assert_same_eraser(cb.erasers[layer], _ref(rec.get(2, f"raw.{layer}"), rec.get(2, "y")))
    # net.3's statistics of epoch 1 were taken with net.1 erased upstream: its eraser moved
    assert (rec.snap[1]["net.3"].P - rec.snap[0]["net.3"].P).abs().max() > 1e-3
    x, y = make_data()
    if lr == 0:  # fixed weights: net.1 sees the same data every epoch (nothing upstream)
        with torch.no_grad():
            ref1 = _ref(init.net[:2](x), y)
        for e in range(3):
            _assert_same_eraser(rec.snap[e]["net.1"], ref1, 1e-5)
        _assert_same_eraser(rec.snap[2]["net.3"], rec.snap[1]["net.3"], 1e-5)
    else:  # training moves the weights: a new eraser each epoch
        for e in range(2):
            assert (rec.snap[e + 1]["net.1"].P - rec.snap[e]["net.1"].P).abs().max() > 1e-4


# ---------------------------------------------------------------------------- 4. fit_end
def test_fit_end_leaves_training_alone_and_erases_test_and_predict(tmp_path):
    cb = _cb(["net.1"], tmp_path, when="fit_end", constrain_cov_trace=False)
    L.seed_everything(0, verbose=False)
    model = PredMLP()
    tr, _ = _fit(tmp_path / "a", cb, model=model, epochs=2, loader=make_loader(shuffle=True))
    L.seed_everything(0, verbose=False)
    plain = PredMLP()
    _fit(tmp_path / "b", [], model=plain, epochs=2, loader=make_loader(shuffle=True))
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka  # training identical to a run without it
    x, y = make_data()
    with torch.no_grad():
        raw = model.net[:2](x)
        ref = _ref(raw, y)  # fitted on the FINAL model
        want = model.net[2:](ref(raw))
        unerased = model(x)  # teardown removed the hooks
    _assert_same_eraser(cb.erasers["net.1"], ref, 1e-6)
    assert cb.history[0]["epoch"] == tr.current_epoch - 1 == 1  # at the end of the last epoch
    assert not model.net[1]._forward_hooks
    preds = torch.cat(tr.predict(model, make_loader()))
    torch.testing.assert_close(preds, want, rtol=0, atol=1e-5)
    assert (preds - unerased).abs().max() > 1e-2
    tr.test(model, make_loader(), verbose=False)
    torch.testing.assert_close(torch.cat(model.test_outputs), want, rtol=0, atol=1e-5)
    assert not model.net[1]._forward_hooks
    assert len(cb.history) == 1  # test / predict do not refit


# ---------------------------------------------------------------------------- 5. hooks
def test_remove_restores_original_outputs_exactly(tmp_path):
    cb = _cb(["net.1", "net.3"], tmp_path)
    _, model = _fit(tmp_path, cb, epochs=1)
    assert not model.net[1]._forward_hooks and not model.net[3]._forward_hooks  # teardown
    x, _ = make_data()
    with torch.no_grad():
        raw = model(x)
        cb.install(model)
        cb.install(model)  # idempotent
        assert len(model.net[1]._forward_hooks) == 1 and len(model.net[3]._forward_hooks) == 1
        erased = model(x)
        cb.remove()
        again = model(x)
    assert (erased - raw).abs().max() > 1e-2
    assert torch.equal(again, raw)
    assert not model.net[1]._forward_hooks and not model.net[3]._forward_hooks


class Boom(TinyMLP):
    def training_step(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("when", ["fit_start", "every_epoch"])
def test_exception_in_training_step_removes_hooks(tmp_path, when):
    cb = _cb(["net.1"], tmp_path, when=when)
    model = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, cb, model=model, epochs=3)
    assert "net.1" in cb.erasers  # it was erasing when the step failed
    assert not model.net[1]._forward_hooks and cb._handles == []
    assert cb._collect == {} and cb._z is None


# ---------------------------------------------------------------------------- 6. checkpoint
def _ckpt_run(folder, when, epochs, seed=0, ckpt_path=None):
    L.seed_everything(seed, verbose=False)
    model = PredMLP()
    cb = _cb(["net.1"], folder, when=when)
    ck = ModelCheckpoint(dirpath=str(folder / "ckpt"), save_top_k=-1, save_last=True)
    L.seed_everything(0, verbose=False)
    tr = trainer(folder, [cb, ck], max_epochs=epochs, enable_checkpointing=True)
    tr.fit(model, make_loader(), ckpt_path=ckpt_path)
    return model, cb


def _erased_outputs(model, cb, x):
    cb.install(model)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        cb.remove()


@pytest.mark.parametrize("when", ["fit_start", "every_epoch"])
def test_checkpoint_resume_load_and_predict(tmp_path, when):
    x, _ = make_data()
    full, cb_full = _ckpt_run(tmp_path / "full", when, epochs=4)
    want = _erased_outputs(full, cb_full, x)
    ckpts = sorted(p.name for p in (tmp_path / "full" / "ckpt").iterdir())
    assert ckpts == [f"epoch={e}-step={6 * (e + 1)}.ckpt" for e in range(4)] + ["last.ckpt"]
    # files under the output folder
    out = tmp_path / "full" / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "erasers.pt", "history.json"]
    saved = torch.load(out / "erasers.pt")
    _assert_same_eraser(LeaceEraser.from_state_dict(saved["net.1"]), cb_full.erasers["net.1"], 0)
    assert len(json.loads((out / "history.json").read_text())) == len(cb_full.history)

    # (a) resume after epoch 1 from a differently initialised model: same run, same erasers
    mid = str(tmp_path / "full" / "ckpt" / "epoch=1-step=12.ckpt")
    res, cb_res = _ckpt_run(tmp_path / "res", when, epochs=4, seed=1, ckpt_path=mid)
    for (k, a), b in zip(full.state_dict().items(), res.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    _assert_same_eraser(cb_res.erasers["net.1"], cb_full.erasers["net.1"], 1e-6)
    assert cb_res.history == cb_full.history
    torch.testing.assert_close(_erased_outputs(res, cb_res, x), want, rtol=0, atol=1e-6)

    # (b) load_from_checkpoint + ConceptErasure.from_checkpoint, outside any Trainer
    last = str(tmp_path / "full" / "ckpt" / "last.ckpt")
    loaded = PredMLP.load_from_checkpoint(last)
    cb_ld = ConceptErasure.from_checkpoint(last, layers=["net.1"], when=when, progress=False)
    with torch.no_grad():
        cb_ld.install(loaded)
        got = loaded(x)
        cb_ld.remove()
    assert torch.equal(got, want)
    assert cb_ld.fitted_epoch == cb_full.fitted_epoch and cb_ld.history == cb_full.history
    other = "fit_end" if when != "fit_end" else "fit_start"
    with pytest.raises(KeyError, match="same layers= and when="):
        ConceptErasure.from_checkpoint(last, layers=["net.1"], when=other)

    # (c) trainer.predict with a fresh callback restores the erasers from ckpt_path
    L.seed_everything(3, verbose=False)
    fresh = _cb(["net.1"], tmp_path / "pred", when=when)
    tr = trainer(tmp_path / "pred", [fresh])
    preds = torch.cat(tr.predict(PredMLP(), make_loader(), ckpt_path=last))
    torch.testing.assert_close(preds, want, rtol=0, atol=1e-6)
    assert "net.1" in fresh.erasers and len(fresh.history) == len(cb_full.history)


# ---------------------------------------------------------------------------- 7. concepts
class DictData(Dataset):
    def __init__(self, x, y, g):
        self.x, self.y, self.g = x, y, g

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "label": self.y[i], "group": self.g[i]}


class DictMLP(TinyMLP):
    def forward(self, x):  # only x: the concept key must not be passed as an argument
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["x"]), batch["label"])


def _group(x):
    return (x[:, 0] + 0.5 * x[:, 1] > 0).long()


@pytest.mark.parametrize(
    "source", ["dict_key", "tuple_position", "callable", "continuous", "label_key"]
)
def test_concept_sources(tmp_path, source):
    x, y = make_data()
    g = _group(x)
    L.seed_everything(0, verbose=False)
    keys = {}
    if source == "label_key":  # concept=None reads the label with label_key=; the default
        # forward leaves the label_key= and index_key= entries out of module(**batch)
        model, concept, z = DictMLP(), None, g
        keys = {"label_key": "group", "index_key": "idx"}
        loader = DataLoader(IndexedDataset(DictData(x, y, g), index_key="idx"), batch_size=20)
    elif source == "dict_key":
        model, concept, z = DictMLP(), "group", g
        loader = DataLoader(IndexedDataset(DictData(x, y, g)), batch_size=20)
    elif source == "tuple_position":
        model, concept, z = TinyMLP(), 2, g
        loader = DataLoader(IndexedDataset(TensorDataset(x, y, g)), batch_size=20)
    elif source == "callable":
        model, z = TinyMLP(), g
        concept = lambda b: b[0][:, 0] + 0.5 * b[0][:, 1] > 0  # noqa: E731  (bool -> classes)
        loader = make_loader()
    else:
        model, z = TinyMLP(), x[:, :2]
        concept = lambda b: b[0][:, :2]  # noqa: E731  float (B, 2): continuous, z_dim inferred
        loader = make_loader()
    init = copy.deepcopy(model)
    cb = _cb(["net.1"], tmp_path, concept=concept, constrain_cov_trace=False, **keys)
    _fit(tmp_path, cb, model=model, epochs=1, loader=loader)
    with torch.no_grad():
        raw = init.net[:2](x)
    ref = _ref(raw, z)
    _assert_same_eraser(cb.erasers["net.1"], ref, 1e-6)
    assert _rel_cross_cov(ref(raw), raw, z) < 1e-6
    m = cb.metrics
    if source == "continuous":
        assert ref.rank == 2
        assert m["erasure/net.1/probe_r2_before"] > 0.5
        assert abs(m["erasure/net.1/probe_r2_after"]) < 1e-6
        assert "erasure/net.1/probe_acc_after" not in m
    else:
        majority = float(torch.bincount(g).max()) / N
        assert m["erasure/net.1/majority_rate"] == pytest.approx(majority)
        assert m["erasure/net.1/probe_acc_after"] == pytest.approx(majority, abs=1e-6)
        assert m["erasure/net.1/probe_acc_before"] > majority + 0.1


# ---------------------------------------------------------------------------- 8. sequences
class SeqData(Dataset):
    def __init__(self, n=64, t=7, vocab=12, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.label = torch.arange(n) % 2
        lengths = torch.randint(3, t + 1, (n,), generator=gen)
        self.mask = (torch.arange(t)[None] < lengths[:, None]).long()
        low = torch.randint(1, vocab // 2 + 2, (n, t), generator=gen)
        high = torch.randint(vocab // 2 - 1, vocab, (n, t), generator=gen)
        self.ids = torch.where(self.label[:, None] == 1, high, low) * self.mask  # pad id 0

    def __len__(self):
        return len(self.label)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "label": self.label[i]}


class SeqModel(L.LightningModule):
    """Embedding -> enc (B, T, d) -> masked mean -> head; dict batches."""

    def __init__(self, vocab=12, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.Linear(d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.enc(self.emb(input_ids)))
        w = attention_mask.unsqueeze(-1).float()
        return self.head((h * w).sum(1) / w.sum(1))

    def training_step(self, batch, batch_idx):
        out = self(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(out, batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("pooling", ["all", "mean"])
def test_sequence_pooling_fits_on_real_tokens_and_erases_every_position(tmp_path, pooling):
    data = SeqData()
    L.seed_everything(0, verbose=False)
    model = SeqModel()
    init = copy.deepcopy(model)
    cb = _cb(["enc"], tmp_path, pooling=pooling, constrain_cov_trace=False)
    loader = DataLoader(IndexedDataset(data), batch_size=16)
    _fit(tmp_path, cb, model=model, epochs=1, loader=loader)
    mask, y = data.mask, data.label
    with torch.no_grad():
        raw = init.enc(init.emb(data.ids))  # (B, T, d)
    if pooling == "all":
        rows, z = raw[mask.bool()], y.repeat_interleave(mask.sum(1))
    else:
        w = mask.unsqueeze(-1).float()
        rows, z = (raw * w).sum(1) / w.sum(1), y
    assert cb.history[0]["layers"]["enc"]["n_rows"] == rows.shape[0]
    assert rows.shape[0] == (int(mask.sum()) if pooling == "all" else len(y))
    ref = _ref(rows, z)
    _assert_same_eraser(cb.erasers["enc"], ref, 1e-6)
    assert _rel_cross_cov(ref(rows), rows, z) < 1e-6
    # applied at every position, padding included
    out = _erased_output(cb, init, init.enc, data.ids, data.mask)
    assert out.shape == raw.shape
    torch.testing.assert_close(out, ref(raw), rtol=0, atol=1e-6)
    pad = ~mask.bool()
    assert pad.any() and (out[pad] - raw[pad]).abs().max() > 1e-3


# ---------------------------------------------------------------------------- 9. tuple outputs
Pair = collections.namedtuple("Pair", ["hidden", "aux"])


class Block(nn.Module):
    def __init__(self, d, named=False):
        super().__init__()
        self.lin, self.named = nn.Linear(d, d), named

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        aux = h.sum(-1)
        return Pair(h, aux) if self.named else (h, aux)


class TupleMLP(TinyMLP):
    def __init__(self, named=False):
        super().__init__()
        self.block = Block(8, named)

    def forward(self, x):
        h, _ = self.block(x)
        return self.net(h)


@pytest.mark.parametrize("named", [False, True])
def test_tuple_output_erases_hidden_states_by_default(tmp_path, named):
    # output_key=None (default): the first tensor of a tuple; output_index= is its deprecated name
    with pytest.warns(DeprecationWarning, match="output_index"):
        assert _cb(["block"], tmp_path, output_index=0).output_key == 0
    with pytest.raises(ValueError, match="pass output_key= only"):
        _cb(["block"], tmp_path, output_index=0, output_key=0)
    L.seed_everything(0, verbose=False)
    model = TupleMLP(named)
    init = copy.deepcopy(model)
    cb = _cb(["block"], tmp_path, constrain_cov_trace=False)
    _fit(tmp_path, cb, model=model, epochs=1)
    x, y = make_data()
    with torch.no_grad():
        h, aux = init.block(x)
    ref = _ref(h, y)
    _assert_same_eraser(cb.erasers["block"], ref, 1e-6)
    out = _erased_output(cb, init, init.block, x)
    assert type(out) is (Pair if named else tuple) and len(out) == 2
    torch.testing.assert_close(out[0], ref(h), rtol=0, atol=1e-6)
    assert torch.equal(out[1], aux)  # the other element is left as it was


# ---------------------------------------------------------------------------- 10. bad input
def test_concept_missing_from_batch(tmp_path):
    x, y = make_data()
    loader = DataLoader(IndexedDataset(DictData(x, y, _group(x))), batch_size=20)
    cb = _cb(["net.1"], tmp_path, concept="colour")
    with pytest.raises(ValueError, match=r"no concept in the batch.*'colour'.*pass concept="):
        _fit(tmp_path, cb, model=DictMLP(), epochs=1, loader=loader)


@pytest.mark.parametrize("when", ["fit_start", "every_epoch"])
def test_float_vector_concept_needs_z_dim(tmp_path, when):
    cb = _cb(["net.1"], tmp_path, when=when, concept=lambda b: b[0][:, 0])
    with pytest.raises(ValueError, match=r"float vector \(B,\): pass z_dim=1"):
        _fit(tmp_path, cb, epochs=1)
    # with z_dim=1 it is a continuous concept
    cb = _cb(["net.1"], tmp_path, when=when, z_dim=1, concept=lambda b: b[0][:, 0])
    _fit(tmp_path, cb, epochs=1)
    assert cb.erasers["net.1"].rank == 1
    assert abs(cb.metrics["erasure/net.1/probe_r2_after"]) < 1e-6


def test_loaded_eraser_dimension_mismatch(tmp_path):
    g = torch.Generator().manual_seed(0)
    eraser = LeaceEraser.fit(torch.randn(50, 16, generator=g), torch.arange(50) % 3)
    state = {"erasers": {"net.1": eraser.state_dict()}, "fitted_epoch": 0, "history": []}
    cb = _cb(["net.1"], tmp_path)
    cb.load_state_dict(state)
    small = TinyMLP(hidden=12)
    cb.install(small)
    x, _ = make_data()
    with pytest.raises(ValueError, match=r"'net\.1' was fitted on 16 features.*outputs 12"):
        small(x)
    cb.remove()
    # the same inside a Trainer (fit_start keeps loaded erasers): error, and no hook left behind
    cb = _cb(["net.1"], tmp_path)
    cb.load_state_dict(state)
    with pytest.raises(ValueError, match=r"fitted on 16 features"):
        _fit(tmp_path, cb, model=small, epochs=1)
    assert not small.net[1]._forward_hooks


def test_fewer_samples_than_classes(tmp_path):
    x, _ = make_data(n=2)
    tiny = DataLoader(IndexedDataset(TensorDataset(x, torch.tensor([0, 2]))), batch_size=2)
    cb = _cb(["net.1"], tmp_path, fit_on=tiny)
    with pytest.raises(ValueError, match=r"at least max\(2, z_dim=3\) samples.*seen 2"):
        _fit(tmp_path, cb, epochs=1)


def test_nan_activations(tmp_path):
    x, y = make_data()
    x[7, 3] = float("nan")
    bad = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=20)
    cb = _cb(["net.1"], tmp_path, fit_on=bad)
    with pytest.raises(ValueError, match=r"'net\.1' produced 1 NaN/inf activation rows"):
        _fit(tmp_path, cb, epochs=1)


def test_fit_on_a_given_loader(tmp_path):
    """fit_on=<DataLoader>: statistics come from that loader, not from the training set."""
    x, y = make_data(n=60, seed=5)
    other = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=16, shuffle=True)
    L.seed_everything(0, verbose=False)
    model = TinyMLP()
    init = copy.deepcopy(model)
    cb = _cb(["net.1"], tmp_path, fit_on=other, constrain_cov_trace=False, max_batches=2)
    _fit(tmp_path, cb, model=model, epochs=1)
    with torch.no_grad():  # sequential over `other`, first 2 batches of 16
        ref = _ref(init.net[:2](x[:32]), y[:32])
    _assert_same_eraser(cb.erasers["net.1"], ref, 1e-6)
    assert cb.history[0]["layers"]["net.1"]["n_rows"] == 32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"when": "every_step"}, r"when='every_step': use one of fit_start, every_epoch"),
        ({"pooling": "max"}, r"pooling='max' is not supported; use one of all, mean"),
        ({"fit_on": "val"}, r"fit_on='val': use 'train' or a DataLoader"),
        ({"fit_on": 3}, r"fit_on=3: use 'train' or a DataLoader"),
        ({"method": "svd"}, r"method='svd'"),
        ({"z_dim": 0}, r"z_dim=0"),
        ({"layers": []}, r"layers=\[\] is empty"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"layers": ["net.1"], **kwargs}
    with pytest.raises(ValueError, match=match):
        ConceptErasure(**kwargs)


def test_keyword_only_after_layers():
    with pytest.raises(TypeError, match="positional"):
        ConceptErasure(["net.1"], 2)


def test_edit_norm_equals_a_loop():
    """leace.edit_norm (the logged erasure/<layer>/edit_norm) = mean_i sum_j (x_ij - r_ij)^2."""
    from lightning_memo.leace import edit_norm

    x, y = make_data()
    eraser = _ref(x, y)
    erased = eraser(x)
    want = (
        sum(
            sum((float(x[i, j]) - float(erased[i, j])) ** 2 for j in range(x.shape[1]))
            for i in range(x.shape[0])
        )
        / x.shape[0]
    )
    got = edit_norm(x, erased)
    assert got.ndim == 0 and float(got) == pytest.approx(want, rel=1e-5) and want > 0
    assert float(edit_norm(x, x)) == 0.0
    with pytest.raises(ValueError, match="row for row"):
        edit_norm(x, erased[:5])


@pytest.mark.parametrize(
    "bar, progress, shown",
    [(False, None, False), (True, None, True), (False, True, True), (True, False, False)],
)
def test_progress_follows_the_trainer(tmp_path, capfd, bar, progress, shown):
    """The fitting pass's bar: progress=None follows Trainer(enable_progress_bar=...)."""
    cb = ConceptErasure(layers=["net.1"], probe=False, progress=progress)
    capfd.readouterr()
    _fit(tmp_path, cb, epochs=1, enable_progress_bar=bar)
    assert ("ConceptErasure: fitting net.1" in capfd.readouterr().err) == shown


def test_fit_end_erasers_are_in_the_model_checkpoint(tmp_path):
    """fit_end fits at the end of the last epoch, before ModelCheckpoint saves it."""
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)
    cb = ConceptErasure(layers=["net.3"], when="fit_end", probe=False)
    L.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, [cb, ckpt], max_epochs=2, enable_checkpointing=True)
    tr.fit(TinyMLP(), make_loader())
    state = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["callbacks"][cb.state_key]
    saved = state["erasers"]["net.3"]
    torch.testing.assert_close(saved["left"], cb.erasers["net.3"].left.cpu())
    again = ConceptErasure.from_checkpoint(
        str(tmp_path / "ck" / "last.ckpt"), layers="net.3", when="fit_end"
    )  # "net.3" and ["net.3"] name the same state
    assert set(again.erasers) == {"net.3"}


# ---------------------------------------------------------------------------- fitting pass cost
class TwiceMLP(TinyMLP):
    """net.1 (Tanh) applied twice per forward (a shared module)."""

    def forward(self, x):
        h = self.net[1](self.net[0](x))
        return self.net[4](self.net[3](self.net[2](self.net[1](h))))


@pytest.mark.parametrize("model_cls", [TinyMLP, TwiceMLP])
def test_fitting_pass_stops_after_the_fitted_layer(tmp_path, model_cls):
    """The fitting pass's forwards end once the fitted layer has its rows (the layers after it
    run only in the first batch's forward), unless the layer runs twice per forward: then every
    forward runs whole and both calls' rows are fitted. The eraser equals LEACE on the rows."""
    L.seed_everything(0, verbose=False)
    model = model_cls()
    init = copy.deepcopy(model)
    x, y = make_data()
    calls = collections.Counter()

    class CountLast(Callback):  # forwards of the last layer during the fitting pass (no grad)
        def setup(self, trainer, pl_module, stage):
            def hook(m, inputs, out):
                if not torch.is_grad_enabled():
                    calls["fit"] += 1

            pl_module.net[4].register_forward_hook(hook)

    cb = _cb(["net.1"], tmp_path, constrain_cov_trace=False, probe=False)
    _fit(tmp_path, [CountLast(), cb], model=model, epochs=1)
    batches = -(-N // 20)
    with torch.no_grad():
        if model_cls is TwiceMLP:
            h = init.net[:2](x)
            rows = torch.cat(
                [torch.cat([h[i : i + 20], init.net[1](h[i : i + 20])]) for i in range(0, N, 20)]
            )
            z = torch.cat([torch.cat([y[i : i + 20], y[i : i + 20]]) for i in range(0, N, 20)])
            assert calls["fit"] == batches  # every forward whole
        else:
            rows, z = init.net[:2](x), y
            assert calls["fit"] == 1  # only the first batch's forward reached the last layer
    _assert_same_eraser(cb.erasers["net.1"], _ref(rows, z), atol=1e-6)
