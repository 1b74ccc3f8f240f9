"""Capture pooled hidden features of named layers into per-sample buffers keyed by sample index.

Knows modules, hooks and sample indices; nothing of PSMI or influence.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import itertools
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .exceptions import LayerNotFoundError

__all__ = [
    "FeatureCapture",
    "pool",
    "resolve_layers",
    "resolve_parameters",
    "POOLINGS",
    "LayerSpec",
    "Pooling",
    "add_forward_hook",
    "HOOK_STAGES",
    "exclusive_pass",
    "recording_allowed",
    "eval_mode",
    "extra_pass",
]

# ---------------------------------------------------------------------- hook order
HOOK_STAGES = ("grad", "modify", "observe")
"""Order of our forward hooks on one module, whatever order the callbacks registered them in:
``"grad"`` hooks see the layer's own output (gradient capture: d loss / d output, times the
input), ``"modify"`` hooks may replace the output (concept erasure), ``"observe"`` hooks see the
output the rest of the model receives (feature capture)."""

_DISPATCHERS: weakref.WeakKeyDictionary[nn.Module, _Dispatcher] = weakref.WeakKeyDictionary()
_SEQ = itertools.count()


class _Dispatcher:
    """One forward hook per module that runs our hooks sorted by (stage, registration order)."""

    def __init__(self, module: nn.Module) -> None:
        self.entries: List[Tuple[int, int, Callable]] = []
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        for _, _, fn in list(self.entries):
            res = fn(module, inputs, output)
            if res is not None:
                output = res
        return output


class OrderedHandle:
    """Removes one hook added with :func:`add_forward_hook` (idempotent)."""

    def __init__(self, module: nn.Module, entry: Tuple[int, int, Callable]) -> None:
        self._module = weakref.ref(module)
        self._entry = entry

    def remove(self) -> None:
        module = self._module()
        disp = _DISPATCHERS.get(module) if module is not None else None
        if disp is None or self._entry not in disp.entries:
            return
        disp.entries.remove(self._entry)
        if not disp.entries:
            disp.handle.remove()
            del _DISPATCHERS[module]


def add_forward_hook(module: nn.Module, hook: Callable, stage: str) -> OrderedHandle:
    """Register ``hook(module, inputs, output) -> None | new output`` at ``stage`` of
    :data:`HOOK_STAGES`, so hook order never depends on which callback registered first."""
    if stage not in HOOK_STAGES:
        raise ValueError(f"stage={stage!r}: use one of {HOOK_STAGES}.")
    disp = _DISPATCHERS.get(module)
    if disp is None:
        disp = _DISPATCHERS[module] = _Dispatcher(module)
    entry = (HOOK_STAGES.index(stage), next(_SEQ), hook)
    disp.entries.append(entry)
    disp.entries.sort(key=lambda e: e[:2])
    return OrderedHandle(module, entry)


# ---------------------------------------------------------------------- extra passes
_PASS_OWNERS: List[object] = []


@contextlib.contextmanager
def exclusive_pass(owner: object) -> Iterator[None]:
    """Mark the forward/backward passes run inside as ``owner``'s extra pass: the recorders of
    every other owner (feature capture, gradient capture, eraser fitting) ignore them."""
    _PASS_OWNERS.append(owner)
    try:
        yield
    finally:
        _PASS_OWNERS.pop()


def recording_allowed(owner: Optional[object]) -> bool:
    """Whether a recorder of ``owner`` may record now: outside extra passes, inside its own, or
    always for ``owner=None`` (standalone use of the math core)."""
    return owner is None or not _PASS_OWNERS or _PASS_OWNERS[-1] is owner


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside, then every submodule gets back its *own* ``training`` flag
    (``model.train(was_training)`` would switch on dropout the user left off)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in modes:
            m.training = flag


@contextlib.contextmanager
def extra_pass(owner: object, model: nn.Module) -> Iterator[nn.Module]:
    """An extra pass of one callback: eval mode (modes restored per module), invisible to the
    other callbacks' recorders (:func:`exclusive_pass`), and neutral for the global CPU RNG
    (iterating a DataLoader draws its base seed from it, which would change the next epoch's
    shuffle), so training is the same with and without the callback."""
    rng = torch.get_rng_state()
    try:
        with exclusive_pass(owner), eval_mode(model):
            yield model
    finally:
        torch.set_rng_state(rng)


POOLINGS = ("mean", "last", "first", "flatten")
LayerSpec = Union[str, nn.Module, Sequence[Union[str, nn.Module]]]
Pooling = Union[str, Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]]


def check_pooling(pooling: Pooling) -> Pooling:
    """Validate a pooling argument (a name of ``POOLINGS`` or a callable)."""
    if callable(pooling) or pooling in POOLINGS:
        return pooling
    raise ValueError(
        f"pooling={pooling!r} is not supported; use one of {', '.join(POOLINGS)} or a callable "
        "(output: (B, ..., d), mask: (B, T) or None) -> (B, d)."
    )


def layers_key(layers: LayerSpec) -> str:
    """A stable text form of a ``layers`` argument (for callback state keys): ``"net.3"`` and
    ``["net.3"]`` give the same key; modules are named by their class."""
    if layers is None:
        return "None"
    items = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
    return str([x if isinstance(x, str) else type(x).__name__ for x in items])


def resolve_layers(model: nn.Module, layers: LayerSpec) -> Dict[str, nn.Module]:
    """Map layer names, globs or modules to ``{name: module}`` in the order given.

    Raises:
        LayerNotFoundError: a name or glob matches nothing (lists the closest names).
    """
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    named = dict(model.named_modules())
    by_id = {id(m): n for n, m in named.items()}
    out: Dict[str, nn.Module] = {}
    for spec in layers:
        if isinstance(spec, nn.Module):
            if id(spec) not in by_id:
                raise LayerNotFoundError(
                    f"The module {type(spec).__name__} given in layers= is not part of the model; "
                    "pass a submodule of the LightningModule (or its name)."
                )
            name = by_id[id(spec)] or "<root>"
            out[name] = spec
            continue
        if not isinstance(spec, str):
            raise TypeError(f"layers entries must be names or modules; got {type(spec).__name__}.")
        if spec in named:
            out[spec or "<root>"] = named[spec]
            continue
        hits = [n for n in named if n and fnmatch.fnmatchcase(n, spec)]
        if not hits:
            raise LayerNotFoundError.for_name(spec, named.keys())
        for n in hits:
            out[n] = named[n]
    if not out:
        raise LayerNotFoundError("layers= is empty: name at least one layer of the model.")
    return out


def resolve_parameters(model: nn.Module, patterns: Union[str, Sequence[str]]) -> List[str]:
    """Parameter names of ``model`` matching each name or glob, in the order given, once each.

    Args:
        model: the model owning the parameters.
        patterns: names from ``model.named_parameters()`` or ``fnmatch`` globs (``"head.*"``,
            ``"net.4.b*"``); a single string is one pattern.

    Raises:
        LayerNotFoundError: a pattern matches no parameter (lists the closest names), or
            ``patterns`` is empty.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [n for n, _ in model.named_parameters()]
    out: List[str] = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            close = difflib.get_close_matches(pat, names, n=5, cutoff=0.3)
            hint = (
                f"Closest names: {', '.join(close)}."
                if close
                else f"The model's parameters include: {', '.join(names[:8]) or 'none'}."
            )
            raise LayerNotFoundError(
                f"No parameter matches {pat!r}. {hint} Pass names from "
                "`dict(model.named_parameters())` (globs such as 'head.*' are allowed). The model "
                f"has {len(names)} named parameters."
            )
        out += [n for n in hits if n not in out]
    if not out:
        raise LayerNotFoundError("parameters= is empty: name at least one parameter of the model.")
    return out


