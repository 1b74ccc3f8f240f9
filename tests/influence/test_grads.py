"""Per-sample gradients and gradient features vs a for-loop of single-sample backward passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_memo.influence import (
    LinearGradCapture,
    linear_grads_from_io,
    per_sample_grads,
    select_parameters,
)
from lightning_memo.influence.features import GradientFeaturizer
from tests import helpers
from tests.helpers import ce_loss, loop_grads

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def seq_loss(model, batch):
    """Per-sample loss of a sequence model: token losses summed over positions. (B,)"""
    logits = model(batch[0])  # (B, T, C)
    tok = F.cross_entropy(logits.transpose(1, 2), batch[1], reduction="none")  # (B, T)
    return tok.sum(dim=1)


def mlp(seed=0):
    return helpers.mlp((5, 7, 3), seed)


def mlp_batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class SeqModel(nn.Module):
    """Token model (B, T, d) -> (B, T, C); the same Linear layers act at every position."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


def seq_batch(n=5, t=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, 4, generator=g, dtype=DT), torch.randint(0, 3, (n, t), generator=g)


# --------------------------------------------------------------------------- per_sample_grads
def test_per_sample_grads_mlp_equals_loop():
    model = mlp()
    params = dict(model.named_parameters())
    batch = mlp_batch()
    got = per_sample_grads(model, params, ce_loss, batch)
    want = loop_grads(model, params, ce_loss, batch, 6)
    assert set(got) == set(params)
    for k in params:
        assert got[k].shape == (6, *params[k].shape)
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)
    # samples differ (a broadcast bug would give identical rows)
    assert (got["0.weight"][0] - got["0.weight"][1]).abs().max() > 1e-3
    # the model's own gradients are left untouched
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())


def test_per_sample_grads_conv_equals_loop():
    torch.manual_seed(0)
    model = ConvNet().to(DT)
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(5, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 4, (5,), generator=g))
    params = {k: p for k, p in model.named_parameters() if k.startswith("conv")}
    got = per_sample_grads(model, params, ce_loss, batch)
    want = loop_grads(model, params, ce_loss, batch, 5)
    assert set(got) == {"conv.weight", "conv.bias"}
    for k in params:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)


def test_per_sample_grads_dict_batch_with_non_tensor_entry():
    model = mlp()
    params = select_parameters(model)
    x, y = mlp_batch(4)

    def dict_loss(m, b):
        assert b["tag"] == "keep"  # non-tensors are passed through unbatched
        return F.cross_entropy(m(b["x"]), b["label"], reduction="none")

    got = per_sample_grads(model, params, dict_loss, {"x": x, "label": y, "tag": "keep"})
    want = loop_grads(model, params, ce_loss, (x, y), 4)
    for k in params:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- Linear fast path
def _captured(model, modules, loss_fn, batch):
    cap = LinearGradCapture(modules).attach()
    cap.active = True
    loss_fn(model, batch).sum().backward()
    cap.active = False
    out = {
        n: linear_grads_from_io(cap.inputs[n], cap.grads[n], m.bias is not None)
        for n, m in modules.items()
    }
    cap.remove()
    model.zero_grad()
    return out


def test_linear_capture_equals_loop_2d():
    model = mlp()
    batch = mlp_batch()
    modules = {"0": model[0], "2": model[2]}
    got = _captured(model, modules, ce_loss, batch)
    want = loop_grads(model, dict(model.named_parameters()), ce_loss, batch, 6)
    for n in modules:
        w, b = got[n]
        torch.testing.assert_close(w, want[f"{n}.weight"], atol=1e-6, rtol=0)
        torch.testing.assert_close(b, want[f"{n}.bias"], atol=1e-6, rtol=0)
    assert not model[0]._forward_hooks and not model[2]._forward_hooks


