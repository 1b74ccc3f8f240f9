"""Demo: TracIn on scikit-learn's digits with 10 % of the labels flipped.

The digits are split into a training set (80 %, noisy labels: 10 % of all labels are flipped to
another class) and a validation set (20 %, true labels) that serves as TracIn's ``queries``. The
digits MLP of the memorization demo is trained with the :class:`~lightning_memo.TracIn` callback.

The demo prints how well TracIn self-influence finds the flipped training samples (AUROC,
torchmetrics), next to the per-sample loss baselines (final model, first checkpoint, summed over
the checkpoints), and the time TracIn took. It writes one PNG, ``<out_dir>/tracin_proponents.png``:
one row per validation image, the query followed by its top-5 proponents and top-5 opponents, each
captioned with its label; flipped training samples carry a red frame.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch import Callback

from ..callbacks.tracin import MODES
from ..viz import save_png
from ._common import (
    DigitsMLP,
    TimedTracIn,
    auroc,
    fit_demo,
    flipped_split,
    load_digits_flipped,
    per_sample_loss,
    proponents_figure,
    quiet_single_thread,
    require_sklearn,
    write_demo_report,
)

__all__ = ["run_tracin_demo", "PNG_NAME"]

PNG_NAME = "tracin_proponents.png"


class _LossRecorder(Callback):
    """Per-sample loss of the whole training set (index order) at the end of every
    ``every_n_epochs``-th epoch: the weights TracIn's checkpoints see."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, every_n_epochs: int) -> None:
        self.x, self.y, self.every = x, y, every_n_epochs
        self.losses: Dict[int, np.ndarray] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every:
            return
        self.losses[epoch] = per_sample_loss(pl_module, self.x, self.y)


def _recall_at(score: np.ndarray, target: np.ndarray, n: int) -> float:
    """Share of the positives among the ``n`` highest scores (n = number of positives: the
    precision and the recall at that cut are equal)."""
    top = np.argsort(-score, kind="stable")[:n]
    return float(target[top].sum() / max(1, target.sum()))


