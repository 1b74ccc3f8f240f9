"""Overhead of ``MemorizationMonitor`` on Lightning ``trainer.fit``: monitor vs no monitor.

Benchmark model (the "representative" case of the issue; all sizes are flags):

* data: synthetic Gaussian class clusters, N = 20,000 samples, input dim 256, 10 classes
  (``TensorDataset`` wrapped in ``IndexedDataset``; ``DataLoader`` batch 128, shuffled,
  ``num_workers=0``, so 157 steps per epoch);
* model: MLP ``256 -> 512 -> ReLU -> 512 -> ReLU -> 10``, cross-entropy, Adam (lr 1e-3), 3 epochs;
* monitor: one hidden layer, ``net.3`` (output of the second ReLU, d = 512), evaluated at every
  epoch (``every_n_epochs=1``), ``n_estimators=2000`` (the monitor's default), ``progress=False``;
  also ``n_estimators=500`` for context;
* Trainer: ``accelerator="cpu"``, ``devices=1``, ``logger=False`` by default (``--logger tb``: a
  ``TensorBoardLogger`` in a temporary folder, which adds the monitor's histograms and text table),
  ``enable_progress_bar=False``, ``enable_checkpointing=False``, ``enable_model_summary=False``;
  ``default_root_dir`` is a temporary folder, so the monitor's CSV/JSON files are written there
  (their cost is part of the measured overhead, as in real use).

Protocol: one untimed warm-up (a baseline fit and two monitor fits of one epoch), then
``--repeats`` rounds; each round runs, for every monitor configuration, a baseline fit immediately
followed by the monitor fit (so baseline and monitor runs alternate and each monitor run has a
paired baseline next to it in time). Every fit starts from ``seed_everything(seed)``, the same
initial weights and the same data order. Reported: median ``trainer.fit`` seconds, seconds per
epoch, ratio = median(monitor) / median(all baseline fits), and the range of the paired ratios.

Breakdown of each monitor configuration (medians over repeats, seconds per fit):

* ``epoch_end``: inside the monitor's ``on_train_epoch_end`` (all evaluated epochs), split into
  ``eval pass`` (``source="eval"`` only: the extra no-grad pass over the training set),
  ``PSMI`` (``_score_layer``: masks + ``PSMI.fit_transform``), ``files`` (``_write_files``: the
  per-epoch CSV, flagged.csv, history.json) and ``rest`` (gathers, flags, logging);
* ``hooks``: measured time of the monitor's training-loop work: ``on_train_start``,
  ``on_train_epoch_start``, ``on_train_batch_start/end`` (index/label reads and checks), the logits
  hook (per-sample loss/margin) and, for ``source="train"``, the feature-buffer writes of the layer
  hooks;
* ``unaccounted``: (monitor fit - paired baseline fit) - ``epoch_end`` - ``hooks`` (Lightning's
  callback dispatch, the forward-hook call itself, cache effects, and noise).

A standalone ``lightning_memo.PSMI(n_estimators=m, return_full=False).fit_transform`` on the
``(N, 512)`` features captured at the last epoch is timed too (``PSMI alone``).

Usage::

    python benchmarks/bench_monitor_overhead.py              # full run, writes the markdown file
    python benchmarks/bench_monitor_overhead.py --quick      # < 30 s smoke run, prints only
    python benchmarks/bench_monitor_overhead.py --repeats 5 --threads 2 --logger tb

Issue targets (every_n_epochs=1): ratio <= 1.10 for ``source="train"``, <= 1.40 for
``source="eval"``.
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
from typing import Any, Dict, List, Optional, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_memo import PSMI, IndexedDataset, MemorizationMonitor

TARGETS = {"train": 1.10, "eval": 1.40}
LAYER = "net.3"


# ---------------------------------------------------------------------------------------- model
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


def make_dataset(n: int, in_dim: int, n_classes: int, seed: int) -> IndexedDataset:
    """Gaussian clusters: x = mu_y + noise, with 5 % of the labels flipped (something to memorize).

    Returns:
        dataset of ``(x: (in_dim,), y: (), index: int)`` items.
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, in_dim, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = centres[y] * 0.5 + torch.randn(n, in_dim, generator=g)
    flip = torch.rand(n, generator=g) < 0.05
    y = torch.where(flip, torch.randint(0, n_classes, (n,), generator=g), y)
    return IndexedDataset(TensorDataset(x, y))


