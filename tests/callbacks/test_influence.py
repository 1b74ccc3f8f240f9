"""InfluenceAnalysis: results vs a brute-force damped Hessian solve, caching, run(), bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_memo import InfluenceAnalysis, TracIn
from tests.callbacks.helpers import (
    PSMLP,
    TinyMLP,
    make_data,
    make_loader,
    query_loader,
    read_csv,
    seeded_fit,
    trainer,
)
from tests.helpers import assert_close_rel

N = 120
DAMPING = 0.05


def fit(tmp_path, callbacks, epochs=2, shuffle=True, model=PSMLP, **kw):
    loader = make_loader(shuffle=shuffle)
    return seeded_fit(tmp_path, callbacks, epochs=epochs, model=model, loader=loader, **kw)[1]


def brute_last_layer(model, damping):
    """Scores, self-influence and ||H^-1 g|| of the last Linear layer's (W, b) by autograd:
    H = Hessian of the mean cross-entropy over all N training samples (PSD for a last layer)."""
    x, y = make_data(N)
    xq, yq = make_data(10, seed=1)
    with torch.no_grad():
        h, hq = model.net[:4](x).double(), model.net[:4](xq).double()
    w0 = torch.cat([model.net[4].weight.detach().reshape(-1), model.net[4].bias.detach()]).double()

    def logits(theta, feats):
        return feats @ theta[:48].reshape(3, 16).T + theta[48:]

    hess = torch.autograd.functional.hessian(lambda t: F.cross_entropy(logits(t, h), y), w0)

    def grads(feats, labels):
        rows = []
        for i in range(feats.shape[0]):
            t = w0.clone().requires_grad_(True)
            loss = F.cross_entropy(logits(t, feats[i : i + 1]), labels[i : i + 1])
            rows.append(torch.autograd.grad(loss, t)[0])
        return torch.stack(rows)

    gz, gq = grads(h, y), grads(hq, yq)
    evals, evecs = torch.linalg.eigh(hess)
    hinv = evecs @ torch.diag(1 / (evals.clamp(min=0) + damping)) @ evecs.T
    return gq @ hinv @ gz.T, ((gz @ hinv) * gz).sum(1), (gz @ hinv).norm(dim=1)


@pytest.mark.parametrize("method", ["exact", "cg", "arnoldi"])
def test_last_layer_equals_brute_force(tmp_path, method):
    """Shuffled training loader: results are placed by sample index, not by position."""
    kw = {"arnoldi_dim": 51, "arnoldi_k": 51} if method == "arnoldi" else {}
    ia = InfluenceAnalysis(
        method=method,
        layers=["net.4"],
        queries=query_loader(),
        damping=DAMPING,
        max_examples=N,
        progress=False,
        output_dir=str(tmp_path / "out"),
        **kw,
    )
    model = fit(tmp_path, [ia])
    want_scores, want_self, want_norm = brute_last_layer(model, DAMPING)
    rtol = 1e-4 if method != "exact" else 1e-5  # float32 model: gradients in float32
    assert_close_rel(ia.scores, want_scores, rtol)
    assert_close_rel(ia.self_influence, want_self, rtol)
    assert_close_rel(ia.hinv_norm, want_norm, rtol)
    csv = read_csv(tmp_path / "out" / "self_influence.csv")
    np.testing.assert_array_equal(csv["index"], np.arange(N))
    np.testing.assert_array_equal(csv["label"], make_data(N)[1].numpy())
    np.testing.assert_allclose(csv["self_influence"], want_self.numpy(), rtol=1e-4)
    order = torch.argsort(want_scores[3], descending=True)
    res = ia.top_k_for(3, 5)
    np.testing.assert_array_equal(res["proponents"], order[:5].numpy())
    np.testing.assert_array_equal(res["opponents"], order.flip(0)[:5].numpy())
    top = read_csv(tmp_path / "out" / "top_k.csv")
    assert len(top["query"]) == 10 * ia.top_k
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["method"] == method and cfg["layers"] == ["net.4"] and cfg["num_train"] == N
    assert cfg["damping_used"] == DAMPING and cfg["num_query"] == 10


def test_ekfac_matches_kfac_module_and_is_cached(tmp_path):
    """Second run with the same config and weights reuses factors and scores; a changed
    configuration (damping) or changed weights recompute."""
    out = str(tmp_path / "out")
    ia = InfluenceAnalysis(
        queries=query_loader(), progress=False, output_dir=out, fisher="empirical"
    )
    model = fit(tmp_path, [ia])
    assert ia.reused == {"factors": False, "scores": False}
    assert ia.scores.shape == (10, N) and torch.isfinite(ia.scores).all()
    assert (ia.self_influence > 0).all() and (ia.hinv_norm > 0).all()
    tr = trainer(tmp_path, [])
    again = InfluenceAnalysis(
        queries=query_loader(), progress=False, output_dir=out, fisher="empirical"
    )
    again.run(tr, model, train=make_loader())
    assert again.reused == {"factors": True, "scores": True}
    torch.testing.assert_close(again.scores, ia.scores)
    torch.testing.assert_close(again.self_influence, ia.self_influence)
    other = InfluenceAnalysis(
        queries=query_loader(), progress=False, output_dir=out, fisher="empirical", damping=0.3
    )
    other.run(tr, model, train=make_loader())
    assert other.reused == {"factors": False, "scores": False}
    assert not torch.allclose(other.self_influence, ia.self_influence)
    with torch.no_grad():
        model.net[0].bias.add_(0.1)  # the model changed: checksum differs, refit
    changed = InfluenceAnalysis(
        queries=query_loader(), progress=False, output_dir=out, fisher="empirical"
    )
    changed.run(tr, model, train=make_loader())
    assert changed.reused == {"factors": False, "scores": False}
    # other queries with the same factors: factors reused, scores recomputed
    fresh = InfluenceAnalysis(
        queries=query_loader(seed=7), progress=False, output_dir=out, fisher="empirical"
    )
    fresh.run(tr, model, train=make_loader())
    assert fresh.reused == {"factors": True, "scores": False}


def test_cg_reruns_in_the_same_folder(tmp_path):
    """CG keeps a Hessian-vector product, not factors: nothing to reuse, but a rerun works."""
    kw = dict(method="cg", layers=["net.4"], damping=5.0, queries=query_loader(), progress=False)
    first = InfluenceAnalysis(output_dir=str(tmp_path / "o"), **kw)
    model = fit(tmp_path, [first], epochs=1)
    second = InfluenceAnalysis(output_dir=str(tmp_path / "o"), **kw)
    second.run(trainer(tmp_path, []), model, train=make_loader())
    assert second.reused["factors"] is False
    torch.testing.assert_close(second.scores, first.scores)


def test_run_on_demand_equals_on_fit_end(tmp_path):
    auto = InfluenceAnalysis(method="kfac", queries=query_loader(), progress=False, cache=False)
    model = fit(tmp_path / "a", [auto])
    manual = InfluenceAnalysis(method="kfac", queries=query_loader(), progress=False, cache=False)
    manual.run(trainer(tmp_path / "b", []), model, train=make_loader())
    torch.testing.assert_close(manual.scores, auto.scores)
    torch.testing.assert_close(manual.self_influence, auto.self_influence)


def test_tensorboard_and_image_grid(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_memo.callbacks.reports import proponent_images

    ia = InfluenceAnalysis(
        method="kfac", queries=query_loader(), progress=False, image_shape=(2, 4), n_show=2
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    fit(tmp_path, [ia], logger=logger)
    grid = proponent_images(ia, make_loader(), query_loader())
    assert grid.shape[0] == 3 and grid.shape[1] > grid.shape[2] / 11 * 2 * 0.5
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    acc.Reload()
    assert "influence/ekfac/self_influence" not in acc.Tags()["histograms"]
    assert "influence/kfac/self_influence" in acc.Tags()["histograms"]
    assert "influence/kfac/proponents_opponents" in acc.Tags()["images"]


def test_the_stored_tracin_and_influence_share_one_gradient_path(tmp_path):
    """TracIn's exact rows and the influence gradients come from one featurizer: the identity
    'Hessian' (huge damping) turns influence into damping^-1 x the last checkpoint's TracIn."""
    big = 1e6
    ia = InfluenceAnalysis(method="exact", layers=["net.4"], damping=big, progress=False)
    tr = TracIn(layers=["net.4"], projection_dim=None, progress=False)
    fit(tmp_path, [tr, ia], epochs=1, shuffle=False)
    lr = 0.05
    torch.testing.assert_close(ia.self_influence * big, tr.self_influence / lr, rtol=1e-4, atol=0)


