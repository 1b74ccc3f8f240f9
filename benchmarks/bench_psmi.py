"""Side-by-side benchmark: ``lightning_memo.PSMI`` against the reference package ``psmi`` 0.2.0.

Everything runs in one process on the same synthetic data (except the memory section, which needs a
fresh process per measurement) and is printed as markdown tables; ``--out`` writes the same text to
a file (default ``docs/benchmarks_psmi.md``).

Data: ``n`` samples in ``d`` dimensions, ``C`` Gaussian class clusters (centres ~ N(0, I_d)), each
sample ``x_i = a_i * centre_{y_i} + N(0, I_d)`` with a per-sample signal strength
``a_i ~ U(0.7, 1.3)`` (so the true PSMI varies across samples and a ranking is meaningful), and
5 % of the labels flipped to another class (the memorisation setting: those samples get negative
PSMI; it also makes the reference's ``"auto"`` stopping rule terminate). Seeded numpy, generated
in row chunks so that no temporary larger than the final tensor is ever allocated.

Sections:

1. Equal directions (default n=10,000, d=768, C=10, m=2,000). One warm-up, then best of
   ``--repeats`` (variants interleaved within each repeat): the reference on float64 numpy input;
   ours on float32 and float64 torch input with ``return_full=False``; ours float64 with
   ``return_full=True``; ours float32 with ``torch.set_num_threads(1)`` (how much the intra-op
   threads give, and what to expect on a busy machine). Ratio = reference seconds / ours.
   "Arithmetic limit" = the projection matmul ``x @ theta.T`` alone plus one ``exp`` pass over the
   ``C * n * m`` density terms (a lower bound: the log-sum-exp needs several elementwise passes).
   A correctness line compares ours with the reference on the reference's own directions.
2. Convergence. Ground truth = ours in float64 with ``--ref-directions`` (50,000) Gaussian
   directions and a seed no other run uses (so no run shares directions with it). We use ours
   rather than the reference package for it because the reference keeps four ``(n, m)`` float64
   arrays (4 GB each at n=10,000 and 50,000 directions) and is several times slower; section 1's
   correctness line shows that the two estimators agree on equal directions. Rows: ours (float32
   input, the torch default) with Gaussian and with orthogonal directions at increasing ``m``
   (stopping at the first ``m`` that reaches the target), ours ``"auto"``, and the reference's
   ``n_estimators="auto"`` (float64 numpy; guarded by a timeout since it has no upper bound):
   time of that single run and the Spearman rank correlation of its PSMI with the ground truth.
   The ground truth has Monte-Carlo error of its own (std over directions / sqrt(50,000)), so a
   Spearman of 1 is not reachable; the text gives the ceiling this implies.
3. Peak extra memory, in a fresh interpreter per case (this script re-executed with a hidden flag;
   the cases run concurrently, each measures only itself): build the data (torch imported), warm
   up on a tiny input, reset the peak RSS to the current RSS (``/proc/self/clear_refs``; if that
   is not permitted the "slack" column says by how much the peak before the call exceeded the
   baseline), call ``fit_transform`` and report peak RSS after the call minus the RSS before it.
   Peak RSS is read as ``VmHWM`` (/proc/self/status), the high-water mark that ``ru_maxrss``
   reports, because ``ru_maxrss`` of a child is also floored at the RSS of the process that
   forked it (here this benchmark, which holds the data and the ground truth). The result of the
   call is kept alive, so ``return_full=True`` counts its ``(n, m)`` output.
4. Variance-reduced directions: at equal ``m`` (500, 1,000, 2,000), the mean absolute error against
   the ground truth for Gaussian vs orthogonal directions (ours, float32 input), with the error
   expected for i.i.d. directions, ``sqrt(2/pi) * mean_i(std_i) * sqrt(1/m + 1/M)``.

Threads: torch's default (``torch.get_num_threads()``) unless ``--threads`` is given. The machine's
load average is printed at start and end: on a shared machine timings are noisy (torch's intra-op
threads degrade badly when the cores are oversubscribed).

Usage::

    python benchmarks/bench_psmi.py            # full run (~2-4 min on 2 cores)
    python benchmarks/bench_psmi.py --quick    # smoke run on small sizes (< 30 s), writes
                                               # nothing unless --out is given
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from _common import (  # noqa: E402  (after the sys.path set-up)
    _reset_peak,
    _rss_kb,
    fmt_mb,
    fmt_s,
    md_table,
)

from lightning_memo import PSMI

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks_psmi.md"
REF_SEED = 987_654_321  # seed of the ground-truth directions; no timed run uses it
RUN_SEED = 1  # seed of the timed runs of ours
NP_SEED = 0  # numpy global seed set before each call of the reference package
SPEARMAN_TARGET = 0.99


# --------------------------------------------------------------------------- configuration
@dataclass
class Config:
    """Problem sizes and knobs of one benchmark run."""

    n: int = 10_000
    d: int = 768
    classes: int = 10
    m: int = 2_000
    repeats: int = 3
    data_seed: int = 0
    label_noise: float = 0.05
    ref_directions: int = 50_000
    conv_ms: List[int] = field(
        default_factory=lambda: [250, 500, 1_000, 2_000, 4_000, 8_000, 16_000]
    )
    vr_ms: List[int] = field(default_factory=lambda: [500, 1_000, 2_000])
    ref_auto_timeout_s: int = 240
    quick: bool = False

    @classmethod
    def quick_config(cls) -> Config:
        return cls(
            n=2_000,
            d=128,
            m=500,
            repeats=2,
            ref_directions=10_000,
            conv_ms=[125, 250, 500, 1_000, 2_000],
            vr_ms=[250, 500],
            ref_auto_timeout_s=20,
            quick=True,
        )


# --------------------------------------------------------------------------- data
def make_data(cfg: Config, dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Synthetic Gaussian class clusters with per-sample signal strength and flipped labels.

    Rows are generated in chunks straight into the result, so the peak memory of this function is
    the result plus one chunk (this matters for the memory section's baseline).

    Returns:
        x: (n, d) of ``dtype``; y: (n,) int64 labels in ``[0, classes)``.
    """
    rng = np.random.default_rng(cfg.data_seed)
    n, d, c = cfg.n, cfg.d, cfg.classes
    y_true = rng.integers(0, c, n)
    centres = rng.normal(size=(c, d))
    strength = rng.uniform(0.7, 1.3, n)
    flip = rng.random(n) < cfg.label_noise
    y = y_true.copy()
    y[flip] = (y_true[flip] + rng.integers(1, c, int(flip.sum()))) % c
    x = torch.empty(n, d, dtype=dtype)
    chunk = 1024
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        rows = strength[s:e, None] * centres[y_true[s:e]] + rng.normal(size=(e - s, d))
        x[s:e] = torch.from_numpy(rows)
    return x, torch.from_numpy(y)


