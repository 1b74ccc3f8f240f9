"""Tiny models and loaders shared by the callback tests."""

from __future__ import annotations

import csv

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_memo import IndexedDataset


class TinyMLP(L.LightningModule):
    """MLP 8 -> 16 -> 16 -> 3 on a tuple batch (x, y, index); deterministic, no dropout."""

    def __init__(self, in_dim: int = 8, hidden: int = 16, n_classes: int = 3, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def make_data(
    n: int = 120, in_dim: int = 8, n_classes: int = 3, seed: int = 0, dtype=torch.float32
):
    """Gaussian clusters, seeded. x: (n, in_dim), y: (n,)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % n_classes
    centers = torch.randn(n_classes, in_dim, generator=g) * 1.5
    x = centers[y] + torch.randn(n, in_dim, generator=g)
    return x.to(dtype), y


def make_loader(
    n: int = 120, batch_size: int = 20, shuffle: bool = False, dtype=torch.float32, **kw
):
    x, y = make_data(n, dtype=dtype, **kw)
    return DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=batch_size, shuffle=shuffle)


def trainer(tmp_path, callbacks, max_epochs: int = 3, **kw) -> L.Trainer:
    opts = dict(
        max_epochs=max_epochs,
        callbacks=callbacks,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    opts.update(kw)
    return L.Trainer(**opts)


def read_csv(path) -> dict:
    """CSV -> {column: np.ndarray} (empty cells as NaN)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    out = {}
    for key in rows[0]:
        out[key] = np.array([float(r[key]) if r[key] != "" else np.nan for r in rows])
    return out


def fit_retrying_abort(fit, attempts: int = 3):
    """Run ``fit()``; retry when a ddp_spawn child died of a signal (seen: SIGABRT).

    Seen on this 2-core CI machine: a gloo child now and then aborts ("terminate called without
    an active exception") after its work is done, more often when the parent changed the torch
    thread count. The retried run starts from scratch and overwrites the output files, so the
    assertions still check one complete run.
    """
    from torch.multiprocessing.spawn import ProcessExitedException

    for attempt in range(attempts):
        try:
            return fit()
        except ProcessExitedException as err:
            if "terminated with signal" not in str(err) or attempt == attempts - 1:
                raise


class RankStrided(Sampler):
    """Rank r of w takes samples r, r + w, ... in order (read at iteration time, after spawn)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def _rank_world(self):
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        return self.n // self._rank_world()[1]
