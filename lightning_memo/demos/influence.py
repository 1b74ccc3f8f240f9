"""Demo: influence functions at the end of training, on data with 10 % flipped labels.

Two shipped datasets (scikit-learn): ``"digits"`` (8x8 images, 10 classes; the TracIn demo's data
and MLP) and ``"breast_cancer"`` (30 standardised features, 2 classes, a small MLP). Each is split
into a training set (80 %, noisy labels: 10 % of all labels are flipped to another class) and a
validation set (20 %, true labels) that serves as the ``queries``. The MLP is trained with the
Trainer; when the fit ends, one :class:`~lightning_memo.InfluenceAnalysis` callback per method
computes self-influence (and the query x train scores where the method has them).
``method="all"`` runs every method of the package: EK-FAC, K-FAC, Arnoldi, the exact damped
Hessian of the last layer, RelatIF (on EK-FAC), random projection, representer points (L2 refit
and local Jacobian expansion), boundary influence (minus the DeepFool distance to the decision
boundary) and geometric-ensemble influence (GEX), and records TracIn in the same fit.

The demo prints how well each method's self-influence finds the flipped training samples (AUROC
from ranks, recall in the top 10 %, seconds taken; for the four Hessian methods also
self-influence divided by the RelatIF norm ``||(H + damping I)^{-1} g||``), next to the loss and
margin baselines of the final model. It writes ``<out_dir>/influence_methods.png`` (a bar chart
of AUROC and recall per method, the baselines as lines) and, for digits,
``<out_dir>/influence_proponents.png``: one row per validation image, the query followed by its
top-5 proponents and top-5 opponents under the first method run (EK-FAC for ``"all"``), each
captioned with its label; flipped training samples carry a red frame.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import torch

from ..callbacks.influence import InfluenceAnalysis
from ..influence.registry import METHODS
from ..viz import save_png
from ._common import (
    DigitsMLP,
    TimedTracIn,
    auroc,
    fit_demo,
    flip_labels,
    flipped_split,
    load_digits_flipped,
    per_sample_loss,
    proponents_figure,
    quiet_single_thread,
    recall_top,
    require_sklearn,
    write_demo_report,
)

__all__ = [
    "run_influence_demo",
    "methods_chart",
    "load_breast_cancer_flipped",
    "DEMO_METHODS",
    "DATASETS",
]

PNG_NAME = "influence_proponents.png"
CHART_NAME = "influence_methods.png"
DATASETS = ("digits", "breast_cancer")
#: the methods with a Hessian that ``method="all"`` runs
HESSIAN_DEMO = ("ekfac", "kfac", "arnoldi", "exact")
#: every method with a Hessian (its damping is set; its self-influence / hinv_norm is printed too)
WITH_HESSIAN = (*HESSIAN_DEMO, "cg")
#: every method ``method="all"`` runs, in this order (TracIn is recorded in the same fit)
DEMO_METHODS = (
    *HESSIAN_DEMO,
    "relatif",
    "randproj",
    "representer",
    "representer_lje",
    "boundary",
    "gex",
)
#: what ``method=`` takes: any method of the registry, or "all"
CHOICES = (*METHODS, "all")
EXACT_LAYER = "net.4"  # the exact Hessian (and CG's) is built for the last Linear layer only
#: GEX settings of the demo. GEX's own defaults (ft_lr 0.05, 800 steps per member) are for deep
#: CIFAR networks; on these MLPs 8 members of 50 cosine-scheduled SGD steps (about 2 epochs of
#: digits each) take under a second. ft_lr 0.2 is the largest of 0.05 / 0.1 / 0.2 / 0.3 at which
#: the members do not diverge on digits (at 0.3 they fall to chance accuracy); at 0.2 they stop
#: fitting the flipped labels (training accuracy about 0.9), which is what makes those stand out.
#: docs/benchmarks_flipped.md gives the AUROC at each ft_lr.
GEX_DEMO: Dict[str, Any] = {"num_ens": 8, "ft_step": 50, "ft_lr": 0.2}
DATASET_DEFAULTS: Dict[str, Dict[str, int]] = {
    # digits: 40 epochs of Adam lr 3e-3 fit about 3/4 of the flipped labels (the TracIn demo's)
    "digits": {"epochs": 40, "hidden": 256},
    # breast cancer: 569 samples; a 30-64-64-2 MLP fits about 2/3 of the flips in 40 epochs
    # (the 256-wide one fits 93 % and its loss no longer finds them)
    "breast_cancer": {"epochs": 40, "hidden": 64},
}
LABELS = {
    "ekfac": "EK-FAC",
    "kfac": "K-FAC",
    "arnoldi": "Arnoldi",
    "exact": f"exact Hessian ({EXACT_LAYER})",
    "cg": f"CG Hessian ({EXACT_LAYER})",
    "relatif": "RelatIF (EK-FAC)",
    "randproj": "random projection",
    "representer": "representer points",
    "representer_lje": "representer points (LJE)",
    "boundary": "boundary (-distance)",
    "gex": "GEX (geometric ensemble)",
    "tracin": "TracIn (checkpoints)",
    "loss": "loss (final model)",
    "margin": "-margin (final model)",
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


def _label(key: str) -> str:
    """The printed name of a method or baseline (its registry name when the demo has none)."""
    return LABELS.get(key, key)


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


# --------------------------------------------------------------------------- data
def load_breast_cancer_flipped(
    flip_fraction: float = 0.1, seed: int = 0
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's breast cancer data (569 samples, 30 features, 2 classes), each feature
    standardised over all samples (the labels play no part), with a seeded share of the labels
    flipped to the other class.

    Returns:
        x: (n, 30) float32; y_noisy: (n,) int64 training labels; y_true: (n,) int64;
        flipped: (n,) bool.
    """
    require_sklearn("load_breast_cancer_flipped")
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = data.data.astype(np.float64)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    y_true = data.target.astype(np.int64)
    y_noisy, flipped = flip_labels(y_true, 2, flip_fraction, seed)  # two classes: 1 - y
    return x, y_noisy, y_true, flipped


