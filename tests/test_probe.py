"""Tests of the verification probes (lightning_memo.probe) against independent oracles:
hand-counted majority rates, scikit-learn's least-squares R^2, and LEACE's guarantee that no
linear probe beats a constant after erasure."""

import numpy as np
import pytest
import torch

from lightning_memo.leace import LeaceEraser
from lightning_memo.probe import probe_accuracy, probe_r2

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _classes(seed, n, d, priors, spread, dtype=F64):
    """Gaussian features with class means ``spread`` apart (per class, random directions)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.multinomial(torch.tensor(priors, dtype=F64), n, replacement=True, generator=g)
    means = torch.randn(len(priors), d, generator=g, dtype=F64) * spread
    scales = torch.logspace(-0.5, 0.5, d, dtype=F64)
    x = torch.randn(n, d, generator=g, dtype=F64) * scales + means[z]
    return x.to(dtype), z


def test_separable_data_is_probed_perfectly():
    x, z = _classes(0, 600, 5, [0.5, 0.3, 0.2], spread=20.0)
    acc, majority = probe_accuracy(x, z)
    assert acc == 1.0
    assert majority == pytest.approx(float(torch.bincount(z).max()) / 600, abs=0)
    # binary, linearly separable by a hyperplane through the data (not by cluster means)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 3, generator=g, dtype=F64)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    margin = x @ w
    keep = margin.abs() > 0.2
    acc, _ = probe_accuracy(x[keep], (margin[keep] > 0).long())
    assert acc == 1.0


def test_independent_concept_is_near_majority():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 5, generator=g, dtype=F64)
    z = torch.multinomial(torch.tensor([0.7, 0.2, 0.1], dtype=F64), 3000, True, generator=g)
    acc, majority = probe_accuracy(x, z)
    assert majority == pytest.approx(float((z == 0).double().mean()), abs=0)
    assert abs(acc - majority) < 0.02
    # and clearly below a probe that does see the concept
    x2, z2 = _classes(3, 3000, 5, [0.7, 0.2, 0.1], spread=1.5)
    acc2, maj2 = probe_accuracy(x2, z2)
    assert acc2 > maj2 + 0.1


def test_majority_rate_with_arbitrary_labels():
    x = torch.arange(12, dtype=F64).reshape(6, 2)
    z = torch.tensor([5, 9, 5, 2, 5, 9])  # non-contiguous class ids
    _, majority = probe_accuracy(x, z)
    assert majority == 0.5
    z = torch.tensor([7, 7, 7, 7, 7, 7])
    assert probe_accuracy(x, z) == (1.0, 1.0)  # one class: trivially perfect


@pytest.mark.parametrize(
    "seed,priors,dtype",
    [
        (4, [0.6, 0.4], F64),
        (5, [0.5, 0.3, 0.2], F64),
        (6, [0.4, 0.25, 0.2, 0.15], torch.float32),
    ],
)
def test_probe_after_leace_is_exactly_majority(seed, priors, dtype):
    x, z = _classes(seed, 1500, 12, priors, spread=2.0, dtype=dtype)
    before, majority = probe_accuracy(x, z)
    assert majority == float(torch.bincount(z).max()) / len(z)
    assert before > majority + 0.15
    erased = LeaceEraser.fit(x, z)(x)
    after, majority_after = probe_accuracy(erased, z)
    assert majority_after == majority
    assert after == majority


def test_probe_ignores_grad_and_accepts_float32():
    x, z = _classes(7, 300, 4, [0.5, 0.5], spread=10.0, dtype=torch.float32)
    x.requires_grad_(True)
    acc, _ = probe_accuracy(x, z)
    assert acc == 1.0
    assert x.grad is None


def test_r2_matches_sklearn_linear_regression():
    linear_model = pytest.importorskip("sklearn.linear_model")
    from sklearn.metrics import r2_score

    g = torch.Generator().manual_seed(8)
    n, d = 400, 6
    x = torch.randn(n, d, generator=g, dtype=F64) * torch.logspace(-1, 1, d, dtype=F64) + 5.0
    z = x @ torch.randn(d, generator=g, dtype=F64) + 3 * torch.randn(n, generator=g, dtype=F64)
    expected = linear_model.LinearRegression().fit(x.numpy(), z.numpy()).score(x.numpy(), z)
    assert 0.2 < expected < 0.99
    assert probe_r2(x, z) == pytest.approx(expected, abs=1e-8)
    assert probe_r2(x, z[:, None]) == pytest.approx(expected, abs=1e-8)

    # several targets: the pooled R^2 1 - sum SS_res / sum SS_tot (sklearn 'variance_weighted')
    zk = torch.stack([z, 10 * z + 20 * torch.randn(n, generator=g, dtype=F64), x[:, 0]], dim=1)
    pred = linear_model.LinearRegression().fit(x.numpy(), zk.numpy()).predict(x.numpy())
    expected = r2_score(zk.numpy(), pred, multioutput="variance_weighted")
    assert probe_r2(x, zk) == pytest.approx(expected, abs=1e-8)
    # a perfectly linear target, and a constant one
    assert probe_r2(x, x @ torch.ones(d, dtype=F64) - 7) == pytest.approx(1.0, abs=1e-10)
    assert probe_r2(x, torch.full((n,), 2.0, dtype=F64)) == 0.0


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_r2_zero_after_erasing_continuous_concept(dtype):
    g = torch.Generator().manual_seed(9)
    n, d = 800, 10
    x = torch.randn(n, d, generator=g, dtype=F64) * torch.logspace(-1, 1, d, dtype=F64)
    z = x[:, :3] @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.3 * torch.randn(
        n, generator=g, dtype=F64
    )
    x = x.to(dtype)
    assert probe_r2(x, z) > 0.5
    erased = LeaceEraser.fit(x, z, z_dim=1)(x)
    assert probe_r2(erased, z) < (1e-8 if dtype == F64 else 1e-6)
    # two continuous concepts at once
    z2 = torch.stack([z, x[:, 5].double() ** 2 + x[:, 6].double()], dim=1)
    erased2 = LeaceEraser.fit(x, z2)(x)
    assert probe_r2(x, z2) > 0.3
    assert probe_r2(erased2, z2) < (1e-8 if dtype == F64 else 1e-6)


def test_r2_on_leace_erased_classes_matches_sklearn():
    """Erased one-hot classes: the least-squares probe explains nothing (sklearn agrees)."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, z = _classes(10, 600, 8, [0.5, 0.3, 0.2], spread=2.0)
    onehot = torch.nn.functional.one_hot(z, 3).double()
    erased = LeaceEraser.fit(x, z)(x)
    r2 = probe_r2(erased, onehot)
    pred = linear_model.LinearRegression().fit(erased.numpy(), onehot.numpy())
    resid = onehot.numpy() - pred.predict(erased.numpy())
    sk = 1 - (resid**2).sum() / ((onehot.numpy() - onehot.numpy().mean(0)) ** 2).sum()
    assert abs(r2) < 1e-8 and abs(sk) < 1e-8
    assert np.abs(pred.coef_).max() < 1e-6
