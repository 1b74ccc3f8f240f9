"""Benchmark: predicting memorization early, with Dentan et al.'s protocol (ECAI 2025).

Writes ``docs/benchmarks_memorization.md``. Two settings, 10 % of the training labels flipped
(seeded), 3 seeds each:

* ``digits``: scikit-learn digits (1,797 8x8 images), the demos' MLP 64-256-256-10
  (``lightning_memo.demos._common.DigitsMLP``, Adam 1e-3, batch 64), 80 epochs (at 40 epochs
  the MLP fits only ~7 of the 180 flipped labels: too few positives; at 80 about 115). PSMI on
  ``net.3`` (output of the second ReLU: what the last Linear sees) and ``net.1`` (first hidden
  layer).
* ``minilm``: all-MiniLM-L6-v2 + a linear head on chatterbot topic sentences (19 topics;
  ``lightning_memo.demos.text``: ``TextClassifier``, ``Collate``, ``load_chatterbot_topics``,
  ``flip_labels``): 800 training sentences, ``max_length=32``, the top 2 encoder blocks and the
  head trained (AdamW 1e-4 / 2e-3, batch 32), 4 epochs. PSMI on every encoder block
  (``bert.encoder.layer.*``) and ``classifier:input`` (what the head sees), mean pooling over the
  attention mask.

**Ground truth.** At the end of training, a flipped sample that the model (eval mode) predicts
with its given, wrong label is "memorized". It stands in for Dentan et al.'s LiRA score from ~100
shadow models ("a sample a model trained without it would not fit"): a flipped sample cannot be
fitted from the other samples, so fitting it is memorizing it. Everything else is negative.

**Signals, at the end of every epoch.** From one ``MemorizationMonitor(source="eval")`` (features,
loss and margin of a no-grad eval-mode pass over the training set at the epoch's end, the closest
thing to the paper's checkpoint): -PSMI (2,000 Gaussian directions) of each monitored layer, the
per-sample loss, -margin (logit gap), and ``combined`` = the mean of the normalised ranks of -PSMI
(the last layer), loss and -margin. A second ``MemorizationMonitor(source="train")`` on the same
Trainer gives the same signals from the training forward passes (dropout on, weights moving during
the epoch). ``TracIn`` (online mode; exact on row layers, LoGra projection 1024 on sequence
layers) gives the self-influence accumulated
so far, copied at each epoch's end. Per signal: AUROC and FPR at TPR = 0.75 (the threshold is the
score of the ceil(0.75 * n_pos)-th highest positive; negatives tied with it count as false
positives). The rule "PSMI < 0 on the last layer" (``warn_below=0``, ``patience=1``) is scored per
epoch: precision, recall = TPR and FPR against "memorized", precision and recall against "flipped".

**Paper-timed epoch (E*).** Dentan et al. compute PSMI at the first checkpoint where the median
training loss is below 5 % of its initial value. Here: the first evaluated epoch whose median
eval-pass loss is below 5 % of the untrained model's median loss (our checkpoints are epoch ends).

Usage::

    python benchmarks/bench_memorization.py                 # both settings, 3 seeds each
    python benchmarks/bench_memorization.py --quick --out /tmp/memo.md   # smoke run (~1 min)
    python benchmarks/bench_memorization.py --render-only   # rewrite the page from the raw JSON
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.stats import rankdata

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lightning as L  # noqa: E402

from lightning_memo import MemorizationMonitor, TracIn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

from _common import code_state, md_table_compact  # noqa: E402  (benchmarks/ on sys.path)

DEFAULT_OUT = os.path.join(HERE, "..", "docs", "benchmarks_memorization.md")
DEFAULT_RAW = os.path.join(tempfile.gettempdir(), "bench_memorization_raw.json")

# Dentan et al., ECAI 2025 (mean of 5 setups; PSMI computed early, LiRA ground truth)
PAPER_FPR = {"-PSMI": 0.073, "loss": 0.083, "-margin": 0.093}
PAPER_RULE = {"tpr": 0.89, "fpr": 0.15}

MINILM_LAYERS = ["bert.encoder.layer.*", "classifier:input"]
MINILM_MAIN = ["bert.encoder.layer.5", "classifier:input"]
DIGITS_LAYERS = ["net.1", "net.3"]


# ----------------------------------------------------------------------------- metrics
def auroc(score: np.ndarray, pos: np.ndarray) -> float:
    """AUROC (Mann-Whitney U with average ranks for ties); NaN scores dropped."""
    score = np.asarray(score, dtype=np.float64)
    ok = ~np.isnan(score)
    s, p = score[ok], np.asarray(pos, dtype=bool)[ok]
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[p].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fpr_at_tpr(score: np.ndarray, pos: np.ndarray, tpr: float = 0.75) -> float:
    """FPR at the lowest threshold reaching TPR >= ``tpr`` (higher score = predicted positive;
    negatives tied with the threshold count as false positives)."""
    score = np.asarray(score, dtype=np.float64)
    ok = ~np.isnan(score)
    s, p = score[ok], np.asarray(pos, dtype=bool)[ok]
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    k = max(1, math.ceil(tpr * n_pos))
    thr = np.sort(s[p])[::-1][k - 1]
    return float((s[~p] >= thr).sum() / n_neg)


def norm_rank(score: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (average ranks for ties; higher score -> higher rank); NaN stays
    NaN and is left out of the ranking."""
    score = np.asarray(score, dtype=np.float64)
    out = np.full(score.shape, np.nan)
    ok = ~np.isnan(score)
    out[ok] = (rankdata(score[ok]) - 1) / max(1, int(ok.sum()) - 1)
    return out


