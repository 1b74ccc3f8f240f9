"""Reading a run's result folders, tolerant of partial and older runs: every reader returns
``None`` (and adds a note saying why) instead of raising on a missing or damaged file."""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

__all__ = [
    "KINDS",
    "ResultDir",
    "Samples",
    "Table",
    "find_results",
    "find_truth",
    "load_samples",
    "load_truth",
    "read_csv",
    "read_json",
]

KINDS = ("memorization", "tracin", "influence", "erasure")
_NAMES = {"memorization": "memorization", "monitor": "memorization", "tracin": "tracin"}
_NAMES.update(influence="influence", erasure="erasure")
_EPOCH_CSV = re.compile(r"epoch_(\d+)\.csv")
_MAX_DIRS = 20000  # a run folder with a huge tree (datasets, checkpoints) is not walked forever


@dataclass
class ResultDir:
    """One callback's result folder: ``kind`` in :data:`KINDS`, its path, its name relative to
    the report's root (shown in the page), and whether its files said what it is."""

    kind: str
    path: str
    rel: str
    by_content: bool = True


@dataclass
class Table:
    """A CSV as columns: numeric columns as float arrays (empty cell: NaN), others as str."""

    header: List[str]
    cols: Dict[str, np.ndarray] = field(default_factory=dict)
    n_rows: int = 0

    def has(self, *names: str) -> bool:
        return all(n in self.cols for n in names)

    def numeric(self, *names: str) -> bool:
        """Whether every column in ``names`` exists and holds numbers (or is empty)."""
        return all(n in self.cols and self.cols[n].dtype != object for n in names)

    def get(self, name: str) -> np.ndarray:
        return self.cols[name]

    def valid_index(self, notes: List[str], name: str) -> Table:
        """The rows whose ``index`` is a non-negative integer (a note counts the others)."""
        idx = self.cols["index"]
        ok = np.isfinite(idx) & (idx >= 0) & (np.mod(idx, 1) == 0)
        if ok.all():
            return self
        notes.append(f"{name}: {int((~ok).sum())} row(s) without a valid index were skipped.")
        return Table(self.header, {k: v[ok] for k, v in self.cols.items()}, int(ok.sum()))


def read_json(path: str, notes: List[str]) -> Optional[Any]:
    """The parsed file, or ``None`` when it is missing (no note) or unreadable (a note)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        notes.append(f"{os.path.basename(path)} could not be read ({type(err).__name__}: {err}).")
        return None


def _column(values: List[str]) -> np.ndarray:
    """Numbers as float64 (empty cell: NaN), else the strings."""
    try:
        return np.array([v if v else "nan" for v in values], dtype=np.float64)
    except ValueError:
        return np.array(values, dtype=object)


def read_csv(path: str, notes: List[str]) -> Optional[Table]:
    """The CSV as a :class:`Table`, or ``None`` when missing (no note) or unreadable (a note).
    Rows of the wrong length (a damaged file) are dropped and counted in a note."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        notes.append(f"{os.path.basename(path)} could not be read ({type(err).__name__}: {err}).")
        return None
    if not rows:
        notes.append(f"{os.path.basename(path)} is empty (no header).")
        return None
    header = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:] if r]
    good = [r for r in body if len(r) == len(header)]
    if len(good) < len(body):
        notes.append(
            f"{os.path.basename(path)}: {len(body) - len(good)} damaged row(s) of the wrong "
            "length were skipped."
        )
    cols = {h: _column([r[j] for r in good]) for j, h in enumerate(header)}
    return Table(header, cols, len(good))


def _figures(d: str, files: List[str]) -> bool:
    """Whether ``d`` is the figures folder of a report (``report_files`` beside ``report.html``)."""
    return d.endswith("_files") and d[: -len("_files")] + ".html" in files


def _classify(path: str, files: List[str]) -> Optional[str]:
    """The callback that wrote ``path``, from its files (``None``: not a result folder)."""
    names = set(files)
    if "flagged.csv" in names or any(_EPOCH_CSV.fullmatch(f) for f in names):
        return "memorization"
    for marker, kind in (("erasers.pt", "erasure"), ("store.pt", "tracin")):
        if marker in names:
            return kind
    if "scores.pt" in names or "factors.pt" in names:
        return "influence"
    cfg = read_json(os.path.join(path, "config.json"), []) if "config.json" in names else None
    if isinstance(cfg, dict):
        if "warn_below" in cfg or "flag_layer" in cfg:
            return "memorization"
        if "shrinkage" in cfg or "z_dim" in cfg:
            return "erasure"
        if "damping" in cfg or "damping_used" in cfg:
            return "influence"
        if "projection_dim" in cfg:
            return "tracin"
    if "self_influence.csv" in names:
        try:
            with open(os.path.join(path, "self_influence.csv"), encoding="utf-8") as f:
                head = f.readline()
        except OSError:
            head = ""
        return "influence" if "hinv_norm" in head else "tracin"
    hist = read_json(os.path.join(path, "history.json"), []) if "history.json" in names else None
    if isinstance(hist, list) and hist and isinstance(hist[0], dict):
        if "n_flagged" in hist[0]:
            return "memorization"
        layers = hist[0].get("layers")
        if isinstance(layers, dict) and any(
            isinstance(v, dict) and ("n_rows" in v or "edit_norm" in v) for v in layers.values()
        ):
            return "erasure"
    return None


