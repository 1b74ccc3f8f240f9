"""Demo: memorization monitoring on scikit-learn's digits with 10 % of the labels flipped.

A small MLP is trained with Lightning and the :class:`MemorizationMonitor`. At the end, a flipped
sample that the model fits with its wrong label counts as memorized; the demo prints, per
evaluated epoch, how well -PSMI, the loss and -margin of that epoch predict it (AUROC), and the
precision / recall of the early warning against the flipped samples.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Dict, List

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .callbacks.memorization import MemorizationMonitor
from .data import IndexedDataset, load_digits_flipped

__all__ = ["DigitsMLP", "digits_loader", "run_memorization_demo"]


class DigitsMLP(L.LightningModule):
    """MLP ``64 -> hidden -> hidden -> 10`` for flattened 8x8 digits."""

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


def digits_loader(
    batch_size: int = 64, flip_fraction: float = 0.1, seed: int = 0, shuffle: bool = True
) -> tuple:
    """Indexed loader of flipped-label digits, plus ``(x, y_noisy, y_true, flipped)`` arrays."""
    x, y, y_true, flipped = load_digits_flipped(flip_fraction, seed)
    ds = IndexedDataset(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)))
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)
    return loader, (x, y, y_true, flipped)


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


def _auroc(score: np.ndarray, target: np.ndarray) -> float:
    """AUROC (torchmetrics) of any real scores; NaN scores are left out.

    ``binary_auroc`` takes float predictions outside [0, 1] for logits and applies a sigmoid,
    which saturates (to exactly 1.0 above about 17 in float32): large scores such as
    self-influence would tie and the AUROC would drop. Dense ranks scaled to [0, 1] keep the
    order and the ties, hence the AUROC, and stay inside [0, 1].
    """
    from torchmetrics.functional.classification import binary_auroc

    score = np.asarray(score, dtype=np.float64)
    ok = ~np.isnan(score)
    if target[ok].min() == target[ok].max():
        return float("nan")
    _, dense = np.unique(score[ok], return_inverse=True)
    ranked = dense / max(1, int(dense.max(initial=0)))
    return float(binary_auroc(torch.from_numpy(ranked), torch.from_numpy(target[ok]).long()))


def run_memorization_demo(
    epochs: int = 120,
    out_dir: str = "demo_runs",
    n_estimators: int = 2000,
    seed: int = 0,
    source: str = "train",
    verbose: bool = True,
) -> Dict[str, Any]:
    """Train the digits MLP with the monitor; print and return the per-epoch AUROC table."""
    L.seed_everything(seed, verbose=False)
    loader, (x, y, y_true, flipped) = digits_loader(seed=seed)
    model = DigitsMLP()
    monitor = MemorizationMonitor(
        layers=["net.3"],
        source=source,
        n_estimators=n_estimators,
        seed=seed,
        image_shape=(8, 8),
        patience=2,
    )
    logger = L.pytorch.loggers.TensorBoardLogger(out_dir, name="memorization_demo")
    fit_s = fit_demo(model, loader, [monitor], logger, epochs)
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    memorized = flipped & (pred == y)
    rows: List[Dict[str, float]] = []
    for epoch in sorted(monitor.scores):
        psmi = monitor.scores[epoch]["net.3"]
        path = os.path.join(monitor.out_dir, f"epoch_{epoch}.csv")
        base = np.genfromtxt(path, delimiter=",", names=True)
        loss = np.full(len(y), np.nan)
        margin = np.full(len(y), np.nan)
        loss[base["index"].astype(int)] = base["loss"]
        margin[base["index"].astype(int)] = base["margin"]
        rows.append(
            {
                "epoch": epoch,
                "auroc_psmi": _auroc(-psmi, memorized),
                "auroc_loss": _auroc(loss, memorized),
                "auroc_margin": _auroc(-margin, memorized),
            }
        )
    flagged = np.zeros(len(y), dtype=bool)
    flagged[monitor.flagged] = True
    tp = int((flagged & flipped).sum())
    precision = tp / max(1, int(flagged.sum()))
    recall = tp / max(1, int(flipped.sum()))
    result = {
        "rows": rows,
        "n_flipped": int(flipped.sum()),
        "n_memorized": int(memorized.sum()),
        "n_flagged": int(flagged.sum()),
        "precision": precision,
        "recall": recall,
        "train_acc_noisy": float((pred == y).mean()),
        "fit_seconds": fit_s,
        "flipped": flipped,
        "memorized": memorized,
        "psmi": {e: monitor.scores[e]["net.3"] for e in sorted(monitor.scores)},
        "log_dir": logger.log_dir,
        "monitor_dir": monitor.out_dir,
    }
    if verbose:
        _print_report(result)
    return result


def _print_report(r: Dict[str, Any]) -> None:
    print(
        f"\ndigits, {r['n_flipped']} flipped labels; at the end the model fits "
        f"{r['train_acc_noisy']:.1%} of the (noisy) training labels and has memorized "
        f"{r['n_memorized']} flipped samples. Training took {r['fit_seconds']:.1f} s."
    )
    print("\nAUROC for 'flipped and memorized at the end', from scores of each epoch:")
    print(f"{'epoch':>5}  {'-PSMI':>7}  {'loss':>7}  {'-margin':>7}")
    for row in r["rows"]:
        print(
            f"{row['epoch']:>5}  {row['auroc_psmi']:>7.3f}  {row['auroc_loss']:>7.3f}  "
            f"{row['auroc_margin']:>7.3f}"
        )
    print(
        f"\nEarly warning (PSMI < 0 for 2 evaluations): {r['n_flagged']} samples flagged; "
        f"precision {r['precision']:.2f} and recall {r['recall']:.2f} against the flipped samples."
    )
    print(f"Per-epoch CSV files: {r['monitor_dir']}")
    print(f"Open the pictures: tensorboard --logdir {os.path.dirname(r['log_dir'])}")
