"""Tests of feature capture (lightning_memo.capture): layer resolution, pooling and the hook-based
buffers. Oracles: Python loops over samples and tokens, and layer outputs computed by running the
submodules by hand."""

import re

import pytest
import torch
from torch import nn

from lightning_memo.capture import (
    POOLINGS,
    FeatureCapture,
    add_input_hook,
    check_pooling,
    layer_pooling,
    match_names,
    pool,
    replace_output,
    resolve_layers,
    resolve_parameters,
    select_output,
)
from lightning_memo.exceptions import LayerNotFoundError


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Module()
    model.net = nn.Sequential(
        nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)
    )
    model.head = nn.Linear(3, 2)
    return model


def _seq(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4))


def _assert_no_hooks(*modules: nn.Module) -> None:
    for m in modules:
        for sub in m.modules():
            assert len(sub._forward_hooks) == 0


# ---------------------------------------------------------------------------------- resolve_layers


def test_resolve_exact_name():
    model = _mlp()
    out = resolve_layers(model, "net.2")
    assert list(out) == ["net.2"] and out["net.2"] is model.net[2]
    out = resolve_layers(model, ["head", "net.0"])
    assert list(out) == ["head", "net.0"]
    assert out["head"] is model.head and out["net.0"] is model.net[0]


def test_resolve_glob_keeps_model_order():
    model = _mlp()
    out = resolve_layers(model, "net.*")
    assert list(out) == ["net.0", "net.1", "net.2", "net.3", "net.4"]
    assert all(out[f"net.{i}"] is model.net[i] for i in range(5))
    # entries in the order given; glob hits in model order
    out = resolve_layers(model, ["head", "net.[13]"])
    assert list(out) == ["head", "net.1", "net.3"]


def test_resolve_module_objects():
    model = _mlp()
    out = resolve_layers(model, [model.net[4], model.head])
    assert list(out) == ["net.4", "head"]
    assert out["net.4"] is model.net[4]
    assert list(resolve_layers(model, model)) == ["<root>"]


def test_resolve_unknown_name_lists_close_names():
    model = _mlp()
    with pytest.raises(LayerNotFoundError) as info:
        resolve_layers(model, "net3")
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "'net3'" in msg
    closest = re.search(r"Closest names: (.*?)\. Pass", msg)
    assert closest is not None
    assert closest.group(1).split(", ")[0] == "net.3"
    assert "named_modules" in msg

    with pytest.raises(LayerNotFoundError, match="'encoder.*' matches no module"):
        resolve_layers(model, "encoder.*")


def test_resolve_foreign_module():
    model = _mlp()
    with pytest.raises(
        LayerNotFoundError, match="Linear given in layers= is not part of the model"
    ):
        resolve_layers(model, nn.Linear(5, 8))


def test_resolve_empty_and_bad_types():
    model = _mlp()
    with pytest.raises(LayerNotFoundError, match="empty"):
        resolve_layers(model, [])
    with pytest.raises(TypeError, match="names or modules"):
        resolve_layers(model, [3])


# ---------------------------------------------------------------------------------- parameters


def test_resolve_parameters_names_and_globs_in_order_once():
    model = _mlp()
    assert resolve_parameters(model, "head.weight") == ["head.weight"]
    assert resolve_parameters(model, ["head.*", "net.4.b*", "head.bias"]) == [
        "head.weight",
        "head.bias",
        "net.4.bias",
    ]
    every = [n for n, _ in model.named_parameters()]
    assert resolve_parameters(model, ["*"]) == every  # model order
    assert "resolve_parameters" in __import__("lightning_memo.capture").capture.__all__


