"""Per-sample gradients: ``torch.func`` for any model, and a hook fast path for Linear/Conv2d.

One gradient code path serves TracIn and the influence estimators (math core, torch only).
For a Linear layer with input a and output-gradient g, the per-sample weight gradient is g a^T
summed over sequence positions (bias: g summed), so it is never materialised when projected.
A Conv2d layer (groups=1) is the same thing once its input is unfolded into patches:
a: (B, L, C_in*kh*kw), g: (B, L, C_out) with L output positions, and the weight gradient
(C_out, C_in*kh*kw) is the conv weight gradient reshaped to (C_out, -1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from ..capture import add_forward_hook, recording_allowed

__all__ = [
    "select_parameters",
    "per_sample_grads",
    "LinearGradCapture",
    "LayerGradCapture",
    "SUPPORTED_LAYERS",
    "check_supported_layers",
    "layer_dims",
    "layer_input_rows",
    "layer_output_grad_rows",
    "linear_grads_from_io",
    "FactoredGrads",
]

SUPPORTED_LAYERS: Tuple[type, ...] = (nn.Linear, nn.Conv2d)
"""Layer types of the hook path (Conv2d only with groups=1)."""

SUPPORTED_TEXT = "nn.Linear, nn.Conv2d with groups=1"

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

    Also a Conv2d layer's (groups=1), given the rows :class:`LinearGradCapture` records
    (``a``: (B, L, C_in*kh*kw) patches, ``g``: (B, L, C_out)): the weight gradient comes out as
    (B, C_out, C_in*kh*kw), the conv weight gradient reshaped to (C_out, -1).

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


class FactoredGrads(Mapping):
    """Per-sample gradients ``{param name: (B, *param.shape)}`` of ``nn.Linear`` / ``nn.Conv2d``
    layers, held as their factors and materialised only for the entries that are read.

    ``inputs[layer]`` (B, ..., d_in) and ``grads[layer]`` (B, ..., d_out) as
    :class:`LinearGradCapture` records them; a method that works from the factors (e.g. K-FAC's
    self-influence, :meth:`~lightning_memo.influence.kfac.KFAC.self_influence_from_io`) reads
    them and no (B, d_out, d_in) gradient is ever formed; anything else sees a plain mapping.

    Args:
        modules: ``{layer name: module}``; inputs, grads: the factors per layer name;
        names: the parameter names to expose (``"<layer>.weight"`` / ``"<layer>.bias"``; ``None``:
            all of the layers' trainable parameters).
    """

    def __init__(
        self,
        modules: Dict[str, nn.Module],
        inputs: Dict[str, torch.Tensor],
        grads: Dict[str, torch.Tensor],
        names: Optional[Iterable[str]] = None,
    ) -> None:
        self.modules, self.inputs, self.grads = modules, inputs, grads
        self._owner: Dict[str, Tuple[str, str]] = {}
        for layer, mod in modules.items():
            pre = f"{layer}." if layer else ""
            for pname, p in mod.named_parameters(recurse=False):
                if p.requires_grad:
                    self._owner[pre + pname] = (layer, pname)
        if names is not None:
            names = list(names)
            self._owner = {k: self._owner[k] for k in names if k in self._owner}
        self._cache: Dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._cache:
            layer, _ = self._owner[key]
            mod = self.modules[layer]
            w, b = linear_grads_from_io(self.inputs[layer], self.grads[layer], mod.bias is not None)
            pre = f"{layer}." if layer else ""
            if pre + "weight" in self._owner:
                self._cache[pre + "weight"] = w.reshape(w.shape[0], *mod.weight.shape)
            if b is not None and pre + "bias" in self._owner:
                self._cache[pre + "bias"] = b
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def layers(self) -> List[str]:
        """Layer names whose parameters are all exposed (the factors describe them whole)."""
        out = []
        for layer, mod in self.modules.items():
            pre = f"{layer}." if layer else ""
            want = [pre + n for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if all(k in self._owner for k in want):
                out.append(layer)
        return out


def _is_supported(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Conv2d):
        return mod.groups == 1
    return isinstance(mod, nn.Linear)


def check_supported_layers(modules: Dict[str, nn.Module], fallback: str = "") -> None:
    """Raise ``ValueError`` naming every layer the hook path cannot handle.

    Args:
        modules: ``{name: module}``.
        fallback: extra sentence naming the alternative for other layers.
    """
    bad = {n: m for n, m in modules.items() if not _is_supported(m)}
    if bad:
        desc = ", ".join(
            f"{n!r} ({type(m).__name__}"
            + (f", groups={m.groups}" if isinstance(m, nn.Conv2d) else "")
            + ")"
            for n, m in bad.items()
        )
        raise ValueError(
            f"The layer hook path supports {SUPPORTED_TEXT}; {desc} "
            f"{'is' if len(bad) == 1 else 'are'} not. "
            + (
                fallback
                or "The torch.func path (per_sample_grads) and method='arnoldi' handle any layer; "
                "or choose only Linear/Conv2d layers."
            )
        )


def layer_dims(module: nn.Module) -> Tuple[int, int, bool]:
    """``(d_out, d_in, has_bias)`` of a supported layer; Conv2d: ``d_in = C_in * kh * kw``."""
    check_supported_layers({type(module).__name__: module})
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.out_channels, module.in_channels * kh * kw, module.bias is not None
    return module.out_features, module.in_features, module.bias is not None


def _conv_pads(mod: nn.Conv2d) -> Optional[List[int]]:
    """``F.pad`` widths [w_left, w_right, h_left, h_right] when unfold's symmetric zero padding
    cannot express the conv's padding (string padding, non-zero padding modes); else None."""
    if not isinstance(mod.padding, str) and mod.padding_mode == "zeros":
        return None
    pads: List[int] = []
    for i in (1, 0):  # F.pad starts with the last dimension
        if mod.padding == "valid":
            left = right = 0
        elif mod.padding == "same":
            total = mod.dilation[i] * (mod.kernel_size[i] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = int(mod.padding[i])
        pads += [left, right]
    return pads


def layer_input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer input as rows ``a`` of the Linear form ``y = W a (+ b)``.

    Args:
        module: nn.Linear or nn.Conv2d (groups=1).
        x: the layer input; Linear (B, ..., d_in), Conv2d (B, C_in, H, W).

    Returns:
        Linear: ``x`` itself; Conv2d: unfolded patches (B, L, C_in*kh*kw), L output positions.
    """
    if not isinstance(module, nn.Conv2d):
        return x
    pads = _conv_pads(module)
    padding: Any = module.padding
    if pads is not None:
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
        padding = 0
    cols = F.unfold(
        x,
        kernel_size=module.kernel_size,
        dilation=module.dilation,
        padding=padding,
        stride=module.stride,
    )  # (B, C_in*kh*kw, L)
    return cols.transpose(1, 2)


def layer_output_grad_rows(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """The output-gradient as rows ``g``: Linear (B, ..., d_out) as is; Conv2d (B, C_out, H, W)
    -> (B, H*W, C_out), positions in the order of :func:`layer_input_rows`."""
    if not isinstance(module, nn.Conv2d):
        return grad
    return grad.flatten(2).transpose(1, 2)


class LinearGradCapture:
    """Records, per layer, its input ``a`` and the gradient ``g`` at its output (Linear form).

    Forward hooks keep ``a`` (detached) and attach a tensor hook to the output that stores ``g``
    when the backward pass reaches it. Used for the training step itself (online TracIn) and for
    an extra pass where only the layer outputs are differentiated (``torch.autograd.grad``).

    ``nn.Linear``: ``inputs[name]`` (B, ..., d_in), ``grads[name]`` (B, ..., d_out).
    ``nn.Conv2d`` (groups=1): ``inputs[name]`` = unfolded patches (B, L, C_in*kh*kw) and
    ``grads[name]`` (B, L, C_out), so :func:`linear_grads_from_io` serves both. ``outputs[name]``
    is the raw layer output (Conv2d: (B, C_out, H, W)); a gradient taken w.r.t. it with
    ``torch.autograd.grad`` is turned into rows by :func:`layer_output_grad_rows`.

    Its hooks run before any hook that replaces a layer output (e.g. concept erasure), so ``g`` is
    the gradient at the layer's own output and ``g a^T`` the true weight gradient of the model as it
    runs (see :func:`lightning_memo.capture.add_forward_hook`).

    Args:
        modules: ``{name: nn.Linear | nn.Conv2d}``.
        owner: the callback recording (other callbacks' extra passes are ignored); ``None``
            records every pass.
    """

    def __init__(self, modules: Dict[str, nn.Module], owner: Optional[object] = None) -> None:
        check_supported_layers(modules)
        self.modules = modules
        self.owner = owner
        self.inputs: Dict[str, torch.Tensor] = {}
        self.outputs: Dict[str, torch.Tensor] = {}
        self.grads: Dict[str, torch.Tensor] = {}
        self._handles: List[Any] = []
        self.active = False

    def attach(self) -> LinearGradCapture:
        if not self._handles:
            for name, mod in self.modules.items():
                self._handles.append(add_forward_hook(mod, self._hook(name), "grad"))
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
            if not recording_allowed(self.owner):
                return
            with torch.no_grad():
                self.inputs[name] = layer_input_rows(mod, inputs[0].detach())
            self.outputs[name] = output

            def keep(grad: torch.Tensor) -> None:
                self.grads[name] = layer_output_grad_rows(mod, grad.detach())

            output.register_hook(keep)

        return hook


LayerGradCapture = LinearGradCapture