def combine(*signals: np.ndarray) -> np.ndarray:
    """Mean of the normalised ranks of the signals (each: higher = more at risk); a sample
    missing one signal (NaN, e.g. PSMI of a class with one sample) gets the mean of the others."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack([norm_rank(s) for s in signals]), axis=0)


def rule_stats(psmi: np.ndarray, memorized: np.ndarray, flipped: np.ndarray) -> Dict[str, float]:
    """The "PSMI < 0" rule against "memorized" and against "flipped"."""
    flag = np.nan_to_num(psmi, nan=np.inf) < 0.0
    nf = int(flag.sum())
    tp_m, tp_f = int((flag & memorized).sum()), int((flag & flipped).sum())
    return {
        "n_flagged": nf,
        "precision_mem": tp_m / nf if nf else float("nan"),
        "tpr_mem": tp_m / max(1, int(memorized.sum())),
        "fpr_mem": int((flag & ~memorized).sum()) / max(1, int((~memorized).sum())),
        "precision_flip": tp_f / nf if nf else float("nan"),
        "recall_flip": tp_f / max(1, int(flipped.sum())),
    }


# ----------------------------------------------------------------------------- callbacks
class SnapshotTracIn(TracIn):
    """Online TracIn that copies the self-influence accumulated so far at each epoch's end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.snapshots: Dict[int, np.ndarray] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        si = self.self_influence
        if si is not None:
            self.snapshots[trainer.current_epoch] = si.detach().double().cpu().numpy().copy()


def make_monitor(
    layers: Sequence[str], source: str, flag_layer: str, n_estimators: int, seed: int, out: str
) -> MemorizationMonitor:
    """Every argument the benchmark relies on is passed explicitly (defaults may change).
    Gaussian directions (the paper's and the ``psmi`` package's): through ``directions=`` where
    the monitor has that argument, else through ``psmi_kwargs``."""
    params = inspect.signature(MemorizationMonitor.__init__).parameters
    extra: Dict[str, Any] = {}
    if "directions" in params:
        extra["directions"] = "gaussian"
    else:
        extra["psmi_kwargs"] = {"directions": "gaussian"}
    if "warn_on" in params:
        extra["warn_on"] = "psmi"
    return MemorizationMonitor(
        list(layers),
        **extra,
        every_n_epochs=1,
        source=source,
        pooling="mean",
        output_key=None,
        n_estimators=n_estimators,
        seed=seed,
        warn_below=0.0,
        patience=1,
        n_show=0,
        flag_layer=flag_layer,
        output_dir=out,
        feature_dtype=torch.float32,
        progress=False,
    )


def read_baselines(monitor: MemorizationMonitor, epoch: int, n: int) -> Tuple[np.ndarray, ...]:
    """(loss, margin) (N,) of one epoch from the monitor's ``epoch_<E>.csv`` (NaN if absent)."""
    loss = np.full(n, np.nan)
    margin = np.full(n, np.nan)
    with open(os.path.join(monitor.out_dir, f"epoch_{epoch}.csv"), newline="") as f:
        for row in csv.DictReader(f):
            i = int(row["index"])
            if row.get("loss") not in (None, ""):
                loss[i] = float(row["loss"])
            if row.get("margin") not in (None, ""):
                margin[i] = float(row["margin"])
    return loss, margin


def quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def trainer(epochs: int, callbacks: list, root: str) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
    )


# ----------------------------------------------------------------------------- one run
def _score_epochs(
    mon_eval: MemorizationMonitor,
    mon_train: MemorizationMonitor,
    tracin: SnapshotTracIn,
    flag_layer: str,
    main_layers: Sequence[str],
    memorized: np.ndarray,
    flipped: np.ndarray,
    init_median_loss: float,
    arrays: Optional[Dict[str, np.ndarray]] = None,
) -> Dict[str, Any]:
    n = len(memorized)
    out: Dict[str, Any] = {"epochs": {}, "layers": {}, "estar": None, "median_loss": {}}
    all_layers = list(mon_eval.scores[mon_eval.epochs[0]])
    for epoch in mon_eval.epochs:
        sig: Dict[str, np.ndarray] = {}
        rules: Dict[str, Dict[str, float]] = {}
        for tag, mon in (("eval", mon_eval), ("train", mon_train)):
            if epoch not in mon.scores:
                continue
            psmi = mon.scores_at(epoch, flag_layer)
            loss, margin = read_baselines(mon, epoch, n)
            sig[f"-PSMI ({tag})"] = -psmi
            sig[f"loss ({tag})"] = loss
            sig[f"-margin ({tag})"] = -margin
            sig[f"combined ({tag})"] = combine(-psmi, loss, -margin)
            if tag == "train":
                other = [x for x in main_layers if x != flag_layer]
                for lay in other:
                    sig[f"-PSMI[{lay}] ({tag})"] = -mon.scores_at(epoch, lay)
            rules[tag] = rule_stats(psmi, memorized, flipped)
            if tag == "eval":
                out["median_loss"][epoch] = float(np.nanmedian(loss))
        if epoch in tracin.snapshots:
            sig["TracIn so far"] = tracin.snapshots[epoch]
        fl = np.nonzero(flipped)[0]
        out["epochs"][epoch] = {
            "signals": {
                k: {
                    "auroc": auroc(v, memorized),
                    "fpr75": fpr_at_tpr(v, memorized),
                    # diagnostics: finding the flipped labels, and telling the flipped samples
                    # that end up memorized from those that do not
                    "auroc_flip": auroc(v, flipped),
                    "auroc_within": auroc(v[fl], memorized[fl]),
                }
                for k, v in sig.items()
            },
            "rule": rules,
        }
        psmi_e = mon_eval.scores_at(epoch, flag_layer)
        groups = {
            "clean": ~flipped,
            "flipped, memorized": memorized,
            "flipped, not memorized": flipped & ~memorized,
        }
        out["epochs"][epoch]["psmi_median"] = {
            g: float(np.nanmedian(psmi_e[m])) if m.any() else float("nan")
            for g, m in groups.items()
        }
        if arrays is not None:
            for k, v in sig.items():
                arrays[f"{k}@{epoch}"] = np.asarray(v, dtype=np.float32)
        out["layers"][epoch] = {
            lay: {
                "auroc": auroc(-mon_eval.scores_at(epoch, lay), memorized),
                "fpr75": fpr_at_tpr(-mon_eval.scores_at(epoch, lay), memorized),
                "rule": rule_stats(mon_eval.scores_at(epoch, lay), memorized, flipped),
            }
            for lay in all_layers
        }
    for epoch in sorted(out["median_loss"]):
        if out["median_loss"][epoch] < 0.05 * init_median_loss:
            out["estar"] = int(epoch)
            break
    out["init_median_loss"] = init_median_loss
    return out


