"""Per-sample gradients: ``torch.func`` for any model, and a hook fast path for ``nn.Linear``.

One gradient code path serves TracIn and the influence estimators (math core, torch only).
For a Linear layer with input a and output-gradient g, the per-sample weight gradient is g a^T
summed over sequence positions (bias: g summed), so it is never materialised when projected.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = [
    "select_parameters",
    "per_sample_grads",
    "LinearGradCapture",
    "linear_grads_from_io",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> per-sample loss (B,)


def select_parameters(
    model: nn.Module, names: Optional[Iterable[str]] = None
) -> Dict[str, nn.Parameter]:
    """Trainable parameters by name (default: weights and biases of every ``nn.Linear``).

    Raises:
        ValueError: a name that is not a parameter, or nothing trainable selected.
    """
    params = dict(model.named_parameters())
    if names is None:
        chosen = {}
        for mname, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                for pname, p in mod.named_parameters(recurse=False):
                    chosen[f"{mname}.{pname}" if mname else pname] = p
    else:
        chosen = {}
        for n in names:
            if n not in params:
                raise ValueError(
                    f"{n!r} is not a parameter of the model; some names: {list(params)[:8]}."
                )
            chosen[n] = params[n]
    chosen = {n: p for n, p in chosen.items() if p.requires_grad}
    if not chosen:
        raise ValueError(
            "No trainable parameter selected: the chosen layers have no parameters with "
            "requires_grad=True. Choose layers with trainable weights."
        )
    return chosen


def _unsqueeze0(t: Any) -> Any:
    return t.unsqueeze(0) if isinstance(t, torch.Tensor) else t


def per_sample_grads(
    model: nn.Module, params: Dict[str, torch.Tensor], loss_fn: LossFn, batch: Any
) -> Dict[str, torch.Tensor]:
    """Gradient of each sample's loss w.r.t. ``params`` with ``functional_call`` + ``vmap(grad)``.

    Args:
        model: the module (its other parameters and buffers are used as they are).
        params: ``{name: tensor}`` to differentiate (e.g. from :func:`select_parameters`).
        loss_fn: ``(model, batch) -> (B,)`` per-sample losses; called inside vmap on a batch of
            one sample, so it must not mix samples (no batch norm in train mode).
        batch: tensors with a leading batch dimension (tuple, dict or tensor); non-tensors are
            passed through.

    Returns:
        ``{name: (B, *param.shape)}``.
    """
    from torch.func import functional_call, grad, vmap

    detached = {f"model.{k}": v.detach() for k, v in params.items()}
    # functional_call re-parametrises the whole wrapper while loss_fn runs, so the loss sees the
    # differentiated parameters however it reaches the model (self(x), self.net(x), a method)
    wrapper = _LossModule(model, loss_fn)

    def one(p: Dict[str, torch.Tensor], sample: Any) -> torch.Tensor:
        loss = functional_call(wrapper, p, (tree_map(_unsqueeze0, sample),))
        return loss.reshape(-1)[0]

    in_dims = tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, batch)
    out = vmap(grad(one), in_dims=(None, in_dims))(detached, batch)
    return {k[len("model.") :]: v for k, v in out.items()}


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``: lets functional_call cover the whole loss."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def linear_grads_from_io(
    a: torch.Tensor, g: torch.Tensor, bias: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Materialised per-sample gradients of a Linear layer from its input and output-gradient.

    Args:
        a: (B, ..., d_in) layer input; g: (B, ..., d_out) gradient of the summed loss at the output.
        bias: whether the layer has a bias.

    Returns:
        weight grads (B, d_out, d_in) = sum over positions of g a^T; bias grads (B, d_out) or None.
    """
    b = a.shape[0]
    a3 = a.reshape(b, -1, a.shape[-1])
    g3 = g.reshape(b, -1, g.shape[-1])
    w = torch.einsum("bto,bti->boi", g3, a3)
    return w, (g3.sum(dim=1) if bias else None)


class LinearGradCapture:
    """Records, per ``nn.Linear``, its input ``a`` and the gradient ``g`` at its output.

    Forward hooks keep ``a`` (detached) and attach a tensor hook to the output that stores ``g``
    when the backward pass reaches it. Used for the training step itself (online TracIn) and for
    an extra pass where only the layer outputs are differentiated (``torch.autograd.grad``).

    Args:
        modules: ``{name: nn.Linear}``.
    """

    def __init__(self, modules: Dict[str, nn.Module]) -> None:
        bad = [n for n, m in modules.items() if not isinstance(m, nn.Linear)]
        if bad:
            raise ValueError(
                f"The Linear fast path needs nn.Linear layers; {bad} are not. Use the torch.func "
                "path (per_sample_grads) for other layers."
            )
        self.modules = modules
        self.inputs: Dict[str, torch.Tensor] = {}
        self.outputs: Dict[str, torch.Tensor] = {}
        self.grads: Dict[str, torch.Tensor] = {}
        self._handles: List[Any] = []
        self.active = False

    def attach(self) -> LinearGradCapture:
        if not self._handles:
            for name, mod in self.modules.items():
                self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> LinearGradCapture:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()
        self.grads.clear()

    def _hook(self, name: str) -> Callable:
        def hook(mod: nn.Module, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
            if not self.active or not torch.is_grad_enabled() or not output.requires_grad:
                return
            self.inputs[name] = inputs[0].detach()
            self.outputs[name] = output

            def keep(grad: torch.Tensor) -> None:
                self.grads[name] = grad.detach()

            output.register_hook(keep)

        return hook
