"""Hugging Face layers in MemorizationMonitor and ConceptErasure, in real ``Trainer.fit`` runs on
tiny random-init models: names and segment globs, ``ModelOutput`` outputs and ``output_key``,
the attention mask in pooling (left / right padding, hand-picked positions), ``":input"`` layers
and per-layer pooling."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("transformers")
import torch

from lightning_memo import ConceptErasure, MemorizationMonitor
from lightning_memo.capture import resolve_layers
from tests.hf.helpers import (
    LENGTHS,
    GPT2Classifier,
    HFClassifier,
    T,
    batch_of,
    fit,
    layer_outputs,
    tiny_bert,
    tiny_gpt2,
    token_items,
)

BLOCKS = ["model.bert.encoder.layer.0", "model.bert.encoder.layer.1"]


def _monitor(tmp_path, layers, name="memo", **kw):
    kw.setdefault("n_estimators", 50)
    kw.setdefault("progress", False)
    return MemorizationMonitor(layers, output_dir=str(tmp_path / name), **kw)


def _features(mon, name):
    """The (N, d) features the monitor recorded at layer ``name`` in the last evaluation."""
    assert bool(mon.capture.seen[name].all())
    return mon.capture.buffers[name]


def test_hf_names_and_segment_globs(tmp_path):
    model = HFClassifier(tiny_bert())
    # a glob's * stays inside one dotted segment: the blocks, not their 30 submodules
    assert list(resolve_layers(model, "encoder.layer.*")) == BLOCKS
    assert list(resolve_layers(model, "bert.encoder.layer.1")) == BLOCKS[1:]
    assert list(resolve_layers(model, "**.attention.self.query")) == [
        f"{b}.attention.self.query" for b in BLOCKS
    ]
    mon = _monitor(tmp_path, "encoder.layer.*", source="eval")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, model, [mon])
    assert not [w for w in caught if "never seen" in str(w.message)]
    assert mon.capture.names == BLOCKS
    assert set(mon.scores[0]) == set(BLOCKS)
    assert all(mon.capture.missing(n) == 0 for n in BLOCKS)


def test_model_output_hidden_states_and_output_key(tmp_path):
    """``bert`` returns a ModelOutput: its last_hidden_state by default, ``output_key`` picks
    another part (by key or by position)."""
    model = HFClassifier(tiny_bert())
    hidden = _monitor(tmp_path, "bert", "a", source="eval", pooling="first")
    pooled = _monitor(tmp_path, "bert", "b", source="eval", output_key="pooler_output")
    by_pos = _monitor(tmp_path, "bert", "c", source="eval", output_key=1, pooling="last")
    fit(tmp_path, model, [hidden, pooled, by_pos])
    items = token_items()
    out = layer_outputs(model.model, ["bert"], **batch_of(items))["bert"]
    torch.testing.assert_close(_features(hidden, "model.bert"), out.last_hidden_state[:, 0])
    torch.testing.assert_close(_features(pooled, "model.bert"), out.pooler_output)
    torch.testing.assert_close(_features(by_pos, "model.bert"), out.pooler_output)


@pytest.mark.parametrize("source", ["train", "eval"])
def test_gpt2_left_padding_pooling_hand_picked(tmp_path, source):
    """Left-padded GPT2 batches: ``last`` = position T-1, ``first`` = the first real token
    (T - length), ``mean`` over the real tokens only, in the training pass and the eval pass
    (which calls ``module(**batch)`` with the attention mask)."""
    items = token_items(left=True)
    model = GPT2Classifier(tiny_gpt2(), lr=0.0)  # lr 0 and no dropout: both passes agree
    pooling = {"h.0": "first", "h.1": "last", "ln_f": "mean"}
    mon = _monitor(tmp_path, ["h.0", "h.1", "ln_f"], source=source, pooling=pooling)
    fit(tmp_path, model, [mon], items=items)
    out = layer_outputs(model.model, ["h.0", "h.1", "ln_f"], **batch_of(items))
    # hand-picked positions of samples 0, 1, 2, 5 (lengths 8, 5, 3, 2 of T = 8)
    assert LENGTHS[:3] == [8, 5, 3] and LENGTHS[5] == 2 and T == 8
    first, last = _features(mon, "model.h.0"), _features(mon, "model.h.1")
    for i, pos in [(0, 0), (1, 3), (2, 5), (5, 6)]:
        torch.testing.assert_close(first[i], out["h.0"][i, pos])
    for i in (0, 1, 2, 5):
        torch.testing.assert_close(last[i], out["h.1"][i, 7])
    mean = _features(mon, "model.ln_f")
    torch.testing.assert_close(mean[2], out["ln_f"][2, 5:].mean(0))
    torch.testing.assert_close(mean[5], out["ln_f"][5, 6:].mean(0))
    # the mask reached the model too: without it the padded positions change the outputs
    unmasked = layer_outputs(model.model, ["ln_f"], input_ids=batch_of(items)["input_ids"])
    assert not torch.allclose(unmasked["ln_f"][2, 5:].mean(0), mean[2], atol=1e-4)


def test_right_padding_last_and_input_layer_per_layer_pooling(tmp_path):
    """Right padding: ``last`` = the last real token; ``"classifier:input"`` is the pooled
    output the head receives; pooling per layer from a dict (other layers: mean)."""
    items = token_items()
    model = HFClassifier(tiny_bert())
    layers = ["encoder.layer.0", "encoder.layer.1", "classifier:input"]
    pooling = {"encoder.layer.1": "last", "classifier:input": "mean"}
    mon = _monitor(tmp_path, layers, source="eval", pooling=pooling)
    fit(tmp_path, model, [mon], items=items)
    assert mon.capture.names == BLOCKS + ["model.classifier:input"]
    assert mon.capture.poolings == dict(zip(mon.capture.names, ["mean", "last", "mean"]))
    names = ["bert.encoder.layer.0", "bert.encoder.layer.1", "bert", "classifier"]
    out = layer_outputs(model.model, names, **batch_of(items))
    last = _features(mon, BLOCKS[1])
    for i, pos in [(0, 7), (1, 4), (2, 2), (5, 1)]:  # lengths 8, 5, 3, 2
        torch.testing.assert_close(last[i], out["bert.encoder.layer.1"][i, pos])
    torch.testing.assert_close(last[5], out["bert.encoder.layer.1"][5, 1])
    mean = _features(mon, BLOCKS[0])
    torch.testing.assert_close(mean[2], out["bert.encoder.layer.0"][2, :3].mean(0))
    head_in = _features(mon, "model.classifier:input")
    torch.testing.assert_close(head_in, out["classifier:input"])
    torch.testing.assert_close(head_in, out["bert"].pooler_output)  # dropout is off in eval
    csv_head = (tmp_path / "memo" / "epoch_0.csv").read_text().splitlines()[0]
    assert "model.classifier:input/psmi_mean" in csv_head


def test_unknown_pooling_key_and_input_suffix_elsewhere(tmp_path):
    model = HFClassifier(tiny_bert())
    mon = _monitor(tmp_path, "encoder.layer.*", pooling={"encoder.layer.7": "first"})
    with pytest.raises(ValueError, match=r"pooling key 'encoder.layer.7' matches none"):
        fit(tmp_path, model, [mon])
    with pytest.raises(ValueError, match=r"':input' suffix .* name the layer itself"):
        resolve_layers(model, "classifier:input")


def test_erasure_model_output_and_input_layer(tmp_path):
    """ConceptErasure on a ModelOutput layer (``bert.encoder``: its last_hidden_state is erased
    and put back in a ModelOutput) and on a layer's input (``classifier:input``); the fitting
    rows follow the attention mask (``"all"``: every real token)."""
    items = token_items()
    model = HFClassifier(tiny_bert())
    enc = ConceptErasure("bert.encoder", when="fit_start", progress=False,
                         output_dir=str(tmp_path / "e1"))  # fmt: skip
    head = ConceptErasure("classifier:input", when="fit_start", progress=False,
                          output_dir=str(tmp_path / "e2"))  # fmt: skip
    fit(tmp_path, model, [enc, head], items=items)
    rec = enc.history[0]["layers"]["model.bert.encoder"]
    assert rec["n_rows"] == sum(LENGTHS)  # real tokens only
    assert head.history[0]["layers"]["model.classifier:input"]["n_rows"] == len(items)
    assert head.metrics["erasure/model.classifier:input/probe_acc_after"] <= (
        head.metrics["erasure/model.classifier:input/majority_rate"] + 1e-6
    )
    raw = layer_outputs(model.model, ["bert.encoder", "classifier"], **batch_of(items))
    enc.install(model)
    head.install(model)
    try:
        erased = layer_outputs(model.model, ["bert.encoder", "classifier"], **batch_of(items))
    finally:
        enc.remove()
        head.remove()
    out = erased["bert.encoder"]
    assert type(out).__name__ == type(raw["bert.encoder"]).__name__  # still a ModelOutput
    eraser = enc.erasers["model.bert.encoder"]
    torch.testing.assert_close(out.last_hidden_state, eraser(raw["bert.encoder"].last_hidden_state))
    # the head received the erased pooled output (of the erased encoder)
    pooled = model.model.bert.pooler(out.last_hidden_state)
    torch.testing.assert_close(
        erased["classifier:input"], head.erasers["model.classifier:input"](pooled)
    )
