"""The callbacks in pairs under DDP (2 CPU processes, gloo, Lightning's own shuffled
DistributedSampler): each gives the files it writes alone under the same DDP run."""

from __future__ import annotations

import itertools

import pytest

from lightning_memo import LeaceEraser
from tests.callbacks.compose_helpers import NAMES, assert_same, fit, read_results
from tests.callbacks.helpers import fit_retrying_abort, read_csv

pytestmark = pytest.mark.slow

DDP = {"strategy": "ddp_spawn", "devices": 2}
PAIRS = list(itertools.combinations(NAMES, 2))


def _fit(names, out, eraser=None):
    fit_retrying_abort(lambda: fit(names, out, eraser, DDP))


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-alone")
    _fit(["erasure"], root / "erasure")
    import torch

    state = torch.load(root / "erasure" / "erasure" / "erasers.pt", weights_only=False)["fc1"]
    eraser = LeaceEraser.from_state_dict(state)
    out = {("erasure", False): read_results("erasure", root / "erasure")}
    for name in NAMES[:3]:
        for erased in (False, True):
            folder = root / f"{name}-{erased}"
            _fit([name], folder, eraser if erased else None)
            out[(name, erased)] = read_results(name, folder)
    return out


@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_pairs_under_ddp_give_alone_results(tmp_path, alone, pair):
    _fit(pair, tmp_path)
    for name in pair:
        expect = alone[(name, "erasure" in pair and name != "erasure")]
        assert_same(read_results(name, tmp_path), expect, f"{name} in {pair} (DDP)")


def test_monitor_loss_and_margin_known_every_epoch_with_the_default_sampler(alone, tmp_path):
    """Lightning's shuffled DistributedSampler: every sample's loss / margin is known in every
    evaluated epoch (a rank that saw a sample only in an earlier epoch must not blank it)."""
    _fit(["monitor"], tmp_path)
    for epoch in range(2):
        rows = read_csv(tmp_path / "monitor" / f"epoch_{epoch}.csv")
        assert len(rows["index"]) == 60
        assert not any(map(lambda v: v != v, rows["loss"])), f"epoch {epoch}: empty loss cells"
        assert not any(map(lambda v: v != v, rows["margin"]))
