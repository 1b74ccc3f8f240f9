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

from lightning_memo import TracIn
from lightning_memo.influence import row_dot, row_sq_norm
from tests.callbacks.helpers import (
    SchedMLP,
    assert_same_attribution_files,
    fit_one_or_two_ranks,
    query_loader,
    read_csv,
    single_and_ddp_runs,
)
from tests.helpers import assert_close_rel

pytestmark = pytest.mark.slow

N = 120
N_QUERY = 10
TOP_K = 5
RTOL = 1e-6
CONFIGS = {  # name: TracIn keyword arguments
    "ckpt_exact": {"mode": "checkpoints", "projection_dim": None},
    "ckpt_proj": {"mode": "checkpoints", "projection_dim": 256},
    "online_exact": {"mode": "online", "projection_dim": None},
    "online_proj": {"mode": "online", "projection_dim": 256},
}


def _run(folder, devices, batch_size, epochs=3):
    """Fit with the four TracIn configurations (SchedMLP 8 -> 32 -> 32 -> 3, 1,443 gradient
    entries, lr 0.1 halved each epoch); rank-strided order, so one process with batches of 2 * b
    sees the union of the two ranks' batches of b (the averaged gradients are equal)."""
    L.seed_everything(0, verbose=False)
    queries = query_loader(N_QUERY, dtype=torch.float64)
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
    model = SchedMLP(hidden=32, lr=0.1).double()
    fit_one_or_two_ranks(folder, callbacks, model, devices, batch_size, n=N, epochs=epochs)


runs = single_and_ddp_runs(_run)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_self_influence_and_top_k_equal_single_process(runs, name):
    single, ddp = (r / name for r in runs)
    a, b, ta, tb = assert_same_attribution_files(single, ddp, N, RTOL)
    np.testing.assert_array_equal(a["rank"], b["rank"])
    assert len(tb["query"]) == N_QUERY * TOP_K
    for key in ("proponent_score", "opponent_score"):
        assert_close_rel(tb[key], ta[key], RTOL)

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
        assert_close_rel(b["state"]["grads"][c], a["state"]["grads"][c], RTOL)
        assert b["query_grads"][c].shape == a["query_grads"][c].shape
        assert_close_rel(b["query_grads"][c], a["query_grads"][c], RTOL)
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
    assert_close_rel(sb, sa, RTOL)
    # and the self-influence in the csv is sum_c ||g_c||^2 of the stored rows
    want = sum(row_sq_norm(g.double(), lay) for g in a["state"]["grads"])
    assert_close_rel(read_csv(ddp / "self_influence.csv")["self_influence"], want, RTOL)
