"""LoRA fine-tunes (PEFT adapters on the attention query / value projections of a tiny BERT):
TracIn and InfluenceAnalysis differentiate only the adapters (``parameters="*lora_*"``) on the
hook fast path, against a brute-force autograd oracle; MemorizationMonitor and ConceptErasure
find the layers under PEFT's ``base_model.model.``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from lightning_memo import ConceptErasure, InfluenceAnalysis, MemorizationMonitor, TracIn  # noqa: E402
from lightning_memo.capture import resolve_parameters  # noqa: E402
from lightning_memo.influence.features import GradientFeaturizer  # noqa: E402
from lightning_memo.influence.grads import select_parameters  # noqa: E402
from tests.hf.helpers import HFClassifier, fit, loader, lora_bert, token_items  # noqa: E402

LR = 0.1
PREFIX = "model.base_model.model.bert.encoder.layer"
LORA = [
    f"{PREFIX}.{i}.attention.self.{proj}.lora_{ab}.default.weight"
    for i in (0, 1)
    for proj in ("query", "value")
    for ab in "AB"
]


def _lora_modules(model):
    params = select_parameters(model, resolve_parameters(model, "*lora_*"))
    return {n.rsplit(".", 1)[0]: model.get_submodule(n.rsplit(".", 1)[0]) for n in params}, params


def test_lora_parameters_resolve_to_the_adapters_on_the_hook_path():
    model = HFClassifier(lora_bert())
    assert resolve_parameters(model, "*lora_*") == LORA  # fnmatch: * crosses dots
    assert [n for n, p in model.named_parameters() if p.requires_grad] == LORA
    modules, params = _lora_modules(model)
    assert all(type(m) is torch.nn.Linear and m.bias is None for m in modules.values())
    feats = GradientFeaturizer(modules, None, params=params)
    assert feats.linear  # LoRA A / B are whole bias-free nn.Linear layers: the hook fast path


def test_lora_tracin_self_influence_equals_brute_force(tmp_path):
    """TracIn (one checkpoint at the end of the epoch) = lr x ||d loss_i / d LoRA||^2 at the final
    weights, the gradient by plain autograd one sample at a time."""
    model = HFClassifier(lora_bert(), lr=LR)
    items = token_items()
    tracin = TracIn(parameters="*lora_*", projection_dim=None, output_dir=str(tmp_path / "t"),
                    progress=False)  # fmt: skip
    fit(tmp_path, model, [tracin], items=items)
    assert tracin.features.linear and list(tracin.features.params) == LORA
    assert tracin.features.layout is None  # token inputs: exact flattened gradients
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    model.eval()
    expected = []
    for batch in loader(items, batch_size=len(items)):
        losses = model.per_sample_loss(batch)
        for loss in losses:
            grads = torch.autograd.grad(loss, params, retain_graph=True)
            expected.append(LR * sum(float(g.double().square().sum()) for g in grads))
    expected = torch.tensor(expected, dtype=torch.float64)
    assert expected.min() > 0 and expected.max() > 1.5 * expected.min()  # not degenerate
    torch.testing.assert_close(tracin.self_influence, expected, rtol=1e-4, atol=0)
    assert (tmp_path / "t" / "samples.json").exists()


def test_lora_influence_analysis_adapters_only(tmp_path):
    model = HFClassifier(lora_bert(), lr=LR)
    items = token_items()
    queries = loader(token_items(seed=1, n=4))
    infl = InfluenceAnalysis("ekfac", parameters="*lora_*", queries=queries, cache=False,
                             output_dir=str(tmp_path / "i"), progress=False)  # fmt: skip
    fit(tmp_path, model, [infl], items=items)
    assert infl.config["parameters"] == LORA
    assert infl.config["num_parameters"] == 4 * 2 * 32 * 4
    assert infl.self_influence.shape == (len(items),)
    assert torch.isfinite(infl.self_influence).all() and (infl.self_influence > 0).all()
    assert infl.scores.shape == (4, len(items)) and torch.isfinite(infl.scores).all()


def test_lora_monitor_and_erasure_find_adapted_layers(tmp_path):
    model = HFClassifier(lora_bert())
    mon = MemorizationMonitor("encoder.layer.*", n_estimators=50, progress=False,
                              output_dir=str(tmp_path / "m"))  # fmt: skip
    erase = ConceptErasure("encoder.layer.0", when="fit_start", progress=False,
                           output_dir=str(tmp_path / "e"))  # fmt: skip
    fit(tmp_path, model, [mon, erase])
    assert mon.capture.names == [f"{PREFIX}.0", f"{PREFIX}.1"]
    assert set(mon.scores[0]) == set(mon.capture.names)
    assert list(erase.erasers) == [f"{PREFIX}.0"]
