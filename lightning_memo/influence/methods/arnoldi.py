"""Arnoldi influence: the top eigenpairs of the Hessian from an Arnoldi iteration on
Hessian-vector products (Schioppa et al., AAAI 2022). The iteration itself is
:mod:`lightning_memo.influence.arnoldi`. Math core: torch only."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn

from ..arnoldi import arnoldi_eigen
from ..hessian import drop_negative, flatten_batch, make_hvp
from .base import FitContext, Grads, InfluenceMethod, LossFn

__all__ = ["ArnoldiInfluence"]


class ArnoldiInfluence(InfluenceMethod):
    """Arnoldi iteration on Hessian-vector products; the ``arnoldi_k`` largest positive
    eigenpairs approximate H (Schioppa, Zablotskaia, Vilar, Sokolov, "Scaling Up Influence
    Functions", AAAI 2022). Gradients become k-vectors ``U^T g / sqrt(Lambda + lambda)``.

    Args:
        damping: lambda (``None``: 0.1 x the mean kept eigenvalue).
        arnoldi_dim: Krylov iterations (<= parameter count).
        arnoldi_k: eigenpairs kept, ``1 <= arnoldi_k <= arnoldi_dim``.
        seed: start vector; force_hermitian: symmetrise the projected matrix.
    """

    name = "arnoldi"
    cacheable = True

    def __init__(
        self,
        damping: Optional[float] = None,
        arnoldi_dim: int = 200,
        arnoldi_k: int = 50,
        seed: int = 0,
        force_hermitian: bool = True,
    ) -> None:
        super().__init__(damping)
        if arnoldi_k < 1 or arnoldi_dim < arnoldi_k:
            raise ValueError(
                f"arnoldi_dim={arnoldi_dim}, arnoldi_k={arnoldi_k}: need 1 <= arnoldi_k <= "
                "arnoldi_dim."
            )
        self.arnoldi_dim, self.arnoldi_k, self.seed = int(arnoldi_dim), int(arnoldi_k), int(seed)
        self.force_hermitian = force_hermitian
        self._vecs: Dict[str, Any] = {}  # eigenvectors cached in the gradients' dtype / device
        self.evals: Optional[torch.Tensor] = None
        self.evecs: Optional[torch.Tensor] = None

    def _fit(
        self,
        model: nn.Module,
        params: Dict[str, nn.Parameter],
        loss_fn: Optional[LossFn],
        data: Iterable[Any],
        context: FitContext,
    ) -> None:
        size = sum(p.numel() for p in params.values())
        hvp = make_hvp(model, params, loss_fn, list(data))
        dev = next(iter(params.values())).device
        # all Ritz pairs, then the arnoldi_k largest *positive* ones (as Captum / Schioppa et
        # al.): a negative-curvature direction would otherwise take a slot and, clamped to 0,
        # get the largest weight 1 / damping
        evals, evecs = arnoldi_eigen(
            hvp,
            size,
            self.arnoldi_dim,
            self.arnoldi_dim,
            seed=self.seed,
            force_hermitian=self.force_hermitian,
            device=dev,
            progress=context.progress,  # one step per Hessian-vector product
        )
        evals, evecs = drop_negative(evals, evecs, "Arnoldi Hessian")
        order = torch.argsort(evals, descending=True)[: self.arnoldi_k]
        self.evals, self.evecs = evals[order], evecs[:, order]
        if self.damping is None:
            self.damping = max(0.1 * float(self.evals.mean()), 1e-12)

    def _coef(self, grads: Grads) -> torch.Tensor:
        """(B, k) float64 coordinates in the eigenbasis (projected in the gradients' dtype)."""
        g = flatten_batch(grads)
        dt = torch.promote_types(g.dtype, torch.float32)
        key = (g.device, dt)
        if self._vecs.get("key") != key:
            self._vecs = {"key": key, "U": self.evecs.to(device=g.device, dtype=dt)}
        return (g.to(dt) @ self._vecs["U"]).to(torch.float64)

    def train_rows(self, grads: Grads) -> torch.Tensor:
        c = self._coef(grads)
        return c / torch.sqrt(self.evals.to(c.device) + self.damping)

    query_rows = train_rows

    def self_influence(self, grads: Grads) -> torch.Tensor:
        return self.train_rows(grads).square().sum(dim=1)

    def hinv_norm(self, grads: Grads) -> torch.Tensor:
        c = self._coef(grads)
        return (c / (self.evals.to(c.device) + self.damping)).norm(dim=1)

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "evals": self.evals, "evecs": self.evecs}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.evals, self.evecs = state["evals"], state["evecs"]
        self._vecs = {}
