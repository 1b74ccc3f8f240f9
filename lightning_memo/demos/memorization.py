"""Demo: memorization monitoring on scikit-learn's digits with 10 % of the labels flipped.

A small MLP is trained with Lightning and the :class:`MemorizationMonitor`. At the end, a flipped
sample that the model fits with its wrong label counts as memorized; the demo prints, per
evaluated epoch, how well -PSMI, the loss and -margin of that epoch predict it (AUROC), and the
precision / recall of the early warning against the flipped samples.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

import lightning as L
import numpy as np
import torch

from ..callbacks.memorization import MemorizationMonitor
from ._common import (
    DigitsMLP,
    auroc,
    digits_loader,
    few_epochs,
    fit_demo,
    require_sklearn,
    write_demo_report,
)

__all__ = ["run_memorization_demo"]


def run_memorization_demo(
    epochs: int = 120,
    out_dir: str = "demo_runs",
    n_estimators: int = 1000,
    seed: int = 0,
    source: str = "eval",
    verbose: bool = True,
) -> Dict[str, Any]:
    """Train the digits MLP with the monitor; print and return the per-epoch AUROC table."""
    require_sklearn("The memorization demo")
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
                "auroc_psmi": auroc(-psmi, memorized),
                "auroc_loss": auroc(loss, memorized),
                "auroc_margin": auroc(-margin, memorized),
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
        "report": write_demo_report(logger.log_dir, flipped),
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
    print("\nAUROC for 'flipped and memorized at the end', from scores of these epochs:")
    print(f"{'epoch':>5}  {'-PSMI':>7}  {'loss':>7}  {'-margin':>7}")
    shown = set(few_epochs([row["epoch"] for row in r["rows"]]))
    for row in (row for row in r["rows"] if row["epoch"] in shown):
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
    if r.get("report"):
        print(f"Report (every epoch, flagged samples, ROC curves): open {r['report']}")
