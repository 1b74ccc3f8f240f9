"""Conv2d in the hook path: per-sample gradients from the hooks vs single-sample backward passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_memo.influence.grads import (
    SUPPORTED_LAYERS,
    LayerGradCapture,
    LinearGradCapture,
    layer_dims,
    layer_output_grad_rows,
    linear_grads_from_io,
)
from tests.helpers import TinyCNN, ce_loss, loop_grads

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


CONVS = {
    "stride2": dict(kernel_size=3, stride=2),
    "pad1": dict(kernel_size=3, padding=1),
    "dil2": dict(kernel_size=3, dilation=2),
    "mixed": dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
    "same_even_kernel": dict(kernel_size=(2, 4), padding="same"),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(CONVS))
def test_conv_hooks_equal_single_sample_loop(case, bias):
    torch.manual_seed(0)
    model = TinyCNN(nn.Conv2d(2, 4, bias=bias, **CONVS[case])).to(DT)
    g = torch.Generator().manual_seed(1)
    n = 5
    batch = (torch.randn(n, 2, 7, 7, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
    modules = {"conv": model.conv, "fc": model.fc}
    with LinearGradCapture(modules) as cap:
        cap.active = True
        ce_loss(model, batch).sum().backward()
        got = {
            m: linear_grads_from_io(cap.inputs[m], cap.grads[m], bias or m == "fc") for m in modules
        }
        a, gr = cap.inputs["conv"], cap.grads["conv"]
    want = loop_grads(model, dict(model.named_parameters()), ce_loss, batch, n)
    c_out, d_in, has_bias = layer_dims(model.conv)
    assert (c_out, has_bias) == (4, bias) and d_in == 2 * model.conv.kernel_size[
        0
    ] * model.conv.kernel_size[1]
    assert a.shape[0] == gr.shape[0] == n and a.shape[1] == gr.shape[1] and a.shape[2] == d_in
    assert gr.shape[2] == c_out
    w, b = got["conv"]
    assert w.shape == (n, c_out, d_in)
    torch.testing.assert_close(w, want["conv.weight"].reshape(n, c_out, -1), atol=1e-10, rtol=0)
    if bias:
        torch.testing.assert_close(b, want["conv.bias"], atol=1e-10, rtol=0)
    else:
        assert b is None
    torch.testing.assert_close(got["fc"][0], want["fc.weight"], atol=1e-10, rtol=0)
    assert (w[0] - w[1]).abs().max() > 1e-6  # samples differ
    assert not model.conv._forward_hooks and not model.fc._forward_hooks


def test_conv_autograd_grad_on_outputs_matches_hook_rows():
    """The extra-pass form: gradient w.r.t. the captured raw output, turned into rows."""
    torch.manual_seed(0)
    model = TinyCNN(nn.Conv2d(2, 3, 3, stride=2, padding=1)).to(DT)
    x, y = torch.randn(4, 2, 7, 7, dtype=DT), torch.randint(0, 3, (4,))
    with LayerGradCapture({"conv": model.conv}) as cap:
        cap.active = True
        loss = ce_loss(model, (x, y))
        (go,) = torch.autograd.grad(loss.sum(), [cap.outputs["conv"]])
        rows = layer_output_grad_rows(model.conv, go)
        torch.testing.assert_close(rows, cap.grads["conv"])
    assert all(p.grad is None for p in model.parameters())


def test_grouped_and_other_layers_are_refused():
    assert LayerGradCapture is LinearGradCapture and nn.Conv2d in SUPPORTED_LAYERS
    with pytest.raises(ValueError, match=r"nn\.Linear, nn\.Conv2d with groups=1.*'g'.*groups=2"):
        LinearGradCapture({"g": nn.Conv2d(4, 4, 3, groups=2)})
    with pytest.raises(ValueError, match=r"'c1' \(Conv1d\).*method='arnoldi'"):
        LinearGradCapture({"c1": nn.Conv1d(1, 1, 3), "ok": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="torch.func"):
        layer_dims(nn.LayerNorm(3))
    assert layer_dims(nn.Linear(5, 2, bias=False)) == (2, 5, False)
