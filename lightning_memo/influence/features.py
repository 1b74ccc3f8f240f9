"""Gradient features: one (projected) per-sample gradient vector per sample, for TracIn and
influence alike (math core, torch only).

``GradientFeaturizer`` turns a batch into ``(B, k)`` rows: for ``nn.Linear`` layers from the layer
inputs and output-gradients (LoGra projection, or the exact flattened gradient), for any other
parameters from ``torch.func`` per-sample gradients (dense projection, or exact).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .grads import LinearGradCapture, linear_grads_from_io, per_sample_grads
from .projection import DenseProjector, KroneckerProjector

__all__ = ["GradientFeaturizer"]


class GradientFeaturizer:
    """Per-sample gradient features of chosen layers or parameters.

    Args:
        modules: ``{name: module}`` whose parameters are differentiated. All ``nn.Linear``: the
            hook fast path; otherwise ``params`` must be given for the torch.func path.
        projection_dim: total size k of the projected features (split over layers in proportion
            to their gradient sizes), or ``None`` for exact (flattened) gradients.
        seed: projection seed (same on every rank).
        kind: projection matrices (see :func:`~lightning_memo.influence.random_matrix`); default
            ``"orthogonal"`` factors for Linear layers and ``"gaussian"`` for the dense path.
        params: ``{name: parameter}`` for the generic path (default: the modules' parameters).
    """

    def __init__(
        self,
        modules: Dict[str, nn.Module],
        projection_dim: Optional[int] = 1024,
        seed: int = 0,
        kind: Optional[str] = None,
        params: Optional[Dict[str, nn.Parameter]] = None,
    ) -> None:
        self.modules = modules
        self.linear = all(isinstance(m, nn.Linear) for m in modules.values())
        if params is None:
            params = {
                f"{n}.{pn}": p
                for n, m in modules.items()
                for pn, p in m.named_parameters(recurse=False)
                if p.requires_grad
            }
        if not params:
            raise ValueError(
                f"Layers {list(modules)} have no trainable parameters; choose layers with weights "
                "that require grad."
            )
        self.params = params
        self.sizes = {n: p.numel() for n, p in params.items()}
        total = sum(self.sizes.values())
        self.total = total
        if projection_dim is not None and projection_dim >= total:
            warnings.warn(
                f"projection_dim={projection_dim} is not smaller than the gradient size {total}; "
                "using exact gradients instead.",
                stacklevel=2,
            )
            projection_dim = None
        self.projection_dim = projection_dim
        self.seed = seed
        self.kind = kind
        self.projectors: Dict[str, Any] = {}
        if projection_dim is not None:
            if self.linear:
                for i, (name, mod) in enumerate(modules.items()):
                    size = mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)
                    k = max(1, int(round(projection_dim * size / total)))
                    self.projectors[name] = KroneckerProjector(
                        mod.out_features,
                        mod.in_features,
                        mod.bias is not None,
                        k,
                        seed * 1000 + i,
                        kind or "orthogonal",
                    )
            else:
                self.projectors["_dense"] = DenseProjector(
                    total, projection_dim, seed, kind or "gaussian"
                )
        self.capture = LinearGradCapture(modules) if self.linear else None
        self.lr_scale: Dict[str, float] = {}

    @property
    def dim(self) -> int:
        """Feature size k."""
        if self.projection_dim is None:
            return self.total
        if self.linear:
            return sum(p.k for p in self.projectors.values())
        return self.projection_dim

    def set_learning_rates(self, lrs: Dict[str, float]) -> None:
        """Scale each layer's block by sqrt(lr) so inner products carry the learning rate
        (per parameter group); ``lrs``: ``{module or param name: lr}``."""
        self.lr_scale = {n: math.sqrt(max(lr, 0.0)) for n, lr in lrs.items()}

    def _param_lr_scale(self, name: str) -> float:
        """sqrt(lr) of a parameter, given by its own name or by its module's name."""
        if name in self.lr_scale:
            return self.lr_scale[name]
        return self.lr_scale.get(name.rsplit(".", 1)[0], 1.0)

    # ------------------------------------------------------------------ linear fast path
    def from_linear_io(
        self, inputs: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor], scale: float = 1.0
    ) -> torch.Tensor:
        """Features (B, k) from each Linear layer's input ``a`` and output-gradient ``g``."""
        parts = []
        for name, mod in self.modules.items():
            a, g = inputs[name], grads[name] * scale
            if name in self.projectors:
                f = self.projectors[name](a, g)
            else:
                w, b = linear_grads_from_io(a, g, mod.bias is not None)
                f = w.reshape(w.shape[0], -1)
                if b is not None:  # same order as KroneckerProjector: [W | b] row-major
                    f = torch.cat([w, b.unsqueeze(2)], dim=2).reshape(w.shape[0], -1)
            parts.append(f * self.lr_scale.get(name, 1.0))
        return torch.cat(parts, dim=1)

    def __call__(
        self, model: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    ) -> torch.Tensor:
        """Features (B, k) of a batch at the model's current weights (weights get no .grad)."""
        if self.linear:
            cap = self.capture
            cap.attach()
            cap.active = True
            try:
                with torch.enable_grad():
                    loss = loss_fn(model, batch)
                    _check_per_sample(loss, batch)
                    outs = [cap.outputs[n] for n in self.modules]
                    grads = torch.autograd.grad(loss.sum(), outs, allow_unused=True)
                g = {
                    n: (gr if gr is not None else torch.zeros_like(o))
                    for n, gr, o in zip(self.modules, grads, outs)
                }
                return self.from_linear_io(dict(cap.inputs), g)
            finally:
                cap.active = False
                cap.clear()
        grads = per_sample_grads(model, self.params, loss_fn, batch)
        flat = torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in self.params], dim=1)
        if self.lr_scale:
            scale = torch.cat(
                [
                    torch.full(
                        (self.sizes[n],),
                        self._param_lr_scale(n),
                        device=flat.device,
                        dtype=flat.dtype,
                    )
                    for n in self.params
                ]
            )
            flat = flat * scale
        return self.projectors["_dense"](flat) if self.projectors else flat


def _check_per_sample(loss: torch.Tensor, batch: Any) -> None:
    if loss.ndim != 1:
        raise ValueError(
            f"The loss function returned shape {tuple(loss.shape)}; TracIn and influence need one "
            "loss per sample (B,). Define `per_sample_loss(self, batch)` on your LightningModule "
            "returning e.g. F.cross_entropy(logits, y, reduction='none'), or pass loss_fn=."
        )


def layer_names(features: GradientFeaturizer) -> List[str]:
    """Names of the differentiated layers, in feature order."""
    return list(features.modules)
