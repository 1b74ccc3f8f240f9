"""Any subset of the four callbacks on one model gives each callback the results it gives alone.

"Alone" with ConceptErasure in the subset means: the callback alone on the model whose forward
applies the same eraser by hand (``ComposeMLP(eraser)``), the oracle for "gradients and features
of the model as it runs, erasure included". All 15 subsets, one process, shuffled loader.
"""

from __future__ import annotations

import pytest
import torch

from tests.callbacks.compose_helpers import NAMES, SUBSETS, assert_same, fit, read_results


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """Each callback alone, and (for the three others) alone on the hand-erased model."""
    root = tmp_path_factory.mktemp("alone")
    cbs, model = fit(["erasure"], root / "erasure")
    eraser = cbs["erasure"].erasers["fc1"]
    out = {("erasure", False): (read_results("erasure", root / "erasure"), model)}
    for name in NAMES[:3]:
        for erased in (False, True):
            folder = root / f"{name}-{erased}"
            _, model = fit([name], folder, eraser if erased else None)
            out[(name, erased)] = (read_results(name, folder), model)
    return out


@pytest.mark.parametrize("subset", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_each_callback_gives_its_alone_result(tmp_path, alone, subset):
    _, model = fit(subset, tmp_path)
    erased = "erasure" in subset
    for name in subset:
        expect, ref_model = alone[(name, erased and name != "erasure")]
        assert_same(read_results(name, tmp_path), expect, f"{name} in {subset}")
    # training itself is untouched by the callbacks' extra passes
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