def test_group_influence_from_the_callback(tmp_path):
    """Order 1 = (1/N) x the summed scores of each group's members; order 2 (exact Hessian)
    differs from it by the pairwise term; groups by label column."""
    ia = InfluenceAnalysis(
        method="exact", layers=["net.4"], queries=query_loader(), damping=DAMPING, max_examples=N,
        progress=False,
    )  # fmt: skip
    fit(tmp_path, [ia])
    groups = [[0, 5, 7], list(range(20, 50))]
    first = ia.group_influence(groups)
    want = torch.stack([ia.scores[:, g].double().sum(1) / N for g in groups])
    assert first.shape == (2, 10)
    assert_close_rel(first, want, 1e-5)
    second = ia.group_influence(groups, order=2)
    assert second.shape == (2, 10) and not torch.allclose(second, first)
    by_label = ia.group_influence(make_data(N)[1])
    labels = make_data(N)[1]
    want = torch.stack([ia.scores[:, labels == c].double().sum(1) / N for c in range(3)])
    assert_close_rel(by_label, want, 1e-5)
    with pytest.raises(ValueError, match="out of range"):
        ia.group_influence([[0, N + 3]])


# ----------------------------------------------------------------------------- bad input
def test_bad_arguments():
    with pytest.raises(ValueError, match="method='lissa'"):
        InfluenceAnalysis(method="lissa")
    with pytest.raises(ValueError, match="damping=0.0 is not allowed"):
        InfluenceAnalysis(damping=0.0)
    with pytest.raises(ValueError, match="damping=-1.0 is not allowed"):
        InfluenceAnalysis(method="arnoldi", damping=-1.0)
    with pytest.raises(ValueError, match="arnoldi_k=60"):
        InfluenceAnalysis(method="arnoldi", arnoldi_dim=50, arnoldi_k=60)
    with pytest.raises(ValueError, match="fisher='model'"):
        InfluenceAnalysis(fisher="model")