# --------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    """Progress to stderr (stdout carries the tables)."""
    print(f"[bench_psmi {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> Tuple[float, Any]:
    """Run ``fn`` once; return (seconds, result)."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def best_of(fns: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, float]:
    """One warm-up of each, then ``repeats`` rounds (variants interleaved); best time each."""
    best = {k: math.inf for k in fns}
    for k, fn in fns.items():
        log(f"warm-up {k}")
        fn()
    for r in range(repeats):
        for k, fn in fns.items():
            gc.collect()
            dt, _ = timed(fn)
            best[k] = min(best[k], dt)
            log(f"repeat {r + 1}/{repeats} {k}: {dt:.3f} s")
    return best


def spearman(a: np.ndarray, b: np.ndarray) -> Tuple[float, int]:
    """Spearman rank correlation over rows finite in both; also the number of dropped rows."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    ra = np.argsort(np.argsort(a[ok])).astype(np.float64)
    rb = np.argsort(np.argsort(b[ok])).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1]), int((~ok).sum())


def ours(
    m: Any, x: torch.Tensor, y: torch.Tensor, *, seed: int = RUN_SEED, **kw: Any
) -> Tuple[Any, Any, Any]:
    """``lightning_memo.PSMI(m, seed=seed, **kw).fit_transform(x, y)``."""
    return PSMI(m, seed=seed, **kw).fit_transform(x, y)


def reference(m: Any, x: np.ndarray, y: np.ndarray) -> Tuple[Any, Any, Any]:
    """The reference package, numpy's global RNG seeded for reproducibility."""
    import psmi

    np.random.seed(NP_SEED)
    return psmi.PSMI(n_estimators=m).fit_transform(x, y)


