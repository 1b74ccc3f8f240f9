"""Demo: fine-tune a pretrained transformer on real text with all four callbacks on one Trainer.

all-MiniLM-L6-v2 + a linear head classifies chatterbot sentences by topic, with 10 % of the
training labels flipped. On the same Trainer:

- ``MemorizationMonitor``: PSMI of the last encoder block and of what the head sees, every epoch,
  with the sentence text in the flagged tables;
- ``TracIn`` (online, LoGra projection k=1024): the head and the last block's output projection;
- ``InfluenceAnalysis`` (EK-FAC) at fit end: the head and the last block's attention output
  projection;
- ``ConceptErasure``: the sentence-length bucket (short / long) erased from the output of block
  2. Length says nothing about the topic, so erasing it should cost no accuracy, and block 2 is
  frozen, so the eraser fitted once at the start stays exact for the whole run.

At the end a flipped sample the model fits with its wrong label counts as memorized.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from ..callbacks import ConceptErasure, InfluenceAnalysis, MemorizationMonitor, TracIn
from ..data import IndexedDataset
from ._common import auroc, write_demo_report
from .text import (
    Collate,
    TextClassifier,
    flip_labels,
    load_chatterbot_topics,
    minilm_path,
    require_transformers,
)

__all__ = ["run_transformer_demo", "LengthBucket", "SETTINGS"]

#: default (a few minutes on 2 cores), quick (tests) and full (the 10-epoch setting)
SETTINGS: Dict[str, Dict[str, Any]] = {
    "default": dict(n_train=1400, n_val=300, epochs=4, train_layers=2, max_length=32),
    "quick": dict(n_train=96, n_val=32, epochs=1, train_layers=1, max_length=16),
    "full": dict(n_train=1400, n_val=300, epochs=10, train_layers=6, max_length=48),
}
LAYERS = ["bert.encoder.layer.5", "classifier:input"]


class LengthBucket:
    """The erased concept: 1 for sentences longer than ``threshold`` tokens (picklable)."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold

    def __call__(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["attention_mask"].sum(dim=1) > self.threshold).long()


def _split(seed: int, n_train: int, n_val: int, flip: float):
    data = load_chatterbot_topics()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.texts))
    tr, va = order[:n_train], order[n_train : n_train + n_val]
    c = len(data.topics)
    given, flipped = flip_labels(data.labels[tr], c, flip, seed)
    train = [{"text": data.texts[i], "label": int(g)} for i, g in zip(tr, given)]
    val = [{"text": data.texts[i], "label": int(data.labels[i])} for i in va]
    return data, train, val, data.labels[tr], given, flipped


def run_transformer_demo(
    epochs: Optional[int] = None,
    out_dir: str = "demo_runs",
    seed: int = 0,
    mode: str = "default",
    verbose: bool = True,
) -> Dict[str, Any]:
    """Fine-tune MiniLM on chatterbot topics with the four callbacks; print and return a summary.

    Args:
        epochs: training epochs (default: the mode's).
        out_dir: folder of the TensorBoard run (the callbacks' files go under it).
        seed: seed of the split, the flipped labels, the head and the data order.
        mode: ``"default"`` (1.5 minutes on 2 quiet CPU cores), ``"quick"`` (a smoke run) or
            ``"full"`` (10 epochs, every encoder block fine-tuned).
    """
    require_transformers()
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = dict(SETTINGS[mode])
    epochs = cfg["epochs"] if epochs is None else epochs
    L.seed_everything(seed, verbose=False)
    data, train, val, y_true, given, flipped = _split(seed, cfg["n_train"], cfg["n_val"], 0.1)
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    collate = Collate(tok, cfg["max_length"])
    train_ds = IndexedDataset(train)
    lengths = np.array([len(tok(it["text"])["input_ids"][: cfg["max_length"]]) for it in train])
    threshold = int(np.median(lengths))
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_ds, batch_size=32, shuffle=True, collate_fn=collate, generator=g)
    val_loader = DataLoader(IndexedDataset(val), batch_size=64, collate_fn=collate)
    queries = DataLoader(IndexedDataset(val[:64]), batch_size=32, collate_fn=collate)
    model = TextClassifier(path, len(data.topics), train_layers=cfg["train_layers"])
    quick = mode == "quick"
    monitor = MemorizationMonitor(
        LAYERS,
        n_estimators=200 if quick else 1000,
        seed=seed,
        pooling={"bert.encoder.layer.5": "mean"},
        patience=1,
    )
    tracin = TracIn(
        ["classifier", "bert.encoder.layer.5.output.dense"],
        projection_dim=1024,
        mode="online",
        seed=seed,
    )
    influence = InfluenceAnalysis(
        "ekfac",
        # the head and the last block's attention output projection (384 x 384): the block's
        # feed-forward layers (384 x 1536 each) made the fit-end pass cost about 20 epochs
        layers=["classifier", "bert.encoder.layer.5.attention.output.dense"],
        queries=queries,
        max_examples=64 if quick else 512,
        fisher="empirical",
        cache=False,
    )
    erasure = ConceptErasure(
        "bert.encoder.layer.2", concept=LengthBucket(threshold), when="fit_start", output_key=0
    )
    logger = L.pytorch.loggers.TensorBoardLogger(out_dir, name="transformer_demo")
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[monitor, tracin, influence, erasure],
        logger=logger,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        limit_val_batches=1.0,
    )
    t0 = time.perf_counter()
    trainer.fit(model, loader, val_loader)
    fit_s = time.perf_counter() - t0
    result = _summarize(model, collate, train, val, given, y_true, flipped, data.topics, monitor)
    result.update(
        fit_seconds=fit_s,
        epochs=epochs,
        mode=mode,
        auroc_tracin=auroc(tracin.self_influence.cpu().numpy(), flipped),
        auroc_ekfac=auroc(influence.self_influence.cpu().numpy(), flipped),
        erasure=_erasure_rows(erasure),
        log_dir=logger.log_dir,
        threshold=threshold,
        report=write_demo_report(logger.log_dir, flipped),
    )
    if verbose:
        _print_summary(result)
    return result


