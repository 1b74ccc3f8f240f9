"""Tests of the PSMI estimator (lightning_memo.psmi) against independent oracles.

Oracles: a brute-force loop implementation of Algorithm 1 (Wongso et al., ISIT 2023) written
here, and the reference package ``psmi`` 0.2.0 (tests skip cleanly when it is not installed).
"""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

import lightning_memo.psmi as psmi_mod
from lightning_memo.exceptions import NotFittedError
from lightning_memo.psmi import PSMI, sample_directions

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
F64 = torch.float64  # opt-in float64 arithmetic: the oracle comparisons at 1e-10


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------- helpers
def make_clusters(n, d, n_classes, sep, seed):
    """Gaussian clusters: ``n`` samples, balanced labels ``0..n_classes-1``, unit noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    rng.shuffle(y)
    centers = rng.normal(0.0, sep, (n_classes, d))
    x = centers[y] + rng.normal(0.0, 1.0, (n, d))
    return x, y


def unit_directions(m, d, seed):
    """``m`` normalised Gaussian directions from numpy (independent of torch's sampler)."""
    g = np.random.default_rng(seed).normal(size=(m, d))
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def oracle_psmi(x_fit, y_fit, theta, x_eval=None, y_eval=None, log_space=False, floor=0.0):
    """Brute-force PSMI: loops over directions j, classes c and samples i, in float64.

    Per class and direction: mean and population std of the projections of ``x_fit``; variances
    below ``floor * var_all_j`` are raised to it. ``pmi_ij = log N(p_ij; mu_yj, s_yj) -
    log sum_c pi_c N(p_ij; mu_cj, s_cj)``; the denominator is ``log(sum(exp(.)))`` or, with
    ``log_space``, ``scipy.special.logsumexp``.

    Returns:
        mean (n_eval,), population std (n_eval,), full (n_eval, m), means {c: (m,)},
        stds {c: (m,)}.
    """
    x_fit = np.asarray(x_fit, dtype=np.float64)
    y_fit = [int(v) for v in np.asarray(y_fit)]
    theta = np.asarray(theta, dtype=np.float64)
    x_eval = x_fit if x_eval is None else np.asarray(x_eval, dtype=np.float64)
    y_eval = y_fit if y_eval is None else [int(v) for v in np.asarray(y_eval)]
    n, m = len(y_fit), theta.shape[0]
    classes = sorted(set(y_fit))
    prior = {c: y_fit.count(c) / n for c in classes}
    mu = {c: np.zeros(m) for c in classes}
    sd = {c: np.zeros(m) for c in classes}
    for j in range(m):
        proj = [
            math.fsum(theta[j, k] * x_fit[i, k] for k in range(x_fit.shape[1])) for i in range(n)
        ]
        mean_all = math.fsum(proj) / n
        var_all = math.fsum((p - mean_all) ** 2 for p in proj) / n
        for c in classes:
            vals = [p for p, lab in zip(proj, y_fit) if lab == c]
            mean = math.fsum(vals) / len(vals)
            var = math.fsum((v - mean) ** 2 for v in vals) / len(vals)
            mu[c][j] = mean
            sd[c][j] = math.sqrt(max(var, floor * var_all))
    full = np.zeros((len(y_eval), m))
    for i, yi in enumerate(y_eval):
        for j in range(m):
            p = math.fsum(theta[j, k] * x_eval[i, k] for k in range(x_eval.shape[1]))
            own = stats.norm.logpdf(p, loc=mu[yi][j], scale=sd[yi][j])
            terms = [
                math.log(prior[c])
                - 0.5 * ((p - mu[c][j]) / sd[c][j]) ** 2
                - math.log(sd[c][j])
                - LOG_SQRT_2PI
                for c in classes
            ]
            if log_space:
                den = logsumexp(terms)
            else:
                den = math.log(math.fsum(math.exp(t) for t in terms))
            full[i, j] = own - den
    return full.mean(axis=1), full.std(axis=1), full, mu, sd


@pytest.fixture(scope="module")
def small():
    """n = 60, d = 5, 3 classes (labels 2, 5, 9 to exercise the label mapping), m = 40."""
    x, y = make_clusters(60, 5, 3, sep=2.0, seed=11)
    y = np.array([2, 5, 9])[y]
    theta = unit_directions(40, 5, seed=12)
    return x, y, theta


# ---------------------------------------------------------------------------------- 1. oracle
def test_matches_brute_force_oracle(small):
    """Given directions, mean/std/full equal the loop oracle to 1e-10 (float64)."""
    x, y, theta = small
    mean, std, full = PSMI(n_estimators=1, dtype=F64).fit_transform_with_directions(x, y, theta)
    o_mean, o_std, o_full, o_mu, o_sd = oracle_psmi(x, y, theta)
    assert isinstance(full, np.ndarray) and full.shape == (60, 40)
    np.testing.assert_allclose(full, o_full, rtol=0, atol=1e-10)
    np.testing.assert_allclose(mean, o_mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(std, o_std, rtol=0, atol=1e-10)
    # the scores are not trivial: positive and negative ones, and a spread over directions
    assert mean.min() < 0 < mean.max() and std.min() > 0.01


def test_float32_default_matches_oracle(small):
    """The default (float32 arithmetic on float64 input) gives the oracle to 1e-5, float64 out."""
    x, y, theta = small
    est = PSMI(n_estimators=1)
    mean, std, full = est.fit_transform_with_directions(x, y, theta)
    o_mean, o_std, o_full, o_mu, o_sd = oracle_psmi(x, y, theta)
    assert mean.dtype == std.dtype == full.dtype == np.float64
    np.testing.assert_allclose(full, o_full, rtol=0, atol=1e-5)
    np.testing.assert_allclose(mean, o_mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(std, o_std, rtol=0, atol=1e-6)
    assert np.abs(full - o_full).max() > 1e-12  # really float32 arithmetic
    for c in (2, 5, 9):
        np.testing.assert_allclose(est.mean_per_label[c], o_mu[c], rtol=0, atol=1e-5)
        np.testing.assert_allclose(est.std_per_label[c], o_sd[c], rtol=1e-5)


def test_matches_oracle_with_few_chunked_directions_and_min_block(small):
    """Directions split over several ``min_n_estimators`` blocks still match the oracle."""
    x, y, theta = small
    est = PSMI(n_estimators=1, min_n_estimators=7, dtype=F64)
    mean, std, full = est.fit_transform_with_directions(x, y, theta)
    o_mean, o_std, o_full, o_mu, o_sd = oracle_psmi(x, y, theta)
    np.testing.assert_allclose(full, o_full, rtol=0, atol=1e-10)
    np.testing.assert_allclose(std, o_std, rtol=0, atol=1e-10)
    np.testing.assert_allclose(est.thetas, theta, rtol=0, atol=0)
    for c in (2, 5, 9):
        np.testing.assert_allclose(est.mean_per_label[c], o_mu[c], rtol=0, atol=1e-12)
        np.testing.assert_allclose(est.std_per_label[c], o_sd[c], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------- 2. parity
@pytest.fixture(scope="module")
def reference_run():
    """The ``psmi`` package and ours on the same data, 20,000 directions each."""
    ref_pkg = pytest.importorskip("psmi")
    x, y = make_clusters(600, 16, 4, sep=1.0, seed=0)
    np.random.seed(0)
    ref = ref_pkg.PSMI(n_estimators=20_000)
    r_mean, r_std, r_full = ref.fit_transform(x, y)
    o_mean, o_std, _ = PSMI(n_estimators=20_000, seed=0).fit_transform(x, y, return_full=False)
    return x, y, ref, (r_mean, r_std, r_full), (o_mean, o_std)


def test_parity_with_reference_package_independent_directions(reference_run):
    """Independent 20,000-direction estimates agree: mean |diff| < 0.01, Spearman >= 0.99."""
    _, _, _, (r_mean, r_std, _), (o_mean, o_std) = reference_run
    assert np.isfinite(r_mean).all()
    assert np.abs(o_mean - r_mean).mean() < 0.01
    assert stats.spearmanr(o_mean, r_mean).statistic >= 0.99
    assert np.abs(o_std - r_std).mean() < 0.02
    # the two estimates differ (different directions), so the tolerance is actually used
    assert np.abs(o_mean - r_mean).max() > 1e-6


def test_parity_with_reference_package_same_directions(reference_run):
    """With the reference's own directions our output equals theirs to 1e-10 where finite."""
    x, y, ref, (r_mean, r_std, r_full), _ = reference_run
    est = PSMI(n_estimators=1, dtype=F64)
    mean, std, full = est.fit_transform_with_directions(x, y, ref.thetas)
    finite = np.isfinite(r_full)
    assert finite.mean() > 0.99
    np.testing.assert_allclose(full[finite], r_full[finite], rtol=0, atol=1e-10)
    rows = finite.all(axis=1)
    np.testing.assert_allclose(mean[rows], r_mean[rows], rtol=0, atol=1e-10)
    np.testing.assert_allclose(std[rows], r_std[rows], rtol=0, atol=1e-10)
    assert est.frequency_per_label == pytest.approx(ref.frequency_per_label, abs=1e-15)
    for c in ref.mean_per_label:
        np.testing.assert_allclose(
            est.mean_per_label[int(c)], ref.mean_per_label[c], rtol=0, atol=1e-12
        )
        np.testing.assert_allclose(
            est.std_per_label[int(c)], ref.std_per_label[c], rtol=0, atol=1e-12
        )


# ---------------------------------------------------------------------------------- 3. types
def test_numpy_in_numpy_out_float64(small):
    """numpy (float64 or int) and list input give float64 numpy output."""
    x, y, _ = small
    ref = PSMI(n_estimators=20, seed=3).fit_transform(x, y)
    for feats in (x, np.rint(x * 10).astype(np.int64), x.tolist()):
        out = PSMI(n_estimators=20, seed=3).fit_transform(feats, list(y))
        for a in out:
            assert isinstance(a, np.ndarray) and a.dtype == np.float64
        assert out[0].shape == (60,) and out[2].shape == (60, 20)
    np.testing.assert_allclose(
        PSMI(n_estimators=20, seed=3).fit_transform(x.tolist(), y)[0], ref[0], rtol=0, atol=1e-14
    )
    est = PSMI(n_estimators=20, seed=3).fit(x, y)
    assert isinstance(est.thetas, np.ndarray) and isinstance(est.mean_per_label[2], np.ndarray)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_in_tensor_out(small, device, dtype):
    """Tensors in give tensors of the same dtype and device out."""
    x, y, theta = small
    xt = torch.as_tensor(x, dtype=dtype, device=device)
    yt = torch.as_tensor(y, device=device)
    est = PSMI(n_estimators=25, seed=4)
    out = est.fit_transform(xt, yt)
    for a in out:
        assert isinstance(a, torch.Tensor) and a.dtype == dtype and a.device == xt.device
    assert out[2].shape == (60, 25)
    out2 = est.transform(xt, yt)
    for a in out2:
        assert isinstance(a, torch.Tensor) and a.dtype == dtype and a.device == xt.device
    assert isinstance(est.thetas, torch.Tensor) and est.thetas.shape == (25, 5)
    mean, _, full = PSMI(n_estimators=1).fit_transform_with_directions(xt, yt, theta)
    o_mean, _, o_full, _, _ = oracle_psmi(x, y, theta)
    tol = 1e-5 if dtype == torch.float64 else 1e-4  # float32 arithmetic either way
    np.testing.assert_allclose(full.cpu().double().numpy(), o_full, rtol=0, atol=tol)
    np.testing.assert_allclose(mean.cpu().double().numpy(), o_mean, rtol=0, atol=tol)
    mean, _, full = PSMI(n_estimators=1, dtype=F64).fit_transform_with_directions(xt, yt, theta)
    assert full.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-4  # float64 arithmetic, float32 input
    np.testing.assert_allclose(full.cpu().double().numpy(), o_full, rtol=0, atol=tol)


def test_float32_close_to_float64():
    """float32 tensors give the float64 result to 1e-4 (same seed, same directions)."""
    x, y = make_clusters(300, 12, 4, sep=1.5, seed=5)
    y = torch.as_tensor(y)
    m64, s64, f64 = PSMI(n_estimators=400, seed=6, dtype=F64).fit_transform(torch.as_tensor(x), y)
    m32, s32, f32 = PSMI(n_estimators=400, seed=6).fit_transform(
        torch.as_tensor(x, dtype=torch.float32), y
    )
    assert m32.dtype == torch.float32 and m64.dtype == torch.float64
    assert (m32.double() - m64).abs().max() < 1e-4
    assert (s32.double() - s64).abs().max() < 1e-4
    assert (f32.double() - f64).abs().max() < 1e-3
    assert (m32.double() - m64).abs().max() > 0  # really computed in float32


def test_float32_default_agrees_with_float64_opt_in():
    """float64 input: the default (float32 arithmetic) is within 1e-5 of dtype=float64, returns
    float64, and is far closer to it than the Monte-Carlo error of the directions."""
    x, y = make_clusters(2_000, 48, 5, sep=0.4, seed=30)
    x = x + 3.0  # an offset, as activations have
    x[:, :4] = 0  # dead units
    ref = PSMI(n_estimators=1_500, seed=31, dtype=F64).fit_transform(x, y)
    got = PSMI(n_estimators=1_500, seed=31).fit_transform(x, y)
    for a in got:
        assert isinstance(a, np.ndarray) and a.dtype == np.float64
    np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[2], ref[2], rtol=0, atol=1e-3)
    other = PSMI(n_estimators=1_500, seed=32, dtype=F64).fit_transform(x, y)[0]
    mc = np.abs(other - ref[0]).mean()  # directions' error, two independent estimates
    assert np.abs(got[0] - ref[0]).mean() < 1e-3 * mc
    # float32 / float16 / bfloat16 feature buffers: float32 output, converted chunk by chunk
    xt = torch.as_tensor(x)
    for dt, tol in ((torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)):
        m = PSMI(n_estimators=1_500, seed=31).fit_transform(xt.to(dt), torch.as_tensor(y))[0]
        assert m.dtype == torch.float32
        assert np.abs(m.double().numpy() - ref[0]).mean() < tol


def test_dtype_validation():
    """dtype takes None (float32 arithmetic) or torch.float64 only."""
    with pytest.raises(ValueError, match="dtype=torch.float16"):
        PSMI(n_estimators=5, dtype=torch.float16)


# ---------------------------------------------------------------------------------- 4. seeds
def test_seeded_reproducibility(small):
    """Same seed: identical; other seed: different; generator= and torch.manual_seed work."""
    x, y, _ = small

    def run(**kw):
        est = PSMI(n_estimators=30, **kw)
        return est.fit_transform(x, y), est.thetas

    (a, ta), (b, tb), (c, tc) = run(seed=1), run(seed=1), run(seed=2)
    assert np.array_equal(ta, tb) and all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.allclose(ta, tc) and not np.allclose(a[0], c[0])
    g, tg = run(generator=torch.Generator().manual_seed(1))
    assert np.array_equal(tg, ta) and np.array_equal(g[0], a[0])
    # generator takes precedence over seed
    _, tgs = run(seed=99, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(tgs, ta)
    # seedless: drawn from torch's global RNG
    torch.manual_seed(1234)
    (d, td) = run()
    torch.manual_seed(1234)
    (e, te) = run()
    (f, tf) = run()
    assert np.array_equal(td, te) and np.array_equal(d[0], e[0])
    assert not np.allclose(td, tf)
    # the directions are unit vectors
    np.testing.assert_allclose(np.linalg.norm(ta, axis=1), 1.0, rtol=0, atol=1e-12)


def test_sample_directions_prefix_independent_of_m():
    """The first k * unit directions do not depend on m."""
    a = sample_directions(40, 6, torch.Generator().manual_seed(0), unit=20)
    b = sample_directions(100, 6, torch.Generator().manual_seed(0), unit=20)
    assert a.shape == (40, 6) and a.dtype == torch.float64
    assert torch.equal(a, b[:40])
    with pytest.raises(ValueError, match="directions='sobol'"):
        sample_directions(4, 3, torch.Generator(), kind="sobol")


# ---------------------------------------------------------------------------------- 5. chunks
def test_chunked_equals_unchunked(monkeypatch):
    """A tiny memory budget (a few directions per block), tiny tasks (one row each) and the
    parallel workers give the one-block, inline result to 1e-12 (float64 arithmetic)."""
    x, y = make_clusters(90, 6, 3, sep=1.5, seed=7)
    x_new, y_new = make_clusters(40, 6, 3, sep=1.5, seed=7)
    blocks = []
    project = psmi_mod._Engine.project

    def spy(self, theta, stats):
        blocks.append(theta.shape[0])
        return project(self, theta, stats)

    monkeypatch.setattr(psmi_mod._Engine, "project", spy)

    def run(**kw):
        blocks.clear()
        est = PSMI(n_estimators=150, min_n_estimators=60, seed=8, dtype=F64, **kw)
        out = est.fit_transform(x, y)
        return est, out, est.transform(x_new[:37], y_new[:37])

    e_ref, base, base_new = run()
    assert blocks == [150, 150]  # one block in fit_transform, one in transform
    e_small, small_budget, small_new = run(memory_budget_mb=0.01)
    assert 2 * 150 / 20 < len(blocks) and max(blocks) < 20
    monkeypatch.setattr(psmi_mod, "_CHUNK_ELEMENTS", 16)
    _, tiny, tiny_new = run(memory_budget_mb=0.01)
    _, tiny_rows, _ = run()
    monkeypatch.setattr(psmi_mod, "_PARALLEL_MIN_TERMS", 0)  # tasks on 2 workers
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, pooled, pooled_new = run()
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    for other in (small_budget, tiny, tiny_rows, pooled):
        for a, b in zip(base, other):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    for other in (small_new, tiny_new, pooled_new):
        for a, b in zip(base_new, other):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    o_mean, o_std, _, _, _ = oracle_psmi(x, y, e_ref.thetas, x_new[:37], y_new[:37])
    np.testing.assert_allclose(tiny_new[0], o_mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(tiny_new[1], o_std, rtol=0, atol=1e-10)


def _profiled_peak_bytes(fn):
    """Peak of the bytes torch allocates while ``fn`` runs (``torch.profiler``, CPU memory: op
    allocations in time order, frees included), and the largest single allocation."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        keep = fn()
    live = peak = largest = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
        largest = max(largest, e.self_cpu_memory_usage)
    del keep
    return peak, largest


def test_memory_budget_bounds_peak_allocations():
    """memory_budget_mb bounds every allocation of a call: no copy of the features (sorted or
    converted), no (n, d) mask; the old estimator's sorted copy alone exceeded the budget."""
    rng = np.random.default_rng(0)
    n, d, budget_mb = 20_000, 256, 8.0
    x = rng.normal(size=(n, d))  # float64: 41 MB, a float32 copy would be 20 MB
    x[:, :10] = 0  # dead columns: the old code built an (n, d) mask to find them
    y = np.arange(n) % 5

    def call():
        est = PSMI(n_estimators=300, seed=0, memory_budget_mb=budget_mb, return_full=False)
        return est.fit_transform(x, y)

    call()  # warm-up
    peak, largest = _profiled_peak_bytes(call)
    assert peak <= budget_mb * 2**20, peak / 2**20
    assert largest < n * (d - 10) * 4 / 2  # far below one float32 copy of the live columns

    # the budget scales the block: a larger budget, larger blocks, same result
    def big():
        est = PSMI(n_estimators=300, seed=0, memory_budget_mb=64, return_full=False)
        return est.fit_transform(x, y)

    peak_big, _ = _profiled_peak_bytes(big)
    assert budget_mb * 2**20 < peak_big <= 64 * 2**20
    np.testing.assert_allclose(big()[0], call()[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- 6. outlier
def _outlier_setup():
    x, y = make_clusters(60, 5, 3, sep=2.0, seed=13)
    x_out = np.vstack([1e3 * np.ones(5), -7e2 * np.ones(5), x[:2]])
    y_out = np.array([0, 2, y[0], y[1]])
    return x, y, x_out, y_out


def test_outlier_finite_and_matches_log_space_oracle():
    """A sample far from every class gets a finite PSMI equal to the logsumexp oracle."""
    x, y, x_out, y_out = _outlier_setup()
    theta = unit_directions(30, 5, seed=14)
    o_mean, o_std, o_full, _, _ = oracle_psmi(x, y, theta, x_out, y_out, log_space=True)
    for dtype, tol in ((F64, 1e-9), (None, 1e-5)):  # float64 opt-in, float32 default
        est = PSMI(n_estimators=1, dtype=dtype)
        est.fit_transform_with_directions(x, y, theta)
        mean, std, full = est.transform(x_out, y_out)
        assert np.isfinite(full).all() and np.isfinite(mean).all() and np.isfinite(std).all()
        np.testing.assert_allclose(full, o_full, rtol=tol, atol=tol)
        np.testing.assert_allclose(mean, o_mean, rtol=tol, atol=tol)
        np.testing.assert_allclose(std, o_std, rtol=tol, atol=tol)
        assert mean[0] < -100 and mean[1] < -100  # far outliers get very negative scores


def test_huge_and_tiny_features_finite_in_float32():
    """float64 features beyond float32's range (or far below it) give the float64 result: PSMI
    is scale invariant and the float32 path rescales by a power of two."""
    x, y = make_clusters(200, 6, 3, sep=1.5, seed=40)
    ref = PSMI(n_estimators=100, seed=41, dtype=F64).fit_transform(x, y)[0]
    for scale in (1e200, 1e-200):
        est = PSMI(n_estimators=100, seed=41)
        got = est.fit_transform(x * scale, y)[0]
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
        np.testing.assert_allclose(est.transform(x * scale, y)[0], got, rtol=0, atol=1e-6)
        c = int(y[0])
        proj = (x * scale)[y == c] @ est.thetas.T
        np.testing.assert_allclose(est.mean_per_label[c], proj.mean(axis=0), rtol=1e-5)


def test_outlier_reference_package_not_finite():
    """The reference (linear-space densities) gives -inf/NaN for the outlier; ours does not."""
    ref_pkg = pytest.importorskip("psmi")
    x, y, x_out, y_out = _outlier_setup()
    np.random.seed(3)
    ref = ref_pkg.PSMI(n_estimators=30).fit(x, y)
    with np.errstate(all="ignore"):
        r_mean, _, r_full = ref.transform(x_out, y_out)
    assert not np.isfinite(r_mean[:2]).any()
    assert np.isfinite(r_mean[2:]).all()
    est = PSMI(n_estimators=1, dtype=F64)
    est.fit_transform_with_directions(x, y, ref.thetas)
    mean, _, full = est.transform(x_out, y_out)
    assert np.isfinite(full).all()
    np.testing.assert_allclose(mean[2:], r_mean[2:], rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------- 7. floor
def test_variance_floor_for_constant_class():
    """A class of identical samples: finite output, a warning with the count, n_floored > 0."""
    x, y = make_clusters(60, 5, 3, sep=2.0, seed=15)
    x[y == 1] = np.array([0.3, -1.2, 0.7, 2.0, -0.4])
    theta = unit_directions(25, 5, seed=16)
    est = PSMI(n_estimators=1, dtype=F64)
    with pytest.warns(UserWarning, match="variances were below the floor") as rec:
        mean, std, full = est.fit_transform_with_directions(x, y, theta)
    assert est.n_floored >= 25  # class 1 in every direction
    msgs = [str(w.message) for w in rec if "floor" in str(w.message)]
    assert f"{est.n_floored} of {3 * 25}" in msgs[0]
    assert np.isfinite(full).all()
    o_mean, o_std, o_full, _, o_sd = oracle_psmi(x, y, theta, floor=est.variance_floor)
    np.testing.assert_allclose(est.std_per_label[1], o_sd[1], rtol=1e-6)
    assert np.all(o_sd[1] > 0)
    np.testing.assert_allclose(full, o_full, rtol=0, atol=1e-6)
    np.testing.assert_allclose(mean, o_mean, rtol=0, atol=1e-6)
    # a constant class is (almost) perfectly identified: pmi ~ -log pi_1 for its samples
    np.testing.assert_allclose(full[y == 1], -math.log(np.mean(y == 1)), rtol=0, atol=1e-3)


def test_no_floor_warning_on_regular_data(small):
    """Regular data: no warning and n_floored == 0."""
    x, y, theta = small
    est = PSMI(n_estimators=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.fit_transform_with_directions(x, y, theta)
    assert est.n_floored == 0


# ---------------------------------------------------------------------------------- 8. auto
def test_auto_stops_and_matches_fixed_run():
    """'auto' stops at a multiple of the block (>= 2 blocks) and equals the fixed run."""
    x, y = make_clusters(300, 8, 3, sep=10.0, seed=1)
    est = PSMI("auto", min_n_estimators=50, max_n_estimators=20_000, seed=0, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, std, full = est.fit_transform(x, y)
    m = est.n_estimators
    assert m % 50 == 0 and 100 <= m < 20_000
    assert full.shape == (300, m) and est.thetas.shape == (m, 8)
    fixed = PSMI(n_estimators=m, min_n_estimators=50, seed=0, dtype=F64)
    f_mean, f_std, f_full = fixed.fit_transform(x, y)
    # the float32 default stops at the same m with the same scores to float32 rounding
    est32 = PSMI("auto", min_n_estimators=50, max_n_estimators=20_000, seed=0)
    m32 = est32.fit_transform(x, y)[0]
    assert est32.n_estimators == m
    np.testing.assert_allclose(m32, mean, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(est.thetas, fixed.thetas)
    np.testing.assert_allclose(mean, f_mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, f_std, rtol=0, atol=1e-12)
    np.testing.assert_allclose(full, f_full, rtol=0, atol=1e-12)
    # a longer fixed run shares the prefix
    longer = PSMI(n_estimators=m + 70, min_n_estimators=50, seed=0).fit(x, y)
    np.testing.assert_array_equal(longer.thetas[:m], est.thetas)
    # the stopping rule held at m (recomputed here), and not one block earlier
    per_block = full.reshape(300, m // 50, 50).mean(axis=2)

    def variation(nb):
        whole = per_block[:, :nb].mean(axis=1)
        early = per_block[:, : nb // 2].mean(axis=1)
        low = np.argsort(whole)[: int(0.05 * 300)]
        return np.mean(np.abs((early - whole) / whole)[low])

    assert variation(m // 50) <= 0.05
    if m > 100:
        assert variation(m // 50 - 1) > 0.05


def test_auto_capped_by_max_n_estimators():
    """Lowest PSMI near 0 (overlapping classes): the rule never holds, the cap warns."""
    x, y = make_clusters(300, 8, 3, sep=2.0, seed=1)
    est = PSMI("auto", min_n_estimators=50, max_n_estimators=400, seed=0, dtype=F64)
    with pytest.warns(UserWarning, match="max_n_estimators=400"):
        mean, _, full = est.fit_transform(x, y)
    assert est.n_estimators == 400 and full.shape == (300, 400)
    fixed = PSMI(n_estimators=400, min_n_estimators=50, seed=0, dtype=F64).fit_transform(x, y)[0]
    np.testing.assert_allclose(mean, fixed, rtol=0, atol=1e-12)


def test_auto_no_cap_warning_when_it_converges_at_the_cap():
    """'auto' that converges exactly at max_n_estimators does not warn about the cap."""
    x, y = make_clusters(300, 8, 3, sep=10.0, seed=1)
    m = PSMI("auto", min_n_estimators=50, seed=0).fit(x, y).n_estimators
    est = PSMI("auto", min_n_estimators=50, max_n_estimators=m, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.fit(x, y)
    assert est.n_estimators == m


# ---------------------------------------------------------------------------------- 9. full
def test_return_full_false(small):
    """return_full=False (constructor or call) gives None and the same mean/std."""
    x, y, _ = small
    m1, s1, f1 = PSMI(n_estimators=30, seed=9).fit_transform(x, y)
    m2, s2, f2 = PSMI(n_estimators=30, seed=9, return_full=False).fit_transform(x, y)
    m3, s3, f3 = PSMI(n_estimators=30, seed=9).fit_transform(x, y, return_full=False)
    est = PSMI(n_estimators=30, seed=9, return_full=False).fit(x, y)
    m4, s4, f4 = est.transform(x, y)
    _, _, f5 = est.transform(x, y, return_full=True)
    assert f1 is not None and f2 is None and f3 is None and f4 is None
    for m, s in ((m2, s2), (m3, s3), (m4, s4)):
        np.testing.assert_allclose(m, m1, rtol=0, atol=1e-12)
        np.testing.assert_allclose(s, s1, rtol=0, atol=1e-12)
    np.testing.assert_allclose(f5, f1, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------- 10. orth
def test_orthogonal_directions_blocks_are_orthonormal():
    """Rows unit norm; each block of min(d, unit) rows is orthonormal."""
    d, unit = 8, 20
    th = sample_directions(50, d, torch.Generator().manual_seed(0), "orthogonal", unit).numpy()
    assert th.shape == (50, d)
    np.testing.assert_allclose(np.linalg.norm(th, axis=1), 1.0, rtol=0, atol=1e-12)
    starts = []
    for u in range(0, 50, unit):
        rows = min(unit, 50 - u)
        starts += [u + k for k in range(0, rows, d)]
    for s in starts:
        e = min(s + d, (s // unit) * unit + unit, 50)
        blk = th[s:e]
        np.testing.assert_allclose(blk @ blk.T, np.eye(e - s), rtol=0, atol=1e-12)
    # consecutive blocks are independent, not orthogonal to each other
    assert np.abs(th[:8] @ th[8:16].T).max() > 1e-3
    x, y = make_clusters(60, d, 3, sep=2.0, seed=17)
    est = PSMI(n_estimators=24, min_n_estimators=12, directions="orthogonal", seed=1)
    est.fit(x, y)
    t = est.thetas
    for s in (0, 8, 12, 20):
        e = s + (8 if s in (0, 12) else 4)
        np.testing.assert_allclose(t[s:e] @ t[s:e].T, np.eye(e - s), rtol=0, atol=1e-12)
    # full blocks (unit = d) are bases, so sum theta theta^T = I per block; directions centred
    big = sample_directions(4000, 4, torch.Generator().manual_seed(2), "orthogonal").numpy()
    assert np.abs(big.mean(axis=0)).max() < 0.05
    np.testing.assert_allclose(big.T @ big / 4000, np.eye(4) / 4, rtol=0, atol=1e-12)


def test_orthogonal_directions_reduce_variance():
    """m = d orthogonal directions deviate less from a 20,000-direction estimate than Gaussian."""
    x, y = make_clusters(200, 8, 3, sep=1.5, seed=2)
    truth = PSMI(n_estimators=20_000, seed=0).fit_transform(x, y, return_full=False)[0]
    mse = {}
    for kind in ("gaussian", "orthogonal"):
        errs = []
        for s in range(30):
            est = PSMI(n_estimators=8, min_n_estimators=8, seed=100 + s, directions=kind)
            errs.append(np.mean((est.fit_transform(x, y, return_full=False)[0] - truth) ** 2))
        mse[kind] = np.mean(errs)
    # measured: gaussian 0.033, orthogonal 0.0086
    assert mse["orthogonal"] < 0.5 * mse["gaussian"]


# ---------------------------------------------------------------------------------- 11. errors
def test_bad_inputs_raise(small):
    """Bad inputs raise ValueError (or NotFittedError) with a useful message."""
    x, y, _ = small
    y_one = y.copy()
    y_one[0] = 7
    with pytest.raises(ValueError, match=r"class\(es\) \[7\] have fewer than 2 samples"):
        PSMI(n_estimators=5, seed=0).fit_transform(x, y_one)
    with pytest.raises(ValueError, match=r"features has shape \(60, 5, 1\); expected"):
        PSMI(n_estimators=5, seed=0).fit(x[:, :, None], y)
    with pytest.raises(ValueError, match=r"features has shape \(60,\)"):
        PSMI(n_estimators=5, seed=0).fit(x[:, 0], y)
    with pytest.raises(ValueError, match=r"labels has shape \(59,\)"):
        PSMI(n_estimators=5, seed=0).fit(x, y[:59])
    with pytest.raises(ValueError, match=r"labels has shape \(60, 1\)"):
        PSMI(n_estimators=5, seed=0).fit(x, y[:, None])
    with pytest.raises(ValueError, match="integer class ids"):
        PSMI(n_estimators=5, seed=0).fit(x, y + 0.5)
    PSMI(n_estimators=5, seed=0).fit(x, y.astype(np.float64))  # integral floats are fine
    x_nan = x.copy()
    x_nan[[3, 8], 1] = np.nan
    x_nan[10, 0] = np.inf
    with pytest.raises(ValueError, match=r"3 of 60 feature rows contain NaN or inf.*\[3, 8, 10\]"):
        PSMI(n_estimators=5, seed=0).fit_transform(x_nan, y)
    est = PSMI(n_estimators=5, seed=0).fit(x, y)
    with pytest.raises(ValueError, match=r"labels \[4\] were not seen in fit"):
        est.transform(x[:3], np.array([2, 4, 5]))
    with pytest.raises(ValueError, match="n_estimators=0"):
        PSMI(n_estimators=0)
    with pytest.raises(ValueError, match="n_estimators='many'"):
        PSMI(n_estimators="many")
    with pytest.raises(ValueError, match="max_n_estimators=10"):
        PSMI(min_n_estimators=20, max_n_estimators=10)
    with pytest.raises(ValueError, match="directions='sobol'"):
        PSMI(directions="sobol")
    with pytest.raises(ValueError, match=r"theta has shape \(4, 3\); expected \(m, 5\)"):
        PSMI(n_estimators=1).fit_transform_with_directions(x, y, np.ones((4, 3)))
    with pytest.raises(NotFittedError, match="not fitted"):
        PSMI(n_estimators=5).transform(x, y)
    with pytest.raises(NotFittedError):
        PSMI(n_estimators=5).thetas  # noqa: B018


# ---------------------------------------------------------------------------------- 12. fit
def test_fit_then_transform_equals_fit_transform(small):
    """fit + transform on the same data equals fit_transform (same seed)."""
    x, y, _ = small
    a = PSMI(n_estimators=70, min_n_estimators=30, seed=21).fit_transform(x, y)
    est = PSMI(n_estimators=70, min_n_estimators=30, seed=21).fit(x, y)
    assert est.fitted
    b = est.transform(x, y)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=0, atol=1e-12)


def test_transform_new_data_uses_fitted_stats(small):
    """Transform of new samples (some classes only) equals the oracle with the fit data."""
    x, y, _ = small
    x_new, y_new = make_clusters(60, 5, 3, sep=2.0, seed=11)  # same centers, new noise
    rng = np.random.default_rng(0)
    x_new = x_new[:20] + rng.normal(0, 0.5, (20, 5))
    y_new = np.array([2, 5, 9])[y_new[:20]]
    keep = y_new != 9  # transform without class 9 samples: priors stay those of the fit
    est = PSMI(n_estimators=35, seed=22, dtype=F64).fit(x, y)
    mean, std, full = est.transform(x_new[keep], y_new[keep])
    o_mean, o_std, o_full, o_mu, o_sd = oracle_psmi(x, y, est.thetas, x_new[keep], y_new[keep])
    np.testing.assert_allclose(full, o_full, rtol=0, atol=1e-10)
    np.testing.assert_allclose(mean, o_mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(std, o_std, rtol=0, atol=1e-10)
    # refitting on the new data would give different numbers: the fitted stats are used
    refit = PSMI(n_estimators=1).fit_transform_with_directions(
        x_new[keep], y_new[keep], est.thetas
    )[0]
    assert np.abs(refit - mean).max() > 1e-3


# ---------------------------------------------------------------------------------- 13. props
def test_fitted_properties(small):
    """frequency_per_label sums to 1; per-label shapes; thetas (m, d); classes_ sorted."""
    x, y, _ = small
    y = y.copy()
    y[:5] = 9  # unbalanced
    est = PSMI(n_estimators=33, seed=23, dtype=F64).fit(x, y)
    freq = est.frequency_per_label
    assert set(freq) == {2, 5, 9}
    assert math.isclose(sum(freq.values()), 1.0, abs_tol=1e-15)
    for c in (2, 5, 9):
        assert freq[c] == pytest.approx(np.mean(y == c), abs=1e-15)
        assert est.mean_per_label[c].shape == (33,)
        assert est.std_per_label[c].shape == (33,)
        proj = x[y == c] @ est.thetas.T
        np.testing.assert_allclose(est.mean_per_label[c], proj.mean(axis=0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(est.std_per_label[c], proj.std(axis=0), rtol=0, atol=1e-12)
    assert est.thetas.shape == (33, 5)
    np.testing.assert_array_equal(est.classes_, [2, 5, 9])
    assert est.n_estimators == 33 and est.n_floored == 0


# ---------------------------------------------------------------------------------- 14. bound
def test_pmi_upper_bound():
    """pmi_ij <= -log(pi_{y_i}) everywhere, and it is nearly reached for separated classes."""
    x, y = make_clusters(200, 6, 4, sep=3.0, seed=24)
    y[:20] = 3  # unequal priors
    mean, _, full = PSMI(n_estimators=300, seed=25).fit_transform(x, y)
    bound = -np.log(np.array([np.mean(y == c) for c in range(4)]))[y]
    assert np.all(full <= bound[:, None] + 1e-12)
    assert np.all(mean <= bound + 1e-12)
    assert np.max(full - bound[:, None]) > -1e-6  # tight somewhere
    assert full.min() < -1.0  # and not a constant


def test_dead_columns_are_dropped_exactly(monkeypatch):
    """All-zero feature columns (dead ReLU units) are skipped: same scores as projecting them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 20, generator=g, dtype=torch.float64).relu()
    x[:, :7] = 0
    y = torch.arange(300) % 3
    fast = PSMI(n_estimators=200, seed=1).fit_transform(x, y)
    est = PSMI(n_estimators=200, seed=1)
    est.fit(x, y)
    scan = psmi_mod._scan_input
    monkeypatch.setattr(psmi_mod, "_scan_input", lambda t, rows: (None, scan(t, rows)[1]))
    slow = PSMI(n_estimators=200, seed=1).fit_transform(x, y)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(est.transform(x, y)[0], slow[0], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------- 15. validation
def test_string_labels_map_to_class_ids(small):
    """String labels (array or list) give the scores of their np.unique codes; names are kept."""
    x, y, _ = small
    names = np.array(["cat", "dog", "emu"])
    codes = np.searchsorted([2, 5, 9], y)
    y_str = names[codes]
    ref = PSMI(n_estimators=30, seed=4).fit_transform(x, codes)
    for labels in (y_str, y_str.tolist(), y_str.astype(object)):
        out = PSMI(n_estimators=30, seed=4).fit_transform(x, labels)
        for a, b in zip(out, ref):
            np.testing.assert_array_equal(a, b)
    est = PSMI(n_estimators=30, seed=4).fit(x, y_str)
    np.testing.assert_array_equal(est.classes_, names)
    assert set(est.frequency_per_label) == {"cat", "dog", "emu"}
    assert est.mean_per_label["dog"].shape == (30,)
    for a, b in zip(est.transform(x, list(y_str)), ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"labels \['bird'\] were not seen in fit"):
        est.transform(x[:3], ["cat", "bird", "dog"])
    with pytest.raises(ValueError, match="fitted on string labels"):
        est.transform(x, codes)
    with pytest.raises(ValueError, match="fitted on integer class ids but transform got string"):
        PSMI(n_estimators=5, seed=0).fit(x, codes).transform(x, y_str)
    y_one = y_str.copy()
    y_one[0] = "yak"
    with pytest.raises(ValueError, match=r"class\(es\) \['yak'\] have fewer than 2 samples"):
        PSMI(n_estimators=5, seed=0).fit(x, y_one)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_labels_raise(small, bad):
    """NaN or inf labels are refused as such (not as a non-integer or a nonsense class id)."""
    x, y, _ = small
    y_bad = y.astype(np.float64)
    y_bad[[4, 7]] = bad
    with pytest.raises(ValueError, match=r"labels must be finite class ids; 2 of 60 .*\[4, 7\]"):
        PSMI(n_estimators=5, seed=0).fit_transform(x, y_bad)
    with pytest.raises(ValueError, match="labels must be finite class ids"):
        PSMI(n_estimators=5, seed=0).fit(x, torch.as_tensor(y_bad))


def test_integral_float_labels_work_fractional_raise(small):
    """Labels 2.0, 5.0 ... give the integer result; 2.5 is refused, showing the value."""
    x, y, _ = small
    ref = PSMI(n_estimators=20, seed=5).fit_transform(x, y)
    out = PSMI(n_estimators=20, seed=5).fit_transform(x, y.astype(np.float64))
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(
        ValueError,
        match=r"integer class ids; got 60 non-integer values such as \[2\.5, 5\.5, 9\.5\]",
    ):
        PSMI(n_estimators=5, seed=0).fit(x, y + 0.5)


def test_n_estimators_validation():
    """Non-integral floats, None and booleans are refused; ints and 3.0 are accepted."""
    for bad, shown in ((2.7, r"2\.7"), (None, "None"), (True, "True"), (float("nan"), "nan")):
        with pytest.raises(ValueError, match=rf"n_estimators={shown}: use a positive integer or"):
            PSMI(n_estimators=bad)
    assert PSMI(n_estimators=3.0).n_estimators == 3
    assert PSMI(n_estimators=np.int64(4)).n_estimators == 4
    assert PSMI(n_estimators="auto").auto
    with pytest.raises(ValueError, match=r"min_n_estimators=2\.5: use a positive integer"):
        PSMI(min_n_estimators=2.5)
    with pytest.raises(ValueError, match="max_n_estimators=None: use a positive integer"):
        PSMI(max_n_estimators=None)


def test_transform_other_feature_count_raises(small):
    """transform with another feature count than fit names both counts."""
    x, y, _ = small
    est = PSMI(n_estimators=5, seed=0).fit(x, y)
    with pytest.raises(
        ValueError, match="features has 4 columns but PSMI was fitted on 5 features"
    ):
        est.transform(x[:, :4], y)
    with pytest.raises(ValueError, match="features has 6 columns but PSMI was fitted on 5"):
        est.transform(torch.zeros(60, 6, dtype=torch.float64), torch.as_tensor(y))


def test_complex_features_raise(small):
    """Complex features are refused instead of silently losing the imaginary part."""
    x, y, _ = small
    with pytest.raises(ValueError, match=r"features are complex \(torch\.complex128\)"):
        PSMI(n_estimators=5, seed=0).fit_transform(x + 1j * x, y)
    with pytest.raises(ValueError, match="features are complex"):
        PSMI(n_estimators=5, seed=0).fit(torch.as_tensor(x).to(torch.complex64), y)
    est = PSMI(n_estimators=5, seed=0).fit(x, y)
    with pytest.raises(ValueError, match="features are complex"):
        est.transform(x.astype(np.complex128), y)


def test_variance_floor_must_be_nonnegative(small):
    """A negative (or NaN) variance_floor is refused; 0 is allowed."""
    for bad, shown in ((-1e-3, r"-0\.001"), (float("nan"), "nan"), (float("inf"), "inf")):
        with pytest.raises(ValueError, match=rf"variance_floor={shown}: use a finite number >= 0"):
            PSMI(variance_floor=bad)
    x, y, _ = small
    assert np.isfinite(PSMI(n_estimators=5, seed=0, variance_floor=0).fit_transform(x, y)[0]).all()


@pytest.mark.parametrize("n_estimators", [7, "auto"])
def test_single_class_warns_and_gives_zeros(small, n_estimators):
    """One class: a warning says PSMI is 0 by construction, and the scores are exactly 0."""
    x, _, _ = small
    y = np.full(60, 3)
    match = "PSMI is 0 by construction when there is one class"
    with pytest.warns(UserWarning, match=match):
        mean, std, full = PSMI(n_estimators, min_n_estimators=5, seed=0).fit_transform(x, y)
    assert mean.shape == std.shape == (60,) and full.shape[0] == 60
    assert np.all(mean == 0) and np.all(std == 0) and np.all(full == 0)
    with pytest.warns(UserWarning, match=match):
        est = PSMI(n_estimators, min_n_estimators=5, seed=0).fit(x, ["a"] * 60)
    assert np.all(est.transform(x, ["a"] * 60)[0] == 0)
