"""ConceptErasure under DDP (2 CPU processes, gloo): merged statistics equal one process.

One spawn carries both checks (starting the processes is most of the cost): a ``fit_start``
eraser, sequential over two layers and fitted on each rank's ``DistributedSampler`` share of the
training set, and an ``every_epoch`` eraser refitted on the training activations of each epoch.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lightning_memo import ConceptErasure, LeaceEraser, LeaceFitter
from tests.callbacks.helpers import TinyMLP, fit_one_or_two_ranks, make_data

pytestmark = pytest.mark.slow

START, EPOCH = ["net.0", "net.1"], ["net.3"]


# no one-thread fixture here: a parent at 1 thread made ddp_spawn children abort (SIGABRT)


def group(batch):
    """A second concept, read from the inputs (module level: picklable for ddp_spawn)."""
    x = batch[0]
    return x[:, 0] + 0.5 * x[:, 1] > 0


def _load(folder):
    saved = torch.load(folder / "erasers.pt")
    history = json.loads((folder / "history.json").read_text())
    return {k: LeaceEraser.from_state_dict(v) for k, v in saved.items()}, history


def _run(folder, devices, batch_size, epochs=3):
    L.seed_everything(0, verbose=False)
    common = dict(constrain_cov_trace=False, progress=False)
    start = ConceptErasure(START, concept=group, output_dir=str(folder / "start"), **common)
    every = ConceptErasure(EPOCH, when="every_epoch", output_dir=str(folder / "every"), **common)
    # one process with batches of 40 == two processes with 20 each (rank-strided: the union of
    # the ranks' batches is the single-process batch; gradients are averaged), so the training,
    # its activations and the per-epoch erasers are the same
    model = TinyMLP().double()
    init = fit_one_or_two_ranks(folder, [start, every], model, devices, batch_size, epochs=epochs)
    return _load(folder / "start"), _load(folder / "every"), init


def _assert_same(a: LeaceEraser, b: LeaceEraser, atol=1e-6):
    torch.testing.assert_close(a.P.double(), b.P.double(), rtol=0, atol=atol)
    torch.testing.assert_close(a.bias.double(), b.bias.double(), rtol=0, atol=atol)


def test_ddp_statistics_equal_single_process(tmp_path):
    (s_start, s_hist), (s_every, s_ehist), init = _run(tmp_path / "single", 1, 40)
    (d_start, d_hist), (d_every, d_ehist), _ = _run(tmp_path / "ddp", 2, 20)

    # fit_start: each rank fitted on its DistributedSampler share (60 of 120); rank 0 saved the
    # erasers of the merged statistics, i.e. of the whole set
    assert sorted(d_start) == START and len(d_hist) == 2  # sequential: one record per layer
    for layer in START:
        _assert_same(d_start[layer], s_start[layer])
    for r1, r2 in zip(s_hist, d_hist):
        for layer, info in r2["layers"].items():
            assert info["n_rows"] == r1["layers"][layer]["n_rows"] == 120
    # ... and that is the LEACE of the initial model's activations (oracle, by hand)
    model = TinyMLP().double()
    model.load_state_dict(init)
    x, y = make_data(dtype=torch.float64)
    g = group((x,))
    with torch.no_grad():
        a0 = model.net[0](x)
        ref0 = LeaceFitter.fit(a0, g, constrain_cov_trace=False).eraser
        a1 = model.net[1](d_start["net.0"](a0))
        ref1 = LeaceFitter.fit(a1, g, constrain_cov_trace=False).eraser
    _assert_same(d_start["net.0"], ref0, 1e-5)
    _assert_same(d_start["net.1"], ref1, 1e-5)

    # every_epoch: refitted on each epoch's training activations, gathered from both ranks
    assert [r["epoch"] for r in d_ehist] == [r["epoch"] for r in s_ehist] == [0, 1, 2]
    for r in d_ehist:
        assert r["layers"]["net.3"]["n_rows"] == 120
    _assert_same(d_every["net.3"], s_every["net.3"])

    # the probes of rank 0's history score the whole fitting set (rows gathered from both ranks)
    for one, two in ((s_hist, d_hist), (s_ehist, d_ehist)):
        for r1, r2 in zip(one, two):
            for layer, info in r2["layers"].items():
                ref = r1["layers"][layer]
                assert info["probe_acc_after"] == info["majority_rate"] == ref["majority_rate"]
                assert info["probe_acc_before"] == pytest.approx(ref["probe_acc_before"], abs=0.02)
                assert info["edit_norm"] == pytest.approx(ref["edit_norm"], rel=1e-5)
