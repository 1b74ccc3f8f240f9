"""TracIn scores from stored (projected) per-sample gradients (math core, torch only).

TracInCP(z, z') = sum_c lr_c <grad l(z; w_c), grad l(z'; w_c)> over checkpoints c (Pruthi et al.,
NeurIPS 2020). Self-influence is z = z'. Scores are computed in blocks, never holding
(n_query, N, k).

Factored rows (exact gradients of ``nn.Linear`` layers without a sequence dimension): a row is
``[a_1 | g_1 | a_2 | g_2 | ...]``, the layer input (bias folded in as a 1) and output-gradient per
layer, whose gradient is ``g a^T``; so ``<g a^T, g' a'^T> = (a . a') (g . g')`` and the exact inner
product costs ``d_in + d_out`` per layer instead of ``d_in * d_out``.
"""

from __future__ import annotations

import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "GradientStore",
    "tracin_self_influence",
    "tracin_scores",
    "top_k",
    "row_dot",
    "row_sq_norm",
]

Layout = Optional[Sequence[Tuple[int, int]]]  # per layer (size of a, size of g); None = plain


def row_dot(q: torch.Tensor, t: torch.Tensor, layout: Layout = None) -> torch.Tensor:
    """Inner products of gradient rows: ``q: (n, k)``, ``t: (m, k)`` -> ``(n, m)``.

    ``layout=None``: plain dot products. Otherwise rows are factored (see the module docstring)
    and the result is ``sum_l (A_q A_t^T) * (G_q G_t^T)``.
    """
    if layout is None:
        return q @ t.T
    out, s = None, 0
    for na, ng in layout:
        aa = q[:, s : s + na] @ t[:, s : s + na].T
        gg = q[:, s + na : s + na + ng] @ t[:, s + na : s + na + ng].T
        out = aa * gg if out is None else out.addcmul_(aa, gg)
        s += na + ng
    return out


def row_sq_norm(t: torch.Tensor, layout: Layout = None) -> torch.Tensor:
    """Squared gradient norm of each row ``t: (m, k)`` -> ``(m,)`` float64 (see :func:`row_dot`)."""
    if layout is None:
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()
        # one pass, no (m, k) temporary (float32 rows: float32 accumulation, ~1e-7 relative)
        return torch.linalg.vector_norm(t, dim=1).to(torch.float64).square_()
    out, s = torch.zeros(t.shape[0], dtype=torch.float64, device=t.device), 0
    for na, ng in layout:
        a2 = t[:, s : s + na].square().sum(dim=1, dtype=torch.float64)
        out += a2 * t[:, s + na : s + na + ng].square().sum(dim=1, dtype=torch.float64)
        s += na + ng
    return out


