"""GradientFeaturizer: exact factored rows, grad_dict, and the store's layout-aware products."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_memo.influence import (
    GradientStore,
    per_sample_grads,
    row_dot,
    row_sq_norm,
    tracin_scores,
    tracin_self_influence,
)
from lightning_memo.influence.features import GradientFeaturizer
from tests.helpers import TinyCNN, ce_loss

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


def setup(n=9, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3, bias=False)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    batch = (torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
    modules = {"0": model[0], "2": model[2]}
    return model, modules, batch


def flat_oracle(model, batch, lrs=None):
    """(n, P) flattened exact per-sample gradients from torch.func, sqrt(lr)-scaled per layer."""
    params = dict(model.named_parameters())
    grads = per_sample_grads(model, params, ce_loss, batch)
    cols = []
    for name, g in grads.items():
        scale = (lrs or {}).get(name.split(".")[0], 1.0) ** 0.5
        cols.append(g.reshape(g.shape[0], -1) * scale)
    return torch.cat(cols, dim=1)


def test_factored_rows_give_exact_inner_products():
    model, modules, batch = setup()
    feats = GradientFeaturizer(modules, projection_dim=None)
    lrs = {"0": 0.3, "2": 0.05}
    feats.set_learning_rates(lrs)
    rows = feats(model, batch, ce_loss)
    assert feats.layout == [(6, 7), (7, 3)] and rows.shape == (9, feats.dim) and feats.dim == 23
    flat = flat_oracle(model, batch, lrs)
    torch.testing.assert_close(feats.pair_products(rows[:4], rows), flat[:4] @ flat.T)
    torch.testing.assert_close(feats.self_products(rows), flat.square().sum(1))
    # the flattened exact path (factored=False) gives the same products with plain dots
    plain = GradientFeaturizer(modules, projection_dim=None, factored=False)
    plain.set_learning_rates(lrs)
    prow = plain(model, batch, ce_loss)
    assert plain.layout is None and prow.shape == (9, 6 * 7 + 7 * 3)
    torch.testing.assert_close(prow @ prow.T, flat @ flat.T)


def test_factored_store_scores_and_self_influence():
    model, modules, batch = setup(n=12)
    feats = GradientFeaturizer(modules, projection_dim=None)
    flat = flat_oracle(model, batch)
    store = GradientStore(12, feats.dim, DT, layout=feats.layout)
    q = []
    for lr in (0.5, 2.0):
        c = store.add_checkpoint(lr)
        store.write(c, torch.arange(12).flip(0), feats(model, batch, ce_loss).flip(0))
        q.append(feats(model, (batch[0][:3], batch[1][:3]), ce_loss))
    got = tracin_scores(store, q, block=5)
    assert got.dtype == DT  # a float64 store is scored in float64
    torch.testing.assert_close(got, 2.5 * flat[:3] @ flat.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tracin_self_influence(store), 2.5 * flat.square().sum(1))
    back = GradientStore.from_state(store.state())
    assert back.layout == store.layout and back.dtype == DT
    with pytest.raises(ValueError, match="does not add up"):
        GradientStore(3, 10, layout=[(2, 3)])


def test_row_dot_layout_none_is_plain_dot():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g)
    torch.testing.assert_close(row_dot(a, b), a @ b.T)
    torch.testing.assert_close(row_sq_norm(a), a.double().square().sum(1))
    # factored: [a1 | g1] rows -> (a1.a1')(g1.g1')
    want = (a[:, :2] @ b[:, :2].T) * (a[:, 2:] @ b[:, 2:].T)
    torch.testing.assert_close(row_dot(a, b, [(2, 4)]), want)


def test_grad_dict_equals_torch_func():
    model, modules, batch = setup()
    feats = GradientFeaturizer(modules, projection_dim=None)
    got = feats.grad_dict(model, batch, ce_loss)
    want = per_sample_grads(model, dict(model.named_parameters()), ce_loss, batch)
    assert list(got) == ["0.weight", "0.bias", "2.weight"]
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    # a parameter subset of a Linear layer goes through torch.func
    sub = GradientFeaturizer(modules, projection_dim=None, params={"0.bias": model[0].bias})
    assert not sub.linear and list(sub.grad_dict(model, batch, ce_loss)) == ["0.bias"]


def test_factored_store_refuses_sequence_inputs():
    lin = nn.Linear(4, 2).to(DT)
    feats = GradientFeaturizer({"lin": lin}, projection_dim=None)
    x = torch.randn(3, 5, 4, dtype=DT)

    def loss(m, b):
        return m(b[0]).sum(dim=(1, 2))

    with pytest.raises(ValueError, match=r"\(3, 5, 4\).*factored=False"):
        feats(lin, (x,), loss)
    flat = GradientFeaturizer({"lin": lin}, projection_dim=None, factored=False)(lin, (x,), loss)
    assert flat.shape == (3, 2 * 5)


def cnn_setup():
    torch.manual_seed(0)
    model = TinyCNN(nn.Conv2d(2, 3, 3, stride=2, padding=1), hw=5, classes=4).to(DT)
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(6, 2, 5, 5, generator=g, dtype=DT), torch.randint(0, 4, (6,), generator=g))
    return model, {"conv": model.conv, "fc": model.fc}, batch


def test_conv2d_takes_the_hook_path_exactly():
    """Conv2d per-sample gradients from unfolded patches x output-gradients equal torch.func."""
    model, modules, batch = cnn_setup()
    feats = GradientFeaturizer(modules, projection_dim=None)
    assert feats.linear and feats.layout is None  # conv gradients are not rank one
    got = feats.grad_dict(model, batch, ce_loss)
    want = per_sample_grads(model, dict(model.named_parameters()), ce_loss, batch)
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    flat = feats(model, batch, ce_loss)
    ref = torch.cat([want[k].reshape(6, -1) for k in want], dim=1)
    torch.testing.assert_close(flat @ flat.T, ref @ ref.T)


def test_conv2d_kronecker_projection_is_unbiased_in_expectation():
    """LoGra on a conv layer: the mean over seeds of projected inner products approaches the
    exact ones (orthogonal factors: unbiased)."""
    model, modules, batch = cnn_setup()
    exact = GradientFeaturizer(modules, projection_dim=None)(model, batch, ce_loss)
    want = exact @ exact.T
    est = torch.zeros_like(want)
    seeds = 200
    for s in range(seeds):
        f = GradientFeaturizer(modules, projection_dim=40, seed=s)(model, batch, ce_loss)
        est += f @ f.T / seeds
    err = (est - want).abs().max() / want.abs().max()
    one = GradientFeaturizer(modules, projection_dim=40, seed=0)(model, batch, ce_loss)
    err_one = ((one @ one.T) - want).abs().max() / want.abs().max()
    assert err < 0.1 and err < err_one / 3, (float(err), float(err_one))
