"""Pieces shared by the callbacks: the default forward pass and a sequential loader."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler

from ..data import make_describer
from ..distributed import world_size

__all__ = [
    "default_forward",
    "checked_forward",
    "sequential_loader",
    "resumed_output_dir",
    "module_per_sample_loss",
    "default_layers",
    "dataset_size",
    "sample_texts",
    "markdown_cell",
    "samples_describe",
    "show_progress",
    "batch_mask",
    "inference_context",
]


NON_INPUT_KEYS = ("index", "label", "labels", "y")


def default_forward(module: LightningModule, batch: Any, skip_keys: Sequence[Any] = ()) -> Any:
    """Forward pass of an extra no-grad pass: ``module(batch[0])`` for tuple batches,
    ``module(**inputs)`` for dict batches without ``NON_INPUT_KEYS``, the string entries of
    ``skip_keys`` (e.g. the callback's index, label or concept keys) and text fields (a string or
    a list of strings, e.g. the ``"text"`` a tokenizing collate keeps): a Hugging Face style
    ``forward(input_ids, attention_mask)`` gets its inputs and the attention mask."""
    if isinstance(batch, dict):
        skip = set(NON_INPUT_KEYS) | {k for k in skip_keys if isinstance(k, str)}
        return module(**{k: v for k, v in batch.items() if k not in skip and not _is_text(v)})
    if isinstance(batch, (tuple, list)):
        return module(batch[0])
    return module(batch)


def _is_text(value: Any) -> bool:
    """A string, or a non-empty list / tuple of strings."""
    if isinstance(value, str):
        return True
    return (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)
    )


def checked_forward(
    fn: Callable[[LightningModule, Any], Any],
    module: LightningModule,
    batch: Any,
    who: str,
    custom: Optional[bool] = None,
    hint: str = "",
) -> Any:
    """``fn(module, batch)``; a failure says which callback's extra pass could not run the model
    and what to pass instead (raised at the first training batch, not after an epoch).

    ``custom``: whether ``fn`` is the user's ``forward_fn`` (for the message; ``None``: any
    ``fn``); ``hint``: a sentence added to the message (another way out)."""
    try:
        return fn(module, batch)
    except (TypeError, KeyError, IndexError, ValueError, RuntimeError, AttributeError) as err:
        keys = f" (batch keys: {sorted(map(str, batch))})" if isinstance(batch, dict) else ""
        mine = bool(fn) if custom is None else custom
        raise ValueError(
            f"{who} runs extra forward passes with "
            f"{'forward_fn' if mine else 'the default forward (forward_fn=None)'}, which failed "
            f"on a training batch{keys}: {type(err).__name__}: {err}. Pass "
            "forward_fn=lambda module, batch: module(...) with the inputs your model takes (dict "
            "batches are called as module(**batch) without the index / label / concept keys)."
            + (f" {hint}" if hint else "")
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

    The loader's batch size, ``collate_fn``, ``num_workers``, ``pin_memory`` and, with workers,
    ``persistent_workers``, ``prefetch_factor``, ``worker_init_fn``, ``multiprocessing_context``
    and ``timeout`` are kept (not its ``generator``: drawing from it would change the training
    shuffle). Persistent workers only pay off when the caller keeps the returned loader for the
    next pass.
    """
    dl = trainer.train_dataloader if loader is None else loader
    ds = getattr(dl, "dataset", None)
    if ds is None or getattr(dl, "batch_size", None) is None:
        return dl
    sampler = None
    if world_size(trainer.strategy) > 1:
        sampler = RankShard(len(ds), trainer.global_rank, trainer.world_size)
    workers = int(getattr(dl, "num_workers", 0) or 0)
    extra: Dict[str, Any] = {}
    if workers > 0:
        extra = {
            "persistent_workers": bool(getattr(dl, "persistent_workers", False)),
            "prefetch_factor": getattr(dl, "prefetch_factor", None),
            "worker_init_fn": getattr(dl, "worker_init_fn", None),
            "multiprocessing_context": getattr(dl, "multiprocessing_context", None),
            "timeout": getattr(dl, "timeout", 0),
        }
    return DataLoader(
        ds,
        batch_size=dl.batch_size,
        sampler=sampler,
        shuffle=False,
        collate_fn=dl.collate_fn,
        num_workers=workers,
        pin_memory=bool(getattr(dl, "pin_memory", False)),
        **extra,
    )


