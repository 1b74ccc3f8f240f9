"""Helpers shared by the benchmark scripts: machine table, markdown tables, timing, AUROC, and
peak-memory probes (Linux ``/proc``). Imported as ``_common`` (the scripts' own folder is on
``sys.path`` when they run as ``python benchmarks/bench_<area>.py``)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import resource
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


def machine_info(
    packages: Sequence[str] = (), torch_threads: Optional[str] = None
) -> Dict[str, str]:
    """The machine table every benchmark page starts with; ``packages``: extra versions to list."""
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
        "cpu": f"{cpu or 'unknown'} ({os.cpu_count()} logical CPUs, {platform.machine()})",
        "memory": mem or "unknown",
        "torch": f"{torch.__version__}, torch threads: {torch_threads or torch.get_num_threads()}",
        "lightning": version("lightning"),
        **{pkg: version(pkg) for pkg in packages},
        "numpy": np.__version__,
        "python": platform.python_version(),
        "load average at start (1/5/15 min)": " / ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def timed(fn: Callable[[], Any]) -> Tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def auroc(scores: Any, positive: Any) -> float:
    """Area under the ROC curve of ``scores`` for the ``positive`` (bool) samples
    (Mann-Whitney U; float scores, ties negligible)."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    ranks = np.argsort(np.argsort(s)).astype(np.float64) + 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown pipe table (first column left-aligned, the others right-aligned)."""
    n = len(headers)  # short rows are padded with empty cells
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] + [""] * (n - len(r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        parts = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, len(r))]
        return "| " + " | ".join(parts) + " |"

    sep = (
        "|"
        + "|".join([":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]])
        + "|"
    )
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def md_table_compact(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown pipe table without padding (first column left-aligned, the others right)."""
    out = ["| " + " | ".join(str(h) for h in headers) + " |"]
    out.append("|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|")
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def git_state(path: str = "lightning_memo") -> Optional[Tuple[str, List[str]]]:
    """``(short HEAD commit, files under path with uncommitted changes)`` of this repository
    (others may edit the tree while a benchmark runs: the numbers belong to the code as it
    was); ``None`` without git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", path], cwd=root, capture_output=True,
            text=True, timeout=10,
        ).stdout.split("\n")  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head, [line[3:] for line in dirty if line.strip()]


def code_state(path: str = "lightning_memo") -> str:
    """``"<commit>"`` or ``"<commit> + uncommitted changes in a, b"`` (``"unknown"`` without
    git)."""
    state = git_state(path)
    if state is None:
        return "unknown"
    head, files = state
    return head + (f" + uncommitted changes in {', '.join(files)}" if files else "")


def fmt_s(s: float) -> str:
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def fmt_mb(kb: float) -> str:
    return f"{kb / 1024:.0f}"


def _rss_kb() -> int:
    """Current resident set size (KB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _peak_kb() -> int:
    """Peak RSS (KB): ``VmHWM`` (``ru_maxrss`` of a child is floored at its parent's RSS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0); whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class BusyCore:
    """Background load while the ``with`` block runs: one busy-loop process pinned to one CPU
    (``taskset -c``; unpinned when ``taskset`` is missing). Used for the "under load" rows:
    another job occupying one core of the machine, as on a shared CPU."""

    def __init__(self, cpu: Optional[int] = None) -> None:
        self.cpu = (os.cpu_count() or 1) - 1 if cpu is None else cpu
        self.proc: Optional[subprocess.Popen] = None
        self.pinned = False

    def __enter__(self) -> BusyCore:
        import shutil
        import sys

        cmd = [sys.executable, "-c", "while True: pass"]
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", str(self.cpu)] + cmd
            self.pinned = True
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # let it reach the loop
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def matmul_gflops(threads: int, size: int = 4096, repeats: int = 3) -> float:
    """The machine's float32 matmul rate (GFLOP/s) with ``threads`` torch threads: best of
    ``repeats`` (size x size) @ (size x size) products after one warm-up."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size)
        b = torch.randn(size, size)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        return 2.0 * size**3 / best / 1e9
    finally:
        torch.set_num_threads(before)