def pool(output: torch.Tensor, how: Pooling, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pool a layer output ``(B, ..., d)`` to ``(B, d)``.

    Args:
        output: (B, d) (returned as is, ``flatten`` aside), (B, T, d) sequences (features last),
            or (B, C, H, W) conv maps (channels first: ``"mean"`` averages over H and W).
        how: ``"mean"`` (mask-aware), ``"last"`` (last non-padding position, left or right padding),
            ``"first"`` (first non-padding position), ``"flatten"`` or a callable.
        mask: (B, T) with nonzero for real tokens, or ``None`` (all positions real).
    """
    if callable(how):
        return how(output, mask)
    b = output.shape[0]
    if how == "flatten":
        return output.reshape(b, -1)
    if output.ndim == 2:
        return output
    if output.ndim == 4:  # conv feature map (B, C, H, W): channels first
        if how == "mean":
            return output.mean(dim=(2, 3))
        raise ValueError(
            f"pooling={how!r} on a (B, C, H, W) feature map has no token order; use 'mean' "
            "(average over H, W), 'flatten' or a callable."
        )
    seq = output.reshape(b, -1, output.shape[-1])  # (B, T, d)
    if mask is not None:
        mask = mask.reshape(b, -1).to(seq.device)
        if mask.shape[1] != seq.shape[1]:
            raise ValueError(
                f"The attention mask has {mask.shape[1]} positions but the layer output has "
                f"{seq.shape[1]}; pass mask_key=None or a pooling callable for this layer."
            )
    if how == "mean":
        if mask is None:
            return seq.mean(dim=1)
        w = mask.to(seq.dtype).unsqueeze(-1)
        return (seq * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)
    if how in ("last", "first"):
        t = seq.shape[1]
        if mask is None:
            pos = torch.full((b,), t - 1 if how == "last" else 0, device=seq.device)
        else:
            real = (mask != 0).to(torch.int8)
            if how == "first":
                pos = real.argmax(dim=1)
            else:
                pos = t - 1 - real.flip(1).argmax(dim=1)
        return seq[torch.arange(b, device=seq.device), pos]
    raise ValueError(f"pooling={how!r} is not supported; use one of {', '.join(POOLINGS)}.")


class FeatureCapture:
    """Forward hooks on named layers writing pooled outputs into ``(N, d)`` buffers by index.

    Usage::

        cap = FeatureCapture(model, ["encoder.layer.5"], pooling="last", num_samples=len(ds))
        with cap:                       # hooks removed in `finally`
            cap.arm(indices, mask)      # record the next forward passes for these samples
            model(x)
            cap.disarm()
        feats = cap.buffers["encoder.layer.5"][cap.seen["encoder.layer.5"]]

    Args:
        model: the model owning the layers.
        layers: names, globs or modules (see :func:`resolve_layers`).
        pooling: see :func:`pool`.
        num_samples: ``N``; buffers are allocated at the first record (``d`` unknown before).
        dtype: buffer dtype (floating).
        device: buffer device (CPU by default, so ``N x d`` never occupies accelerator memory).
        owner: the callback recording; other callbacks' extra passes are not recorded
            (:func:`exclusive_pass`). ``None`` records every pass.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec,
        pooling: Pooling = "mean",
        num_samples: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        owner: Optional[object] = None,
    ) -> None:
        if not dtype.is_floating_point:
            raise ValueError(
                f"feature dtype {dtype} is not a floating dtype; use torch.float32, float64, "
                "float16 or bfloat16."
            )
        self.owner = owner
        self.modules = resolve_layers(model, layers)
        self.pooling = check_pooling(pooling)
        self.num_samples = num_samples
        self.dtype = dtype
        self.device = torch.device(device)
        self.buffers: Dict[str, torch.Tensor] = {}
        self.seen: Dict[str, torch.Tensor] = {}
        self.repeated: Dict[str, List[int]] = {}  # indices recorded twice since reset()
        self._handles: List[OrderedHandle] = []
        self._indices: Optional[torch.Tensor] = None
        self._mask: Optional[torch.Tensor] = None

    @property
    def names(self) -> List[str]:
        """Resolved layer names, in order."""
        return list(self.modules)

    # -------------------------------------------------------------- hooks
    def attach(self) -> FeatureCapture:
        """Register the forward hooks (idempotent)."""
        if not self._handles:
            for name, module in self.modules.items():
                self._handles.append(add_forward_hook(module, self._make_hook(name), "observe"))
        return self

    def remove(self) -> None:
        """Remove every hook this object registered."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.disarm()

    def __enter__(self) -> FeatureCapture:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def arm(self, indices: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Record the following forward passes for samples ``indices: (B,)``; ``mask: (B, T)``."""
        self._indices = indices.detach().to(self.device, torch.long)
        self._mask = mask

    def disarm(self) -> None:
        """Stop recording (hooks stay registered)."""
        self._indices = None
        self._mask = None

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if self._indices is None or not recording_allowed(self.owner):
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, torch.Tensor):
                out = getattr(out, "last_hidden_state", None)
                if not isinstance(out, torch.Tensor):
                    raise TypeError(
                        f"Layer {name!r} returned {type(output).__name__}; capture needs a tensor "
                        "(or a tuple whose first element is one). Choose a submodule that outputs "
                        "a tensor."
                    )
            with torch.no_grad():
                self.record(name, self._indices, pool(out.detach(), self.pooling, self._mask))

        return hook

    # -------------------------------------------------------------- buffers
    def allocate(self, num_samples: int) -> None:
        """Set ``N`` and drop buffers of another size."""
        if num_samples != self.num_samples:
            self.buffers.clear()
            self.seen.clear()
        self.num_samples = int(num_samples)

    def record(self, name: str, indices: torch.Tensor, pooled: torch.Tensor) -> None:
        """Write ``pooled: (B, d)`` at rows ``indices: (B,)`` of layer ``name``'s buffer."""
        if pooled.ndim != 2 or pooled.shape[0] != indices.shape[0]:
            raise ValueError(
                f"Layer {name!r} produced pooled features of shape {tuple(pooled.shape)} for a "
                f"batch of {indices.shape[0]} samples; the layer must keep the batch as its first "
                "dimension (choose another layer or a pooling callable)."
            )
        if self.num_samples is None:
            raise RuntimeError("FeatureCapture.allocate(num_samples) must run before recording.")
        buf = self.buffers.get(name)
        if buf is not None and buf.shape[1] != pooled.shape[1] and bool(self.seen[name].any()):
            raise ValueError(
                f"Layer {name!r} produced pooled features of width {pooled.shape[1]} but earlier "
                f"batches of this pass gave width {buf.shape[1]}: the width must not change within "
                "an epoch (pooling='flatten' on variable-length outputs does this). Use "
                "pooling='mean', 'first' or 'last', pad inputs to one length, or a pooling "
                "callable with a fixed output width."
            )
        if buf is None or buf.shape[1] != pooled.shape[1]:
            buf = torch.zeros(
                self.num_samples, pooled.shape[1], dtype=self.dtype, device=self.device
            )
            self.buffers[name] = buf
            self.seen[name] = torch.zeros(self.num_samples, dtype=torch.bool, device=self.device)
        seen = self.seen[name]
        again = indices[seen[indices]]
        if again.numel():  # recorded twice in one pass: the later batch overwrote the earlier
            self.repeated.setdefault(name, []).extend(again.tolist()[:10])
        buf[indices] = pooled.to(device=self.device, dtype=self.dtype)
        seen[indices] = True

    def reset(self) -> None:
        """Forget which samples were seen (buffers are kept and overwritten)."""
        for s in self.seen.values():
            s.zero_()
        self.repeated = {}

    def rows(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Indices ``(n,)`` and features ``(n, d)`` of the samples seen for layer ``name``."""
        if name not in self.buffers:
            empty = torch.zeros(0, 0, dtype=self.dtype, device=self.device)
            return torch.zeros(0, dtype=torch.long, device=self.device), empty
        idx = torch.nonzero(self.seen[name]).flatten()
        return idx, self.buffers[name][idx]

    def missing(self, name: str) -> int:
        """Number of samples in ``[0, N)`` never seen for layer ``name``."""
        if name not in self.seen:
            return int(self.num_samples or 0)
        return int((~self.seen[name]).sum())
