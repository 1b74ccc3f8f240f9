"""TracIn scores from stored (projected) per-sample gradients (math core, torch only).

TracInCP(z, z') = sum_c lr_c <grad l(z; w_c), grad l(z'; w_c)> over checkpoints c (Pruthi et al.,
NeurIPS 2020). Self-influence is z = z'. Scores are computed in blocks, never holding
(n_query, N, k).
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["GradientStore", "tracin_self_influence", "tracin_scores", "top_k"]


class GradientStore:
    """Per-checkpoint gradients of N training samples: ``(C, N, k)`` plus learning rates ``(C,)``.

    Rows are written by sample index; never-written rows are tracked. Memory is ``C * N * k`` in
    ``dtype`` (float16 halves it); with ``path`` the array is a memory-mapped file on disk.

    Args:
        num_samples: N; dim: k; dtype: storage dtype; path: folder for a disk-backed store.
    """

    def __init__(
        self,
        num_samples: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        path: Optional[str] = None,
    ) -> None:
        self.num_samples, self.dim, self.dtype, self.path = int(num_samples), int(dim), dtype, path
        self.lrs: List[float] = []
        self.steps: List[int] = []
        self._chunks: List[torch.Tensor] = []
        self._seen: List[torch.Tensor] = []

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
            "lrs": list(self.lrs),
            "steps": list(self.steps),
            "grads": [g.clone() for g in self._chunks],
            "seen": [s.clone() for s in self._seen],
        }

    @classmethod
    def from_state(cls, state: dict, dtype: torch.dtype = torch.float32) -> GradientStore:
        store = cls(state["num_samples"], state["dim"], dtype)
        store.lrs, store.steps = list(state["lrs"]), list(state["steps"])
        store._chunks = [g.to(dtype) for g in state["grads"]]
        store._seen = list(state["seen"])
        return store


def tracin_self_influence(
    store: GradientStore, device: Optional[torch.device] = None
) -> torch.Tensor:
    """sum_c lr_c ||g_c(z)||^2 for every training sample: (N,) float64."""
    out = torch.zeros(store.num_samples, dtype=torch.float64, device=device)
    for c, lr in enumerate(store.lrs):
        g = store.grads(c).to(device=device, dtype=torch.float32)
        out += lr * g.square().sum(dim=1, dtype=torch.float64)
    return out


def tracin_scores(
    store: GradientStore,
    query_grads: Sequence[torch.Tensor],
    block: int = 4096,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """TracIn of every training sample on each query: (n_query, N) float32.

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
    out = torch.zeros(nq, store.num_samples, dtype=torch.float32, device=device)
    for c, lr in enumerate(store.lrs):
        q = query_grads[c].to(device=device, dtype=torch.float32)
        g = store.grads(c)
        for s in range(0, store.num_samples, block):
            gb = g[s : s + block].to(device=device, dtype=torch.float32)
            out[:, s : s + block] += lr * (q @ gb.T)
    return out


def top_k(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Proponents (k largest scores) and opponents (k most negative) of one query: (k,) indices."""
    k = min(k, scores.numel())
    return torch.topk(scores, k).indices, torch.topk(-scores, k).indices
