"""Random-projection influence (GEX's ``randproj`` baseline): inner products of randomly
projected per-sample gradients at the final weights, i.e. the influence with an identity
curvature in a k-dimensional random subspace (TracIn of the last checkpoint with lr = 1).

Projection by :class:`~lightning_memo.influence.features.GradientFeaturizer` (LoGra Kronecker
factors for Linear / Conv2d layers, dense Gaussian otherwise): the code TracIn uses (torch only).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn

from ..features import GradientFeaturizer
from ..grads import SUPPORTED_LAYERS
from .base import BatchInfluenceMethod, FitContext, LossFn

__all__ = ["RandProjInfluence"]


class RandProjInfluence(BatchInfluenceMethod):
    """score(q, z) = <P g_q, P g_z> with a seeded random projection P of size ``projection_dim``
    (the ``randproj`` baseline of Kim, Kim, Yang, "GEX", NeurIPS 2023). Rows come straight from
    the batch (projected, never materialised), so the entry points take batches.

    Args:
        modules: ``{name: layer}`` whose parameters are differentiated.
        projection_dim: k; seed: projection seed.
    """

    name = "randproj"
    layer_types = SUPPORTED_LAYERS

    def __init__(self, modules: Dict[str, nn.Module], projection_dim: int = 1024, seed: int = 0):
        super().__init__(None)
        self.modules, self.projection_dim, self.seed = modules, projection_dim, seed
        self.model: Optional[nn.Module] = None
        self.loss_fn: Any = None
        self.features: Optional[GradientFeaturizer] = None

    def _fit(
        self,
        model: nn.Module,
        params: Dict[str, nn.Parameter],
        loss_fn: Optional[LossFn],
        data: Iterable[Any],
        context: FitContext,
    ) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.features = GradientFeaturizer(
            self.modules, self.projection_dim, self.seed, params=params, factored=False
        )

    def train_rows_batch(self, batch: Any) -> torch.Tensor:
        """(B, k) float64 projected per-sample gradients."""
        return self.features(self.model, batch, self.loss_fn).detach().double()

    query_rows_batch = train_rows_batch

    def self_influence_batch(self, batch: Any) -> torch.Tensor:
        return self.train_rows_batch(batch).square().sum(dim=1)

    def hinv_norm_batch(self, batch: Any) -> torch.Tensor:
        rows = self.train_rows_batch(batch)
        return torch.full((rows.shape[0],), float("nan"), dtype=torch.float64)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        raise RuntimeError("randproj keeps no factors; it is recomputed (cheap) on every run.")