def single_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with ``torch.set_num_threads(1)``, restoring the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


class _Timeout(Exception):
    pass


def with_timeout(fn: Callable[[], Any], seconds: int) -> Tuple[float, Any]:
    """Run ``fn`` (main thread, Linux) and raise ``_Timeout`` after ``seconds``."""

    def handler(signum: int, frame: Any) -> None:
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(max(1, int(seconds)))
    try:
        return timed(fn)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- machine info
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

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": f"{cpu or 'unknown'} ({os.cpu_count()} logical CPUs, {platform.machine()})",
        "torch": f"{torch.__version__}, torch threads: {torch.get_num_threads()}",
        "numpy": np.__version__,
        "psmi (reference)": version("psmi"),
        "python": platform.python_version(),
        "load average at start (1/5/15 min)": " / ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


# --------------------------------------------------------------------------- section 1
def limit_kernels(x: torch.Tensor, m: int, classes: int) -> Dict[str, Callable[[], Any]]:
    """Callables for the arithmetic limit: the projection matmul alone, one exp pass over C*n*m.

    The exp pass runs on a cache-sized chunk of 2**18 elements (as the package's chunks),
    repeated to cover ``C * n * m`` elements.
    """
    n, d = x.shape
    tag = str(x.dtype).replace("torch.", "")
    theta = torch.randn(m, d, dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    theta /= theta.norm(dim=1, keepdim=True)
    chunk = torch.randn(1 << 18, dtype=x.dtype)
    out = torch.empty_like(chunk)
    reps = max(1, int(round(classes * n * m / chunk.numel())))

    def exp_pass() -> None:
        for _ in range(reps):
            torch.exp(chunk, out=out)

    return {f"matmul {tag}": lambda: x @ theta.T, f"exp pass {tag}": exp_pass}


def section_equal_directions(
    cfg: Config, x64: torch.Tensor, y: torch.Tensor
) -> Tuple[str, Dict[str, Any]]:
    x32 = x64.float()
    xnp, ynp = x64.numpy(), y.numpy()
    fns = {
        "reference": lambda: reference(cfg.m, xnp, ynp),
        "ours f32": lambda: ours(cfg.m, x32, y, return_full=False),
        "ours f64": lambda: ours(cfg.m, x64, y, return_full=False),
        "ours f64 full": lambda: ours(cfg.m, x64, y, return_full=True),
        "ours f32 1 thread": lambda: single_thread(lambda: ours(cfg.m, x32, y, return_full=False)),
    }
    # the limit's kernels run in the same interleaved rounds, so they see the same machine load
    fns.update(limit_kernels(x32, cfg.m, cfg.classes))
    fns.update(limit_kernels(x64, cfg.m, cfg.classes))
    best = best_of(fns, cfg.repeats)
    lim32, lim64 = (
        {
            "matmul": best[f"matmul {t}"],
            "exp": best[f"exp pass {t}"],
            "limit": best[f"matmul {t}"] + best[f"exp pass {t}"],
        }
        for t in ("float32", "float64")
    )

    # correctness: ours on the reference's own directions
    import psmi

    np.random.seed(NP_SEED)
    ref_est = psmi.PSMI(n_estimators=cfg.m)
    r_mean, r_std, _ = ref_est.fit_transform(xnp, ynp)
    o_mean, o_std, _ = PSMI(cfg.m, return_full=False).fit_transform_with_directions(
        x64, y, torch.from_numpy(ref_est.thetas)
    )
    diff_mean = float(np.nanmax(np.abs(o_mean.numpy() - r_mean)))
    diff_std = float(np.nanmax(np.abs(o_std.numpy() - r_std)))

    ref_s = best["reference"]
    rows = [["psmi 0.2.0 (reference)", "float64 (numpy)", "yes", fmt_s(ref_s), "1.0x", "-"]]
    ours_rows = [  # key, dtype, full, limit (None: not comparable)
        ("ours f32", "float32", False, lim32),
        ("ours f64", "float64", False, lim64),
        ("ours f64 full", "float64", True, lim64),
        ("ours f32 1 thread", "float32, 1 thread", False, None),
    ]
    for key, dtype, full, lim in ours_rows:
        rows.append(
            [
                "lightning_memo.PSMI",
                dtype,
                "yes" if full else "no",
                fmt_s(best[key]),
                f"{ref_s / best[key]:.1f}x",
                "-" if lim is None else f"{best[key] / lim['limit']:.1f}x",
            ]
        )
    t1 = md_table(
        ["estimator", "input dtype", "full (n, m)", "seconds", "ref / ours", "ours / limit"], rows
    )
    flops = 2.0 * cfg.n * cfg.d * cfg.m
    lim_rows = []
    for name, lim in (("float32", lim32), ("float64", lim64)):
        lim_rows.append(
            [
                name,
                fmt_s(lim["matmul"]),
                f"{flops / lim['matmul'] / 1e9:.0f}",
                fmt_s(lim["exp"]),
                fmt_s(lim["limit"]),
            ]
        )
    t2 = md_table(
        ["dtype", "matmul x @ theta.T (s)", "GFLOP/s", "one exp pass, C*n*m (s)", "limit (s)"],
        lim_rows,
    )
    text = (
        f"### 1. Equal directions (n={cfg.n:,}, d={cfg.d}, C={cfg.classes}, m={cfg.m:,}; "
        f"best of {cfg.repeats} after one warm-up)\n\n{t1}\n\n"
        f"Arithmetic limit (same sizes; the exp pass is a lower bound for the density part, which "
        f"needs several elementwise passes over C*n*m = {cfg.classes * cfg.n * cfg.m:,} terms):"
        f"\n\n{t2}\n\n"
        f"Agreement with the reference on the reference's own directions (float64): "
        f"max |mean diff| = {diff_mean:.2e}, max |std diff| = {diff_std:.2e}.\n"
    )
    return text, {"best": best, "limit32": lim32, "limit64": lim64, "diff_mean": diff_mean}


# --------------------------------------------------------------------------- sections 2 and 4
def ground_truth(
    cfg: Config, x64: torch.Tensor, y: torch.Tensor
) -> Tuple[np.ndarray, np.ndarray, float]:
    """Ours, float64, ``cfg.ref_directions`` Gaussian directions, seed REF_SEED: (mean, std, s)."""
    log(f"ground truth: {cfg.ref_directions:,} directions, float64")
    dt, (mean, std, _) = timed(
        lambda: ours(cfg.ref_directions, x64, y, seed=REF_SEED, return_full=False)
    )
    log(f"ground truth took {dt:.1f} s")
    return mean.numpy(), std.numpy(), dt


def section_convergence(
    cfg: Config,
    x64: torch.Tensor,
    y: torch.Tensor,
    truth: np.ndarray,
    truth_std: np.ndarray,
    truth_s: float,
    ref_s_per_direction: Optional[float] = None,
) -> Tuple[str, Dict[str, Any]]:
    x32 = x64.float()
    rows: List[List[str]] = []
    reached: Dict[str, Optional[Tuple[int, float, float]]] = {}
    for kind in ("gaussian", "orthogonal"):
        reached[kind] = None
        for m in cfg.conv_ms:
            dt, (mean, _, _) = timed(
                lambda m=m, kind=kind: ours(m, x32, y, directions=kind, return_full=False)
            )
            rho, bad = spearman(mean.numpy(), truth)
            log(f"ours {kind} m={m}: {dt:.3f} s, spearman {rho:.4f}")
            rows.append([f"ours, {kind}", f"{m:,}", fmt_s(dt), f"{rho:.4f}"])
            if rho >= SPEARMAN_TARGET:
                reached[kind] = (m, dt, rho)
                break

    # ours "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = PSMI("auto", seed=RUN_SEED, return_full=False)
        dt, (mean, _, _) = timed(lambda: est.fit_transform(x32, y))
    rho, _ = spearman(mean.numpy(), truth)
    rows.append(["ours, n_estimators='auto'", f"{est.n_estimators:,}", fmt_s(dt), f"{rho:.4f}"])
    auto_ours = (est.n_estimators, dt, rho)

    # the reference's "auto" (no upper bound on its own: guarded by a timeout)
    xnp, ynp = x64.numpy(), y.numpy()
    import psmi

    ref_auto: Dict[str, Any] = {}
    try:
        np.random.seed(NP_SEED)
        ref_est = psmi.PSMI(n_estimators="auto")
        with np.errstate(all="ignore"):
            dt, (mean, _, _) = with_timeout(
                lambda: ref_est.fit_transform(xnp, ynp), cfg.ref_auto_timeout_s
            )
        rho, bad = spearman(mean, truth)
        ref_auto = {"n_estimators": ref_est.n_estimators, "s": dt, "rho": rho, "nonfinite": bad}
        extra = f" ({bad} non-finite rows dropped)" if bad else ""
        rows.append(
            [
                "psmi 0.2.0, n_estimators='auto'",
                f"{ref_est.n_estimators:,}",
                fmt_s(dt),
                f"{rho:.4f}{extra}",
            ]
        )
    except _Timeout:
        ref_auto = {"timeout": cfg.ref_auto_timeout_s}
        rows.append(
            ["psmi 0.2.0, n_estimators='auto'", "did not stop", f"> {cfg.ref_auto_timeout_s}", "-"]
        )
    log(f"reference auto: {ref_auto}")

    # ceiling: Spearman of the truth with itself plus its own Monte-Carlo noise
    rng = np.random.default_rng(5)
    noisy = truth + rng.normal(size=truth.shape) * truth_std / math.sqrt(cfg.ref_directions)
    ceiling, _ = spearman(noisy, truth)

    def reach(kind: str) -> str:
        r = reached[kind]
        if r is None:
            return f"not reached up to m={cfg.conv_ms[-1]:,}"
        return f"m={r[0]:,} in {fmt_s(r[1])} s"

    lines = [
        f"- ours, gaussian: {reach('gaussian')}",
        f"- ours, orthogonal: {reach('orthogonal')}",
    ]
    n_auto, s_auto, rho_auto = auto_ours
    if "s" in ref_auto:
        verdict = "reaches" if ref_auto["rho"] >= SPEARMAN_TARGET else "does not reach"
        lines.append(
            f"- psmi 0.2.0 'auto': stopped at {ref_auto['n_estimators']:,} directions after "
            f"{fmt_s(ref_auto['s'])} s, Spearman {ref_auto['rho']:.4f} ({verdict} the target); "
            f"ours 'auto' (same rule): {n_auto:,} directions, {fmt_s(s_auto)} s, Spearman "
            f"{rho_auto:.4f} ({ref_auto['s'] / s_auto:.1f}x less time)"
        )
    else:
        lines.append(
            f"- psmi 0.2.0 'auto': no result within {cfg.ref_auto_timeout_s} s (no upper bound)"
        )
    g = reached["gaussian"]
    if g is not None and ref_s_per_direction is not None:
        est = g[0] * ref_s_per_direction
        o = reached["orthogonal"]
        vs_orth = f", {est / o[1]:.1f}x ours orthogonal" if o is not None else ""
        lines.append(
            f"- psmi 0.2.0 with a fixed n_estimators is the same estimator as ours 'gaussian', so "
            f"it needs about the same m={g[0]:,}; at its section-1 rate that is about "
            f"{fmt_s(est)} s (an estimate: {est / g[1]:.1f}x ours gaussian{vs_orth})"
        )
    text = (
        f"### 2. Convergence: time to Spearman >= {SPEARMAN_TARGET} "
        f"(n={cfg.n:,}, d={cfg.d}, C={cfg.classes})\n\n"
        f"Ground truth: ours in float64 with {cfg.ref_directions:,} Gaussian directions "
        f"(independent seed; {fmt_s(truth_s)} s). Ours runs on float32 input; each row is one "
        f"run from scratch; the sweep stops at the first m that reaches the target. The ground "
        f"truth's own Monte-Carlo error caps the attainable Spearman at about {ceiling:.4f}.\n\n"
        + md_table(["estimator", "directions", "seconds", "Spearman vs truth"], rows)
        + "\n\n"
        + "\n".join(lines)
        + "\n"
    )
    return text, {
        "reached": reached,
        "auto_ours": auto_ours,
        "ref_auto": ref_auto,
        "ceiling": ceiling,
    }


def section_variance(
    cfg: Config, x64: torch.Tensor, y: torch.Tensor, truth: np.ndarray, truth_std: np.ndarray
) -> Tuple[str, Dict[str, Any]]:
    x32 = x64.float()
    rows, res = [], {}
    for m in cfg.vr_ms:
        err = {}
        for kind in ("gaussian", "orthogonal"):
            mean, _, _ = ours(m, x32, y, directions=kind, return_full=False)
            err[kind] = float(np.abs(mean.numpy().astype(np.float64) - truth).mean())
        expected = (
            math.sqrt(2 / math.pi)
            * float(truth_std.mean())
            * math.sqrt(1 / m + 1 / cfg.ref_directions)
        )
        res[m] = err
        rows.append(
            [
                f"{m:,}",
                f"{err['gaussian']:.5f}",
                f"{err['orthogonal']:.5f}",
                f"{err['gaussian'] / err['orthogonal']:.2f}x",
                f"{expected:.5f}",
            ]
        )
        log(f"variance m={m}: {err}")
    text = (
        f"### 4. Variance-reduced directions: mean |PSMI - truth| at equal m "
        f"(n={cfg.n:,}, d={cfg.d})\n\n"
        + md_table(
            ["m", "gaussian", "orthogonal", "gaussian / orthogonal", "expected, i.i.d."], rows
        )
        + "\n\n'expected, i.i.d.' = sqrt(2/pi) * mean_i(std_i) * sqrt(1/m + 1/M) with std_i the "
        f"per-sample std over directions and M = {cfg.ref_directions:,} (the truth's own error is "
        "included in every column).\n"
    )
    return text, res


# --------------------------------------------------------------------------- section 3


def _peak_kb() -> int:
    """Peak RSS (KB) of this process image: ``VmHWM``, else ``ru_maxrss``.

    ``ru_maxrss`` is ``max(mm high-water mark, signal->maxrss)`` and the latter is inherited at
    ``exec`` from the forked image, i.e. the (large) parent's RSS; ``VmHWM`` is the high-water mark
    alone (the same counter ``ru_maxrss`` reports in a process started from a small parent).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Runs in a fresh process: baseline RSS, then peak RSS of one ``fit_transform``."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    cfg = Config(**spec["cfg"])
    dtype = torch.float32 if spec["dtype"] == "float32" else torch.float64
    x, y = make_data(cfg, dtype)
    small = 200
    if spec["impl"] == "reference":
        xn, yn = x.numpy(), y.numpy()
        reference(20, xn[:small], yn[:small])  # warm-up

        def call() -> Any:
            return reference(cfg.m, xn, yn)
    else:
        ours(20, x[:small], y[:small], return_full=spec["full"])  # warm-up

        def call() -> Any:
            return ours(cfg.m, x, y, return_full=spec["full"])

    gc.collect()
    base = _rss_kb()
    reset = _reset_peak()
    peak_before = _peak_kb()
    result = call()  # kept alive until the peak is read
    peak = _peak_kb()
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del result
    return {
        "base_kb": base,
        "peak_kb": peak,
        "extra_kb": peak - base,
        "slack_kb": max(0, peak_before - base),
        "reset": reset,
        "ru_maxrss_kb": ru_maxrss,
    }


def run_memory_case(
    cfg: Config, impl: str, dtype: str, full: bool, threads: Optional[int] = None
) -> Dict[str, Any]:
    """One memory measurement in a fresh interpreter (this script with a hidden flag)."""
    spec = {"cfg": asdict(cfg), "impl": impl, "dtype": dtype, "full": full, "threads": threads}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--_memory-child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(REPO_ROOT),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({impl}, {dtype}, full={full}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def section_memory(cfg: Config, threads: Optional[int] = None) -> Tuple[str, Dict[str, Any]]:
    """Peak extra RSS per case. The children run concurrently: each measures its own process."""
    cases = [
        ("ours", "float32", False),
        ("ours", "float64", False),
        ("ours", "float32", True),
        ("ours", "float64", True),
        ("reference", "float64", True),
    ]
    if cfg.quick:  # every code path once, fewer interpreter start-ups
        cases = [cases[0], cases[3], cases[4]]
    log(f"memory: {len(cases)} fresh processes")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = [pool.submit(run_memory_case, cfg, *case, threads) for case in cases]
        results = [f.result() for f in futures]
    rows, res = [], {}
    for (impl, dtype, full), r in zip(cases, results):
        log(f"memory: {impl} {dtype} full={full}: {r}")
        res[(impl, dtype, full)] = r
        name = "psmi 0.2.0 (reference)" if impl == "reference" else "lightning_memo.PSMI"
        rows.append(
            [
                name,
                dtype,
                "yes" if full else "no",
                fmt_mb(r["base_kb"]),
                fmt_mb(r["extra_kb"]),
                "reset" if r["reset"] else fmt_mb(r["slack_kb"]),
            ]
        )
    data_mb = cfg.n * cfg.d * 8 / 2**20
    full_mb = cfg.n * cfg.m * 8 / 2**20
    text = (
        f"### 3. Peak extra memory of one fit_transform (n={cfg.n:,}, d={cfg.d}, m={cfg.m:,}; "
        "fresh process per row)\n\n"
        + md_table(
            [
                "estimator",
                "dtype",
                "full (n, m)",
                "baseline RSS (MB)",
                "peak extra (MB)",
                "peak reset / slack (MB)",
            ],
            rows,
        )
        + f"\n\nFor scale: the float64 features are {data_mb:.0f} MB, one float64 (n, m) array "
        f"{full_mb:.0f} MB. 'reset': the peak was reset to the baseline just before the call "
        "(/proc/self/clear_refs), so the number is exact; otherwise 'slack' is how much the peak "
        "before the call exceeded the baseline (the extra may be underestimated by up to that). "
        "Peak = VmHWM, the counter behind ru_maxrss: ru_maxrss itself is floored at the RSS of "
        "the parent that forked the child, here this benchmark's own process.\n"
    )
    return text, res


# --------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, a smoke run in < 30 s")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (best of; default 3)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"markdown output file (default {DEFAULT_OUT.relative_to(REPO_ROOT)}; with --quick: "
        "none unless given)",
    )
    p.add_argument("--n", type=int, default=None, help="number of samples")
    p.add_argument("--ref-directions", type=int, default=None, help="directions of the truth")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's own; numpy's BLAS is not affected)",
    )
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
    t_start = time.perf_counter()
    argv_used = list(sys.argv[1:] if argv is None else argv)
    cfg = Config.quick_config() if args.quick else Config()
    if args.repeats is not None:
        cfg.repeats = max(1, args.repeats)
    if args.n is not None:
        cfg.n = args.n
    if args.ref_directions is not None:
        cfg.ref_directions = args.ref_directions

    info = machine_info()
    load_start = os.getloadavg()[0]
    log(f"config: {cfg}")
    x64, y = make_data(cfg, torch.float64)

    s1, r1 = section_equal_directions(cfg, x64, y)
    print(s1, flush=True)
    truth, truth_std, truth_s = ground_truth(cfg, x64, y)
    s2, _ = section_convergence(
        cfg, x64, y, truth, truth_std, truth_s, r1["best"]["reference"] / cfg.m
    )
    print(s2, flush=True)
    if args.skip_memory:
        s3 = "### 3. Peak extra memory\n\nSkipped (--skip-memory).\n"
    else:
        s3, _ = section_memory(cfg, args.threads)
    print(s3, flush=True)
    s4, _ = section_variance(cfg, x64, y, truth, truth_std)
    print(s4, flush=True)

    info["load average at end (1/5/15 min)"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    wall = time.perf_counter() - t_start
    info["wall time of this script"] = f"{wall:.0f} s"
    header = (
        "## PSMI: lightning_memo.PSMI vs psmi 0.2.0\n\n"
        f"Generated by `python benchmarks/bench_psmi.py{''.join(' ' + a for a in argv_used)}`"
        f"{' (QUICK SMOKE RUN: small sizes, not representative)' if cfg.quick else ''}. "
        f"Data: {cfg.classes} Gaussian class clusters in d={cfg.d}, n={cfg.n:,}, per-sample "
        f"signal strength U(0.7, 1.3), {cfg.label_noise:.0%} flipped labels (seeded numpy); see "
        "the script's docstring for what each number measures.\n\n"
        + md_table(["machine", ""], [[k, v] for k, v in info.items()])
        + "\n"
    )
    # busy: others' load before we start, or at the end beyond what this run itself adds
    cpus = os.cpu_count() or 1
    busy = load_start > 0.5 * cpus or os.getloadavg()[0] > cpus + 0.5
    if busy:
        header += (
            "\n**Warning: the machine was busy during this run (load average above half the "
            "CPU count): timings are unreliable; rerun on a quiet machine.**\n"
        )
    doc = "\n".join([header, s1, s2, s3, s4])
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
