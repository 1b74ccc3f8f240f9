"""The exact damped Hessian (or GGN) of the chosen parameters: direct solve or conjugate
gradients (Koh & Liang, ICML 2017). Math core: torch only."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from ..hessian import (
    conjugate_gradient,
    drop_negative,
    exact_ggn,
    exact_hessian,
    flatten_batch,
    make_hvp,
)
from .base import FitContext, Grads, InfluenceMethod, LossFn

__all__ = ["ExactInfluence", "MAX_EXACT_PARAMS"]

MAX_EXACT_PARAMS = 5_000


class ExactInfluence(InfluenceMethod):
    """Full Hessian (or GGN) of the chosen parameters, damped, solved by eigendecomposition
    (``solver="direct"``) or by conjugate gradients on Hessian-vector products (``"cg"``)
    (Koh & Liang, "Understanding Black-box Predictions via Influence Functions", ICML 2017).

    Args:
        damping: lambda (``None``: 0.1 x mean eigenvalue; for CG, ``None`` means 1e-3).
        curvature: ``"hessian"`` or ``"ggn"`` (needs ``output_fn`` and ``output_loss_fn`` in the
            fit context).
        solver: ``"direct"`` (P <= 5,000) or ``"cg"``.
        cg_tol, cg_max_iter: CG's relative residual target and iteration cap.
    """

    name = "exact"
    cacheable = True

    def __init__(
        self,
        damping: Optional[float] = None,
        curvature: str = "hessian",
        solver: str = "direct",
        cg_tol: float = 1e-8,
        cg_max_iter: Optional[int] = None,
    ) -> None:
        super().__init__(damping)
        if curvature not in ("hessian", "ggn"):
            raise ValueError(f"curvature={curvature!r}: use 'hessian' or 'ggn'.")
        if solver not in ("direct", "cg"):
            raise ValueError(f"solver={solver!r}: use 'direct' or 'cg'.")
        self.curvature, self.solver = curvature, solver
        self.cacheable = solver == "direct"  # CG keeps a Hessian-vector product, not factors
        self.cg_tol, self.cg_max_iter = cg_tol, cg_max_iter
        self.evals: Optional[torch.Tensor] = None
        self.evecs: Optional[torch.Tensor] = None
        self._hvp: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self._last: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # last CG (g, solve)

    def _fit(
        self,
        model: nn.Module,
        params: Dict[str, nn.Parameter],
        loss_fn: Optional[LossFn],
        data: Iterable[Any],
        context: FitContext,
    ) -> None:
        size = sum(p.numel() for p in params.values())
        if self.solver == "cg":
            if self.curvature != "hessian":
                raise ValueError("solver='cg' uses Hessian-vector products: curvature='hessian'.")
            self._hvp = make_hvp(model, params, loss_fn, list(data))
            if self.damping is None:
                self.damping = 1e-3
            return
        if size > MAX_EXACT_PARAMS:
            raise ValueError(
                f"method='exact' builds the full {size} x {size} Hessian of the chosen parameters; "
                f"that is more than {MAX_EXACT_PARAMS} parameters. Choose a small head with "
                "layers= (e.g. the last Linear layer), or use method='arnoldi', 'kfac' or 'ekfac'."
            )
        if self.curvature == "ggn":
            if context.output_fn is None or context.output_loss_fn is None:
                raise ValueError(
                    "curvature='ggn' needs output_fn(model, batch) -> outputs (B, C) and "
                    "output_loss_fn(outputs, batch) -> (B,) in the fit context."
                )
            h = exact_ggn(model, params, context.output_fn, context.output_loss_fn, data)
        else:
            h = exact_hessian(model, params, loss_fn, data)
        evals, evecs = torch.linalg.eigh((h + h.T) / 2)
        self.evals, self.evecs = drop_negative(evals, evecs, "Hessian")
        if self.damping is None:
            self.damping = max(0.1 * float(self.evals.mean()), 1e-12)

    def _coef(self, grads: Grads) -> torch.Tensor:
        g = flatten_batch(grads).to(torch.float64)
        return g @ self.evecs.to(g.device)  # (B, P) coordinates in the eigenbasis

    def _solve(self, grads: Grads) -> torch.Tensor:
        """(B, P) float64: (H + lambda I)^{-1} g (CG: the last batch's solve is reused, since
        self-influence and the RelatIF norm of one batch need the same solve)."""
        if self.solver == "cg":
            g = flatten_batch(grads).to(torch.float64)
            if self._last is not None and self._last[0].shape == g.shape:
                if torch.equal(self._last[0], g):
                    return self._last[1]
            x = conjugate_gradient(self._hvp, g.T, self.damping, self.cg_tol, self.cg_max_iter).T
            self._last = (g, x)
            return x
        c = self._coef(grads) / (self.evals.to(self.evecs.device) + self.damping)
        return c @ self.evecs.to(c.device).T

    def query_rows(self, grads: Grads) -> torch.Tensor:
        return self._solve(grads)

    def train_rows(self, grads: Grads) -> torch.Tensor:
        return flatten_batch(grads).to(torch.float64)

    def self_influence(self, grads: Grads) -> torch.Tensor:
        if self.solver == "cg":
            return (self._solve(grads) * self.train_rows(grads)).sum(dim=1)
        c = self._coef(grads)
        return (c.square() / (self.evals.to(c.device) + self.damping)).sum(dim=1)

    def hinv_norm(self, grads: Grads) -> torch.Tensor:
        return self._solve(grads).norm(dim=1)

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "evals": self.evals, "evecs": self.evecs}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.evals, self.evecs = state["evals"], state["evecs"]
