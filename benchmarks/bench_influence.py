"""Benchmark of the end-of-training influence methods (EK-FAC, K-FAC, Arnoldi) vs Kronfluence and
Captum, side by side in one process on the same model, data and settings.

Everything runs in one process (except the memory section, which needs a fresh process per
measurement) and is printed as markdown tables; ``--out`` writes the same text to a file (default
``docs/benchmarks_influence.md``).

Model and data: an MLP ``64 -> 256 -> ReLU -> 256 -> ReLU -> 10`` (85,002 parameters, all in the
three ``nn.Linear`` layers, all of them analysed), float32, trained with plain torch SGD (lr 0.05,
momentum 0.9, batch 64, 3 epochs; no Lightning) on ``n`` = 5,000 samples of 10 Gaussian class
clusters in 64 dimensions (centres ~ N(0, 0.35^2 I), unit noise) with 10 % of the labels flipped;
1,000 query samples from the same clusters (labels not flipped). Seeded. Loss: cross-entropy. All
influence computations use batches of ``--batch`` samples (default 256) for both libraries.

Sections:

1. EK-FAC (and K-FAC) vs Kronfluence (``Analyzer``, ``FactorArguments(strategy="ekfac"|"kfac")``).
   Same layers, same damping (explicit, ``--damping``; Kronfluence ``ScoreArguments(
   damping_factor=...)`` is an absolute damping too), same Fisher (empirical: the data labels,
   Kronfluence ``use_empirical_fisher=True``, so both fit exactly the same matrices and the scores
   must agree up to float round-off), same data, same batch size. Phases timed separately:
   *fit* (covariances, eigendecomposition, EK-FAC eigenvalue correction, on the ``n`` training
   samples), *pairwise* (the ``n_query x n`` scores) and *self* (the ``n`` self-influence scores).
   Ours: ``make_method(...).fit`` / ``query_matrix`` + ``train_pass(want_self=False)`` /
   ``train_pass(want_self=True)`` without queries. Kronfluence: ``fit_all_factors`` /
   ``compute_pairwise_scores`` (all queries in one query batch: Kronfluence passes over the
   training set once per query batch, so this is its fastest setting) + ``load_pairwise_scores``
   / ``compute_self_scores`` + ``load_self_scores``. Kronfluence writes its factors and scores to
   disk (safetensors, in a temporary directory) and reads the factors back in every score call:
   that I/O is part of its API and is included (it is small here: factors < 2 MB, scores 20 MB).
   Its progress bars are disabled and its logging set to WARNING. Kronfluence accumulates the
   covariances and the EK-FAC eigenvalues in float32 (its defaults), ours in float64. EK-FAC runs
   ``--repeats`` rounds; K-FAC (vs ``strategy="kfac"``) and, with ``--true-fisher``, a
   true-Fisher EK-FAC (labels sampled from the model; each library draws its own labels, so the
   two fit different random matrices; fit and self-influence only) run one round each, to keep
   the run short. Agreement: Spearman
   and Pearson of all pairwise scores, the mean / min over queries of the per-query Spearman,
   Spearman and Pearson of the self-influence, and max |ours - reference| / max |ours|.
2. Arnoldi vs Captum ``ArnoldiInfluenceFunction`` (captum 0.9) at equal ``arnoldi_dim``, top-k
   (Captum ``projection_dim``) and regularisation, Hessian data = the first ``n_hessian`` training
   samples, seed 0 for both. Captum's Hessian is that of the *summed* loss over the Hessian data
   (``loss_fn=CrossEntropyLoss(reduction="sum")``), ours of the *mean*; Captum adds
   ``hessian_reg`` to the Krylov-projected matrix before its eigendecomposition, i.e. to the kept
   eigenvalues, as our damping does. So Captum with ``hessian_reg = damping x n_hessian`` computes
   exactly ours divided by ``n_hessian``: ``sum_i (g_q.v_i)(g_z.v_i) / (n_h lambda_i + n_h
   damping)``. Both sign conventions are "positive = proponent" (g_q^T H^-1 g_z). Captum uses
   ``sample_wise_grads_per_batch=True`` (per-sample gradients from layer hooks; its default
   takes one backward pass per sample) and ``projection_on_cpu=True`` (default). arnoldi_dim 200
   (Captum's default) and top-k 50: with arnoldi_dim 100 the top 50 eigenpairs by magnitude
   include negative ones on this model (see the section's text).
   Timed: *setup* (Arnoldi iteration + distillation; Captum: the constructor), *pairwise*
   (``influence((x_query, y_query))``) and *self* (``self_influence()``). The two libraries start
   the iteration from different random vectors and Captum iterates in float32 with one
   Gram-Schmidt pass (ours float64, two passes), so the tail of the kept eigenpairs differs: the
   table also shows ours with seed 0 vs ours with seed 1, the spread due to the start vector
   alone.
3. Peak memory of each method's full run (fit + pairwise + self), one fresh interpreter per row
   (this script re-executed with a hidden flag): load the data and the trained weights, warm up on
   a tiny input, reset the peak RSS to the current RSS (``/proc/self/clear_refs``), run, report the
   peak RSS (``VmHWM``) minus the RSS before the run (results kept alive). Ours computes the
   pairwise and the self scores in one ``train_pass`` here (what our API does when both are
   wanted); the child also reports the time of its single cold run.
4. Quality context: AUROC of each method's self-influence for finding the flipped labels, and the
   per-sample training loss as a baseline.
5. K-FAC / EK-FAC self-influence of the training set from the layer factors: ``train_pass``
   without queries with ``grad_dict(..., lazy=True)`` (the layers' inputs and output-gradients,
   read by ``KFACInfluence.self_influence`` without forming per-sample gradients) against the
   materialised per-sample gradients (``lazy=False``, the previous path): wall / CPU time in
   interleaved rounds, agreement, and the peak extra memory of the self-influence pass alone in
   a fresh process (fit done before the peak is reset). Sections 1-3 use ``lazy=True`` too, as
   a user of the API would.

Timing protocol: every variant first runs all its phases on a tiny problem (warm-up: imports,
first-touch allocations, lazy initialisation), then ``--repeats`` rounds (default 3), each
running every variant's phases in turn (variants interleaved; section 2 runs at most 2 rounds,
its Captum rounds being long); best time per phase, both wall
time and the process's CPU time (``time.process_time``: on a shared machine it excludes the time
spent waiting for a core, though not the slowdown from sharing caches, memory bandwidth or a
hyperthread sibling with other jobs). A variant
whose first full round takes more than ``--slow`` seconds (default 100) runs only that round.
Threads: ``torch.set_num_threads(--threads)`` (default 2). The load average is printed at start
and end: on a shared machine timings are noisy, and torch's intra-op threads degrade badly when
the cores are oversubscribed (tiny ops then take milliseconds): there, use ``--threads 1``.

Usage::

    python benchmarks/bench_influence.py            # full run, writes docs/benchmarks_influence.md
    python benchmarks/bench_influence.py --quick    # smoke run on small sizes, writes nothing
                                                    # unless --out is given
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.metadata
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from _common import (  # noqa: E402  (after the sys.path set-up)
    _peak_kb,
    _reset_peak,
    _rss_kb,
    auroc,
    fmt_mb,
    git_state,
    md_table,
    timed,
)

from lightning_memo.influence import make_method, query_matrix, train_pass  # noqa: E402
from lightning_memo.influence.features import GradientFeaturizer  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks_influence.md"
SPEARMAN_TARGET = 0.99
KRON_TIME_TARGET = 1.0  # ours / Kronfluence, fit + pairwise
CAPTUM_TIME_TARGET = 0.5  # ours / Captum


# --------------------------------------------------------------------------- configuration
@dataclass
class Config:
    """Problem sizes and knobs of one benchmark run."""

    n: int = 5_000
    n_query: int = 1_000
    n_hessian: int = 1_000
    d: int = 64
    hidden: int = 256
    classes: int = 10
    train_batch: int = 64
    lr: float = 0.05
    epochs: int = 3
    batch: int = 256  # every influence computation, both libraries
    damping: float = 1e-3  # K-FAC / EK-FAC / Arnoldi (mean-loss curvature)
    arnoldi_dim: int = 200  # Captum's default
    top_k: int = 50
    repeats: int = 3
    slow_s: float = 100.0
    true_fisher: bool = False  # --true-fisher
    kfac: bool = True
    label_noise: float = 0.1
    centre_scale: float = 0.35
    data_seed: int = 0
    seed: int = 0
    threads: int = 2
    quick: bool = False

    @classmethod
    def quick_config(cls) -> Config:
        return cls(
            n=600, n_query=50, n_hessian=200, arnoldi_dim=30, top_k=10, repeats=1, quick=True
        )


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


def make_model(cfg: Config) -> nn.Sequential:
    torch.manual_seed(cfg.seed)
    return nn.Sequential(
        nn.Linear(cfg.d, cfg.hidden),
        nn.ReLU(),
        nn.Linear(cfg.hidden, cfg.hidden),
        nn.ReLU(),
        nn.Linear(cfg.hidden, cfg.classes),
    )


def train_model(
    cfg: Config, data: Dict[str, torch.Tensor]
) -> Tuple[nn.Sequential, Dict[str, float]]:
    """Plain torch SGD (momentum 0.9), ``cfg.epochs`` epochs, seeded shuffling."""
    model = make_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        TensorDataset(data["x"], data["y"]), batch_size=cfg.train_batch, shuffle=True, generator=gen
    )
    model.train()
    for _ in range(cfg.epochs):
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        acc = float((model(data["x"]).argmax(1) == data["y"]).float().mean())
        qacc = float((model(data["xq"]).argmax(1) == data["yq"]).float().mean())
        loss = float(F.cross_entropy(model(data["x"]), data["y"]))
    return model, {"train_acc": acc, "query_acc": qacc, "train_loss": loss}


def batches_of(
    x: torch.Tensor, y: torch.Tensor, size: int
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def per_sample_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def logits_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(batch[0])


def linear_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def tiny(cfg: Config, data: Dict[str, torch.Tensor]) -> Tuple[Config, Dict[str, torch.Tensor]]:
    """A problem of one batch and 8 queries (warm-up)."""
    n, q = min(cfg.batch, cfg.n), min(8, cfg.n_query)
    small = replace(cfg, n=n, n_query=q, n_hessian=min(cfg.n_hessian, n), arnoldi_dim=6, top_k=3)
    sdata = {k: v[:n] if k in ("x", "y", "flipped") else v[:q] for k, v in data.items()}
    return small, sdata


# --------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    """Progress to stderr (stdout carries the tables)."""
    print(f"[bench_influence {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed2(fn: Callable[[], Any]) -> Tuple[Tuple[float, float], Any]:
    """((wall seconds, CPU seconds of this process), result)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - w0, time.process_time() - c0), out


