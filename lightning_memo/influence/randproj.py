"""Random-projection influence (GEX's ``randproj`` baseline): inner products of randomly
projected per-sample gradients at the final weights, i.e. the influence with an identity
curvature in a k-dimensional random subspace (TracIn of the last checkpoint with lr = 1).

Projection by :class:`~lightning_memo.influence.features.GradientFeaturizer` (LoGra Kronecker
factors for Linear / Conv2d layers, dense Gaussian otherwise): the code TracIn uses (torch only).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from .features import GradientFeaturizer
from .methods import InfluenceMethod

__all__ = ["RandProjInfluence"]


class RandProjInfluence(InfluenceMethod):
    """score(q, z) = <P g_q, P g_z> with a seeded random projection P of size ``projection_dim``.

    Args:
        modules: ``{name: layer}`` whose parameters are differentiated.
        projection_dim: k; seed: projection seed.
    """

    name = "randproj"
    uses_gradients = False  # rows come straight from the batch (projected, never materialised)

    def __init__(self, modules: Dict[str, nn.Module], projection_dim: int = 1024, seed: int = 0):
        super().__init__(None)
        self.modules, self.projection_dim, self.seed = modules, projection_dim, seed
        self.model: Optional[nn.Module] = None
        self.loss_fn: Any = None
        self.features: Optional[GradientFeaturizer] = None

    def _fit(self, model, params, loss_fn, batches, **kw):
        self.model, self.loss_fn = model, loss_fn
        self.features = GradientFeaturizer(
            self.modules, self.projection_dim, self.seed, params=params, factored=False
        )

    def train_rows(self, batch: Any) -> torch.Tensor:
        return self.features(self.model, batch, self.loss_fn).detach().double()

    query_rows = train_rows

    def self_influence(self, batch: Any) -> torch.Tensor:
        return self.train_rows(batch).square().sum(dim=1)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        raise RuntimeError("randproj keeps no factors; it is recomputed (cheap) on every run.")
