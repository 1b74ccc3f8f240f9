"""K-FAC / EK-FAC influence: a Kronecker-factored Fisher per ``nn.Linear`` / ``nn.Conv2d``
layer (George et al. 2018; Grosse et al. 2023). The factor math is
:mod:`lightning_memo.influence.kfac`. Math core: torch only."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn

from ..grads import SUPPORTED_LAYERS, FactoredGrads
from ..kfac import KFAC, check_kfac_modules, fit_kfac, with_bias_column
from .base import FitContext, Grads, InfluenceMethod, LossFn

__all__ = ["KFACInfluence"]


class KFACInfluence(InfluenceMethod):
    """K-FAC (``ekfac=False``) or EK-FAC Fisher of ``nn.Linear`` / ``nn.Conv2d`` layers
    (George et al., "Fast Approximate Natural Gradient Descent in a Kronecker-factored
    Eigenbasis", NeurIPS 2018; Grosse et al., "Studying Large Language Model Generalization with
    Influence Functions", 2023); scores summed over layers.

    The statistics are plain sums, so each rank may fit on its own shard of the data
    (``fit_shardable``): the fit context's ``reduce`` sums them over the ranks.

    Args:
        modules: ``{name: layer}``; damping: lambda (``None``: 0.1 x the mean eigenvalue of each
            layer); ekfac: eigenvalue correction; fisher: ``"true"`` (labels sampled from the
            model; needs ``output_fn`` in the fit context) or ``"empirical"``;
        max_examples: cap on the samples used for the factors; seed: label sampling.
    """

    cacheable = True
    fit_shardable = True
    layer_types = SUPPORTED_LAYERS
    whole_layers = True

    def __init__(
        self,
        modules: Dict[str, nn.Module],
        damping: Optional[float] = None,
        ekfac: bool = True,
        fisher: str = "true",
        max_examples: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(damping)
        check_kfac_modules(modules)
        if fisher not in ("true", "empirical"):
            raise ValueError(f"fisher={fisher!r}: use 'true' or 'empirical'.")
        self.modules, self.ekfac, self.fisher = modules, ekfac, fisher
        self.max_examples, self.seed = max_examples, seed
        self.name = "ekfac" if ekfac else "kfac"
        self.kfac: Optional[KFAC] = None

    def _fit(
        self,
        model: nn.Module,
        params: Dict[str, nn.Parameter],
        loss_fn: Optional[LossFn],
        data: Iterable[Any],
        context: FitContext,
    ) -> None:
        self.kfac = fit_kfac(
            model,
            self.modules,
            loss_fn,
            data,
            ekfac=self.ekfac,
            damping=self.damping,
            fisher=self.fisher,
            output_fn=context.output_fn,
            max_examples=self.max_examples,
            seed=self.seed,
            progress=context.progress,
            mask_fn=context.mask_fn,
            reduce=context.reduce,
        )

    def layer_grads(self, grads: Grads) -> Dict[str, torch.Tensor]:
        """``{layer: (B, d_out, d_in + 1)}`` ([W | b], conv weights flattened per filter)."""
        out = {}
        for name in self.modules:
            pre = f"{name}." if name else ""
            w = grads[pre + "weight"]
            w = w.reshape(w.shape[0], w.shape[1], -1)
            out[name] = with_bias_column(w, grads.get(pre + "bias"))
        return out

    @staticmethod
    def _flat(layers: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([g.reshape(g.shape[0], -1) for g in layers.values()], dim=1)

    def query_rows(self, grads: Grads) -> torch.Tensor:
        return self._flat(self.kfac.precondition(self.layer_grads(grads)))

    def train_rows(self, grads: Grads) -> torch.Tensor:
        return self._flat(self.layer_grads(grads))

    def self_influence(self, grads: Grads) -> torch.Tensor:
        """(B,) float64; from the layers' inputs and output-gradients when ``grads`` holds them
        (:class:`~lightning_memo.influence.grads.FactoredGrads`, e.g.
        ``GradientFeaturizer.grad_dict(..., lazy=True)``): no per-sample gradient is formed."""
        if isinstance(grads, FactoredGrads) and set(self.modules) <= set(grads.layers()):
            return self.self_influence_from_io(grads.inputs, grads.grads)
        return self.kfac.self_influence(self.layer_grads(grads)).to(torch.float64)

    def self_influence_from_io(
        self, inputs: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """(B,) float64 self-influence from each layer's input ``(B, ..., d_in)`` and
        output-gradient ``(B, ..., d_out)`` (see :meth:`KFAC.self_influence_from_io`)."""
        a = {n: inputs[n] for n in self.modules}
        g = {n: grads[n] for n in self.modules}
        return self.kfac.self_influence_from_io(a, g).to(torch.float64)

    def hinv_norm(self, grads: Grads) -> torch.Tensor:
        return self.query_rows(grads).to(torch.float64).norm(dim=1)

    def damping_used(self) -> Any:
        """The damping: ``{layer: lambda}`` when chosen per layer by the heuristic."""
        if self.damping is None and self.kfac is not None:
            return {name: float(self.kfac.layer_damping(name)) for name in self.modules}
        return self.damping

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "kfac": self.kfac.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.kfac = KFAC(self.modules, ekfac=self.ekfac, damping=self.damping)
        self.kfac.load_state_dict(state["kfac"])