def run_digits(seed: int, epochs: int, n_estimators: int, root: str) -> Dict[str, Any]:
    import torch.nn.functional as F

    from lightning_memo.demos._common import DigitsMLP, digits_loader

    L.seed_everything(seed, verbose=False)
    loader, (x, y, _y_true, flipped) = digits_loader(batch_size=64, flip_fraction=0.1, seed=seed)
    model = DigitsMLP(hidden=256, lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        init_loss = float(torch.median(F.cross_entropy(model.eval()(xt), yt, reduction="none")))
    model.train()
    flag = "net.3"
    mon_e = make_monitor(DIGITS_LAYERS, "eval", flag, n_estimators, seed, f"{root}/eval")
    mon_t = make_monitor(DIGITS_LAYERS, "train", flag, n_estimators, seed, f"{root}/train")
    tracin = SnapshotTracIn(
        ["net.0", "net.2", "net.4"],
        projection_dim=1024,
        mode="online",
        seed=seed,
        output_dir=f"{root}/tracin",
        progress=False,
    )
    t0 = time.perf_counter()
    trainer(epochs, [tracin, mon_e, mon_t], root).fit(model, loader)
    fit_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        pred = model(xt).argmax(1).numpy()
    memorized = flipped & (pred == y)
    arrays: Dict[str, np.ndarray] = {"memorized": memorized, "flipped": flipped}
    res = _score_epochs(
        mon_e, mon_t, tracin, flag, DIGITS_LAYERS, memorized, flipped, init_loss, arrays
    )
    res["_arrays"] = arrays
    res.update(
        n=len(y),
        n_flipped=int(flipped.sum()),
        n_memorized=int(memorized.sum()),
        train_acc_given=float((pred == y).mean()),
        val_acc=float("nan"),
        fit_s=fit_s,
        flag_layer=flag,
    )
    return res


def _minilm_split(seed: int, n_train: int, n_val: int):
    from lightning_memo.demos.text import flip_labels, load_chatterbot_topics

    data = load_chatterbot_topics()
    order = np.random.default_rng(seed).permutation(len(data.texts))
    tr, va = order[:n_train], order[n_train : n_train + n_val]
    given, flipped = flip_labels(data.labels[tr], len(data.topics), 0.1, seed)
    train = [{"text": data.texts[i], "label": int(g)} for i, g in zip(tr, given)]
    val = [{"text": data.texts[i], "label": int(data.labels[i])} for i in va]
    return data, train, val, given, flipped


def _predict(model: Any, collate: Any, items: List[Dict[str, Any]]) -> Tuple[np.ndarray, ...]:
    """(predictions, per-sample losses) of ``items`` in eval mode, batches of 128."""
    import torch.nn.functional as F

    model.eval()
    preds, losses = [], []
    with torch.no_grad():
        for s in range(0, len(items), 128):
            b = collate([{**it, "index": 0} for it in items[s : s + 128]])
            logits = model(b["input_ids"], b["attention_mask"])
            preds.append(logits.argmax(1))
            losses.append(F.cross_entropy(logits, b["label"], reduction="none"))
    model.train()
    return torch.cat(preds).numpy(), torch.cat(losses).numpy()


def run_minilm(seed: int, cfg: Dict[str, Any], n_estimators: int, root: str) -> Dict[str, Any]:
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from lightning_memo import IndexedDataset
    from lightning_memo.demos.text import Collate, TextClassifier, minilm_path

    L.seed_everything(seed, verbose=False)
    data, train, val, given, flipped = _minilm_split(seed, cfg["n_train"], cfg["n_val"])
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    collate = Collate(tok, cfg["max_length"])
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        IndexedDataset(train), batch_size=32, shuffle=True, collate_fn=collate, generator=g
    )
    model = TextClassifier(path, len(data.topics), train_layers=cfg["train_layers"])
    _, init_losses = _predict(model, collate, train)
    flag = "classifier:input"
    layers = MINILM_LAYERS if cfg.get("all_layers", True) else MINILM_MAIN
    mon_e = make_monitor(layers, "eval", flag, n_estimators, seed, f"{root}/eval")
    mon_t = make_monitor(MINILM_MAIN, "train", flag, n_estimators, seed, f"{root}/train")
    tracin = SnapshotTracIn(
        ["classifier", "bert.encoder.layer.5.output.dense"],
        projection_dim=1024,
        mode="online",
        seed=seed,
        output_dir=f"{root}/tracin",
        progress=False,
    )
    t0 = time.perf_counter()
    trainer(cfg["epochs"], [tracin, mon_e, mon_t], root).fit(model, loader)
    fit_s = time.perf_counter() - t0
    pred, _ = _predict(model, collate, train)
    vpred, _ = _predict(model, collate, val)
    memorized = flipped & (pred == given)
    arrays: Dict[str, np.ndarray] = {"memorized": memorized, "flipped": flipped}
    res = _score_epochs(
        mon_e,
        mon_t,
        tracin,
        flag,
        MINILM_MAIN,
        memorized,
        flipped,
        float(np.median(init_losses)),
        arrays,
    )
    res["_arrays"] = arrays
    lengths = np.array([len(tok(it["text"])["input_ids"]) for it in train])
    res["token_lengths"] = {
        "median": float(np.median(lengths)),
        "p90": float(np.percentile(lengths, 90)),
        "share_within_max_length": float((lengths <= cfg["max_length"]).mean()),
    }
    res.update(
        n=len(train),
        n_flipped=int(flipped.sum()),
        n_memorized=int(memorized.sum()),
        train_acc_given=float((pred == given).mean()),
        val_acc=float((vpred == np.array([v["label"] for v in val])).mean()),
        fit_s=fit_s,
        flag_layer=flag,
        n_classes=len(data.topics),
    )
    return res


# ----------------------------------------------------------------------------- the page
def _agg(vals: Sequence[float], digits: int = 3) -> str:
    v = np.array([x for x in vals if x is not None and not np.isnan(x)], dtype=float)
    if v.size == 0:
        return "n/a"
    if v.size == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ({v.min():.{digits}f}–{v.max():.{digits}f})"