def _load(dataset: str, seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    if dataset == "digits":
        return (*load_digits_flipped(0.1, seed), 10)
    return (*load_breast_cancer_flipped(0.1, seed), 2)


def _analysis_options(m: str, projection_dim: int, gex_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """The per-method arguments of InfluenceAnalysis in the demo."""
    if m in ("exact", "cg"):
        return {"layers": [EXACT_LAYER]}
    if m == "relatif":
        return {"relatif_base": "ekfac"}
    if m == "randproj":
        return {"method_kwargs": {"projection_dim": projection_dim}}
    if m == "gex":
        return {"method_kwargs": dict(gex_kwargs)}
    return {}


# --------------------------------------------------------------------------- the demo
def run_influence_demo(
    method: str = "all",
    epochs: Optional[int] = None,
    out_dir: str = "demo_runs",
    seed: int = 0,
    verbose: bool = True,
    lr: float = 3e-3,
    hidden: Optional[int] = None,
    damping: Optional[float] = None,
    arnoldi_dim: int = 100,
    arnoldi_k: int = 50,
    max_examples: int = 1000,
    tracin: Optional[bool] = None,
    val_fraction: float = 0.2,
    n_show: int = 4,
    batch_size: int = 64,
    dataset: str = "digits",
    gex_kwargs: Optional[Mapping[str, Any]] = None,
    projection_dim: int = 1024,
    chart: bool = True,
) -> Dict[str, Any]:
    """Train the demo MLP with :class:`~lightning_memo.InfluenceAnalysis`; print and return the
    results.

    Args:
        method: a method of the registry, ``lightning_memo.influence.registry.METHODS``
            (``"exact"`` and ``"cg"``: damped Hessian of the last layer, ``net.4``, solved
            directly / by conjugate gradients; ``"relatif"``: on EK-FAC), or ``"all"``: every
            one of :data:`DEMO_METHODS`, plus TracIn.
        epochs: training epochs (Adam, ``lr``); ``None``: 40 for both datasets. With lr 3e-3 the
            MLP fits most flipped labels within 40 epochs, as in the TracIn demo.
        out_dir: folder of the TensorBoard logs, the influence files and the PNGs.
        seed: seed of the label flips, the split, the model initialisation, the shuffling, the
            Arnoldi start vector, the Fisher label sampling, the projections and GEX's data order.
        verbose: print the report.
        lr: Adam learning rate.
        hidden: width of the MLP's two hidden layers; ``None``: 256 for digits (85,002
            parameters), 64 for breast_cancer (6,274 parameters).
        damping: ``InfluenceAnalysis(damping=...)`` for every Hessian method; ``None``: the
            callback's default, 0.1 x the mean eigenvalue (per layer for K-FAC / EK-FAC).
        arnoldi_dim, arnoldi_k: Krylov iterations and eigenpairs kept (``"arnoldi"``); 100 and 50
            here (the callback's defaults are 200 and 50) to keep the demo short.
        max_examples: training samples used to fit the curvature (the first ones).
        tracin: also record TracIn self-influence in the same fit (projected to 1024, a checkpoint
            every ``max(1, epochs // 10)`` epochs); ``None``: only with ``method="all"``.
        val_fraction: share of the data held out as the (clean) validation / query set.
        n_show: validation samples shown (drawn in the PNG for digits).
        batch_size: training batch size (also the batch size of the influence passes).
        dataset: ``"digits"`` or ``"breast_cancer"``.
        gex_kwargs: GEX's ``method_kwargs``; ``None``: :data:`GEX_DEMO` (8 members of 50 steps,
            ft_lr 0.2).
        projection_dim: randproj's projection size.
        chart: write the bar chart ``<out_dir>/influence_methods.png`` (needs matplotlib; without
            it the chart is skipped with a note).

    Returns:
        ``rows`` (one per score: ``score`` name, ``key`` (method, ``"tracin"``, ``"loss"`` or
        ``"margin"``), ``auroc``, ``recall`` (share of the flipped samples among the top 10 %
        scores), ``auroc_relatif`` / ``recall_relatif`` (self-influence / hinv_norm for the
        Hessian methods; NaN otherwise), ``seconds`` (NaN for baselines), ``n_inf`` (infinite
        scores, ranked first / last)), ``methods``, ``dataset``, ``self_influence`` and
        ``hinv_norm`` (``{method: (N,)}``; hinv_norm NaN for methods without a Hessian),
        ``damping_used``, ``reused``, ``out_dirs`` (``{method: folder}``), ``flipped`` (N,)
        bool, ``final_loss``, ``margin`` (N,), ``top5`` (``{method: {proponent_label_share,
        proponent_flipped_share, opponent_flipped_share}}`` over all queries' top-5 lists, for
        the methods with query scores), ``examples`` (per shown query: proponents / opponents
        with training indices, labels, flipped flags and scores, under ``png_method``), ``png``
        / ``pngs`` (``{method: path}``; digits only, else ``None`` / ``{}``), ``chart`` (path or
        ``None``), ``fit_seconds`` (the whole ``trainer.fit``, influence included),
        ``train_seconds`` (without the influence runs), ``tracin_seconds``, ``model`` (the
        trained module), ``data`` (``x_train``, ``y_train``, ``x_val``, ``y_val`` tensors),
        ``log_dir``, sizes and settings.
    """
    methods = _methods(method)
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r}: use one of {list(DATASETS)}.")
    defaults = DATASET_DEFAULTS[dataset]
    epochs = defaults["epochs"] if epochs is None else epochs
    hidden = defaults["hidden"] if hidden is None else hidden
    if epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be >= 1.")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} must lie in (0, 1).")
    require_sklearn("The influence demo")
    gex_kwargs = dict(GEX_DEMO if gex_kwargs is None else gex_kwargs)
    with_tracin = method == "all" if tracin is None else bool(tracin)
    every = max(1, epochs // 10)
    x, y_noisy, y_true, flipped_all, n_classes = _load(dataset, seed)
    image_shape = (8, 8) if dataset == "digits" else None
    sp = flipped_split(x, y_noisy, y_true, flipped_all, val_fraction, seed, batch_size)
    tr, val, x_tr, y_tr, x_val, y_val, flipped, loader, queries = sp

    with quiet_single_thread():
        L.seed_everything(seed, verbose=False)
        run_name = "influence_demo" if dataset == "digits" else f"influence_demo_{dataset}"
        logger = L.pytorch.loggers.TensorBoardLogger(out_dir, name=run_name)
        base = os.path.join(logger.log_dir, "lightning_memo", "influence")
        analyses: Dict[str, _TimedInfluence] = {}
        for m in methods:
            analyses[m] = _TimedInfluence(
                method=m,
                queries=queries,
                damping=damping if m in (*WITH_HESSIAN, "relatif") else None,
                arnoldi_dim=arnoldi_dim,
                arnoldi_k=arnoldi_k,
                max_examples=max_examples,
                top_k=K_SHOW,
                image_shape=image_shape,
                n_show=n_show,
                output_dir=os.path.join(base, m),
                progress=False,
                seed=seed,
                **_analysis_options(m, projection_dim, gex_kwargs),
            )
        callbacks: List[Any] = []
        tr_cb = None
        if with_tracin:
            tr_cb = TimedTracIn(
                projection_dim=1024,
                every_n_epochs=every,
                top_k=K_SHOW,
                seed=seed,
                store_dtype=torch.float16,
                image_shape=image_shape,
                progress=False,
            )
            callbacks.append(tr_cb)
        callbacks += list(analyses.values())
        model = DigitsMLP(hidden=hidden, lr=lr, in_dim=x.shape[1], n_classes=n_classes)
        fit_s = fit_demo(model, loader, callbacks, logger, epochs)
        final_loss = per_sample_loss(model, x_tr, y_tr)
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
                "auroc": auroc(score, flipped),
                "recall": recall_top(score, flipped),
                "auroc_relatif": float("nan") if rel is None else auroc(rel, flipped),
                "recall_relatif": float("nan") if rel is None else recall_top(rel, flipped),
                "seconds": seconds,
                "n_inf": int(np.isinf(score).sum()),
            }
        )

    self_inf, norms = {}, {}
    for m, a in analyses.items():
        self_inf[m] = a.self_influence.numpy()
        norms[m] = a.hinv_norm.numpy()
        rel = None
        if m in WITH_HESSIAN:
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(norms[m] > 0, self_inf[m] / norms[m], 0.0)
        name = _label(m) + (" self-influence" if m != "boundary" else "")
        add(name, m, self_inf[m], a.seconds, rel)
    tracin_s = float("nan")
    if tr_cb is not None:
        tracin_s = tr_cb.seconds
        self_inf["tracin"] = tr_cb.self_influence.cpu().numpy()
        add(f"{LABELS['tracin']} self-influence", "tracin", self_inf["tracin"], tracin_s)
    add(f"loss, final model (epoch {epochs})", "loss", final_loss, float("nan"))
    add(f"-margin, final model (epoch {epochs})", "margin", -margin, float("nan"))

    # proponents / opponents of every query: label agreement, flipped samples
    scored = {m: a for m, a in analyses.items() if a.scores is not None}
    y_val_np, y_tr_np = y_val.numpy(), y_tr.numpy()
    lists: Dict[str, Dict[str, float]] = {}
    for m, a in scored.items():
        pro = torch.topk(a.scores, K_SHOW, dim=1).indices.numpy()
        opp = torch.topk(-a.scores, K_SHOW, dim=1).indices.numpy()
        lists[m] = {
            "proponent_label_share": float((y_tr_np[pro] == y_val_np[:, None]).mean()),
            "proponent_flipped_share": float(flipped[pro].mean()),
            "opponent_flipped_share": float(flipped[opp].mean()),
        }

    # the pictures: proponents / opponents of the first n_show queries (digits only)
    os.makedirs(out_dir, exist_ok=True)
    pngs: Dict[str, str] = {}
    examples: List[Dict[str, Any]] = []
    img, backend = None, None
    png_method = next(iter(scored), None)
    for i, (m, a) in enumerate(scored.items()):
        exs = _examples(a, val, y_true, y_tr_np, flipped, n_show)
        if i == 0:
            examples = exs
        if image_shape is None:
            continue
        im = proponents_figure(x_val.numpy(), x_tr.numpy(), exs)
        name = PNG_NAME if i == 0 else PNG_NAME.replace(".png", f"_{m}.png")
        path = os.path.join(out_dir, name)
        backend = save_png(im, path)
        pngs[m] = os.path.abspath(path)
        if i == 0:
            img = im

    result = {
        "rows": rows,
        "methods": methods,
        "dataset": dataset,
        "epochs": epochs,
        "lr": lr,
        "hidden": hidden,
        "n_features": int(x.shape[1]),
        "n_classes": n_classes,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "damping": damping,
        "arnoldi_dim": arnoldi_dim,
        "arnoldi_k": arnoldi_k,
        "max_examples": max_examples,
        "gex_kwargs": gex_kwargs,
        "projection_dim": projection_dim,
        "seed": seed,
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
        "png_method": png_method,
        "png": pngs.get(png_method) if png_method is not None else None,
        "pngs": pngs,
        "png_shape": tuple(img.shape) if img is not None else None,
        "png_backend": backend,
        "chart": None,
        "fit_seconds": fit_s,
        "train_seconds": fit_s - sum(a.seconds for a in analyses.values()),
        "tracin_seconds": tracin_s,
        "tracin_every_n_epochs": every if tr_cb is not None else None,
        "model": model,
        "data": {"x_train": x_tr, "y_train": y_tr, "x_val": x_val, "y_val": y_val},
        "log_dir": logger.log_dir,
        "report": write_demo_report(logger.log_dir, flipped),
    }
    if chart:
        path = os.path.join(out_dir, CHART_NAME)
        title = (
            f"{dataset}: finding the {n_flip} flipped labels among {len(tr)} training samples "
            f"(seed {seed})"
        )
        if methods_chart({dataset: rows}, path, title) is not None:
            result["chart"] = os.path.abspath(path)
    if verbose:
        _print_report(result)
    return result


