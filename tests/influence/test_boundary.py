"""Boundary influence (DeepFool distance to the decision boundary) vs the closed form of a linear
classifier and a brute-force line search on an MLP."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_memo.influence.deepfool import deepfool
from lightning_memo.influence.methods import BoundaryInfluence, train_pass

DT = torch.float64
FIRST = {"input_fn": lambda b: b[0]}  # the fit context: inputs are the batch's first element


pytestmark = pytest.mark.usefixtures("one_thread")


def linear_setup(d=5, c=4, n=48, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(d, c).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    return lin, x, y


def exact_distance(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """min_{j != k} ((w_k - w_j) . x + b_k - b_j) / ||w_k - w_j||, k the predicted class."""
    w, b = lin.weight.detach(), lin.bias.detach()
    f = x @ w.T + b
    k = f.argmax(dim=1)
    out = []
    for i in range(x.shape[0]):
        ki = int(k[i])
        out.append(
            min(
                float((f[i, ki] - f[i, j]) / (w[ki] - w[j]).norm())
                for j in range(w.shape[0])
                if j != ki
            )
        )
    return torch.tensor(out, dtype=DT)


def fit(method, model, x, y):
    return method.fit(model, dict(model.named_parameters()), None, [(x, y)], FIRST)


@pytest.mark.parametrize("line_search", [True, False])
@pytest.mark.parametrize("overshoot", [0.0, 0.02])
def test_linear_classifier_matches_closed_form(overshoot, line_search):
    lin, x, y = linear_setup()
    m = fit(BoundaryInfluence(overshoot=overshoot, line_search=line_search), lin, x, y)
    got = m.self_influence_batch((x, y))
    want = exact_distance(lin, x) * (1 + overshoot)
    assert got.dtype == DT and got.shape == (x.shape[0],)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert bool(m.last_converged.all())


def test_linear_classifier_one_step_and_flip():
    lin, x, _ = linear_setup(c=3, seed=3)
    res = deepfool(lin, x, overshoot=0.02, line_search=False)
    assert bool((res["iterations"] == 1).all())  # linear: DeepFool converges in one step
    with torch.no_grad():
        assert bool((lin(x + res["perturbation"]).argmax(1) != lin(x).argmax(1)).all())
    torch.testing.assert_close(res["distance"], exact_distance(lin, x) * 1.02, rtol=1e-10, atol=0)


def test_num_classes_restricts_targets_but_keeps_the_nearest_in_linear_case():
    lin, x, y = linear_setup(c=6, seed=5)
    full = fit(BoundaryInfluence(overshoot=0.0), lin, x, y).self_influence_batch((x, y))
    two = fit(BoundaryInfluence(overshoot=0.0, num_classes=2), lin, x, y).self_influence_batch(
        (x, y)
    )
    # the top-2 class is not always the nearest boundary: restricted distances are never smaller
    assert bool((two >= full * (1 - 1e-9)).all())
    six = fit(BoundaryInfluence(overshoot=0.0, num_classes=6), lin, x, y).self_influence_batch(
        (x, y)
    )
    torch.testing.assert_close(six, full)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mlp_perturbation_flips_and_is_tight_along_its_direction(seed):
    torch.manual_seed(seed)
    mlp = nn.Sequential(
        nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    ).to(DT)
    x = torch.randn(30, 3, dtype=DT) * 2
    res = deepfool(mlp, x, overshoot=0.02)
    assert bool(res["converged"].all())
    with torch.no_grad():
        k0 = mlp(x).argmax(1)
        p = res["perturbation"]
        assert bool((mlp(x + p).argmax(1) != k0).all())  # it actually flips the prediction
        dist = p.norm(dim=1)
        torch.testing.assert_close(dist, res["distance"])
        u = p / dist[:, None]
        ts = torch.linspace(0, 1, 4001, dtype=DT)
        for i in range(x.shape[0]):  # brute-force first crossing along the found direction
            flips = mlp(x[i] + ts[:, None] * dist[i] * u[i]).argmax(1) != k0[i]
            t_brute = float(ts[flips.nonzero()[0, 0]] * dist[i])
            assert float(dist[i]) <= 1.02 * t_brute * (1 + 1e-9)
    # DeepFool without the line search flips too; its crossing t* is never beyond its end
    raw = deepfool(mlp, x, overshoot=0.02, line_search=False)
    with torch.no_grad():
        assert bool((mlp(x + raw["perturbation"]).argmax(1) != k0).all())
    assert bool((raw["distance"] >= res["distance"] / 1.02 * (1 - 1e-12)).all())


def test_float32_model_and_dict_batch():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(10, 4)
    batch = {"input": x, "label": torch.zeros(10, dtype=torch.long), "index": torch.arange(10)}
    ctx = {"input_fn": lambda b: b["input"]}
    m = BoundaryInfluence().fit(mlp, dict(mlp.named_parameters()), None, [batch], ctx)
    d = m.self_influence_batch(batch)
    assert d.dtype == DT and bool(torch.isfinite(d).all()) and bool((d > 0).all())
    with torch.no_grad():  # the float32 perturbation flips too
        res = deepfool(mlp, x)
        assert bool((mlp(x + res["perturbation"].float()).argmax(1) != mlp(x).argmax(1)).all())


def test_score_negative_is_influenciae_sign():
    lin, x, y = linear_setup()
    d = fit(BoundaryInfluence(), lin, x, y).self_influence_batch((x, y))
    neg = fit(BoundaryInfluence(score="negative"), lin, x, y).self_influence_batch((x, y))
    torch.testing.assert_close(neg, -d)


def test_custom_input_and_forward_fn():
    lin, x, y = linear_setup()
    m = BoundaryInfluence(
        overshoot=0.0, input_fn=lambda b: b["feats"], forward_fn=lambda model, z: model(z) * 2.0
    )
    m.fit(lin, dict(lin.named_parameters()), None, [{"feats": x}])
    torch.testing.assert_close(m.self_influence_batch({"feats": x}), exact_distance(lin, x))


def test_model_mode_and_parameters_unchanged():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    x = torch.randn(12, 4, dtype=DT)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    mlp.train()
    m = fit(BoundaryInfluence(), mlp, x, None)
    a = m.self_influence_batch((x,))
    b = m.self_influence_batch((x,))
    torch.testing.assert_close(a, b)  # eval mode during the search: dropout off
    assert mlp.training
    for k, v in mlp.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in mlp.parameters())


def test_no_pairwise_scores():
    lin, x, y = linear_setup()
    m = fit(BoundaryInfluence(), lin, x, y)
    assert m.has_scores is False and m.uses_gradients is False
    with pytest.raises(ValueError, match="no pairwise scores"):
        m.query_rows_batch((x, y))
    with pytest.raises(ValueError, match="no pairwise scores"):
        m.train_rows_batch((x, y))
    assert bool(torch.isnan(m.hinv_norm_batch((x, y))).all())


def test_train_pass_driver():
    lin, x, y = linear_setup(n=20)
    m = fit(BoundaryInfluence(overshoot=0.0), lin, x, y)
    idx = torch.randperm(20)
    batches = [(x[idx[i : i + 8]], y[idx[i : i + 8]], idx[i : i + 8]) for i in range(0, 20, 8)]
    out = train_pass(
        m, lambda b: b, batches, 20, index_fn=lambda b: b[2], want_self=True, want_norm=True
    )
    assert bool(out["seen"].all())
    torch.testing.assert_close(out["self_influence"], exact_distance(lin, x))


def test_regression_model_refused():
    torch.manual_seed(0)
    reg = nn.Linear(3, 1).to(DT)
    x = torch.randn(5, 3, dtype=DT)
    with pytest.raises(ValueError, match="regression model.*one value per sample"):
        fit(BoundaryInfluence(), reg, x, None)
    m = BoundaryInfluence().bind(reg, FIRST["input_fn"])
    with pytest.raises(ValueError, match=r"class logits of shape \(B, C\) with C >= 2"):
        m.self_influence_batch((x,))
    flat = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0))
    with pytest.raises(ValueError, match="regression model"):
        BoundaryInfluence().bind(flat.to(DT), FIRST["input_fn"]).self_influence_batch((x,))


def test_binary_logit_flag():
    torch.manual_seed(0)
    lin = nn.Linear(3, 1).to(DT)
    x = torch.randn(9, 3, dtype=DT)
    d = fit(BoundaryInfluence(overshoot=0.0, binary_logit=True), lin, x, None).self_influence_batch(
        (x,)
    )
    with torch.no_grad():
        want = lin(x).abs().reshape(-1) / lin.weight.norm()
    torch.testing.assert_close(d, want)


def test_integer_inputs_refused():
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    ids = torch.randint(0, 10, (4, 2))
    with pytest.raises(ValueError, match="floating tensor.*input_fn"):
        BoundaryInfluence().fit(emb, {}, None, [(ids,)], FIRST)


def test_locally_constant_model_gives_inf_with_warning():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT)
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.fill_(-1.0)  # every ReLU dead: logits constant
    x = torch.randn(3, 2, dtype=DT)
    m = fit(BoundaryInfluence(), net, x, None)
    with pytest.warns(UserWarning, match="locally constant"):
        d = m.self_influence_batch((x,))
    assert bool(torch.isinf(d).all())


def test_max_iter_warning():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    net = net.to(DT)
    x = torch.randn(40, 2, dtype=DT) * 3
    m = fit(BoundaryInfluence(max_iter=1, overshoot=0.0), net, x, None)
    with pytest.warns(UserWarning, match="did not cross the decision boundary within max_iter=1"):
        d = m.self_influence_batch((x,))
    assert not bool(m.last_converged.all()) and bool(torch.isfinite(d).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough steps: every sample crosses, no warning
        fit(BoundaryInfluence(), net, x, None).self_influence_batch((x,))


def test_bad_arguments_and_unfitted():
    with pytest.raises(ValueError, match="overshoot"):
        BoundaryInfluence(overshoot=-0.1)
    with pytest.raises(ValueError, match="max_iter"):
        BoundaryInfluence(max_iter=0)
    with pytest.raises(ValueError, match="num_classes"):
        BoundaryInfluence(num_classes=1)
    with pytest.raises(ValueError, match="score"):
        BoundaryInfluence(score="rank")
    with pytest.raises(RuntimeError, match="bind"):
        BoundaryInfluence().self_influence_batch((torch.zeros(2, 3),))


def test_state_dict_round_trip():
    lin, x, y = linear_setup()
    m = fit(BoundaryInfluence(overshoot=0.0, max_iter=7, score="negative"), lin, x, y)
    m2 = BoundaryInfluence()
    m2.load_state_dict(m.state_dict())
    assert m2.max_iter == 7 and m2.score == "negative" and m2.fitted
    m2.bind(lin, FIRST["input_fn"])
    torch.testing.assert_close(m2.self_influence_batch((x, y)), m.self_influence_batch((x, y)))


def test_inputs_come_from_a_callable_and_gradients_are_refused():
    """The method reads no batch format: without input_fn it says how to give one; its
    gradient entry point points to the batch one."""
    lin, x, y = linear_setup(n=6)
    with pytest.raises(ValueError, match=r"needs input_fn\(batch\).*context="):
        BoundaryInfluence().fit(lin, {}, None, [(x, y)])
    m = fit(BoundaryInfluence(), lin, x, y)
    with pytest.raises(TypeError, match=r"reads batches.*self_influence_batch"):
        m.self_influence((x, y))
