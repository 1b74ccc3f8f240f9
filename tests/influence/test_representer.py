"""Representer points (Yeh et al. 2018 refit; Sui et al. 2021 LJE) against oracles, float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_memo.influence.last_layer import find_output_linear
from lightning_memo.influence.methods import RepresenterPoints, query_matrix, train_pass

pytestmark = pytest.mark.usefixtures("one_thread")

N, D_IN, HID, C = 60, 5, 8, 3


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    y = (x[:, :3] + 1.5 * torch.randn(N, 3, generator=g, dtype=torch.float64)).argmax(dim=1)
    return x, y


def _model(seed: int = 0, steps: int = 40) -> nn.Module:
    """Tiny MLP 5-8-3 trained a bit (not to a stationary point)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D_IN, HID), nn.Tanh(), nn.Linear(HID, C)).double()
    x, y = _data(seed)
    for _ in range(steps):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    return model.eval()


def _batches(x, y, bs: int = 16):
    idx = torch.arange(len(x))
    return [(x[s : s + bs], y[s : s + bs], idx[s : s + bs]) for s in range(0, len(x), bs)]


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[tanh(W1 x + b1), 1]: the final layer's input with the folded bias."""
    with torch.no_grad():
        h = model[1](model[0](x))
    return torch.cat([h, torch.ones(len(x), 1, dtype=h.dtype)], dim=1)


#: the fit context for tuple batches (x, y, index); dict batches use their keys
TUPLE = {"input_fn": lambda b: b[0], "label_fn": lambda b: b[1], "index_fn": lambda b: b[2]}
DICT = {"input_fn": lambda b: b["input"], "label_fn": lambda b: b["label"]}


def _fit(model, batches, context=TUPLE, **kw) -> RepresenterPoints:
    params = dict(model.named_parameters())
    return RepresenterPoints(**kw).fit(model, params, None, batches, context)


@pytest.fixture(scope="module")
def setup():
    model = _model()
    x, y = _data()
    batches = _batches(x, y)
    return model, x, y, batches


@pytest.fixture(scope="module")
def refit(setup):
    model, _, _, batches = setup
    return _fit(model, batches, l2=1e-2)


def test_find_output_linear_default_is_last(setup):
    name, mod = find_output_linear(setup[0])
    assert name == "2" and mod is setup[0][2]


