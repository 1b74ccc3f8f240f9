"""K-FAC / EK-FAC influence: a Kronecker-factored Fisher per ``nn.Linear`` / ``nn.Conv2d``
layer (George et al. 2018; Grosse et al. 2023). The factor math is
:mod:`lightning_memo.influence.kfac`. Math core: torch only."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

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

    def _factored(self, grads: Grads) -> bool:
        """Whether ``grads`` holds every layer's input and output-gradient (FactoredGrads)."""
        return isinstance(grads, FactoredGrads) and set(self.modules) <= set(grads.layers())

    def _io(self, grads: FactoredGrads) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """The tracked layers' inputs (B, ..., d_in) and output-gradients (B, ..., d_out)."""
        return (
            {n: grads.inputs[n] for n in self.modules},
            {n: grads.grads[n] for n in self.modules},
        )

    @staticmethod
    def _flat(layers: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([g.reshape(g.shape[0], -1) for g in layers.values()], dim=1)

    def query_rows(self, grads: Grads) -> torch.Tensor:
        if self._factored(grads):  # rotated from the factors' rows (cheaper than from G)
            return self._flat(self.kfac.precondition_from_io(*self._io(grads)))
        return self._flat(self.kfac.precondition(self.layer_grads(grads)))

    def train_rows(self, grads: Grads) -> torch.Tensor:
        return self._flat(self.layer_grads(grads))

    def train_scores(self, query_rows: torch.Tensor, grads: Grads) -> torch.Tensor:
        """(n_query, B): layer by layer, each layer's per-sample gradients formed from its
        factors straight into (B, d_out, d_in + 1) (one ``bmm`` with a ones column for the bias)
        and multiplied by that layer's slice of ``query_rows``; no (B, k) concatenation."""
        if not self._factored(grads):
            return super().train_scores(query_rows, grads)
        out: Optional[torch.Tensor] = None
        off = 0
        for name in self.modules:
            d_out, d_in, bias = self.kfac.dims[name]
            a, g = grads.inputs[name], grads.grads[name]
            b = a.shape[0]
            a3 = (
                a.detach().reshape(b, -1, d_in).to(device=query_rows.device, dtype=query_rows.dtype)
            )
            g3 = (
                g.detach()
                .reshape(b, -1, d_out)
                .to(device=query_rows.device, dtype=query_rows.dtype)
            )
            if bias:
                a3 = torch.cat([a3, a3.new_ones(b, a3.shape[1], 1)], dim=2)
            width = d_out * a3.shape[2]
            w = torch.bmm(g3.transpose(1, 2), a3).reshape(b, width)  # (B, d_out * (d_in + 1))
            part = query_rows[:, off : off + width] @ w.T
            out = part if out is None else out.add_(part)
            off += width
        if off != query_rows.shape[1]:
            raise ValueError(
                f"query_rows have {query_rows.shape[1]} columns; the layers hold {off} parameters."
            )
        assert out is not None
        return out

    def self_influence(self, grads: Grads) -> torch.Tensor:
        """(B,) float64; from the layers' inputs and output-gradients when ``grads`` holds them
        (:class:`~lightning_memo.influence.grads.FactoredGrads`, e.g.
        ``GradientFeaturizer.grad_dict(..., lazy=True)``): no per-sample gradient is formed."""
        return self._rotated(grads, (1,))[0]

    def hinv_norm(self, grads: Grads) -> torch.Tensor:
        """(B,) float64 ``||P(G)||``: the bases are orthogonal, so it is the norm of the rotated
        gradient divided by ``Λ + λ`` (no back-rotation; from the factors when available)."""
        return self._rotated(grads, (2,))[0].clamp_min(0).sqrt()

    def self_influence_and_hinv_norm(self, grads: Grads) -> Tuple[torch.Tensor, torch.Tensor]:
        """Both from one rotation of each sample's gradient."""
        s, sq = self._rotated(grads, (1, 2))
        return s, sq.clamp_min(0).sqrt()

    def _rotated(self, grads: Grads, powers: Tuple[int, ...]) -> List[torch.Tensor]:
        if self._factored(grads):
            sums = self.kfac.rotated_sums_from_io(*self._io(grads), powers)
        else:
            sums = self.kfac.rotated_sums(self.layer_grads(grads), powers)
        return [s.to(torch.float64) for s in sums]

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