def _ranks(a: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.argsort(np.argsort(a, axis=axis), axis=axis).astype(np.float64)


def _corr_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation of the flattened arrays (float scores: ties negligible)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(_corr_rows(_ranks(a), _ranks(b)))


def pearson(a: Any, b: Any) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(_corr_rows(a, b))


def spearman_rows(a: Any, b: Any) -> np.ndarray:
    """Per-row Spearman of two (q, n) arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return _corr_rows(_ranks(a, 1), _ranks(b, 1))


def max_rel_err(got: Any, want: Any) -> float:
    """max |got - want| / max |want|."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    return float((got - want).abs().max() / want.abs().max())


def fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def quiet_libraries() -> None:
    for name in ("kronfluence", "accelerate", "captum"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def short_error(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return "".join(tb[-3:]).strip()


# --------------------------------------------------------------------------- machine info
def code_version() -> str:
    """Commit of the repository and whether lightning_memo/influence has uncommitted changes."""
    state = git_state("lightning_memo/influence")
    if state is None:
        return "unknown"
    head, dirty = state
    how = "with uncommitted changes in lightning_memo/influence" if dirty else "clean"
    return f"commit {head or 'unknown'} ({how})"


def thread_probe() -> str:
    """Time of a tiny (256 x 64) @ (64 x 256) matmul with 1 and 2 torch threads: on an
    oversubscribed machine the 2-thread time explodes (spinning intra-op threads)."""
    old = torch.get_num_threads()
    a, w = torch.randn(256, 64), torch.randn(256, 64)
    out = []
    for t in (1, 2):
        torch.set_num_threads(t)
        a @ w.T
        t0 = time.perf_counter()
        for _ in range(200):
            a @ w.T
        out.append(f"{(time.perf_counter() - t0) / 200 * 1e6:.0f} us with {t} thread(s)")
    torch.set_num_threads(old)
    return "tiny matmul: " + ", ".join(out)


def machine_info() -> Dict[str, str]:
    cpu = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "oversubscription probe (now)": thread_probe(),
        "cpu": f"{cpu or 'unknown'} ({os.cpu_count()} logical CPUs, {platform.machine()})",
        "memory": mem or "unknown",
        "torch": f"{torch.__version__}, torch threads: {torch.get_num_threads()}",
        "code": code_version(),
        "kronfluence": version("kronfluence"),
        "captum": version("captum"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "load average at start (1/5/15 min)": " / ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


# --------------------------------------------------------------------------- runners
class Runner:
    """One method of one library on one problem. ``phases``: timed one by one in sections 1-2
    (in order; later phases use what earlier ones built); ``full_phases``: the full run of the
    memory section (for ours, the pairwise and self scores come from one ``train_pass``)."""

    phases: Tuple[str, ...] = ("fit", "pairwise", "self_influence")
    full_phases: Tuple[str, ...] = ("fit", "pairwise", "self_influence")

    def run_phase(self, phase: str) -> Any:
        return getattr(self, phase)()

    def full(self) -> Tuple[Dict[str, Any], Dict[str, float]]:
        results, times = {}, {}
        for phase in self.full_phases:
            times[phase], results[phase] = timed(lambda p=phase: self.run_phase(p))
        return results, times


class OursBase(Runner):
    """Ours: ``method.fit`` + ``query_matrix`` + ``train_pass`` with exact per-sample gradients
    from ``GradientFeaturizer(projection_dim=None).grad_dict``."""

    full_phases = ("fit", "both")

    lazy = True  # grad_dict(lazy=True): factors, materialised only where a method reads them

    def __init__(self, cfg: Config, model: nn.Module, data: Dict[str, torch.Tensor]) -> None:
        self.cfg, self.model = cfg, model
        self.modules = linear_modules(model)
        self.train = batches_of(data["x"], data["y"], cfg.batch)
        self.queries = batches_of(data["xq"], data["yq"], cfg.batch)
        self.feat = GradientFeaturizer(self.modules, projection_dim=None, factored=False)
        self.method: Any = None

    def grad_fn(self, batch: Any) -> Any:
        return self.feat.grad_dict(self.model, batch, per_sample_loss, lazy=self.lazy)

    def pairwise(self) -> torch.Tensor:
        q_rows = query_matrix(self.method, self.grad_fn, self.queries)
        out = train_pass(self.method, self.grad_fn, self.train, self.cfg.n, query_rows=q_rows,
                         want_self=False)  # fmt: skip
        return out["scores"]

    def self_influence(self) -> torch.Tensor:
        return train_pass(self.method, self.grad_fn, self.train, self.cfg.n)["self_influence"]

    def both(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Query rows, then the pairwise and the self scores in one ``train_pass``."""
        q_rows = query_matrix(self.method, self.grad_fn, self.queries)
        out = train_pass(self.method, self.grad_fn, self.train, self.cfg.n, query_rows=q_rows,
                         want_self=True)  # fmt: skip
        return out["scores"], out["self_influence"]


class OursKFAC(OursBase):
    """``make_method("ekfac"|"kfac", fisher=...)``, fitted on the training set."""

    def __init__(self, cfg: Config, model: nn.Module, data: Dict[str, torch.Tensor], ekfac: bool,
                 fisher: str) -> None:  # fmt: skip
        super().__init__(cfg, model, data)
        self.ekfac, self.fisher = ekfac, fisher

    def fit(self) -> None:
        self.method = make_method(
            "ekfac" if self.ekfac else "kfac",
            self.modules,
            damping=self.cfg.damping,
            fisher=self.fisher,
            seed=self.cfg.seed,
        )
        self.method.fit(self.model, self.feat.params, per_sample_loss, self.train,
                        {"output_fn": logits_fn})  # fmt: skip


class OursArnoldi(OursBase):
    """``make_method("arnoldi")`` fitted on the Hessian set (the first ``n_hessian`` samples)."""

    def __init__(self, cfg: Config, model: nn.Module, data: Dict[str, torch.Tensor],
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__(cfg, model, data)
        self.seed = seed
        h = cfg.n_hessian
        self.hessian = batches_of(data["x"][:h], data["y"][:h], cfg.batch)

    def fit(self) -> Dict[str, Any]:
        self.method = make_method(
            "arnoldi",
            self.modules,
            damping=self.cfg.damping,
            arnoldi_dim=self.cfg.arnoldi_dim,
            arnoldi_k=self.cfg.top_k,
            seed=self.seed,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.method.fit(self.model, self.feat.params, per_sample_loss, self.hessian)
        ev = self.method.evals
        pos = ev[ev > 0]
        return {
            "kept": int(ev.numel()),
            "clamped": int((ev <= 0).sum()),
            "max": float(ev.max()),
            "min_positive": float(pos.min()) if pos.numel() else float("nan"),
            "warnings": [str(w.message) for w in caught],
        }


class KronTask:
    """Kronfluence classification task: summed cross-entropy; true-Fisher labels sampled from
    the model; measurement = the same loss, so the query gradient is the loss gradient (as
    ours)."""

    def __new__(cls) -> Any:  # built lazily: kronfluence is imported only when used
        from kronfluence.task import Task

        class _Task(Task):
            def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False):
                x, y = batch
                logits = model(x)
                if sample:
                    with torch.no_grad():
                        probs = torch.softmax(logits.detach().double(), dim=-1)
                        y = torch.multinomial(probs, num_samples=1).flatten()
                return F.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch: Any, model: nn.Module):
                return self.compute_train_loss(batch, model, sample=False)

        return _Task()


class Kronfluence(Runner):
    """``Analyzer.fit_all_factors`` / ``compute_pairwise_scores`` / ``compute_self_scores``."""

    def __init__(self, cfg: Config, model: nn.Module, data: Dict[str, torch.Tensor], strategy: str,
                 fisher: str, folder: str) -> None:  # fmt: skip
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments

        self.cfg, self.strategy = cfg, strategy
        self.task = KronTask()
        self.model = prepare_model(copy.deepcopy(model), self.task)  # wraps the layers in place
        self.analyzer = Analyzer(
            analysis_name=f"{strategy}_{fisher}",
            model=self.model,
            task=self.task,
            cpu=True,
            log_level=logging.WARNING,
            disable_tqdm=True,
            output_dir=folder,
        )
        self.factor_args = FactorArguments(
            strategy=strategy, use_empirical_fisher=(fisher == "empirical")
        )
        self.score_args = ScoreArguments(damping_factor=cfg.damping)
        self.train_ds = TensorDataset(data["x"], data["y"])
        self.query_ds = TensorDataset(data["xq"], data["yq"])
        self.factors = f"factors_{strategy}"

    def fit(self) -> None:
        self.analyzer.fit_all_factors(
            factors_name=self.factors,
            dataset=self.train_ds,
            per_device_batch_size=self.cfg.batch,
            factor_args=self.factor_args,
            overwrite_output_dir=True,
        )

    def pairwise(self) -> torch.Tensor:
        self.analyzer.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name=self.factors,
            query_dataset=self.query_ds,
            train_dataset=self.train_ds,
            per_device_query_batch_size=self.cfg.n_query,
            per_device_train_batch_size=self.cfg.batch,
            score_args=self.score_args,
            overwrite_output_dir=True,
        )
        return self.analyzer.load_pairwise_scores("pairwise")["all_modules"]

    def self_influence(self) -> torch.Tensor:
        self.analyzer.compute_self_scores(
            scores_name="self",
            factors_name=self.factors,
            train_dataset=self.train_ds,
            per_device_train_batch_size=self.cfg.batch,
            score_args=self.score_args,
            overwrite_output_dir=True,
        )
        return self.analyzer.load_self_scores("self")["all_modules"]


class CaptumArnoldi(Runner):
    """``ArnoldiInfluenceFunction`` with ``hessian_reg = damping * n_hessian`` (summed loss)."""

    def __init__(self, cfg: Config, model: nn.Module, data: Dict[str, torch.Tensor],
                 folder: str) -> None:  # fmt: skip
        self.cfg = cfg
        self.model = copy.deepcopy(model)
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, "captum_model.pt")
        torch.save(self.model.state_dict(), self.path)
        self.train_ds = TensorDataset(data["x"], data["y"])
        h = cfg.n_hessian
        self.hessian_ds = TensorDataset(data["x"][:h], data["y"][:h])
        self.query = (data["xq"], data["yq"])
        self.inf: Any = None

    def fit(self) -> Dict[str, Any]:
        # not exported from captum.influence in captum 0.9
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

        def load(model: nn.Module, path: str) -> float:
            model.load_state_dict(torch.load(path, weights_only=True))
            return 1.0

        self.inf = ArnoldiInfluenceFunction(
            self.model,
            train_dataset=DataLoader(self.train_ds, batch_size=self.cfg.batch, shuffle=False),
            checkpoint=self.path,
            checkpoints_load_func=load,
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=self.cfg.batch,
            hessian_dataset=DataLoader(self.hessian_ds, batch_size=self.cfg.batch, shuffle=False),
            sample_wise_grads_per_batch=True,
            projection_dim=self.cfg.top_k,
            seed=self.cfg.seed,
            arnoldi_dim=self.cfg.arnoldi_dim,
            hessian_reg=self.cfg.damping * self.cfg.n_hessian,
            show_progress=False,
        )
        return {"kept": len(self.inf.R)}

    def pairwise(self) -> torch.Tensor:
        return self.inf.influence(self.query)

    def self_influence(self) -> torch.Tensor:
        return self.inf.self_influence()


Maker = Callable[[Config, Dict[str, torch.Tensor]], Runner]


def only(make: Maker, phases: Tuple[str, ...]) -> Maker:
    """A maker whose runners time only ``phases``."""

    def wrapped(c: Config, d: Dict[str, torch.Tensor]) -> Runner:
        r = make(c, d)
        r.phases = phases
        return r

    return wrapped


# --------------------------------------------------------------------------- timing harness
def bench(
    cfg: Config,
    makers: Dict[str, Maker],
    data: Dict[str, torch.Tensor],
    repeats: Optional[int] = None,
) -> Tuple[Dict[str, Dict[str, float]], Dict[str, Dict[str, Any]], Dict[str, str], set]:
    """Warm up every variant on a tiny problem, then ``repeats`` interleaved rounds.

    Returns:
        best seconds {variant: {"wall"|"cpu": {phase: s}}}, first-round results
        {variant: {phase: result}},
        errors {variant: message} (a variant that raised is dropped), and the variants run once
        because their first round took more than ``cfg.slow_s``.
    """
    repeats = cfg.repeats if repeats is None else repeats
    tcfg, tdata = tiny(cfg, data)
    best: Dict[str, Dict[str, Dict[str, float]]] = {}
    results: Dict[str, Dict[str, Any]] = {}
    errors: Dict[str, str] = {}
    single: set = set()
    for name, make in makers.items():
        log(f"warm-up {name}")
        try:
            r = make(tcfg, tdata)
            for phase in r.phases:
                r.run_phase(phase)
        except Exception as exc:  # a reference library failing: record it and go on
            errors[name] = short_error(exc)
            log(f"{name} FAILED in the warm-up:\n{errors[name]}")
    for rnd in range(repeats):
        for name, make in makers.items():
            if name in errors or (rnd > 0 and name in single):
                continue
            try:
                gc.collect()
                r = make(cfg, data)
                res, times = {}, {}
                ru0 = resource.getrusage(resource.RUSAGE_SELF)
                for phase in r.phases:
                    gc.collect()
                    times[phase], res[phase] = timed2(lambda p=phase, r=r: r.run_phase(p))
            except Exception as exc:
                errors[name] = short_error(exc)
                log(f"{name} FAILED:\n{errors[name]}")
                best.pop(name, None)
                results.pop(name, None)
                continue
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            b = best.setdefault(name, {"wall": {}, "cpu": {}, "rounds": [], "kernel": []})
            b["rounds"].append(tuple(sum(t[i] for t in times.values()) for i in (0, 1)))
            b["kernel"].append((  # (user s, system s, minor page faults) of the round
                ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime,
                ru1.ru_minflt - ru0.ru_minflt,
            ))  # fmt: skip
            for phase, (w, c) in times.items():
                b["wall"][phase] = min(b["wall"].get(phase, math.inf), w)
                b["cpu"][phase] = min(b["cpu"].get(phase, math.inf), c)
            results.setdefault(name, res)
            done = ", ".join(f"{p} {w:.2f}s (cpu {c:.2f}s)" for p, (w, c) in times.items())
            log(f"round {rnd + 1}/{repeats} {name}: {done}")
            if rnd == 0 and sum(w for w, _ in times.values()) > cfg.slow_s and repeats > 1:
                single.add(name)
            del r, res
    return best, results, errors, single


def agreement_row(label: str, ours_pair: Any, ref_pair: Any, ours_self: Any, ref_self: Any,
                  scale: float = 1.0) -> Tuple[List[str], Dict[str, float]]:  # fmt: skip
    """Agreement of pairwise (q, n) and self (n,) scores (either pair may be None);
    ``scale`` multiplies the reference before the max difference (Captum: n_hessian)."""
    m: Dict[str, float] = {}
    if ours_pair is not None and ref_pair is not None:
        a = np.asarray(torch.as_tensor(ours_pair).double())
        b = np.asarray(torch.as_tensor(ref_pair).double())
        per_q = spearman_rows(a, b)
        m.update({
            "spearman_all": spearman(a, b),
            "pearson_all": pearson(a, b),
            "spearman_query_mean": float(per_q.mean()),
            "spearman_query_min": float(per_q.min()),
            "relerr_pair": max_rel_err(b * scale, a),
        })  # fmt: skip
    sa = np.asarray(torch.as_tensor(ours_self).double())
    sb = np.asarray(torch.as_tensor(ref_self).double())
    m.update({
        "spearman_self": spearman(sa, sb),
        "pearson_self": pearson(sa, sb),
        "relerr_self": max_rel_err(sb * scale, sa),
    })  # fmt: skip

    def f(key: str, spec: str) -> str:
        return format(m[key], spec) if key in m else "-"

    row = [
        label,
        f("spearman_all", ".5f"),
        f("pearson_all", ".5f"),
        f("spearman_query_mean", ".5f"),
        f("spearman_query_min", ".5f"),
        f("spearman_self", ".5f"),
        f("pearson_self", ".5f"),
        f("relerr_pair", ".1e"),
        f("relerr_self", ".1e"),
    ]
    return row, m


AGREEMENT_HEADERS = [
    "ours vs reference",
    "Spearman, all pairs",
    "Pearson, all pairs",
    "Spearman per query: mean",
    "per query: min",
    "Spearman self",
    "Pearson self",
    "max diff / max (pairs)",
    "max diff / max (self)",
]


def error_text(errors: Dict[str, str]) -> str:
    if not errors:
        return ""
    parts = [
        f"**{name} failed** (exact error):\n\n```\n{msg}\n```\n" for name, msg in errors.items()
    ]
    return "\n" + "\n".join(parts)


KINDS = ("wall", "cpu")


def tsum(b: Dict[str, Dict[str, float]], kind: str, phases: Sequence[str]) -> float:
    """Sum of the best times of ``phases`` (nan if one is missing)."""
    return sum(b[kind].get(p, math.nan) for p in phases)


def time_cell(best: Dict[str, Any], single: set, name: str, phases: Sequence[str]) -> str:
    """``wall / cpu`` seconds of the phases' sum, ``*`` if the variant ran once."""
    if name not in best or any(p not in best[name]["wall"] for p in phases):
        return "-"
    b = best[name]
    star = " *" if name in single else ""
    return f"{fmt_s(tsum(b, 'wall', phases))} / {fmt_s(tsum(b, 'cpu', phases))}{star}"


def kernel_note(best: Dict[str, Any], names: Sequence[str]) -> str:
    """Share of each variant's CPU time spent in the kernel, and minor page faults per round."""
    parts = []
    for name in names:
        if name in best and best[name]["kernel"]:
            k = best[name]["kernel"]
            user, sys_ = sum(x[0] for x in k), sum(x[1] for x in k)
            faults = sum(x[2] for x in k) / len(k)
            parts.append(
                f"{name} {sys_ / max(user + sys_, 1e-9):.0%} ({faults / 1e6:.1f} M minor page "
                "faults per round)"
            )
    if not parts:
        return ""
    return (
        " Share of the CPU time spent in the kernel, all rounds (page faults: fresh memory for "
        "large temporaries): " + ", ".join(parts) + "."
    )


def rounds_cell(best: Dict[str, Any], name: str) -> str:
    """Every round's total, ``wall / CPU`` seconds, in order (shows the run-to-run spread)."""
    if name not in best:
        return "-"
    return ", ".join(f"{fmt_s(w)} / {fmt_s(c)}" for w, c in best[name]["rounds"])


def ratios_of(bo: Dict[str, Any], bk: Dict[str, Any], groups: Dict[str, Sequence[str]]
              ) -> Dict[str, Dict[str, float]]:  # fmt: skip
    """{kind: {group: ours / reference}} for the groups both timed."""
    out: Dict[str, Dict[str, float]] = {k: {} for k in KINDS}
    for key, phases in groups.items():
        if all(p in bo["wall"] and p in bk["wall"] for p in phases):
            for kind in KINDS:
                out[kind][key] = tsum(bo, kind, phases) / tsum(bk, kind, phases)
    return out


def ratio_cell(
    r: Dict[str, Dict[str, float]], key: str, bold: bool = False, digits: int = 2
) -> str:
    if key not in r["wall"]:
        return "-"
    s = f"{r['wall'][key]:.{digits}f}x / {r['cpu'][key]:.{digits}f}x"
    return f"**{s}**" if bold else s


def met2(r: Dict[str, Dict[str, float]], key: str, target: float) -> str:
    """met / NOT met on wall and on CPU time (both said when they differ)."""
    w, c = r["wall"][key] <= target, r["cpu"][key] <= target
    if w == c:
        return met(w)
    return f"{met(w)} on wall time, {met(c)} on CPU time"


GROUPS = {
    "fit": ("fit",),
    "pairwise": ("pairwise",),
    "self_influence": ("self_influence",),
    "fit+pairwise": ("fit", "pairwise"),
    "total": ("fit", "pairwise", "self_influence"),
}


# --------------------------------------------------------------------------- section 1
def section_kfac(cfg: Config, model: nn.Module, data: Dict[str, torch.Tensor], folder: str
                 ) -> Tuple[str, Dict[str, Any]]:  # fmt: skip
    counter = iter(range(10**6))

    def kron(strategy: str, fisher: str) -> Maker:
        def make(c: Config, d: Dict[str, torch.Tensor]) -> Runner:
            sub = os.path.join(folder, f"kronfluence{next(counter)}")
            return Kronfluence(c, model, d, strategy, fisher, sub)

        return make

    def ours(ekfac: bool, fisher: str) -> Maker:
        return lambda c, d: OursKFAC(c, model, d, ekfac, fisher)

    log("section 1: EK-FAC vs Kronfluence")
    main_pair = {
        "ours EK-FAC": ours(True, "empirical"),
        "Kronfluence EK-FAC": kron("ekfac", "empirical"),
    }
    best, results, errors, single = bench(cfg, main_pair, data)
    once: set = set()
    extra: Dict[str, Maker] = {}
    if cfg.kfac:
        extra["ours K-FAC"] = ours(False, "empirical")
        extra["Kronfluence K-FAC"] = kron("kfac", "empirical")
    if cfg.true_fisher:  # fit + self only (the pairwise agreement is limited by the sampling)
        self_only = ("fit", "self_influence")
        extra["ours EK-FAC, true Fisher"] = only(ours(True, "true"), self_only)
        extra["Kronfluence EK-FAC, true Fisher"] = only(kron("ekfac", "true"), self_only)
    if extra:
        log(f"section 1: {list(extra)} (one round)")
        b2, res2, err2, _ = bench(cfg, extra, data, repeats=1)
        best.update(b2)
        results.update(res2)
        errors.update(err2)
        once = set(b2)
    single |= once if cfg.repeats > 1 else set()

    pairs = [("EK-FAC", "ours EK-FAC", "Kronfluence EK-FAC")]
    if cfg.kfac:
        pairs.append(("K-FAC", "ours K-FAC", "Kronfluence K-FAC"))
    if cfg.true_fisher:
        pairs.append(("EK-FAC, true Fisher", "ours EK-FAC, true Fisher",
                      "Kronfluence EK-FAC, true Fisher"))  # fmt: skip

    rows, ratios = [], {}
    for _, o, k in pairs:
        for name in (o, k):
            if name not in best:
                rows.append([name, "failed"])
                continue
            cells = [time_cell(best, single, name, GROUPS[g]) for g in GROUPS]
            rows.append([name] + cells + [rounds_cell(best, name)])
        if o in best and k in best:
            r = ratios[o] = ratios_of(best[o], best[k], GROUPS)
            rows.append([f"ratio ours / Kronfluence ({o[5:]})"]
                        + [ratio_cell(r, g, bold=g == "fit+pairwise") for g in GROUPS])  # fmt: skip
    t1 = md_table(
        ["method", "fit (s)", f"{cfg.n_query:,} x {cfg.n:,} pairwise (s)", f"{cfg.n:,} self (s)",
         "fit + pairwise (s)", "fit + pairwise + self (s)", "each round: total (s)"],
        rows,
    )  # fmt: skip

    arows, agree = [], {}
    for label, o, k in pairs:
        if o in results and k in results:
            ro, rk = results[o], results[k]
            row, m = agreement_row(label, ro.get("pairwise"), rk.get("pairwise"),
                                   ro["self_influence"], rk["self_influence"])  # fmt: skip
            arows.append(row)
            agree[label] = m
    t2 = md_table(AGREEMENT_HEADERS, arows) if arows else "(no pair ran)"

    correction_note = ""
    if "ours EK-FAC" in best and "ours K-FAC" in best:
        fe, fk = best["ours EK-FAC"]["cpu"]["fit"], best["ours K-FAC"]["cpu"]["fit"]
        correction_note = (
            f" Ours K-FAC fits in {fmt_s(fk)} CPU s, ours EK-FAC in {fmt_s(fe)} CPU s: "
            f"{(fe - fk) / fe:.0%} of our EK-FAC fit is the eigenvalue-correction pass (the "
            "second pass over the data)."
        )
    summary = []
    if "EK-FAC" in agree and "ours EK-FAC" in ratios:
        m, r = agree["EK-FAC"], ratios["ours EK-FAC"]
        corr_ok = (
            min(m["spearman_all"], m["spearman_query_mean"], m["spearman_self"]) >= SPEARMAN_TARGET
        )
        summary.append(
            f"EK-FAC (empirical Fisher): ours / Kronfluence for fit + pairwise (wall / CPU) = "
            f"{ratio_cell(r, 'fit+pairwise', True)} (target <= {KRON_TIME_TARGET:.1f}x: "
            f"**{met2(r, 'fit+pairwise', KRON_TIME_TARGET)}**); fit {ratio_cell(r, 'fit')}, "
            f"pairwise {ratio_cell(r, 'pairwise')}, self {ratio_cell(r, 'self_influence')}. "
            "Spearman ours vs Kronfluence: "
            f"all pairs {m['spearman_all']:.5f}, mean per query {m['spearman_query_mean']:.5f}, "
            f"self {m['spearman_self']:.5f} (target >= {SPEARMAN_TARGET}: **{met(corr_ok)}**)."
        )
    if "K-FAC" in agree and "ours K-FAC" in ratios:
        m, r = agree["K-FAC"], ratios["ours K-FAC"]
        summary.append(
            f"K-FAC: fit + pairwise {ratio_cell(r, 'fit+pairwise')} Kronfluence (fit "
            f"{ratio_cell(r, 'fit')}); "
            f"Spearman all pairs {m['spearman_all']:.5f}, self {m['spearman_self']:.5f}."
        )
    text = (
        f"### 1. EK-FAC and K-FAC vs Kronfluence (n={cfg.n:,}, {cfg.n_query:,} queries, batch "
        f"{cfg.batch}, damping {cfg.damping:g}, empirical Fisher unless said; EK-FAC: best of "
        f"{cfg.repeats} after a warm-up on a tiny problem)\n\n{t1}\n\n"
        "Cells: wall / CPU seconds (CPU: this process's `time.process_time`), best per phase; "
        "the last column lists every round's total, to show the spread. "
        "`*`: one round only (K-FAC and true Fisher: one round to keep the run short; the "
        'true-Fisher rows time the fit and the self-influence only). Ours "pairwise" = '
        '`query_matrix` + a `train_pass` without self-influence; "self" = a `train_pass` '
        "without queries (computing both in one `train_pass`, as our API does when both are "
        "wanted, is timed in section 3). Kronfluence's times include writing its factors and "
        "scores to disk (safetensors, tmp dir), reading the factors back for each score call, "
        "and reading the scores back (`load_pairwise_scores` / `load_self_scores`); they are "
        "small here (factors < 2 MB, scores 20 MB). Kronfluence accumulates the covariances and "
        "the EK-FAC eigenvalues in float32 (its defaults), ours in float64.\n\n"
        f"Agreement (ours vs Kronfluence, same settings):\n\n{t2}\n\n"
        "With the empirical Fisher both libraries fit the same matrices, so the scores agree to "
        "float32 round-off."
        + (
            " With the true Fisher each library samples its own labels from the model, so the "
            "two fit different random matrices and agree only statistically."
            if cfg.true_fisher
            else ""
        )
        + correction_note
        + kernel_note(best, [n for _, o, k in pairs for n in (o, k)])
        + "\n\n"
        + "\n\n".join(summary)
        + "\n"
        + error_text(errors)
    )
    res = {"best": best, "ratios": ratios, "agreement": agree, "errors": errors}
    return text, {**res, "self": {n: results[n]["self_influence"] for n in results}}


# --------------------------------------------------------------------------- section 2
def section_arnoldi(cfg: Config, model: nn.Module, data: Dict[str, torch.Tensor], folder: str
                    ) -> Tuple[str, Dict[str, Any]]:  # fmt: skip
    makers: Dict[str, Maker] = {
        "ours Arnoldi": lambda c, d: OursArnoldi(c, model, d, seed=0),
        "Captum Arnoldi": lambda c, d: CaptumArnoldi(c, model, d, os.path.join(folder, "captum")),
    }
    log("section 2: Arnoldi vs Captum")
    best, results, errors, single = bench(cfg, makers, data, repeats=min(cfg.repeats, 2))
    log("section 2: ours with seed 1 (the start vector's effect; one round)")
    seed1 = "ours Arnoldi, seed 1"
    _, sres, serr, _ = bench(cfg, {seed1: lambda c, d: OursArnoldi(c, model, d, seed=1)}, data,
                             repeats=1)  # fmt: skip
    errors.update(serr)

    rows: List[List[str]] = []
    ratio: Dict[str, Dict[str, float]] = {}
    groups = {g: GROUPS[g] for g in ("fit", "pairwise", "self_influence", "total")}
    for name in makers:
        if name not in best:
            rows.append([name, "failed"])
            continue
        cells = [time_cell(best, single, name, groups[g]) for g in groups]
        rows.append([name] + cells + [rounds_cell(best, name)])
    o, c = "ours Arnoldi", "Captum Arnoldi"
    if o in best and c in best:
        ratio = ratios_of(best[o], best[c], groups)
        cells = [ratio_cell(ratio, g, bold=g == "total", digits=3) for g in groups]
        rows.append(["ratio ours / Captum"] + cells)
    t1 = md_table(
        ["method", "setup: Arnoldi (s)", f"{cfg.n_query:,} x {cfg.n:,} pairwise (s)",
         f"{cfg.n:,} self (s)", "total (s)", "each round: total (s)"],
        rows,
    )  # fmt: skip

    arows, agree = [], {}
    if o in results and c in results:
        row, m = agreement_row("ours vs Captum (Captum x n_hessian)", results[o]["pairwise"],
                               results[c]["pairwise"], results[o]["self_influence"],
                               results[c]["self_influence"], scale=cfg.n_hessian)  # fmt: skip
        arows.append(row)
        agree["captum"] = m
    if o in results and seed1 in sres:
        s1 = sres[seed1]
        row, m = agreement_row("reference: ours seed 0 vs ours seed 1", results[o]["pairwise"],
                               s1["pairwise"], results[o]["self_influence"],
                               s1["self_influence"])  # fmt: skip
        arows.append(row)
        agree["seed"] = m
    t2 = md_table(AGREEMENT_HEADERS, arows) if arows else "(no pair ran)"

    eig = ""
    if o in results:
        e = results[o]["fit"]
        eig = (
            f"Ours kept {e['kept']} eigenpairs (eigenvalues of the mean-loss Hessian from "
            f"{e['max']:.3g} down to {e['min_positive']:.3g}; {e['clamped']} negative ones "
            "clamped to 0)"
        )
        if c in results:
            eig += f"; Captum kept {results[c]['fit']['kept']}"
        eig += ". "
        if e["clamped"]:
            eig += (
                "**Ours picks the top-k by magnitude and clamps negative eigenvalues to 0, so "
                "those directions get the largest weight, 1 / damping; Captum keeps only "
                "eigenvalues above its tolerance. The scores then disagree** (see the report). "
            )
    summary = ""
    if ratio and "captum" in agree:
        m = agree["captum"]
        worst = min(m["spearman_all"], m["pearson_all"], m["spearman_self"], m["pearson_self"])
        summary = (
            "Ours / Captum, setup + pairwise + self (wall / CPU): "
            f"{ratio_cell(ratio, 'total', True, 3)} (target <= {CAPTUM_TIME_TARGET}x: "
            f"**{met2(ratio, 'total', CAPTUM_TIME_TARGET)}**; setup "
            f"{ratio_cell(ratio, 'fit', digits=3)}, pairwise "
            f"{ratio_cell(ratio, 'pairwise', digits=3)}, self "
            f"{ratio_cell(ratio, 'self_influence', digits=3)}). Correlation ours vs Captum: "
            "Spearman / Pearson all "
            f"pairs {m['spearman_all']:.4f} / {m['pearson_all']:.4f}, self {m['spearman_self']:.4f}"
            f" / {m['pearson_self']:.4f} (target >= {SPEARMAN_TARGET}: "
            f"**{met(worst >= SPEARMAN_TARGET)}**)."
        )
    text = (
        f"### 2. Arnoldi vs Captum ArnoldiInfluenceFunction (n={cfg.n:,}, {cfg.n_query:,} queries, "
        f"Hessian set {cfg.n_hessian:,}, arnoldi_dim {cfg.arnoldi_dim}, top-k {cfg.top_k}, batch "
        f"{cfg.batch}; best of {min(cfg.repeats, 2)} after a warm-up on a tiny problem)\n\n"
        f"{t1}\n\n"
        "Cells: wall / CPU seconds (CPU: this process's `time.process_time`), best per phase; "
        "the last column lists every round's total, to show the spread. "
        f"`*`: the first round took over {cfg.slow_s:.0f} s, so it ran once. Settings made "
        f"equivalent: ours damping {cfg.damping:g} on the Hessian of the mean loss; Captum "
        f"`hessian_reg` = {cfg.damping:g} x {cfg.n_hessian} = {cfg.damping * cfg.n_hessian:g} on "
        'the Hessian of the summed loss (`CrossEntropyLoss(reduction="sum")`), added to the '
        "Krylov-projected matrix before its eigendecomposition, i.e. to the kept eigenvalues, "
        "as our damping is; so Captum's scores are ours / n_hessian (the max-difference "
        "columns compare ours with Captum x n_hessian). Same sign (positive = proponent). "
        "Captum: `sample_wise_grads_per_batch=True` (per-sample gradients from layer hooks; "
        "its default takes one backward pass per sample), `projection_dim` = top-k, `seed` 0, "
        "default `arnoldi_tol` / `hessian_inverse_tol`. Captum drops the last Krylov vector "
        "(it distills a "
        f"{cfg.arnoldi_dim - 1}-dimensional space, ours {cfg.arnoldi_dim}), iterates in float32 "
        "with one Gram-Schmidt pass and keeps the largest *algebraic* eigenvalues; ours "
        "iterates in float64 with two passes and keeps the largest-magnitude ones (negative "
        "ones clamped to 0). The start vectors differ, so the agreement cannot be exact: the "
        "seed row shows how much ours alone moves with the start vector. " + eig + "With "
        "`--arnoldi-dim 100` on this model (measured while preparing this benchmark, threads 1), "
        "10 of ours' top 50 eigenvalues by magnitude are negative (down to -0.19) and get weight "
        "1 / damping = 1000, Captum keeps 50 positive ones: Spearman ours vs Captum drops to "
        "0.19 for all pairs (0.99 for the self-influence), and ours seed 0 vs seed 1 to 0.79; "
        "with those directions dropped it would be 0.69 vs Captum and 0.71 seed to seed (the "
        "tail of the top 50 is not converged in a 100-dimensional Krylov space).\n\n"
        f"Agreement:\n\n{t2}\n\n{summary}"
        + kernel_note(best, list(makers))
        + "\n"
        + error_text(errors)
    )
    res = {"best": best, "ratio": ratio, "agreement": agree, "errors": errors}
    return text, {**res, "self": {n: results[n]["self_influence"] for n in results}}


# --------------------------------------------------------------------------- section 3


MEMORY_CASES = ["ours EK-FAC", "Kronfluence EK-FAC", "ours Arnoldi", "Captum Arnoldi"]


class OursKFACSelf(OursKFAC):
    """Only the self-influence pass of ours EK-FAC / K-FAC, with the per-sample gradients
    materialised (``lazy=False``: the previous path) or read from the layer factors."""

    phases = ("fit", "self_influence")
    full_phases = ("self_influence",)

    def __init__(self, cfg: Config, model: nn.Module, data: Dict[str, torch.Tensor], ekfac: bool,
                 lazy: bool) -> None:  # fmt: skip
        super().__init__(cfg, model, data, ekfac, "empirical")
        self.lazy = lazy


def make_runner(case: str, cfg: Config, model: nn.Module, data: Dict[str, torch.Tensor],
                folder: str) -> Runner:  # fmt: skip
    if case == "ours EK-FAC":
        return OursKFAC(cfg, model, data, True, "empirical")
    if case.startswith("ours EK-FAC self"):
        return OursKFACSelf(cfg, model, data, True, lazy="factors" in case)
    if case == "Kronfluence EK-FAC":
        return Kronfluence(cfg, model, data, "ekfac", "empirical", folder)
    if case == "ours Arnoldi":
        return OursArnoldi(cfg, model, data)
    if case == "Captum Arnoldi":
        return CaptumArnoldi(cfg, model, data, folder)
    raise ValueError(case)


def memory_child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Runs in a fresh process: baseline RSS, then the peak RSS of one full run."""
    quiet_libraries()
    cfg = Config(**spec["cfg"])
    data = make_data(cfg)
    model = make_model(cfg)
    model.load_state_dict(torch.load(spec["model"], weights_only=True))
    model.eval()
    case = spec["case"]
    with tempfile.TemporaryDirectory() as folder:
        tcfg, tdata = tiny(cfg, data)
        warm = make_runner(case, tcfg, model, tdata, os.path.join(folder, "warm"))
        if spec.get("fit_first"):
            warm.fit()
        warm.full()  # warm-up
        runner = make_runner(case, cfg, model, data, os.path.join(folder, "run"))
        if spec.get("fit_first"):
            runner.fit()  # outside the measurement: only the scoring pass is measured
        gc.collect()
        base = _rss_kb()
        reset = _reset_peak()
        peak_before = _peak_kb()
        result, times = runner.full()  # kept alive until the peak is read
        peak = _peak_kb()
        del result
    return {
        "base_kb": base,
        "peak_kb": peak,
        "extra_kb": peak - base,
        "slack_kb": max(0, peak_before - base),
        "reset": reset,
        "times": times,
    }


def section_memory(cfg: Config, model_path: str) -> Tuple[str, Dict[str, Any]]:
    rows, res, errors = [], {}, {}
    for case in MEMORY_CASES:
        spec = {"cfg": asdict(cfg), "model": model_path, "case": case}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", json.dumps(spec)]
        cmd += ["--threads", str(cfg.threads)]
        log(f"memory: {case}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO_ROOT)
        if proc.returncode != 0:
            errors[case] = proc.stderr.strip()[-2000:]
            log(f"memory child failed ({case}):\n{errors[case]}")
            rows.append([case, "failed", "", "", "", ""])
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"memory: {case}: {r}")
        res[case] = r
        t = r["times"]
        scores = t.get("both", t.get("pairwise", 0.0) + t.get("self_influence", 0.0))
        rows.append([
            case,
            fmt_mb(r["base_kb"]),
            fmt_mb(r["extra_kb"]),
            "reset" if r["reset"] else fmt_mb(r["slack_kb"]),
            fmt_s(t["fit"]),
            fmt_s(scores),
            fmt_s(t["fit"] + scores),
        ])  # fmt: skip
    p = sum(p.numel() for p in make_model(cfg).parameters())
    text = (
        "### 3. Peak extra memory of a full run: fit + pairwise + self (fresh process per row, one "
        "at a time)\n\n"
        + md_table(
            [
                "method",
                "baseline RSS (MB)",
                "peak extra (MB)",
                "peak reset / slack (MB)",
                "fit (wall s)",
                "pairwise + self (wall s)",
                "total (wall s)",
            ],
            rows,
        )  # fmt: skip
        + f"\n\nOurs computes the pairwise and the self scores in one `train_pass` here (the "
        "references in two calls, as in sections 1-2); the times are of this single cold run in "
        "the child (after the tiny warm-up) and only indicative. For scale: the "
        f"{cfg.n_query:,} query gradients ({p:,} parameters) in float32 are "
        f"{cfg.n_query * p * 4 / 2**20:.0f} MB, one batch of {cfg.batch} per-sample gradients "
        f"{cfg.batch * p * 4 / 2**20:.0f} MB, the {cfg.n_query:,} x {cfg.n:,} scores "
        f"{cfg.n_query * cfg.n * 4 / 2**20:.0f} MB (float32). 'reset': the peak was reset to the "
        "baseline just before the run (/proc/self/clear_refs), so the number is exact; otherwise "
        "'slack' is how much the peak before the run exceeded the baseline. Peak = VmHWM from "
        "/proc/self/status.\n" + error_text(errors)
    )
    return text, res


# --------------------------------------------------------------------------- section 5
def section_kfac_self(
    cfg: Config, model: nn.Module, data: Dict[str, torch.Tensor], model_path: str
) -> Tuple[str, Dict[str, Any]]:
    """Self-influence of the n training samples, per-sample gradients materialised vs read from
    the layer factors: time (interleaved rounds) and peak memory (fresh processes)."""
    makers: Dict[str, Maker] = {}
    for ekfac in (True, False):
        tag = "EK-FAC" if ekfac else "K-FAC"
        for lazy in (False, True):
            how = "from the factors (new)" if lazy else "materialised gradients (before)"
            makers[f"ours {tag}, {how}"] = lambda c, d, e=ekfac, lz=lazy: OursKFACSelf(
                c, model, d, e, lz
            )
    best, results, errors, _ = bench(cfg, makers, data)
    mem: Dict[str, Any] = {}
    for case in ("ours EK-FAC self, materialised", "ours EK-FAC self, factors"):
        spec = {"cfg": asdict(cfg), "model": model_path, "case": case, "fit_first": True}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", json.dumps(spec)]
        cmd += ["--threads", str(cfg.threads)]
        log(f"memory: {case}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO_ROOT)
        if proc.returncode != 0:
            errors[case] = proc.stderr.strip()[-2000:]
            continue
        mem[case] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"memory: {case}: {mem[case]}")
    rows = []
    for tag in ("EK-FAC", "K-FAC"):
        old = f"ours {tag}, materialised gradients (before)"
        new = f"ours {tag}, from the factors (new)"
        if old not in best or new not in best:
            continue
        a = torch.as_tensor(results[old]["self_influence"]).double()
        b = torch.as_tensor(results[new]["self_influence"]).double()
        diff = float((a - b).abs().max() / a.abs().max())
        for name in (old, new):
            w = best[name]["wall"]["self_influence"]
            c = best[name]["cpu"]["self_influence"]
            key = "ours EK-FAC self, " + ("factors" if "factors" in name else "materialised")
            m = mem.get(key) if tag == "EK-FAC" else None
            rows.append([
                name,
                f"{fmt_s(w)} / {fmt_s(c)}",
                f"{best[old]['wall']['self_influence'] / w:.1f}x",
                fmt_mb(m["extra_kb"]) if m else "-",
                "-" if name == old else f"{diff:.1e}",
            ])  # fmt: skip
    p = sum(q.numel() for q in model.parameters())
    io = sum(m.in_features + 1 + m.out_features for m in linear_modules(model).values())
    text = (
        f"### 5. K-FAC / EK-FAC self-influence of the {cfg.n:,} training samples: per-sample "
        "gradients materialised vs read from the layer factors\n\n"
        "`train_pass(method, grad_fn, train, want_self=True)` without queries, after the fit "
        "(empirical Fisher, damping as above). Before: `grad_fn` returns the materialised "
        "per-sample gradients (`GradientFeaturizer.grad_dict(...)`: a (B, d_out, d_in + 1) "
        "tensor per layer, rotated by Q_S^T G Q_A). Now: `grad_dict(..., lazy=True)` returns the "
        "layers' inputs and output-gradients (`FactoredGrads`) and `KFACInfluence.self_influence` "
        "reads them: the rotated gradient of a sample without positions is the rank-one "
        "(Q_S^T g)(Q_A^T a)^T, so its weighted square sum is ((Q_S^T g)^2)^T W (Q_A^T a)^2 with W "
        "= 1 / (Lambda + damping), no per-sample gradient formed. Times: wall / CPU seconds, "
        f"best of {cfg.repeats} interleaved rounds; peak extra memory of the self-influence pass "
        "alone (fresh process, fit done before the peak is reset; EK-FAC).\n\n"
        + md_table(
            [
                "self-influence pass",
                "wall / CPU (s)",
                "speed-up",
                "peak extra (MB)",
                "max abs diff / max abs (vs before)",
            ],
            rows,
        )
        + f"\n\nFor scale: one batch of {cfg.batch} per-sample gradients ({p:,} parameters) is "
        f"{cfg.batch * p * 4 / 2**20:.0f} MB in float32 (and the rotation makes two more of that "
        "size); the factors of the same batch are "
        f"{cfg.batch * io * 4 / 2**20:.1f} MB.\n" + error_text(errors)
    )
    return text, {"best": best, "mem": mem}


# --------------------------------------------------------------------------- section 4
def section_quality(
    cfg: Config, model: nn.Module, data: Dict[str, torch.Tensor], selfs: Dict[str, Any]
) -> str:
    flipped = data["flipped"].numpy()
    with torch.no_grad():
        loss = F.cross_entropy(model(data["x"]), data["y"], reduction="none").numpy()
    named = [(name, torch.as_tensor(s).double().numpy()) for name, s in selfs.items()]
    named.append(("baseline: training loss of the sample", loss))
    k = max(1, int(0.1 * cfg.n))
    rows = []
    for name, s in named:
        top = np.argsort(-s)[:k]
        share = flipped[top].sum() / max(1, flipped.sum())
        rows.append([name, f"{auroc(s, flipped):.4f}", f"{share:.0%}"])
    return (
        f"### 4. Quality context: finding the {int(flipped.sum())} flipped labels by "
        "self-influence\n\n"
        + md_table(["scores", "AUROC", "share of flipped labels in the top 10 %"], rows)
        + "\n\nAUROC 0.5 = chance. Self-influence g^T (H + damping I)^{-1} g of each training "
        "sample with its (possibly flipped) label; the loss baseline ranks samples by their "
        "loss.\n"
    )


# --------------------------------------------------------------------------- summary
def summary_text(cfg: Config, r1: Dict[str, Any], r2: Dict[str, Any], r3: Dict[str, Any]) -> str:
    """The page's top: each target, measured value and met / NOT met, and one table."""
    rows: List[List[str]] = []
    table: List[List[str]] = []

    def add_method(best: Dict[str, Any], name: str, ratio: str, corr: str) -> None:
        if name in best:
            table.append([
                name,
                time_cell(best, set(), name, ("fit",)),
                time_cell(best, set(), name, ("pairwise",)),
                time_cell(best, set(), name, ("self_influence",)),
                ratio,
                corr,
                fmt_mb(r3[name]["extra_kb"]) if name in r3 else "-",
            ])  # fmt: skip

    if r1:
        best, ratios, agree = r1["best"], r1["ratios"], r1["agreement"]
        r, m = ratios.get("ours EK-FAC"), agree.get("EK-FAC")
        if r is not None and "fit+pairwise" in r["wall"]:
            rows.append([
                "EK-FAC time, fit + pairwise: ours <= 1.0x Kronfluence (wall / CPU)",
                ratio_cell(r, "fit+pairwise"),
                met2(r, "fit+pairwise", KRON_TIME_TARGET),
            ])  # fmt: skip
        if m is not None:
            worst = min(m["spearman_all"], m["spearman_query_mean"], m["spearman_self"])
            rows.append([
                "EK-FAC Spearman ours vs Kronfluence >= 0.99 (all pairs / mean per query / self)",
                f"{m['spearman_all']:.5f} / {m['spearman_query_mean']:.5f} / "
                f"{m['spearman_self']:.5f}",
                met(worst >= SPEARMAN_TARGET),
            ])  # fmt: skip
        for o, k, lab in (
            ("ours EK-FAC", "Kronfluence EK-FAC", "EK-FAC"),
            ("ours K-FAC", "Kronfluence K-FAC", "K-FAC"),
        ):
            r, m = ratios.get(o), agree.get(lab, {})
            ratio = ratio_cell(r, "fit+pairwise") + " (fit + pairwise)" if r else ""
            corr = f"{m['spearman_all']:.5f}" if "spearman_all" in m else ""
            add_method(best, o, ratio, corr)
            add_method(best, k, "", "")
    if r2:
        best, ratio, agree = r2["best"], r2["ratio"], r2["agreement"]
        m = agree.get("captum")
        if ratio:
            rows.append([
                "Arnoldi time, setup + pairwise + self: ours <= 0.5x Captum (wall / CPU)",
                ratio_cell(ratio, "total", digits=3),
                met2(ratio, "total", CAPTUM_TIME_TARGET),
            ])  # fmt: skip
        if m is not None:
            worst = min(m["spearman_all"], m["pearson_all"], m["spearman_self"], m["pearson_self"])
            rows.append([
                "Arnoldi correlation ours vs Captum >= 0.99 (Spearman / Pearson, pairs; self)",
                f"{m['spearman_all']:.4f} / {m['pearson_all']:.4f}; "
                f"{m['spearman_self']:.4f} / {m['pearson_self']:.4f}",
                met(worst >= SPEARMAN_TARGET),
            ])  # fmt: skip
        add_method(
            best,
            "ours Arnoldi",
            ratio_cell(ratio, "total", digits=3) + " (total)" if ratio else "",
            f"{m['spearman_all']:.4f}" if m is not None else "",
        )
        add_method(best, "Captum Arnoldi", "", "")
    spreads = [
        (max(w for w, _ in b["rounds"]) / min(w for w, _ in b["rounds"]), name)
        for r in (r1, r2)
        if r
        for name, b in r["best"].items()
        if len(b["rounds"]) > 1
    ]
    spread = "in this run no variant ran twice"
    if spreads:
        x, who = max(spreads)
        spread = (
            f"in this run the wall total of one variant ({who}) varied by up to {x:.1f}x "
            "between rounds"
        )
    text = "### Summary\n\n" + (
        md_table(["target", "measured", "status"], rows) if rows else "(no target measured)"
    )
    if table:
        text += "\n\n" + md_table(
            ["method", "fit / setup (s)", f"{cfg.n_query:,} x {cfg.n:,} pairwise (s)",
             f"{cfg.n:,} self (s)", "ours / reference", "Spearman vs reference (all pairs)",
             "peak extra memory (MB)"],
            table,
        )  # fmt: skip
        text += (
            "\n\nTimes: `wall / CPU` seconds, best of the interleaved rounds (sections 1 and 2); "
            "CPU = this process's CPU time (`time.process_time`), which excludes the time the "
            "process waits for a core but not the slowdown from sharing caches and memory "
            f"bandwidth with other jobs: {spread}; see each section's per-round totals. So "
            "read the ratios as approximate. Ratio = ours / the reference library. Memory: "
            "section 3 (one fresh process per method, fit + pairwise + self).\n"
        )
    return text + "\n"


# --------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"markdown output file (default {DEFAULT_OUT.relative_to(REPO_ROOT)}; with --quick: "
        "none unless given)",
    )
    p.add_argument("--n", type=int, default=None, help="number of training samples")
    p.add_argument("--n-query", type=int, default=None, help="number of queries")
    p.add_argument("--n-hessian", type=int, default=None, help="Arnoldi Hessian set size")
    p.add_argument("--batch", type=int, default=None, help="batch size of every influence pass")
    p.add_argument("--damping", type=float, default=None, help="damping (default 1e-3)")
    p.add_argument("--arnoldi-dim", type=int, default=None, help="Krylov dimension (default 200)")
    p.add_argument("--top-k", type=int, default=None, help="Arnoldi eigenpairs kept (default 50)")
    p.add_argument("--slow", type=float, default=None, help="run a variant once above this (s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 2)")
    p.add_argument("--skip-kfac", action="store_true", help="no K-FAC rows")
    p.add_argument(
        "--true-fisher", action="store_true", help="add a true-Fisher EK-FAC round (about 1 min)"
    )
    p.add_argument("--skip-memory", action="store_true", help="skip the subprocess section")
    p.add_argument("--sections", default="1,2,3,4,5", help="comma-separated sections to run")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    quiet_libraries()
    if args.memory_child is not None:
        torch.set_num_threads(args.threads or 2)
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    t_start = time.perf_counter()
    argv_used = list(sys.argv[1:] if argv is None else argv)
    cfg = Config.quick_config() if args.quick else Config()
    for field, value in (
        ("repeats", args.repeats), ("n", args.n), ("n_query", args.n_query),
        ("n_hessian", args.n_hessian), ("batch", args.batch), ("damping", args.damping),
        ("arnoldi_dim", args.arnoldi_dim), ("top_k", args.top_k), ("slow_s", args.slow),
        ("threads", args.threads),
    ):  # fmt: skip
        if value is not None:
            setattr(cfg, field, value)
    cfg.repeats = max(1, cfg.repeats)
    cfg.n_hessian = min(cfg.n_hessian, cfg.n)
    cfg.kfac = not args.skip_kfac
    cfg.true_fisher = args.true_fisher
    torch.set_num_threads(cfg.threads)
    sections = {s.strip() for s in args.sections.split(",")}

    info = machine_info()
    load_start = os.getloadavg()[0]
    log(f"config: {cfg}")
    data = make_data(cfg)
    t_train, (model, stats) = timed(lambda: train_model(cfg, data))
    log(f"trained in {t_train:.1f} s: {stats}")
    for p in model.parameters():
        p.requires_grad_(True)

    texts, selfs = [], {}
    r1: Dict[str, Any] = {}
    r2: Dict[str, Any] = {}
    r3: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        model_path = os.path.join(folder, "model.pt")
        torch.save(model.state_dict(), model_path)
        if "1" in sections:
            s1, r1 = section_kfac(cfg, model, data, folder)
            print(s1, flush=True)
            texts.append(s1)
            selfs.update({k: v for k, v in r1["self"].items() if "K-FAC" not in k or "EK-FAC" in k})
        if "2" in sections:
            s2, r2 = section_arnoldi(cfg, model, data, folder)
            print(s2, flush=True)
            texts.append(s2)
            selfs.update(r2["self"])
        if "3" in sections:
            if args.skip_memory:
                s3 = "### 3. Peak extra memory\n\nSkipped (--skip-memory).\n"
            else:
                s3, r3 = section_memory(cfg, model_path)
            print(s3, flush=True)
            texts.append(s3)
        if "4" in sections and selfs:
            s4 = section_quality(cfg, model, data, selfs)
            print(s4, flush=True)
            texts.append(s4)
        if "5" in sections:
            s5, _ = section_kfac_self(cfg, model, data, model_path)
            print(s5, flush=True)
            texts.append(s5)

    info["load average at end (1/5/15 min)"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    wall = time.perf_counter() - t_start
    info["wall time of this script"] = f"{wall:.0f} s"
    p_count = sum(p.numel() for p in model.parameters())
    header = (
        "## Influence functions: EK-FAC / K-FAC vs Kronfluence, Arnoldi vs Captum\n\n"
        f"Generated by `python benchmarks/bench_influence.py{''.join(' ' + a for a in argv_used)}`"
        f"{' (QUICK SMOKE RUN: small sizes, not representative)' if cfg.quick else ''}; "
        f"reproduce with `.venv/bin/python benchmarks/bench_influence.py"
        f"{''.join(' ' + a for a in argv_used if a != '--quick')}` (this run took "
        f"{wall / 60:.1f} min; `--quick` for a smoke run). "
        f"Model: MLP {cfg.d}-{cfg.hidden}-{cfg.hidden}-{cfg.classes} (ReLU, {p_count:,} "
        f"parameters, float32), plain torch SGD lr {cfg.lr} momentum 0.9, batch {cfg.train_batch}, "
        f"{cfg.epochs} epochs (train accuracy {stats['train_acc']:.3f} on the noisy labels, query "
        f"accuracy {stats['query_acc']:.3f}). Data: n={cfg.n:,} samples of {cfg.classes} Gaussian "
        f"class clusters in d={cfg.d}, {cfg.label_noise:.0%} flipped labels, {cfg.n_query:,} "
        f"queries, Arnoldi Hessian set {cfg.n_hessian:,} (seeded). Influence batch size "
        f"{cfg.batch}, damping {cfg.damping:g}, torch threads {cfg.threads}. The script's "
        "docstring says what each number measures.\n\n"
        + md_table(["machine", ""], [[k, v] for k, v in info.items()])
        + "\n"
    )
    if cfg.threads == 1:
        header += (
            "\nThis run used `--threads 1` (the default is 2): the CPUs were shared with other "
            "jobs, and when the cores are oversubscribed torch's two intra-op threads can make "
            "tiny ops many times slower (see the probe above; it varies from moment to moment). "
            "Both libraries run with the same thread count, so the ratios compare like with like.\n"
        )
    cpus = os.cpu_count() or 1
    if load_start > 0.5 * cpus or os.getloadavg()[0] > 0.5 * cpus:
        header += (
            "\n**Warning: the machine was busy during this run (load average above half the "
            "CPU count at the start or the end; it is shared with other jobs): timings are noisy; "
            "ratios measured in interleaved rounds are more reliable than absolute seconds.**\n"
        )
    doc = "\n".join([header, summary_text(cfg, r1, r2, r3)] + texts)
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
