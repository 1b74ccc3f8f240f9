"""Geometric-ensemble influence (GEX) vs a brute-force loop over the stored members, a hand-written
SGD replay of the fine-tuning schedule, and the first-order (Laplace-like) limit g_q^T S g_z."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_memo.influence.methods import (
    GeometricEnsembleInfluence,
    lr_schedule,
    query_matrix,
    train_pass,
)
from tests.helpers import ce_loss, mlp

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def sq_loss(model, batch):
    return (model(batch[0]) - batch[1]).square().reshape(-1)


def regression(n=48, d=4, seed=0):
    """A linear regression fitted to its least-squares optimum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = x @ torch.randn(d, 1, generator=g, dtype=DT) + 0.3 * torch.randn(
        n, 1, generator=g, dtype=DT
    )
    lin = nn.Linear(d, 1).to(DT)
    xa = torch.cat([x, torch.ones(n, 1, dtype=DT)], dim=1)
    sol = torch.linalg.lstsq(xa, y).solution
    with torch.no_grad():
        lin.weight.copy_(sol[:d].T)
        lin.bias.copy_(sol[d])
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]
    return lin, x, y, batches


def classifier(seed=0, n=40):
    model = mlp((3, 8, 3), seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y, [(x[i : i + 10], y[i : i + 10]) for i in range(0, n, 10)]


def fit(model, loss_fn, batches, params=None, **kw):
    params = dict(model.named_parameters()) if params is None else params
    return GeometricEnsembleInfluence(**kw).fit(model, params, loss_fn, batches)


def brute_losses(model, loss_fn, members, batch):
    """(B, E) per-sample losses of each member, loaded into a deep copy of the model."""
    cols = []
    for m in members:
        clone = copy.deepcopy(model)
        named = dict(clone.named_parameters())
        with torch.no_grad():
            for k, v in m.items():
                named[k].copy_(v)
            cols.append(loss_fn(clone, batch).double())
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("center", ["trained", "mean"])
def test_rows_reproduce_brute_force_covariance(center):
    model, x, y, batches = classifier()
    gex = fit(model, ce_loss, batches, num_ens=5, ft_lr=0.05, ft_step=6, center=center)
    assert len(gex.members) == 5
    losses = brute_losses(model, ce_loss, gex.members, (x, y)).numpy()  # (n, E)
    with torch.no_grad():
        ref = ce_loss(model, (x, y)).double().numpy()
    if center == "mean":
        want = np.cov(losses)  # ddof=1 covariance of the losses across the ensemble
    else:
        dev = losses - ref[:, None]
        want = dev @ dev.T / losses.shape[1]
    q, z = gex.query_rows_batch((x[:7], y[:7])), gex.train_rows_batch((x, y))
    assert q.dtype == DT and z.shape == (x.shape[0], 5)
    got = (q @ z.T).numpy()
    np.testing.assert_allclose(got, want[:7], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(gex.self_influence_batch((x, y)).numpy(), np.diag(want), rtol=1e-10)
    np.testing.assert_allclose(
        gex.scores_batch((x[:7], y[:7]), (x, y)).numpy(), want[:7], rtol=1e-10
    )


def test_loss_floor_as_gex_eps():
    model, x, y, batches = classifier()
    gex = fit(model, ce_loss, batches, num_ens=3, ft_step=3, loss_floor=5.0)
    losses = brute_losses(model, ce_loss, gex.members, (x, y))
    want = ((losses - 5.0).square().mean(dim=1)).numpy()  # every loss is below the floor
    np.testing.assert_allclose(gex.self_influence_batch((x, y)).numpy(), want, rtol=1e-10)


def _sgd_replay(model, params, loss_fn, batch, lrs, num_ens, momentum, start, clip=None):
    """Members by hand: torch.optim.SGD with a fresh optimizer (momentum reset) per cycle."""
    work = copy.deepcopy(model)
    named = dict(work.named_parameters())
    for k, p in named.items():
        p.requires_grad_(k in params)
    trained = {k: named[k].detach().clone() for k in params}
    members = []
    for _ in range(num_ens):
        if start == "trained":
            with torch.no_grad():
                for k in params:
                    named[k].copy_(trained[k])
        opt = torch.optim.SGD([named[k] for k in params], lr=lrs[0], momentum=momentum)
        for lr in lrs:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad()
            loss_fn(work, batch).mean().backward()
            if clip is not None:
                norm = math.sqrt(sum(float(named[k].grad.square().sum()) for k in params))
                for k in params:
                    named[k].grad.mul_(min(1.0, clip / norm))
            opt.step()
        members.append({k: named[k].detach().clone() for k in params})
    return members


@pytest.mark.parametrize(
    "schedule,start", [("cosine", "previous"), ("cosine", "trained"), ("constant", "previous")]
)
def test_members_replay_the_cyclic_schedule(schedule, start):
    model, x, y, _ = classifier(n=12)
    batch = (x, y)  # one batch: the data order is trivial
    params = {k: v for k, v in model.named_parameters() if k.startswith("2.")}
    lr = 0.5 if schedule == "constant" else 0.3  # large enough for the clipping to act
    gex = fit(model, ce_loss, [batch], params, num_ens=3, ft_lr=lr, ft_step=4,
              schedule=schedule, start=start)  # fmt: skip
    lrs = lr_schedule(schedule, lr, 4)
    clip = 1.0 if schedule == "constant" else None  # GEX clips with the constant schedule
    want = _sgd_replay(model, params, ce_loss, batch, lrs, 3, 0.9, start, clip)
    for got, ref in zip(gex.members, want):
        assert set(got) == {"2.weight", "2.bias"}
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-12)
    same = torch.equal(gex.members[0]["2.weight"], gex.members[1]["2.weight"])
    assert same == (start == "trained")  # one batch: restarts from theta* coincide


def test_cosine_schedule_values():
    lrs = lr_schedule("cosine", 0.05, 4)
    np.testing.assert_allclose(lrs, [0.05, 0.05 * (1 + math.cos(math.pi / 4)) / 2, 0.025,
                                     0.05 * (1 + math.cos(3 * math.pi / 4)) / 2])  # fmt: skip
    assert lr_schedule("constant", 0.1, 3) == [0.1, 0.1, 0.1]


def _first_order_error(ft_lr, center):
    lin, x, y, batches = regression()
    gex = fit(lin, sq_loss, batches, num_ens=6, ft_lr=ft_lr, ft_step=10, center=center)
    grads = []
    for i in range(x.shape[0]):  # per-sample gradients at theta*, by a plain loop
        lin.zero_grad()
        sq_loss(lin, (x[i : i + 1], y[i : i + 1])).sum().backward()
        grads.append(torch.cat([lin.weight.grad.reshape(-1), lin.bias.grad.reshape(-1)]))
    lin.zero_grad()
    g = torch.stack(grads).double()
    e = len(gex.members)
    dev = gex.parameter_deviations()  # (E, P): theta_e - theta* (or - the ensemble mean)
    lin_rows = g @ dev.T / math.sqrt(e - 1 if center == "mean" else e)
    rows = gex.train_rows_batch((x, y))
    s, s1 = rows @ rows.T, lin_rows @ lin_rows.T  # GEX vs g_q^T Sigma g_z
    return float((s - s1).norm() / s1.norm())


@pytest.mark.parametrize("center", ["trained", "mean"])
def test_small_steps_approach_the_linearised_laplace_form(center):
    err3, err4 = _first_order_error(1e-3, center), _first_order_error(1e-4, center)
    print(f"center={center}: relative error vs g^T Sigma g: {err3:.2e} (1e-3), {err4:.2e} (1e-4)")
    assert err4 < 5e-3
    assert err3 / err4 > 5  # first order: the error shrinks with the step size


def test_original_model_unchanged_and_rng_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 2))
    model = model.to(DT)
    x = torch.randn(32, 3, dtype=DT)
    y = torch.randint(0, 2, (32,))
    model.train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    gex = fit(model, ce_loss, [(x[:16], y[:16]), (x[16:], y[16:])], params, num_ens=3, ft_step=5)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not model[0].weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # parameters and BatchNorm statistics
    assert all(p.grad is None for p in model.parameters())
    gex.check_model(params)  # checksum unchanged
    gex.self_influence_batch((x, y))
    assert model.training
    assert "0.weight" not in gex.members[0]


