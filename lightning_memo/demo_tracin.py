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
import struct
import time
import zlib
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset

from .callbacks.tracin import MODES, TracIn
from .data import IndexedDataset, load_digits_flipped
from .demo import DigitsMLP, _auroc, fit_demo
from .demo_erasure import _quiet_single_thread
from .viz import as_image, image_grid

__all__ = ["run_tracin_demo", "proponents_figure"]

PNG_NAME = "tracin_proponents.png"
TILE_SCALE = 6  # 8x8 digits drawn at 48x48 pixels
FRAME = 3  # width of the red frame of a flipped training sample, in pixels
GAP = 12  # white space between the query, the proponents and the opponents, and between rows
_HOOKS = (
    "setup",
    "on_train_start",
    "on_train_batch_start",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_fit_end",
)


class _TimedTracIn(TracIn):
    """TracIn that adds the wall time spent in its own hooks to ``self.seconds``."""

    seconds: float = 0.0


def _timed(name: str) -> Any:
    def hook(self: _TimedTracIn, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return getattr(super(_TimedTracIn, self), name)(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0

    hook.__name__ = name
    return hook


for _name in _HOOKS:
    setattr(_TimedTracIn, _name, _timed(_name))


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
        self.losses[epoch] = _per_sample_loss(pl_module, self.x, self.y)


def _per_sample_loss(model: L.LightningModule, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return F.cross_entropy(model(x), y, reduction="none").numpy()
    finally:
        model.train(was_training)


def _recall_at(score: np.ndarray, target: np.ndarray, n: int) -> float:
    """Share of the positives among the ``n`` highest scores (n = number of positives: the
    precision and the recall at that cut are equal)."""
    top = np.argsort(-score, kind="stable")[:n]
    return float(target[top].sum() / max(1, target.sum()))


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
    every = every_n_epochs or max(1, epochs // 10)
    x, y_noisy, y_true, flipped_all = load_digits_flipped(0.1, seed)
    sp = flipped_split(x, y_noisy, y_true, flipped_all, val_fraction, seed, batch_size)
    tr, val, x_tr, y_tr, x_val, _, flipped, loader, queries = sp

    with _quiet_single_thread():
        L.seed_everything(seed, verbose=False)
        tracin = _TimedTracIn(
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
        scores = tracin.scores()
        scores_s = time.perf_counter() - t0
        final_loss = _per_sample_loss(model, x_tr, y_tr)
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
        {"score": name, "auroc": _auroc(s, flipped), "recall": _recall_at(s, flipped, n_flip)}
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
    backend = _save_png(img, png)

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
    }
    if verbose:
        _print_report(result)
    return result


# --------------------------------------------------------------------------- the PNG
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
    """The proponents / opponents picture as an (H, W, 3) uint8 array.

    One row per example: the query, a gap, its proponents, a gap, its opponents (most influential
    first). Each tile is the 8x8 digit (dark ink on white, scaled by ``TILE_SCALE``) with its label
    printed under it by :func:`lightning_memo.io.image_grid`: the true label for the query,
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


def _save_png(img: np.ndarray, path: str) -> str:
    """Write an (H, W, 3) uint8 array as PNG with Pillow when installed, else with zlib."""
    try:
        from PIL import Image
    except ImportError:
        _write_png_zlib(img, path)
        return "zlib"
    Image.fromarray(img, "RGB").save(path)
    return "PIL"


def _write_png_zlib(img: np.ndarray, path: str) -> None:
    """Minimal 8-bit RGB PNG writer (no image library needed)."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    with open(path, "wb") as f:
        f.write(png)


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