class NormMLP(PSMLP):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))


def test_unsupported_layer_for_kfac(tmp_path):
    ia = InfluenceAnalysis(layers=["net.1"], progress=False)
    with pytest.raises(ValueError, match=r"(?s)nn.Linear.*Conv2d.*LayerNorm.*arnoldi"):
        fit(tmp_path, [ia], epochs=1, model=NormMLP())


def test_arnoldi_dim_larger_than_parameter_count(tmp_path):
    ia = InfluenceAnalysis(
        method="arnoldi", layers=["net.4"], arnoldi_dim=60, arnoldi_k=10, progress=False
    )
    with pytest.raises(ValueError, match=r"arnoldi_dim=60 is larger than the number of param.*51"):
        fit(tmp_path, [ia], epochs=1)


def test_negative_hessian_eigenvalues_warn_with_count(tmp_path):
    ia = InfluenceAnalysis(method="exact", layers=["net.2"], damping=0.1, progress=False)
    with pytest.warns(UserWarning, match=r"\d+ of 272 Hessian eigenvalues are negative"):
        fit(tmp_path, [ia], epochs=1)


def test_query_loader_without_labels(tmp_path):
    ia = InfluenceAnalysis(method="kfac", queries=query_loader(labels=False), progress=False)
    with pytest.raises(ValueError, match="The query loader has no labels"):
        fit(tmp_path, [ia], epochs=1)


def test_exact_on_too_many_parameters(tmp_path):
    ia = InfluenceAnalysis(method="exact", progress=False)
    model = TinyMLP(hidden=80)
    model.per_sample_loss = PSMLP.per_sample_loss.__get__(model)
    with pytest.raises(
        ValueError, match=r"7443 x 7443 Hessian.*more than 5000 parameters.*layers="
    ):
        fit(tmp_path, [ia], epochs=1, model=model)


def test_representer_points_from_the_callback(tmp_path):
    """The decomposition of the refitted last layer reproduces its logits; top-k lists exist."""
    ia = InfluenceAnalysis(
        method="representer", queries=query_loader(), progress=False, method_kwargs={"l2": 1e-2}
    )
    model = fit(tmp_path, [ia])
    est = ia.estimator
    assert ia.scores.shape == (10, N) and ia.self_influence.shape == (N,)
    assert torch.isnan(ia.hinv_norm).all()  # no Hessian
    xq, _ = make_data(10, seed=1)
    with torch.no_grad():
        feats = torch.cat([model.net[:4](xq), torch.ones(10, 1)], dim=1).double()
    logits = feats @ est.weights.double().T
    pred = logits.argmax(1)
    # sum over training samples of the query's scores = its predicted-class logit
    torch.testing.assert_close(ia.scores.double().sum(1), logits[torch.arange(10), pred])