class GradientStore:
    """Per-checkpoint gradients of N training samples: ``(C, N, k)`` plus learning rates ``(C,)``.

    Rows are written by sample index; never-written rows are tracked. Memory is ``C * N * k`` in
    ``dtype`` (float16 halves it); with ``path`` the array is a memory-mapped file on disk.

    Args:
        num_samples: N; dim: k; dtype: storage dtype; path: folder for a disk-backed store.
        layout: ``[(size of a, size of g), ...]`` per layer when rows are factored (see
            :func:`row_dot`), else None.
    """

    def __init__(
        self,
        num_samples: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        path: Optional[str] = None,
        layout: Layout = None,
    ) -> None:
        self.num_samples, self.dim, self.dtype, self.path = int(num_samples), int(dim), dtype, path
        self.layout = [tuple(map(int, p)) for p in layout] if layout is not None else None
        if self.layout is not None and sum(a + g for a, g in self.layout) != self.dim:
            raise ValueError(f"layout {self.layout} does not add up to dim={self.dim}.")
        self.lrs: List[float] = []
        self.steps: List[int] = []
        self._chunks: List[torch.Tensor] = []
        self._seen: List[torch.Tensor] = []
        self._maps: List[np.ndarray] = []  # the memory maps of a disk-backed store

    def flush(self) -> None:
        """Write a disk-backed store's pending rows to its files."""
        for mm in self._maps:
            mm.flush()

    def __len__(self) -> int:
        return len(self.lrs)

    def add_checkpoint(self, lr: float, step: int = -1) -> int:
        """Open a new checkpoint with learning rate ``lr``; returns its position."""
        c = len(self.lrs)
        if self.path is not None:
            os.makedirs(self.path, exist_ok=True)
            np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
            mm = np.lib.format.open_memmap(
                os.path.join(self.path, f"grads_{c}.npy"),
                mode="w+",
                dtype=np_dtype,
                shape=(self.num_samples, self.dim),
            )
            self._maps.append(mm)
            arr = torch.from_numpy(mm)
        else:
            arr = torch.zeros(self.num_samples, self.dim, dtype=self.dtype)
        self._chunks.append(arr)
        self._seen.append(torch.zeros(self.num_samples, dtype=torch.bool))
        self.lrs.append(float(lr))
        self.steps.append(int(step))
        return c

    def write(self, c: int, indices: torch.Tensor, grads: torch.Tensor) -> None:
        """Store ``grads: (B, k)`` at rows ``indices: (B,)`` of checkpoint ``c``."""
        if grads.shape[1] != self.dim:
            raise ValueError(f"gradients have {grads.shape[1]} columns; the store has {self.dim}.")
        idx = indices.cpu()
        self._chunks[c][idx] = grads.detach().to("cpu", self._chunks[c].dtype)
        self._seen[c][idx] = True

    def grads(self, c: int) -> torch.Tensor:
        """(N, k) of checkpoint ``c``."""
        return self._chunks[c]

    def blocks(
        self, c: int, rows: int, dtype: Optional[torch.dtype] = None
    ) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """``(start, end, rows start:end of checkpoint c)`` in blocks of ``rows``, in ``dtype``.

        A disk-backed store reads each block from its file into one reused buffer (``readinto``,
        not through the memory map), so reading a whole checkpoint adds one block to the
        process's resident memory instead of the file's size; written rows are in the page
        cache, so no flush is needed. In-memory stores yield slices (converted when ``dtype``
        differs). A block may share memory with the next one: use it (or clone it) before
        advancing the iterator.
        """
        n, k = self.num_samples, self.dim
        dtype = dtype or self.dtype
        if self.path is None or c >= len(self._maps) or not hasattr(self._maps[c], "filename"):
            g = self._chunks[c]
            for s in range(0, n, rows):
                yield s, min(n, s + rows), g[s : s + rows].to(dtype)
            return
        mm = self._maps[c]
        np_dtype = mm.dtype
        buf = np.empty((min(rows, n), k), dtype=np_dtype)
        row_bytes = k * np_dtype.itemsize
        with open(mm.filename, "rb", buffering=0) as f:
            for s in range(0, n, rows):
                e = min(n, s + rows)
                view = buf[: e - s]
                f.seek(mm.offset + s * row_bytes)
                mv = memoryview(view.reshape(-1)).cast("B")
                got = 0
                while got < len(mv):
                    r = f.readinto(mv[got:])
                    if not r:
                        raise OSError(f"{mm.filename}: short read at row {s}.")
                    got += r
                yield s, e, torch.from_numpy(view).to(dtype)

    def seen(self, c: int) -> torch.Tensor:
        """(N,) bool: rows written at checkpoint ``c``."""
        return self._seen[c]

    def missing(self) -> int:
        """Samples never written at some checkpoint."""
        if not self._seen:
            return self.num_samples
        return int((~torch.stack(self._seen).all(dim=0)).sum())

    def state(self) -> dict:
        """Everything needed to rebuild the store (tensors on the CPU)."""
        return {
            "num_samples": self.num_samples,
            "dim": self.dim,
            "layout": self.layout,
            "dtype": str(self.dtype).replace("torch.", ""),
            "path": self.path,
            "lrs": list(self.lrs),
            "steps": list(self.steps),
            "grads": [g.clone() for g in self._chunks],
            "seen": [s.clone() for s in self._seen],
        }

    def state_ref(self) -> dict:
        """Like :meth:`state`, but a disk-backed store is referenced by its ``.npy`` files
        instead of copied (checkpoints stay small); :meth:`from_state` reopens them."""
        if self.path is None:
            return self.state()
        self.flush()
        st = self.state()
        st["grads"] = None
        return st

    @classmethod
    def from_state(cls, state: dict, dtype: Optional[torch.dtype] = None) -> GradientStore:
        """Rebuild a store from :meth:`state` / :meth:`state_ref` (dtype: the saved one)."""
        if dtype is None:
            dtype = getattr(torch, state.get("dtype", "float32"))
        store = cls(
            state["num_samples"], state["dim"], dtype, state.get("path"), state.get("layout")
        )
        store.lrs, store.steps = list(state["lrs"]), list(state["steps"])
        if state["grads"] is None:  # disk-backed: reopen the memory-mapped files
            for c in range(len(store.lrs)):
                f = os.path.join(store.path, f"grads_{c}.npy")
                if not os.path.exists(f):
                    raise FileNotFoundError(
                        f"The gradient store file {f} is missing; the checkpoint references the "
                        "disk-backed store there (store_on_disk=True). Restore the folder or "
                        "resume with a fresh TracIn."
                    )
                store._maps.append(np.load(f, mmap_mode="r+"))
                store._chunks.append(torch.from_numpy(store._maps[-1]))
        else:
            store._chunks = [g.to(dtype) for g in state["grads"]]
        store._seen = list(state["seen"])
        return store


