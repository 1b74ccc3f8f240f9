"""Demo: end-of-training influence functions on scikit-learn's digits with 10 % flipped labels.

The data and the model are those of the TracIn demo: the digits are split into a training set
(80 %, noisy labels: 10 % of all labels are flipped to another class) and a validation set (20 %,
true labels) that serves as the ``queries``. The digits MLP is trained with the Trainer; when the
fit ends, one :class:`~lightning_memo.InfluenceAnalysis` callback per method (EK-FAC, K-FAC,
Arnoldi, and the exact damped Hessian of the last layer) computes self-influence and the
query x train scores (``method="all"`` also records TracIn in the same fit).

The demo prints how well each method's self-influence finds the flipped training samples (AUROC
with torchmetrics, recall in the top 10 %, the same for self-influence divided by the RelatIF norm
``||(H + damping I)^{-1} g||``, seconds taken), next to the loss and margin baselines of the final
model. It writes ``<out_dir>/influence_proponents.png``: one row per validation image, the query
followed by its top-5 proponents and top-5 opponents under the first method run (EK-FAC for
``"all"``), each captioned with its label; flipped training samples carry a red frame.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .callbacks.influence import InfluenceAnalysis
from .data import IndexedDataset, load_digits_flipped
from .demo import DigitsMLP, _auroc, fit_demo
from .demo_erasure import _quiet_single_thread
from .demo_tracin import _per_sample_loss, _save_png, _TimedTracIn, proponents_figure

__all__ = ["run_influence_demo", "DEMO_METHODS"]

PNG_NAME = "influence_proponents.png"
DEMO_METHODS = ("ekfac", "kfac", "arnoldi", "exact")
CHOICES = (*DEMO_METHODS, "all")
EXACT_LAYER = "net.4"  # the exact Hessian is built for the last Linear layer only (2,570 params)
LABELS = {
    "ekfac": "EK-FAC",
    "kfac": "K-FAC",
    "arnoldi": "Arnoldi",
    "exact": f"exact Hessian ({EXACT_LAYER})",
    "tracin": "TracIn (checkpoints)",
}
K_SHOW = 5  # proponents / opponents per query in the picture


class _TimedInfluence(InfluenceAnalysis):
    """InfluenceAnalysis that adds the wall time of each :meth:`run` to ``self.seconds``."""

    seconds: float = 0.0

    def run(self, *args: Any, **kwargs: Any) -> InfluenceAnalysis:
        t0 = time.perf_counter()
        try:
            return super().run(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


def _recall_top(score: np.ndarray, target: np.ndarray, share: float = 0.1) -> float:
    """Share of the positives found among the ``ceil(share * N)`` highest scores."""
    n_top = max(1, math.ceil(share * len(score)))
    top = np.argsort(-score, kind="stable")[:n_top]
    return float(target[top].sum() / max(1, target.sum()))


def _margin(model: L.LightningModule, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Logit of the (training) label minus the largest other logit: (N,)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        model.train(was_training)
    own = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return (own - other).numpy()


def _methods(method: str) -> List[str]:
    if method not in CHOICES:
        raise ValueError(f"method={method!r}: use one of {list(CHOICES)}.")
    return list(DEMO_METHODS) if method == "all" else [method]


def run_influence_demo(
    method: str = "all",
    epochs: int = 40,
    out_dir: str = "demo_runs",
    seed: int = 0,
    verbose: bool = True,
    lr: float = 3e-3,
    hidden: int = 256,
    damping: Optional[float] = None,
    arnoldi_dim: int = 100,
    arnoldi_k: int = 50,
    max_examples: int = 1000,
    tracin: Optional[bool] = None,
    val_fraction: float = 0.2,
    n_show: int = 4,
    batch_size: int = 64,
) -> Dict[str, Any]:
    """Train the digits MLP with :class:`~lightning_memo.InfluenceAnalysis`; print and return the
    results.

    Args:
        method: ``"ekfac"``, ``"kfac"``, ``"arnoldi"``, ``"exact"`` (damped Hessian of the last
            layer, ``net.4``) or ``"all"`` (the four, plus TracIn).
        epochs: training epochs (Adam, ``lr``). With lr 3e-3 the MLP fits most flipped labels
            within 40 epochs, as in the TracIn demo.
        out_dir: folder of the TensorBoard logs, the influence files and the PNG.
        seed: seed of the label flips, the split, the model initialisation, the shuffling, the
            Arnoldi start vector, the Fisher label sampling and the TracIn projection.
        verbose: print the report.
        lr: Adam learning rate.
        hidden: width of the MLP's two hidden layers (256: 85,002 parameters).
        damping: ``InfluenceAnalysis(damping=...)`` for every method; ``None``: the callback's
            default, 0.1 x the mean eigenvalue (per layer for K-FAC / EK-FAC).
        arnoldi_dim, arnoldi_k: Krylov iterations and eigenpairs kept (``"arnoldi"``); 100 and 50
            here (the callback's defaults are 200 and 50) to keep the demo short.
        max_examples: training samples used to fit the curvature (the first ones).
        tracin: also record TracIn self-influence in the same fit (projected to 1024, a checkpoint
            every ``max(1, epochs // 10)`` epochs); ``None``: only with ``method="all"``.
        val_fraction: share of the digits held out as the (clean) validation / query set.
        n_show: validation images drawn in the PNG (the first ones of the validation split).
        batch_size: training batch size (also the batch size of the influence passes).

    Returns:
        ``rows`` (one per score: ``score`` name, ``key`` (method or ``"loss"`` / ``"margin"``),
        ``auroc``, ``recall`` (share of the flipped samples among the top 10 % scores),
        ``auroc_relatif`` / ``recall_relatif`` (self-influence / hinv_norm; NaN for baselines
        and TracIn), ``seconds`` (NaN for baselines)), ``methods``, ``self_influence`` and
        ``hinv_norm`` (``{method: (N,)}``), ``damping_used``, ``reused``, ``out_dirs``
        (``{method: folder}``), ``flipped`` (N,) bool, ``final_loss``, ``margin`` (N,),
        ``top5`` (``{method: {proponent_label_share, proponent_flipped_share,
        opponent_flipped_share}}`` over all queries' top-5 lists), ``examples`` (per shown
        query: proponents / opponents with training indices, labels, flipped flags and scores,
        under ``png_method``), ``png``, ``pngs`` (``{method: path}``),
        ``fit_seconds`` (the whole ``trainer.fit``, influence included), ``train_seconds``
        (without the influence runs), ``tracin_seconds``, ``log_dir``, sizes and settings.
    """
    methods = _methods(method)
    if epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be >= 1.")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} must lie in (0, 1).")
    with_tracin = method == "all" if tracin is None else bool(tracin)
    every = max(1, epochs // 10)
    x, y_noisy, y_true, flipped_all = load_digits_flipped(0.1, seed)
    perm = np.random.default_rng(seed).permutation(len(y_true))
    n_val = int(round(val_fraction * len(y_true)))
    val, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    x_tr, y_tr = torch.from_numpy(x[tr]), torch.from_numpy(y_noisy[tr])
    flipped = flipped_all[tr]
    x_val, y_val = torch.from_numpy(x[val]), torch.from_numpy(y_true[val])

    with _quiet_single_thread():
        L.seed_everything(seed, verbose=False)
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            IndexedDataset(TensorDataset(x_tr, y_tr)),
            batch_size=batch_size,
            shuffle=True,
            generator=gen,
        )
        queries = DataLoader(TensorDataset(x_val, y_val), batch_size=256)
        logger = L.pytorch.loggers.TensorBoardLogger(out_dir, name="influence_demo")
        base = os.path.join(logger.log_dir, "lightning_memo", "influence")
        analyses: Dict[str, _TimedInfluence] = {}
        for m in methods:
            analyses[m] = _TimedInfluence(
                method=m,
                layers=[EXACT_LAYER] if m == "exact" else None,
                queries=queries,
                damping=damping,
                arnoldi_dim=arnoldi_dim,
                arnoldi_k=arnoldi_k,
                max_examples=max_examples,
                top_k=K_SHOW,
                image_shape=(8, 8),
                n_show=n_show,
                output_dir=os.path.join(base, m),
                progress=False,
                seed=seed,
            )
        callbacks: List[Any] = []
        tr_cb = None
        if with_tracin:
            tr_cb = _TimedTracIn(
                projection_dim=1024,
                every_n_epochs=every,
                top_k=K_SHOW,
                seed=seed,
                store_dtype=torch.float16,
                image_shape=(8, 8),
                progress=False,
            )
            callbacks.append(tr_cb)
        callbacks += list(analyses.values())
        model = DigitsMLP(hidden=hidden, lr=lr)
        fit_s = fit_demo(model, loader, callbacks, logger, epochs)
        final_loss = _per_sample_loss(model, x_tr, y_tr)
        margin = _margin(model, x_tr, y_tr)
        with torch.no_grad():
            fitted = (model(x_tr).argmax(1) == y_tr).numpy()

    n_flip = int(flipped.sum())
    rows: List[Dict[str, Any]] = []

    def add(name: str, key: str, score: np.ndarray, seconds: float, rel: Any = None) -> None:
        rows.append(
            {
                "score": name,
                "key": key,
                "auroc": _auroc(score, flipped),
                "recall": _recall_top(score, flipped),
                "auroc_relatif": float("nan") if rel is None else _auroc(rel, flipped),
                "recall_relatif": float("nan") if rel is None else _recall_top(rel, flipped),
                "seconds": seconds,
            }
        )

    self_inf, norms = {}, {}
    for m, a in analyses.items():
        self_inf[m] = a.self_influence.numpy()
        norms[m] = a.hinv_norm.numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(norms[m] > 0, self_inf[m] / norms[m], 0.0)
        add(f"{LABELS[m]} self-influence", m, self_inf[m], a.seconds, rel)
    tracin_s = float("nan")
    if tr_cb is not None:
        tracin_s = tr_cb.seconds
        self_inf["tracin"] = tr_cb.self_influence.cpu().numpy()
        add(f"{LABELS['tracin']} self-influence", "tracin", self_inf["tracin"], tracin_s)
    add(f"loss, final model (epoch {epochs})", "loss", final_loss, float("nan"))
    add(f"-margin, final model (epoch {epochs})", "margin", -margin, float("nan"))

    # proponents / opponents of every query: label agreement, flipped samples
    y_val_np = y_val.numpy()
    lists: Dict[str, Dict[str, float]] = {}
    for m, a in analyses.items():
        pro = torch.topk(a.scores, K_SHOW, dim=1).indices.numpy()
        opp = torch.topk(-a.scores, K_SHOW, dim=1).indices.numpy()
        lists[m] = {
            "proponent_label_share": float((y_tr.numpy()[pro] == y_val_np[:, None]).mean()),
            "proponent_flipped_share": float(flipped[pro].mean()),
            "opponent_flipped_share": float(flipped[opp].mean()),
        }

    # the pictures: proponents / opponents of the first n_show queries
    os.makedirs(out_dir, exist_ok=True)
    y_tr_np = y_tr.numpy()
    pngs: Dict[str, str] = {}
    examples: List[Dict[str, Any]] = []
    img = None
    for i, (m, a) in enumerate(analyses.items()):
        exs = _examples(a, val, y_true, y_tr_np, flipped, n_show)
        im = proponents_figure(x_val.numpy(), x_tr.numpy(), exs)
        name = PNG_NAME if i == 0 else PNG_NAME.replace(".png", f"_{m}.png")
        path = os.path.join(out_dir, name)
        backend = _save_png(im, path)
        pngs[m] = os.path.abspath(path)
        if i == 0:
            examples, img = exs, im
    assert img is not None

    result = {
        "rows": rows,
        "methods": methods,
        "epochs": epochs,
        "lr": lr,
        "hidden": hidden,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "damping": damping,
        "arnoldi_dim": arnoldi_dim,
        "arnoldi_k": arnoldi_k,
        "max_examples": max_examples,
        "n_train": len(tr),
        "n_val": len(val),
        "n_flipped": n_flip,
        "fitted_flipped": float(fitted[flipped].mean()) if n_flip else float("nan"),
        "self_influence": self_inf,
        "hinv_norm": norms,
        "damping_used": {m: _damping_used(a) for m, a in analyses.items()},
        "top5": lists,
        "reused": {m: dict(a.reused) for m, a in analyses.items()},
        "out_dirs": {m: a.out_dir for m, a in analyses.items()},
        "final_loss": final_loss,
        "margin": margin,
        "flipped": flipped,
        "examples": examples,
        "png_method": methods[0],
        "png": pngs[methods[0]],
        "pngs": pngs,
        "png_shape": tuple(img.shape),
        "png_backend": backend,
        "fit_seconds": fit_s,
        "train_seconds": fit_s - sum(a.seconds for a in analyses.values()),
        "tracin_seconds": tracin_s,
        "tracin_every_n_epochs": every if tr_cb is not None else None,
        "log_dir": logger.log_dir,
    }
    if verbose:
        _print_report(result)
    return result


def _damping_used(a: InfluenceAnalysis) -> Any:
    """The damping a method used: a float, or ``{layer: float}`` for K-FAC / EK-FAC."""
    est = a.estimator
    kfac = getattr(est, "kfac", None)
    if kfac is not None:
        return {n: kfac.layer_damping(n) for n in kfac.dims}
    return getattr(est, "damping", None)


def _examples(
    a: InfluenceAnalysis,
    val: np.ndarray,
    y_true: np.ndarray,
    y_tr: np.ndarray,
    flipped: np.ndarray,
    n_show: int,
) -> List[Dict[str, Any]]:
    """Per shown query: its top-K_SHOW proponents / opponents with labels and flipped flags."""
    out = []
    for q in range(min(n_show, len(val))):
        res = a.top_k_for(q, K_SHOW)
        out.append(
            {
                "query": q,
                "digits_index": int(val[q]),
                "label": int(y_true[val[q]]),
                **res,
                "proponent_labels": y_tr[res["proponents"]],
                "opponent_labels": y_tr[res["opponents"]],
                "proponent_flipped": flipped[res["proponents"]],
                "opponent_flipped": flipped[res["opponents"]],
            }
        )
    return out


# --------------------------------------------------------------------------- report
def _fmt(v: float, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _print_report(r: Dict[str, Any]) -> None:
    print(
        f"\ndigits: {r['n_train']} training images, {r['n_flipped']} of them with a flipped label; "
        f"{r['n_val']} validation images (true labels) as queries. MLP 64-{r['hidden']}-"
        f"{r['hidden']}-10 ({r['n_parameters']} parameters), Adam lr {r['lr']:g}, {r['epochs']} "
        f"epochs: at the end it fits {r['fitted_flipped']:.0%} of the flipped labels."
    )
    tr = (
        f" (TracIn's hooks: {r['tracin_seconds']:.1f} s)"
        if not math.isnan(r["tracin_seconds"])
        else ""
    )
    damp = "0.1 x mean eigenvalue" if r["damping"] is None else f"{r['damping']:g}"
    print(
        f"Training: {r['train_seconds']:.1f} s{tr}. Influence at the end of the fit, curvature "
        f"from the first {r['max_examples']} training samples, damping {damp}"
        + (
            f", Arnoldi {r['arnoldi_dim']} iterations / top {r['arnoldi_k']} eigenpairs"
            if "arnoldi" in r["methods"]
            else ""
        )
        + "."
    )
    print(
        f"\nFinding the {r['n_flipped']} flipped training labels (higher score = flipped; recall "
        "= share of them\nin the top 10 % of the scores; SI/norm = self-influence / "
        "||(H + damping I)^-1 g||, RelatIF's normaliser):"
    )
    head = (
        f"{'score':<40} {'AUROC':>6} {'recall@10%':>10} {'seconds':>8}   "
        f"{'SI/norm AUROC':>13} {'recall@10%':>10}"
    )
    print(head)
    for row in r["rows"]:
        print(
            f"{row['score']:<40} {row['auroc']:>6.3f} {row['recall']:>10.2f} "
            f"{_fmt(row['seconds'], '8.1f'):>8}   {_fmt(row['auroc_relatif'], '.3f'):>13} "
            f"{_fmt(row['recall_relatif'], '.2f'):>10}"
        )
    for m, d in r["damping_used"].items():
        if isinstance(d, dict):
            d = ", ".join(f"{n} {v:.2e}" for n, v in d.items())
        elif d is not None:
            d = f"{d:.2e}"
        print(f"  damping used by {LABELS[m]}: {d}")
    print(
        f"\nTop-{K_SHOW} proponents / opponents of all {r['n_val']} queries: share of the "
        "proponents\nwith the query's label, share of flipped samples in each list:"
    )
    print(f"  {'method':<28} {'pro. same label':>15} {'pro. flipped':>12} {'opp. flipped':>12}")
    for m, t in r["top5"].items():
        print(
            f"  {LABELS[m]:<28} {t['proponent_label_share']:>15.0%} "
            f"{t['proponent_flipped_share']:>12.0%} {t['opponent_flipped_share']:>12.0%}"
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
            f"  {LABELS[r['png_method']]}, query {ex['query']} (label {ex['label']}): "
            f"proponents' labels {pro} | opponents' labels {opp}"
        )
    if r["examples"]:
        print("  (* = flipped label)")
    print(
        f"\nPicture ({r['png_shape'][1]}x{r['png_shape'][0]} px, {LABELS[r['png_method']]}): "
        f"{r['png']}\n  each row: the query, its {K_SHOW} proponents, its {K_SHOW} opponents; "
        "caption = label (training label for\n  training samples); red frame = flipped training "
        "label."
    )
    others = [p for m, p in r["pngs"].items() if m != r["png_method"]]
    if others:
        print("  The same for the other methods: " + ", ".join(os.path.basename(p) for p in others))
    _print_dirs(r["out_dirs"])
    print(f"Open the pictures: tensorboard --logdir {os.path.dirname(r['log_dir'])}")


def _print_dirs(dirs: Dict[str, Optional[str]]) -> None:
    first = next((p for p in dirs.values() if p), None)
    if first is not None:
        print(
            "Influence files (self_influence.csv, top_k.csv, factors.pt, scores.pt, config.json), "
            f"one folder per method: {os.path.dirname(first)}/<method>"
        )