class RankShard(Sampler):
    """Positions ``rank, rank + world, ...`` of ``[0, n)``: a sequential, unpadded shard."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def module_per_sample_loss(module: Any, batch: Any) -> torch.Tensor:
    """Default loss: ``module.per_sample_loss(batch)`` -> (B,)."""
    fn = getattr(module, "per_sample_loss", None)
    if fn is None:
        raise ValueError(
            f"{type(module).__name__} has no `per_sample_loss(self, batch)`; TracIn and "
            "InfluenceAnalysis need one loss per sample. Add for example:\n"
            "    def per_sample_loss(self, batch):\n"
            "        x, y = batch[0], batch[1]\n"
            "        return F.cross_entropy(self(x), y, reduction='none')\n"
            "or pass loss_fn=lambda module, batch: ... to the callback."
        )
    return fn(batch)


def default_layers(model: nn.Module, kinds: Tuple[type, ...]) -> Dict[str, nn.Module]:
    """The default differentiated layers: every module of ``kinds`` with a trainable parameter."""
    mods = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, kinds) and any(p.requires_grad for p in m.parameters(recurse=False))
    }
    if not mods:
        kinds_text = " / ".join("nn." + k.__name__ for k in kinds)
        raise ValueError(
            f"The model has no trainable {kinds_text} layer; pass layers= naming layers with "
            "trainable parameters."
        )
    return mods


def dataset_size(trainer: Trainer, who: str) -> int:
    """``N``: the size of the training dataset, which must be map-style and non-empty."""
    dl = trainer.train_dataloader
    ds = getattr(dl, "dataset", None)
    if ds is None or isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
        raise TypeError(
            f"{who} needs a map-style training dataset (stable sample positions); got "
            f"{type(ds).__name__}. Wrap a map-style dataset with IndexedDataset, or pass "
            "num_samples= and give every item an 'index'."
        )
    n = len(ds)
    if n == 0:
        raise ValueError(f"The training dataloader is empty: {who} has no sample to score.")
    return n


def show_progress(progress: Optional[bool], trainer: Trainer) -> bool:
    """Whether a callback draws a progress bar on this process: ``progress=None`` follows the
    Trainer (a bar when it has a progress-bar callback, so ``Trainer(enable_progress_bar=False)``
    silences every callback's bars too), ``True`` / ``False`` force it; only global rank 0 draws."""
    show = trainer.progress_bar_callback is not None if progress is None else bool(progress)
    return show and trainer.is_global_zero


def inference_context(trainer: Trainer) -> Any:
    """The grad-free context of a forward-only extra pass: ``torch.inference_mode()``, or
    ``torch.no_grad()`` where Lightning's own evaluation loops fall back to it (a gloo process
    group, an FSDP strategy, an XLA accelerator) and when ``Trainer(inference_mode=False)``.

    Only values copied into tensors made outside the pass may leave it (an inference tensor
    cannot be changed in place or saved for backward outside inference mode); a model that builds
    a cache in ``forward`` that training later differentiates through needs
    ``Trainer(inference_mode=False)``."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        return torch.no_grad()
    strategy = type(getattr(trainer, "strategy", None)).__name__
    accelerator = type(getattr(trainer, "accelerator", None)).__name__
    if "FSDP" in strategy or "XLA" in accelerator:
        return torch.no_grad()
    if not getattr(getattr(trainer, "validate_loop", None), "inference_mode", True):
        return torch.no_grad()
    return torch.inference_mode()


def batch_mask(batch: Any, mask_key: Optional[str]) -> Any:
    """The attention mask ``batch[mask_key]`` of a dict batch; ``None`` for other batches, a
    missing key or ``mask_key=None``."""
    if isinstance(batch, dict) and mask_key and mask_key in batch:
        return batch[mask_key]
    return None


def sample_texts(
    describer: Callable[[Any], Optional[str]], items: Sequence[Any], who: str
) -> List[Optional[str]]:
    """``describer(item)`` of each dataset item (``None``: no text). A ``describe`` that raises
    is reported once per call and gives no texts, so a table never stops training."""
    out: List[Optional[str]] = []
    for item in items:
        try:
            text = describer(item)
        except Exception as err:  # a user callable: any error
            rank_zero_warn(
                f"{who}: describe= failed on a dataset item ({type(err).__name__}: {err}); the "
                "sample tables show no text. Fix describe= (dataset item -> str)."
            )
            return [None] * len(items)
        out.append(None if text is None else str(text))
    return out


def markdown_cell(text: Optional[str], max_chars: int = 200) -> str:
    """A text as one cell of a markdown table: one line, ``|`` escaped, at most ``max_chars``."""
    if text is None:
        return ""
    one = " ".join(str(text).split())
    if len(one) > max_chars:
        one = one[: max_chars - 1] + "…"
    return one.replace("|", "\\|")


def samples_describe(
    describe: Optional[Callable[[Any], str]], text_key: Optional[str]
) -> Optional[Callable[[Any], str]]:
    """The ``describe`` given to :func:`~lightning_memo.callbacks.reports.write_samples`: the
    user's, or the ``text_key`` field when it is not the ``"text"`` that ``write_samples`` reads
    by itself (``None``: its defaults)."""
    if describe is not None:
        return describe
    if text_key is None or text_key == "text":
        return None
    field = make_describer(None, text_key)
    return lambda item: field(item) or ""
