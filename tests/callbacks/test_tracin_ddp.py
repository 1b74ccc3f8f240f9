"""TracIn under DDP (2 CPU processes, ddp_spawn, gloo) equals the single-process run.

One Trainer per world size carries four TracIn instances (checkpoints exact / projected, online
exact / projected; their state keys differ), so each world size costs one fit (one spawn). The
callbacks' state does not come back from spawned processes: the files rank 0 writes are compared.
Also covers: the labels of every rank's samples reach rank 0's files, and two online instances in
one Trainer do not record each other's query passes.
"""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_memo import IndexedDataset, TracIn
from lightning_memo.influence import row_dot, row_sq_norm
from tests.callbacks.helpers import (
    RankStrided,
    TinyMLP,
    fit_retrying_abort,
    make_data,
    read_csv,
    trainer,
)

pytestmark = pytest.mark.slow

N = 120
N_QUERY = 10
TOP_K = 5
CONFIGS = {  # name: TracIn keyword arguments
    "ckpt_exact": {"mode": "checkpoints", "projection_dim": None},
    "ckpt_proj": {"mode": "checkpoints", "projection_dim": 256},
    "online_exact": {"mode": "online", "projection_dim": None},
    "online_proj": {"mode": "online", "projection_dim": 256},
}


class SchedMLP(TinyMLP):
    """TinyMLP (8 -> 32 -> 32 -> 3, 1,443 gradient entries), SGD + momentum, lr halved each
    epoch (so every checkpoint / step carries its own learning rate)."""

    def __init__(self):
        super().__init__(hidden=32, lr=0.1)

    def per_sample_loss(self, batch):  # the documented hook: picklable for ddp_spawn
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}


def _run(folder, devices, batch_size, epochs=3):
    """Fit with the four TracIn configurations; rank-strided order, so one process with batches of
    2 * b sees the union of the two ranks' batches of b (the averaged gradients are equal)."""
    L.seed_everything(0, verbose=False)
    xq, yq = make_data(N_QUERY, seed=1, dtype=torch.float64)
    queries = DataLoader(TensorDataset(xq, yq), batch_size=4)
    callbacks = [
        TracIn(
            queries=queries,
            top_k=TOP_K,
            seed=3,
            output_dir=str(folder / name),
            progress=False,
            **kw,
        )
        for name, kw in CONFIGS.items()
    ]
    assert len({cb.state_key for cb in callbacks}) == len(callbacks)
    kw = {"strategy": "ddp_spawn", "devices": 2} if devices == 2 else {}
    x, y = make_data(N, dtype=torch.float64)
    ds = IndexedDataset(TensorDataset(x, y))
    loader = DataLoader(ds, batch_size=batch_size, sampler=RankStrided(N))
    model = SchedMLP().double()
    init = {k: v.clone() for k, v in model.state_dict().items()}

    def fit():  # from the initial weights each time (ddp_spawn loads rank 0's back)
        model.load_state_dict(init)
        tr = trainer(folder, callbacks, max_epochs=epochs, use_distributed_sampler=False, **kw)
        tr.fit(model, loader)

    fit_retrying_abort(fit)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single = tmp_path_factory.mktemp("single")
    ddp = tmp_path_factory.mktemp("ddp")
    _run(single, 1, 40)
    _run(ddp, 2, 20)
    return single, ddp


def assert_close(got, want, rtol=1e-6):
    """Relative to the largest magnitude (scores near 0 are compared in absolute terms)."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_self_influence_and_top_k_equal_single_process(runs, name):
    single, ddp = (r / name for r in runs)
    a = read_csv(single / "self_influence.csv")
    b = read_csv(ddp / "self_influence.csv")
    assert len(b["index"]) == N
    np.testing.assert_array_equal(a["index"], np.arange(N))
    np.testing.assert_array_equal(b["index"], np.arange(N))
    # labels of both ranks' samples reach the file rank 0 writes
    np.testing.assert_array_equal(b["label"], make_data(N)[1].numpy())
    np.testing.assert_array_equal(a["label"], b["label"])
    assert (a["self_influence"] > 0).all()
    assert_close(b["self_influence"], a["self_influence"])
    np.testing.assert_array_equal(a["rank"], b["rank"])

    ta, tb = read_csv(single / "top_k.csv"), read_csv(ddp / "top_k.csv")
    assert len(tb["query"]) == N_QUERY * TOP_K
    for key in ("query", "rank", "proponent", "opponent"):
        np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)
    for key in ("proponent_score", "opponent_score"):
        assert_close(tb[key], ta[key])

    ca = json.loads((single / "config.json").read_text())
    cb = json.loads((ddp / "config.json").read_text())
    assert ca == cb
    assert ca["mode"] == CONFIGS[name]["mode"]
    if CONFIGS[name]["projection_dim"] is None:
        assert ca["feature_dim"] == (9 + 32) + (33 + 32) + (33 + 3)  # factored [a | 1 | g]
    else:
        assert 128 < ca["feature_dim"] <= 256
    if ca["mode"] == "checkpoints":
        assert ca["checkpoints"] == 3 and ca["missing_samples"] == 0


@pytest.mark.parametrize("name", ["ckpt_exact", "ckpt_proj"])
def test_ddp_gradient_store_equals_single_process(runs, name):
    """Checkpoints mode: the stored train gradients and query gradients (hence every score, not
    only the top k) match row by row, at the same learning rates and steps."""
    single, ddp = (r / name for r in runs)
    a = torch.load(single / "store.pt")
    b = torch.load(ddp / "store.pt")
    # the learning rate is folded into the features (sqrt(lr) per layer); store weights are 1
    assert a["state"]["lrs"] == b["state"]["lrs"] == [1.0, 1.0, 1.0]
    assert a["state"]["steps"] == b["state"]["steps"] == [3, 6, 9]
    for c in range(3):
        assert bool(b["state"]["seen"][c].all())
        assert_close(b["state"]["grads"][c], a["state"]["grads"][c])
        assert b["query_grads"][c].shape == a["query_grads"][c].shape
        assert_close(b["query_grads"][c], a["query_grads"][c])
    # all n_query x N scores, recomputed from the stores
    lay = a["state"]["layout"]  # exact rows are factored per layer, projected rows are not
    assert (lay is None) == (name == "ckpt_proj") and b["state"]["layout"] == lay
    sa = sum(
        lr * row_dot(a["query_grads"][c].double(), a["state"]["grads"][c].double(), lay)
        for c, lr in enumerate(a["state"]["lrs"])
    )
    sb = sum(
        lr * row_dot(b["query_grads"][c].double(), b["state"]["grads"][c].double(), lay)
        for c, lr in enumerate(b["state"]["lrs"])
    )
    assert sa.shape == (N_QUERY, N)
    assert_close(sb, sa)
    # and the self-influence in the csv is sum_c ||g_c||^2 of the stored rows
    want = sum(row_sq_norm(g.double(), lay) for g in a["state"]["grads"])
    assert_close(read_csv(ddp / "self_influence.csv")["self_influence"], want)