def _predict(model: TextClassifier, collate: Collate, items: List[Dict[str, Any]]) -> np.ndarray:
    model.eval()
    preds = []
    with torch.no_grad():
        for s in range(0, len(items), 128):
            b = collate([{**it, "index": 0} for it in items[s : s + 128]])
            preds.append(model(b["input_ids"], b["attention_mask"]).argmax(1))
    return torch.cat(preds).numpy()


def _summarize(model, collate, train, val, given, y_true, flipped, topics, monitor):
    pred = _predict(model, collate, train)
    memorized = flipped & (pred == given)
    val_acc = float((_predict(model, collate, val) == np.array([v["label"] for v in val])).mean())
    rows = []
    for epoch in monitor.epochs:
        path = os.path.join(monitor.out_dir, f"epoch_{epoch}.csv")
        base = np.genfromtxt(path, delimiter=",", names=True)
        idx = base["index"].astype(int)
        loss = np.full(len(given), np.nan)
        margin = np.full(len(given), np.nan)
        loss[idx], margin[idx] = base["loss"], base["margin"]
        row = {"epoch": epoch, "auroc_loss": auroc(loss, memorized)}
        row["auroc_margin"] = auroc(-margin, memorized)
        for layer in LAYERS:
            row[f"auroc_psmi[{layer}]"] = auroc(-monitor.scores_at(epoch, layer), memorized)
        rows.append(row)
    last = monitor.scores_at(monitor.epochs[-1]) if monitor.epochs else np.zeros(len(given))
    worst = [int(i) for i in np.argsort(np.nan_to_num(last, nan=np.inf))[:5]]
    flagged_text = [
        {
            "index": i,
            "text": train[i]["text"],
            "given": topics[int(given[i])],
            "true": topics[int(y_true[i])],
            "psmi": float(last[i]),
        }
        for i in worst
    ]
    return {
        "rows": rows,
        "n_flipped": int(flipped.sum()),
        "n_memorized": int(memorized.sum()),
        "val_acc": val_acc,
        "flagged": flagged_text,
        "n_flagged": int(len(monitor.flagged)),
        "flipped": flipped,
        "memorized": memorized,
        "monitor_dir": monitor.out_dir,
    }


def _erasure_rows(erasure: ConceptErasure) -> Dict[str, float]:
    info = erasure.history[-1]["layers"] if erasure.history else {}
    out: Dict[str, float] = {}
    for vals in info.values():
        for key in ("probe_acc_before", "probe_acc_after", "majority_rate"):
            if key in vals:
                out[key] = float(vals[key])
    return out


def _print_summary(r: Dict[str, Any]) -> None:
    print(
        f"\nMiniLM on chatterbot topics ({r['mode']}, {r['epochs']} epochs, {r['fit_seconds']:.0f}"
        f" s): validation accuracy {r['val_acc']:.3f}; {r['n_memorized']} of {r['n_flipped']} "
        "flipped training labels memorized (fitted with the wrong label)."
    )
    print("AUROC for the memorized samples, per epoch (higher = earlier warning):")
    keys = [k for k in r["rows"][0] if k != "epoch"] if r["rows"] else []
    print("  epoch  " + "  ".join(f"{k:>28}" for k in keys))
    for row in r["rows"]:
        print(f"  {row['epoch']:>5}  " + "  ".join(f"{row[k]:>28.3f}" for k in keys))
    print(
        f"Self-influence AUROC for the flipped samples: TracIn {r['auroc_tracin']:.3f}, "
        f"EK-FAC {r['auroc_ekfac']:.3f}"
    )
    e = {k: float("nan") for k in ("probe_acc_before", "probe_acc_after", "majority_rate")}
    e.update(r["erasure"])
    print(
        f"Sentence-length probe at block 2: accuracy {e['probe_acc_before']:.3f} before erasure, "
        f"{e['probe_acc_after']:.3f} after (majority {e['majority_rate']:.3f})"
    )
    print("Lowest-PSMI training sentences at the last epoch (given label / true label):")
    for f in r["flagged"]:
        text = f["text"][:70]
        print(f"  [{f['index']:>4}] PSMI {f['psmi']:+.2f}  {f['given']} / {f['true']}: {text}")
    print(f"TensorBoard: tensorboard --logdir {r['log_dir']}")
    if r.get("report"):
        print(f"Report: open {r['report']}")
