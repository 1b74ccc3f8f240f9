"""RelatIF (Barshan, Brunet, Dziugaite, AISTATS 2020): influence relative to the train gradient's
Hessian-inverse norm, so globally influential outliers stop dominating top-k lists.

    RelatIF(q, z) = g_q^T (H + lambda I)^{-1} g_z / ||(H + lambda I)^{-1} g_z||

Wraps any curvature method of :mod:`lightning_memo.influence.methods` (math core, torch only).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from .methods import Grads, InfluenceMethod

__all__ = ["RelatIFInfluence"]


class RelatIFInfluence(InfluenceMethod):
    """RelatIF on top of ``base`` (exact, CG, Arnoldi, K-FAC or EK-FAC).

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

    def _fit(self, model, params, loss_fn, batches, **kw):
        self.base.fit(model, params, loss_fn, batches, **kw)
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

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "base": self.base.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.base.load_state_dict(state["base"])