@dataclass
class Sizes:
    """Benchmark sizes (full run or ``--quick``)."""

    n: int
    in_dim: int
    hidden: int
    n_classes: int
    batch: int
    epochs: int
    estimators: Tuple[int, int]  # (main, context)


FULL = Sizes(
    n=20_000, in_dim=256, hidden=512, n_classes=10, batch=128, epochs=3, estimators=(2000, 500)
)
QUICK = Sizes(
    n=1_024, in_dim=32, hidden=64, n_classes=10, batch=128, epochs=2, estimators=(200, 50)
)


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
    times: List[float] = field(default_factory=list)
    cpu: List[float] = field(default_factory=list)  # process CPU seconds (less sensitive to load)
    paired: List[float] = field(default_factory=list)  # paired baseline time of each run
    parts: List[Dict[str, float]] = field(default_factory=list)


def fit_once(
    ds: IndexedDataset,
    sizes: Sizes,
    source: Optional[str],
    n_estimators: int,
    logger: str,
    epochs: int,
    seed: int,
) -> Tuple[float, float, Optional[TimedMonitor]]:
    """One ``trainer.fit``; returns its wall seconds, its process CPU seconds (all threads) and
    the monitor (``None`` for the baseline)."""
    L.seed_everything(seed, verbose=False)
    model = BenchMLP(sizes.in_dim, sizes.hidden, sizes.n_classes)
    loader = DataLoader(
        ds, batch_size=sizes.batch, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    with tempfile.TemporaryDirectory(prefix="bench_monitor_") as tmp:
        callbacks = []
        monitor = None
        if source is not None:
            monitor = TimedMonitor(
                layers=[LAYER],
                source=source,
                every_n_epochs=1,
                n_estimators=n_estimators,
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


def time_psmi_alone(feats: torch.Tensor, labels: torch.Tensor, m: int, repeats: int) -> float:
    """Median seconds of ``PSMI(n_estimators=m).fit_transform`` on ``feats: (N, d)``."""
    out = []
    for r in range(repeats):
        est = PSMI(n_estimators=m, seed=r, return_full=False)
        t0 = time.perf_counter()
        est.fit_transform(feats, labels)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


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


def _med(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def build_report(
    configs: List[Config],
    psmi_alone: Dict[int, float],
    sizes: Sizes,
    args: argparse.Namespace,
    info: Dict[str, str],
    wall: float,
) -> str:
    base = configs[0]
    b_med = _med(base.times)
    lines = []
    bc_med = _med(base.cpu)
    b_min = min(base.times)
    lines.append(
        "| configuration | fit s (median) | s / epoch | ratio | paired ratios | ratio of minima "
        "| CPU-time ratio | target |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---|")
    for c in configs:
        med = _med(c.times)
        if c.source is None:
            lines.append(
                f"| {c.name} | {med:.2f} | {med / sizes.epochs:.2f} | 1.00 | - | 1.00 | 1.00 | - |"
            )
            continue
        ratio = med / b_med
        cpu_ratio = _med(c.cpu) / bc_med
        pr = [t / p for t, p in zip(c.times, c.paired)]
        target = TARGETS[c.source]
        if c.n_estimators == sizes.estimators[0]:
            verdict = f"<= {target:.2f}: {'met' if ratio <= target else '**missed**'}"
            if args.quick:
                verdict += " (quick sizes: not the issue's model)"
        else:
            verdict = "(context)"
        lines.append(
            f"| {c.name} | {med:.2f} | {med / sizes.epochs:.2f} | {ratio:.2f} | "
            f"{min(pr):.2f}-{max(pr):.2f} | {min(c.times) / b_min:.2f} | {cpu_ratio:.2f} | "
            f"{verdict} |"
        )
    table = "\n".join(lines)

    rows = [
        "| configuration | overhead | epoch_end | eval pass | PSMI | files | rest of epoch_end | "
        "hooks | unaccounted | PSMI alone |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in configs[1:]:
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
        alone = psmi_alone.get(c.n_estimators, float("nan")) * sizes.epochs
        rows.append(
            f"| {c.name} | {over:.2f} | {ee:.2f} | {ev:.2f} | {ps:.2f} | {fi:.2f} | {rest:.2f} | "
            f"{hk:.2f} | {left:.2f} | {alone:.2f} |"
        )
    breakdown = "\n".join(rows)

    per_epoch = ", ".join(
        f"n_estimators={m}: {s:.2f} s" for m, s in sorted(psmi_alone.items(), reverse=True)
    )
    logger = "`logger=False`" if args.logger == "none" else "a `TensorBoardLogger` in a temp folder"
    cmd = " ".join(["python", "benchmarks/bench_monitor_overhead.py", *sys.argv[1:]])
    steps = -(-sizes.n // sizes.batch)
    m_main, m_ctx = sizes.estimators
    default_note = (
        "the monitor default" if m_main == 2000 else "quick stand-in for the default 2000"
    )
    paras = [
        "# MemorizationMonitor overhead on `trainer.fit`",
        f"Generated by `{cmd}` ({'quick smoke sizes' if args.quick else 'full sizes'}); wall "
        f"time of the whole benchmark {wall:.0f} s."
        + (f" **Warning:** {info['busy']}." if info["busy"] else ""),
        f"**Benchmark model.** Synthetic Gaussian class clusters, N = {sizes.n:,} samples, input "
        f"dim {sizes.in_dim}, {sizes.n_classes} classes (5 % of labels flipped). MLP "
        f"{sizes.in_dim}-{sizes.hidden}-ReLU-{sizes.hidden}-ReLU-{sizes.n_classes}, "
        f"cross-entropy, Adam (lr 1e-3), batch {sizes.batch} ({steps} steps per epoch), "
        f"{sizes.epochs} epochs, `num_workers=0`. Monitor: layer `{LAYER}` (second ReLU, "
        f"d = {sizes.hidden}), `every_n_epochs=1`, `progress=False`, seed 0, other arguments "
        f"default. Trainer: `accelerator='cpu'`, `devices=1`, {logger}, "
        "`enable_progress_bar=False`, `enable_checkpointing=False`, "
        "`enable_model_summary=False`; the monitor writes its CSV/JSON files under a temporary "
        "`default_root_dir` (included in the times).",
        "**Protocol.** Untimed warm-up (one baseline fit and two monitor fits of one epoch), then "
        f"{args.repeats} round(s); in each round every monitor fit directly follows its own "
        "baseline fit (alternating). Same seed, initial weights and data order in every fit. "
        f"*ratio* = median monitor fit / median of all {len(base.times)} baseline fits (wall "
        "time); *paired ratios* = range of (monitor fit / the baseline fit just before it); "
        "*ratio of minima* = fastest monitor fit / fastest baseline fit (robust to load "
        "spikes); "
        "*CPU-time ratio* = the same ratio of medians with process CPU time (all threads), less "
        "sensitive to other load on the machine. Issue targets: "
        f"<= {TARGETS['train']:.2f}x for `source='train'`, <= {TARGETS['eval']:.2f}x for "
        f"`source='eval'`, at `n_estimators={m_main}` ({default_note}); "
        f"`n_estimators={m_ctx}` is context.",
        "## Fit time",
        table,
        f"## Where the overhead goes (seconds per fit, {sizes.epochs} evaluated epochs, medians)",
        breakdown,
        "*overhead* = monitor fit - paired baseline fit. *epoch_end* = time inside the "
        "monitor's `on_train_epoch_end` (all epochs), split into *eval pass* (the extra no-grad "
        "pass of `source='eval'`), *PSMI* (`_score_layer`: masks and `PSMI.fit_transform`), "
        "*files* (`epoch_<E>.csv`, `flagged.csv`, `history.json`) and the *rest* (gathers, "
        "flags, `log`). *hooks* = measured time of the monitor's training-loop work "
        "(`on_train_start`, `on_train_epoch_start`, `on_train_batch_start/end` with the index "
        "and label reads, the logits hook computing per-sample loss and margin, and for "
        "`source='train'` the feature-buffer writes of the layer hooks). *unaccounted* = "
        "overhead - epoch_end - hooks (callback dispatch, cache effects and noise: a "
        "difference of two fits, so it can be negative). *PSMI alone* = "
        "standalone `PSMI(n_estimators=m,return_full=False).fit_transform` on the "
        f"({sizes.n}, {sizes.hidden}) features captured at the last epoch, times {sizes.epochs} "
        f"epochs (per call: {per_epoch}).",
        "## Reading",
        *summary_lines(configs, psmi_alone, sizes),
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
    md = "\n\n".join(_wrap(p) for p in paras) + "\n"
    return md


def _wrap(paragraph: str) -> str:
    """Wrap prose paragraphs at 100 columns; headings, tables and lists stay as they are."""
    if paragraph.startswith(("#", "|", "- ")):
        return paragraph
    return textwrap.fill(paragraph, width=100, break_long_words=False, break_on_hyphens=False)


def summary_lines(configs: List[Config], psmi_alone: Dict[int, float], sizes: Sizes) -> List[str]:
    """One generated paragraph per monitor configuration: verdict and dominant part."""
    b_med = _med(configs[0].times)
    b_epoch = b_med / sizes.epochs
    out = [
        f"Baseline: {b_epoch:.2f} s per epoch, so the targets allow "
        f"{(TARGETS['train'] - 1) * b_epoch:.2f} s (`train`) and "
        f"{(TARGETS['eval'] - 1) * b_epoch:.2f} s (`eval`) of monitor work per evaluated epoch. "
        + "PSMI alone takes "
        + ", ".join(
            f"{s:.2f} s per epoch at n_estimators={m}"
            for m, s in sorted(psmi_alone.items(), reverse=True)
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


# ---------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--repeats", type=int, default=None, help="timed rounds (default 3; 1 with --quick)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes for a < 30 s smoke run (prints only unless --out is given)",
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
    p.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    p.add_argument("--n", type=int, default=None, help="override the number of samples")
    p.add_argument(
        "--hidden", type=int, default=None, help="override the hidden width (= monitored d)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    if args.epochs:
        sizes = dataclasses.replace(sizes, epochs=args.epochs)
    if args.n:
        sizes = dataclasses.replace(sizes, n=args.n)
    if args.hidden:
        sizes = dataclasses.replace(sizes, hidden=args.hidden)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
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
    ds = make_dataset(sizes.n, sizes.in_dim, sizes.n_classes, args.seed)
    m_main, m_ctx = sizes.estimators
    configs = [Config("baseline (no monitor)")]
    for m in (m_main, m_ctx):
        for src in ("train", "eval"):
            configs.append(Config(f'source="{src}", n_estimators={m}', src, m))

    print(f"warm-up ({sizes.n} samples, 1 epoch) ...", flush=True)
    fit_once(ds, sizes, None, 0, args.logger, 1, args.seed)
    fit_once(ds, sizes, "train", m_ctx, args.logger, 1, args.seed)
    fit_once(ds, sizes, "eval", m_ctx, args.logger, 1, args.seed)

    feats = labels = None
    for r in range(args.repeats):
        for c in configs[1:]:
            tb, cb, _ = fit_once(ds, sizes, None, 0, args.logger, sizes.epochs, args.seed)
            configs[0].times.append(tb)
            configs[0].cpu.append(cb)
            tm, cm, mon = fit_once(
                ds, sizes, c.source, c.n_estimators, args.logger, sizes.epochs, args.seed
            )
            c.times.append(tm)
            c.cpu.append(cm)
            c.paired.append(tb)
            c.parts.append(dict(mon.timings))
            print(
                f"round {r + 1}/{args.repeats}: baseline {tb:6.2f} s | {c.name:<34} {tm:6.2f} s "
                f"(x{tm / tb:.2f}; epoch_end {mon.timings['epoch_end']:.2f} s, PSMI "
                f"{mon.timings['psmi']:.2f} s)",
                flush=True,
            )
            if feats is None and mon.capture is not None and LAYER in mon.capture.buffers:
                seen = mon.capture.seen[LAYER]
                feats = mon.capture.buffers[LAYER][seen].clone()
                labels = mon._labels[seen].clone()

    if feats is None:  # fall back to synthetic ReLU features
        feats = torch.randn(sizes.n, sizes.hidden).relu_()
        labels = torch.randint(0, sizes.n_classes, (sizes.n,))
    psmi_alone = {m: time_psmi_alone(feats, labels, m, args.repeats) for m in (m_main, m_ctx)}
    for m, s in psmi_alone.items():
        print(f"PSMI alone on {tuple(feats.shape)}, n_estimators={m}: {s:.2f} s per call")

    wall = time.perf_counter() - t_start
    md = build_report(configs, psmi_alone, sizes, args, info, wall)
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
