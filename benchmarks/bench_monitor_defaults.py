"""The measurements behind MemorizationMonitor's defaults (docs/memorization.md, "Defaults").

Three parts, each printing a markdown table (``--part``; default: all):

- ``directions``: PSMI accuracy of ``directions="orthogonal"`` with m=1,000 vs Gaussian m=2,000
  (and m=1,000 / 2,000 of each, for context) against a 50,000-direction Gaussian truth (float64,
  an independent seed), on the penultimate-layer features (``net.3``, d=256) of the digits MLP
  trained on 10 %-flipped digits, after 1 and after 10 epochs. Per setting: mean Spearman and
  mean |PSMI - truth| over 5 direction seeds, the number of samples whose sign (the early
  warning's ``PSMI < 0``) differs from the truth's, and the best of 7 interleaved timings of one
  ``fit_transform`` (float32, this machine's threads).
- ``source``: ``source="train"`` vs ``source="eval"`` on data the defaults were not tuned on:
  the first 5 digit classes (scikit-learn ``load_digits(n_class=5)``, 901 images), 10 % of the
  labels flipped, the digits MLP (64-256-256-5); AUROC of -PSMI (layer ``net.3``) for the flipped
  samples at the end of epochs 0, 1 and 2, 3 seeds (seed = labels flipped, weights, order and
  directions), monitor defaults otherwise.
- ``stop``: seconds of the monitor's eval pass alone (median over the 2 epochs of a fit, then
  over 3 fits) with ``eval_stop_early=False`` / ``True`` on a small transformer like the one of
  ``bench_monitor_overhead.py`` (token embedding, 4 encoder layers of d_model 128, mean pool,
  linear head; N = 3,000 sequences of 32 tokens, batch 64), monitoring the first encoder layer or
  the last one.

Run: ``python benchmarks/bench_monitor_defaults.py [--part directions|source|stop]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import auroc, machine_info, md_table  # noqa: E402

from lightning_memo import PSMI, IndexedDataset, MemorizationMonitor  # noqa: E402
from lightning_memo.demos._common import DigitsMLP, load_digits_flipped  # noqa: E402


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def _digits_features(epochs: int, seed: int = 0) -> tuple:
    """net.3 features (N, 256) of the digits MLP after ``epochs`` epochs (Adam, batch 64)."""
    x, y, _, _ = load_digits_flipped(0.1, seed)
    torch.manual_seed(seed)
    model = DigitsMLP()
    opt = model.configure_optimizers()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for b in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return model.net[:4](xt), yt


def part_directions() -> str:
    settings = [("gaussian", 1000), ("gaussian", 2000), ("orthogonal", 1000), ("orthogonal", 2000)]
    rows = []
    for epochs in (1, 10):
        feats, y = _digits_features(epochs)
        t0 = time.perf_counter()
        truth, _, _ = PSMI(
            n_estimators=50_000, seed=12345, dtype=torch.float64, return_full=False
        ).fit_transform(feats.double(), y)
        t_truth = time.perf_counter() - t0
        truth = truth.numpy()
        secs: Dict[tuple, List[float]] = {k: [] for k in settings}
        for _ in range(7):  # timing: interleaved rounds, best of 7 (robust to other load)
            for kind, m in settings:
                est = PSMI(n_estimators=m, seed=0, directions=kind, return_full=False)
                t0 = time.perf_counter()
                est.fit_transform(feats, y)
                secs[kind, m].append(time.perf_counter() - t0)
        for kind, m in settings:
            sp, mae, signs = [], [], []
            for s in range(5):
                est = PSMI(n_estimators=m, seed=s, directions=kind, return_full=False)
                mean, _, _ = est.fit_transform(feats, y)
                mean = mean.double().numpy()
                sp.append(_spearman(mean, truth))
                mae.append(float(np.abs(mean - truth).mean()))
                signs.append(int(((mean < 0) != (truth < 0)).sum()))
            rows.append(
                [
                    f"{epochs}",
                    kind,
                    f"{m:,}",
                    f"{np.mean(sp):.4f} ({min(sp):.4f})",
                    f"{np.mean(mae):.4f}",
                    f"{np.mean(signs):.1f}",
                    f"{min(secs[kind, m]):.3f}",
                ]
            )
        print(f"truth after {epochs} epoch(s): {t_truth:.1f} s", file=sys.stderr)
    head = [
        "epochs trained",
        "directions",
        "m",
        "Spearman vs truth, mean (min)",
        "mean abs error",
        "sign flips vs truth (of 1,797)",
        "seconds (best of 7)",
    ]
    return md_table(head, rows)


class _Quiet:
    def __enter__(self) -> None:
        self.w = warnings.catch_warnings()
        self.w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *a: object) -> None:
        self.w.__exit__(*a)


def _five_class_digits(seed: int) -> tuple:
    from sklearn.datasets import load_digits

    data = load_digits(n_class=5)
    x = (data.data / 16.0).astype(np.float32)
    y_true = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, int(round(0.1 * n)), replace=False)] = True
    y = y_true.copy()
    y[flipped] = (y_true[flipped] + rng.integers(1, 5, size=int(flipped.sum()))) % 5
    return x, y, flipped


def _fit(callbacks: list, model: L.LightningModule, loader: Any, epochs: int, root: str) -> None:
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=root,
    )
    with _Quiet():
        trainer.fit(model, loader)


def part_source() -> str:
    rows = []
    res: Dict[str, List[List[float]]] = {"train": [], "eval": []}
    for seed in range(3):
        x, y, flipped = _five_class_digits(seed)
        for source in ("train", "eval"):
            L.seed_everything(seed, verbose=False)
            ds = IndexedDataset(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)))
            loader = DataLoader(
                ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
            )
            mon = MemorizationMonitor(["net.3"], source=source, seed=seed, progress=False)
            with tempfile.TemporaryDirectory() as root:
                mon.output_dir = os.path.join(root, "memo")
                _fit([mon], DigitsMLP(n_classes=5), loader, 3, root)
            res[source].append([auroc(-mon.scores_at(e), flipped) for e in range(3)])
    for source in ("train", "eval"):
        a = np.array(res[source])
        rows.append(
            [f'source="{source}"']
            + [f"{a[:, e].mean():.3f} ({', '.join(f'{v:.3f}' for v in a[:, e])})" for e in range(3)]
        )
    head = ["source", "epoch 0: mean (seeds 0, 1, 2)", "epoch 1", "epoch 2"]
    return md_table(head, rows)


class _Transformer(L.LightningModule):
    """Token embedding + learned positions, nn.TransformerEncoder, mean pool, linear head."""

    def __init__(self, layers: int = 4, d: int = 128, vocab: int = 1000, t: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(t, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.emb(input_ids) + self.pos, src_key_padding_mask=attention_mask == 0)
        w = attention_mask.unsqueeze(-1).float()
        return self.head((h * w).sum(1) / w.sum(1))

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(out, batch["label"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _token_items(n: int, t: int = 32, vocab: int = 1000, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    pref = (y.unsqueeze(1) * 20 + torch.randint(0, 20, (n, t), generator=g)) % vocab
    ids = torch.where(torch.rand(n, t, generator=g) < 0.15, pref, ids)
    mask = torch.ones(n, t, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "label": y[i]} for i in range(n)]


class _TimedMonitor(MemorizationMonitor):
    """Records the time of the eval pass alone."""

    def _eval_pass(self, trainer: Any, pl_module: Any) -> None:
        t0 = time.perf_counter()
        super()._eval_pass(trainer, pl_module)
        self.pass_seconds.append(time.perf_counter() - t0)


def part_stop() -> str:
    rows = []
    items = _token_items(3000)
    for layer in ("encoder.layers.0", "encoder.layers.3"):
        times: Dict[bool, List[float]] = {False: [], True: []}
        for _ in range(3):
            for stop in (False, True):
                L.seed_everything(0, verbose=False)
                loader = DataLoader(IndexedDataset(items), batch_size=64)
                mon = _TimedMonitor([layer], eval_stop_early=stop, n_estimators=100, progress=False)
                mon.pass_seconds = []
                with tempfile.TemporaryDirectory() as root:
                    mon.output_dir = os.path.join(root, "memo")
                    _fit([mon], _Transformer(), loader, 2, root)
                times[stop].append(float(np.median(mon.pass_seconds)))
        off, on = np.median(times[False]), np.median(times[True])
        rows.append([layer, f"{off:.2f}", f"{on:.2f}", f"{off / on:.2f}x"])
    head = [
        "monitored layer (of 4)",
        "eval pass s, eval_stop_early=False",
        "eval pass s, True",
        "speed-up",
    ]
    return md_table(head, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["directions", "source", "stop"], action="append")
    args = p.parse_args()
    parts = args.part or ["directions", "source", "stop"]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(md_table(["machine", ""], list(machine_info().items())))
    for part in parts:
        t0 = time.perf_counter()
        table = {"directions": part_directions, "source": part_source, "stop": part_stop}[part]()
        print(f"\n### {part} ({time.perf_counter() - t0:.0f} s)\n\n{table}")


if __name__ == "__main__":
    main()