def test_refit_decomposition_sums_to_refitted_logits(setup, refit):
    """Yeh et al. Thm 3.1: sum_i alpha_i <f_i, f_q> = W* f_q (bias folded as feature 1)."""
    model = setup[0]
    xq = torch.randn(25, D_IN, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    yq = torch.zeros(25, dtype=torch.long)
    fq = _features(model, xq)
    direct = fq @ refit.weights.T
    decomposed = (fq @ refit.features.T) @ refit.alpha
    err = (decomposed - direct).abs().max().item()
    assert err < 1e-4, err
    assert err < 1e-10  # measured 2.7e-15 (Newton-polished refit, max |grad J| ~ 1e-17)
    assert torch.allclose(refit.decomposed_logits((xq, yq)), direct, atol=1e-7)
    # the stored features are the hooked inputs of the last layer, bias column 1
    assert torch.allclose(refit.features, _features(model, setup[1]))
    assert refit.alpha.shape == (N, C) and refit.features.shape == (N, HID + 1)
    assert torch.equal(refit.indices, torch.arange(N))
    # the refit moves the layer: gap to the trained logits is reported and consistent
    gap = (refit.features @ (refit.trained_weights - refit.weights).T).abs().max().item()
    assert refit.refit_gap == pytest.approx(gap) and gap > 0


def test_refit_is_stationary(setup, refit):
    """grad of (1/n) sum CE(W f_i, y_i) + lambda ||W||^2 at W* (autograd, from scratch) ~ 0."""
    model, x, y, _ = setup
    f = _features(model, x)
    w = refit.weights.clone().requires_grad_(True)
    obj = nn.functional.cross_entropy(f @ w.T, y) + 1e-2 * w.square().sum()
    (grad,) = torch.autograd.grad(obj, w)
    assert grad.abs().max().item() < 1e-8
    assert refit.stationarity < 1e-8
    # alpha_i = -(1/(2 lambda n)) dCE/dPhi_i at W*
    p = torch.softmax(f @ refit.weights.T, dim=1)
    alpha = -(p - nn.functional.one_hot(y, C)) / (2 * 1e-2 * N)
    assert torch.allclose(refit.alpha, alpha, atol=1e-12)


@pytest.mark.parametrize("target", ["predicted", "label"])
def test_refit_rows_match_direct_loop(setup, refit, target):
    model, x, y, batches = setup
    refit.target = target
    try:
        g = torch.Generator().manual_seed(3)
        xq = torch.randn(10, D_IN, generator=g, dtype=torch.float64)
        yq = torch.randint(0, C, (10,), generator=g)
        q_batches = [(xq[:6], yq[:6], torch.arange(6)), (xq[6:], yq[6:], torch.arange(6, 10))]
        q = query_matrix(refit, lambda b: b, q_batches)
        shuffled = [batches[i] for i in (2, 0, 3, 1)]
        out = train_pass(refit, lambda b: b, shuffled, N, index_fn=lambda b: b[2], query_rows=q)
    finally:
        refit.target = "predicted"
    fq, fz = _features(model, xq), _features(model, x)
    cls = model(xq).argmax(dim=1) if target == "predicted" else yq
    expect = torch.zeros(10, N, dtype=torch.float64)
    for i in range(10):
        for j in range(N):
            expect[i, j] = refit.alpha[j, cls[i]] * (fz[j] @ fq[i])
    assert torch.allclose(out["scores"], expect, atol=1e-12)
    assert bool(out["seen"].all())
    self_expect = refit.alpha[torch.arange(N), y] * fz.square().sum(dim=1)
    assert torch.allclose(out["self_influence"], self_expect, atol=1e-12)
    assert bool((out["self_influence"] >= 0).all())  # alpha_{z,y_z} = (1-p_y)/(2 lambda n) >= 0
    assert torch.isnan(refit.hinv_norm_batch(batches[0])).all()


def test_refit_alpha_self_measure_and_dict_batches(setup):
    model, x, y, _ = setup
    dict_batches = [{"input": b[0], "label": b[1], "index": b[2]} for b in _batches(x, y, 20)]
    rp = _fit(model, dict_batches, DICT, l2=1e-2, self_measure="alpha")
    s = rp.self_influence_batch(dict_batches[0])
    assert torch.equal(rp.indices, torch.arange(N))  # no index_fn: positions
    assert torch.allclose(s, rp.alpha[torch.arange(20), y[:20]].abs(), atol=1e-12)
    # accessors given to the constructor win over the context's
    rp2 = _fit(
        model,
        [(b[2], b[0], b[1]) for b in _batches(x, y)],
        l2=1e-2,
        input_fn=lambda b: b[1],
        label_fn=lambda b: b[2],
    )
    assert torch.allclose(rp2.alpha, rp.alpha, atol=1e-9)


def test_refit_model_targets_small_l2_agrees_with_network(setup):
    """Against the model's own probabilities (Yeh et al.'s code) with a small lambda the refit
    keeps the trained network's probabilities (the logits may shift by a per-sample constant,
    which softmax ignores and the L2 penalty picks), and still decomposes exactly."""
    model, x, y, batches = setup
    rp = _fit(model, batches, l2=1e-4, targets="model")
    f = rp.features
    assert rp.stationarity < 1e-8
    assert torch.allclose((f @ f.T) @ rp.alpha, f @ rp.weights.T, atol=1e-4)
    prob_gap = torch.softmax(f @ rp.weights.T, 1) - torch.softmax(f @ rp.trained_weights.T, 1)
    assert prob_gap.abs().max().item() < 0.05


# ----------------------------------------------------------------------------- LJE
def _ce_hessian_autograd(f: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    def loss(v: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(f @ v.reshape(w.shape).T, y)

    return torch.autograd.functional.hessian(loss, w.reshape(-1))


@pytest.mark.parametrize("ascent_lr", [0.0, 0.5])
def test_lje_per_sample_matrices_and_exact_identity(setup, ascent_lr):
    """M_i = (Theta_dot - H^+ [g_i f_i^T]) / n against an autograd Hessian + pinv; the identity
    sum_i M_i f_t = Theta_N f_t (Theta_N = Theta_dot - H^+ grad L(Theta_dot)) holds exactly."""
    model, x, y, batches = setup
    rp = _fit(model, batches, variant="lje", ascent_lr=ascent_lr)
    assert rp.name == "representer_lje" and rp.alpha is None
    f = _features(model, x)
    theta = torch.cat([model[2].weight, model[2].bias[:, None]], dim=1).detach()
    assert torch.allclose(rp.trained_weights, theta)
    w = theta.clone().requires_grad_(True)
    (grad0,) = torch.autograd.grad(nn.functional.cross_entropy(f @ w.T, y), w)
    theta_dot = theta + ascent_lr * grad0
    assert torch.allclose(rp.expansion_weights, theta_dot, atol=1e-12)
    hinv = torch.linalg.pinv(_ce_hessian_autograd(f, y, theta_dot), rtol=1e-10, hermitian=True)
    g = torch.softmax(f @ theta_dot.T, dim=1) - nn.functional.one_hot(y, C)
    outer = (g[:, :, None] * f[:, None, :]).reshape(N, -1)
    m_oracle = (theta_dot.reshape(1, -1) - outer @ hinv) / N
    rows = torch.cat([rp.train_rows_batch(b) for b in batches])
    assert torch.allclose(rows, m_oracle, atol=1e-9)
    theta_n = theta_dot - (hinv @ outer.mean(dim=0)).reshape(theta.shape)
    assert torch.allclose(rows.sum(dim=0).reshape(theta.shape), theta_n, atol=1e-9)
    assert torch.allclose(rp.weights, theta_n, atol=1e-9)
    # scores through the drivers: sum over training samples = Theta_N f_q at the query class
    xq = torch.randn(7, D_IN, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    qb = [(xq, torch.zeros(7, dtype=torch.long))]
    q = query_matrix(rp, lambda b: b, qb)
    out = train_pass(rp, lambda b: b, batches, N, index_fn=lambda b: b[2], query_rows=q)
    fq = _features(model, xq)
    cls = model(xq).argmax(dim=1)
    total = out["scores"].sum(dim=1)
    expect = (fq @ theta_n.T).gather(1, cls[:, None]).squeeze(1)
    assert torch.allclose(total, expect, atol=1e-9)
    assert torch.allclose(rp.decomposed_logits(qb[0]), fq @ theta_n.T, atol=1e-12)
    # direct loop for the pairwise scores and the self-influence [M_z f_z]_{y_z}
    m = m_oracle.reshape(N, C, -1)
    loop = torch.stack([torch.stack([m[j, cls[i]] @ fq[i] for j in range(N)]) for i in range(7)])
    assert torch.allclose(out["scores"], loop, atol=1e-9)
    self_loop = torch.stack([m[j, y[j]] @ f[j] for j in range(N)])
    assert torch.allclose(out["self_influence"], self_loop, atol=1e-9)


def test_lje_reproduces_the_trained_network_to_second_order(setup):
    """The LJE decomposition sums to Theta_N f = (Theta - H^+ grad L(Theta)) f: exactly the
    trained network's logits when its last layer is a stationary point of the mean loss, and
    within O(eps^2) of the optimum's logits when the layer is eps away from it (one Newton step
    of a first-order expansion of the Jacobian); the trained layer itself is O(eps) away."""
    model, x, y, batches = setup
    model = copy.deepcopy(model)
    f = _features(model, x)
    w = torch.cat([model[2].weight, model[2].bias[:, None]], dim=1).detach()

    def loss(v: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(f @ v.reshape(w.shape).T, y)

    for _ in range(8):  # Newton with the autograd Hessian: the stationary last layer
        v = w.reshape(-1).requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(v), v)
        hess = torch.autograd.functional.hessian(loss, v.detach())
        w = (
            (v - torch.linalg.pinv(hess, rtol=1e-10, hermitian=True) @ grad)
            .detach()
            .reshape(w.shape)
        )
    v = w.reshape(-1).requires_grad_(True)
    assert torch.autograd.grad(loss(v), v)[0].abs().max().item() < 1e-12

    def gap(eps: float, delta: torch.Tensor) -> tuple:
        with torch.no_grad():
            model[2].weight.copy_(w[:, :-1] + eps * delta[:, :-1])
            model[2].bias.copy_(w[:, -1] + eps * delta[:, -1])
        rp = _fit(model, batches, variant="lje")
        decomposed = torch.cat([rp.decomposed_logits(b) for b in batches])
        return (decomposed - f @ w.T).abs().max().item(), rp.refit_gap

    delta = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=w.dtype)
    delta -= delta.mean(dim=0)  # off the softmax null space (logits shifted equally)
    at_opt, gap_opt = gap(0.0, delta)
    assert at_opt < 1e-10 and gap_opt < 1e-10
    (e1, g1), (e2, g2) = gap(0.1, delta), gap(0.05, delta)
    assert 3.0 < e1 / e2 < 5.0, (e1, e2)  # second order
    assert 1.5 < g1 / g2 < 2.5 and e2 < 0.1 * g2, (g1, g2)  # the trained layer: first order


def test_lje_damping_and_size_limit(setup):
    model, _, _, batches = setup
    rp = _fit(model, batches, variant="lje", damping=1e-3)
    assert torch.isfinite(rp.weights).all()
    with pytest.raises(ValueError, match=r"27 x 27 Hessian.*max_params=10"):
        _fit(model, batches, variant="lje", max_params=10)


# ----------------------------------------------------------------------------- bad input
class _SoftmaxLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(D_IN, HID)
        self.head = nn.Linear(HID, C)
        self.probs = nn.Softmax(dim=1)

    def forward(self, x):
        return self.probs(self.head(torch.tanh(self.body(x))))


class _NormLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(D_IN, C)
        self.norm = nn.LayerNorm(C)

    def forward(self, x):
        return self.norm(self.head(x))


class _FunctionalLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(D_IN, C)

    def forward(self, x):
        return self.head(x).log_softmax(dim=1)


class _NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, C, D_IN)

    def forward(self, x):
        return self.conv(x[:, None]).flatten(1)


@pytest.mark.parametrize(
    "cls, pattern",
    [
        (_SoftmaxLast, r"last nn.Linear found is 'head' \(Linear\).*module 'probs' \(Softmax\)"),
        (_NormLast, r"last nn.Linear found is 'head' \(Linear\).*module 'norm' \(LayerNorm\)"),
        (_FunctionalLast, r"'head' \(Linear\).*operation in forward\(\)"),
    ],
)
def test_model_whose_output_is_not_the_linear_layer(setup, cls, pattern):
    x, y = _data()
    model = cls().double()
    with pytest.raises(ValueError, match=pattern):
        _fit(model, _batches(x, y))


def test_model_without_linear(setup):
    x, y = _data()
    with pytest.raises(ValueError, match=r"_NoLinear has no nn.Linear module.*'conv' \(Conv1d\)"):
        _fit(_NoLinear().double(), _batches(x, y))


def test_bad_arguments_and_data(setup):
    model, x, y, batches = setup
    for kw, pat in [
        ({"variant": "exact"}, "variant='exact'"),
        ({"l2": 0.0}, "l2=0.0"),
        ({"target": "true"}, "target='true'"),
        ({"targets": "soft"}, "targets='soft'"),
        ({"variant": "lje", "self_measure": "alpha"}, "self_measure='alpha'"),
    ]:
        with pytest.raises(ValueError, match=pat):
            RepresenterPoints(**kw)
    with pytest.raises(ValueError, match="Layer 'nope' matches no module"):
        _fit(model, batches, layer="nope")
    with pytest.raises(ValueError, match="layer='1' is a Tanh"):
        _fit(model, batches, layer="1")
    bad_y = [(b[0], b[1] + 5, b[2]) for b in batches]
    with pytest.raises(ValueError, match="Label .* out of range .* 3 outputs"):
        _fit(model, bad_y)
    x_nan = x.clone()
    x_nan[3] = float("nan")
    with pytest.raises(ValueError, match="1 training samples have non-finite"):
        _fit(model, _batches(x_nan, y))
    with pytest.raises(RuntimeError, match="not fitted"):
        RepresenterPoints().train_rows_batch(batches[0])


def test_registry_names_and_float32_model(setup):
    from lightning_memo.influence.registry import make_method

    model, x, y, _ = setup
    rp = make_method("representer", {}, l2=1e-2)
    lje = make_method("representer_lje", {})
    assert (rp.name, rp.variant, lje.name, lje.variant) == (
        "representer",
        "refit",
        "representer_lje",
        "lje",
    )
    assert not rp.uses_gradients and rp.fit_data == "train" and rp.has_scores
    m32 = copy.deepcopy(model).float()
    b32 = _batches(x.float(), y)
    rp.fit(m32, dict(m32.named_parameters()), None, b32, TUPLE)
    f = rp.features
    assert f.dtype == torch.float64 and rp.train_rows_batch(b32[0]).dtype == torch.float64
    assert torch.allclose((f @ f.T) @ rp.alpha, f @ rp.weights.T, atol=1e-10)


def test_inputs_and_labels_come_from_callables(setup):
    """The method reads no batch format: without input_fn / label_fn it says how to pass them."""
    model, _, _, batches = setup
    with pytest.raises(ValueError, match=r"needs input_fn\(batch\).*context="):
        _fit(model, batches, {})
    with pytest.raises(ValueError, match=r"needs label_fn\(batch\).*context="):
        _fit(model, batches, {"input_fn": lambda b: b[0]})
    with pytest.raises(ValueError, match=r"label_fn must return \(B,\) integer class ids"):
        _fit(model, batches, {**TUPLE, "label_fn": lambda b: b[1].double()})
