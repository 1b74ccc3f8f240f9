"""Benchmark of ``lightning_memo.TracIn``: training overhead, and checkpoints mode vs Captum.

Everything runs in one process on the same synthetic data (except the memory section, which needs a
fresh process per measurement) and is printed as markdown tables; ``--out`` writes the same text to
a file (default ``docs/benchmarks_tracin.md``).

Model and data (digits-sized): an MLP ``64 -> 256 -> ReLU -> 256 -> ReLU -> 10`` (85,002
parameters, all in the three ``nn.Linear`` layers TracIn differentiates by default), cross-entropy,
SGD (lr 0.05, momentum 0.9), batch 64; ``n`` = 5,000 training samples from 10 Gaussian class
clusters in 64 dimensions (centres ~ N(0, 0.35^2 I), unit noise, so the classes overlap and the
loss does not vanish in 3 epochs) with 10 % of the labels flipped, and 100 query samples from the
same clusters (labels not flipped). Seeded.

Sections:

1. Training overhead: ``trainer.fit`` with no callback vs with ``TracIn`` (``mode="online"``,
   ``projection_dim=1024``; without and with the 100 queries, which online mode re-featurises at
   every optimizer step), and for context ``mode="checkpoints"`` (``projection_dim=1024``, the 100
   queries, one checkpoint pass over the training set per epoch). ``--epochs-overhead`` epochs per
   fit (default 4); the time measured is from the start of epoch 2 to ``on_train_end`` (a timer
   callback listed last), so the first epoch (allocation, first-touch and warm-up costs) and the
   end-of-fit file writes are excluded; reported per optimizer step. Protocol: one untimed
   warm-up fit of every variant, then ``--repeats`` rounds, each running every variant once in
   turn; median seconds per step; ratio = median(variant) / median(no callback), with the range of
   the per-round ratios. Target: online with projection <= 1.3x.
1b. Where the online overhead goes: one more fit with ``TracIn(mode="online")``, the callback's
   per-step hooks and the featurizer's projection and self-products wrapped with a timer;
   microseconds per optimizer step, next to the whole-step difference to a fit without it.
2. Checkpoints mode vs Captum ``TracInCP`` (captum 0.9), on the same model, checkpoints and data.
   The model is trained once for 3 epochs; a callback saves the weights and learning rate at each
   epoch end to files (3 checkpoints), and a ``TracIn(projection_dim=1024, queries=...)`` in the
   same fit records what the callback computes during training. Then, from the saved checkpoint
   files, each method computes (a) the self-influence of the ``n`` training samples and (b) the
   ``100 x n`` train -> query scores, each timed from scratch (loading the checkpoints included):

   * ours: what the callback does at each checkpoint, run from the files: load the weights,
     ``GradientFeaturizer`` (the callback's featuriser; Linear hook fast path, LoGra projection)
     over the training set in batches of 64 (and over the queries), rows into a ``GradientStore``,
     then ``tracin_self_influence`` / ``tracin_scores``. Projected with k = 1024 (the target's
     setting), 4096 and 16384, and exact (``projection_dim=None``: the store holds each Linear
     layer's input and output-gradient, ``[a | 1 | g]``, 1,100 numbers per sample instead of the
     85,002-entry gradient, and scores are exact: ``(a . a') (g . g')`` per layer). The "both"
     column computes self-influence and scores from one store (what the callback really does).
     The k=1024 result is checked against the in-training callback's.
   * Captum ``TracInCP`` with ``batch_size=64``, ``checkpoints_load_func`` loading the files and
     returning their learning rate: ``sample_wise_grads_per_batch=True`` (hooks on the layers,
     loss ``CrossEntropyLoss(reduction="sum")``) and Captum's default
     ``sample_wise_grads_per_batch=False`` (one backward pass per sample,
     ``reduction="none"``). Self-influence: ``self_influence(outer_loop_by_checkpoints=True)`` (each
     checkpoint loaded once); scores: ``influence((x_query, y_query))`` (query gradients once per
     checkpoint; every training batch reloads every checkpoint and recomputes its gradients).

   Best of ``--repeats`` after one warm-up, variants interleaved (a call whose warm-up takes over
   60 s runs once); ratio = the fastest Captum variant's seconds / ours. Agreement: ours exact vs
   Captum, ours k=1024 from the files vs the in-training callback (max abs error / max abs value).
   Ranking against exact, for every projected k and for a dense Gaussian projection of the exact
   gradients at k=1024 (reference: the best an unstructured random projection of that size does,
   not a TracIn option): Spearman of the self-influence, of all ``100 x n`` scores and per query,
   the mean overlap of the top-10 proponents, and the AUROC of the self-influence for finding the
   flipped labels. Target: k=1024 >= 5x faster than Captum at Spearman >= 0.95 vs exact.
3. Peak extra memory of the scores computation (b), in a fresh interpreter per case (this script
   re-executed with a hidden flag, one case at a time): load data and checkpoint paths, warm up on
   a tiny input, reset the peak RSS to the current RSS (``/proc/self/clear_refs``; if that is not
   permitted, the "slack" column says by how much the peak before the call exceeded the baseline),
   run (b), report peak RSS (``VmHWM``) after the call minus RSS before it (the result is kept
   alive). ``tracemalloc`` does not see torch's allocations, hence RSS.

Threads: torch's default (``torch.get_num_threads()``) unless ``--threads`` is given. The load
average is printed at start and end: on a shared machine timings are noisy, and torch's intra-op
threads degrade badly when the cores are oversubscribed (tiny ops then take milliseconds): there,
use ``--threads 1``.

Usage::

    python benchmarks/bench_tracin.py            # full run, writes docs/benchmarks_tracin.md
    python benchmarks/bench_tracin.py --quick    # smoke run on small sizes, writes nothing
                                                 # unless --out is given
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import _common  # noqa: E402  (after the sys.path set-up)
from _common import (  # noqa: E402
    _peak_kb,
    _reset_peak,
    _rss_kb,
    auroc,
    fmt_mb,
    fmt_s,
    md_table,
    timed,
)

from lightning_memo import IndexedDataset, TracIn  # noqa: E402
from lightning_memo.callbacks.common import module_per_sample_loss  # noqa: E402
from lightning_memo.influence import (  # noqa: E402
    GradientStore,
    random_matrix,
    tracin_scores,
    tracin_self_influence,
)
from lightning_memo.influence.features import GradientFeaturizer  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks_tracin.md"
SPEARMAN_TARGET = 0.95
SPEEDUP_TARGET = 5.0
OVERHEAD_TARGET = 1.3


# --------------------------------------------------------------------------- configuration
@dataclass
class Config:
    """Problem sizes and knobs of one benchmark run."""

    n: int = 5_000
    n_query: int = 100
    d: int = 64
    hidden: int = 256
    classes: int = 10
    batch: int = 64
    lr: float = 0.05
    epochs: int = 3  # = checkpoints of section 2
    epochs_overhead: int = 4
    k: int = 1024
    ks: Tuple[int, ...] = (1024, 4096, 16384)  # projected variants of section 2 (k first)
    repeats: int = 3
    slow_s: float = 60.0  # a section-2 call slower than this runs once
    label_noise: float = 0.1
    centre_scale: float = 0.35
    data_seed: int = 0
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_config(cls) -> Config:
        return cls(n=500, n_query=20, epochs_overhead=3, ks=(1024, 4096), repeats=1, quick=True)


# --------------------------------------------------------------------------- data and model
def make_data(cfg: Config) -> Dict[str, torch.Tensor]:
    """Training set (with flipped labels) and queries from the same seeded class clusters.

    Returns:
        x: (n, d) float32, y: (n,) int64 (after flipping), flipped: (n,) bool,
        xq: (n_query, d), yq: (n_query,).
    """
    g = torch.Generator().manual_seed(cfg.data_seed)
    centres = torch.randn(cfg.classes, cfg.d, generator=g) * cfg.centre_scale

    def draw(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, cfg.classes, (n,), generator=g)
        return centres[y] + torch.randn(n, cfg.d, generator=g), y

    x, y_true = draw(cfg.n)
    flipped = torch.rand(cfg.n, generator=g) < cfg.label_noise
    shift = torch.randint(1, cfg.classes, (cfg.n,), generator=g)
    y = torch.where(flipped, (y_true + shift) % cfg.classes, y_true)
    xq, yq = draw(cfg.n_query)
    return {"x": x, "y": y, "flipped": flipped, "xq": xq, "yq": yq}


class MLP(L.LightningModule):
    """``d -> hidden -> ReLU -> hidden -> ReLU -> classes``, SGD with momentum."""

    def __init__(self, d: int = 64, hidden: int = 256, classes: int = 10, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(d, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def make_model(cfg: Config) -> MLP:
    return MLP(cfg.d, cfg.hidden, cfg.classes, cfg.lr)


def train_loader(cfg: Config, data: Dict[str, torch.Tensor]) -> DataLoader:
    ds = IndexedDataset(TensorDataset(data["x"], data["y"]))
    gen = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(ds, batch_size=cfg.batch, shuffle=True, generator=gen)


def query_loader(cfg: Config, data: Dict[str, torch.Tensor], batch: Optional[int] = None):
    ds = TensorDataset(data["xq"], data["yq"])
    return DataLoader(ds, batch_size=batch or cfg.batch)


def make_trainer(root: str, callbacks: List[Callback], epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )


# --------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    """Progress to stderr (stdout carries the tables)."""
    print(f"[bench_tracin {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation (average ranks for ties are not needed: float scores)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    return float((got - want).abs().max() / want.abs().max())


def quiet_lightning() -> None:
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


# --------------------------------------------------------------------------- machine info
def machine_info() -> Dict[str, str]:
    return _common.machine_info(("captum",))


# --------------------------------------------------------------------------- section 1
class StepTimer(Callback):
    """Time from the start of the second epoch to ``on_train_end`` (listed last, so every other
    callback's epoch-end work of the timed epochs is inside), and the optimizer steps in it."""

    def __init__(self) -> None:
        self.t0: Optional[float] = None
        self.seconds = math.nan
        self.steps = 0
        self._step0 = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.t0 = time.perf_counter()
            self._step0 = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.t0 is not None:
            self.seconds = time.perf_counter() - self.t0
            self.steps = trainer.global_step - self._step0


def overhead_variants(cfg: Config, data: Dict[str, torch.Tensor]) -> Dict[str, Callable]:
    """name -> () -> list of callbacks (fresh for each fit)."""
    big_queries = query_loader(cfg, data, batch=cfg.n_query)  # one batch per step
    return {
        "no callback": lambda: [],
        "online, k=1024": lambda: [TracIn(mode="online", projection_dim=cfg.k, progress=False)],
        f"online, k=1024, {cfg.n_query} queries": lambda: [
            TracIn(mode="online", projection_dim=cfg.k, queries=big_queries, progress=False)
        ],
        f"checkpoints, k=1024, {cfg.n_query} queries": lambda: [
            TracIn(mode="checkpoints", projection_dim=cfg.k, queries=big_queries, progress=False)
        ],
    }


def fit_timed(cfg: Config, data: Dict[str, torch.Tensor], callbacks: List[Callback], epochs: int):
    """(seconds from epoch 2 to the end of training, optimizer steps in it)."""
    L.seed_everything(cfg.seed, verbose=False)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as root:
        tr = make_trainer(root, [*callbacks, timer], epochs)
        tr.fit(make_model(cfg), train_loader(cfg, data))
    return timer.seconds, timer.steps


def section_overhead(cfg: Config, data: Dict[str, torch.Tensor]) -> Tuple[str, Dict[str, Any]]:
    variants = overhead_variants(cfg, data)
    log("overhead: warm-up fits")
    for make in variants.values():
        fit_timed(cfg, data, make(), 2)
    per_step: Dict[str, List[float]] = {k: [] for k in variants}
    for r in range(cfg.repeats):
        for name, make in variants.items():
            gc.collect()
            sec, steps = fit_timed(cfg, data, make(), cfg.epochs_overhead)
            per_step[name].append(sec / steps)
            log(f"overhead round {r + 1}/{cfg.repeats} {name}: {1e3 * sec / steps:.2f} ms/step")
    base = statistics.median(per_step["no callback"])
    rows, res = [], {}
    for name, vals in per_step.items():
        med = statistics.median(vals)
        paired = [v / b for v, b in zip(vals, per_step["no callback"])]
        res[name] = {"ms_per_step": 1e3 * med, "ratio": med / base, "paired": paired}
        rows.append(
            [
                name,
                f"{1e3 * med:.2f}",
                f"{med / base:.2f}x",
                f"{min(paired):.2f}-{max(paired):.2f}",
            ]
        )
    steps_per_epoch = math.ceil(cfg.n / cfg.batch)
    online = res["online, k=1024"]["ratio"]
    text = (
        f"### 1. Training overhead (n={cfg.n:,}, batch {cfg.batch}, {steps_per_epoch} steps per "
        f"epoch; epochs 2-{cfg.epochs_overhead} timed; median of {cfg.repeats} rounds)\n\n"
        + md_table(
            ["callback", "ms per step", "ratio", "per-round ratios"],
            rows,
        )
        + f"\n\nOnline mode with projection k=1024: **{online:.2f}x** "
        f"(target <= {OVERHEAD_TARGET}x: {'met' if online <= OVERHEAD_TARGET else 'NOT met'}). "
        "With queries, online mode featurises every query at every step (an extra forward and "
        "backward pass over the queries per step), so its cost grows with the number of queries; "
        "checkpoints mode pays one extra pass over the training set per checkpoint instead (here "
        "every epoch).\n"
    )
    return text, res


def section_breakdown(cfg: Config, data: Dict[str, torch.Tensor]) -> Tuple[str, Dict[str, Any]]:
    """Where online TracIn's per-step time goes: wall time inside each hook, accumulated over
    a fit (the functions are wrapped with ``time.perf_counter``), per optimizer step."""
    import functools

    import lightning_memo.callbacks.tracin as cb_mod
    from lightning_memo.influence import features as feat_mod
    from lightning_memo.influence import grads as grads_mod

    spent: Dict[str, float] = {}
    patched: List[Tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed_fn(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0

        patched.append((owner, name, fn))
        setattr(owner, name, timed_fn)

    hooks = [
        (cb_mod.TracIn, "on_train_batch_start", "TracIn.on_train_batch_start (callback)"),
        (cb_mod.TracIn, "on_before_optimizer_step", "TracIn.on_before_optimizer_step (callback)"),
        (
            feat_mod.GradientFeaturizer,
            "sq_norms_from_linear_io",
            "  of which sq_norms_from_linear_io (exact squared norms)",
        ),
        (grads_mod, "layer_input_rows", "capture forward hooks: layer_input_rows"),
    ]
    try:
        for owner, name, label in hooks:
            wrap(owner, name, label)
        make = lambda: [TracIn(mode="online", projection_dim=cfg.k, progress=False)]  # noqa: E731
        fit_timed(cfg, data, make(), 2)  # warm-up
        base, steps0 = fit_timed(cfg, data, [], cfg.epochs_overhead)
        spent.clear()
        sec, steps = fit_timed(cfg, data, make(), cfg.epochs_overhead)
        total_steps = math.ceil(cfg.n / cfg.batch) * cfg.epochs_overhead
    finally:
        for owner, name, fn in reversed(patched):
            setattr(owner, name, fn)
    per = {k: 1e6 * v / total_steps for k, v in spent.items()}
    extra = 1e6 * (sec / steps - base / steps0)
    rows = [[k, f"{v:.0f}"] for k, v in per.items()]
    rows.append(["whole step: online minus no callback (this pair of fits)", f"{extra:.0f}"])
    text = (
        f"### 1b. Where online TracIn's time goes (k={cfg.k}, per optimizer step, one fit of "
        f"{cfg.epochs_overhead} epochs)\n\n"
        + md_table(["part", "microseconds per step"], rows)
        + "\n\nEach row is the wall time spent inside that function (wrapped with a timer, "
        "which itself adds ~1 us per call); the capture hooks' other work (recording the "
        "output and registering its tensor hook, the tensor hook itself in the backward pass) "
        "is part of the difference to the whole-step figure, as are the callback's other "
        "hooks and Lightning's dispatch to them. Online self-influence needs only each sample's "
        "squared gradient norm, and the gradient of a Linear layer fed one row per sample is "
        "the rank-one g [a; 1]^T, whose squared norm is (||a||^2 + 1) ||g||^2: two row norms "
        "per layer, exact, and no projection or (B, k) rows (with queries the projected rows "
        "are formed, for the train-query products). Other per-step work "
        "removed: the duplicate-index check runs in the first epoch only, the labels are read "
        "until every sample's is known, and the layer-to-parameter-group map of the learning "
        "rates is built once.\n"
    )
    return text, {"per_step_us": per, "extra_us": extra}


# --------------------------------------------------------------------------- section 2
class CheckpointSaver(Callback):
    """Saves ``{"state", "lr"}`` at every epoch end to ``folder/ckpt_<epoch>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.paths: List[str] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = os.path.join(self.folder, f"ckpt_{trainer.current_epoch}.pt")
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        torch.save({"state": copy.deepcopy(pl_module.state_dict()), "lr": lr}, path)
        self.paths.append(path)


def train_with_checkpoints(cfg: Config, data: Dict[str, torch.Tensor], folder: str):
    """Fit once; returns (checkpoint paths, the in-training TracIn(k) callback)."""
    L.seed_everything(cfg.seed, verbose=False)
    saver = CheckpointSaver(folder)
    tracin = TracIn(
        projection_dim=cfg.k,
        queries=query_loader(cfg, data),
        progress=False,
        output_dir=os.path.join(folder, "tracin"),
    )
    tr = make_trainer(folder, [saver, tracin], cfg.epochs)
    tr.fit(make_model(cfg), train_loader(cfg, data))
    return saver.paths, tracin


def ours_store(
    cfg: Config,
    data: Dict[str, torch.Tensor],
    paths: Sequence[str],
    k: Optional[int],
    with_queries: bool,
    factored: bool = True,
) -> Tuple[GradientStore, List[torch.Tensor]]:
    """What ``TracIn(mode="checkpoints")`` does at each checkpoint, from checkpoint files: the
    training set's (and the queries') gradient features, in batches, into a ``GradientStore``."""
    model = make_model(cfg)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feats = GradientFeaturizer(modules, k, seed=0, factored=factored)
    store = GradientStore(cfg.n, feats.dim, layout=feats.layout)
    query_grads: List[torch.Tensor] = []
    x, y, xq, yq, b = data["x"], data["y"], data["xq"], data["yq"], cfg.batch
    try:
        for step, path in enumerate(paths):
            ck = torch.load(path)
            model.load_state_dict(ck["state"])
            model.eval()
            feats.set_learning_rates({name: ck["lr"] for name in modules})
            c = store.add_checkpoint(1.0, step)
            for s in range(0, cfg.n, b):
                e = min(cfg.n, s + b)
                f = feats(model, (x[s:e], y[s:e]), module_per_sample_loss)
                store.write(c, torch.arange(s, e), f)
            if with_queries:
                q = [
                    feats(model, (xq[s : s + b], yq[s : s + b]), module_per_sample_loss)
                    for s in range(0, cfg.n_query, b)
                ]
                query_grads.append(torch.cat(q).detach())
    finally:
        if feats.capture is not None:
            feats.capture.remove()
    return store, query_grads


def ours_self(cfg, data, paths, k) -> torch.Tensor:
    store, _ = ours_store(cfg, data, paths, k, with_queries=False)
    return tracin_self_influence(store)


def ours_scores(cfg, data, paths, k) -> torch.Tensor:
    store, qg = ours_store(cfg, data, paths, k, with_queries=True)
    return tracin_scores(store, qg)


def ours_both(cfg, data, paths, k) -> Tuple[torch.Tensor, torch.Tensor]:
    store, qg = ours_store(cfg, data, paths, k, with_queries=True)
    return tracin_self_influence(store), tracin_scores(store, qg)


def _captum_load(model: nn.Module, path: str) -> float:
    ck = torch.load(path)
    model.load_state_dict(ck["state"])
    return float(ck["lr"])


def captum_tracin(cfg: Config, data: Dict[str, torch.Tensor], paths: Sequence[str], per_batch):
    from captum.influence import TracInCP

    model = make_model(cfg)
    model.eval()
    return TracInCP(
        model,
        TensorDataset(data["x"], data["y"]),
        list(paths),
        checkpoints_load_func=_captum_load,
        loss_fn=nn.CrossEntropyLoss(reduction="sum" if per_batch else "none"),
        batch_size=cfg.batch,
        sample_wise_grads_per_batch=per_batch,
    )


def captum_self(cfg, data, paths, per_batch) -> torch.Tensor:
    return captum_tracin(cfg, data, paths, per_batch).self_influence(outer_loop_by_checkpoints=True)


def captum_scores(cfg, data, paths, per_batch) -> torch.Tensor:
    return captum_tracin(cfg, data, paths, per_batch).influence((data["xq"], data["yq"]))


def comparison_fns(cfg, data, paths) -> Dict[Tuple[str, str], Callable[[], Any]]:
    """(method, task) -> callable; method order is the table order."""
    methods: Dict[str, Tuple[str, Any]] = {f"ours, projected k={k}": ("ours", k) for k in cfg.ks}
    methods["ours, exact"] = ("ours", None)
    methods["Captum TracInCP, sample_wise_grads_per_batch=True"] = ("captum", True)
    methods["Captum TracInCP, sample_wise_grads_per_batch=False (default)"] = ("captum", False)
    fns: Dict[Tuple[str, str], Callable[[], Any]] = {}
    for name, (impl, arg) in methods.items():
        if impl == "ours":
            fns[(name, "self")] = lambda a=arg: ours_self(cfg, data, paths, a)
            fns[(name, "scores")] = lambda a=arg: ours_scores(cfg, data, paths, a)
            fns[(name, "both")] = lambda a=arg: ours_both(cfg, data, paths, a)
        else:
            fns[(name, "self")] = lambda a=arg: captum_self(cfg, data, paths, a)
            fns[(name, "scores")] = lambda a=arg: captum_scores(cfg, data, paths, a)
    return fns


def dense_reference(cfg, data, paths, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Self-influence and scores from a dense Gaussian projection (one (k, P) matrix) of the exact
    gradients: what an ideal unstructured random projection of size k gives (not a TracIn option;
    its (k, P) matrix and (B, P) @ (P, k) products are what LoGra avoids)."""
    store, qg = ours_store(cfg, data, paths, None, with_queries=True, factored=False)
    m = random_matrix(k, store.dim, seed=12345, kind="gaussian")
    self_inf = torch.zeros(cfg.n, dtype=torch.float64)
    scores = torch.zeros(cfg.n_query, cfg.n, dtype=torch.float64)
    for c in range(len(store)):
        q = qg[c] @ m.T
        for s in range(0, cfg.n, 1024):
            g = store.grads(c)[s : s + 1024] @ m.T
            self_inf[s : s + 1024] += g.double().square().sum(1)
            scores[:, s : s + 1024] += (q @ g.T).double()
    return self_inf, scores


def top_overlap(exact: np.ndarray, approx: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |top-k proponents of exact & of approx| / k."""
    k = min(k, exact.shape[1])
    hits = [
        len(set(np.argsort(-exact[q])[:k]) & set(np.argsort(-approx[q])[:k])) / k
        for q in range(exact.shape[0])
    ]
    return float(np.mean(hits))


def section_captum(
    cfg: Config, data: Dict[str, torch.Tensor], folder: str
) -> Tuple[str, Dict[str, Any], List[str]]:
    log("captum: training once, saving checkpoints")
    paths, in_training = train_with_checkpoints(cfg, data, folder)
    fns = comparison_fns(cfg, data, paths)
    best = {key: math.inf for key in fns}
    results: Dict[Tuple[str, str], Any] = {}
    single: set = set()  # variants too slow to repeat: their warm-up time is the time
    for key, fn in fns.items():  # warm-up; keeps the results for the accuracy checks
        log(f"captum: warm-up {key}")
        dt, results[key] = timed(fn)
        log(f"captum: warm-up {key}: {dt:.3f} s")
        if dt > cfg.slow_s:
            best[key] = dt
            single.add(key)
        gc.collect()
    for r in range(cfg.repeats):
        for key, fn in fns.items():
            if key in single:
                continue
            gc.collect()
            dt, _ = timed(fn)
            best[key] = min(best[key], dt)
            log(f"captum: round {r + 1}/{cfg.repeats} {key}: {dt:.3f} s")

    names = list(dict.fromkeys(name for name, _ in fns))
    proj = f"ours, projected k={cfg.k}"
    exact = "ours, exact"
    cap_b, cap_l = names[-2:]
    fastest = {t: min(best[(cap_b, t)], best[(cap_l, t)]) for t in ("self", "scores")}

    def cell(key: Tuple[str, str]) -> str:
        return fmt_s(best[key]) + (" *" if key in single else "")

    rows = []
    for name in names:
        row = [name]
        for task in ("self", "scores"):
            row += [cell((name, task)), f"{fastest[task] / best[(name, task)]:.1f}x"]
        row.append(cell((name, "both")) if (name, "both") in best else "-")
        rows.append(row)
    t1 = md_table(
        [
            "method",
            f"self-influence, n={cfg.n:,} (s)",
            "speed-up",
            f"{cfg.n_query} x {cfg.n:,} scores (s)",
            "speed-up",
            "both from one store (s)",
        ],
        rows,
    )

    # accuracy
    si = {name: results[(name, "self")] for name in names}
    sc = {name: results[(name, "scores")] for name in names}
    flipped = data["flipped"].numpy()
    parity_rows = [
        [
            f"ours exact vs {label}",
            f"{max_rel_err(si[exact], si[name]):.1e}",
            f"{max_rel_err(sc[exact], sc[name]):.1e}",
        ]
        for label, name in (("Captum (per batch)", cap_b), ("Captum (default)", cap_l))
    ]
    parity_rows.append(
        [
            f"ours k={cfg.k} from the files vs the in-training callback",
            f"{max_rel_err(si[proj], in_training.self_influence):.1e}",
            f"{max_rel_err(sc[proj], in_training.scores):.1e}",
        ]
    )
    t2 = md_table(
        ["max abs error / max abs value", "self-influence", "scores"],
        parity_rows,
    )
    e_sc = sc[exact].numpy()
    approx = {
        f"ours, projected k={k}": (si[f"ours, projected k={k}"], sc[f"ours, projected k={k}"])
        for k in cfg.ks
    }
    log(f"captum: dense reference k={cfg.k}")
    dense_label = f"reference: dense Gaussian k={cfg.k} of the exact gradients"
    approx[dense_label] = dense_reference(cfg, data, paths, cfg.k)
    rank_rows, rho = [], {}
    for label, (a_si, a_sc) in approx.items():
        a_sc = a_sc.numpy()
        per_q = [spearman(e_sc[q], a_sc[q]) for q in range(e_sc.shape[0])]
        rho[label] = (spearman(si[exact], a_si), spearman(e_sc, a_sc))
        rank_rows.append(
            [
                label,
                f"{rho[label][0]:.4f}",
                f"{rho[label][1]:.4f}",
                f"{np.mean(per_q):.4f}",
                f"{np.min(per_q):.4f}",
                f"{top_overlap(e_sc, a_sc):.2f}",
                f"{auroc(a_si.numpy(), flipped):.4f}",
            ]
        )
    rank_rows.append(
        ["exact", "1", "1", "1", "1", "1.00", f"{auroc(si[exact].numpy(), flipped):.4f}"]
    )
    t3 = md_table(
        [
            "vs exact",
            "Spearman self-influence",
            f"Spearman all {cfg.n_query} x {cfg.n:,} scores",
            "per query: mean",
            "per query: min",
            "top-10 proponents overlap",
            "AUROC flipped labels (self-influence)",
        ],
        rank_rows,
    )

    rho_self, rho_scores = rho[proj]
    speed_self = fastest["self"] / best[(proj, "self")]
    speed_scores = fastest["scores"] / best[(proj, "scores")]
    fast = min(speed_self, speed_scores) >= SPEEDUP_TARGET
    total = in_training.features.total
    exact_dim = sum(
        m.in_features + 1 + m.out_features for m in in_training.features.modules.values()
    )
    exact_gb = len(paths) * cfg.n * exact_dim * 4 / 2**30
    full_gb = len(paths) * cfg.n * total * 4 / 2**30
    dims = ", ".join(
        f"k={k}: {GradientFeaturizer(in_training.features.modules, k, 0).dim}" for k in cfg.ks
    )
    text = (
        f"### 2. Checkpoints mode vs Captum TracInCP (n={cfg.n:,}, {cfg.n_query} queries, "
        f"{len(paths)} checkpoints, {total:,} parameters; best of {cfg.repeats} after one "
        f"warm-up)\n\n{t1}\n\n"
        "Speed-up = the fastest Captum variant's seconds / this row's. Every row starts from the "
        f"checkpoint files. `*`: the warm-up call took over {cfg.slow_s:.0f} s, so it ran once and "
        "that time is reported. Ours exact holds, per checkpoint and Linear layer, the input and "
        "output-gradient of every sample (the factors of its rank-one gradient: "
        f"{len(paths)} x {cfg.n:,} x {exact_dim:,} float32 = {exact_gb:.3f} GiB instead of "
        f"{len(paths)} x {cfg.n:,} x {total:,} = {full_gb:.2f} GiB for flat gradients); "
        "projected holds "
        f"{len(paths)} x {cfg.n:,} x k' float32, where k' is k split over the layers by the "
        f"Kronecker factors ({dims}).\n\n"
        f"Projected k={cfg.k} vs the fastest Captum: **{speed_self:.1f}x** (self-influence), "
        f"**{speed_scores:.1f}x** (scores) (target >= {SPEEDUP_TARGET:.0f}x: "
        f"{'met' if fast else 'NOT met'}), at Spearman **{rho_self:.4f}** for the self-influence "
        f"({'met' if rho_self >= SPEARMAN_TARGET else 'NOT met'}) and **{rho_scores:.4f}** for "
        f"all scores ({'met' if rho_scores >= SPEARMAN_TARGET else 'NOT met'}) vs exact (target "
        f">= {SPEARMAN_TARGET}).\n\n"
        f"Agreement:\n\n{t2}\n\nRanking against exact:\n\n{t3}\n\n"
        "The dense Gaussian row shows what an unstructured random projection of the same size "
        "reaches (at the cost of a (k, P) matrix and a (B, P) @ (P, k) product per batch, which "
        "the Kronecker projection avoids). The error of any projected inner product is about "
        "|g| |g'| / sqrt(k); it is small next to the self-influence |g|^2 but swamps the many "
        "train-query pairs whose gradients are nearly orthogonal, so the Spearman over all pairs "
        "needs a much larger k than the self-influence ranking and the top proponents.\n"
    )
    res = {
        "best": {f"{a} | {b}": v for (a, b), v in best.items()},
        "spearman": rho,
        "speedup_self": speed_self,
        "speedup_scores": speed_scores,
    }
    return text, res, paths


# --------------------------------------------------------------------------- section 3


MEMORY_CASES = [  # (label, impl, arg)
    ("ours, projected k=1024", "ours", 1024),
    ("ours, exact", "ours", None),
    ("Captum TracInCP, sample_wise_grads_per_batch=True", "captum", True),
    ("Captum TracInCP, sample_wise_grads_per_batch=False (default)", "captum", False),
]


def memory_child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Runs in a fresh process: baseline RSS, then the peak RSS of one scores computation."""
    quiet_lightning()
    cfg = Config(**spec["cfg"])
    data = make_data(cfg)
    paths = spec["paths"]
    impl, arg = spec["impl"], spec["arg"]
    tiny = Config(**{**spec["cfg"], "n": cfg.batch, "n_query": 4})
    tiny_data = {
        k: v[: cfg.batch] if k in ("x", "y", "flipped") else v[:4] for k, v in data.items()
    }
    if impl == "ours":
        ours_scores(tiny, tiny_data, paths[:1], arg)  # warm-up

        def call() -> Any:
            return ours_scores(cfg, data, paths, arg)
    else:
        captum_scores(tiny, tiny_data, paths[:1], arg)

        def call() -> Any:
            return captum_scores(cfg, data, paths, arg)

    gc.collect()
    base = _rss_kb()
    reset = _reset_peak()
    peak_before = _peak_kb()
    result = call()  # kept alive until the peak is read
    peak = _peak_kb()
    del result
    return {
        "base_kb": base,
        "peak_kb": peak,
        "extra_kb": peak - base,
        "slack_kb": max(0, peak_before - base),
        "reset": reset,
    }


def section_memory(
    cfg: Config, paths: Sequence[str], threads: Optional[int]
) -> Tuple[str, Dict[str, Any]]:
    rows, res = [], {}
    for label, impl, arg in MEMORY_CASES:
        spec = {"cfg": asdict(cfg), "paths": list(paths), "impl": impl, "arg": arg}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", json.dumps(spec)]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        log(f"memory: {label}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=REPO_ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child failed ({label}):\n{proc.stderr[-4000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"memory: {label}: {r}")
        res[label] = r
        rows.append(
            [
                label,
                fmt_mb(r["base_kb"]),
                fmt_mb(r["extra_kb"]),
                "reset" if r["reset"] else fmt_mb(r["slack_kb"]),
            ]
        )
    p = sum(p.numel() for p in make_model(cfg).parameters())
    text = (
        f"### 3. Peak extra memory of the {cfg.n_query} x {cfg.n:,} scores (fresh process per "
        "row, one at a time)\n\n"
        + md_table(
            ["method", "baseline RSS (MB)", "peak extra (MB)", "peak reset / slack (MB)"], rows
        )
        + f"\n\nFor scale: one float32 copy of all {cfg.n:,} full gradients ({p:,} parameters) is "
        f"{cfg.n * p * 4 / 2**20:.0f} MB; the {cfg.n_query} queries' full gradients "
        f"{cfg.n_query * p * 4 / 2**20:.0f} MB per checkpoint. 'reset': the peak was reset to the "
        "baseline just before the call (/proc/self/clear_refs), so the number is exact; otherwise "
        "'slack' is how much the peak before the call exceeded the baseline (the extra may be "
        "underestimated by up to that). Peak = VmHWM from /proc/self/status.\n"
    )
    return text, res


# --------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"markdown output file (default {DEFAULT_OUT.relative_to(REPO_ROOT)}; with --quick: "
        "none unless given)",
    )
    p.add_argument("--n", type=int, default=None, help="number of training samples")
    p.add_argument("--epochs-overhead", type=int, default=None, help="epochs per overhead fit")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--skip-memory", action="store_true", help="skip the subprocess section")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    quiet_lightning()
    t_start = time.perf_counter()
    argv_used = list(sys.argv[1:] if argv is None else argv)
    cfg = Config.quick_config() if args.quick else Config()
    if args.repeats is not None:
        cfg.repeats = max(1, args.repeats)
    if args.n is not None:
        cfg.n = args.n
    if args.epochs_overhead is not None:
        cfg.epochs_overhead = max(2, args.epochs_overhead)

    info = machine_info()
    load_start = os.getloadavg()[0]
    log(f"config: {cfg}")
    data = make_data(cfg)

    s1, _ = section_overhead(cfg, data)
    print(s1, flush=True)
    s1b, _ = section_breakdown(cfg, data)
    print(s1b, flush=True)
    with tempfile.TemporaryDirectory() as folder:
        s2, _, paths = section_captum(cfg, data, folder)
        print(s2, flush=True)
        if args.skip_memory:
            s3 = "### 3. Peak extra memory\n\nSkipped (--skip-memory).\n"
        else:
            s3, _ = section_memory(cfg, paths, args.threads)
        print(s3, flush=True)

    info["load average at end (1/5/15 min)"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    wall = time.perf_counter() - t_start
    info["wall time of this script"] = f"{wall:.0f} s"
    header = (
        "## TracIn: training overhead and checkpoints mode vs Captum TracInCP\n\n"
        f"Generated by `python benchmarks/bench_tracin.py{''.join(' ' + a for a in argv_used)}`"
        f"{' (QUICK SMOKE RUN: small sizes, not representative)' if cfg.quick else ''}. "
        f"Model: MLP {cfg.d}-{cfg.hidden}-{cfg.hidden}-{cfg.classes} (ReLU), SGD lr {cfg.lr} "
        f"momentum 0.9, batch {cfg.batch}. Data: n={cfg.n:,} samples of {cfg.classes} Gaussian "
        f"class clusters in d={cfg.d}, {cfg.label_noise:.0%} flipped labels, {cfg.n_query} "
        "queries (seeded); see the script's docstring for what each number measures.\n\n"
        + md_table(["machine", ""], [[k, v] for k, v in info.items()])
        + "\n"
    )
    cpus = os.cpu_count() or 1
    if load_start > 0.5 * cpus or os.getloadavg()[0] > cpus + 0.5:
        header += (
            "\n**Warning: the machine was busy during this run (load average above half the "
            "CPU count): timings are unreliable; rerun on a quiet machine.**\n"
        )
    doc = "\n".join([header, s1, s1b, s2, s3])
    print(header)
    out = args.out if args.out is not None else (None if cfg.quick else DEFAULT_OUT)
    if out is None:
        log(f"--quick without --out: nothing written ({wall:.0f} s)")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc)
    log(f"wrote {out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