def find_results(root: str) -> Tuple[List[ResultDir], List[str]]:
    """Every callback result folder under ``root`` (``root`` included), in page order, and notes.

    A folder is recognized by its files (``epoch_<E>.csv``, ``store.pt``, ``erasers.pt``, the keys
    of ``config.json``...), so folders given as ``output_dir=`` are found under any name. A folder
    named like a callback (``memorization``, ``tracin``, ``influence``, ``erasure``) with no
    result files and no result folder inside is kept too: the page says it is empty.
    """
    notes: List[str] = []
    found: List[ResultDir] = []
    named: List[str] = []
    root = os.path.abspath(root)
    seen = 0
    for path, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _figures(d, files))
        seen += 1
        if seen > _MAX_DIRS:
            notes.append(
                f"Stopped searching after {_MAX_DIRS} folders; point the report at the "
                "run's lightning_memo/ folder to search less."
            )
            break
        rel = os.path.relpath(path, root)
        rel = "." if rel == "." else rel.replace(os.sep, "/")
        kind = _classify(path, files)
        if kind is not None:
            found.append(ResultDir(kind, path, rel))
        elif os.path.basename(path) in _NAMES:
            named.append(path)
    for path in named:
        inside = any(r.path.startswith(path + os.sep) for r in found)
        if not inside:
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            found.append(ResultDir(_NAMES[os.path.basename(path)], path, rel, by_content=False))
    found.sort(key=lambda r: (KINDS.index(r.kind), r.rel))
    return found, notes


def find_truth(root: str, results: List[ResultDir]) -> Optional[str]:
    """A ``truth.csv`` recorded in the run: in ``root``, a result folder or one of their parents
    (the nearest to ``root`` first)."""
    places = [root] + [r.path for r in results] + [os.path.dirname(r.path) for r in results]
    places = sorted(set(places), key=lambda p: (p.count(os.sep), p))
    for p in places:
        f = os.path.join(p, "truth.csv")
        if os.path.isfile(f):
            return f
    return None


_TRUE = {"1", "1.0", "true", "yes", "y", "t"}
_FALSE = {"0", "0.0", "false", "no", "n", "f", ""}


def load_truth(path: str) -> Dict[int, bool]:
    """``index -> flag`` from a CSV whose columns are ``index`` and a flag (``flag`` or the second
    column; values 1/0, true/false, yes/no).

    Raises:
        FileNotFoundError: no such file.
        ValueError: no index column, or a value that is not an integer index / a flag.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The truth file {path!r} does not exist (a CSV index,flag).")
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows or "index" not in [h.strip() for h in rows[0]] or len(rows[0]) < 2:
        raise ValueError(
            f"The truth file {path!r} needs a header with an 'index' column and a flag column "
            "(e.g. 'index,flag' with 1 for a flipped label); got "
            f"{rows[0] if rows else 'an empty file'}."
        )
    header = [h.strip() for h in rows[0]]
    i_col = header.index("index")
    f_col = (
        header.index("flag")
        if "flag" in header
        else next(j for j in range(len(header)) if j != i_col)
    )
    out: Dict[int, bool] = {}
    for n, r in enumerate(rows[1:], start=2):
        try:
            idx = int(float(r[i_col]))
            val = r[f_col].strip().lower()
        except (ValueError, IndexError) as err:
            raise ValueError(f"{path!r} line {n}: {r} is not 'index,flag' ({err}).") from None
        if val not in _TRUE | _FALSE:
            raise ValueError(f"{path!r} line {n}: flag {r[f_col]!r} is not 1/0 or true/false.")
        out[idx] = val in _TRUE
    return out


@dataclass
class Samples:
    """Recorded samples (``samples.json`` / ``samples.npz`` of any result folder):
    index -> label, text and (H, W, 3) uint8 thumbnail."""

    labels: Dict[int, Any] = field(default_factory=dict)
    texts: Dict[int, str] = field(default_factory=dict)
    images: Dict[int, np.ndarray] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.labels or self.texts or self.images)

    def merged(self, other: Samples) -> Samples:
        """These samples, completed by ``other``'s (ours win)."""
        return Samples(
            {**other.labels, **self.labels},
            {**other.texts, **self.texts},
            {**other.images, **self.images},
        )


def _rgb(a: np.ndarray) -> Optional[np.ndarray]:
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.size == 0:
        return None
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float64), 0, 255).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def load_samples(folders: List[str], name: str, notes: List[str]) -> Samples:
    """``<name>.json`` and ``<name>.npz`` of each folder merged (the first folder wins)."""
    out = Samples()
    for d in folders:
        meta = read_json(os.path.join(d, f"{name}.json"), notes)
        if isinstance(meta, dict):
            for k, v in meta.items():
                try:
                    i = int(k)
                except ValueError:
                    continue
                if isinstance(v, dict):
                    if v.get("label") is not None:
                        out.labels.setdefault(i, v["label"])
                    if v.get("text"):
                        out.texts.setdefault(i, str(v["text"]))
        npz = os.path.join(d, f"{name}.npz")
        if os.path.isfile(npz):
            try:
                with np.load(npz, allow_pickle=False) as z:
                    for k in z.files:
                        im = _rgb(z[k]) if k.lstrip("-").isdigit() else None
                        if im is not None:
                            out.images.setdefault(int(k), im)
            except (OSError, ValueError) as err:
                notes.append(f"{name}.npz could not be read ({type(err).__name__}: {err}).")
    return out