def test_only_chosen_parameters_are_fine_tuned():
    model, x, y, batches = classifier()
    params = {k: v for k, v in model.named_parameters() if k.startswith("0.")}
    gex = fit(model, ce_loss, batches, params, num_ens=3, ft_step=5)
    assert all(set(m) == {"0.weight", "0.bias"} for m in gex.members)
    assert gex.parameter_deviations().shape == (3, 8 * 3 + 8)
    assert float(gex.parameter_deviations().abs().max()) > 0
    assert float(gex.self_influence_batch((x, y)).sum()) > 0


def test_seed_reproducibility():
    model, x, y, batches = classifier()
    kw = dict(num_ens=3, ft_step=5, start="trained", shuffle_buffer=3)
    a = fit(model, ce_loss, batches, seed=0, **kw)
    b = fit(model, ce_loss, batches, seed=0, **kw)
    c = fit(model, ce_loss, batches, seed=1, **kw)
    assert torch.equal(a.train_rows_batch((x, y)), b.train_rows_batch((x, y)))
    assert not torch.allclose(a.train_rows_batch((x, y)), c.train_rows_batch((x, y)))
    # members from the trained weights differ only by their data order
    assert not torch.equal(a.members[0]["2.weight"], a.members[1]["2.weight"])
    # a shuffling DataLoader reproduces too (the global RNG is forked and seeded)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    d = fit(model, ce_loss, loader, seed=3, **kw)
    e = fit(model, ce_loss, loader, seed=3, **kw)
    assert torch.equal(d.train_rows_batch((x, y)), e.train_rows_batch((x, y)))


