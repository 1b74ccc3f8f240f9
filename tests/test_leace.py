"""Tests of the LEACE math core (lightning_memo.leace) against independent oracles.

Oracles: the closed form of Belrose et al. (NeurIPS 2023) written here with dense float64 matrices
(eigh whitening, pinv projector), the zero cross-covariance guarantee, scikit-learn's logistic
regression, the minimal-edit property checked against other zero-covariance erasers, and the
reference package ``concept-erasure`` 0.2.4 (those tests skip cleanly when it is not installed).
"""

import io
import warnings

import numpy as np
import pytest
import torch

from lightning_memo.leace import LeaceEraser, LeaceFitter, linear_shrinkage

F64 = torch.float64
EXACT = dict(shrinkage=False, constrain_cov_trace=False, svd_tol=1e-12)


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed, n=400, d=10, k=3, spread=2.0, dtype=F64):
    """Anisotropic Gaussian features (scales 10^-1..10^1, random rotation) plus class means."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, d, dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    x = torch.randn(n, d, generator=g, dtype=F64) * scales @ q.T
    z = torch.randint(0, k, (n,), generator=g)
    z[:k] = torch.arange(k)  # every class present
    x = x + spread * _onehot(z, k) @ torch.randn(k, d, generator=g, dtype=F64)
    return x.to(dtype), z


def _onehot(z, k):
    return torch.nn.functional.one_hot(z, k).to(F64)


def _cov(a, b):
    a, b = a.to(F64), b.to(F64).reshape(b.shape[0], -1)
    return (a - a.mean(0)).T @ (b - b.mean(0)) / (a.shape[0] - 1)


def _rel_cov(x, xe, z):
    return float(_cov(xe, z).abs().max() / _cov(x, z).abs().max())


def _oracle(x, z, method="leace"):
    """Closed form r(x) = x - W^+ P W (x - mu), dense float64, no shrinkage, Bessel covariances.

    Returns (r, D, W) with D = W^+ P W the (d, d) linear part of the edit.
    """
    x, z = x.to(F64), z.to(F64)
    n, d = x.shape
    mu = x.mean(0)
    xc, zc = x - mu, z - z.mean(0)
    sxx, sxz = xc.T @ xc / (n - 1), xc.T @ zc / (n - 1)
    if method == "orth":
        w = torch.eye(d, dtype=F64)
    else:
        evals, evecs = torch.linalg.eigh(sxx)
        w = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    m = w @ sxz
    proj = m @ torch.linalg.pinv(m, rtol=1e-9)  # orthogonal projector onto col(W Sxz)
    edit = torch.linalg.pinv(w) @ proj @ w
    return (lambda y: y - (y - mu) @ edit.T), edit, w


# ---------------------------------------------------------------------------------- 1. oracle
@pytest.mark.parametrize("method", ["leace", "orth"])
@pytest.mark.parametrize("seed,n,d,k", [(0, 400, 10, 3), (1, 1000, 16, 2), (2, 300, 7, 5)])
def test_matches_closed_form_oracle(method, seed, n, d, k):
    x, z = _data(seed, n, d, k)
    r, edit, _ = _oracle(x, _onehot(z, k), method)
    eraser = LeaceEraser.fit(x, z, method=method, **EXACT)
    assert eraser.rank == k - 1  # one-hot columns sum to 1: rank k - 1
    torch.testing.assert_close(eraser(x), r(x), rtol=0, atol=1e-8)
    torch.testing.assert_close(eraser.P, torch.eye(d, dtype=F64) - edit, rtol=0, atol=1e-10)
    # also on fresh points (the affine map itself, not just the fitted rows)
    y = torch.randn(50, d, dtype=F64, generator=torch.Generator().manual_seed(99)) * 5
    torch.testing.assert_close(eraser(y), r(y), rtol=0, atol=1e-8)


def test_matches_oracle_continuous_concept():
    x, _ = _data(3, 500, 9, 2)
    g = torch.Generator().manual_seed(3)
    z = x[:, :2] @ torch.randn(2, 2, generator=g, dtype=F64) + torch.randn(500, 2, generator=g)
    r, _, _ = _oracle(x, z)
    eraser = LeaceEraser.fit(x, z, **EXACT)
    assert eraser.rank == 2
    torch.testing.assert_close(eraser(x), r(x), rtol=0, atol=1e-8)


# ----------------------------------------------------------------------- 2. zero covariance
@pytest.mark.parametrize("method", ["leace", "orth"])
@pytest.mark.parametrize(
    "case",
    ["k2", "k5", "continuous2", "n>>d"],
)
def test_cross_covariance_is_zero(method, case):
    """Default settings (shrinkage, trace constraint, svd_tol=0.01): Cov(r(x), z) = 0."""
    if case == "continuous2":
        x, _ = _data(4, 600, 12, 2)
        g = torch.Generator().manual_seed(4)
        z = x[:, [0, 5]] + 0.5 * torch.randn(600, 2, generator=g, dtype=F64)
        zf = z
    else:
        n, d, k = {"k2": (500, 8, 2), "k5": (800, 12, 5), "n>>d": (20000, 6, 3)}[case]
        x, z = _data(5, n, d, k)
        zf = _onehot(z, k)
    eraser = LeaceEraser.fit(x, z, method=method)
    xe = eraser(x)
    assert _rel_cov(x, x, zf) == 1.0 and float(_cov(x, zf).abs().max()) > 0.05
    assert _rel_cov(x, xe, zf) < 1e-6


def test_cross_covariance_zero_float32():
    """Float32 features: statistics in float64, so only the float32 rounding of the output."""
    x, z = _data(6, 2000, 32, 4, dtype=torch.float32)
    xe = LeaceEraser.fit(x, z)(x)
    assert xe.dtype == torch.float32
    assert _rel_cov(x, xe, _onehot(z, 4)) < 1e-5


# ----------------------------------------------------------- 3. logistic regression (sklearn)
def test_logistic_regression_readme_recipe():
    """The ``concept-erasure`` README check: |coef| < 1e-4 after erasure, > 0.1 before."""
    datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.linear_model import LogisticRegression

    x, y = datasets.make_classification(
        n_samples=2048, n_features=128, n_classes=2, weights=[0.7], random_state=42
    )
    before = LogisticRegression(max_iter=1000).fit(x, y)
    assert np.abs(before.coef_).max() > 0.1 and before.score(x, y) > 0.8
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    xe = LeaceEraser.fit(xt, yt)(xt).numpy()
    after = LogisticRegression(max_iter=1000, tol=0.0).fit(xe, y)
    majority = np.bincount(y).max() / len(y)
    assert np.linalg.norm(after.coef_) < 1e-4
    assert after.score(xe, y) == majority
    assert majority > 0.65  # imbalanced: accuracy == majority is not a coin flip


@pytest.mark.parametrize("k,weights", [(3, [0.5, 0.3]), (4, [0.4, 0.3, 0.2])])
def test_logistic_regression_multiclass(k, weights):
    datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.linear_model import LogisticRegression

    x, y = datasets.make_classification(
        n_samples=2048,
        n_features=16,
        n_informative=6,
        n_classes=k,
        weights=weights,
        class_sep=2.0,
        random_state=0,
    )
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    xe = LeaceEraser.fit(xt, yt)(xt).numpy()
    # centred: LR starts at w = 0 with its intercept, so the optimiser lands on the exact optimum
    xe = xe - xe.mean(0)
    before = LogisticRegression(max_iter=1000).fit(x - x.mean(0), y)
    after = LogisticRegression(max_iter=1000, tol=0.0).fit(xe, y)
    majority = np.bincount(y).max() / len(y)
    assert before.score(x - x.mean(0), y) > majority + 0.2
    assert np.linalg.norm(after.coef_) < 1e-4
    assert after.score(xe, y) == majority


# ----------------------------------------------------------------------- 4. minimal edit
def test_whitened_features_leace_is_orthogonal_projection():
    """For Sxx = I, LEACE is x - (x - mu) U U^T with U an orthonormal basis of col(Sxz)."""
    x0, z = _data(7, 500, 10, 3)
    xc = x0 - x0.mean(0)
    evals, evecs = torch.linalg.eigh(xc.T @ xc / 499)
    x = xc @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T + 3.0  # sample covariance exactly I
    mu = x.mean(0)
    sxz = _cov(x, _onehot(z, 3))
    u, s, _ = torch.linalg.svd(sxz, full_matrices=False)
    u = u[:, s > 1e-9 * s[0]]
    assert u.shape[1] == 2
    expected = x - (x - mu) @ u @ u.T
    for kw in (EXACT, {}):  # exact settings and the defaults (shrinkage leaves c*I unchanged)
        fitter = LeaceFitter.fit(x, z, **kw)
        torch.testing.assert_close(fitter.eraser(x), expected, rtol=0, atol=1e-8)
        assert _rel_cov(x, fitter.eraser(x), _onehot(z, 3)) < 1e-10
        if kw.get("shrinkage", True):
            torch.testing.assert_close(
                fitter.sigma_xx, torch.eye(10, dtype=F64) * 499 / 500, rtol=0, atol=1e-12
            )
    # same as the orthogonal method on whitened data
    orth = LeaceEraser.fit(x, z, method="orth", **EXACT)
    torch.testing.assert_close(orth(x), expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("seed,k", [(8, 3), (9, 2), (10, 5)])
def test_edit_is_minimal(seed, k):
    """E||W (r(x) - x)||^2 equals rank (closed form) and beats every other zero-cov eraser."""
    n, d = 800, 12
    x, z = _data(seed, n, d, k)
    zf = _onehot(z, k)
    _, _, w = _oracle(x, zf)
    sxx = _cov(x, x)

    def costs(edit):  # expected squared edit, whitened and Euclidean, of x -> x - edit (x - mu)
        return (
            float(torch.trace(w @ edit @ sxx @ edit.T @ w)),
            float(torch.trace(edit @ sxx @ edit.T)),
        )

    eye = torch.eye(d, dtype=F64)
    leace = LeaceEraser.fit(x, z, **EXACT)
    xe = leace(x)
    measured = float(((xe - x) @ w).square().sum(1).mean()) * n / (n - 1)
    assert measured == pytest.approx(k - 1, rel=1e-9)  # tr(U U^T) in whitened coordinates
    lw, le = costs(eye - leace.P)
    assert lw == pytest.approx(k - 1, rel=1e-9)

    orth = LeaceEraser.fit(x, z, method="orth", **EXACT)
    assert _rel_cov(x, orth(x), zf) < 1e-10  # a valid eraser too
    ow, oe = costs(eye - orth.P)
    assert ow > lw * 1.05 and oe > le

    # random oblique erasers E = B (G^T B)^-1 G^T with B spanning col(Sxz): (I - E) Sxz = 0
    u, s, _ = torch.linalg.svd(_cov(x, zf), full_matrices=False)
    b = u[:, : k - 1]
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        gm = torch.randn(d, k - 1, generator=g, dtype=F64)
        edit = b @ torch.linalg.solve(gm.T @ b, gm.T)
        assert float(((eye - edit) @ _cov(x, zf)).abs().max()) < 1e-9
        rw, re = costs(edit)
        assert rw > lw and re > le
    # and small perturbations of LEACE inside the feasible set only increase the edit
    g_leace = torch.linalg.solve(sxx, b)  # LEACE is E with G = Sxx^-1 B
    torch.testing.assert_close(
        b @ torch.linalg.solve(g_leace.T @ b, g_leace.T), eye - leace.P, rtol=0, atol=1e-8
    )
    for _ in range(10):
        gm = g_leace + 1e-3 * torch.randn(d, k - 1, generator=g, dtype=F64)
        rw, _ = costs(b @ torch.linalg.solve(gm.T @ b, gm.T))
        assert rw > lw


# ------------------------------------------------------------------- 5. streaming and merge
def _assert_stats_close(a, b, tol=1e-10):
    assert a.n == b.n
    for key in ("mean_x", "mean_z", "c_xz", "c_xx"):
        ta, tb = getattr(a, key), getattr(b, key)
        if ta is None:
            assert tb is None
            continue
        torch.testing.assert_close(ta, tb, rtol=tol, atol=tol * float(tb.abs().max()))


def _batches(n, sizes):
    start = 0
    for size in sizes:
        yield slice(start, start + size)
        start += size
    assert start == n


@pytest.mark.parametrize("method", ["leace", "orth"])
def test_streaming_equals_one_shot(method):
    n, d, k = 500, 9, 4
    x, z = _data(11, n, d, k)
    x = x + 1e3  # a large common offset: naive sum-of-squares accumulation would lose digits
    sizes = [1, 1, 37, 1, 200, 3, 1, 150, 105, 1]
    stream = LeaceFitter(d, k, method, dtype=F64)
    for sl in _batches(n, sizes):
        stream.update(x[sl], z[sl])
    stream.update(x[:0], z[:0])  # empty batch is a no-op
    one = LeaceFitter.fit(x, z, method=method)
    _assert_stats_close(stream, one)
    # independent oracle for the statistics themselves
    xc = x - x.mean(0)
    zc = _onehot(z, k) - _onehot(z, k).mean(0)
    torch.testing.assert_close(stream.mean_x, x.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(stream.c_xz, xc.T @ zc, rtol=1e-10, atol=1e-10 * n)
    if method == "leace":
        torch.testing.assert_close(stream.c_xx, xc.T @ xc, rtol=1e-10, atol=1e-10 * n)
    torch.testing.assert_close(stream.eraser(x), one.eraser(x), rtol=0, atol=1e-8)


def test_update_accepts_one_hot_and_leading_dims():
    n, d, k = 300, 5, 3
    x, z = _data(12, n, d, k)
    a = LeaceFitter(d, k, dtype=F64).update(x, z)
    b = LeaceFitter(d, k, dtype=F64).update(x, _onehot(z, k))
    _assert_stats_close(a, b, 1e-14)


def test_merge_halves_equals_one_fitter():
    n, d, k = 600, 8, 3
    x, z = _data(13, n, d, k)
    a = LeaceFitter.fit(x[:250], z[:250], z_dim=k)
    b = LeaceFitter.fit(x[250:], z[250:], z_dim=k)
    b.update(x[:0], z[:0])
    whole = LeaceFitter.fit(x, z)
    merged = a.merge(b)
    _assert_stats_close(merged, whole)
    torch.testing.assert_close(merged.eraser(x), whole.eraser(x), rtol=0, atol=1e-8)
    # merging an empty fitter changes nothing, and merging into an empty one copies
    empty = LeaceFitter(d, k, dtype=F64)
    _assert_stats_close(merged.merge(LeaceFitter(d, k, dtype=F64)), whole)
    _assert_stats_close(empty.merge(whole), whole)


def test_merge_rejects_mismatched_fitters():
    with pytest.raises(ValueError, match="same x_dim, z_dim and method"):
        LeaceFitter(4, 2).merge(LeaceFitter(5, 2))
    with pytest.raises(ValueError, match="same x_dim, z_dim and method"):
        LeaceFitter(4, 2).merge(LeaceFitter(4, 2, "orth"))


def test_stats_round_trip():
    n, d, k = 300, 6, 3
    x, z = _data(14, n, d, k)
    src = LeaceFitter.fit(x, z)
    buf = io.BytesIO()
    torch.save(src.stats(), buf)
    buf.seek(0)
    dst = LeaceFitter(d, k, dtype=F64).load_stats(torch.load(buf))
    _assert_stats_close(dst, src, 0)
    torch.testing.assert_close(dst.eraser(x), src.eraser(x), rtol=0, atol=0)
    # loaded statistics keep streaming like the original
    x2, z2 = _data(15, 100, d, k)
    src.update(x2, z2)
    dst.update(x2, z2)
    _assert_stats_close(dst, src, 1e-14)
    assert "c_xx" not in LeaceFitter(d, k, "orth").stats()
    # in memory: the loaded copy does not alias the source (both keep streaming independently)
    a = LeaceFitter.fit(x, z)
    b = LeaceFitter(d, k, dtype=F64).load_stats(a.stats())
    a.update(x2, z2)
    b.update(x2[:10], z2[:10])
    _assert_stats_close(a, LeaceFitter.fit(torch.cat([x, x2]), torch.cat([z, z2])))
    _assert_stats_close(b, LeaceFitter.fit(torch.cat([x, x2[:10]]), torch.cat([z, z2[:10]])))


def test_eraser_cache_invalidated_by_update():
    x, z = _data(16, 400, 6, 2)
    f = LeaceFitter.fit(x[:200], z[:200])
    first = f.eraser
    assert f.eraser is first
    f.update(x[200:], z[200:])
    second = f.eraser
    assert second is not first
    torch.testing.assert_close(second(x), LeaceEraser.fit(x, z)(x), rtol=0, atol=1e-10)


# -------------------------------------------------------------------- 6. growing classes
def test_growing_classes_equals_known_z_dim():
    n, d, k = 600, 7, 5
    x, z = _data(17, n, d, k)
    order = torch.argsort(z, stable=True)  # classes 3, 4 only appear in later batches
    x, z = x[order], z[order]
    grow = LeaceFitter(d, None, dtype=F64)
    seen = []
    for sl in _batches(n, [100, 1, 149, 200, 150]):
        grow.update(x[sl], z[sl])
        seen.append(grow.z_dim)
    assert seen[0] < k and seen[-1] == k
    known = LeaceFitter(d, k, dtype=F64).update(x, z)
    _assert_stats_close(grow, known)
    torch.testing.assert_close(grow.eraser(x), known.eraser(x), rtol=0, atol=1e-8)
    assert _rel_cov(x, grow.eraser(x), _onehot(z, k)) < 1e-6


def test_growing_fitters_merge():
    n, d, k = 400, 6, 4
    x, z = _data(18, n, d, k)
    lo, hi = z < 2, z >= 2
    a = LeaceFitter(d, None, dtype=F64).update(x[lo], z[lo])
    b = LeaceFitter(d, None, dtype=F64).update(x[hi], z[hi])
    assert (a.z_dim, b.z_dim) == (2, 4)
    merged = a.merge(b)
    xs, zs = torch.cat([x[lo], x[hi]]), torch.cat([z[lo], z[hi]])
    _assert_stats_close(merged, LeaceFitter(d, k, dtype=F64).update(xs, zs))
    # the other way round: the narrower fitter is the one merged in
    a = LeaceFitter(d, None, dtype=F64).update(x[lo], z[lo])
    b = LeaceFitter(d, None, dtype=F64).update(x[hi], z[hi])
    xs, zs = torch.cat([x[hi], x[lo]]), torch.cat([z[hi], z[lo]])
    _assert_stats_close(b.merge(a), LeaceFitter(d, k, dtype=F64).update(xs, zs))


# --------------------------------------------------------------------------- 7. shrinkage
@pytest.mark.parametrize("method", ["leace", "orth"])
def test_shrinkage_n_less_than_d(method):
    n, d, k = 50, 100, 3
    g = torch.Generator().manual_seed(19)
    z = torch.arange(n) % k
    x = torch.randn(n, d, generator=g, dtype=F64) + _onehot(z, k) @ torch.randn(
        k, d, generator=g, dtype=F64
    )
    zf = _onehot(z, k)
    fitter = LeaceFitter.fit(x, z, method=method)
    xe = fitter.eraser(x)
    assert torch.isfinite(xe).all()
    assert _rel_cov(x, xe, zf) < 1e-6
    if method == "leace":
        evals = torch.linalg.eigvalsh(fitter.sigma_xx)
        assert float(evals.min()) > 1e-3 * float(evals.max())  # positive definite
        raw = torch.linalg.eigvalsh(_cov(x, x))
        assert float(raw.min()) < 1e-10 * float(raw.max())  # the raw estimate is singular
    # without shrinkage the covariance is singular: the pinv path stays finite and still erases
    plain = LeaceFitter.fit(x, z, method=method, shrinkage=False)
    xp = plain.eraser(x)
    assert torch.isfinite(xp).all()
    assert _rel_cov(x, xp, zf) < 1e-6


def _shrinkage_oracle(s, n):
    """a S + (1 - a) tr(S)/p I, a = 1 - p^2 mu^2 / (n ||S - mu I||_F^2) clipped to [0, 1]."""
    p = s.shape[0]
    mu = torch.trace(s) / p
    dev = float((s - mu * torch.eye(p, dtype=s.dtype)).square().sum())
    a = 0.0 if dev == 0 else min(max(1 - p * p * float(mu) ** 2 / (n * dev), 0.0), 1.0)
    return a * s + (1 - a) * mu * torch.eye(p, dtype=s.dtype), a


@pytest.mark.parametrize("p,n", [(10, 400), (100, 50), (30, 30)])
def test_linear_shrinkage_formula(p, n):
    x, _ = _data(20, n, p, 2)
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    expected, a = _shrinkage_oracle(s, n)
    assert 0 < a < 1
    torch.testing.assert_close(linear_shrinkage(s, n), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p,n", [(10, 400), (100, 50), (30, 30)])
def test_linear_shrinkage_parity(p, n):
    """Same as the reference wherever its intensity lies in [0, 1] (ours clips it)."""
    ce = pytest.importorskip("concept_erasure.shrinkage")
    x, _ = _data(20, n, p, 2)
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    torch.testing.assert_close(
        linear_shrinkage(s, n), ce.optimal_linear_shrinkage(s, n), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("d", [1, 2])
def test_shrinkage_near_isotropic_stays_positive_definite(d):
    """Regression: unclipped, the intensity is << 0 for S ~ c I (always for d = 1), giving an
    indefinite covariance and an eraser that leaves the concept in place."""
    bad = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        z = torch.randint(0, 2, (100,), generator=g)
        x = torch.randn(100, d, generator=g, dtype=F64)
        x[:, 0] += 0.5 * z
        fitter = LeaceFitter.fit(x, z, svd_tol=1e-9)
        s = (fitter.c_xx + fitter.c_xx.T) / 2 / fitter.n
        torch.testing.assert_close(
            fitter.sigma_xx, _shrinkage_oracle(s, fitter.n)[0], rtol=1e-9, atol=1e-12
        )
        bad += not float(torch.linalg.eigvalsh(fitter.sigma_xx).min()) > 0
        bad += not _rel_cov(x, fitter.eraser(x), _onehot(z, 2)) < 1e-6
    assert bad == 0
    s = torch.eye(4, dtype=F64) * 2.5  # exactly isotropic: unchanged
    torch.testing.assert_close(linear_shrinkage(s, 10), s, rtol=1e-12, atol=0)


# ------------------------------------------------------------ 8. concept-erasure parity
def _ref_fit(x, z, k, **kw):
    ce = pytest.importorskip("concept_erasure")
    zf = z if z.is_floating_point() else torch.nn.functional.one_hot(z, k).to(x.dtype)
    return ce.LeaceFitter.fit(x, zf.to(x.dtype), **kw)


PARITY_CASES = [
    # (seed, n, d, k, dtype)
    (21, 500, 12, 2, F64),
    (22, 1000, 24, 4, F64),
    (23, 60, 80, 3, F64),  # n < d: shrinkage matters
    (24, 2000, 32, 5, torch.float32),
    (25, 400, 16, 3, torch.float32),
]


@pytest.mark.parametrize("method", ["leace", "orth"])
@pytest.mark.parametrize("seed,n,d,k,dtype", PARITY_CASES)
def test_parity_with_concept_erasure(method, seed, n, d, k, dtype):
    """Default settings on the same data: outputs within 1e-4 relative (measured: ~1e-14 in
    float64, ~1e-6 in float32 where the reference accumulates in float32)."""
    x, z = _data(seed, n, d, k, dtype=dtype)
    ref = _ref_fit(x, z, k, method=method).eraser
    ours = LeaceEraser.fit(x, z, method=method)
    assert ours(x).dtype == dtype
    out, exp = ours(x).to(F64), ref(x).to(F64)
    rel = float((out - exp).norm() / exp.norm())
    assert rel < (1e-12 if dtype == F64 else 1e-4)
    assert float((out - exp).abs().max() / exp.abs().max()) < 1e-4
    torch.testing.assert_close(
        ours.P.to(F64), ref.P.to(F64), rtol=0, atol=1e-10 if dtype == F64 else 1e-3
    )


def test_parity_continuous_concept_and_exact_settings():
    x, _ = _data(26, 500, 10, 2)
    g = torch.Generator().manual_seed(26)
    z = x[:, :3] @ torch.randn(3, 3, generator=g, dtype=F64) + torch.randn(500, 3, generator=g)
    for kw in ({}, {"shrinkage": False}, {"affine": False}, {"svd_tol": 1e-6}):
        ref = _ref_fit(x, z, 3, **kw).eraser
        ours = LeaceEraser.fit(x, z, **kw)
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-10 * float(x.abs().max()))


@pytest.mark.parametrize("seed", [27, 28, 29])
def test_trace_constraint_never_binds_for_leace(seed):
    """tr(P S P^T) = tr S - ||W^+ U||_F^2 <= tr S for the S that LEACE whitens with, so the
    constraint cannot act on any data (only rounding could trigger it): the erasers are equal."""
    n, d, k = (60, 80, 3) if seed == 29 else (500, 12, 4)
    x, z = _data(seed, n, d, k)
    for shrinkage in (True, False):
        con = LeaceFitter.fit(x, z, shrinkage=shrinkage)
        free = LeaceFitter.fit(x, z, shrinkage=shrinkage, constrain_cov_trace=False)
        ec, ef = con.eraser, free.eraser
        assert con.trace_mix is None
        assert torch.equal(ec.left, ef.left) and torch.equal(ec.right, ef.right)
        sigma = con.sigma_xx
        new = torch.trace(ef.P @ sigma @ ef.P.T)
        expected = torch.trace(sigma) - ef.left.square().sum()  # left = W^+ U
        assert float(new) == pytest.approx(float(expected), rel=1e-9)
        assert float(new) < float(torch.trace(sigma))


def _mixing_case():
    """P (fitted under S1) that raises the trace under S2 = I + 50 v v^T (v: where P stretches).

    LEACE never raises the trace under its own S (see above), so the constrained branch is
    reached by checking the trace under another covariance S2.
    """
    n, d, k = 300, 6, 3
    x, z = _data(30, n, d, k)
    fitter = LeaceFitter.fit(x, z, constrain_cov_trace=False)
    free = fitter.eraser
    _, _, vh = torch.linalg.svd(free.P)
    s2 = torch.eye(d, dtype=F64) + 50 * torch.outer(vh[0], vh[0])
    assert float(torch.trace(free.P @ s2 @ free.P.T)) > 5 * float(torch.trace(s2))
    # U from the whitened cross-covariance (oracle, dense)
    evals, evecs = torch.linalg.eigh(fitter.sigma_xx)
    w = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    u, s, _ = torch.linalg.svd(w @ fitter.sigma_xz, full_matrices=False)
    u = u[:, s > fitter.svd_tol]
    left, right = fitter._constrain_trace(s2, u, free.left.to(F64), free.right.to(F64))
    mixed = torch.eye(d, dtype=F64) - left @ right.T
    return x, z, k, fitter, free, s2, u, left, mixed


def test_trace_constraint_mixing_matches_oracle():
    """a P + (1 - a) Q, a the root in [0, 1] of the convex quadratic tr(P_a S2 P_a^T) = tr S2."""
    _, _, k, fitter, free, s2, u, left, mixed = _mixing_case()
    p = free.P
    q = torch.eye(p.shape[0], dtype=F64) - u @ u.T

    def excess(a):
        pa = a * p + (1 - a) * q
        return float(torch.trace(pa @ s2 @ pa.T) - torch.trace(s2))

    coef = np.polyfit([0.0, 0.5, 1.0], [excess(0.0), excess(0.5), excess(1.0)], 2)
    roots = [r.real for r in np.roots(coef) if abs(r.imag) < 1e-12 and -1e-12 <= r.real <= 1]
    assert len(roots) == 1
    a_oracle = roots[0]
    assert 0 < a_oracle < 1
    assert fitter.trace_mix == pytest.approx(a_oracle, rel=1e-9)
    assert left.shape[1] <= 2 * (k - 1)
    torch.testing.assert_close(mixed, a_oracle * p + (1 - a_oracle) * q, rtol=0, atol=1e-9)
    assert float(torch.trace(mixed @ s2 @ mixed.T)) == pytest.approx(
        float(torch.trace(s2)), rel=1e-10
    )


def test_trace_constraint_mixing_reference():
    """The reference, made to take its constrained branch by a fitter whose second ``sigma_xx``
    read returns S2, finds the same mixture P_a but refactors I - P_a as
    ``(u * s.sqrt()) @ (vh * s.sqrt())``, which scales the columns of vh instead of its rows: its
    eraser is not P_a (its trace even exceeds tr S2). It equals exactly that miscomputed
    refactorisation of our P_a, so the mixing weight agrees."""
    ce = pytest.importorskip("concept_erasure")
    x, z, k, fitter, _, s2, _, _, mixed = _mixing_case()
    d = x.shape[1]

    class SwapSigma(ce.LeaceFitter):
        reads = [fitter.sigma_xx, s2]

        @property
        def sigma_xx(self):
            return self.reads.pop(0)

    ref = SwapSigma(d, k, dtype=F64).update(x, _onehot(z, k))
    ref_p = ref.eraser.P
    assert ref.reads == []  # both reads happened: the reference took its constrained branch
    eye = torch.eye(d, dtype=F64)
    uu, ss, vvh = torch.linalg.svd(eye - mixed)
    miscomputed = eye - (uu * ss.sqrt()) @ (vvh * ss.sqrt())
    torch.testing.assert_close(ref_p, miscomputed, rtol=0, atol=1e-7)
    assert float((ref_p - mixed).abs().max()) > 0.1
    assert float(torch.trace(ref_p @ s2 @ ref_p.T)) > float(torch.trace(s2)) * 1.1


# ------------------------------------------------------------------------- 9. eraser API
def test_eraser_leading_shapes_dtypes_and_state_dict():
    n, d, k = 400, 8, 3
    x, z = _data(31, n, d, k)
    eraser = LeaceEraser.fit(x, z)
    assert eraser.dim == d and eraser.rank <= 2 * k and eraser.rank == k - 1
    assert eraser.left.shape == eraser.right.shape == (d, eraser.rank)

    xb = x[:24].reshape(2, 3, 4, d)
    torch.testing.assert_close(eraser(xb), eraser(x[:24]).reshape(2, 3, 4, d), rtol=0, atol=0)
    row = torch.stack([eraser(r) for r in x[:24]])  # 1-D input (d,)
    torch.testing.assert_close(row, eraser(x[:24]), rtol=0, atol=1e-12)

    e64 = eraser.to(dtype=F64)
    e16 = eraser.to(dtype=torch.float16)
    assert e16.left.dtype == e16.right.dtype == e16.bias.dtype == torch.float16
    out16 = e16(x[:50].half())
    assert out16.dtype == torch.float16
    ref = e64(x[:50])
    assert float((out16.double() - ref).abs().max() / ref.abs().max()) < 1e-2
    # the eraser casts its factors to the input's dtype
    out32 = eraser(x[:50].float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))

    buf = io.BytesIO()
    torch.save(eraser.state_dict(), buf)
    buf.seek(0)
    back = LeaceEraser.from_state_dict(torch.load(buf))
    torch.testing.assert_close(back(x), eraser(x), rtol=0, atol=0)

    plain = LeaceEraser.fit(x, z, affine=False)
    assert plain.bias is None
    back = LeaceEraser.from_state_dict(plain.state_dict())
    assert back.bias is None
    torch.testing.assert_close(back(x), plain(x), rtol=0, atol=0)
    # without the bias the linear part is the same and the offset is (I - P) mu
    shift = eraser.left @ (eraser.right.T @ x.mean(0))
    torch.testing.assert_close(plain(x), eraser(x) - shift, rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", ["leace", "orth"])
def test_projection_matrix(method):
    n, d, k = 500, 9, 4
    x, z = _data(32, n, d, k)
    eraser = LeaceEraser.fit(x, z, method=method, constrain_cov_trace=False)
    p = eraser.P
    torch.testing.assert_close(
        p, torch.eye(d, dtype=F64) - eraser.left @ eraser.right.T, rtol=0, atol=0
    )
    torch.testing.assert_close(p @ p, p, rtol=0, atol=1e-10)  # idempotent (oblique for LEACE)
    sxz = _cov(x, _onehot(z, k))
    assert float((p @ sxz).abs().max()) < 1e-10 * float(sxz.abs().max())
    if method == "orth":
        torch.testing.assert_close(p, p.T, rtol=0, atol=1e-12)
        assert float(torch.trace(p)) == pytest.approx(d - (k - 1), abs=1e-9)
    else:
        assert float((p - p.T).abs().max()) > 1e-3  # genuinely oblique on anisotropic data


def test_eraser_dtype_follows_fit_input():
    x, z = _data(33, 200, 5, 2, dtype=torch.float32)
    fitter = LeaceFitter.fit(x, z)
    assert fitter.mean_x.dtype == F64 and fitter.eraser.left.dtype == torch.float32
    e64 = LeaceFitter.fit(x, z, dtype=F64).eraser
    assert e64.left.dtype == F64
    torch.testing.assert_close(fitter.eraser.left.double(), e64.left, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------- 10. bad input
def test_bad_inputs():
    x, z = _data(34, 50, 6, 3)
    fitter = LeaceFitter(6, 3)
    with pytest.raises(ValueError, match="x has 5 features but the fitter was built with x_dim=6"):
        fitter.update(x[:, :5], z)
    with pytest.raises(ValueError, match="x has 50 rows but z has 49"):
        fitter.update(x, z[:49])
    bad = x.clone()
    bad[3, 1] = float("nan")
    bad[7, 0] = float("inf")
    bad[7, 2] = float("nan")
    bad[9] = float("nan")
    with pytest.raises(ValueError, match=r"3 of 50 rows of x contain NaN or inf"):
        fitter.update(bad, z)
    assert fitter.n == 0  # nothing was accumulated
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 3\); got range \[0, 3\]"):
        fitter.update(x, torch.where(z == 2, 3, z))
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 3\); got range \[-1, 2\]"):
        fitter.update(x, torch.where(z == 0, -1, z))
    with pytest.raises(ValueError, match="concept has 4 columns but z_dim=3"):
        fitter.update(x, _onehot(z, 4))
    with pytest.raises(ValueError, match=r"float vector \(n,\): pass z_dim=1"):
        LeaceFitter.fit(x, z.double())
    with pytest.raises(ValueError, match=r"float vector \(n,\): pass z_dim=1"):
        LeaceFitter(6, None).update(x, z.double())
    # a float (n,) concept with z_dim=1 is a continuous concept and works
    assert LeaceEraser.fit(x, x[:, 0] * 2, z_dim=1).rank == 1

    few = LeaceFitter(6, 5).update(x[:3], torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match=r"at least max\(2, z_dim=5\) samples.*has seen 3"):
        _ = few.eraser
    with pytest.raises(ValueError, match=r"has seen 1"):
        _ = LeaceFitter(6, 1).update(x[:1], x[:1, 0:1]).eraser
    with pytest.raises(ValueError, match=r"has seen 0"):
        _ = LeaceFitter(6, 2).sigma_xz

    eraser = LeaceEraser.fit(x, z)
    with pytest.raises(ValueError, match=r"fitted on 6-dimensional features .*\(4, 7\)"):
        eraser(torch.zeros(4, 7, dtype=F64))
    with pytest.raises(ValueError, match=r"method='pca': use 'leace' or 'orth'"):
        LeaceFitter(6, 2, method="pca")
    for tol in (0, -1e-3):
        with pytest.raises(ValueError, match="svd_tol=.* must be positive"):
            LeaceFitter(6, 2, svd_tol=tol)
    with pytest.raises(ValueError, match="both must be >= 1"):
        LeaceFitter(0, 2)
    with pytest.raises(RuntimeError, match="does not track the covariance"):
        _ = LeaceFitter.fit(x, z, method="orth").sigma_xx


# ------------------------------------------------------------------------- 11. numpy input
@pytest.mark.parametrize("method", ["leace", "orth"])
def test_numpy_input_matches_torch(method):
    """numpy x and z work in LeaceFitter.fit / update and LeaceEraser.fit; numpy in, numpy out."""
    x, z = _data(35, 300, 7, 3)
    x_np, z_np = x.numpy(), z.numpy()
    ref = LeaceFitter.fit(x, z, method=method).eraser

    def same(eraser):
        assert isinstance(eraser.left, torch.Tensor) and eraser.left.dtype == F64
        for a, b in ((eraser.left, ref.left), (eraser.right, ref.right), (eraser.bias, ref.bias)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    same(LeaceFitter.fit(x_np, z_np, method=method).eraser)
    same(LeaceEraser.fit(x_np, z_np, method=method))
    fitter = LeaceFitter(7, 3, method=method, dtype=F64)
    streamed = LeaceFitter(7, None, method=method, dtype=F64)
    for s in range(0, 300, 100):
        fitter.update(x_np[s : s + 100], z_np[s : s + 100])
        streamed.update(x_np[s : s + 100], z_np[s : s + 100])
    torch_fitter = LeaceFitter(7, 3, method=method, dtype=F64)
    for s in range(0, 300, 100):
        torch_fitter.update(x[s : s + 100], z[s : s + 100])
    for f in (fitter, streamed):
        torch.testing.assert_close(f.eraser.left, torch_fitter.eraser.left, rtol=0, atol=0)
    one_hot = _onehot(z, 3).numpy()
    torch.testing.assert_close(
        LeaceFitter.fit(x_np, one_hot, method=method).eraser.left, ref.left, rtol=0, atol=1e-12
    )

    out = ref(x_np)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == x_np.shape
    np.testing.assert_array_equal(out, ref(x).numpy())
    out32 = ref(x_np.astype(np.float32))
    assert isinstance(out32, np.ndarray) and out32.dtype == np.float32
    np.testing.assert_array_equal(out32, ref(x.float()).numpy())
    np.testing.assert_array_equal(ref(x_np[:24].reshape(2, 12, 7)), out[:24].reshape(2, 12, 7))
    frozen = x_np.copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning from torch
        np.testing.assert_array_equal(ref(frozen), out)
    ints = np.rint(x_np * 10).astype(np.int64)
    np.testing.assert_allclose(ref(ints), ref(torch.as_tensor(ints, dtype=F64)).numpy(), atol=0)
    with pytest.raises(ValueError, match="fitted on 7-dimensional features"):
        ref(x_np[:, :5])


# ---------------------------------------------------------------- 12. float32 products path
def _activation_like(seed, n, d, k):
    """Ill-conditioned, activation-like float32 features: per-feature scales spanning 10^1.5, a
    rank-8 shared component with variances spanning 10^3, class means and a +0.5 offset (the
    benchmark's generator, smaller)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, k, (n,), generator=g)
    scales = torch.logspace(-1, 0.5, d)[torch.randperm(d, generator=g)]
    basis = torch.randn(8, d, generator=g) / 8**0.5
    x = torch.randn(n, d, generator=g) * scales
    x += torch.randn(n, 8, generator=g) * torch.logspace(1, -0.5, 8) @ basis
    x += torch.randn(k, d, generator=g)[z] * 0.3 + 0.5
    return x.float(), z


def _stream(fitter, x, z, batch):
    for s in range(0, x.shape[0], batch):
        fitter.update(x[s : s + batch], z[s : s + batch])
    return fitter


def _max_row_rel(a, b):
    a, b = a.double(), b.double()
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


@pytest.mark.parametrize("d", [80, 400])
def test_float32_path_matches_float64_path(d):
    """float32 input takes the float32-products path by default; its statistics are within
    ~1e-7 of the float64 path's, across several flush windows with an uneven last batch. The
    eraser amplifies that with the conditioning of S_xx (here 1e4 - 3e5): its output stays within
    1e-4 relative (measured 3e-5 / 6e-5), several times closer than concept-erasure's float32
    default (its float32 solve and uncentred float32 accumulation)."""
    n, k = 12_000, 4
    x, z = _activation_like(40 + d, n, d, k)
    f32 = _stream(LeaceFitter(d, k), x, z, 1000)
    f64 = _stream(LeaceFitter(d, k, precision="float64"), x, z, 1000)
    assert f32._win is not None and f64._win is None  # the paths really differ
    assert f32.n == f64.n == n
    torch.testing.assert_close(f32.mean_x, f64.mean_x, rtol=0, atol=1e-6)  # float32 sums
    scale = float(f64.c_xx.abs().max())
    assert float((f32.c_xx - f64.c_xx).abs().max()) < 3e-7 * scale
    assert float((f32.c_xz - f64.c_xz).abs().max()) < 2e-6 * float(f64.c_xz.abs().max())
    torch.testing.assert_close(f32.c_xx, f32.c_xx.T, rtol=0, atol=1e-14 * scale)  # mirrored
    xt, _ = _activation_like(99, 2000, d, k)
    ref = f64.eraser.to(dtype=F64)(xt.double())
    err = _max_row_rel(f32.eraser.to(dtype=F64)(xt.double()), ref)
    assert err < 1e-4
    ce = pytest.importorskip("concept_erasure")
    theirs = ce.LeaceFitter(d, k, dtype=torch.float32)
    for s in range(0, n, 1000):
        theirs.update(x[s : s + 1000], torch.nn.functional.one_hot(z[s : s + 1000], k).float())
    assert err < 0.25 * _max_row_rel(theirs.eraser(xt), ref)
    # float64 input (or d < 64) keeps the float64 path; precision="float32" converts it
    assert LeaceFitter(63, k).update(x[:10, :63], z[:10])._win is None
    g = LeaceFitter(d, k)
    g.update(x[:100].double(), z[:100])
    assert g._win is None
    h = LeaceFitter(d, k, precision="float32").update(x[:100].double(), z[:100])
    assert h._win is not None and h._win.n == 100


def test_float32_path_oracle_and_reads_mid_stream():
    """Statistics oracle (float64 sums of the float32 rows), unaffected by when they are read:
    flushing early (every read) or late gives the same statistics to float32 rounding (the
    column sums of the centred rows are float32, the class counts exact)."""
    n, d, k = 3_000, 30, 3
    x, z = _activation_like(50, n, d, k)
    x = x + 100.0  # a large offset: centring on the window's shift keeps the products small
    late = LeaceFitter(d, k, precision="float32")
    late.flush_rows = 10**9  # one window for the whole stream
    early = LeaceFitter(d, k, precision="float32")
    for s in range(0, n, 256):
        late.update(x[s : s + 256], z[s : s + 256])
        early.update(x[s : s + 256], z[s : s + 256])
        assert early.n == min(n, s + 256)  # a read: flushes the window
    xd = x.double()
    xc = xd - xd.mean(0)
    zc = _onehot(z, k) - _onehot(z, k).mean(0)
    for f in (late, early):
        torch.testing.assert_close(f.mean_x, xd.mean(0), rtol=0, atol=1e-6)  # of centred rows
        torch.testing.assert_close(f.mean_z, _onehot(z, k).mean(0), rtol=0, atol=1e-12)
        torch.testing.assert_close(
            f.c_xx, xc.T @ xc, rtol=0, atol=1e-6 * float(xc.square().sum(0).max())
        )
        torch.testing.assert_close(f.c_xz, xc.T @ zc, rtol=0, atol=1e-6 * n)


def test_float32_path_merge_grow_stats_and_nan():
    """Pending windows take part in merge / stats / load_stats; growing classes flush; NaN rows
    are refused before anything is accumulated."""
    n, d = 2_000, 12
    x, z = _activation_like(60, n, d, 3)
    whole = LeaceFitter(d, 3, precision="float64").update(x, z)
    f32 = dict(precision="float32")  # d < 64: not the default
    a = _stream(LeaceFitter(d, None, **f32), x[:900], z[:900], 128)  # classes grow as they appear
    b = _stream(LeaceFitter(d, 3, **f32), x[900:], z[900:], 128)
    assert a._win.n > 0 and b._win.n > 0  # windows pending
    merged = a.merge(b)
    assert merged.z_dim == 3
    torch.testing.assert_close(
        merged.c_xx, whole.c_xx, rtol=0, atol=1e-5 * float(whole.c_xx.abs().max())
    )
    torch.testing.assert_close(merged.c_xz, whole.c_xz, rtol=0, atol=1e-5 * n)
    # stats() flushes; load_stats() replaces (a pending window is dropped)
    c = _stream(LeaceFitter(d, 3, **f32), x[:500], z[:500], 100)
    st = c.stats()
    assert int(st["n"]) == 500
    e = _stream(LeaceFitter(d, 3, **f32), x[500:700], z[500:700], 100).load_stats(st)
    assert e.n == 500
    torch.testing.assert_close(e.c_xx, c.c_xx, rtol=0, atol=0)
    bad = x[:50].clone()
    bad[3, 1] = float("nan")
    bad[7] = float("inf")
    fitter = LeaceFitter(d, 3, **f32)
    with pytest.raises(ValueError, match=r"2 of 50 rows of x contain NaN or inf"):
        fitter.update(bad, z[:50])
    assert fitter.n == 0
    with pytest.raises(ValueError, match="precision='bf16'"):
        LeaceFitter(d, 3, precision="bf16")


def test_float64_precision_keeps_the_float64_path():
    """precision='float64' on float32 input is the float64 Welford path: bit-identical to feeding
    the rows as float64."""
    x, z = _activation_like(70, 600, 16, 3)
    a = _stream(LeaceFitter(16, 3, precision="float64"), x, z, 100)
    b = _stream(LeaceFitter(16, 3), x.double(), z, 100)
    for key, v in a.stats().items():
        torch.testing.assert_close(v, b.stats()[key], rtol=0, atol=0)


def test_float32_path_big_batch_equals_small_batches():
    """One big float32 update is split into windows of flush_rows rows: the same statistics as
    feeding those windows one by one, and a NaN anywhere refuses the whole batch."""
    x, z = _activation_like(80, 5_000, 96, 3)
    one = LeaceFitter(96, 3).update(x, z)
    many = _stream(LeaceFitter(96, 3), x, z, LeaceFitter.flush_rows)
    for key, v in many.stats().items():
        torch.testing.assert_close(one.stats()[key], v, rtol=0, atol=0)
    bad = x.clone()
    bad[4_500, 3] = float("nan")
    fitter = LeaceFitter(96, 3)
    with pytest.raises(ValueError, match="1 of 5000 rows of x contain NaN or inf"):
        fitter.update(bad, z)
    assert fitter.n == 0
