"""What the demos share: the optional scikit-learn dependency, the digits data with flipped labels,
the digits MLP and its fit, the AUROC of a score, the train / validation split of flipped-label
data, a timed TracIn and the proponents / opponents picture.

scikit-learn is imported only inside the functions that load its data: importing the demos (and
``lightning-memo demo --help``) works without it, and running a demo without it fails with
:class:`MissingDemoDependency`, which says how to install it.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..callbacks.tracin import TracIn
from ..data import IndexedDataset
from ..viz import as_image, image_grid

__all__ = [
    "DEMO_INSTALL_HINT",
    "MissingDemoDependency",
    "require_sklearn",
    "load_digits_flipped",
    "DigitsMLP",
    "digits_loader",
    "fit_demo",
    "auroc",
    "recall_top",
    "per_sample_loss",
    "quiet_single_thread",
    "TimedTracIn",
    "FlippedSplit",
    "flipped_split",
    "proponents_figure",
    "write_demo_report",
    "few_epochs",
]

DEMO_INSTALL_HINT = "pip install lightning_memo[demo]"


class MissingDemoDependency(ImportError):
    """A demo needs an optional package (scikit-learn) that is not installed."""


def require_sklearn(what: str = "This demo") -> None:
    """Raise :class:`MissingDemoDependency` unless scikit-learn can be imported.

    Args:
        what: who needs it, for the message (e.g. ``"The erasure demo"``).
    """
    try:
        import sklearn  # noqa: F401
    except ImportError as err:
        raise MissingDemoDependency(
            f"{what} loads its data from scikit-learn, which is not installed. Install the demo "
            f"extras: {DEMO_INSTALL_HINT} (in a clone: pip install -e '.[demo]', or make demo)."
        ) from err


# --------------------------------------------------------------------------- data
def load_digits_flipped(
    flip_fraction: float = 0.1, seed: int = 0
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits (1,797 8x8 images) with a seeded share of labels flipped.

    Args:
        flip_fraction: share of the labels flipped, each to another class drawn uniformly.
        seed: seed of which labels are flipped and to what.

    Returns:
        x: (n, 64) float32 in [0, 1]; y_noisy: (n,) int64 training labels; y_true: (n,) int64;
        flipped: (n,) bool.
    """
    require_sklearn("load_digits_flipped")
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y_true = data.target.astype(np.int64)
    y_noisy, flipped = flip_labels(y_true, 10, flip_fraction, seed)
    return x, y_noisy, y_true, flipped


def flip_labels(
    labels: np.ndarray, num_classes: int, fraction: float, seed: int
) -> Tuple[np.ndarray, np.ndarray]:
    """A seeded share of labels moved to another class drawn uniformly: (given, flipped mask).

    Args:
        labels: (n,) int class ids; fraction: share of the n labels flipped.

    Returns:
        given: (n,) the labels with the flipped ones changed; flipped: (n,) bool.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=int(round(fraction * n)), replace=False)] = True
    given = labels.copy()
    shift = rng.integers(1, num_classes, size=int(flipped.sum()))
    given[flipped] = (labels[flipped] + shift) % num_classes
    return given, flipped


def digits_loader(
    batch_size: int = 64, flip_fraction: float = 0.1, seed: int = 0, shuffle: bool = True
) -> tuple:
    """Indexed loader of flipped-label digits, plus ``(x, y_noisy, y_true, flipped)`` arrays."""
    x, y, y_true, flipped = load_digits_flipped(flip_fraction, seed)
    ds = IndexedDataset(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)))
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)
    return loader, (x, y, y_true, flipped)


class FlippedSplit(NamedTuple):
    """Indices into the dataset, tensors, the training part's flipped mask and the loaders."""

    tr: np.ndarray
    val: np.ndarray
    x_tr: torch.Tensor
    y_tr: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    flipped: np.ndarray
    loader: DataLoader
    queries: DataLoader


