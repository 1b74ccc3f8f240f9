"""RelatIF (Barshan, Brunet, Dziugaite, AISTATS 2020): influence relative to the train gradient's
Hessian-inverse norm, so globally influential outliers stop dominating top-k lists.

    RelatIF(q, z) = g_q^T (H + lambda I)^{-1} g_z / ||(H + lambda I)^{-1} g_z||

Wraps any curvature method (exact, CG, Arnoldi, K-FAC, EK-FAC). Math core: torch only.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from .base import FitContext, Grads, InfluenceMethod, LossFn

__all__ = ["RelatIFInfluence"]


class RelatIFInfluence(InfluenceMethod):
    """RelatIF on top of ``base`` (exact, CG, Arnoldi, K-FAC or EK-FAC) (Barshan, Brunet,
    Dziugaite, "RelatIF: Identifying Explanatory Training Examples via Relative Influence",
    AISTATS 2020).

    Self-influence is ``g^T H^{-1} g / ||H^{-1} g||`` (the RelatIF of a sample with itself);
    ``hinv_norm`` is the base's.
    """

    name = "relatif"

    def __init__(self, base: InfluenceMethod) -> None:
        super().__init__(base.damping)
        if not base.uses_gradients:
            raise ValueError(
                f"RelatIF normalises by ||H^-1 g||; the base method {base.name!r} has no Hessian."
            )
        self.base = base
        self.cacheable = base.cacheable

    @property
    def fit_shardable(self) -> bool:  # type: ignore[override]
        return self.base.fit_shardable

    @property
    def whole_layers(self) -> bool:  # type: ignore[override]
        return self.base.whole_layers

    @property
    def layer_types(self) -> Tuple[type, ...]:  # type: ignore[override]
        return self.base.layer_types

    def _fit(
        self,
        model: nn.Module,
        params: Dict[str, nn.Parameter],
        loss_fn: Optional[LossFn],
        data: Iterable[Any],
        context: FitContext,
    ) -> None:
        self.base.fit(model, params, loss_fn, data, context)
        self.damping = self.base.damping

    def query_rows(self, grads: Grads) -> torch.Tensor:
        return self.base.query_rows(grads)

    def _norm(self, grads: Grads) -> torch.Tensor:
        return self.base.hinv_norm(grads).clamp(min=torch.finfo(torch.float64).tiny)

    def train_rows(self, grads: Grads) -> torch.Tensor:
        rows = self.base.train_rows(grads)
        return rows / self._norm(grads).to(device=rows.device, dtype=rows.dtype)[:, None]

    def self_influence(self, grads: Grads) -> torch.Tensor:
        return self.base.self_influence(grads) / self._norm(grads).to(torch.float64)

    def hinv_norm(self, grads: Grads) -> torch.Tensor:
        return self.base.hinv_norm(grads)

    def damping_used(self) -> Any:
        return self.base.damping_used()

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "base": self.base.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.base.load_state_dict(state["base"])