def test_drivers_query_matrix_and_train_pass():
    model, x, y, batches = classifier()
    gex = fit(model, ce_loss, batches, num_ens=4, ft_step=4, center="mean")
    idx = torch.arange(x.shape[0])
    train = [(x[i : i + 16], y[i : i + 16], idx[i : i + 16]) for i in range(0, 40, 16)]
    q = query_matrix(gex, lambda b: b, [(x[:5], y[:5])])
    out = train_pass(gex, lambda b: b, train, 40, index_fn=lambda b: b[2], query_rows=q,
                     want_norm=True)  # fmt: skip
    want = gex.query_rows_batch((x[:5], y[:5])) @ gex.train_rows_batch((x, y)).T
    torch.testing.assert_close(out["scores"], want)
    torch.testing.assert_close(out["self_influence"], gex.self_influence_batch((x, y)))
    assert bool(torch.isnan(out["hinv_norm"]).all())


def test_progress_callable_sees_every_step():
    model, x, y, batches = classifier()
    seen = []

    def progress(it):
        for i in it:
            seen.append(i)
            yield i

    GeometricEnsembleInfluence(num_ens=2, ft_step=3).fit(
        model, dict(model.named_parameters()), ce_loss, batches, {"progress": progress}
    )
    assert seen == list(range(6))


def test_state_dict_round_trip_and_bind():
    model, x, y, batches = classifier()
    gex = fit(model, ce_loss, batches, num_ens=3, ft_step=3, center="mean", ft_lr=0.02)
    state = gex.state_dict()
    other = GeometricEnsembleInfluence()
    other.load_state_dict(state)
    assert other.num_ens == 3 and other.center == "mean" and other.fitted
    with pytest.raises(RuntimeError, match="bind"):
        other.train_rows_batch((x, y))
    other.bind(model, ce_loss)
    torch.testing.assert_close(other.train_rows_batch((x, y)), gex.train_rows_batch((x, y)))


def test_num_ens_below_two_refused():
    with pytest.raises(ValueError, match="num_ens=1.*at least 2 ensemble members.*covariance"):
        GeometricEnsembleInfluence(num_ens=1)
    with pytest.raises(ValueError, match="num_ens=0"):
        GeometricEnsembleInfluence(num_ens=0)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(ft_lr=0.0), "ft_lr"),
        (dict(ft_step=0), "ft_step"),
        (dict(schedule="linear"), "schedule"),
        (dict(momentum=1.0), "momentum"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(start="random"), "start"),
        (dict(center="median"), "center"),
        (dict(shuffle_buffer=0), "shuffle_buffer"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        GeometricEnsembleInfluence(**kw)


def test_divergence_and_bad_loss_are_reported():
    lin, x, y, batches = regression()
    with pytest.raises(FloatingPointError, match="diverged.*Lower ft_lr"):
        fit(lin, sq_loss, batches, num_ens=2, ft_lr=1e6, ft_step=200)
    with pytest.raises(ValueError, match=r"per-sample losses of shape \(B,\)"):
        fit(lin, lambda m, b: sq_loss(m, b).mean(), batches, num_ens=2, ft_step=2)
    with pytest.raises(ValueError, match="training data is empty"):
        fit(lin, sq_loss, [], num_ens=2, ft_step=2)
    with pytest.raises(RuntimeError, match="fit"):
        GeometricEnsembleInfluence().self_influence_batch((x, y))


def test_flipped_label_detection_auroc():
    """Measured: AUROC of GEX self-influence for 10 % flipped labels vs the loss (printed)."""
    from sklearn.metrics import roc_auc_score

    n, d = 200, 5
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + (2 * y[:, None] - 1).float()
    flip = torch.zeros(n, dtype=torch.bool)
    flip[torch.randperm(n, generator=g)[: n // 10]] = True
    noisy = torch.where(flip, 1 - y, y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 2))  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(600):  # fits the flipped labels too (training accuracy 1.0)
        opt.zero_grad()
        F.cross_entropy(model(x), noisy).backward()
        opt.step()
    with torch.no_grad():
        assert float((model(x).argmax(1) == noisy).float().mean()) == 1.0
        loss = ce_loss(model, (x, noisy))
    order = torch.randperm(n, generator=g)
    batches = [(x[i], noisy[i]) for i in order.split(32)]
    gex = fit(model, ce_loss, batches, num_ens=8, ft_lr=0.05, ft_step=50)
    si = gex.self_influence_batch((x, noisy))
    auc_gex = roc_auc_score(flip.numpy(), si.numpy())
    auc_loss = roc_auc_score(flip.numpy(), loss.numpy())
    print(f"flipped-label AUROC: GEX self-influence {auc_gex:.3f}, loss {auc_loss:.3f}")
    assert auc_gex > 0.8
