"""Pieces shared by the callbacks: the default forward pass and a sequential loader."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Sequence

from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, Sampler

from ..distributed import world_size

__all__ = ["default_forward", "checked_forward", "sequential_loader", "resumed_output_dir"]


NON_INPUT_KEYS = ("index", "label", "labels", "y")


def default_forward(module: LightningModule, batch: Any, skip_keys: Sequence[Any] = ()) -> Any:
    """Forward pass of an extra no-grad pass: ``module(batch[0])`` for tuple batches,
    ``module(**inputs)`` for dict batches without ``NON_INPUT_KEYS`` and the string entries of
    ``skip_keys`` (e.g. the callback's index, label or concept keys)."""
    if isinstance(batch, dict):
        skip = set(NON_INPUT_KEYS) | {k for k in skip_keys if isinstance(k, str)}
        return module(**{k: v for k, v in batch.items() if k not in skip})
    if isinstance(batch, (tuple, list)):
        return module(batch[0])
    return module(batch)


def checked_forward(
    fn: Callable[[LightningModule, Any], Any], module: LightningModule, batch: Any, who: str
) -> Any:
    """``fn(module, batch)``; a failure says which callback's extra pass could not run the model
    and what to pass instead (raised at the first training batch, not after an epoch)."""
    try:
        return fn(module, batch)
    except (TypeError, KeyError, IndexError, ValueError, RuntimeError, AttributeError) as err:
        keys = f" (batch keys: {sorted(map(str, batch))})" if isinstance(batch, dict) else ""
        raise ValueError(
            f"{who} runs extra forward passes with {'forward_fn' if fn else 'the default'} "
            f"forward, which failed on a training batch{keys}: {type(err).__name__}: {err}. Pass "
            "forward_fn=lambda module, batch: module(...) with the inputs your model takes (dict "
            "batches are called as module(**batch) without the index / label / concept keys)."
        ) from err


def resumed_output_dir(
    explicit: Optional[str], current: Optional[str], state: Dict[str, Any]
) -> Optional[str]:
    """The folder a resumed run writes to: the checkpoint's run folder when the callback has no
    explicit ``output_dir`` and that folder still exists, so one run's files stay in one place
    (the default logger starts a new ``version_k`` on resume)."""
    saved = state.get("out_dir")
    if explicit is None and saved and os.path.isdir(saved):
        return saved
    return current


def sequential_loader(trainer: Trainer, loader: Optional[Any] = None) -> Any:
    """A sequential loader over this rank's share of ``loader`` (default: the training loader).

    Consumes no RNG, so a run is the same with and without the callback; under DDP rank r takes
    samples r, r + w, ... without the padding ``DistributedSampler`` adds, so every sample is seen
    exactly once over all ranks. A loader with a custom batch sampler is returned as is.
    """
    dl = trainer.train_dataloader if loader is None else loader
    ds = getattr(dl, "dataset", None)
    if ds is None or getattr(dl, "batch_size", None) is None:
        return dl
    sampler = None
    if world_size(trainer.strategy) > 1:
        sampler = RankShard(len(ds), trainer.global_rank, trainer.world_size)
    return DataLoader(
        ds,
        batch_size=dl.batch_size,
        sampler=sampler,
        shuffle=False,
        collate_fn=dl.collate_fn,
        num_workers=dl.num_workers,
        pin_memory=dl.pin_memory,
    )


class RankShard(Sampler):
    """Positions ``rank, rank + world, ...`` of ``[0, n)``: a sequential, unpadded shard."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))
