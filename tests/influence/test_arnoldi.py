"""Arnoldi iteration, top-k Ritz pairs and the Schioppa et al. embedding vs exact linear algebra."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from lightning_memo.influence.arnoldi import arnoldi_eigen, arnoldi_embedding, arnoldi_iteration
from lightning_memo.influence.grads import per_sample_grads, select_parameters
from lightning_memo.influence.hessian import (
    exact_ggn,
    exact_hessian,
    flatten,
    flatten_batch,
    make_hvp,
    solve_damped,
    unflatten,
)
from tests.helpers import mlp, mse_loss

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny():
    model = mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=g, dtype=DT)
    y = torch.randn(30, 3, generator=g, dtype=DT)
    batches = [(x[i : i + 10], y[i : i + 10]) for i in (0, 10, 20)]
    return model, select_parameters(model), batches, (x, y)


def known_spectrum(dim=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    Qm, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DT))
    ev = 0.6 ** torch.arange(dim, dtype=DT) * 10.0
    return Qm @ torch.diag(ev) @ Qm.T, ev, Qm


def random_symmetric(dim=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(dim, dim, generator=g, dtype=DT)
    return (A + A.T) / 2


def test_arnoldi_relation_and_orthonormality():
    A = random_symmetric()
    Q, Hbar = arnoldi_iteration(lambda v: A @ v, 25, 10, seed=3)
    assert Q.shape == (11, 25) and Hbar.shape == (11, 10)
    torch.testing.assert_close(Q @ Q.T, torch.eye(11, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(A @ Q[:10].T, Q.T @ Hbar, rtol=0, atol=1e-10)
    assert torch.equal(Hbar.tril(-2), torch.zeros_like(Hbar))  # upper Hessenberg
    # the projected matrix Q_n A Q_n^T is the square part of Hbar
    torch.testing.assert_close(Q[:10] @ A @ Q[:10].T, Hbar[:10], rtol=0, atol=1e-10)


def test_arnoldi_breakdown_truncates():
    # rank-3 operator with distinct eigenvalues: the Krylov space is invariant after 4 steps
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=DT))
    A = U @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=DT)) @ U.T
    Q, Hbar = arnoldi_iteration(lambda v: A @ v, 20, 10)
    assert Q.shape == (4, 20) and Hbar.shape == (4, 4)
    torch.testing.assert_close(A @ Q.T, Q.T @ Hbar, rtol=0, atol=1e-10)
    # n_iters == dim always ends with a square Hbar (no vector outside the space)
    B = random_symmetric(8)
    Q, Hbar = arnoldi_iteration(lambda v: B @ v, 8, 8)
    assert Q.shape == (8, 8) and Hbar.shape == (8, 8)
    torch.testing.assert_close(B @ Q.T, Q.T @ Hbar, rtol=0, atol=1e-10)
    with pytest.warns(UserWarning, match="only 4 eigenpairs exist"):
        vals, vecs = arnoldi_eigen(lambda v: A @ v, 20, 10, top_k=5)
    assert vals.shape == (4,) and vecs.shape == (20, 4)
    torch.testing.assert_close(
        vals[:3], torch.tensor([3.0, 2.0, 1.0], dtype=DT), atol=1e-10, rtol=0
    )


def test_top_k_on_known_spectrum_and_hermitian_paths():
    A, ev, Qm = known_spectrum()
    k = 5
    vals, vecs = arnoldi_eigen(lambda v: A @ v, 60, 3 * k, top_k=k, seed=1)
    assert vals.dtype == DT and vals.shape == (k,) and vecs.shape == (60, k)
    torch.testing.assert_close(vals, ev[:k], rtol=1e-8, atol=0)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=DT), rtol=0, atol=1e-10)
    # eigenvectors up to sign
    overlap = (vecs.T @ Qm[:, :k]).abs()
    torch.testing.assert_close(overlap, torch.eye(k, dtype=DT), rtol=0, atol=1e-6)
    vals2, vecs2 = arnoldi_eigen(lambda v: A @ v, 60, 3 * k, top_k=k, seed=1, force_hermitian=False)
    torch.testing.assert_close(vals2, vals, rtol=1e-10, atol=0)
    torch.testing.assert_close(vecs2, vecs, rtol=0, atol=1e-6)


def test_largest_magnitude_selection_and_seed():
    g = torch.Generator().manual_seed(4)
    Qm, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=DT))
    ev = torch.tensor([5.0, -4.0, 3.0, 1e-1, -1e-2] + [1e-3] * 7, dtype=DT)
    A = Qm @ torch.diag(ev) @ Qm.T
    vals, _ = arnoldi_eigen(lambda v: A @ v, 12, 12, top_k=3)
    torch.testing.assert_close(vals, torch.tensor([5.0, 3.0, -4.0], dtype=DT), rtol=1e-10, atol=0)
    B = random_symmetric(30)
    a = arnoldi_iteration(lambda v: B @ v, 30, 6, seed=7)
    b = arnoldi_iteration(lambda v: B @ v, 30, 6, seed=7)
    c = arnoldi_iteration(lambda v: B @ v, 30, 6, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0])
    e1 = arnoldi_eigen(lambda v: B @ v, 30, 6, 2, seed=7)
    e2 = arnoldi_eigen(lambda v: B @ v, 30, 6, 2, seed=7)
    assert torch.equal(e1[0], e2[0]) and torch.equal(e1[1], e2[1])


def test_errors():
    A = random_symmetric(6)
    with pytest.raises(
        ValueError,
        match=r"arnoldi_dim=7 is larger than the number of parameters \(6\); use at most 6",
    ):
        arnoldi_eigen(lambda v: A @ v, 6, 7, 2)
    with pytest.raises(ValueError, match="arnoldi_dim=7 is larger"):
        arnoldi_iteration(lambda v: A @ v, 6, 7)
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and arnoldi_dim=4"):
        arnoldi_eigen(lambda v: A @ v, 6, 4, 5)
    with pytest.raises(ValueError, match="damping"):
        arnoldi_embedding(
            torch.ones(2, 6, dtype=DT), torch.ones(2, dtype=DT), torch.ones(6, 2, dtype=DT), -1.0
        )
    with pytest.raises(ValueError, match="use a positive damping"):
        arnoldi_embedding(
            torch.ones(2, 6, dtype=DT),
            torch.tensor([1.0, 0.0], dtype=DT),
            torch.ones(6, 2, dtype=DT),
            0.0,
        )


def _grads(model, params, batch):
    return flatten_batch(per_sample_grads(model, params, mse_loss, batch))


def test_full_rank_arnoldi_matches_exact_inverse_ggn():
    """arnoldi_dim = k = P: embedding dot products == g_q^T (G + damping I)^{-1} g_z (PSD GGN)."""
    model, params, batches, (x, y) = tiny()
    P = 43
    G = exact_ggn(
        model, params, lambda m, b: m(b[0]), lambda o, b: ((o - b[1]) ** 2).sum(1), batches
    )
    lam = 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vals, vecs = arnoldi_eigen(lambda v: G @ v, P, P, top_k=P)
        gq = _grads(model, params, (x[:5], y[:5]))
        gz = _grads(model, params, (x[5:], y[5:]))
        eq = arnoldi_embedding(gq, vals, vecs, lam)
        ez = arnoldi_embedding(gz, vals, vecs, lam)
    assert eq.shape == (5, P) and eq.dtype == DT
    exact = gq @ solve_damped(G, gz.T, lam)  # (5, 25)
    torch.testing.assert_close(eq @ ez.T, exact, rtol=1e-4, atol=1e-6 * exact.abs().max().item())


def test_full_rank_arnoldi_matches_exact_inverse_hessian_hvp():
    """Same oracle on the (indefinite) Hessian through make_hvp: both sides clamp the negatives."""
    model, params, batches, (x, y) = tiny()
    P = 43
    hvp = make_hvp(model, params, mse_loss, batches)
    H = exact_hessian(model, params, mse_loss, batches)
    ev = torch.linalg.eigvalsh(H)
    n_neg = int((ev < -1e-6 * ev.abs().max()).sum())
    assert n_neg > 0
    lam = 1e-2
    vals, vecs = arnoldi_eigen(hvp, P, P, top_k=P)
    torch.testing.assert_close(vals.sort().values, torch.linalg.eigvalsh(H), rtol=0, atol=1e-9)
    gq = _grads(model, params, (x[:4], y[:4]))
    gz = _grads(model, params, (x[4:], y[4:]))
    with pytest.warns(UserWarning, match=f"{n_neg} of {P} Arnoldi Hessian eigenvalues"):
        eq = arnoldi_embedding(gq, vals, vecs, lam)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ez = arnoldi_embedding(gz, vals, vecs, lam)
        exact = gq @ solve_damped(H, gz.T, lam)
    torch.testing.assert_close(eq @ ez.T, exact, rtol=1e-4, atol=1e-6 * exact.abs().max().item())


def test_captum_parity_eigenvalues():
    """Arnoldi on the mean-loss Hessian of a linear MSE model vs Captum's Arnoldi helpers."""
    pytest.importorskip("captum")
    from captum.influence._core.arnoldi_influence_function import (
        _parameter_arnoldi,
        _parameter_distill,
    )

    torch.manual_seed(0)
    lin = nn.Linear(8, 1).to(DT)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 8, generator=g, dtype=DT) * torch.linspace(0.2, 2.0, 8, dtype=DT)
    y = torch.randn(40, 1, generator=g, dtype=DT)
    params = select_parameters(lin)
    hvp = make_hvp(lin, params, mse_loss, [(x[:25], y[:25]), (x[25:], y[25:])])
    like = {k: v.detach() for k, v in params.items()}
    P, n, k = 9, 7, 3

    def hvp_tuple(v):
        return tuple(unflatten(hvp(flatten(dict(zip(like, v)))), like).values())

    # Captum takes the start vector explicitly: give it ours (seed 0, normalised by both)
    start = torch.randn(P, generator=torch.Generator().manual_seed(0), dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum's own torch.tensor(tensor) copy warning
        qs, h_captum = _parameter_arnoldi(
            hvp_tuple, tuple(unflatten(start, like).values()), n, 1e-12, torch.device("cpu"), False
        )
        ls, _ = _parameter_distill(qs, h_captum, k, 0.0, 0.0)
    # Captum returns (n, n-1) and distils from its square (n-1) part, eigenvalues ascending
    assert h_captum.shape == (n, n - 1)
    q_ours, h_ours = arnoldi_iteration(hvp, P, n)
    torch.testing.assert_close(h_ours[:n, : n - 1], h_captum, rtol=0, atol=1e-12)
    torch.testing.assert_close(q_ours[0], start / start.norm(), rtol=0, atol=1e-15)
    ours, _ = arnoldi_eigen(hvp, P, n - 1, k)
    torch.testing.assert_close(ours, ls.flip(0), rtol=1e-10, atol=0)


def test_progress_wraps_the_iterations_and_is_closed():
    """``progress`` wraps range(n_iters) (a tqdm bar with one step per Hessian-vector product),
    leaves the result unchanged and is closed, also when the iteration stops early; the fit of
    ArnoldiInfluence passes its context's progress."""
    from tqdm.auto import tqdm

    from lightning_memo.influence.methods import ArnoldiInfluence

    bars = []

    def progress(it):
        bars.append(tqdm(it, file=io.StringIO()))
        return bars[-1]

    A = random_symmetric()
    Q, H = arnoldi_iteration(lambda v: A @ v, 25, 10, seed=3, progress=progress)
    Q0, H0 = arnoldi_iteration(lambda v: A @ v, 25, 10, seed=3)
    assert torch.equal(Q, Q0) and torch.equal(H, H0)
    assert len(bars) == 1 and bars[0].total == 10 and bars[0].n == 10

    class Closing:  # a wrapper that records what happens to it
        def __init__(self, it):
            self.it, self.steps, self.closed = it, 0, False

        def __iter__(self):
            for k in self.it:
                self.steps += 1
                yield k

        def close(self):
            self.closed = True

    seen = []
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=DT))
    B = U @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=DT)) @ U.T
    Q, _ = arnoldi_iteration(
        lambda v: B @ v, 20, 10, progress=lambda it: seen.append(Closing(it)) or seen[-1]
    )
    assert Q.shape[0] == 4 and seen[0].steps == 4 and seen[0].closed  # breakdown after 4 steps

    model, params, batches, _ = tiny()
    calls = []
    ArnoldiInfluence(damping=1e-3, arnoldi_dim=12, arnoldi_k=4).fit(
        model, params, mse_loss, batches, {"progress": lambda it: calls.append(it) or it}
    )
    assert len(calls) == 1 and list(calls[0]) == list(range(12))