def test_linear_capture_equals_loop_sequence():
    torch.manual_seed(0)
    model = SeqModel().to(DT)
    batch = seq_batch()
    modules = {"inp": model.inp, "out": model.out}
    got = _captured(model, modules, seq_loss, batch)
    want = loop_grads(model, dict(model.named_parameters()), seq_loss, batch, 5)
    torch.testing.assert_close(got["inp"][0], want["inp.weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["inp"][1], want["inp.bias"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["out"][0], want["out.weight"], atol=1e-6, rtol=0)
    assert got["out"][1] is None


def test_linear_capture_inactive_and_no_grad_record_nothing():
    model = mlp()
    cap = LinearGradCapture({"0": model[0]}).attach()
    ce_loss(model, mlp_batch()).sum().backward()  # not active
    assert not cap.inputs and not cap.grads
    cap.active = True
    with torch.no_grad():
        model(mlp_batch()[0])
    assert not cap.inputs
    cap.remove()
    assert not model[0]._forward_hooks


def test_linear_capture_refuses_other_layers():
    with pytest.raises(ValueError, match="nn.Linear"):
        LinearGradCapture({"conv": nn.Conv1d(1, 1, 3)})
    with pytest.raises(ValueError, match="groups=1"):
        LinearGradCapture({"conv": nn.Conv2d(2, 2, 3, groups=2)})


# --------------------------------------------------------------------------- select_parameters
def test_select_parameters_defaults_to_linear_weights_and_biases():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Conv1d(1, 1, 1), nn.Linear(4, 2))
    assert list(select_parameters(model)) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert list(select_parameters(model, ["1.weight", "3.bias"])) == ["1.weight", "3.bias"]
    model[0].weight.requires_grad_(False)  # frozen parameters are dropped
    assert list(select_parameters(model)) == ["0.bias", "3.weight", "3.bias"]


def test_select_parameters_errors():
    model = mlp()
    with pytest.raises(ValueError, match=r"'0.wieght' is not a parameter of the model.*0\.weight"):
        select_parameters(model, ["0.wieght"])
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="No trainable parameter selected.*requires_grad"):
        select_parameters(model)


# --------------------------------------------------------------------------- GradientFeaturizer
def _flat_linear(want, names, bias=True):
    """Oracle features in the featurizer's order: per layer [W | b] row-major."""
    parts = []
    for n in names:
        w = want[f"{n}.weight"]
        if bias:
            w = torch.cat([w, want[f"{n}.bias"].unsqueeze(2)], dim=2)
        parts.append(w.reshape(w.shape[0], -1))
    return torch.cat(parts, dim=1)


def test_featurizer_exact_linear_path_equals_loop():
    model = mlp()
    batch = mlp_batch()
    feat = GradientFeaturizer({"0": model[0], "2": model[2]}, projection_dim=None, factored=False)
    assert feat.linear and feat.dim == feat.total == 7 * 6 + 3 * 8
    got = feat(model, batch, ce_loss)
    want = loop_grads(model, dict(model.named_parameters()), ce_loss, batch, 6)
    torch.testing.assert_close(got, _flat_linear(want, ["0", "2"]), atol=1e-6, rtol=0)
    assert all(p.grad is None for p in model.parameters())  # weights get no .grad
    # learning rates scale each layer's block by sqrt(lr): <f, f'> carries lr per layer
    feat.set_learning_rates({"0": 0.25, "2": 4.0})
    scaled = feat(model, batch, ce_loss)
    torch.testing.assert_close(scaled[:, :42], 0.5 * got[:, :42], atol=1e-9, rtol=0)
    torch.testing.assert_close(scaled[:, 42:], 2.0 * got[:, 42:], atol=1e-9, rtol=0)


