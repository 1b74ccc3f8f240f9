"""Tiny Lightning models, loaders, a ``Trainer`` factory and the DDP scaffolding shared by the
callback tests (torch-only helpers: ``tests/helpers.py``; fixtures: ``tests/conftest.py``)."""

from __future__ import annotations

import csv
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_memo import IndexedDataset
from tests.helpers import assert_close_rel, ce_loss


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


class PSMLP(TinyMLP):
    """TinyMLP with the ``per_sample_loss`` hook TracIn and InfluenceAnalysis call (module level:
    picklable for ddp_spawn)."""

    def per_sample_loss(self, batch):
        return ce_loss(self, batch)


class SchedMLP(PSMLP):
    """PSMLP (SGD + momentum) with the learning rate halved every epoch, so every checkpoint /
    step carries its own learning rate."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}


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


def query_loader(
    n: int = 10, seed: int = 1, labels: bool = True, dtype=torch.float32, batch_size: int = 4
) -> DataLoader:
    """Labelled query samples (no index), in order: ``make_data(n, seed=seed)``."""
    xq, yq = make_data(n, seed=seed, dtype=dtype)
    return DataLoader(TensorDataset(xq, yq) if labels else TensorDataset(xq), batch_size=batch_size)


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


def seeded_fit(
    tmp_path,
    callbacks: Union[L.Callback, Sequence[L.Callback]],
    *,
    epochs: int = 3,
    model: Union[None, nn.Module, Callable[[], nn.Module]] = None,
    loader: Optional[DataLoader] = None,
    **trainer_kw: Any,
) -> Tuple[L.Trainer, nn.Module]:
    """``seed_everything(0)``, then fit ``model`` (default ``TinyMLP``; a class or factory is
    called after seeding, a module is used as is) on ``loader`` (default ``make_loader()``) with
    ``callbacks`` for ``epochs``; returns ``(trainer, model)``."""
    L.seed_everything(0, verbose=False)
    if model is None:
        model = TinyMLP
    if not isinstance(model, nn.Module):
        model = model()
    cbs: List[L.Callback] = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    tr = trainer(tmp_path, cbs, max_epochs=epochs, **trainer_kw)
    tr.fit(model, loader if loader is not None else make_loader())
    return tr, model


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


# ------------------------------------------------------------------------- DDP scaffolding
DDP = {"strategy": "ddp_spawn", "devices": 2}


def rank_strided_loader(n: int, batch_size: int, dtype=torch.float64) -> DataLoader:
    """``make_data(n)`` as an indexed loader in rank-strided order: one process with batches of
    ``2 * b`` sees the union of two ranks' batches of ``b`` (so the averaged gradients agree)."""
    x, y = make_data(n, dtype=dtype)
    ds = IndexedDataset(TensorDataset(x, y))
    return DataLoader(ds, batch_size=batch_size, sampler=RankStrided(n))


def fit_one_or_two_ranks(
    folder,
    callbacks: Sequence[L.Callback],
    model: nn.Module,
    devices: int,
    batch_size: int,
    *,
    n: int = 120,
    epochs: int = 3,
) -> dict:
    """Fit ``model`` with ``callbacks`` in one process (``devices=1``) or two ``ddp_spawn`` CPU
    processes (``devices=2``) on ``rank_strided_loader(n, batch_size)``, from ``model``'s current
    weights at every attempt (``fit_retrying_abort`` retries; ddp_spawn loads rank 0's weights
    back). The callbacks' state does not come back from spawned processes: compare the files
    rank 0 writes. Returns the initial weights."""
    loader = rank_strided_loader(n, batch_size)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    kw = DDP if devices == 2 else {}

    def fit():
        model.load_state_dict(init)
        tr = trainer(
            folder, list(callbacks), max_epochs=epochs, use_distributed_sampler=False, **kw
        )
        tr.fit(model, loader)

    fit_retrying_abort(fit)
    return init


def single_and_ddp_runs(run: Callable[[Any, int, int], Any]):
    """A module-scoped fixture (assign it: ``runs = single_and_ddp_runs(_run)``) that calls
    ``run(folder, devices, batch_size)`` once in one process (batches of 40) and once on two
    ranks (20 each) and gives the two folders ``(single, ddp)``."""

    @pytest.fixture(scope="module")
    def runs(tmp_path_factory):
        single, ddp = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ddp")
        run(single, 1, 40)
        run(ddp, 2, 20)
        return single, ddp

    return runs


def assert_same_attribution_files(single, ddp, n: int, rtol: float) -> Tuple[dict, ...]:
    """The ``self_influence.csv`` and ``top_k.csv`` rank 0 wrote under DDP (folder ``ddp``) equal
    the single-process ones: every sample index once, every rank's labels, the same positive
    self-influence (to ``rtol`` of the largest), the same top-k lists. Returns the four tables
    ``(self single, self ddp, top-k single, top-k ddp)``."""
    a, b = read_csv(single / "self_influence.csv"), read_csv(ddp / "self_influence.csv")
    np.testing.assert_array_equal(a["index"], np.arange(n))
    np.testing.assert_array_equal(b["index"], np.arange(n))
    np.testing.assert_array_equal(b["label"], make_data(n)[1].numpy())
    np.testing.assert_array_equal(a["label"], b["label"])
    assert (a["self_influence"] > 0).all()
    assert_close_rel(b["self_influence"], a["self_influence"], rtol)
    ta, tb = read_csv(single / "top_k.csv"), read_csv(ddp / "top_k.csv")
    for key in ("query", "rank", "proponent", "opponent"):
        np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)
    return a, b, ta, tb