def test_resolve_parameters_unknown_lists_close_names():
    model = _mlp()
    with pytest.raises(LayerNotFoundError) as info:
        resolve_parameters(model, ["net.4.wieght"])
    msg = str(info.value)
    assert "No parameter matches 'net.4.wieght'" in msg
    assert re.search(r"Closest names: net\.4\.weight", msg)
    assert "named_parameters()" in msg and "8 named parameters" in msg
    assert isinstance(info.value, ValueError)
    with pytest.raises(LayerNotFoundError, match="'zzz'.* parameters include: net.0.weight"):
        resolve_parameters(model, ["zzz"])  # nothing close: the first names instead
    with pytest.raises(LayerNotFoundError, match="parameters= is empty"):
        resolve_parameters(model, [])


# ---------------------------------------------------------------------------------- pool


def _mask(lengths, t, left=False):
    m = torch.zeros(len(lengths), t, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            m[b, t - n :] = 1
        else:
            m[b, :n] = 1
    return m


def test_pool_2d_identity():
    x = torch.randn(4, 7)
    for how in ("mean", "last", "first"):
        assert torch.equal(pool(x, how), x)
    assert torch.equal(pool(x, "flatten"), x)


def test_pool_mean_no_mask():
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    expected = torch.stack([sum(x[b, t] for t in range(5)) / 5 for b in range(3)])
    torch.testing.assert_close(pool(x, "mean"), expected)


@pytest.mark.parametrize("left", [False, True])
def test_pool_mean_mask_equals_loop(left):
    torch.manual_seed(0)
    lengths = [5, 1, 3, 4]
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    mask = _mask(lengths, 5, left=left)
    expected = []
    for b in range(4):
        real = [x[b, t] for t in range(5) if mask[b, t] != 0]
        expected.append(sum(real) / len(real))
    out = pool(x, "mean", mask)
    torch.testing.assert_close(out, torch.stack(expected))
    # padding content does not matter
    x2 = x.clone()
    x2[mask == 0] = 1e6
    torch.testing.assert_close(pool(x2, "mean", mask), out)
    # a bool mask gives the same
    torch.testing.assert_close(pool(x, "mean", mask.bool()), out)


def _loop_pick(x, mask, pick):
    """x[b, pick(real positions of b)] for every b, by a Python loop: (B, d)."""
    out = []
    for b in range(x.shape[0]):
        out.append(x[b, pick(t for t in range(x.shape[1]) if mask[b, t] != 0)])
    return torch.stack(out)


def _loop_last(x, mask):
    return _loop_pick(x, mask, max)


def _loop_first(x, mask):
    return _loop_pick(x, mask, min)


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_pool_last_and_first_pick_real_tokens(left):
    torch.manual_seed(1)
    lengths = [6, 2, 1, 4, 5]
    x = torch.randn(5, 6, 3)
    mask = _mask(lengths, 6, left=left)
    assert torch.equal(pool(x, "last", mask), _loop_last(x, mask))
    assert torch.equal(pool(x, "first", mask), _loop_first(x, mask))
    # padding really is skipped: right padding and last != position T-1 for short rows
    if not left:
        assert not torch.equal(pool(x, "last", mask), x[:, -1])
    else:
        assert not torch.equal(pool(x, "first", mask), x[:, 0])


def test_pool_last_first_no_mask():
    x = torch.randn(2, 4, 3)
    assert torch.equal(pool(x, "last"), x[:, 3])
    assert torch.equal(pool(x, "first"), x[:, 0])


def test_pool_flatten():
    x = torch.randn(2, 3, 4, 5)
    out = pool(x, "flatten")
    assert out.shape == (2, 60)
    for b in range(2):
        assert out[b].tolist() == [float(v) for v in x[b].flatten()]


def test_pool_callable():
    x = torch.randn(3, 4, 2)
    mask = torch.ones(3, 4)
    seen = {}

    def max_pool(out, m):
        seen["mask"] = m
        return out.amax(dim=1)

    assert torch.equal(pool(x, max_pool, mask), x.amax(dim=1))
    assert seen["mask"] is mask
    assert check_pooling(max_pool) is max_pool


def test_pool_unknown_name():
    with pytest.raises(ValueError, match="pooling='max' is not supported") as info:
        check_pooling("max")
    for name in POOLINGS:
        assert name in str(info.value)
        assert check_pooling(name) == name
    with pytest.raises(ValueError, match="mean, last, first, flatten"):
        pool(torch.randn(2, 3, 4), "max")
    with pytest.raises(ValueError, match="pooling="):
        FeatureCapture(_seq(), "0", pooling="avg", num_samples=3)


def test_pool_mask_length_mismatch():
    with pytest.raises(ValueError, match="4 positions but the layer output has 5"):
        pool(torch.randn(2, 5, 3), "mean", torch.ones(2, 4))


# ---------------------------------------------------------------------------------- FeatureCapture


def test_capture_records_layer_outputs_at_indices():
    model = _seq()
    n = 10
    cap = FeatureCapture(model, ["0", "2"], num_samples=n)
    torch.manual_seed(2)
    x1, x2 = torch.randn(3, 5), torch.randn(2, 5)
    i1, i2 = torch.tensor([7, 2, 4]), torch.tensor([0, 9])
    with cap:
        cap.arm(i1)
        y1 = model(x1)
        cap.arm(i2)
        model(x2)
        cap.disarm()
    with torch.no_grad():  # oracle: run the layers by hand
        h1, h2 = model[0](x1), model[0](x2)
        o1, o2 = model[2](model[1](h1)), model[2](model[1](h2))
    torch.testing.assert_close(o1, y1.detach())
    assert cap.buffers["0"].shape == (n, 8) and cap.buffers["2"].shape == (n, 4)
    torch.testing.assert_close(cap.buffers["0"][i1], h1)
    torch.testing.assert_close(cap.buffers["0"][i2], h2)
    torch.testing.assert_close(cap.buffers["2"][i1], o1)
    torch.testing.assert_close(cap.buffers["2"][i2], o2)
    untouched = [i for i in range(n) if i not in {7, 2, 4, 0, 9}]
    assert torch.count_nonzero(cap.buffers["2"][untouched]) == 0
    assert cap.missing("0") == cap.missing("2") == n - 5

    idx, feats = cap.rows("2")
    assert idx.tolist() == [0, 2, 4, 7, 9]
    expected = {7: o1[0], 2: o1[1], 4: o1[2], 0: o2[0], 9: o2[1]}
    for k, i in enumerate(idx.tolist()):
        torch.testing.assert_close(feats[k], expected[i])


def test_capture_unarmed_records_nothing():
    model = _seq()
    cap = FeatureCapture(model, "2", num_samples=4)
    with cap:
        model(torch.randn(4, 5))  # never armed
        cap.arm(torch.arange(2))
        cap.disarm()
        model(torch.randn(2, 5))  # disarmed
    assert cap.buffers == {}
    assert cap.missing("2") == 4
    idx, feats = cap.rows("2")
    assert idx.numel() == 0 and feats.numel() == 0


def test_capture_missing_reset_and_overwrite():
    model = _seq()
    cap = FeatureCapture(model, "2", num_samples=6)
    x = torch.randn(3, 5)
    with cap:
        cap.arm(torch.tensor([1, 3, 5]))
        model(x)
        assert cap.missing("2") == 3
        cap.reset()
        assert cap.missing("2") == 6
        assert cap.rows("2")[0].numel() == 0
        x2 = torch.randn(1, 5)
        cap.arm(torch.tensor([3]))
        model(x2)
    idx, feats = cap.rows("2")
    assert idx.tolist() == [3] and cap.missing("2") == 5
    with torch.no_grad():
        torch.testing.assert_close(feats[0], model(x2)[0])


def test_capture_sequence_pooling_with_mask():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
    x = torch.randn(3, 5, 4)
    mask = _mask([5, 2, 3], 5, left=True)
    cap = FeatureCapture(model, "1", pooling="last", num_samples=3)
    with cap:
        cap.arm(torch.tensor([2, 0, 1]), mask)
        model(x)
    with torch.no_grad():
        out = model(x)
    expected = _loop_last(out, mask)
    torch.testing.assert_close(cap.buffers["1"][[2, 0, 1]], expected)


def test_context_manager_removes_hooks_on_error():
    model = _seq()
    cap = FeatureCapture(model, ["0", "2"], num_samples=4)
    with pytest.raises(RuntimeError, match="boom"):
        with cap:
            assert cap.attached
            assert len(model[0]._forward_hooks) == 1 and len(model[2]._forward_hooks) == 1
            cap.arm(torch.arange(2))
            raise RuntimeError("boom")
    assert not cap.attached
    _assert_no_hooks(model)
    assert cap._indices is None  # disarmed too
    model(torch.randn(2, 5))
    assert cap.buffers == {}


def test_attach_and_remove_idempotent():
    model = _seq()
    cap = FeatureCapture(model, "0", num_samples=4)
    cap.attach()
    cap.attach()
    assert len(model[0]._forward_hooks) == 1
    cap.remove()
    cap.remove()
    _assert_no_hooks(model)
    assert not cap.attached
    # a foreign hook on the same module is left alone
    h = model[0].register_forward_hook(lambda *a: None)
    cap.attach()
    cap.remove()
    assert len(model[0]._forward_hooks) == 1
    h.remove()


def test_layer_changing_batch_dim_raises():
    model = nn.Sequential(nn.Linear(4, 3), nn.Flatten(0, 1))
    cap = FeatureCapture(model, "1", num_samples=8)
    with cap:
        cap.arm(torch.arange(2))
        with pytest.raises(ValueError, match="Layer '1'.*batch of 2 samples"):
            model(torch.randn(2, 5, 4))  # (2, 5, 3) -> (10, 3)
    _assert_no_hooks(model)


def test_record_without_num_samples():
    cap = FeatureCapture(_seq(), "0")
    with pytest.raises(RuntimeError, match="allocate"):
        cap.record("0", torch.arange(2), torch.zeros(2, 3))
    cap.allocate(5)
    cap.record("0", torch.arange(2), torch.ones(2, 3))
    assert cap.buffers["0"].shape == (5, 3) and cap.missing("0") == 3
    cap.allocate(5)  # same size: kept
    assert cap.missing("0") == 3
    cap.allocate(6)  # another size: dropped
    assert cap.buffers == {} and cap.missing("0") == 6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_buffer_dtype_and_device(dtype):
    model = _seq()
    cap = FeatureCapture(model, "2", num_samples=5, dtype=dtype, device="cpu")
    x = torch.randn(2, 5)
    with cap:
        cap.arm(torch.tensor([4, 1]))
        model(x)
    buf = cap.buffers["2"]
    assert buf.dtype == dtype and buf.device == torch.device("cpu")
    assert cap.seen["2"].dtype == torch.bool and cap.seen["2"].device == torch.device("cpu")
    with torch.no_grad():
        expected = model(x).to(dtype)
    assert torch.equal(buf[torch.tensor([4, 1])], expected)
    _, feats = cap.rows("2")
    assert feats.dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_cpu_buffers():
    model = _seq().cuda()
    cap = FeatureCapture(model, "2", num_samples=5)
    x = torch.randn(2, 5, device="cuda")
    with cap:
        cap.arm(torch.tensor([4, 1], device="cuda"), torch.ones(2, 1, device="cuda"))
        model(x)
    assert cap.buffers["2"].device == torch.device("cpu")
    with torch.no_grad():
        torch.testing.assert_close(cap.buffers["2"][[4, 1]], model(x).cpu())


class _TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        h = self.lin(x)
        return h, {"aux": h.sum()}


class _Wrap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _TupleOut()

    def forward(self, x):
        return self.block(x)[0] * 2


def test_tuple_output_uses_first_element():
    torch.manual_seed(4)
    model = _Wrap()
    x = torch.randn(3, 3)
    cap = FeatureCapture(model, "block", num_samples=3)
    with cap:
        cap.arm(torch.tensor([2, 1, 0]))
        model(x)
    with torch.no_grad():
        expected = model.block.lin(x)
    torch.testing.assert_close(cap.buffers["block"][[2, 1, 0]], expected)


def test_non_tensor_output_raises():
    class Bad(nn.Module):
        def forward(self, x):
            return {"h": x}

    model = nn.Sequential(Bad())
    cap = FeatureCapture(model, "0", num_samples=2)
    with cap:
        cap.arm(torch.arange(2))
        with pytest.raises(TypeError, match="Layer '0' returned dict"):
            model(torch.randn(2, 3))


def test_no_autograd_graph_in_buffers():
    model = _seq()
    cap = FeatureCapture(model, "2", num_samples=3)
    with cap:
        cap.arm(torch.arange(3))
        y = model(torch.randn(3, 5))
    assert y.requires_grad
    assert not cap.buffers["2"].requires_grad


# ---------------------------------------------------------------------------------- globs
def _nested() -> nn.Module:
    """``model.bert.encoder.layer.{0,1}`` blocks with ``attention.query`` / ``output`` inside, and
    a ``model.classifier``: the shape of a wrapped Hugging Face model."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.Module()
            self.attention.query = nn.Linear(4, 4)
            self.output = nn.Linear(4, 4)

        def forward(self, x):
            return self.output(torch.tanh(self.attention.query(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = nn.Module()
            self.bert.encoder = nn.Module()
            self.bert.encoder.layer = nn.ModuleList([Block(), Block()])
            self.classifier = nn.Linear(4, 2)

        def forward(self, x):
            for block in self.bert.encoder.layer:
                x = block(x)
            return self.classifier(x)

    root = nn.Module()
    root.model = Net()
    root.forward = root.model.forward
    return root


BLOCKS = ["model.bert.encoder.layer.0", "model.bert.encoder.layer.1"]


def test_glob_star_stays_in_one_segment():
    model = _nested()
    # fnmatch would also take the 3 submodules of each block; a segment glob means the blocks
    assert list(resolve_layers(model, "model.bert.encoder.layer.*")) == BLOCKS
    assert list(resolve_layers(model, "model.bert.encoder.layer.?")) == BLOCKS
    assert list(resolve_layers(model, "model.bert.encoder.layer.[!1]")) == BLOCKS[:1]
    assert list(resolve_layers(model, "model.*")) == ["model.bert", "model.classifier"]


def test_glob_double_star_crosses_dots():
    model = _nested()
    queries = [f"{b}.attention.query" for b in BLOCKS]
    assert list(resolve_layers(model, "**.query")) == queries
    assert list(resolve_layers(model, "model.**.query")) == queries
    assert list(resolve_layers(model, "model.bert.**.layer.1")) == BLOCKS[1:]  # zero segments
    below = list(resolve_layers(model, "model.bert.encoder.layer.1.**"))  # below, not itself
    assert below == [f"{BLOCKS[1]}.{s}" for s in ("attention", "attention.query", "output")]
    assert list(resolve_layers(model, "model.bert.encoder.lay**.output")) == [
        f"{b}.output" for b in BLOCKS
    ]


def test_names_and_globs_match_dotted_endings():
    model = _nested()
    assert list(resolve_layers(model, "encoder.layer.1")) == BLOCKS[1:]
    assert list(resolve_layers(model, "encoder.layer.*")) == BLOCKS
    assert list(resolve_layers(model, "layer.*.output")) == [f"{b}.output" for b in BLOCKS]
    assert list(resolve_layers(model, "classifier")) == ["model.classifier"]
    # an ending is taken on dot boundaries only, and a full-name match wins over endings
    assert match_names("yer.1", BLOCKS) == []
    assert match_names("model.*", ["model.a", "x.model.b"]) == ["model.a"]
    with pytest.raises(
        LayerNotFoundError, match=r"'output' is the ending of 2 names .*'\*\*\.output'"
    ):
        resolve_layers(model, "output")
    with pytest.raises(LayerNotFoundError, match="'encoder.layer.7' matches no module"):
        resolve_layers(model, "encoder.layer.7")


def test_input_suffix():
    model = _nested()
    assert list(resolve_layers(model, ["classifier:input", "layer.*:input"], inputs=True)) == [
        "model.classifier:input",
        *(f"{b}:input" for b in BLOCKS),
    ]
    with pytest.raises(ValueError, match=r"layers='classifier:input': the ':input' suffix"):
        resolve_layers(model, "classifier:input")


def test_parameter_globs_cross_dots_and_match_endings():
    model = _nested()
    q = [f"{b}.attention.query.{p}" for b in BLOCKS for p in ("weight", "bias")]
    assert resolve_parameters(model, "*query*") == q  # fnmatch: * crosses dots
    assert resolve_parameters(model, "**.query.*") == q
    assert resolve_parameters(model, "classifier.weight") == ["model.classifier.weight"]
    assert resolve_parameters(model, "layer.1.*.query.bias") == [q[3]]
    with pytest.raises(LayerNotFoundError, match="'weight' is the ending of 5 names"):
        resolve_parameters(model, "weight")


def test_layer_pooling_per_layer():
    names = [*BLOCKS, "model.classifier:input", "model.classifier"]
    out = layer_pooling({"layer.1": "last", "classifier:input": "first"}, names)
    assert out == {
        BLOCKS[0]: "mean",  # no key: the default
        BLOCKS[1]: "last",
        "model.classifier:input": "first",
        "model.classifier": "mean",
    }
    # '*' matches every name's last segment: a catch-all after the specific keys (not ':input')
    out = layer_pooling({"layer.1": "last", "*": "flatten"}, names)
    assert list(out.values()) == ["flatten", "last", "mean", "flatten"]
    assert layer_pooling("first", names) == dict.fromkeys(names, "first")
    assert layer_pooling({"layer.*": "last", "layer.0": "first"}, BLOCKS) == dict.fromkeys(
        BLOCKS, "last"
    )  # the first matching key wins
    with pytest.raises(ValueError, match="pooling key 'layer.5' matches none of the layers"):
        layer_pooling({"layer.5": "last"}, names)
    with pytest.raises(ValueError, match=r"pooling\['layer.1'\]='max' is not supported"):
        check_pooling({"layer.1": "max"})


def test_capture_input_and_per_layer_pooling():
    model = _nested()
    x = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    pooling = {"layer.0": "last", "classifier:input": "first"}
    cap = FeatureCapture(model, ["layer.0", "classifier:input"], pooling, num_samples=3)
    assert cap.names == [BLOCKS[0], "model.classifier:input"]
    with cap:
        cap.arm(torch.arange(3), mask)
        model(x)
    with torch.no_grad():
        h0 = model.model.bert.encoder.layer[0](x)
        h1 = model.model.bert.encoder.layer[1](h0)
    torch.testing.assert_close(cap.buffers[BLOCKS[0]], h0[[0, 1, 2], [2, 4, 4]])
    torch.testing.assert_close(cap.buffers["model.classifier:input"], h1[[0, 1, 2], [0, 0, 2]])
    assert not model.model.classifier._forward_pre_hooks  # removed on exit


def test_input_hooks_run_in_stage_order_and_see_kwargs():
    lin = nn.Linear(3, 3)
    calls = []

    def double(module, x):
        calls.append("modify")
        return x * 2

    def observe(module, x):
        calls.append(("observe", x.clone()))

    h1 = add_input_hook(lin, observe, "observe")  # registered first, runs last
    h2 = add_input_hook(lin, double, "modify")
    x = torch.ones(2, 3)
    out = lin(input=x)  # a keyword argument
    assert calls[0] == "modify" and torch.equal(calls[1][1], 2 * x)
    torch.testing.assert_close(
        out, lin.weight @ (2 * x).T + lin.bias[:, None], check_stride=False
    ) if False else None
    with torch.no_grad():
        torch.testing.assert_close(out, nn.functional.linear(2 * x, lin.weight, lin.bias))
    h1.remove()
    h2.remove()
    h2.remove()  # idempotent
    assert not lin._forward_pre_hooks


def test_select_and_replace_output():
    import collections

    h, a = torch.randn(2, 3, 4), torch.randn(2, 4)
    assert select_output(h, 5) is h  # tensors are used as they are
    assert select_output((h, a)) is h and select_output((None, a)) is a
    assert select_output((h, a), 1) is a and select_output([h, a], -1) is a
    Pair = collections.namedtuple("Pair", ["hidden", "aux"])
    assert select_output(Pair(h, a), "aux") is a
    assert select_output({"h": h, "a": a}, "a") is a
    with pytest.raises(TypeError, match=r"returned dict with keys \['h'\].*output_key="):
        select_output({"h": h}, None, "blk")
    with pytest.raises(TypeError, match=r"no tensor at output_key=2"):
        select_output((h, a), 2)
    new = torch.zeros_like(a)
    out = replace_output(Pair(h, a), new, "aux")
    assert type(out) is Pair and out.hidden is h and out.aux is new
    assert replace_output([h, a], new, 1)[1] is new
    d = {"h": h, "a": a}
    assert replace_output(d, new, "a") == {"h": h, "a": new} and d["a"] is a  # a copy


class _Counted(nn.Module):
    """Wraps a module and counts its calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_stop_early_skips_everything_after_the_last_captured_layer():
    """arm(stop=True): the forward ends once every layer has recorded; the features are those of
    the full pass, the layers after the deepest captured one never run."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.ReLU(), _Counted(nn.Linear(8, 6)), _Counted(nn.Linear(6, 3))
    )
    x, idx = torch.randn(4, 5), torch.tensor([3, 0, 2, 1])
    full = FeatureCapture(model, ["0", "2"], num_samples=4)
    with full:
        full.arm(idx)
        out, stopped = full.forward(model, x)
    assert not stopped and out.shape == (4, 3) and model[3].calls == 1
    cap = FeatureCapture(model, ["2", "0"], num_samples=4)  # order of names does not matter
    with cap:
        cap.arm(idx, stop=True)
        out, stopped = cap.forward(model, x)
        assert out is None and stopped
        assert model[2].calls == 2 and model[3].calls == 1  # the last layer did not run again
        cap.disarm()
        out, stopped = cap.forward(model, x)  # disarmed: no stop
        assert not stopped and model[3].calls == 2
    for name in ("0", "2"):
        torch.testing.assert_close(cap.buffers[name], full.buffers[name])
    # an input layer stops before its layer runs
    cap = FeatureCapture(model, ["3:input"], num_samples=4)
    with cap:
        cap.arm(idx, stop=True)
        assert cap.forward(model, x) == (None, True)
    assert model[3].calls == 2
    torch.testing.assert_close(cap.buffers["3:input"], full.buffers["2"])
    # a layer that never fires: the pass runs to the end
    cap = FeatureCapture(model, ["0", "3"], num_samples=4)
    with cap:
        cap.arm(idx, stop=True)
        out, stopped = cap.forward(model[:3], x)
    assert not stopped and out.shape == (4, 6)


def test_buffers_made_under_inference_mode_are_normal_tensors():
    """The first record of an inference-mode pass allocates the buffers: they must stay normal
    tensors, so reset() (in place, outside inference mode) and autograd later work."""
    model = _seq()
    cap = FeatureCapture(model, ["0"], num_samples=5)
    with cap, torch.inference_mode():
        cap.arm(torch.tensor([0, 1]))
        model(torch.randn(2, 5))
    assert not cap.buffers["0"].is_inference() and not cap.seen["0"].is_inference()
    cap.reset()
    idx, feats = cap.rows("0")
    assert idx.numel() == 0
    w = torch.ones(8, requires_grad=True)
    (cap.buffers["0"] @ w).sum().backward()  # usable in autograd
    assert w.grad is not None
