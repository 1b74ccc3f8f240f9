"""Random projections: Kronecker (LoGra) == dense projection of the materialised gradient, and
projected inner products are unbiased with an error shrinking like 1/sqrt(k)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_memo.influence import (
    DenseProjector,
    KroneckerProjector,
    kronecker_dims,
    linear_grads_from_io,
    random_matrix,
)

DT = torch.float64
SEEDS = 300


pytestmark = pytest.mark.usefixtures("one_thread")


def _vec(a, g, bias):
    """Materialised per-sample gradient [W | b] flattened row-major: (B, d_out * (d_in + bias))."""
    w, b = linear_grads_from_io(a, g, bias)
    if bias:
        w = torch.cat([w, b.unsqueeze(2)], dim=2)
    return w.reshape(w.shape[0], -1)


@pytest.mark.parametrize(
    "shape_a, shape_g, bias",
    [((6, 7), (6, 5), True), ((6, 7), (6, 5), False), ((4, 3, 7), (4, 3, 5), True)],
    ids=["bias", "no-bias", "sequence"],
)
def test_kronecker_equals_dense_projection_of_materialised_gradient(shape_a, shape_g, bias):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(*shape_a, generator=gen, dtype=DT)
    g = torch.randn(*shape_g, generator=gen, dtype=DT)
    proj = KroneckerProjector(5, 7, bias, k=12, seed=4)
    assert (proj.k_out, proj.k_in) == kronecker_dims(12, 5, 7 + bias) and proj.k <= 12
    full = proj.full_matrix().to(DT)
    assert full.shape == (proj.k, 5 * (7 + bias))
    got = proj(a, g)
    want = _vec(a, g, bias) @ full.T
    assert got.shape == (shape_a[0], proj.k)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # float32 input: same numbers to float32 accuracy
    got32 = proj(a.float(), g.float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, atol=1e-5, rtol=1e-4)


def _pair(dim, seed=987_654):  # a data seed far from the projection seeds used below
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(dim, generator=gen, dtype=DT)
    v = 0.6 * u + torch.randn(dim, generator=gen, dtype=DT)  # correlated: <u, v> far from 0
    return u, v


def _check_unbiased_and_shrinking(samples_by_k, exact, theory_std, sqrt_k=True):
    stds = {}
    for k, s in samples_by_k.items():
        mean, std = s.mean().item(), s.std().item()
        se = std / math.sqrt(s.numel())
        assert abs(mean - exact) < 4 * se, (k, mean, exact, se)
        # the spread matches the closed-form variance of the estimator (not just "small")
        assert std == pytest.approx(theory_std(k), rel=0.2), (k, std, theory_std(k))
        stds[k] = std
    ks = sorted(stds)
    for k1, k2 in zip(ks, ks[1:]):
        ratio = stds[k1] / stds[k2]
        assert ratio > 1.25, (k1, k2, ratio)
        if sqrt_k:  # k x4 -> error / 2
            assert 1.5 < ratio < 2.7, (k1, k2, ratio)
    return stds


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_dense_projection_inner_products_unbiased_error_shrinks(kind):
    u, v = _pair(200)
    exact = float(u @ v)
    samples = {}
    for k in (16, 64, 256):
        vals = []
        for seed in range(SEEDS):
            p = DenseProjector(200, k, seed, kind)
            pu, pv = p(torch.stack([u, v]).to(torch.float32)).double()
            vals.append(float(pu @ pv))
        samples[k] = torch.tensor(vals, dtype=DT)
    # Var <Pu, Pv> = (|u|^2 |v|^2 + <u,v>^2 - c * sum u_i^2 v_i^2) / k, c = 0 (gauss) / 2 (+-1)
    c = 0.0 if kind == "gaussian" else 2.0
    var1 = float(u @ u * (v @ v) + exact**2 - c * (u**2 @ v**2))
    _check_unbiased_and_shrinking(samples, exact, lambda k: math.sqrt(var1 / k))


def test_kronecker_projection_inner_products_unbiased_error_shrinks():
    """<P vec(g1 a1^T), P vec(g2 a2^T)> = <P_out g1, P_out g2> <P_in a1, P_in a2>: a product of
    two independent unbiased estimates, so unbiased with a closed-form variance
    E[X^2] E[Y^2] - E[X]^2 E[Y]^2."""
    gen = torch.Generator().manual_seed(987_655)
    d_out, d_in = 40, 39  # d_in + bias = 40
    a = torch.randn(2, d_in, generator=gen, dtype=DT)
    g = torch.randn(2, d_out, generator=gen, dtype=DT)
    a[1] += 0.8 * a[0]
    g[1] += 0.8 * g[0]
    flat = _vec(a, g, True)
    exact = float(flat[0] @ flat[1])
    a1 = torch.cat([a, torch.ones(2, 1, dtype=DT)], dim=1)
    samples = {}
    for k in (16, 64, 256):
        vals = []
        for seed in range(SEEDS):
            pu, pv = KroneckerProjector(d_out, d_in, True, k, seed, kind="gaussian")(a, g)
            vals.append(float(pu @ pv))
        samples[k] = torch.tensor(vals, dtype=DT)

    def theory(k):
        k_out, k_in = kronecker_dims(k, d_out, d_in + 1)

        def moments(x, kk):  # E[X], E[X^2] of <Px, Py> with Gaussian P (variance 1/kk)
            m = float(x[0] @ x[1])
            return m, m * m + (float(x[0] @ x[0] * (x[1] @ x[1])) + m * m) / kk

        m1, s1 = moments(g, k_out)
        m2, s2 = moments(a1, k_in)
        return math.sqrt(s1 * s2 - (m1 * m2) ** 2)

    assert exact == pytest.approx(float(g[0] @ g[1]) * float(a1[0] @ a1[1]))
    # the variance has 1/k_out + 1/k_in terms: it shrinks, more slowly than 1/k for rank one
    _check_unbiased_and_shrinking(samples, exact, theory, sqrt_k=False)


def test_random_matrix_seeded_and_scaled():
    m1 = random_matrix(64, 500, seed=3)
    assert torch.equal(m1, random_matrix(64, 500, seed=3))
    assert not torch.allclose(m1, random_matrix(64, 500, seed=4))
    assert m1.shape == (64, 500) and m1.dtype == torch.float32
    assert m1.double().var().item() == pytest.approx(1 / 64, rel=0.03)
    assert abs(m1.double().mean().item()) < 3 * math.sqrt(1 / 64 / m1.numel())
    r = random_matrix(16, 300, seed=3, kind="rademacher")
    assert set(r.unique().tolist()) == {-0.25, 0.25}
    assert torch.equal(r, random_matrix(16, 300, seed=3, kind="rademacher"))
    assert random_matrix(4, 5, seed=0, dtype=DT).dtype == DT
    with pytest.raises(ValueError, match="kind='sparse'"):
        random_matrix(4, 5, seed=0, kind="sparse")


def test_projectors_are_seeded():
    d1, d2, d3 = DenseProjector(50, 8, 1), DenseProjector(50, 8, 1), DenseProjector(50, 8, 2)
    cpu = torch.device("cpu")
    assert torch.equal(d1.matrix(cpu, DT), d2.matrix(cpu, DT))
    assert not torch.allclose(d1.matrix(cpu, DT), d3.matrix(cpu, DT))
    k1, k2, k3 = (KroneckerProjector(6, 5, True, 16, s) for s in (7, 7, 8))
    assert torch.equal(k1.full_matrix(), k2.full_matrix())
    assert not torch.allclose(k1.p_out, k3.p_out) and not torch.allclose(k1.p_in, k3.p_in)
    assert not torch.allclose(k1.p_out[:, :4], k1.p_in[:4, :4])  # in/out drawn independently
    x = torch.randn(3, 6, dtype=DT)
    assert torch.equal(k1(x[:, :5], x), k2(x[:, :5], x))


def test_kronecker_dims():
    assert kronecker_dims(64, 100, 100) == (8, 8)
    assert kronecker_dims(1024, 3, 17) == (3, 17)  # capped at the full gradient
    assert kronecker_dims(16, 1, 1000) == (1, 16)
    assert kronecker_dims(1000, 2, 1000) == (2, 500)
    for k in (1, 2, 3, 5, 7, 10, 33, 100, 257, 1024):
        for d_out in (1, 2, 3, 10, 64):
            for d_in in (1, 4, 9, 65, 300):
                k_out, k_in = kronecker_dims(k, d_out, d_in)
                assert 1 <= k_out <= d_out and 1 <= k_in <= d_in
                assert k_out * k_in <= max(k, 1)
                assert k_out * k_in >= min(k, d_out * d_in) / 2, (k, d_out, d_in, k_out, k_in)


def test_orthogonal_kronecker_factors_unbiased_with_less_variance():
    """The default (orthogonal-row) factors keep E<Pu, Pv> = <u, v> with a smaller spread."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(2, 31, generator=gen, dtype=DT)
    g = torch.randn(2, 24, generator=gen, dtype=DT)
    a[1] += 0.5 * a[0]
    g[1] += 0.5 * g[0]
    flat = _vec(a, g, True)
    exact = float(flat[0] @ flat[1])
    spread = {}
    for kind in ("gaussian", "orthogonal"):
        vals = torch.tensor(
            [
                float(torch.dot(*KroneckerProjector(24, 31, True, 256, s, kind=kind)(a, g)))
                for s in range(SEEDS)
            ],
            dtype=DT,
        )
        assert abs(float(vals.mean()) - exact) < 4 * float(vals.std()) / math.sqrt(SEEDS)
        spread[kind] = float(vals.std())
    assert spread["orthogonal"] < 0.85 * spread["gaussian"]  # measured 63 vs 84 (k = 16 x 16)
    q = random_matrix(8, 8, seed=1, kind="orthogonal").double()
    torch.testing.assert_close(q.T @ q, torch.eye(8, dtype=DT), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("projection_dim", [40, None])
def test_sq_norms_from_linear_io_exact_for_rows_projected_for_positions(bias, projection_dim):
    """GradientFeaturizer.sq_norms_from_linear_io: for layers that see one row per sample the
    exact lr-weighted squared norm of the materialised gradient (whatever the projection); for
    a layer with positions the squared norm of its features' block (projected or exact)."""
    from lightning_memo.influence.features import GradientFeaturizer

    g = torch.Generator().manual_seed(0)
    mods = {"x": nn.Linear(5, 7, bias=bias), "y": nn.Linear(7, 3)}
    feats = GradientFeaturizer(mods, projection_dim=projection_dim, seed=1, factored=False)
    lrs = {"x": 0.5, "y": 0.1}
    feats.set_learning_rates(lrs)
    scale = 0.25
    ins = {"x": torch.randn(9, 5, generator=g), "y": torch.randn(9, 7, generator=g)}
    outs = {"x": torch.randn(9, 7, generator=g), "y": torch.randn(9, 3, generator=g)}
    want = torch.zeros(9, dtype=DT)
    for n, mod in mods.items():
        w = _vec(ins[n].double(), outs[n].double() * scale, mod.bias is not None)
        want += lrs[n] * w.square().sum(1)
    got = feats.sq_norms_from_linear_io(ins, outs, scale)
    assert got.dtype == DT
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    # layer "x" with positions: its block of the features (projected or exact); "y" exact
    ins["x"] = torch.randn(9, 4, 5, generator=g)
    outs["x"] = torch.randn(9, 4, 7, generator=g)
    rows = feats.from_linear_io(ins, outs, scale).double()
    kx = feats.projectors["x"].k if projection_dim else 7 * (5 + int(bias))
    want_x = rows[:, :kx].square().sum(1)
    wy = _vec(ins["y"].double(), outs["y"].double() * scale, True)
    got = feats.sq_norms_from_linear_io(ins, outs, scale)
    torch.testing.assert_close(got, want_x + lrs["y"] * wy.square().sum(1), rtol=1e-5, atol=0)