def _mean(vals: Sequence[float]) -> float:
    v = [x for x in vals if x is not None and not np.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def _shown_epochs(epochs: Sequence[int]) -> List[int]:
    epochs = sorted(epochs)
    if len(epochs) <= 8:
        return epochs
    keep = {0, 1, 2, 3, 4, 6, 9, 14, 19, 29, 39, 59, epochs[-1]}
    return [e for e in epochs if e in keep]


def _sig(run: Dict[str, Any], epoch: Any, name: str, metric: str) -> float:
    if epoch == "E*":
        epoch = run["estar"] if run["estar"] is not None else max(run["epochs"])
    ep = run["epochs"].get(epoch) or run["epochs"].get(str(epoch))
    if ep is None or name not in ep["signals"]:
        return float("nan")
    return ep["signals"][name][metric]


def _rule(run: Dict[str, Any], epoch: Any, tag: str, key: str) -> float:
    if epoch == "E*":
        epoch = run["estar"] if run["estar"] is not None else max(run["epochs"])
    ep = run["epochs"].get(epoch) or run["epochs"].get(str(epoch))
    return ep["rule"][tag][key] if ep and tag in ep["rule"] else float("nan")


def _epochs_of(runs: Dict[str, Any]) -> List[int]:
    first = next(iter(runs.values()))
    return sorted(int(e) for e in first["epochs"])


def _norm_runs(runs: Dict[str, Any]) -> Dict[str, Any]:
    """JSON turns int keys into strings: back to ints."""
    for run in runs.values():
        for key in ("epochs", "layers", "median_loss"):
            run[key] = {int(k): v for k, v in run[key].items()}
    return runs


MAIN_SIGNALS = ["-PSMI", "loss", "-margin", "combined"]


def _signal_table(runs: Dict[str, Any], tag: str, metric: str, with_tracin: bool) -> str:
    names = [f"{s} ({tag})" for s in MAIN_SIGNALS] + (["TracIn so far"] if with_tracin else [])
    heads = ["-PSMI", "loss", "-margin", "combined"] + (["TracIn so far"] if with_tracin else [])
    rows = []
    for e in _shown_epochs(_epochs_of(runs)) + ["E*"]:
        cells = [_agg([_sig(r, e, n, metric) for r in runs.values()]) for n in names]
        # the best mean of the single signals (not combined) in bold
        means = [_mean([_sig(r, e, n, metric) for r in runs.values()]) for n in names]
        single = [i for i, n in enumerate(names) if not n.startswith("combined")]
        worst = -np.inf if metric == "auroc" else np.inf
        keyed = [worst if np.isnan(means[i]) else means[i] for i in range(len(means))]
        best = (max if metric == "auroc" else min)(single, key=lambda i: keyed[i])
        cells[best] = f"**{cells[best]}**"
        label = "E* (paper-timed)" if e == "E*" else str(e)
        rows.append([label] + cells)
    return md_table_compact(["epoch"] + heads, rows)


def _rule_table(runs: Dict[str, Any], tag: str) -> str:
    rows = []
    keys = ["n_flagged", "precision_mem", "tpr_mem", "fpr_mem", "precision_flip", "recall_flip"]
    for e in _shown_epochs(_epochs_of(runs)) + ["E*"]:
        cells = []
        for k in keys:
            vals = [_rule(r, e, tag, k) for r in runs.values()]
            cells.append(_agg(vals, 0 if k == "n_flagged" else 2))
        rows.append(["E* (paper-timed)" if e == "E*" else str(e)] + cells)
    heads = [
        "epoch",
        "flagged",
        "precision (mem.)",
        "TPR = recall (mem.)",
        "FPR (mem.)",
        "precision (flipped)",
        "recall (flipped)",
    ]
    return md_table_compact(heads, rows)


def _layer_table(runs: Dict[str, Any], metric: str) -> str:
    epochs = _epochs_of(runs)
    shown = _shown_epochs(epochs)
    first = next(iter(runs.values()))
    layers = list(first["layers"][epochs[0]])
    rows = []
    best_per_epoch = {}
    for e in shown:
        means = {lay: _mean([r["layers"][e][lay][metric] for r in runs.values()]) for lay in layers}
        pick = max if metric == "auroc" else min
        best_per_epoch[e] = pick(layers, key=lambda lay: means[lay])
    for lay in layers:
        cells = []
        for e in shown:
            c = _agg([r["layers"][e][lay][metric] for r in runs.values()])
            cells.append(f"**{c}**" if best_per_epoch[e] == lay else c)
        rows.append([lay] + cells)
    return md_table_compact(["layer"] + [f"epoch {e}" for e in shown], rows)


def _diag_epochs(runs: Dict[str, Any]) -> List[Any]:
    """Epoch 0, (2 for long runs), E* and the last epoch, without repeats."""
    epochs = _epochs_of(runs)
    early = [e for e in ([0, 2] if len(epochs) > 8 else [0]) if e != epochs[-1]]
    return early + ["E*"] + [epochs[-1]]


def _diag_table(runs: Dict[str, Any]) -> str:
    names = [f"{s} (eval)" for s in MAIN_SIGNALS] + ["TracIn so far"]
    rows = []
    for e in _diag_epochs(runs):
        for n in names:
            cells = [
                _agg([_sig(r, e, n, m) for r in runs.values()])
                for m in ("auroc", "auroc_flip", "auroc_within")
            ]
            rows.append(["E* (paper-timed)" if e == "E*" else str(e), n] + cells)
    return md_table_compact(
        ["epoch", "signal", "AUROC vs memorized", "AUROC flipped vs rest", "AUROC among flipped"],
        rows,
    )


def _median_table(runs: Dict[str, Any]) -> str:
    groups = ["clean", "flipped, memorized", "flipped, not memorized"]
    rows = []
    for e in _diag_epochs(runs):
        cells = []
        for g in groups:
            vals = []
            for r in runs.values():
                ep_key = (
                    (r["estar"] if r["estar"] is not None else max(r["epochs"])) if e == "E*" else e
                )
                vals.append(r["epochs"][ep_key].get("psmi_median", {}).get(g, float("nan")))
            cells.append(_agg(vals, 2))
        rows.append(["E* (paper-timed)" if e == "E*" else str(e)] + cells)
    return md_table_compact(["epoch"] + groups, rows)


def _combined_verdict(runs: Dict[str, Any], tag: str, label: str) -> str:
    """Per shown epoch and E*: does 'combined' beat the best single signal (means over seeds)?
    One sentence counting the rows where it does; ``label`` names the feature source."""
    singles = [f"{s} ({tag})" for s in ("-PSMI", "loss", "-margin")]
    wins_a = wins_f = total = 0
    for e in _shown_epochs(_epochs_of(runs)) + ["E*"]:
        c_a = _mean([_sig(r, e, f"combined ({tag})", "auroc") for r in runs.values()])
        c_f = _mean([_sig(r, e, f"combined ({tag})", "fpr75") for r in runs.values()])
        s_a = max(_mean([_sig(r, e, n, "auroc") for r in runs.values()]) for n in singles)
        s_f = min(_mean([_sig(r, e, n, "fpr75") for r in runs.values()]) for n in singles)
        total += 1
        wins_a += int(c_a > s_a)
        wins_f += int(c_f < s_f)
    return (
        f"*Combined vs the best single signal{label}:* higher AUROC in {wins_a} of {total} rows, "
        f"lower FPR@0.75 in {wins_f} of {total} rows.\n"
    )


def _estar_line(runs: Dict[str, Any]) -> str:
    parts = []
    for seed, r in runs.items():
        e = r["estar"]
        parts.append(f"seed {seed}: {e if e is not None else 'never (last epoch used)'}")
    return "; ".join(parts)


def render(raw: Dict[str, Any], out: str) -> str:
    meta = raw["meta"]
    lines: List[str] = []
    w = lines.append
    w("# Predicting memorization early: Dentan et al.'s protocol on two settings\n")
    w(
        "Generated by `python benchmarks/bench_memorization.py` "
        f"({meta['wall_s'] / 60:.0f} min of wall time). Seeds {meta['seeds']}; "
        f"`n_estimators={meta['n_estimators']}` Gaussian directions; one torch thread per run "
        f"(`torch.set_num_threads({meta['threads']})`). CPU: {meta['cpu']}; torch {meta['torch']}, "
        f"lightning {meta['lightning']}, transformers {meta['transformers']}; code: "
        f"{meta.get('git', 'unknown')}. "
        f"**Load:** load average "
        f"{meta['load_start']} at the start, {meta['load_end']} at the end (1/5/15 min). "
        "Load changes wall times only, not the numbers below (seeded runs).\n"
    )
    w(
        "Rerun: `python benchmarks/bench_memorization.py` (both settings, 3 seeds; the raw "
        "results go to a JSON file, `--render-only` rewrites this page from it and `--notes "
        "FILE` keeps hand-written notes under the computed verdict). The per-sample signals of "
        "every run are saved beside the JSON (`.npz`).\n"
    )
    w("## Protocol\n")
    w(
        "Dentan et al. (*Predicting memorization within Large Language Models fine-tuned for "
        "classification*, ECAI 2025, arXiv 2409.18858) compute PSMI of each training sample early "
        "in fine-tuning (the first checkpoint where the median training loss is below 5 % of its "
        "initial value) and predict which samples will be memorized at the end, with a LiRA "
        "membership score from ~100 shadow models as ground truth (top 10 % = memorized). We "
        "cannot train 100 shadow models per setting on this machine, so:\n"
    )
    w(
        "- **Ground truth.** 10 % of the training labels are flipped (seeded). A flipped sample "
        "that the final model (eval mode) predicts with its given, wrong label is *memorized*: "
        "no other sample supports that label, so a model trained without it would not fit it. "
        "This stands in for the LiRA score. Every other training sample (clean, or flipped but "
        "not fitted) is a negative. Note the difference: the paper's positives are the top 10 % "
        "of a continuous score, ours a few % of the data, and ours are all label noise, which "
        "is easier to spot than the atypical-but-correct samples LiRA also ranks high.\n"
        '- **Signals** at the end of every epoch, from a `MemorizationMonitor(source="eval")` '
        "(a no-grad eval-mode pass over the training set at the epoch's end, the closest analogue "
        f"of the paper's checkpoint): **-PSMI** of the last layer ({meta['n_estimators']:,} "
        "directions), the "
        "per-sample **loss**, **-margin** (minus the logit gap: true-label logit minus the best "
        "other logit), and **combined** = the mean of the normalised ranks (0..1) of -PSMI, loss "
        "and -margin, computed here from the monitor's CSV columns. A second monitor with "
        '`source="train"` on the same Trainer gives the same signals from the training forward '
        "passes. **TracIn so far**: online TracIn self-influence (exact for layers fed one row "
        "per sample, e.g. the head; LoGra projection 1024 for layers with positions) "
        "accumulated from the first step to the epoch's end (copied from `tracin.self_influence` "
        "in `on_train_epoch_end` by a subclass).\n"
        "- **Metrics**: AUROC and FPR at TPR = 0.75 (the threshold is the score of the "
        "ceil(0.75 n_pos)-th highest positive; negatives tied with it count as false positives). "
        "The rule **PSMI < 0** on the last layer (`warn_below=0.0`, `patience=1`, the paper's "
        "rule as stated) is scored per epoch against *memorized* (precision, TPR = recall, FPR) "
        "and against *flipped* (precision, recall).\n"
        "- **E\\* (paper-timed)**: the first epoch end where the median eval-pass loss is below "
        "5 % of the untrained model's median loss. The paper reaches it at 0.2–0.4 epoch; we "
        "evaluate at epoch ends only, so E\\* is later in training than theirs.\n"
        "- Cells: mean over seeds (min–max). In the signal tables the best single signal of each "
        "row (by mean) is in bold; *combined* is never bolded, compare it by eye.\n"
        "- Every `MemorizationMonitor` argument the benchmark relies on is passed explicitly "
        '(`source`, `pooling="mean"`, `n_estimators`, `seed`, `warn_below=0.0`, `patience=1`, '
        '`flag_layer`, Gaussian directions via `directions="gaussian"` (the monitor\'s own '
        'argument; `psmi_kwargs` on older versions), `warn_on="psmi"` where it exists).\n'
    )
    settings = raw["settings"]
    summary_rows = []
    for key, title in (("digits", "digits MLP"), ("minilm", "MiniLM / chatterbot")):
        if key not in settings:
            continue
        runs = _norm_runs(settings[key]["runs"])
        for sig_name in ("-PSMI", "loss", "-margin", "combined", "TracIn so far"):
            name = sig_name if sig_name.startswith("TracIn") else f"{sig_name} (eval)"
            row = [title, sig_name]
            for e in (0, "E*", _epochs_of(runs)[-1]):
                row.append(_agg([_sig(r, e, name, "fpr75") for r in runs.values()]))
            row.append(f"{PAPER_FPR[sig_name]:.3f}" if sig_name in PAPER_FPR else "—")
            summary_rows.append(row)
    w("## Summary: FPR at TPR = 0.75 (lower is better), eval-pass signals\n")
    w(
        md_table_compact(
            [
                "setting",
                "signal",
                "first epoch (0)",
                "E* (paper-timed)",
                "last epoch",
                "Dentan et al.",
            ],
            summary_rows,
        )
        + "\n"
    )
    w(
        "Dentan et al.'s figures are the mean of 5 LLM fine-tuning setups with LiRA ground truth, "
        "PSMI at 0.2–0.4 epoch; theirs and ours measure different things (see the protocol), so "
        "compare orderings and orders of magnitude, not digits.\n"
    )
    rule_rows = []
    for key, title in (("digits", "digits MLP"), ("minilm", "MiniLM / chatterbot")):
        if key not in settings:
            continue
        runs = settings[key]["runs"]
        for e in (0, "E*", _epochs_of(runs)[-1]):
            rule_rows.append(
                [title, "E* (paper-timed)" if e == "E*" else str(e)]
                + [
                    _agg([_rule(r, e, "eval", k) for r in runs.values()], 2)
                    for k in ("tpr_mem", "fpr_mem", "precision_mem")
                ]
            )
    rule_rows.append(
        ["Dentan et al.", "early", f"{PAPER_RULE['tpr']:.2f}", f"{PAPER_RULE['fpr']:.2f}", "—"]
    )
    w("**The PSMI < 0 rule (last layer, eval pass) against memorized samples:**\n")
    w(md_table_compact(["setting", "epoch", "TPR", "FPR", "precision"], rule_rows) + "\n")
    w("VERDICT_PLACEHOLDER\n")

    for key in ("digits", "minilm"):
        if key not in settings:
            continue
        st = settings[key]
        runs = st["runs"]
        cfg = st["config"]
        if key == "digits":
            w("## Setting 1: digits MLP\n")
            w(
                "scikit-learn digits (N = 1,797, 10 classes), 10 % of the labels flipped (seeded), "
                f"MLP 64-256-256-10 (`DigitsMLP`, Adam lr 1e-3, batch 64), {cfg['epochs']} "
                "epochs, no validation split (all samples train). PSMI of `net.3` (the second "
                "ReLU's output, what the last Linear sees; the flag layer) and `net.1` (the first "
                "hidden layer). TracIn on the three Linear layers.\n"
            )
        else:
            tl = next(iter(runs.values())).get(
                "token_lengths",
                {"median": float("nan"), "p90": float("nan"), "share_within_max_length": 0.0},
            )
            w("## Setting 2: MiniLM fine-tuned on chatterbot topics\n")
            w(
                f"all-MiniLM-L6-v2 (6 blocks, d = 384) + a linear head on the mask-aware mean of "
                f"the last hidden states (`TextClassifier`), chatterbot-corpus sentences labelled "
                f"by topic ({runs[next(iter(runs))].get('n_classes', 19)} topics), "
                f"{cfg['n_train']} training sentences (10 % flipped) and {cfg['n_val']} held-out "
                f"sentences for the validation accuracy, `max_length={cfg['max_length']}`, the top "
                f"{cfg['train_layers']} encoder blocks and the head trained (AdamW 1e-4 / 2e-3, "
                f"batch 32), {cfg['epochs']} epochs. Why this setting: it is the transformer "
                "demo's setting made smaller so that 3 seeds (each with an eval pass and online "
                f"TracIn) fit in a few minutes on 2 shared cores: {cfg['n_train']} sentences keep "
                f"~{cfg['n_train'] // 19} per topic on average, {cfg['max_length']} tokens hold "
                f"{tl['share_within_max_length']:.0%} of the training sentences whole (median "
                f"{tl['median']:.0f}, 90th percentile {tl['p90']:.0f} tokens), and training only "
                "the top blocks makes the backward pass cheap; in 4 epochs the model fits a "
                "fifth to a third of the flipped labels (the positives), enough to score. "
                "Blocks 0–3 are frozen, so their features never move: their PSMI is the "
                "pretrained model's, the same at every epoch. PSMI on the 6 blocks "
                "(`bert.encoder.layer.*`) and `classifier:input` (the flag layer); in the eval "
                "pass `classifier:input` is the mean-pooled output of block 5 (dropout is off), "
                "so those two layers differ only by their random directions. TracIn on "
                "`classifier` and `bert.encoder.layer.5.output.dense`.\n"
            )
        w("**Runs:**\n")
        run_rows = []
        for seed, r in runs.items():
            run_rows.append(
                [
                    seed,
                    r["n_flipped"],
                    r["n_memorized"],
                    f"{r['train_acc_given']:.3f}",
                    "—" if np.isnan(r["val_acc"]) else f"{r['val_acc']:.3f}",
                    r["estar"] if r["estar"] is not None else "never",
                    f"{r['fit_s']:.0f}",
                ]
            )
        w(
            md_table_compact(
                [
                    "seed",
                    "flipped",
                    "memorized (positives)",
                    "train acc. (given labels)",
                    "val. acc.",
                    "E*",
                    "fit s (load-dependent)",
                ],
                run_rows,
            )
            + "\n"
        )
        w("### AUROC (eval-pass signals; higher is better)\n")
        w(_signal_table(runs, "eval", "auroc", True) + "\n")
        w("### FPR at TPR = 0.75 (eval-pass signals; lower is better)\n")
        w(_signal_table(runs, "eval", "fpr75", True) + "\n")
        w(_combined_verdict(runs, "eval", " (means over seeds), eval pass"))
        w('### The same signals from the training forward passes (`source="train"`)\n')
        w("AUROC:\n")
        w(_signal_table(runs, "train", "auroc", False) + "\n")
        w("FPR at TPR = 0.75:\n")
        w(_signal_table(runs, "train", "fpr75", False) + "\n")
        w(_combined_verdict(runs, "train", ", training passes"))
        w("### The PSMI < 0 rule (flag layer, eval pass)\n")
        w(_rule_table(runs, "eval") + "\n")
        w("Same rule on the training-pass PSMI:\n")
        w(_rule_table(runs, "train") + "\n")
        w("### Which layer predicts best (-PSMI, eval pass)\n")
        w("AUROC (best layer per epoch in bold):\n")
        w(_layer_table(runs, "auroc") + "\n")
        w("FPR at TPR = 0.75:\n")
        w(_layer_table(runs, "fpr75") + "\n")
        w("### Diagnostics: flipped labels vs memorized ones (eval pass)\n")
        w(
            "What each signal finds: *vs memorized* is the benchmark's AUROC; *flipped vs the "
            "rest* scores label-noise detection; *among flipped* is the AUROC, on the flipped "
            "samples only, of telling those that end up memorized from those the model never "
            "fits (0.5 = no idea, below 0.5 = ranks the never-fitted ones first).\n"
        )
        w(_diag_table(runs) + "\n")
        w("Median PSMI of the flag layer (eval pass) per group:\n")
        w(_median_table(runs) + "\n")
    text = "\n".join(lines)
    return text


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["digits", "minilm"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--digits-epochs", type=int, default=80)
    p.add_argument("--minilm-epochs", type=int, default=4)
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=300)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--train-layers", type=int, default=2)
    p.add_argument("--n-estimators", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one seed")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--raw", default=DEFAULT_RAW, help="raw results (JSON), reused with --resume")
    p.add_argument("--resume", action="store_true", help="skip the runs already in --raw")
    p.add_argument("--render-only", action="store_true", help="rewrite --out from --raw")
    p.add_argument(
        "--notes", default=None, help="a markdown file kept in --raw and shown after the verdict"
    )
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quick:
        args.seeds = args.seeds[:1]
        args.digits_epochs, args.minilm_epochs = 3, 1
        args.n_train, args.n_val, args.max_length, args.n_estimators = 96, 32, 16, 200
    if args.render_only:
        with open(args.raw) as f:
            raw = json.load(f)
        if args.notes:
            with open(args.notes) as f:
                raw["notes"] = f.read().strip()
            with open(args.raw, "w") as f:
                json.dump(raw, f)
        write_page(raw, args.out)
        return
    quiet()
    torch.set_num_threads(args.threads)
    from _common import machine_info  # noqa: E402  (benchmarks/ is on sys.path)

    info = machine_info(["transformers", "scipy"], str(args.threads))
    raw: Dict[str, Any] = {"meta": {}, "settings": {}}
    if args.resume and os.path.exists(args.raw):
        with open(args.raw) as f:
            raw = json.load(f)
    t_start = time.perf_counter() - raw["meta"].get("wall_s", 0.0)
    raw["meta"].update(
        seeds=args.seeds,
        n_estimators=args.n_estimators,
        threads=args.threads,
        cpu=info["cpu"],
        load_start=raw["meta"].get("load_start", info["load average at start (1/5/15 min)"]),
        torch=info["torch"],
        lightning=info["lightning"],
        transformers=info.get("transformers", ""),
        git=raw["meta"].get("git", code_state()),
    )
    minilm_cfg = dict(
        n_train=args.n_train,
        n_val=args.n_val,
        max_length=args.max_length,
        train_layers=args.train_layers,
        epochs=args.minilm_epochs,
    )
    for setting in args.settings:
        cfg = {"epochs": args.digits_epochs} if setting == "digits" else minilm_cfg
        st = raw["settings"].setdefault(setting, {"config": cfg, "runs": {}})
        st["config"] = cfg
        for seed in args.seeds:
            if str(seed) in st["runs"]:
                print(f"{setting} seed {seed}: already in {args.raw}, skipped", flush=True)
                continue
            with tempfile.TemporaryDirectory() as root:
                t0 = time.perf_counter()
                if setting == "digits":
                    res = run_digits(seed, args.digits_epochs, args.n_estimators, root)
                else:
                    res = run_minilm(seed, minilm_cfg, args.n_estimators, root)
            arrays = res.pop("_arrays", None)
            if arrays is not None:  # per-sample signals, for a later look (not on the page)
                np.savez_compressed(f"{args.raw}.{setting}.{seed}.npz", **arrays)
            st["runs"][str(seed)] = json.loads(json.dumps(res, default=float))
            last = max(res["epochs"])
            e0 = res["epochs"][min(res["epochs"])]["signals"]
            t_last = res["epochs"][last]["signals"].get("TracIn so far", {"auroc": float("nan")})
            print(
                f"{setting} seed {seed}: {time.perf_counter() - t0:.0f} s, memorized "
                f"{res['n_memorized']}/{res['n_flipped']}, E*={res['estar']}; epoch 0 AUROC "
                + ", ".join(f"{k} {v['auroc']:.3f}" for k, v in e0.items() if "(eval)" in k)
                + f"; last epoch {last} TracIn AUROC "
                f"{t_last['auroc']:.3f}",
                flush=True,
            )
            raw["meta"]["wall_s"] = time.perf_counter() - t_start
            raw["meta"]["load_end"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
            with open(args.raw, "w") as f:
                json.dump(raw, f)
    raw["meta"]["wall_s"] = time.perf_counter() - t_start
    raw["meta"]["load_end"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    with open(args.raw, "w") as f:
        json.dump(raw, f)
    write_page(raw, args.out)


def write_page(raw: Dict[str, Any], out: str) -> None:
    """Render the page (the verdict is computed from the numbers) and write it to ``out``."""
    text = render(raw, out)
    notes = raw.get("notes")
    if notes:
        notes = "### Reading the results (notes on this run)\n\n" + notes + "\n\n"
    text = text.replace("VERDICT_PLACEHOLDER\n", verdict(raw) + (notes or ""))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(text)
    print(f"\nwrote {out}")


def _m(runs: Dict[str, Any], e: Any, name: str, metric: str) -> float:
    return _mean([_sig(r, e, name, metric) for r in runs.values()])


def verdict(raw: Dict[str, Any]) -> str:
    """Where we agree and disagree with Dentan et al., computed from the numbers (means over
    seeds), so the words follow the table when the benchmark is rerun."""
    out = ["## Where we agree and where not with Dentan et al.\n"]
    w = out.append
    titles = {"digits": "digits MLP", "minilm": "MiniLM / chatterbot"}
    settings = raw["settings"]
    for key, st in settings.items():
        runs = _norm_runs(st["runs"])
        title = titles.get(key, key)
        last = _epochs_of(runs)[-1]
        whens: List[Tuple[Any, str]] = [(0, "after the first epoch")]
        whens.append(("E*", "at the paper-timed epoch E*"))
        if any((last if r["estar"] is None else r["estar"]) != last for r in runs.values()):
            whens.append((last, "at the last epoch"))
        for e, when in whens:
            f = {n: _m(runs, e, f"{n} (eval)", "fpr75") for n in ("-PSMI", "loss", "-margin")}
            a = {n: _m(runs, e, f"{n} (eval)", "auroc") for n in ("-PSMI", "loss", "-margin")}
            order = sorted(f, key=lambda n: f[n])
            spread = max(f.values()) - min(f.values())
            same_order = order == ["-PSMI", "loss", "-margin"]
            head = (
                f"- **{title}, {when}** (FPR@0.75 -PSMI {f['-PSMI']:.3f}, loss {f['loss']:.3f}, "
                f"-margin {f['-margin']:.3f}; AUROC {a['-PSMI']:.3f} / {a['loss']:.3f} / "
                f"{a['-margin']:.3f}): "
            )
            if spread < 0.01:
                w(
                    head + f"**a tie**: the three are within {spread:.3f} of each other, inside "
                    "the seed spread, so this neither confirms nor contradicts PSMI being the "
                    "best; all three are below the paper's 0.07–0.09."
                    if max(f.values()) < 0.073
                    else head + f"**a tie** (within {spread:.3f})."
                )
            elif order[0] == "-PSMI":
                w(
                    head
                    + "**agrees**: PSMI is the best of the three"
                    + (" (the paper's order PSMI < loss < margin)" if same_order else "")
                    + "."
                )
            else:
                w(
                    head + f"**disagrees**: {order[0]} is best and PSMI ranks "
                    f"{order.index('-PSMI') + 1} of 3 (FPR {f['-PSMI'] - f[order[0]]:+.3f} "
                    "against the best)."
                )
        rule = {
            k: _mean([_rule(r, "E*", "eval", k) for r in runs.values()])
            for k in ("tpr_mem", "fpr_mem", "precision_mem", "recall_flip", "precision_flip")
        }
        rule0 = {
            k: _mean([_rule(r, 0, "eval", k) for r in runs.values()])
            for k in ("tpr_mem", "fpr_mem")
        }
        close = [
            (t, f)
            for t, f in ((rule0["tpr_mem"], rule0["fpr_mem"]), (rule["tpr_mem"], rule["fpr_mem"]))
            if t >= PAPER_RULE["tpr"] - 0.1 and f <= PAPER_RULE["fpr"] + 0.05
        ]
        w(
            f"- **{title}, PSMI < 0 rule** ("
            + ("**agrees**" if close else "**disagrees**")
            + f"): after epoch 0 TPR {rule0['tpr_mem']:.2f} / FPR "
            f"{rule0['fpr_mem']:.2f}, at E* TPR {rule['tpr_mem']:.2f} / FPR {rule['fpr_mem']:.2f} "
            f"against memorized (paper: TPR {PAPER_RULE['tpr']:.2f} / FPR {PAPER_RULE['fpr']:.2f}"
            f"); against the flipped labels at E*: recall {rule['recall_flip']:.2f}, precision "
            f"{rule['precision_flip']:.2f}."
        )
        c_vs = []
        for e in (0, "E*", last):
            c = _m(runs, e, "combined (eval)", "fpr75")
            b = min(_m(runs, e, f"{n} (eval)", "fpr75") for n in ("-PSMI", "loss", "-margin"))
            ca = _m(runs, e, "combined (eval)", "auroc")
            ba = max(_m(runs, e, f"{n} (eval)", "auroc") for n in ("-PSMI", "loss", "-margin"))
            c_vs.append((e, c, b, ca, ba))
        beats = [x for x in c_vs if x[1] < x[2] and x[3] > x[4]]
        w(
            f"- **{title}, combined rank score**: "
            + "; ".join(
                f"epoch {e}: FPR {c:.3f} vs best single {b:.3f} ({c - b:+.3f}), AUROC {ca:.3f} "
                f"vs {ba:.3f} ({ca - ba:+.3f})"
                for e, c, b, ca, ba in c_vs
            )
            + ". "
            + (
                "It beats the best single signal on both metrics at all three."
                if len(beats) == len(c_vs)
                else (
                    "It does not beat the best single signal on both metrics at any of them."
                    if not beats
                    else f"It beats the best single signal on both metrics at {len(beats)} of "
                    f"{len(c_vs)} of them."
                )
            )
        )
        t_e = _m(runs, "E*", "TracIn so far", "fpr75")
        t_l = _m(runs, last, "TracIn so far", "fpr75")
        w(
            f"- **{title}, TracIn self-influence so far** (not in the paper): FPR@0.75 {t_e:.3f} "
            f"at E*, {t_l:.3f} at the end (AUROC {_m(runs, last, 'TracIn so far', 'auroc'):.3f})."
        )
        first = next(iter(runs.values()))
        layers = list(first["layers"][_epochs_of(runs)[0]])
        if len(layers) > 2:
            best = []
            for e in _epochs_of(runs):
                means = {
                    lay: _mean([r["layers"][e][lay]["fpr75"] for r in runs.values()])
                    for lay in layers
                }
                b = min(layers, key=lambda lay: means[lay])
                best.append(f"epoch {e}: {b} ({means[b]:.3f})")
            w(
                f"- **{title}, best layer by FPR@0.75** (paper: mid-to-late layers): "
                + "; ".join(best)
                + "."
            )
    w("")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
