"""Exact Hessian, GGN, HVP and damped solves vs brute-force autograd oracles (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_memo.influence.grads import select_parameters
from lightning_memo.influence.hessian import (
    check_eigenvalues,
    conjugate_gradient,
    exact_ggn,
    exact_hessian,
    flatten,
    flatten_batch,
    make_hvp,
    solve_damped,
    unflatten,
)
from tests.helpers import ce_loss, mlp, mse_loss

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def data(n=30, seed=1, regression=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    y = (
        torch.randn(n, 3, generator=g, dtype=DT)
        if regression
        else torch.randint(0, 3, (n,), generator=g)
    )
    return x, y


def split(x, y, sizes=(10, 10, 10)):
    out, i = [], 0
    for s in sizes:
        out.append((x[i : i + s], y[i : i + s]))
        i += s
    return out


def full_hessian_oracle(model, params, loss_fn, x, y):
    """torch.autograd.functional.hessian of the mean loss on all data, w.r.t. the flat params."""
    like = {k: v.detach() for k, v in params.items()}
    theta = flatten(like)

    def f(th):
        p = unflatten(th, like)
        out = torch.func.functional_call(model, p, (x,))
        if loss_fn is ce_loss:
            return F.cross_entropy(out, y)
        return ((out - y) ** 2).sum(dim=1).mean()

    return torch.autograd.functional.hessian(f, theta)


def double_backward_hessian(model, params, loss_fn, x, y):
    """Brute force: P second backward passes of the mean loss."""
    plist = list(params.values())
    loss = loss_fn(model, (x, y)).mean()
    g = flatten(dict(zip(params, torch.autograd.grad(loss, plist, create_graph=True))))
    rows = []
    for i in range(g.numel()):
        rows.append(flatten(dict(zip(params, torch.autograd.grad(g[i], plist, retain_graph=True)))))
    return torch.stack(rows)


def test_flatten_roundtrip():
    model = mlp()
    params = select_parameters(model)
    vec = flatten(params)
    assert vec.shape == (43,)
    back = unflatten(vec, params)
    assert list(back) == list(params)
    for k in params:
        assert torch.equal(back[k], params[k])
    assert torch.equal(vec[:20], params["0.weight"].reshape(-1))
    grads = {k: torch.randn(7, *p.shape, dtype=DT) for k, p in params.items()}
    fb = flatten_batch(grads)
    assert fb.shape == (7, 43)
    assert torch.equal(fb[3], flatten({k: g[3] for k, g in grads.items()}))
    with pytest.raises(ValueError, match="43 entries"):
        unflatten(torch.zeros(42, dtype=DT), params)


@pytest.mark.parametrize("loss_fn", [ce_loss, mse_loss])
def test_exact_hessian_vs_oracles(loss_fn):
    model = mlp()
    params = select_parameters(model)
    x, y = data(regression=loss_fn is mse_loss)
    H = exact_hessian(model, params, loss_fn, split(x, y, (7, 15, 8)))  # uneven batches
    assert H.dtype == DT and H.shape == (43, 43)
    brute = double_backward_hessian(model, params, loss_fn, x, y)
    torch.testing.assert_close(H, (brute + brute.T) / 2, rtol=0, atol=1e-10)
    one_batch = exact_hessian(model, params, loss_fn, [(x, y)])
    torch.testing.assert_close(H, one_batch, rtol=0, atol=1e-12)


def test_make_hvp_vs_exact_and_autograd():
    model = mlp()
    params = select_parameters(model)
    x, y = data()
    batches = split(x, y, (12, 9, 9))
    hvp = make_hvp(model, params, ce_loss, batches)
    H = exact_hessian(model, params, ce_loss, batches)
    oracle = full_hessian_oracle(model, params, ce_loss, x, y)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(43, generator=g, dtype=DT)
    hv = hvp(v)
    assert hv.shape == (43,) and hv.dtype == DT
    torch.testing.assert_close(hv, H @ v, rtol=0, atol=1e-10)
    torch.testing.assert_close(hv, oracle @ v, rtol=0, atol=1e-10)
    vm = torch.randn(43, 4, generator=g, dtype=DT)
    torch.testing.assert_close(hvp(vm), oracle @ vm, rtol=0, atol=1e-10)
    # dtype of the result follows v; params untouched
    assert hvp(v.float()).dtype == torch.float32
    assert all(p.grad is None for p in params.values())


def test_make_hvp_subset_of_params_and_scalar_loss_error():
    model = mlp()
    params = select_parameters(model, ["2.weight", "2.bias"])
    x, y = data()
    hvp = make_hvp(model, params, ce_loss, split(x, y))
    oracle = full_hessian_oracle(model, params, ce_loss, x, y)
    v = torch.randn(18, dtype=DT)
    torch.testing.assert_close(hvp(v), oracle @ v, rtol=0, atol=1e-10)
    bad = make_hvp(model, params, lambda m, b: ce_loss(m, b).mean(), split(x, y))
    with pytest.raises(ValueError, match=r"per-sample losses of shape \(B,\)"):
        bad(v)


def jacobian_ggn_oracle(model, params, loss_fn_out, x, y):
    """Hand-built mean_i J_i^T H_out,i J_i with torch.autograd.functional.jacobian per sample."""
    like = {k: v.detach() for k, v in params.items()}
    theta = flatten(like)
    total = torch.zeros(theta.numel(), theta.numel(), dtype=DT)
    for i in range(x.shape[0]):

        def out(th, i=i):
            return torch.func.functional_call(model, unflatten(th, like), (x[i : i + 1],))[0]

        J = torch.autograd.functional.jacobian(out, theta)  # (C, P)
        o = out(theta).detach()

        def loss_i(o, i=i):
            return loss_fn_out(o[None], y[i : i + 1])[0]

        Ho = torch.autograd.functional.hessian(loss_i, o)
        total += J.T @ Ho @ J
    return total / x.shape[0]


def ce_out(o, y):
    return F.cross_entropy(o, y, reduction="none")


def mse_out(o, y):
    return ((o - y) ** 2).sum(dim=1)


def test_exact_ggn_vs_jacobian_oracle():
    model = mlp()
    params = select_parameters(model)
    x, y = data(n=12)

    def output_fn(m, b):
        return m(b[0])

    G = exact_ggn(model, params, output_fn, lambda o, b: ce_out(o, b[1]), split(x, y, (5, 7)))
    assert G.dtype == DT and G.shape == (43, 43)
    oracle = jacobian_ggn_oracle(model, params, ce_out, x, y)
    torch.testing.assert_close(G, oracle, rtol=0, atol=1e-12)
    assert torch.linalg.eigvalsh(G).min() > -1e-12  # PSD


def test_ggn_equals_hessian_when_outputs_linear_in_params():
    x, y = data(regression=True)
    batches = split(x, y, (11, 19))

    def output_fn(m, b):
        return m(b[0])

    def out_loss(o, b):
        return mse_out(o, b[1])

    # linear last layer: the outputs are linear in its parameters -> GGN == Hessian (any loss)
    model = mlp()
    last = select_parameters(model, ["2.weight", "2.bias"])
    H = exact_hessian(model, last, mse_loss, batches)
    G = exact_ggn(model, last, output_fn, out_loss, batches)
    torch.testing.assert_close(G, H, rtol=0, atol=1e-12)
    xc, yc = data()
    bc = split(xc, yc)
    Hc = exact_hessian(model, last, ce_loss, bc)
    Gc = exact_ggn(model, last, output_fn, lambda o, b: ce_out(o, b[1]), bc)
    torch.testing.assert_close(Gc, Hc, rtol=0, atol=1e-12)
    # linear model with MSE: GGN == Hessian == 2 X~^T X~ / N (Kronecker with I_3)
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).to(DT)
    params = select_parameters(lin)
    H = exact_hessian(lin, params, mse_loss, batches)
    G = exact_ggn(lin, params, output_fn, out_loss, batches)
    torch.testing.assert_close(G, H, rtol=0, atol=1e-12)
    # full model: the GGN drops the residual term, so it differs from the Hessian
    Hf = exact_hessian(model, select_parameters(model), mse_loss, batches)
    Gf = exact_ggn(model, select_parameters(model), output_fn, out_loss, batches)
    assert (Hf - Gf).abs().max() > 1e-3


def test_solve_damped_vs_linalg_solve():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(12, 12, generator=g, dtype=DT)
    H = A @ A.T / 12
    b = torch.randn(12, generator=g, dtype=DT)
    B = torch.randn(12, 3, generator=g, dtype=DT)
    lam = 1e-2
    ref = torch.linalg.solve(H + lam * torch.eye(12, dtype=DT), b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = solve_damped(H, b, lam)
        X = solve_damped(H, B.float(), lam)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-12)
    assert X.dtype == DT and X.shape == (12, 3)
    ref_b = torch.linalg.solve(H + lam * torch.eye(12, dtype=DT), B.float().double())
    torch.testing.assert_close(X, ref_b, rtol=1e-10, atol=1e-12)
    # singular PSD (rank 3): no spurious negative-eigenvalue warning from round-off
    R = torch.randn(12, 3, generator=g, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve_damped(R @ R.T, b, lam)


def test_solve_damped_negative_eigenvalues_and_bad_damping():
    g = torch.Generator().manual_seed(1)
    Qm, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=DT))
    ev = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1, 0.0, -1e-3, -0.2, -0.5, -2.0], dtype=DT)
    H = Qm @ torch.diag(ev) @ Qm.T
    b = torch.randn(10, generator=g, dtype=DT)
    with pytest.warns(
        UserWarning, match=r"4 of 10 Hessian eigenvalues are negative \(min -2\.0e\+00\)"
    ):
        x = solve_damped(H, b, 0.1)
    ref = Qm @ ((Qm.T @ b) / (ev.clamp(min=0) + 0.1))
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-12)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="use a positive finite damping"):
            solve_damped(H, b, bad)
    with pytest.warns(UserWarning, match="1 of 3 Arnoldi"):
        check_eigenvalues(torch.tensor([1.0, 0.5, -0.1], dtype=DT), "Arnoldi")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32-level round-off of a PSD matrix: silent clamp
        lam = check_eigenvalues(torch.tensor([1.0, 0.5, -1e-8], dtype=DT))
    assert torch.equal(lam, torch.tensor([1.0, 0.5, 0.0], dtype=DT))


def test_cg_vs_solve_damped_with_hvp():
    model = mlp()
    params = select_parameters(model, ["2.weight", "2.bias"])  # CE is convex here: H PSD
    x, y = data()
    batches = split(x, y)
    hvp = make_hvp(model, params, ce_loss, batches)
    H = exact_hessian(model, params, ce_loss, batches)
    g = torch.Generator().manual_seed(5)
    b = torch.randn(18, 2, generator=g, dtype=DT)
    lam = 1e-2
    xs = conjugate_gradient(hvp, b, lam, tol=1e-10)
    ref = solve_damped(H, b, lam)
    torch.testing.assert_close(xs, ref, rtol=1e-6, atol=1e-8)
    x1 = conjugate_gradient(hvp, b[:, 0], lam, tol=1e-10)
    assert x1.shape == (18,)
    torch.testing.assert_close(x1, ref[:, 0], rtol=1e-6, atol=1e-8)
    assert torch.equal(
        conjugate_gradient(hvp, torch.zeros(18, dtype=DT), lam), torch.zeros(18, dtype=DT)
    )


def test_cg_nonconvergence_and_negative_curvature():
    ev = torch.logspace(0, -6, 30, dtype=DT)
    g = torch.Generator().manual_seed(2)
    Qm, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=DT))
    A = Qm @ torch.diag(ev) @ Qm.T
    b = torch.randn(30, generator=g, dtype=DT)
    with pytest.warns(UserWarning, match="did not converge in 3 iterations"):
        conjugate_gradient(lambda v: A @ v, b, 1e-8, max_iter=3)
    D = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=DT))
    with pytest.raises(ValueError, match="non-positive curvature.*larger than the most negative"):
        conjugate_gradient(lambda v: D @ v, torch.tensor([0.0, 1.0, 0.0], dtype=DT), 0.01)
    with pytest.raises(ValueError, match="damping=-1"):
        conjugate_gradient(lambda v: D @ v, torch.ones(3, dtype=DT), -1.0)