def tracin_self_influence(
    store: GradientStore, device: Optional[torch.device] = None, block: int = 16384
) -> torch.Tensor:
    """sum_c lr_c ||g_c(z)||^2 for every training sample: (N,) float64.

    Reads the store in blocks of ``block`` rows (see :meth:`GradientStore.blocks`): the extra
    memory is one block in the work dtype, never a copy of a whole checkpoint.
    """
    out = torch.zeros(store.num_samples, dtype=torch.float64, device=device)
    work = torch.float64 if store.dtype == torch.float64 else torch.float32
    for c, lr in enumerate(store.lrs):
        for s, e, g in store.blocks(c, block, work):
            out[s:e] += lr * row_sq_norm(g.to(device=device), store.layout)
            del g  # the block's buffer is freed before the next checkpoint's is allocated
    return out


def tracin_scores(
    store: GradientStore,
    query_grads: Sequence[torch.Tensor],
    block: int = 4096,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """TracIn of every training sample on each query: (n_query, N), float32 (float64 when the
    store is float64).

    Args:
        store: training gradients per checkpoint.
        query_grads: per checkpoint, the queries' gradients ``(n_query, k)`` at the same weights.
        block: training rows per block (bounds the work tensor to n_query x block).
    """
    if len(query_grads) != len(store):
        raise ValueError(
            f"{len(query_grads)} query gradient sets for {len(store)} checkpoints; give one per "
            "checkpoint."
        )
    nq = query_grads[0].shape[0] if query_grads else 0
    work = torch.float64 if store.dtype == torch.float64 else torch.float32
    out = torch.zeros(nq, store.num_samples, dtype=work, device=device)
    for c, lr in enumerate(store.lrs):
        q = query_grads[c].to(device=device, dtype=work)
        for s, e, gb in store.blocks(c, block, work):
            out[:, s:e] += lr * row_dot(q, gb.to(device=device), store.layout)
            del gb
    return out


def top_k(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Proponents (k largest scores) and opponents (k most negative) of one query: (k,) indices."""
    k = min(k, scores.numel())
    return torch.topk(scores, k).indices, torch.topk(-scores, k).indices


def loss_reduction_scale(batch_size: int, loss_reduction: str) -> float:
    """Factor turning the output-gradients of a batch loss into those of each sample's own loss.

    Online TracIn reads the gradients of the training step's backward. With a mean-reduced loss
    ``L = (1/B) sum_i l_i`` each sample's gradient carries a factor ``1/B``, undone by multiplying
    by ``B``; a sum-reduced loss already gives ``grad l_i``.

    Args:
        batch_size: B, the samples in the training step's batch (on this rank).
        loss_reduction: ``"mean"`` or ``"sum"``: how ``training_step`` reduces the batch loss.

    Returns:
        ``float(batch_size)`` for ``"mean"``, ``1.0`` for ``"sum"``.
    """
    if loss_reduction == "mean":
        return float(batch_size)
    if loss_reduction == "sum":
        return 1.0
    raise ValueError(f"loss_reduction={loss_reduction!r}: use 'mean' or 'sum'.")
