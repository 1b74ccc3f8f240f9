"""Output shared by the callbacks: atomic files, the output folder, TensorBoard pictures."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from typing import Any, Callable, Iterable, List, Optional, Sequence

import torch

from .exceptions import OutputDirError

__all__ = [
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_torch_save",
    "check_writable",
    "clear_files",
    "atomic_write_csv",
    "atomic_write_json",
    "resolve_output_dir",
    "tensorboard_writer",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write: Callable[[Any], None], mode: str) -> None:
    """Write through a temporary file in the same folder (fsync, then ``os.replace``), with the
    usual permissions (0666 minus the umask, e.g. 0644): a crash leaves the old file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, mode, **({"newline": ""} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    _atomic_write(path, lambda f: f.write(data), "wb")


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` atomically (a crash never leaves a half-written file)."""
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV atomically. Floats are written with full precision (``repr``); NaN as empty."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    atomic_write_text(path, buf.getvalue())


def atomic_write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (sorted keys, indented)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def resolve_output_dir(
    trainer: Any, explicit: Optional[str], name: str, callback: Any = None
) -> str:
    """The callback's folder: ``explicit``, else ``trainer.log_dir``, else ``default_root_dir``,
    plus ``lightning_memo/<name>``. Call it on every rank: ``trainer.log_dir`` broadcasts.

    With several instances of ``callback``'s class on the trainer, each instance without an
    explicit folder gets ``lightning_memo/<name>/<its state key>`` so none overwrites another's
    files; two instances that would share a folder are refused (:class:`OutputDirError`).
    """
    if explicit is not None:
        folder = os.path.abspath(explicit)
    else:
        base = trainer.log_dir or trainer.default_root_dir
        folder = os.path.join(os.path.abspath(base), "lightning_memo", name)
    if callback is None:
        return folder
    siblings = [c for c in getattr(trainer, "callbacks", []) if type(c) is type(callback)]
    if len(siblings) < 2:
        return folder
    if explicit is None:
        folder = os.path.join(folder, state_key_slug(callback.state_key))
    taken = {}
    for c in siblings:
        own = getattr(c, "output_dir", None)
        key = os.path.abspath(own) if own is not None else state_key_slug(c.state_key)
        if key in taken and taken[key] is not c:
            raise OutputDirError(
                f"Two {type(callback).__name__} callbacks on this Trainer would write to the same "
                f"folder ({key!r}): give each its own output_dir=, or settings that differ (their "
                f"state key is {c.state_key!r})."
            )
        taken[key] = c
    return folder


def state_key_slug(state_key: str) -> str:
    """A folder name from a callback state key: ``"MemorizationMonitor{'layers': "['net.1']"}"``
    -> ``"layers=net.1"``."""
    body = state_key[state_key.find("{") :] if "{" in state_key else state_key
    pairs = re.findall(r"'([^']+)':\s*(\"[^\"]*\"|'[^']*'|[^,}]+)", body)
    text = "_".join(f"{k}={v}" for k, v in pairs) if pairs else body
    text = re.sub(r"[\[\]'\" ]", "", text)
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "-", text).strip("-")[:120] or "default"


def check_writable(trainer: Any, folder: str, who: str) -> None:
    """Fail in ``setup``, before the first step, when rank 0 cannot create ``folder`` and write a
    file in it (every rank raises together, so no rank waits for a dead one)."""
    error = ""
    if trainer.is_global_zero:
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.unlink(probe)
        except OSError as err:
            error = f"{type(err).__name__}: {err}"
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and int(getattr(strategy, "world_size", 1) or 1) > 1:
        error = strategy.broadcast(error, src=0)
    if error:
        raise OutputDirError(
            f"{who} cannot write its result files to {folder!r} ({error}). Pass output_dir= a "
            "writable folder (or fix the folder's permissions); checked before training so no "
            "result is lost at the end."
        )


def clear_files(folder: str, pattern: str) -> List[str]:
    """Delete the files of ``folder`` whose names match the regex ``pattern``; returns them."""
    if not os.path.isdir(folder):
        return []
    gone = [f for f in sorted(os.listdir(folder)) if re.fullmatch(pattern, f)]
    for f in gone:
        os.unlink(os.path.join(folder, f))
    return gone


def tensorboard_writer(trainer: Any) -> Any:
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger, or ``None``."""
    from torch.utils.tensorboard import SummaryWriter

    for lg in getattr(trainer, "loggers", []) or []:
        exp = getattr(lg, "experiment", None)
        if isinstance(exp, SummaryWriter):
            return exp
    return None