def test_featurizer_projected_linear_equals_kronecker_of_exact():
    """LoGra features == (P_out (x) P_in) @ exact features, layer by layer, same matrices."""
    torch.manual_seed(0)
    model = SeqModel().to(DT)
    batch = seq_batch()
    modules = {"inp": model.inp, "out": model.out}
    exact = GradientFeaturizer(modules, projection_dim=None, factored=False)(model, batch, seq_loss)
    proj = GradientFeaturizer(modules, projection_dim=20, seed=3)
    got = proj(model, batch, seq_loss)
    mats = [proj.projectors[n].full_matrix().to(DT) for n in modules]
    want = torch.cat([exact[:, :30] @ mats[0].T, exact[:, 30:] @ mats[1].T], dim=1)
    assert got.shape == (5, proj.dim)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_featurizer_generic_path_non_linear_layer_equals_loop():
    torch.manual_seed(0)
    model = ConvNet().to(DT)
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(5, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 4, (5,), generator=g))
    modules = {"conv": model.conv, "fc": model.fc}
    feat = GradientFeaturizer(modules, projection_dim=None, hooks=False)
    assert feat.linear is False and GradientFeaturizer(modules, projection_dim=None).linear
    assert feat.dim == 3 * 2 * 9 + 3 + 48 * 4 + 4
    got = feat(model, batch, ce_loss)
    want = loop_grads(model, dict(model.named_parameters()), ce_loss, batch, 5)
    flat = torch.cat(
        [want[k].reshape(5, -1) for k in ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]],
        dim=1,
    )
    torch.testing.assert_close(got, flat, atol=1e-6, rtol=0)
    # learning rates given per layer (module names, as the callback passes them) scale each block
    feat.set_learning_rates({"conv": 0.04, "fc": 9.0})
    scaled = feat(model, batch, ce_loss)
    torch.testing.assert_close(scaled[:, :57], 0.2 * flat[:, :57], atol=1e-9, rtol=0)
    torch.testing.assert_close(scaled[:, 57:], 3.0 * flat[:, 57:], atol=1e-9, rtol=0)
    # projected: the dense projection of exactly these features
    proj = GradientFeaturizer(
        {"conv": model.conv, "fc": model.fc}, projection_dim=32, seed=5, hooks=False
    )
    m = proj.projectors["_dense"].matrix(torch.device("cpu"), DT)
    torch.testing.assert_close(proj(model, batch, ce_loss), flat @ m.T, atol=1e-6, rtol=1e-6)


def test_featurizer_scalar_loss_is_refused_with_hint():
    model = mlp()

    def mean_loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    feat = GradientFeaturizer({"0": model[0]}, projection_dim=None)
    with pytest.raises(
        ValueError, match=r"one loss per sample.*def per_sample_loss|per_sample_loss"
    ):
        feat(model, mlp_batch(), mean_loss)
    with pytest.raises(ValueError, match="reduction='none'"):
        feat(model, mlp_batch(), mean_loss)
    assert not feat.capture.inputs and not feat.capture.active  # cleaned up after the error


def test_featurizer_projection_not_smaller_than_gradient_warns_and_is_exact():
    model = mlp()
    batch = mlp_batch()
    with pytest.warns(UserWarning, match="not smaller than the gradient size 66"):
        feat = GradientFeaturizer({"0": model[0], "2": model[2]}, projection_dim=66, factored=False)
    assert feat.projection_dim is None and feat.dim == 66 and not feat.projectors
    exact = GradientFeaturizer({"0": model[0], "2": model[2]}, projection_dim=None, factored=False)
    torch.testing.assert_close(feat(model, batch, ce_loss), exact(model, batch, ce_loss))


def test_featurizer_layer_without_parameters():
    with pytest.raises(ValueError, match=r"\['act'\] have no trainable parameters"):
        GradientFeaturizer({"act": nn.Tanh()}, projection_dim=None)


def test_per_sample_grads_reach_the_model_through_its_own_methods():
    """A loss that calls a model method using a submodule (self.net(x)) still differentiates the
    given parameters (regression: the wrapper once handed back the real, undifferentiated model)."""

    class WithMethod(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))

        def forward(self, x):
            return self.net(x)

        def per_sample_loss(self, b):
            return F.cross_entropy(self.net(b[0]), b[1], reduction="none")

    torch.manual_seed(0)
    m = WithMethod().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    params = {n: p for n, p in m.named_parameters() if n.startswith("net.1")}
    g = per_sample_grads(m, params, lambda mod, b: mod.per_sample_loss(b), (x, y))
    for i in range(6):
        m.zero_grad()
        m.per_sample_loss((x[i : i + 1], y[i : i + 1])).sum().backward()
        for n, p in params.items():
            torch.testing.assert_close(g[n][i], p.grad, atol=1e-10, rtol=0)
    assert float(g["net.1.weight"].abs().sum()) > 0
