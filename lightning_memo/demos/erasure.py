"""Demo: LEACE concept erasure on scikit-learn's digits with an injected spurious concept.

A bright 2x2 patch is painted in the top-left corner of 90 % of the even digits and 10 % of the odd
ones (seeded); the concept is z = "the patch is present" (0/1). The digits MLP of the memorization
demo is trained with Lightning once without erasure (baseline) and once per ``when`` mode of
:class:`~lightning_memo.ConceptErasure` on its penultimate layer ``net.3`` (256 ReLU features).

For each run the demo prints:

- the callback's own verification at its (last) fit: accuracy of a linear probe for z on the
  layer's output before and after erasure, in-sample on the rows it was fitted on, next to the
  majority-class rate of z (what a constant predictor reaches);
- on the final model, with the erasure hooks in place: a logistic-regression probe for z trained on
  the training split's layer outputs and scored on a held-out split, and the digit accuracy on that
  held-out split (the baseline row is the accuracy without erasure).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..callbacks.erasure import WHEN, ConceptErasure
from ._common import (
    DigitsMLP,
    fit_demo,
    quiet_single_thread,
    require_sklearn,
    write_demo_report,
)

__all__ = ["load_digits_patched", "run_erasure_demo"]

LAYER = "net.3"


def load_digits_patched(
    seed: int = 0,
    p_even: float = 0.9,
    p_odd: float = 0.1,
    test_fraction: float = 0.2,
) -> Dict[str, np.ndarray]:
    """scikit-learn's digits with a bright 2x2 top-left patch correlated with the digit's parity.

    Args:
        seed: seed of the patch draw and of the train / held-out split.
        p_even: probability that an even digit carries the patch.
        p_odd: probability that an odd digit carries the patch.
        test_fraction: share of the held-out split.

    Returns:
        ``x``: (n, 64) float32 in [0, 1] with the patch painted in; ``y``: (n,) int64 digits;
        ``z``: (n,) int64 concept (1 = patch); ``train``, ``test``: index arrays of the split.
    """
    require_sklearn("load_digits_patched")
    from sklearn.datasets import load_digits

    for name, p in (("p_even", p_even), ("p_odd", p_odd), ("test_fraction", test_fraction)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name}={p!r} must lie in [0, 1].")
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    z = (rng.random(len(y)) < np.where(y % 2 == 0, p_even, p_odd)).astype(np.int64)
    x.reshape(-1, 8, 8)[z == 1, :2, :2] = 1.0  # the bright corner patch
    perm = rng.permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    return {"x": x, "y": y, "z": z, "train": np.sort(perm[n_test:]), "test": np.sort(perm[:n_test])}


def _layer_output(model: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """Output of ``layer`` on ``x``, as modified by any erasure hook installed before."""
    module = dict(model.named_modules())[layer]
    out: Dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda m, i, o: out.__setitem__("f", o.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return out["f"]


def _heldout_probe(f_tr: np.ndarray, z_tr: np.ndarray, f_te: np.ndarray, z_te: np.ndarray) -> float:
    """Held-out accuracy of a logistic regression (scikit-learn, L2, C=1) for z on features."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(z_tr)) < 2:
        return float(np.mean(z_te == z_tr[0]))
    clf = LogisticRegression(max_iter=5000).fit(f_tr, z_tr)
    return float(clf.score(f_te, z_te))


def _train(
    data: Dict[str, np.ndarray],
    when: Optional[str],
    epochs: int,
    out_dir: str,
    seed: int,
    batch_size: int,
) -> Dict[str, Any]:
    """Train the digits MLP (with ``ConceptErasure(when=when)`` unless ``when`` is None)."""

    x, y, z, tr, te = (data[k] for k in ("x", "y", "z", "train", "test"))
    L.seed_everything(seed, verbose=False)
    ds = TensorDataset(torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), torch.from_numpy(z[tr]))
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen)
    model = DigitsMLP()
    name = when or "baseline"
    callbacks = []
    cb = None
    if when is not None:
        # batches are (x, y, z): the concept is tuple position 2
        cb = ConceptErasure(layers=[LAYER], concept=2, when=when, progress=False)
        callbacks.append(cb)
    logger = L.pytorch.loggers.TensorBoardLogger(out_dir, name=f"erasure_demo/{name}")
    seconds = fit_demo(model, loader, callbacks, logger, epochs)
    model.eval()
    if cb is not None:
        cb.install(model)  # Trainer teardown removed the hooks; the fitted erasers are kept
    try:
        xt = torch.from_numpy(x)
        feats = _layer_output(model, LAYER, xt).numpy()
        with torch.no_grad():
            pred = model(xt).argmax(1).numpy()
    finally:
        if cb is not None:
            cb.remove()
    row: Dict[str, Any] = {
        "run": name,
        "when": when,
        "task_acc": float((pred[te] == y[te]).mean()),
        "heldout_probe_acc": _heldout_probe(feats[tr], z[tr], feats[te], z[te]),
        "seconds": seconds,
        "log_dir": logger.log_dir,
    }
    if cb is not None:
        last = cb.history[-1]
        info = last["layers"][LAYER]
        row.update(
            fit_epoch=last["epoch"],
            n_fits=len(cb.history),
            probe_acc_before=info["probe_acc_before"],
            probe_acc_after=info["probe_acc_after"],
            majority_rate=info["majority_rate"],
            edit_norm=info["edit_norm"],
            rank=info["rank"],
            trace_mix=info["trace_mix"],
            metrics=dict(cb.metrics),
            erasure_dir=cb.out_dir,
        )
    return row


