"""Influence methods through one interface vs a brute-force damped Hessian solve."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_memo.influence.features import GradientFeaturizer
from lightning_memo.influence.methods import (
    ArnoldiInfluence,
    ExactInfluence,
    query_matrix,
    train_pass,
)
from lightning_memo.influence.registry import make_method
from tests.helpers import ce_loss, mlp

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def setup(n=24, seed=0):
    model = mlp(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]
    feats = GradientFeaturizer({"0": model[0], "2": model[2]}, projection_dim=None)
    return model, feats, batches


def brute(model, batches, queries, damping, clamp=True):
    """g_q^T (H + damping I)^{-1} g_z with H = autograd Hessian of the mean loss (with ``clamp``
    the directions of negative curvature are dropped, as the eigendecomposition-based methods
    do)."""
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def unflat(th):
        out, s = [], 0
        for sh in shapes:
            k = int(torch.tensor(sh).prod())
            out.append(th[s : s + k].reshape(sh))
            s += k
        return out

    def fwd(th, xb):
        w0, b0, w2, b2 = unflat(th)
        return torch.tanh(xb @ w0.T + b0) @ w2.T + b2

    def mean_loss(th):
        return F.cross_entropy(fwd(th, x), y)

    h = torch.autograd.functional.hessian(mean_loss, theta)

    def grads(xb, yb):
        rows = []
        for i in range(xb.shape[0]):
            th = theta.clone().requires_grad_(True)
            (gr,) = torch.autograd.grad(F.cross_entropy(fwd(th, xb[i : i + 1]), yb[i : i + 1]), th)
            rows.append(gr)
        return torch.stack(rows)

    gz, gq = grads(x, y), grads(*queries)
    evals, evecs = torch.linalg.eigh(h)
    weight = 1 / (evals + damping)
    if clamp:  # negative curvature: the direction gets no weight
        weight = torch.where(evals < -1e-9, torch.zeros_like(weight), weight)
    hinv = evecs @ torch.diag(weight) @ evecs.T
    return gq @ hinv @ gz.T, ((gz @ hinv) * gz).sum(1), (gz @ hinv).norm(dim=1)


def run(method, model, feats, batches, queries):
    method.fit(model, feats.params, ce_loss, batches)

    def grad_fn(b):
        return feats.grad_dict(model, b, ce_loss) if method.uses_gradients else b

    q = query_matrix(method, grad_fn, [queries])
    return train_pass(method, grad_fn, batches, 24, query_rows=q, want_norm=True)


@pytest.mark.parametrize("method, damping", [("exact", 0.05), ("cg", 3.0)])
def test_exact_and_cg_equal_brute_force(method, damping):
    """CG needs H + damping I positive definite (this Hessian is indefinite: damping 3)."""
    model, feats, batches = setup()
    queries = (batches[0][0][:5] * 1.5, batches[0][1][:5])
    out = run(make_method(method, feats.modules, damping=damping), model, feats, batches, queries)
    want_scores, want_self, want_norm = brute(model, batches, queries, damping, method == "exact")
    tol = dict(rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out["scores"].double(), want_scores, **tol)
    torch.testing.assert_close(out["self_influence"], want_self, **tol)
    torch.testing.assert_close(out["hinv_norm"], want_norm, **tol)
    assert out["seen"].all()


def test_arnoldi_full_dimension_equals_exact():
    model, feats, batches = setup()
    queries = (batches[1][0][:4], batches[1][1][:4])
    p = sum(v.numel() for v in feats.params.values())
    exact = run(ExactInfluence(damping=0.1), model, feats, batches, queries)
    with pytest.warns(UserWarning):  # the Hessian of this tiny net has negative eigenvalues
        arn = run(ArnoldiInfluence(0.1, arnoldi_dim=p, arnoldi_k=p), model, feats, batches, queries)
    for key in ("scores", "self_influence", "hinv_norm"):
        torch.testing.assert_close(arn[key].double(), exact[key].double(), rtol=1e-4, atol=1e-7)


def test_arnoldi_top_k_keeps_the_largest_curvature():
    """Few eigenpairs: self-influence is below the full one (dropped directions count as
    lambda = infinity... no: as 0 curvature in the *removed* subspace, i.e. they are dropped)."""
    model, feats, batches = setup()
    queries = (batches[1][0][:4], batches[1][1][:4])
    full = run(ExactInfluence(damping=0.1), model, feats, batches, queries)
    arn = run(ArnoldiInfluence(0.1, arnoldi_dim=30, arnoldi_k=10), model, feats, batches, queries)
    assert arn["self_influence"].shape == (24,)
    assert (arn["self_influence"] <= full["self_influence"] + 1e-9).all()


def test_model_changed_after_fit_is_detected():
    model, feats, batches = setup()
    m = ExactInfluence(damping=0.1).fit(model, feats.params, ce_loss, batches)
    m.check_model(feats.params)
    with torch.no_grad():
        model[2].bias.add_(0.01)
    with pytest.raises(RuntimeError, match="parameters changed after the influence factors"):
        m.check_model(feats.params)


def test_bad_arguments():
    model, feats, batches = setup()
    with pytest.raises(ValueError, match="damping=0.0 is not allowed"):
        ExactInfluence(damping=0.0)
    with pytest.raises(ValueError, match="damping=-1.0 is not allowed"):
        make_method("arnoldi", feats.modules, damping=-1.0)
    with pytest.raises(ValueError, match="method='lissa'"):
        make_method("lissa", feats.modules)
    with pytest.raises(ValueError, match=r"arnoldi_dim=100 is larger than the number of param"):
        ArnoldiInfluence(0.1, arnoldi_dim=100, arnoldi_k=5).fit(
            model, feats.params, ce_loss, batches
        )
    big = nn.Linear(200, 120).to(DT)
    big_params = dict(big.named_parameters())
    with pytest.raises(ValueError, match=r"24120 x 24120 Hessian.*method='arnoldi'"):
        ExactInfluence(0.1).fit(big, big_params, lambda m, b: m(b).sum(1), [torch.zeros(2, 200)])


def test_relatif_equals_brute_force():
    """RelatIF(q, z) = g_q^T H^-1 g_z / ||H^-1 g_z||, on the exact Hessian."""
    model, feats, batches = setup()
    queries = (batches[0][0][:5] * 1.5, batches[0][1][:5])
    method = make_method("relatif", feats.modules, damping=0.05, relatif_base="exact")
    out = run(method, model, feats, batches, queries)
    want_scores, want_self, want_norm = brute(model, batches, queries, 0.05)
    tol = dict(rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out["scores"].double(), want_scores / want_norm, **tol)
    torch.testing.assert_close(out["self_influence"], want_self / want_norm, **tol)
    torch.testing.assert_close(out["hinv_norm"], want_norm, **tol)
    with pytest.raises(ValueError, match="relatif_base='gex'.*needs a Hessian"):
        make_method("relatif", feats.modules, relatif_base="gex")


def test_randproj_is_an_unbiased_gradient_dot_product():
    """randproj: <P g_q, P g_z>; the mean over seeds approaches g_q . g_z (identity curvature)."""
    model, feats, batches = setup()
    queries = (batches[0][0][:5] * 1.5, batches[0][1][:5])
    gz = torch.cat([feats(model, b, ce_loss) for b in batches])  # exact factored rows
    gq = feats(model, queries, ce_loss)
    want = feats.pair_products(gq, gz)
    mean = torch.zeros_like(want)
    seeds = 100
    for s in range(seeds):
        method = make_method("randproj", feats.modules, seed=s, projection_dim=20)
        out = run(method, model, feats, batches, queries)
        mean += out["scores"].double() / seeds
        if s == 0:
            torch.testing.assert_close(out["self_influence"], torch.diag(run_rows(method, batches)))
            assert torch.isnan(out["hinv_norm"]).all()  # no Hessian
    rel = (mean - want).abs().max() / want.abs().max()
    assert rel < 0.15, float(rel)


def run_rows(method, batches):
    rows = torch.cat([method.train_rows_batch(b) for b in batches])
    return rows @ rows.T


# ----------------------------------------------------------------------------- registry
def test_registry_is_a_table_of_classes_and_their_options():
    """Every name maps to a class and options that its constructor takes; Hessian methods are
    the bases RelatIF accepts."""
    import inspect

    from lightning_memo.influence.registry import HESSIAN_METHODS, METHODS, method_options

    assert list(METHODS) == [
        "ekfac", "kfac", "arnoldi", "exact", "cg", "relatif", "randproj", "representer",
        "representer_lje", "boundary", "gex",
    ]  # fmt: skip
    assert set(HESSIAN_METHODS) < set(METHODS)
    for name, spec in METHODS.items():
        if name == "relatif":
            continue
        params = inspect.signature(spec.cls.__init__).parameters
        for opt in (*spec.options, *spec.fixed, *spec.defaults):
            assert opt in params, (name, opt)
    assert method_options("relatif", "arnoldi") == ("relatif_base",) + METHODS["arnoldi"].options


def test_options_a_method_does_not_take_are_refused():
    model, feats, _ = setup()
    with pytest.raises(ValueError, match=r"method='ekfac' takes no option 'num_ens'.*damping"):
        make_method("ekfac", feats.modules, num_ens=8)
    with pytest.raises(ValueError, match=r"method='exact' takes no option 'arnoldi_k'"):
        make_method("exact", feats.modules, arnoldi_k=5)
    with pytest.raises(ValueError, match=r"method='relatif' takes no option 'fisher'.*arnoldi_k"):
        make_method("relatif", feats.modules, relatif_base="arnoldi", fisher="true")
    with pytest.raises(ValueError, match=r"'representer' takes no option 'ascent_lr'"):
        make_method("representer", {}, ascent_lr=0.1)
    with pytest.raises(ValueError, match=r"arnoldi_dim=5, arnoldi_k=6"):
        make_method("arnoldi", feats.modules, arnoldi_dim=5, arnoldi_k=6)
    arn = make_method("arnoldi", feats.modules, arnoldi_dim=9, arnoldi_k=4, seed=3)
    assert (arn.arnoldi_dim, arn.arnoldi_k, arn.seed) == (9, 4, 3)
    cg = make_method("cg", feats.modules, damping=2.0, cg_tol=1e-6)
    assert (cg.solver, cg.cg_tol, cg.damping) == ("cg", 1e-6, 2.0)


def test_batch_methods_have_their_own_entry_points():
    """Gradient entry points take gradients only; a batch method points to its _batch one."""
    model, feats, batches = setup()
    rp = make_method("randproj", feats.modules, projection_dim=8).fit(
        model, feats.params, ce_loss, batches
    )
    assert not rp.uses_gradients
    with pytest.raises(TypeError, match=r"reads batches.*self_influence_batch\(batch\)"):
        rp.self_influence(batches[0])
    assert rp.self_influence_batch(batches[0]).shape == (8,)


def test_plain_module_path_with_a_dict_context():
    """No Trainer: a method fitted on an nn.Module and a DataLoader with a dict context equals
    the same fit with a FitContext; unknown context keys are refused."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_memo.influence import FitContext

    model, feats, batches = setup()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = DataLoader(TensorDataset(x, y), batch_size=8)

    def output_fn(m, b):
        return m(b[0])

    a = make_method("ekfac", feats.modules, damping=0.1).fit(
        model, feats.params, ce_loss, loader, {"output_fn": output_fn}
    )
    b = make_method("ekfac", feats.modules, damping=0.1).fit(
        model, feats.params, ce_loss, loader, FitContext(output_fn=output_fn)
    )

    def grad_fn(batch):
        return feats.grad_dict(model, batch, ce_loss)

    sa = train_pass(a, grad_fn, loader, 24)["self_influence"]
    torch.testing.assert_close(sa, train_pass(b, grad_fn, loader, 24)["self_influence"])
    assert (sa > 0).all()
    with pytest.raises(ValueError, match=r"context keys \['outputs'\] are unknown"):
        make_method("ekfac", feats.modules).fit(
            model, feats.params, ce_loss, loader, {"outputs": 1}
        )
