"""The four callbacks on one model: a model, the callbacks and their results, shared by the
single-process and DDP composition tests.

Every callback is configured to exercise the known interaction points: ConceptErasure erases
``fc1`` (which TracIn and InfluenceAnalysis differentiate), TracIn runs online with query passes
inside the training step (of another batch size than training), MemorizationMonitor records the
training forward passes of ``fc2``.
"""

from __future__ import annotations

import itertools
import os
from typing import Dict, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_memo import (
    ConceptErasure,
    IndexedDataset,
    InfluenceAnalysis,
    MemorizationMonitor,
    TracIn,
)
from tests.callbacks.helpers import make_data

NAMES = ("monitor", "tracin", "influence", "erasure")
SUBSETS = [s for r in range(1, 5) for s in itertools.combinations(NAMES, r)]


class ComposeMLP(L.LightningModule):
    """8 -> 16 -> 16 -> 3 MLP; ``eraser`` (optional) is applied to fc1's output inside forward,
    the oracle for a ConceptErasure hook on ``fc1``."""

    def __init__(self, eraser: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.eraser = eraser

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.eraser is not None:
            h = self.eraser(h)
        return self.head(torch.tanh(self.fc2(torch.tanh(h))))

    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def concept(batch) -> torch.Tensor:
    """The erased concept: the sign of the first input feature (module level: picklable)."""
    return (batch[0][:, 0] > 0).long()


def loaders(n: int = 60):
    x, y = make_data(n)
    train = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=10, shuffle=True)
    xq, yq = make_data(12, seed=1)
    queries = DataLoader(IndexedDataset(TensorDataset(xq, yq)), batch_size=5)
    return train, queries


def make_callbacks(names, queries, out) -> Dict[str, L.Callback]:
    """The callbacks named in ``names``, each writing under ``out/<name>``."""
    make = {
        "monitor": lambda: MemorizationMonitor(
            "fc2", source="train", n_estimators=200, output_dir=os.path.join(out, "monitor")
        ),
        "tracin": lambda: TracIn(
            layers=["fc1", "head"],
            projection_dim=None,
            mode="online",
            queries=queries,
            output_dir=os.path.join(out, "tracin"),
            progress=False,
        ),
        "influence": lambda: InfluenceAnalysis(
            "ekfac",
            layers=["fc1", "head"],
            queries=queries,
            fisher="empirical",
            damping=1e-3,
            cache=False,
            output_dir=os.path.join(out, "influence"),
            progress=False,
        ),
        "erasure": lambda: ConceptErasure(
            "fc1", concept=concept, when="fit_start", output_dir=os.path.join(out, "erasure")
        ),
    }
    return {n: make[n]() for n in names}


def fit(names, out, eraser: Optional[nn.Module] = None, strategy_kw: Optional[dict] = None):
    """Fit ComposeMLP for 2 epochs with the named callbacks; returns (callbacks, model)."""
    train, queries = loaders()
    cbs = make_callbacks(names, queries, str(out))
    L.seed_everything(0, verbose=False)
    model = ComposeMLP(eraser)
    tr = L.Trainer(
        max_epochs=2,
        callbacks=list(cbs.values()),
        default_root_dir=str(out),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        **(strategy_kw or {"devices": 1}),
    )
    tr.fit(model, train, val_dataloaders=None)
    return cbs, model


def read_results(name: str, out) -> Dict[str, np.ndarray]:
    """What one callback wrote (rank 0's files), as arrays: the same under DDP and alone."""
    from tests.callbacks.helpers import read_csv

    d = os.path.join(out, name)
    if name == "monitor":
        return {f"epoch{e}": _csv(read_csv, d, f"epoch_{e}.csv") for e in range(2)}
    if name == "tracin":
        return {
            "self": _csv(read_csv, d, "self_influence.csv"),
            "topk": _csv(read_csv, d, "top_k.csv"),
        }
    if name == "influence":
        res = torch.load(os.path.join(d, "scores.pt"), weights_only=False)["results"]
        return {k: v.numpy() for k, v in res.items()}
    erasers = torch.load(os.path.join(d, "erasers.pt"), weights_only=False)
    return {
        f"{layer}/{k}": v.numpy()
        for layer, st in erasers.items()
        for k, v in st.items()
        if v is not None
    }


def _csv(read_csv, folder, file) -> np.ndarray:
    cols = read_csv(os.path.join(folder, file))
    return np.stack([cols[k] for k in sorted(cols)], axis=1)


def assert_same(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        np.testing.assert_allclose(
            a[k], b[k], rtol=1e-5, atol=1e-7, equal_nan=True, err_msg=f"{what}: {k}"
        )
