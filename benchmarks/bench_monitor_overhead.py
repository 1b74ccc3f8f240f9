"""Overhead of ``MemorizationMonitor`` on Lightning ``trainer.fit``: monitor vs no monitor.

Two benchmark models (``--model``, default both; all sizes are flags):

* ``transformer``, *representative: small transformer fine-tune*: synthetic token sequences,
  N = 6,000, vocabulary 1000, length 32, 10 classes (each class draws part of its tokens from its
  own small set of preferred tokens; 5 % of labels flipped), dict items ``{"input_ids",
  "attention_mask" (all ones), "label"}`` in ``IndexedDataset``; token embedding (1000, 128) +
  learned positions, ``nn.TransformerEncoder`` (2 layers, d_model 128, 4 heads, feed-forward 512,
  dropout 0, ``batch_first``), masked mean pool, ``Linear(128, 10)``; batch 64 (94 steps per
  epoch, about 6 s per epoch with one torch thread on the 2-core dev machine). Monitor layer
  ``encoder`` (output ``(B, 32, 128)``, ``pooling="mean"`` with the attention mask, d = 128).
  Training a sample costs far more than scoring its pooled features, as when fine-tuning a
  transformer, the tool's main use.
* ``mlp``, *worst case: tiny MLP*: synthetic Gaussian class clusters, N = 20,000, input dim 256,
  10 classes (5 % of labels flipped), ``TensorDataset`` in ``IndexedDataset``; MLP
  ``256 -> 512 -> ReLU -> 512 -> ReLU -> 10``; batch 128 (157 steps per epoch). Monitor layer
  ``net.3`` (output of the second ReLU, d = 512). One training epoch costs about as much as one
  PSMI evaluation, so the overhead ratio is as bad as it gets.

Common to both: cross-entropy, Adam (lr 1e-3), 3 epochs, ``DataLoader`` shuffled with
``num_workers=0``; monitor evaluated at every epoch (``every_n_epochs=1``), ``n_estimators=1000``
with ``directions="orthogonal"`` (the monitor's defaults; also 2000 Gaussian directions, the
paper's setting and the earlier default, for context), ``progress=False``; Trainer
``accelerator="cpu"``, ``devices=1``, ``logger=False`` by default (``--logger tb``: a
``TensorBoardLogger`` in a temporary folder, which adds the monitor's histograms and text table),
``enable_progress_bar=False``, ``enable_checkpointing=False``, ``enable_model_summary=False``;
``default_root_dir`` is a temporary folder, so the monitor's CSV/JSON files are written there
(their cost is part of the measured overhead, as in real use).

Protocol (per model): one untimed warm-up (a baseline fit and two monitor fits of one epoch), then
``--repeats`` rounds; each round runs, for every monitor configuration, a baseline fit immediately
followed by the monitor fit (so baseline and monitor runs alternate and each monitor run has a
paired baseline next to it in time). Every fit starts from ``seed_everything(seed)``, the same
initial weights and the same data order. Reported: median ``trainer.fit`` seconds, seconds per
epoch, ratio = median(monitor) / median(all baseline fits), the range of the paired ratios, the
ratio of minima and the CPU-time ratio.

Breakdown of each monitor configuration (medians over repeats, seconds per fit):

* ``epoch_end``: inside the monitor's ``on_train_epoch_end`` (all evaluated epochs), split into
  ``eval pass`` (``source="eval"`` only: the extra forward-only pass over the training set),
  ``PSMI`` (``_score_layer``: masks + ``PSMI.fit_transform``), ``files`` (``_write_files``: the
  per-epoch CSV, flagged.csv, history.json) and ``rest`` (gathers, flags, logging);
* ``hooks``: measured time of the monitor's training-loop work: ``on_train_start``,
  ``on_train_epoch_start``, ``on_train_batch_start/end`` (index/label reads and checks), the logits
  hook (per-sample loss/margin) and, for ``source="train"``, the feature-buffer writes of the layer
  hooks;
* ``unaccounted``: (monitor fit - paired baseline fit) - ``epoch_end`` - ``hooks`` (Lightning's
  callback dispatch, the forward-hook call itself, cache effects, and noise).

A standalone ``lightning_memo.PSMI(n_estimators=m, directions=..., return_full=False)
.fit_transform`` on the
``(N, d)`` features captured at the last epoch is timed too (``PSMI alone``).

Usage::

    python benchmarks/bench_monitor_overhead.py              # full run (both models), writes .md
    python benchmarks/bench_monitor_overhead.py --quick      # < 60 s smoke run, prints only
    python benchmarks/bench_monitor_overhead.py --model transformer --repeats 5 --threads 2

Targets (every_n_epochs=1): on the transformer, ratio <= 1.06 for ``source="train"`` and <= 1.30
for ``source="eval"``; on the tiny MLP (worst case) <= 2.0 for either source.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_memo import PSMI, IndexedDataset, MemorizationMonitor

TARGETS = {
    "transformer": {"train": 1.06, "eval": 1.30},
    "mlp": {"train": 2.0, "eval": 2.0},
}
FLIP = 0.05  # fraction of labels replaced by a random class (something to memorize)


# ---------------------------------------------------------------------------------------- sizes
@dataclass
class Sizes:
    """Benchmark sizes of one model (full run or ``--quick``)."""

    n: int
    n_classes: int
    hidden: int  # MLP hidden width / transformer d_model: the monitored feature dim d
    batch: int
    epochs: int
    estimators: Tuple[Tuple[int, str], Tuple[int, str]]  # (main, context): (m, directions)
    in_dim: int = 0  # MLP input dim
    vocab: int = 0  # transformer: vocabulary, sequence length, layers, heads, feed-forward width
    seq_len: int = 0
    n_layers: int = 0
    heads: int = 0
    ff: int = 0

    @property
    def steps(self) -> int:
        return -(-self.n // self.batch)


# ---------------------------------------------------------------------------------------- MLP
class BenchMLP(L.LightningModule):
    """MLP ``in_dim -> hidden -> ReLU -> hidden -> ReLU -> n_classes`` trained with Adam."""

    def __init__(self, in_dim: int, hidden: int, n_classes: int, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
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

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _flip_labels(y: torch.Tensor, n_classes: int, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(y.shape[0], generator=g) < FLIP
    return torch.where(flip, torch.randint(0, n_classes, y.shape, generator=g), y)


def make_mlp_dataset(sizes: Sizes, seed: int) -> IndexedDataset:
    """Gaussian clusters: x = mu_y + noise, with 5 % of the labels flipped.

    Returns:
        dataset of ``(x: (in_dim,), y: (), index: int)`` items.
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(sizes.n_classes, sizes.in_dim, generator=g)
    y = torch.randint(0, sizes.n_classes, (sizes.n,), generator=g)
    x = centres[y] * 0.5 + torch.randn(sizes.n, sizes.in_dim, generator=g)
    return IndexedDataset(TensorDataset(x, _flip_labels(y, sizes.n_classes, g)))