def _damping_used(a: InfluenceAnalysis) -> Any:
    """The damping a Hessian method used: a float, or ``{layer: float}`` for K-FAC / EK-FAC
    (RelatIF: its base's); ``None`` for the methods without a Hessian."""
    est = getattr(a.estimator, "base", a.estimator)
    kfac = getattr(est, "kfac", None)
    if kfac is not None:
        return {n: kfac.layer_damping(n) for n in kfac.dims}
    if a.method not in (*WITH_HESSIAN, "relatif"):
        return None
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


# --------------------------------------------------------------------------- the chart
def _short(key: str) -> str:
    return {
        "exact": "exact (last layer)",
        "relatif": "RelatIF",
        "randproj": "randproj",
        "representer": "representer",
        "representer_lje": "representer LJE",
        "boundary": "boundary",
        "gex": "GEX",
        "tracin": "TracIn",
    }.get(key, LABELS.get(key, key))


def methods_chart(
    results: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str,
    title: str = "",
) -> Optional[str]:
    """Bar chart of the AUROC (top panel) and the top-10 % recall (bottom panel) per method, one
    bar per dataset (``results``: ``{dataset: rows}`` as in ``run_influence_demo``'s ``rows``),
    the ``"loss"`` / ``"margin"`` rows as dashed / dotted lines in the dataset's colour. Rows with
    ``auroc_std`` / ``recall_std`` get error bars (mean +- std over seeds).

    Returns the path, or ``None`` (with a printed note) when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no bar chart (pip install matplotlib).")
        return None
    names = list(results)
    keys: List[str] = []
    for rows in results.values():
        for r in rows:
            if r["key"] not in ("loss", "margin") and r["key"] not in keys:
                keys.append(r["key"])
    colours = [("tab:blue", "navy"), ("tab:orange", "saddlebrown"), ("tab:green", "darkgreen")]
    width = 0.8 / max(1, len(names))
    fig = Figure(figsize=(max(8.0, 0.75 * len(keys) + 4.5), 7.5), dpi=100)
    axes = fig.subplots(2, 1, sharex=True)
    xs = np.arange(len(keys))
    for ax, metric, label in ((axes[0], "auroc", "AUROC"), (axes[1], "recall", "recall@10%")):
        low = 1.0
        for j, name in enumerate(names):
            by_key = {r["key"]: r for r in results[name]}
            vals = np.array([by_key[k][metric] if k in by_key else np.nan for k in keys], float)
            err = [by_key[k].get(f"{metric}_std", np.nan) if k in by_key else np.nan for k in keys]
            err_arr = np.array(err, float)
            bar, line = colours[j % len(colours)]
            pos = xs - 0.4 + width * (j + 0.5)
            ax.bar(
                pos,
                vals,
                width,
                yerr=None if np.all(np.isnan(err_arr)) else np.nan_to_num(err_arr),
                capsize=2,
                color=bar,
                label=name,
            )
            for xp, v, e in zip(pos, vals, np.nan_to_num(err_arr)):
                if not np.isnan(v):
                    ax.text(xp, v + e + 0.005, f"{v:.2f}", ha="center", va="bottom", fontsize=6)
            for base, style in (("loss", "--"), ("margin", ":")):
                if base in by_key:
                    v = by_key[base][metric]
                    ax.axhline(
                        v, color=line, ls=style, lw=1.3, zorder=3, label=f"{name}: {base} {v:.2f}"
                    )
                    low = min(low, v)
            low = min(low, np.nanmin(vals) if np.any(~np.isnan(vals)) else low)
        if metric == "auroc":
            ax.set_ylim(max(0.0, min(0.5, low - 0.05)), 1.02)
        else:
            ax.set_ylim(0.0, 1.05)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[1].set_xticks(xs)
    axes[1].set_xticklabels([_short(k) for k in keys], rotation=35, ha="right", fontsize=8)
    if title:
        axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------- report
def _fmt(v: float, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _print_report(r: Dict[str, Any]) -> None:
    h = r["hidden"]
    arch = f"MLP {r['n_features']}-{h}-{h}-{r['n_classes']} ({r['n_parameters']} parameters)"
    if r["dataset"] == "digits":
        data = (
            f"digits: {r['n_train']} training images, {r['n_flipped']} of them with a flipped "
            f"label; {r['n_val']} validation images (true labels) as queries."
        )
    else:
        data = (
            f"breast_cancer: {r['n_train']} training samples ({r['n_features']} standardised "
            f"features), {r['n_flipped']} of them with a flipped label; {r['n_val']} validation "
            "samples (true labels) as queries."
        )
    print(
        f"\n{data} {arch}, Adam lr {r['lr']:g}, {r['epochs']} epochs: at the end it fits "
        f"{r['fitted_flipped']:.0%} of the flipped labels."
    )
    tr = (
        f" (TracIn's hooks: {r['tracin_seconds']:.1f} s)"
        if not math.isnan(r["tracin_seconds"])
        else ""
    )
    damp = "0.1 x mean eigenvalue" if r["damping"] is None else f"{r['damping']:g}"
    ms = r["methods"]
    extra = []
    if "arnoldi" in ms:
        extra.append(f"Arnoldi {r['arnoldi_dim']} iterations / top {r['arnoldi_k']} eigenpairs")
    if "randproj" in ms:
        extra.append(f"randproj k={r['projection_dim']}")
    if "gex" in ms:
        g = r["gex_kwargs"]
        extra.append("GEX " + ", ".join(f"{k}={v}" for k, v in g.items()))
    print(
        f"Training: {r['train_seconds']:.1f} s{tr}. Influence at the end of the fit, curvature "
        f"from the first {r['max_examples']} training samples, damping {damp}"
        + "".join(f", {e}" for e in extra)
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
    infs = [f"{row['score']}: {row['n_inf']}" for row in r["rows"] if row["n_inf"]]
    if infs:
        print("  infinite scores (ranked first / last): " + "; ".join(infs))
    for m, d in r["damping_used"].items():
        if isinstance(d, dict):
            d = ", ".join(f"{n} {v:.2e}" for n, v in d.items())
        elif d is not None:
            d = f"{d:.2e}"
        else:
            continue
        print(f"  damping used by {_label(m)}: {d}")
    if r["top5"]:
        print(
            f"\nTop-{K_SHOW} proponents / opponents of all {r['n_val']} queries: share of the "
            "proponents\nwith the query's label, share of flipped samples in each list:"
        )
        print(f"  {'method':<28} {'pro. same label':>15} {'pro. flipped':>12} {'opp. flipped':>12}")
        for m, t in r["top5"].items():
            print(
                f"  {_label(m):<28} {t['proponent_label_share']:>15.0%} "
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
            f"  {_label(r['png_method'])}, query {ex['query']} (label {ex['label']}): "
            f"proponents' labels {pro} | opponents' labels {opp}"
        )
    if r["examples"]:
        print("  (* = flipped label)")
    if r["png"] is not None:
        print(
            f"\nPicture ({r['png_shape'][1]}x{r['png_shape'][0]} px, {_label(r['png_method'])}): "
            f"{r['png']}\n  each row: the query, its {K_SHOW} proponents, its {K_SHOW} opponents; "
            "caption = label (training label for\n  training samples); red frame = flipped "
            "training label."
        )
        others = [p for m, p in r["pngs"].items() if m != r["png_method"]]
        if others:
            names = ", ".join(os.path.basename(p) for p in others)
            print(f"  The same for the other methods: {names}")
    if r["chart"] is not None:
        print(f"Bar chart (AUROC and recall@10% per method, baselines as lines): {r['chart']}")
    _print_dirs(r["out_dirs"])
    print(f"Open the pictures: tensorboard --logdir {os.path.dirname(r['log_dir'])}")


def _print_dirs(dirs: Dict[str, Optional[str]]) -> None:
    first = next((p for p in dirs.values() if p), None)
    if first is not None:
        print(
            "Influence files (self_influence.csv, top_k.csv, factors.pt, scores.pt, config.json), "
            f"one folder per method: {os.path.dirname(first)}/<method>"
        )