def flipped_split(
    x: np.ndarray,
    y_noisy: np.ndarray,
    y_true: np.ndarray,
    flipped_all: np.ndarray,
    val_fraction: float,
    seed: int,
    batch_size: int,
) -> FlippedSplit:
    """Seeded split of a flipped-label dataset: the training part keeps the noisy labels (a
    shuffled loader over an ``IndexedDataset``), the validation part the true labels (the query
    loader)."""
    perm = np.random.default_rng(seed).permutation(len(y_true))
    n_val = int(round(val_fraction * len(y_true)))
    val, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    x_tr, y_tr = torch.from_numpy(x[tr]), torch.from_numpy(y_noisy[tr])
    x_val, y_val = torch.from_numpy(x[val]), torch.from_numpy(y_true[val])
    loader = DataLoader(
        IndexedDataset(TensorDataset(x_tr, y_tr)),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    queries = DataLoader(TensorDataset(x_val, y_val), batch_size=256)
    return FlippedSplit(tr, val, x_tr, y_tr, x_val, y_val, flipped_all[tr], loader, queries)


# --------------------------------------------------------------------------- the model and its fit
class DigitsMLP(L.LightningModule):
    """MLP ``in_dim -> hidden -> hidden -> n_classes`` (default ``64 -> 256 -> 256 -> 10`` for
    flattened 8x8 digits)."""

    def __init__(self, hidden: int = 256, lr: float = 1e-3, in_dim: int = 64, n_classes: int = 10):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_dim) -> logits (B, n_classes)."""
        return self.net(x)

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        """Cross-entropy of each sample of a ``(x, y, index)`` batch: (B,)."""
        x, y = batch[0], batch[1]
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("train_loss", loss, on_epoch=True, on_step=False, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def fit_demo(
    model: L.LightningModule, loader: Any, callbacks: list, logger: Any, epochs: int
) -> float:
    """Fit a demo model on the CPU without progress bar, checkpoints or summary; seconds taken."""
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=logger,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        deterministic=True,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # small shipped data: these two hints are noise here
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        trainer.fit(model, loader)
    return time.perf_counter() - t0


def per_sample_loss(model: L.LightningModule, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Cross-entropy of each sample under ``model`` in eval mode (its mode restored): (N,)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return F.cross_entropy(model(x), y, reduction="none").numpy()
    finally:
        model.train(was_training)


@contextmanager
def quiet_single_thread() -> Iterator[None]:
    """One torch thread (tiny matmuls: threads cost more than they bring, and oversubscribed cores
    slow them down many times) and no Lightning info banners; both restored afterwards."""
    threads = torch.get_num_threads()
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    torch.set_num_threads(1)
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        log.setLevel(level)


_TRACIN_HOOKS = (
    "setup",
    "on_train_start",
    "on_train_batch_start",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_fit_end",
)


class TimedTracIn(TracIn):
    """TracIn that adds the wall time spent in its own hooks to ``self.seconds``."""

    seconds: float = 0.0


def _timed(name: str) -> Any:
    def hook(self: TimedTracIn, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return getattr(super(TimedTracIn, self), name)(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0

    hook.__name__ = name
    return hook


for _name in _TRACIN_HOOKS:
    setattr(TimedTracIn, _name, _timed(_name))


# --------------------------------------------------------------------------- scores
def auroc(score: np.ndarray, target: np.ndarray) -> float:
    """AUROC (torchmetrics) of any real scores; NaN scores are left out.

    ``binary_auroc`` takes float predictions outside [0, 1] for logits and applies a sigmoid,
    which saturates (to exactly 1.0 above about 17 in float32): large scores such as
    self-influence would tie and the AUROC would drop. Dense ranks scaled to [0, 1] keep the
    order and the ties, hence the AUROC, and stay inside [0, 1].

    Args:
        score: (N,) higher = more likely positive.
        target: (N,) bool or 0/1.

    Returns:
        The AUROC, or NaN when the non-NaN scores have only one class.
    """
    from torchmetrics.functional.classification import binary_auroc

    score = np.asarray(score, dtype=np.float64)
    ok = ~np.isnan(score)
    if target[ok].min() == target[ok].max():
        return float("nan")
    _, dense = np.unique(score[ok], return_inverse=True)
    ranked = dense / max(1, int(dense.max(initial=0)))
    return float(binary_auroc(torch.from_numpy(ranked), torch.from_numpy(target[ok]).long()))


def recall_top(score: np.ndarray, target: np.ndarray, share: float = 0.1) -> float:
    """Share of the positives found among the ``ceil(share * N)`` highest scores (NaN last;
    ``inf`` / ``-inf`` rank first / last)."""
    score = np.where(np.isnan(score), -np.inf, score)
    n_top = max(1, math.ceil(share * len(score)))
    top = np.argsort(-score, kind="stable")[:n_top]
    return float(target[top].sum() / max(1, target.sum()))


# --------------------------------------------------------------------------- the picture
TILE_SCALE = 6  # 8x8 digits drawn at 48x48 pixels
FRAME = 3  # width of the red frame of a flipped training sample, in pixels
GAP = 12  # white space between the query, the proponents and the opponents, and between rows


def _tile(x: np.ndarray, caption: str, framed: bool) -> torch.Tensor:
    """One 8x8 digit as dark ink on white, scaled, captioned by ``image_grid``; ``framed``: red."""
    im = 1.0 - as_image(torch.from_numpy(x), (8, 8))  # (1, 8, 8) in [0, 1], ink dark
    im = im.repeat_interleave(TILE_SCALE, 1).repeat_interleave(TILE_SCALE, 2).repeat(3, 1, 1)
    if framed:
        red = torch.tensor([0.85, 0.1, 0.1]).view(3, 1, 1)
        im[:, :FRAME, :] = red
        im[:, -FRAME:, :] = red
        im[:, :, :FRAME] = red
        im[:, :, -FRAME:] = red
    return image_grid([im], [caption])


def proponents_figure(
    x_query: np.ndarray, x_train: np.ndarray, examples: Sequence[Dict[str, Any]]
) -> np.ndarray:
    """The proponents / opponents picture as an (H, W, 3) uint8 array (write it with
    :func:`lightning_memo.viz.save_png`).

    One row per example: the query, a gap, its proponents, a gap, its opponents (most influential
    first). Each tile is the 8x8 digit (dark ink on white, scaled by ``TILE_SCALE``) with its label
    printed under it by :func:`lightning_memo.viz.image_grid`: the true label for the query,
    the training (possibly flipped) label for the others; flipped training samples have a red
    frame.

    Args:
        x_query: (n_query, 64) query inputs; x_train: (N, 64) training inputs.
        examples: dicts with ``query``, ``label``, ``proponents`` / ``opponents`` (training
            indices), ``proponent_labels`` / ``opponent_labels`` and ``proponent_flipped`` /
            ``opponent_flipped``.
    """
    rows: List[torch.Tensor] = []
    for ex in examples:
        q = _tile(x_query[ex["query"]], str(ex["label"]), False)
        gap = torch.ones(3, q.shape[1], GAP)
        parts = [q, gap]
        for side in ("proponent", "opponent"):
            for i, lab, flip in zip(ex[f"{side}s"], ex[f"{side}_labels"], ex[f"{side}_flipped"]):
                parts.append(_tile(x_train[int(i)], str(int(lab)), bool(flip)))
            parts.append(gap)
        rows.append(torch.cat(parts[:-1], dim=2))
    width = max(r.shape[2] for r in rows)
    out: List[torch.Tensor] = []
    for r in rows:
        if r.shape[2] < width:
            r = torch.cat([r, torch.ones(3, r.shape[1], width - r.shape[2])], dim=2)
        out += [r, torch.ones(3, GAP, width)]
    img = torch.cat(out[:-1], dim=1)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def write_demo_report(log_dir: str, truth: Optional[np.ndarray] = None) -> Optional[str]:
    """The HTML report of a demo run (``<log_dir>/report.html``), with ``truth`` (e.g. the
    flipped labels, (N,) bool) recorded as ``truth.csv`` so the page shows ROC curves.

    Returns the page's path, or ``None`` (with a printed reason) when matplotlib is missing.
    """
    from ..callbacks.reports import write_truth
    from ..report import report

    if truth is not None:
        write_truth(log_dir, np.asarray(truth, dtype=bool))
    try:
        return report(log_dir)
    except ImportError as err:
        print(f"No HTML report: {err}")
        return None


def few_epochs(epochs: Sequence[int], k: int = 6) -> List[int]:
    """At most ``k`` of ``epochs`` for a printed summary: the first ones, then spaced out, and
    the last (the whole per-epoch table is in the report and the CSV files)."""
    epochs = sorted(epochs)
    if len(epochs) <= k:
        return epochs
    picks = {epochs[0], epochs[1], epochs[-1]}
    picks.update(epochs[int(i)] for i in np.geomspace(2, len(epochs) - 1, k - 2).astype(int))
    return sorted(picks)