def describe_mlp(s: Sizes) -> str:
    return (
        f"Synthetic Gaussian class clusters, N = {s.n:,} samples, input dim {s.in_dim}, "
        f"{s.n_classes} classes ({FLIP:.0%} of labels flipped), tuple batches "
        f"(`TensorDataset` in `IndexedDataset`). MLP {s.in_dim}-{s.hidden}-ReLU-{s.hidden}-ReLU-"
        f"{s.n_classes}, cross-entropy, Adam (lr 1e-3), batch {s.batch} ({s.steps} steps per "
        f"epoch), {s.epochs} epochs. Monitor layer `net.3` (second ReLU, d = {s.hidden}). One "
        "training epoch of this model costs about as much as one PSMI evaluation of its features, "
        "so this is the worst case for the overhead ratio, not what the tool is used on."
    )


# --------------------------------------------------------------------------------- transformer
PREFERRED = 20  # preferred tokens per class
P_PREFERRED = 0.15  # probability that a position draws from its class's preferred tokens


class TokenDataset(Dataset):
    """Dict items ``{"input_ids": (T,) int64, "attention_mask": (T,) ones, "label": ()}``."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels
        self.mask = torch.ones(ids.shape[1], dtype=torch.long)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask, "label": self.labels[i]}


def make_token_dataset(sizes: Sizes, seed: int) -> IndexedDataset:
    """Token sequences: each position draws, with probability ``P_PREFERRED``, one of its class's
    ``PREFERRED`` tokens, otherwise a uniform token; 5 % of the labels flipped.

    Returns:
        dataset of dict items (see :class:`TokenDataset`) plus ``"index"``.
    """
    g = torch.Generator().manual_seed(seed)
    n, t, c, v = sizes.n, sizes.seq_len, sizes.n_classes, sizes.vocab
    preferred = torch.stack([torch.randperm(v, generator=g)[:PREFERRED] for _ in range(c)])
    y = torch.randint(0, c, (n,), generator=g)
    pick = torch.randint(0, PREFERRED, (n, t), generator=g)
    own = preferred[y[:, None], pick]  # (n, t)
    uniform = torch.randint(0, v, (n, t), generator=g)
    ids = torch.where(torch.rand(n, t, generator=g) < P_PREFERRED, own, uniform)
    return IndexedDataset(TokenDataset(ids, _flip_labels(y, c, g)))


class BenchTransformer(L.LightningModule):
    """Token + learned position embeddings, ``nn.TransformerEncoder``, masked mean pool, linear."""

    def __init__(self, s: Sizes, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.embed = nn.Embedding(s.vocab, s.hidden)
        self.pos = nn.Embedding(s.seq_len, s.hidden)
        layer = nn.TransformerEncoderLayer(
            s.hidden, s.heads, dim_feedforward=s.ff, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, s.n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(s.hidden, s.n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, T) -> logits (B, n_classes)."""
        t = input_ids.shape[1]
        h = self.embed(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)  # (B, T, d)
        w = attention_mask.to(h.dtype).unsqueeze(-1)
        return self.head((h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1))

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits, batch["label"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def describe_transformer(s: Sizes) -> str:
    return (
        f"Synthetic token sequences, N = {s.n:,} samples, vocabulary {s.vocab}, length "
        f"{s.seq_len}, {s.n_classes} classes (each position draws with probability "
        f"{P_PREFERRED:.2f} one of its class's {PREFERRED} preferred tokens, otherwise a uniform "
        f"token; {FLIP:.0%} of labels flipped), dict batches `input_ids`, `attention_mask` (all "
        "ones), `label`, `index` (dict items in `IndexedDataset`). Model: token embedding "
        f"({s.vocab}, {s.hidden}) + learned positions, `nn.TransformerEncoder` ({s.n_layers} "
        f"layers, d_model {s.hidden}, {s.heads} heads, feed-forward {s.ff}, dropout 0, "
        f"`batch_first`), mean pool over the attention mask, linear {s.hidden} -> {s.n_classes}; "
        f"cross-entropy, Adam (lr 1e-3), batch {s.batch} ({s.steps} steps per epoch), "
        f"{s.epochs} epochs, from random initialisation (a stand-in for a fine-tune: what matters "
        "here is that training a sample costs far more than scoring its pooled features). Monitor "
        f"layer `encoder` (output (B, {s.seq_len}, {s.hidden}), `pooling='mean'` with the "
        f"attention mask, d = {s.hidden}); the `eval` pass uses the monitor's default forward "
        "`module(input_ids=..., attention_mask=...)`."
    )


# ---------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Bench:
    """One benchmark model: sizes, data, model, monitored layer and its description."""

    key: str
    title: str
    layer: str
    full: Sizes
    quick: Sizes
    make_data: Callable[[Sizes, int], IndexedDataset]
    make_model: Callable[[Sizes], L.LightningModule]
    describe: Callable[[Sizes], str]


BENCHES = {
    "transformer": Bench(
        key="transformer",
        title="Representative: small transformer fine-tune",
        layer="encoder",
        full=Sizes(
            n=6_000,
            n_classes=10,
            hidden=128,
            batch=64,
            epochs=3,
            estimators=((1000, "orthogonal"), (2000, "gaussian")),
            vocab=1000,
            seq_len=32,
            n_layers=2,
            heads=4,
            ff=512,
        ),
        quick=Sizes(
            n=256,
            n_classes=10,
            hidden=32,
            batch=64,
            epochs=2,
            estimators=((100, "orthogonal"), (200, "gaussian")),
            vocab=1000,
            seq_len=16,
            n_layers=2,
            heads=4,
            ff=64,
        ),
        make_data=make_token_dataset,
        make_model=BenchTransformer,
        describe=describe_transformer,
    ),
    "mlp": Bench(
        key="mlp",
        title="Worst case: tiny MLP",
        layer="net.3",
        full=Sizes(
            n=20_000,
            n_classes=10,
            hidden=512,
            batch=128,
            epochs=3,
            estimators=((1000, "orthogonal"), (2000, "gaussian")),
            in_dim=256,
        ),
        quick=Sizes(
            n=512,
            n_classes=10,
            hidden=64,
            batch=128,
            epochs=2,
            estimators=((100, "orthogonal"), (200, "gaussian")),
            in_dim=32,
        ),
        make_data=make_mlp_dataset,
        make_model=lambda s: BenchMLP(s.in_dim, s.hidden, s.n_classes),
        describe=describe_mlp,
    ),
}
ORDER = ("transformer", "mlp")  # report order: representative first


# ---------------------------------------------------------------------------------------- timing
class TimedMonitor(MemorizationMonitor):
    """``MemorizationMonitor`` adding up the seconds of its training-loop and epoch-end work."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timings: Dict[str, float] = dict.fromkeys(
            ("epoch_end", "eval", "psmi", "files", "hooks"), 0.0
        )

    def _timed(self, key: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.timings[key] += time.perf_counter() - t0

    # per-batch work of the training loop ("hooks"): batch start/end, logits hook, buffer writes
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._timed("hooks", super().on_train_start, trainer, pl_module)
        if self.source == "train":  # time the buffer writes of the forward hooks in training
            record = self.capture.record
            self.capture.record = lambda *a: self._timed("hooks", record, *a)  # type: ignore

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._timed("hooks", super().on_train_epoch_start, trainer, pl_module)

    def on_train_batch_start(self, *args: Any) -> None:
        self._timed("hooks", super().on_train_batch_start, *args)

    def on_train_batch_end(self, *args: Any) -> None:
        self._timed("hooks", super().on_train_batch_end, *args)

    def _logit_hook(self, *args: Any) -> None:
        self._timed("hooks", super()._logit_hook, *args)

    # epoch end
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._timed("epoch_end", super().on_train_epoch_end, trainer, pl_module)

    def _eval_pass(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._timed("eval", super()._eval_pass, trainer, pl_module)

    def _score_layer(self, *args: Any) -> Any:
        return self._timed("psmi", super()._score_layer, *args)

    def _write_files(self, *args: Any) -> None:
        self._timed("files", super()._write_files, *args)


@dataclass
class Config:
    """One benchmark row: no monitor (``source=None``) or a monitor configuration."""

    name: str
    source: Optional[str] = None
    n_estimators: int = 0
    directions: str = "orthogonal"
    times: List[float] = field(default_factory=list)
    cpu: List[float] = field(default_factory=list)  # process CPU seconds (less sensitive to load)
    paired: List[float] = field(default_factory=list)  # paired baseline time of each run
    parts: List[Dict[str, float]] = field(default_factory=list)


@dataclass
class Result:
    """Measurements of one benchmark model."""

    bench: Bench
    sizes: Sizes
    configs: List[Config]
    psmi_alone: Dict[Tuple[int, str], float]  # (m, directions) -> seconds per call
    feat_shape: Tuple[int, int]
    wall: float


def fit_once(
    ds: IndexedDataset,
    bench: Bench,
    sizes: Sizes,
    source: Optional[str],
    n_estimators: int,
    directions: str,
    logger: str,
    epochs: int,
    seed: int,
) -> Tuple[float, float, Optional[TimedMonitor]]:
    """One ``trainer.fit``; returns its wall seconds, its process CPU seconds (all threads) and
    the monitor (``None`` for the baseline)."""
    L.seed_everything(seed, verbose=False)
    model = bench.make_model(sizes)
    loader = DataLoader(
        ds, batch_size=sizes.batch, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    with tempfile.TemporaryDirectory(prefix="bench_monitor_") as tmp:
        callbacks = []
        monitor = None
        if source is not None:
            monitor = TimedMonitor(
                layers=[bench.layer],
                source=source,
                pooling="mean",
                every_n_epochs=1,
                n_estimators=n_estimators,
                directions=directions,
                seed=seed,
                progress=False,
            )
            callbacks.append(monitor)
        lg: Any = False
        if logger == "tb":
            lg = L.pytorch.loggers.TensorBoardLogger(tmp, name="bench")
        trainer = L.Trainer(
            max_epochs=epochs,
            callbacks=callbacks,
            logger=lg,
            default_root_dir=tmp,
            accelerator="cpu",
            devices=1,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
        )
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.fit(model, loader)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return secs, cpu, monitor


def time_psmi_alone(
    feats: torch.Tensor, labels: torch.Tensor, m: int, directions: str, repeats: int
) -> float:
    """Median seconds of ``PSMI(n_estimators=m, directions=...).fit_transform`` on
    ``feats: (N, d)``."""
    out = []
    for r in range(repeats):
        est = PSMI(n_estimators=m, seed=r, directions=directions, return_full=False)
        t0 = time.perf_counter()
        est.fit_transform(feats, labels)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def run_bench(bench: Bench, sizes: Sizes, args: argparse.Namespace) -> Result:
    """Warm-up, ``args.repeats`` alternating rounds and the standalone PSMI timing of one model."""
    t_start = time.perf_counter()
    ds = bench.make_data(sizes, args.seed)
    configs = [Config("baseline (no monitor)")]
    for m, kind in sizes.estimators:
        for src in ("eval", "train"):
            configs.append(Config(_config_name(src, m, kind), src, m, kind))

    def fit(source: Optional[str], m: int, kind: str, epochs: int) -> Tuple[float, float, Any]:
        return fit_once(ds, bench, sizes, source, m, kind, args.logger, epochs, args.seed)

    print(f"[{bench.key}] warm-up ({sizes.n} samples, 1 epoch) ...", flush=True)
    m_ctx, kind_ctx = sizes.estimators[1]
    fit(None, 0, "", 1)
    fit("train", m_ctx, kind_ctx, 1)
    fit("eval", m_ctx, kind_ctx, 1)

    feats = labels = None
    for r in range(args.repeats):
        for c in configs[1:]:
            tb, cb, _ = fit(None, 0, "", sizes.epochs)
            configs[0].times.append(tb)
            configs[0].cpu.append(cb)
            tm, cm, mon = fit(c.source, c.n_estimators, c.directions, sizes.epochs)
            c.times.append(tm)
            c.cpu.append(cm)
            c.paired.append(tb)
            c.parts.append(dict(mon.timings))
            print(
                f"[{bench.key}] round {r + 1}/{args.repeats}: baseline {tb:6.2f} s | "
                f"{c.name:<44} {tm:6.2f} s (x{tm / tb:.2f}; epoch_end "
                f"{mon.timings['epoch_end']:.2f} s, PSMI {mon.timings['psmi']:.2f} s)",
                flush=True,
            )
            if feats is None and mon.capture is not None and bench.layer in mon.capture.buffers:
                seen = mon.capture.seen[bench.layer]
                feats = mon.capture.buffers[bench.layer][seen].clone()
                labels = mon._labels[seen].clone()

    if feats is None:  # fall back to synthetic ReLU features
        feats = torch.randn(sizes.n, sizes.hidden).relu_()
        labels = torch.randint(0, sizes.n_classes, (sizes.n,))
    psmi_alone = {
        (m, kind): time_psmi_alone(feats, labels, m, kind, args.repeats)
        for m, kind in sizes.estimators
    }
    for (m, kind), s in psmi_alone.items():
        print(
            f"[{bench.key}] PSMI alone on {tuple(feats.shape)}, {_est_name(m, kind)}: {s:.2f} s "
            "per call",
            flush=True,
        )
    shape = (int(feats.shape[0]), int(feats.shape[1]))
    return Result(bench, sizes, configs, psmi_alone, shape, time.perf_counter() - t_start)


# ---------------------------------------------------------------------------------------- report
def machine_info() -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    busy = ""
    try:
        avg = os.getloadavg()
        load = ", ".join(f"{v:.2f}" for v in avg)
        if avg[0] > 0.5 * (os.cpu_count() or 1):
            busy = (
                f"the machine was busy at start (load {avg[0]:.1f} on {os.cpu_count()} cores): "
                "times are noisy, rerun on a quiet machine before quoting them"
            )
    except OSError:
        load = "n/a"
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{cpu} ({os.cpu_count()} logical cores)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "threads": f"torch.get_num_threads() = {torch.get_num_threads()}",
        "load": f"load average at start (1, 5, 15 min): {load}",
        "busy": busy,
    }


def _est_name(m: int, kind: str) -> str:
    return f'n_estimators={m}, directions="{kind}"'


def _config_name(source: str, m: int, kind: str) -> str:
    return f'source="{source}", {_est_name(m, kind)}'


def _is_main(res: Result, c: Config) -> bool:
    return (c.n_estimators, c.directions) == res.sizes.estimators[0]


def _med(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _verdict(res: Result, c: Config, quick: bool) -> str:
    """Target verdict of a monitor configuration at the main estimator setting, else
    "(context)"."""
    if not _is_main(res, c):
        return "(context)"
    target = TARGETS[res.bench.key][c.source]
    ratio = _med(c.times) / _med(res.configs[0].times)
    verdict = f"<= {target:.2f}: {'met' if ratio <= target else '**missed**'}"
    if quick:
        verdict += " (quick sizes: not the benchmark's model)"
    return verdict


def summary_table(results: List[Result], quick: bool) -> str:
    """One row per model and monitor configuration at the main estimator setting."""
    lines = [
        "| model | configuration | s / epoch (baseline) | ratio | paired ratios | CPU-time ratio "
        "| target |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for res in results:
        base = res.configs[0]
        b_epoch = _med(base.times) / res.sizes.epochs
        for c in res.configs[1:]:
            if not _is_main(res, c):
                continue
            pr = [t / p for t, p in zip(c.times, c.paired)]
            lines.append(
                f"| {res.bench.key} ({res.bench.title.split(':')[0].lower()}) | {c.name} | "
                f"{b_epoch:.2f} | {_med(c.times) / _med(base.times):.2f} | "
                f"{min(pr):.2f}-{max(pr):.2f} | {_med(c.cpu) / _med(base.cpu):.2f} | "
                f"{_verdict(res, c, quick)} |"
            )
    return "\n".join(lines)


def fit_table(res: Result, quick: bool) -> str:
    base, sizes = res.configs[0], res.sizes
    b_med, bc_med, b_min = _med(base.times), _med(base.cpu), min(base.times)
    lines = [
        "| configuration | fit s (median) | s / epoch | ratio | paired ratios | ratio of minima "
        "| CPU-time ratio | target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in res.configs:
        med = _med(c.times)
        if c.source is None:
            lines.append(
                f"| {c.name} | {med:.2f} | {med / sizes.epochs:.2f} | 1.00 | - | 1.00 | 1.00 | - |"
            )
            continue
        pr = [t / p for t, p in zip(c.times, c.paired)]
        lines.append(
            f"| {c.name} | {med:.2f} | {med / sizes.epochs:.2f} | {med / b_med:.2f} | "
            f"{min(pr):.2f}-{max(pr):.2f} | {min(c.times) / b_min:.2f} | "
            f"{_med(c.cpu) / bc_med:.2f} | {_verdict(res, c, quick)} |"
        )
    return "\n".join(lines)


def breakdown_table(res: Result) -> str:
    rows = [
        "| configuration | overhead | epoch_end | eval pass | PSMI | files | rest of epoch_end | "
        "hooks | unaccounted | PSMI alone |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in res.configs[1:]:
        over = _med([t - p for t, p in zip(c.times, c.paired)])
        ee = _med([p["epoch_end"] for p in c.parts])
        ev = _med([p["eval"] for p in c.parts])
        ps = _med([p["psmi"] for p in c.parts])
        fi = _med([p["files"] for p in c.parts])
        rest = _med([p["epoch_end"] - p["eval"] - p["psmi"] - p["files"] for p in c.parts])
        hk = _med([p["hooks"] for p in c.parts])
        left = _med(
            [t - p - q["epoch_end"] - q["hooks"] for t, p, q in zip(c.times, c.paired, c.parts)]
        )
        alone = res.psmi_alone.get((c.n_estimators, c.directions), float("nan"))
        alone *= res.sizes.epochs
        rows.append(
            f"| {c.name} | {over:.2f} | {ee:.2f} | {ev:.2f} | {ps:.2f} | {fi:.2f} | {rest:.2f} | "
            f"{hk:.2f} | {left:.2f} | {alone:.2f} |"
        )
    return "\n".join(rows)


def summary_lines(res: Result) -> List[str]:
    """One generated paragraph per monitor configuration: verdict and dominant part."""
    configs, sizes = res.configs, res.sizes
    b_med = _med(configs[0].times)
    b_epoch = b_med / sizes.epochs
    out = [
        f"Baseline: {b_epoch:.2f} s per epoch, so the targets allow "
        f"{(TARGETS[res.bench.key]['train'] - 1) * b_epoch:.2f} s (`train`) and "
        f"{(TARGETS[res.bench.key]['eval'] - 1) * b_epoch:.2f} s (`eval`) of monitor work per "
        "evaluated epoch. "
        + "PSMI alone takes "
        + ", ".join(
            f"{s:.2f} s per epoch at {_est_name(m, kind)}"
            for (m, kind), s in res.psmi_alone.items()
        )
        + "."
    ]
    for c in configs[1:]:
        over = _med([t - p for t, p in zip(c.times, c.paired)])
        parts = {
            "PSMI": _med([p["psmi"] for p in c.parts]),
            "eval pass": _med([p["eval"] for p in c.parts]),
            "files": _med([p["files"] for p in c.parts]),
            "training-loop hooks": _med([p["hooks"] for p in c.parts]),
        }
        top = max(parts, key=lambda k: parts[k])
        total = sum(parts.values())
        ratio = _med(c.times) / b_med
        out.append(
            f"{c.name}: x{ratio:.2f}, {over / sizes.epochs:+.2f} s per epoch (paired); of the "
            f"measured monitor work ({total / sizes.epochs:.2f} s per epoch) the largest part is "
            f"{top} ({parts[top] / sizes.epochs:.2f} s per epoch, {parts[top] / total:.0%})."
        )
    return out


def model_section(res: Result, quick: bool) -> List[str]:
    """Paragraphs of one model: description, fit-time table, breakdown, reading."""
    sizes = res.sizes
    per_call = ", ".join(f"{_est_name(m, k)}: {s:.2f} s" for (m, k), s in res.psmi_alone.items())
    return [
        f"## {res.bench.title}",
        f"**Benchmark model (`--model {res.bench.key}`).** {res.bench.describe(sizes)} Wall time "
        f"of this part {res.wall:.0f} s.",
        "### Fit time",
        fit_table(res, quick),
        f"### Where the overhead goes (seconds per fit, {sizes.epochs} evaluated epochs, medians)",
        breakdown_table(res),
        f"*PSMI alone* here: on the {res.feat_shape} features captured at the last epoch, times "
        f"{sizes.epochs} epochs (per call: {per_call}).",
        "### Reading",
        *summary_lines(res),
    ]


def build_report(
    results: List[Result], args: argparse.Namespace, info: Dict[str, str], wall: float
) -> str:
    logger = "`logger=False`" if args.logger == "none" else "a `TensorBoardLogger` in a temp folder"
    cmd = " ".join(["python", "benchmarks/bench_monitor_overhead.py", *sys.argv[1:]])
    main, ctx = results[0].sizes.estimators
    default_note = (
        "the monitor's defaults"
        if main == (1000, "orthogonal")
        else "quick stand-in for the defaults, 1000 orthogonal"
    )
    names = " and ".join(f"*{r.bench.title[0].lower()}{r.bench.title[1:]}*" for r in results)
    paras = [
        "# MemorizationMonitor overhead on `trainer.fit`",
        f"Generated by `{cmd}` ({'quick smoke sizes' if args.quick else 'full sizes'}); wall "
        f"time of the whole benchmark {wall:.0f} s."
        + (f" **Warning:** {info['busy']}." if info["busy"] else ""),
        f"**Models.** {names} (section{'s' if len(results) > 1 else ''} below). The overhead "
        "ratio depends on how much a training step costs next to scoring the pooled features of "
        "its samples: the small transformer stands for the tool's use (fine-tuning transformers, "
        "where training a sample costs far more than scoring it); the tiny MLP, whose training "
        "epoch costs about as much as one PSMI evaluation, bounds the ratio from above.",
        "**Common settings.** Cross-entropy, Adam (lr 1e-3), shuffled `DataLoader` with "
        "`num_workers=0`. Monitor: one layer, `every_n_epochs=1`, `progress=False`, seed 0, other "
        f"arguments default. Trainer: `accelerator='cpu'`, `devices=1`, {logger}, "
        "`enable_progress_bar=False`, `enable_checkpointing=False`, "
        "`enable_model_summary=False`; the monitor writes its CSV/JSON files under a temporary "
        "`default_root_dir` (included in the times).",
        "**Protocol (per model).** Untimed warm-up (one baseline fit and two monitor fits of one "
        f"epoch), then {args.repeats} round(s); in each round every monitor fit directly follows "
        "its own baseline fit (alternating). Same seed, initial weights and data order in every "
        "fit. *ratio* = median monitor fit / median of all baseline fits of that model (wall "
        "time); *paired ratios* = range of (monitor fit / the baseline fit just before it); "
        "*ratio of minima* = fastest monitor fit / fastest baseline fit (robust to load "
        "spikes); *CPU-time ratio* = the same ratio of medians with process CPU time (all "
        "threads), less sensitive to other load on the machine. Targets: "
        f"transformer <= {TARGETS['transformer']['train']:.2f}x for `source='train'`, "
        f"<= {TARGETS['transformer']['eval']:.2f}x for `source='eval'`; tiny MLP (worst case) "
        f"<= {TARGETS['mlp']['train']:.1f}x for either, at `{_est_name(*main)}` ({default_note}); "
        f"`{_est_name(*ctx)}` (the paper's setting and the earlier default) is context.",
        "**Breakdown columns.** *overhead* = monitor fit - paired baseline fit. *epoch_end* = time "
        "inside the monitor's `on_train_epoch_end` (all epochs), split into *eval pass* (the "
        "extra forward-only pass of `source='eval'`, under `torch.inference_mode`), *PSMI* "
        "(`_score_layer`: masks and "
        "`PSMI.fit_transform`), *files* (`epoch_<E>.csv`, `flagged.csv`, `history.json`) and the "
        "*rest* (gathers, flags, `log`). *hooks* = measured time of the monitor's training-loop "
        "work (`on_train_start`, `on_train_epoch_start`, `on_train_batch_start/end` with the "
        "index and label reads, the logits hook computing per-sample loss and margin, and for "
        "`source='train'` the feature-buffer writes of the layer hooks). *unaccounted* = "
        "overhead - epoch_end - hooks (callback dispatch, cache effects and noise: a "
        "difference of two fits, so it can be negative). *PSMI alone* = standalone "
        "`PSMI(n_estimators=m, directions=..., return_full=False).fit_transform` on the (N, d) "
        "features captured "
        "at the last epoch, times the number of epochs.",
        f"## Summary ({_est_name(*main)})",
        summary_table(results, args.quick),
    ]
    for res in results:
        paras += model_section(res, args.quick)
    paras += [
        "## Machine",
        "\n".join(
            [
                f"- date: {info['date']}",
                f"- CPU: {info['cpu']}",
                f"- Python {info['python']}, torch {info['torch']}, lightning {info['lightning']}",
                f"- threads: {info['threads']}",
                f"- {info['load']}",
            ]
        ),
    ]
    return "\n\n".join(_wrap(p) for p in paras) + "\n"


def _wrap(paragraph: str) -> str:
    """Wrap prose paragraphs at 100 columns; headings, tables and lists stay as they are."""
    if paragraph.startswith(("#", "|", "- ")):
        return paragraph
    return textwrap.fill(paragraph, width=100, break_long_words=False, break_on_hyphens=False)


# ---------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        choices=("both", *ORDER),
        default="both",
        help="benchmark model: transformer (representative), mlp (worst case) or both (default)",
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed rounds (default 3; 1 with --quick)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes for a < 60 s smoke run of both models (prints only unless --out is given)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="markdown output (default docs/benchmarks_monitor.md; none with --quick; "
        "'-' to print only)",
    )
    p.add_argument(
        "--logger",
        choices=("none", "tb"),
        default="none",
        help="logger=False (default) or a TensorBoardLogger in a temporary folder",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)"
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="override the number of epochs (every model)"
    )
    p.add_argument(
        "--n", type=int, default=None, help="override the number of samples (every model)"
    )
    p.add_argument(
        "--hidden",
        type=int,
        default=None,
        help="override the monitored width d (MLP hidden width, transformer d_model; every model)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    keys = ORDER if args.model == "both" else (args.model,)
    plan: List[Tuple[Bench, Sizes]] = []
    for key in keys:
        bench = BENCHES[key]
        sizes = bench.quick if args.quick else bench.full
        for name in ("epochs", "n", "hidden"):
            if getattr(args, name):
                sizes = dataclasses.replace(sizes, **{name: getattr(args, name)})
        if sizes.heads and sizes.hidden % sizes.heads:
            p.error(f"--hidden {sizes.hidden} must be a multiple of the {sizes.heads} heads")
        plan.append((bench, sizes))
    out = args.out
    if out is None and not args.quick:
        out = os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks_monitor.md"
        )
    if out == "-":
        out = None

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", "MemorizationMonitor early warning.*")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

    info = machine_info()
    t_start = time.perf_counter()
    results = [run_bench(bench, sizes, args) for bench, sizes in plan]
    wall = time.perf_counter() - t_start
    md = build_report(results, args, info, wall)
    print()
    print(md)
    if out:
        out = os.path.abspath(out)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            f.write(md)
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
