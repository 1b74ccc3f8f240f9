"""Gradient features: one (projected) per-sample gradient vector per sample, for TracIn and
influence alike (math core, torch only).

``GradientFeaturizer`` turns a batch into ``(B, k)`` rows: for ``nn.Linear`` and ``nn.Conv2d``
layers from the layer inputs (conv: unfolded patches) and output-gradients (LoGra projection,
exact factors, or the exact flattened gradient), for any other parameters from ``torch.func``
per-sample gradients (dense projection, or exact).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .grads import (
    SUPPORTED_LAYERS,
    FactoredGrads,
    LinearGradCapture,
    layer_dims,
    layer_output_grad_rows,
    linear_grads_from_io,
    per_sample_grads,
)
from .projection import DenseProjector, KroneckerProjector
from .tracin import row_dot, row_sq_norm

__all__ = ["GradientFeaturizer"]


class GradientFeaturizer:
    """Per-sample gradient features of chosen layers or parameters.

    Args:
        modules: ``{name: module}`` whose parameters are differentiated. All ``nn.Linear`` /
            ``nn.Conv2d`` (groups=1): the
            hook fast path; otherwise ``params`` must be given for the torch.func path.
        projection_dim: total size k of the projected features (split over layers in proportion
            to their gradient sizes), or ``None`` for exact (flattened) gradients.
        seed: projection seed (same on every rank).
        kind: projection matrices (see :func:`~lightning_memo.influence.random_matrix`); default
            ``"orthogonal"`` factors for Linear layers and ``"gaussian"`` for the dense path.
        params: ``{name: parameter}`` for the generic path (default: the modules' parameters).
        factored: with ``projection_dim=None`` and Linear layers, store exact gradients as the
            factors ``[a | g]`` per layer (``d_in + 1 + d_out`` numbers instead of
            ``(d_in + 1) * d_out``; inner products via :func:`~lightning_memo.influence.row_dot`).
            Needs inputs without a sequence dimension; ``False`` flattens ``g a^T`` instead.
        hooks: ``False`` forces the ``torch.func`` path even for Linear / Conv2d layers.
        owner: the callback using the features (its hooks ignore other callbacks' extra passes).
    """

    def __init__(
        self,
        modules: Dict[str, nn.Module],
        projection_dim: Optional[int] = 1024,
        seed: int = 0,
        kind: Optional[str] = None,
        params: Optional[Dict[str, nn.Parameter]] = None,
        factored: bool = True,
        hooks: bool = True,
        owner: Optional[object] = None,
    ) -> None:
        self.modules = modules
        self.linear = hooks and all(_hook_layer(m) for m in modules.values())
        if params is not None:  # a subset of the layers' parameters: torch.func path
            mine = [p for m in modules.values() for p in m.parameters(recurse=False)]
            full = {id(p) for p in mine if p.requires_grad}
            self.linear = self.linear and {id(p) for p in params.values()} == full
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
                    d_out, d_in, bias = layer_dims(mod)
                    self.projectors[name] = KroneckerProjector(
                        d_out,
                        d_in,
                        bias,
                        k,
                        seed * 1000 + i,
                        kind or "orthogonal",
                    )
            else:
                self.projectors["_dense"] = DenseProjector(
                    total, projection_dim, seed, kind or "gaussian"
                )
        self.capture = LinearGradCapture(modules, owner) if self.linear else None
        self.lr_scale: Dict[str, float] = {}
        self.layout: Optional[List[Tuple[int, int]]] = None
        if (
            factored
            and projection_dim is None
            and self.linear
            and all(isinstance(m, nn.Linear) for m in modules.values())
        ):  # rank-one per-sample gradients (conv gradients sum over positions: not rank one)
            self.layout = [
                (m.in_features + (m.bias is not None), m.out_features) for m in modules.values()
            ]

    @property
    def dim(self) -> int:
        """Feature size k."""
        if self.layout is not None:
            return sum(a + g for a, g in self.layout)
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
        """Features (B, k) from each Linear layer's input ``a`` and output-gradient ``g``.

        With projections (the per-step path of online TracIn) every layer writes its block into
        one (B, k) buffer, ``scale`` and sqrt(lr) folded into the projection of ``a``: three
        kernels per layer (see :meth:`KroneckerProjector.project`).
        """
        if self.layout is None and self.projectors and "_dense" not in self.projectors:
            first = inputs[next(iter(self.modules))]
            dt = torch.promote_types(first.dtype, grads[next(iter(self.modules))].dtype)
            out = torch.empty(first.shape[0], self.dim, dtype=dt, device=first.device)
            s = 0
            for name in self.modules:
                proj = self.projectors[name]
                c = scale * self.lr_scale.get(name, 1.0)
                proj.project(inputs[name], grads[name], c, out=out[:, s : s + proj.k])
                s += proj.k
            return out
        parts = []
        for name, mod in self.modules.items():
            a, g = inputs[name], grads[name] * scale
            if self.layout is not None:
                parts.append(self._factors(name, mod, a, g))
                continue
            if name in self.projectors:
                f = self.projectors[name](a, g)
            else:
                w, b = linear_grads_from_io(a, g, mod.bias is not None)
                f = w.reshape(w.shape[0], -1)
                if b is not None:  # same order as KroneckerProjector: [W | b] row-major
                    f = torch.cat([w, b.unsqueeze(2)], dim=2).reshape(w.shape[0], -1)
            parts.append(f * self.lr_scale.get(name, 1.0))
        return torch.cat(parts, dim=1)

    def _factors(self, name: str, mod: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Exact factored row ``[a | 1 | sqrt(lr) g]`` of one layer: (B, d_in + bias + d_out)."""
        if a.ndim != 2:
            raise ValueError(
                f"Layer {name!r} received input of shape {tuple(a.shape)}: the exact factored "
                "gradient store needs (batch, features) inputs. For sequence models pass a "
                "projection_dim, or factored=False for exact flattened gradients."
            )
        cols = [a]
        if mod.bias is not None:
            cols.append(torch.ones_like(a[:, :1]))
        cols.append(g * self.lr_scale.get(name, 1.0))
        return torch.cat(cols, dim=1)

    def sq_norms_from_linear_io(
        self, inputs: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor], scale: float = 1.0
    ) -> torch.Tensor:
        """(B,) float64 squared norms of the per-sample gradients (times each layer's lr, as the
        features carry sqrt(lr)), summed over the layers: exact for a layer that sees one row
        per sample, ``(||a||^2 + bias) ||scale g||^2`` (its gradient ``g [a; 1]^T`` is rank
        one), cheaper than any projection; for a layer with positions (sequences, conv patches)
        the squared norm of its projected block (exact without a projection)."""
        rows = [n for n in self.modules if inputs[n].ndim == 2 and grads[n].ndim == 2]
        if len(rows) < len(self.modules) and "_dense" in self.projectors:  # not per layer
            return self.self_products(self.from_linear_io(inputs, grads, scale).double())
        total: Optional[torch.Tensor] = None
        exact: Optional[torch.Tensor] = None  # the row layers, one fused multiply-add each
        for name, mod in self.modules.items():
            a, g = inputs[name], grads[name]
            c = scale * self.lr_scale.get(name, 1.0)
            if name in rows:
                dt = torch.promote_types(torch.promote_types(a.dtype, g.dtype), torch.float32)
                a, g = a.to(dt), g.to(dt)  # half-precision captures: sums in float32
                na = torch.linalg.vecdot(a, a)
                if mod.bias is not None:
                    na.add_(1.0)
                ng = torch.linalg.vecdot(g, g)
                if exact is None:
                    exact = na.mul_(ng).mul_(c * c)
                else:
                    exact = exact.addcmul_(na, ng, value=c * c)
                continue
            if name in self.projectors:
                s = self.projectors[name].project(a, g, c).square().sum(1, dtype=torch.float64)
            else:
                w, b = linear_grads_from_io(a, g * c, mod.bias is not None)
                s = w.square().sum(dim=(1, 2), dtype=torch.float64)
                if b is not None:
                    s = s + b.square().sum(1, dtype=torch.float64)
            total = s if total is None else total + s
        if exact is not None:
            total = exact.double() if total is None else total + exact.double()
        assert total is not None
        return total

    def self_products(self, feats: torch.Tensor) -> torch.Tensor:
        """Squared gradient norm of each row of ``feats: (B, k)`` -> (B,) float64."""
        return row_sq_norm(feats, self.layout)

    def pair_products(self, q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Gradient inner products of rows ``q: (n, k)`` and ``t: (m, k)`` -> (n, m)."""
        return row_dot(q, t, self.layout)

    def grad_dict(
        self,
        model: nn.Module,
        batch: Any,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        lazy: bool = False,
    ) -> Mapping[str, torch.Tensor]:
        """Exact per-sample gradients ``{param name: (B, *param.shape)}`` of a batch at the
        model's current weights (hooks for Linear layers, torch.func otherwise).

        ``lazy=True`` on the hook path returns a :class:`FactoredGrads` mapping: the layers'
        inputs and output-gradients, materialised per entry only when read (methods that work
        from the factors, e.g. K-FAC self-influence, never form the (B, d_out, d_in) tensors)."""
        if not self.linear:
            return per_sample_grads(model, self.params, loss_fn, batch)
        inputs, grads = self._linear_io(model, batch, loss_fn)
        if lazy:
            return FactoredGrads(self.modules, inputs, grads, names=self.params)
        out: Dict[str, torch.Tensor] = {}
        for name, mod in self.modules.items():
            w, b = linear_grads_from_io(inputs[name], grads[name], mod.bias is not None)
            out[f"{name}.weight" if name else "weight"] = w.reshape(w.shape[0], *mod.weight.shape)
            if b is not None:
                out[f"{name}.bias" if name else "bias"] = b
        return {k: v for k, v in out.items() if k in self.params}

    def _linear_io(
        self, model: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Inputs and output-gradients of every Linear layer for one batch (no weight .grad)."""
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
                n: layer_output_grad_rows(
                    self.modules[n], gr if gr is not None else o.new_zeros(o.shape)
                )
                for n, gr, o in zip(self.modules, grads, outs)
            }
            return dict(cap.inputs), g
        finally:
            cap.active = False
            cap.clear()

    def __call__(
        self, model: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    ) -> torch.Tensor:
        """Features (B, k) of a batch at the model's current weights (weights get no .grad)."""
        if self.linear:
            return self.from_linear_io(*self._linear_io(model, batch, loss_fn))
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


def _hook_layer(m: nn.Module) -> bool:
    """Whether ``m`` takes the hook fast path: nn.Linear, or nn.Conv2d with groups=1."""
    return isinstance(m, SUPPORTED_LAYERS) and getattr(m, "groups", 1) == 1