def test_boundary_and_gex_from_the_callback(tmp_path):
    """Boundary: self-influence only (= minus the distance to the decision boundary, which
    moving the input by that distance along the found direction crosses); GEX: scores are the
    covariance of the ensemble's loss changes, self-influence their mean square."""
    boundary = InfluenceAnalysis(method="boundary", queries=query_loader(), progress=False)
    gex = InfluenceAnalysis(
        method="gex",
        queries=query_loader(),
        progress=False,
        method_kwargs={"num_ens": 3, "ft_step": 12, "ft_lr": 0.01},
        output_dir=str(tmp_path / "gex"),
    )
    fit(tmp_path, [boundary, gex])
    assert boundary.scores is None and (boundary.self_influence < 0).all()
    assert torch.isnan(boundary.hinv_norm).all()
    with pytest.raises(ValueError, match="No scores"):
        boundary.top_k_for(0)
    assert gex.scores.shape == (10, N) and (gex.self_influence >= 0).all()
    rows = read_csv(tmp_path / "gex" / "self_influence.csv")
    np.testing.assert_allclose(rows["self_influence"], gex.self_influence.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="num_ens"):
        InfluenceAnalysis(method="gex", method_kwargs={"num_ens": 1})


# ----------------------------------------------------------------------------- API
def test_keyword_only_arguments_and_method_options():
    with pytest.raises(TypeError):
        InfluenceAnalysis("exact", ["net.4"])  # only `method` is positional
    with pytest.raises(ValueError, match=r"method='ekfac' takes no option 'num_ens'.*fisher"):
        InfluenceAnalysis(method="ekfac", method_kwargs={"num_ens": 8})
    with pytest.raises(ValueError, match="layers= or parameters="):
        InfluenceAnalysis(layers=["net.4"], parameters=["net.4.weight"])
    # the callback's shared settings go only to the methods that take them
    InfluenceAnalysis(method="gex", arnoldi_k=3, fisher="empirical", method_kwargs={"num_ens": 2})
    rng = torch.get_rng_state()  # validating the options draws nothing: model inits unchanged
    for method in ("ekfac", "randproj", "relatif", "gex", "representer"):
        InfluenceAnalysis(method=method)
    assert torch.equal(rng, torch.get_rng_state())


def test_parameters_select_what_is_differentiated(tmp_path):
    """parameters= (names or globs) equals layers= for whole layers; a single parameter works for
    exact and is refused for K-FAC (which factors whole layers)."""
    kw = dict(
        method="exact", queries=query_loader(), damping=DAMPING, max_examples=N, progress=False
    )
    by_layer = InfluenceAnalysis(layers=["net.4"], **kw)
    by_glob = InfluenceAnalysis(parameters="net.4.*", **kw)
    weight = InfluenceAnalysis(parameters=["net.4.weight"], **kw)
    fit(tmp_path, [by_layer, by_glob, weight])
    assert len({by_layer.out_dir, by_glob.out_dir, weight.out_dir}) == 3  # one folder each
    assert_close_rel(by_glob.scores, by_layer.scores, 1e-5)
    assert by_glob.config["parameters"] == ["net.4.weight", "net.4.bias"]
    assert weight.config["num_parameters"] == 48 and weight.scores.shape == (10, N)
    kfac = InfluenceAnalysis(method="kfac", parameters=["net.4.weight"], progress=False)
    with pytest.raises(ValueError, match=r"factors whole layers.*'net.4.bias'.*'net.4.\*'"):
        fit(tmp_path / "k", [kfac], epochs=1)
    with pytest.raises(ValueError, match="No parameter matches 'net.9.*'"):
        fit(tmp_path / "m", [InfluenceAnalysis(parameters=["net.9.*"])], epochs=1)


@pytest.mark.parametrize("bar", [False, True])
def test_progress_follows_the_trainer(tmp_path, capfd, bar):
    ia = InfluenceAnalysis(method="kfac", queries=query_loader(), cache=False)
    fit(tmp_path, [ia], epochs=1, enable_progress_bar=bar)
    assert ("Influence (kfac)" in capfd.readouterr().err) is bar


def test_state_dict_says_what_was_computed(tmp_path):
    ia = InfluenceAnalysis(method="kfac", queries=query_loader(), progress=False, top_k=3)
    assert ia.state_dict()["ran"] is False
    fit(tmp_path, [ia], epochs=1)
    state = ia.state_dict()
    assert state["method"] == "kfac" and state["ran"] is True
    assert state["shapes"] == {"self_influence": [N], "hinv_norm": [N], "scores": [10, N],
                               "labels": [N]}  # fmt: skip
    assert state["config"] == ia.config and state["config"]["num_train"] == N
    path = tmp_path / "state.pt"
    torch.save(state, path)
    back = InfluenceAnalysis(method="kfac", top_k=3)
    back.load_state_dict(torch.load(path, weights_only=True))  # plain tensors, containers
    torch.testing.assert_close(back.self_influence, ia.self_influence)
    np.testing.assert_array_equal(back.top_k_for(2)["proponents"], ia.top_k_for(2)["proponents"])
    empty = InfluenceAnalysis()
    empty.load_state_dict({})  # older or partial states: missing keys are skipped
    assert empty.self_influence is None and empty.config is None