def run_erasure_demo(
    epochs: int = 40,
    out_dir: str = "demo_runs",
    seed: int = 0,
    verbose: bool = True,
    modes: Sequence[str] = WHEN,
    batch_size: int = 64,
    p_even: float = 0.9,
    p_odd: float = 0.1,
) -> Dict[str, Any]:
    """Train the digits MLP without and with :class:`ConceptErasure`; print and return the table.

    Args:
        epochs: training epochs of each run.
        out_dir: folder of the TensorBoard logs and the callback's files.
        seed: seed of the data (patch, split), the model initialisation and the shuffling.
        verbose: print the table.
        modes: the ``when`` modes to run after the baseline (any of ``"fit_start"``,
            ``"every_epoch"``, ``"fit_end"``).
        batch_size: training batch size.
        p_even, p_odd: probability of the patch on even / odd digits.

    Returns:
        ``runs``: ``{"baseline" | when: row}``, each row with ``task_acc`` and
        ``heldout_probe_acc`` (final model, held-out split) and, for the erasure runs, the
        callback's ``probe_acc_before``, ``probe_acc_after``, ``majority_rate``, ``edit_norm``,
        ``rank``, ``trace_mix`` at its last fit (``fit_epoch``, ``n_fits``), its logged
        ``metrics`` and ``erasure_dir``; plus ``layer``, ``n_train``, ``n_test``,
        ``train_prevalence``, ``heldout_constant`` (held-out accuracy of the constant prediction of
        the training split's majority class), ``seconds``.
    """
    bad = [m for m in modes if m not in WHEN]
    if bad:
        raise ValueError(f"modes={list(modes)!r}: unknown {bad}; use any of {', '.join(WHEN)}.")
    if epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be >= 1.")
    require_sklearn("The erasure demo")
    t0 = time.perf_counter()
    data = load_digits_patched(seed, p_even, p_odd)
    z_tr, z_te = data["z"][data["train"]], data["z"][data["test"]]
    runs: Dict[str, Dict[str, Any]] = {}
    with quiet_single_thread():
        for when in (None, *modes):
            row = _train(data, when, epochs, out_dir, seed, batch_size)
            runs[row["run"]] = row
    result = {
        "runs": runs,
        "layer": LAYER,
        "epochs": epochs,
        "n_train": len(z_tr),
        "n_test": len(z_te),
        "train_prevalence": float(z_tr.mean()),
        # what a constant probe trained on the training split scores on the held-out split
        "heldout_constant": float(np.mean(z_te == int(z_tr.mean() > 0.5))),
        "p_even": p_even,
        "p_odd": p_odd,
        "seconds": time.perf_counter() - t0,
        "out_dir": os.path.abspath(out_dir),
        "report": write_demo_report(os.path.join(out_dir, "erasure_demo")),
    }
    if verbose:
        _print_report(result)
    return result


def _print_report(r: Dict[str, Any]) -> None:
    print(
        f"\ndigits with a bright 2x2 corner patch on {r['p_even']:.0%} of the even and "
        f"{r['p_odd']:.0%} of the odd images; concept z = patch present "
        f"({r['train_prevalence']:.1%} of the {r['n_train']} training images). "
        f"ConceptErasure on layer {r['layer']!r}, {r['epochs']} epochs per run."
    )
    print(
        "\n             | callback's probe for z at its last fit |   final model, held-out split"
        f"\n{'run':<12} | {'epoch':>5} {'before':>7} {'after':>7} {'majority':>8}    "
        f"| {'probe z':>7} {'constant':>8} {'digit acc':>9}"
    )
    print("-" * 76)
    for name, row in r["runs"].items():
        if row["when"] is None:
            left = f"{'-':>5} {'-':>7} {'-':>7} {'-':>8}   "
        else:
            left = (
                f"{row['fit_epoch']:>5} {row['probe_acc_before']:>7.3f} "
                f"{row['probe_acc_after']:>7.3f} {row['majority_rate']:>8.3f}   "
            )
        print(
            f"{name:<12} | {left} | {row['heldout_probe_acc']:>7.3f} "
            f"{r['heldout_constant']:>8.3f} {row['task_acc']:>9.3f}"
        )
    print(
        "\n'before'/'after': the callback's in-sample linear probe on the rows it fitted the eraser"
        "\non (fit_start: the initial model; every_epoch: the last epoch's training activations;"
        "\nfit_end: the trained model). 'after' at the majority rate = no linear classifier beats a"
        "\nconstant there. The held-out columns use the final model with the erasers installed; the"
        "\nbaseline's digit accuracy is the accuracy without erasure. An eraser fitted before the"
        "\nend stays fixed while the layers below keep training, so the final layer may encode z"
        "\nagain (probe z above the majority rate); fit_end erases the final representation."
    )
    print(f"\nTook {r['seconds']:.1f} s. Logs and erasers.pt / history.json: {r['out_dir']}")
    print(f"Open the curves: tensorboard --logdir {os.path.join(r['out_dir'], 'erasure_demo')}")
    if r.get("report"):
        print(f"Report: open {r['report']}")