def run_tracin_demo(
    epochs: int = 40,
    out_dir: str = "demo_runs",
    mode: str = "checkpoints",
    projection_dim: Optional[int] = 1024,
    seed: int = 0,
    verbose: bool = True,
    lr: float = 3e-3,
    every_n_epochs: Optional[int] = None,
    val_fraction: float = 0.2,
    n_show: int = 4,
    batch_size: int = 64,
) -> Dict[str, Any]:
    """Train the digits MLP with :class:`~lightning_memo.TracIn`; print and return the results.

    Args:
        epochs: training epochs.
        out_dir: folder of the TensorBoard logs, TracIn's files and the PNG.
        mode: ``"checkpoints"`` (TracInCP) or ``"online"`` (original TracIn).
        projection_dim: TracIn's projected gradient size; ``None`` for exact gradients.
        seed: seed of the label flips, the split, the model initialisation, the shuffling and the
            projection.
        verbose: print the report.
        lr: Adam learning rate. At 3e-3 the MLP fits most flipped labels within 40 epochs, so the
            final loss no longer separates them well; at 1e-3 it fits almost none.
        every_n_epochs: TracIn checkpoint (and loss baseline) interval; default
            ``max(1, epochs // 10)``, i.e. at most about 10 checkpoints.
        val_fraction: share of the digits held out as the (clean) validation / query set.
        n_show: validation images drawn in the PNG (the first ones of the validation split).
        batch_size: training batch size.

    Returns:
        ``rows`` (score name, ``auroc``, ``recall``: share of the flipped samples among the
        highest ``n_flipped`` scores), ``self_influence`` (N,), ``flipped`` (N,) bool over the
        training set, ``final_loss`` (N,), ``examples`` (per shown query: validation position,
        label, proponents / opponents with training indices, labels, flipped flags and scores),
        ``proponent_label_share``, ``proponent_flipped_share``, ``opponent_flipped_share`` (over
        all queries), timings
        (``fit_seconds``, ``tracin_seconds``: TracIn's hooks during the fit, ``scores_seconds``:
        self-influence and all query scores afterwards), ``png``, ``tracin_dir``, ``log_dir``.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use 'checkpoints' or 'online'.")
    if epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be >= 1.")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} must lie in (0, 1).")
    require_sklearn("The TracIn demo")
    every = every_n_epochs or max(1, epochs // 10)
    x, y_noisy, y_true, flipped_all = load_digits_flipped(0.1, seed)
    sp = flipped_split(x, y_noisy, y_true, flipped_all, val_fraction, seed, batch_size)
    tr, val, x_tr, y_tr, x_val, _, flipped, loader, queries = sp

    with quiet_single_thread():
        L.seed_everything(seed, verbose=False)
        tracin = TimedTracIn(
            mode=mode,
            projection_dim=projection_dim,
            every_n_epochs=every,
            queries=queries,
            top_k=5,
            seed=seed,
            store_dtype=torch.float16,
            image_shape=(8, 8),
            progress=False,
        )
        losses = _LossRecorder(x_tr, y_tr, every)
        model = DigitsMLP(lr=lr)
        logger = L.pytorch.loggers.TensorBoardLogger(out_dir, name="tracin_demo")
        fit_s = fit_demo(model, loader, [losses, tracin], logger, epochs)
        t0 = time.perf_counter()
        self_inf = tracin.self_influence.cpu().numpy()
        scores = tracin.scores
        scores_s = time.perf_counter() - t0
        final_loss = per_sample_loss(model, x_tr, y_tr)
        with torch.no_grad():
            fitted = (model(x_tr).argmax(1) == y_tr).numpy()

    n_flip = int(flipped.sum())
    baselines = [
        ("TracIn self-influence", self_inf),
        (f"loss, final model (epoch {epochs})", final_loss),
    ]
    if losses.losses:
        first = min(losses.losses)
        n_ends = len(losses.losses)
        baselines.append((f"loss after epoch {first}", losses.losses[first]))
        baselines.append((f"loss summed over {n_ends} epoch ends", sum(losses.losses.values())))
    rows = [
        {"score": name, "auroc": auroc(s, flipped), "recall": _recall_at(s, flipped, n_flip)}
        for name, s in baselines
    ]

    # proponents / opponents of every query: label agreement, flipped opponents
    y_tr_np = y_tr.numpy()
    k = 5
    pro = torch.topk(scores, k, dim=1).indices.numpy()
    opp = torch.topk(-scores, k, dim=1).indices.numpy()
    pro_same = float((y_tr_np[pro] == y_true[val][:, None]).mean())
    pro_flipped = float(flipped[pro].mean())
    opp_flipped = float(flipped[opp].mean())
    examples = []
    for q in range(min(n_show, len(val))):
        res = tracin.top_k_for(q, k)
        examples.append(
            {
                "query": q,
                "digits_index": int(val[q]),
                "label": int(y_true[val[q]]),
                **{
                    key: res[key]
                    for key in ("proponents", "proponent_scores", "opponents", "opponent_scores")
                },
                "proponent_labels": y_tr_np[res["proponents"]],
                "opponent_labels": y_tr_np[res["opponents"]],
                "proponent_flipped": flipped[res["proponents"]],
                "opponent_flipped": flipped[res["opponents"]],
            }
        )
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, PNG_NAME)
    img = proponents_figure(x_val.numpy(), x_tr.numpy(), examples)
    backend = save_png(img, png)

    result = {
        "rows": rows,
        "mode": mode,
        "epochs": epochs,
        "lr": lr,
        "every_n_epochs": every,
        "n_checkpoints": len(tracin.store) if mode == "checkpoints" else None,
        "projection_dim": projection_dim,
        "feature_dim": tracin.features.dim,
        "gradient_size": tracin.features.total,
        "n_train": len(tr),
        "n_val": len(val),
        "n_flipped": n_flip,
        "fitted_flipped": float(fitted[flipped].mean()) if n_flip else float("nan"),
        "self_influence": self_inf,
        "final_loss": final_loss,
        "flipped": flipped,
        "examples": examples,
        "proponent_label_share": pro_same,
        "proponent_flipped_share": pro_flipped,
        "opponent_flipped_share": opp_flipped,
        "fit_seconds": fit_s,
        "tracin_seconds": tracin.seconds,
        "scores_seconds": scores_s,
        "png": os.path.abspath(png),
        "png_shape": tuple(img.shape),
        "png_backend": backend,
        "tracin_dir": tracin.out_dir,
        "log_dir": logger.log_dir,
        "report": write_demo_report(logger.log_dir, flipped),
    }
    if verbose:
        _print_report(result)
    return result


# --------------------------------------------------------------------------- report
def _print_report(r: Dict[str, Any]) -> None:
    proj = (
        "exact gradients"
        if r["projection_dim"] is None or r["feature_dim"] == r["gradient_size"]
        else f"projection_dim={r['projection_dim']} -> {r['feature_dim']} features"
    )
    sched = (
        f"{r['n_checkpoints']} checkpoints, every {r['every_n_epochs']} epochs"
        if r["mode"] == "checkpoints"
        else "every training step"
    )
    print(
        f"\ndigits: {r['n_train']} training images, {r['n_flipped']} of them with a flipped label; "
        f"{r['n_val']} validation images (true labels) as queries. MLP, Adam lr {r['lr']:g}, "
        f"{r['epochs']} epochs: at the end it fits {r['fitted_flipped']:.0%} of the flipped "
        "labels."
    )
    print(
        f"TracIn mode={r['mode']!r} ({sched}; {proj} of {r['gradient_size']} gradient entries): "
        f"{r['tracin_seconds']:.1f} s inside the {r['fit_seconds']:.1f} s fit"
        + (
            f", plus {r['scores_seconds']:.2f} s for self-influence and the {r['n_val']} x "
            f"{r['n_train']} scores."
            if r["mode"] == "checkpoints"
            else " (self-influence and scores accumulate during training)."
        )
    )
    print(
        f"\nFinding the {r['n_flipped']} flipped training labels (higher score = flipped; the "
        f"losses are taken every {r['every_n_epochs']} epochs"
        + (", at TracIn's checkpoints):" if r["mode"] == "checkpoints" else "):")
    )
    print(f"{'score':<40} {'AUROC':>6}  {'recall@' + str(r['n_flipped']):>10}")
    for row in r["rows"]:
        print(f"{row['score']:<40} {row['auroc']:>6.3f}  {row['recall']:>10.2f}")
    print(
        f"\nOver all {r['n_val']} queries: {r['proponent_label_share']:.0%} of the top-5 "
        f"proponents carry the query's label and {r['proponent_flipped_share']:.0%} are flipped "
        f"training samples; {r['opponent_flipped_share']:.0%} of the top-5 opponents are.\n"
        "Raw TracIn scores are inner products of gradients, so samples with large gradients\n"
        "(here the flipped ones, whose loss is high for much of the training) weigh heavily in\n"
        "both lists."
    )
    for ex in r["examples"]:
        pro = " ".join(
            f"{lab}{'*' if f else ''}"
            for lab, f in zip(ex["proponent_labels"], ex["proponent_flipped"])
        )
        opp = " ".join(
            f"{lab}{'*' if f else ''}"
            for lab, f in zip(ex["opponent_labels"], ex["opponent_flipped"])
        )
        print(
            f"  query {ex['query']} (label {ex['label']}): proponents' labels {pro} | "
            f"opponents' labels {opp}"
        )
    print("  (* = flipped label)")
    print(
        f"\nPicture ({r['png_shape'][1]}x{r['png_shape'][0]} px): {r['png']}\n"
        "  each row: the query, its 5 proponents, its 5 opponents; caption = label (training "
        "label for\n  training samples); red frame = flipped training label."
    )
    print(f"TracIn files (self_influence.csv, top_k.csv, ...): {r['tracin_dir']}")
    print(f"Open the pictures: tensorboard --logdir {os.path.dirname(r['log_dir'])}")
    if r.get("report"):
        print(f"Report: open {r['report']}")
