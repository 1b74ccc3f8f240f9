"""Capture pooled hidden features of named layers into per-sample buffers keyed by sample index.

Knows modules, hooks and sample indices; nothing of PSMI or influence.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import fnmatch
import functools
import itertools
import re
import weakref
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .exceptions import LayerNotFoundError

__all__ = [
    "FeatureCapture",
    "pool",
    "resolve_layers",
    "resolve_parameters",
    "match_names",
    "is_input_layer",
    "POOLINGS",
    "INPUT_SUFFIX",
    "LayerSpec",
    "Pooling",
    "PoolingSpec",
    "OutputKey",
    "select_output",
    "replace_output",
    "layer_pooling",
    "pooling_config",
    "add_forward_hook",
    "add_input_hook",
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


class _InputDispatcher:
    """One forward pre-hook per module that runs our input hooks sorted by (stage, registration
    order) on the module's first input: the first positional argument, else the first tensor
    keyword argument (e.g. ``hidden_states=``)."""

    def __init__(self, module: nn.Module) -> None:
        self.entries: List[Tuple[int, int, Callable]] = []
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if args:
            where: Any = 0
            x = args[0]
        else:
            where = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
            x = kwargs[where] if where is not None else None
        new = x
        for _, _, fn in list(self.entries):
            res = fn(module, new)
            if res is not None:
                new = res
        if new is x:
            return None
        if where == 0:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, where: new}


_DISPATCHERS: Dict[str, weakref.WeakKeyDictionary] = {
    "output": weakref.WeakKeyDictionary(),
    "input": weakref.WeakKeyDictionary(),
}
_DISPATCHER_TYPES = {"output": _Dispatcher, "input": _InputDispatcher}


class OrderedHandle:
    """Removes one hook added with :func:`add_forward_hook` / :func:`add_input_hook`
    (idempotent)."""

    def __init__(
        self, module: nn.Module, entry: Tuple[int, int, Callable], kind: str = "output"
    ) -> None:
        self._module = weakref.ref(module)
        self._entry = entry
        self._kind = kind

    def remove(self) -> None:
        module = self._module()
        table = _DISPATCHERS[self._kind]
        disp = table.get(module) if module is not None else None
        if disp is None or self._entry not in disp.entries:
            return
        disp.entries.remove(self._entry)
        if not disp.entries:
            disp.handle.remove()
            del table[module]


def _add_ordered(module: nn.Module, hook: Callable, stage: str, kind: str) -> OrderedHandle:
    if stage not in HOOK_STAGES:
        raise ValueError(f"stage={stage!r}: use one of {HOOK_STAGES}.")
    table = _DISPATCHERS[kind]
    disp = table.get(module)
    if disp is None:
        disp = table[module] = _DISPATCHER_TYPES[kind](module)
    entry = (HOOK_STAGES.index(stage), next(_SEQ), hook)
    disp.entries.append(entry)
    disp.entries.sort(key=lambda e: e[:2])
    return OrderedHandle(module, entry, kind)


def add_forward_hook(module: nn.Module, hook: Callable, stage: str) -> OrderedHandle:
    """Register ``hook(module, inputs, output) -> None | new output`` at ``stage`` of
    :data:`HOOK_STAGES`, so hook order never depends on which callback registered first."""
    return _add_ordered(module, hook, stage, "output")


def add_input_hook(module: nn.Module, hook: Callable, stage: str) -> OrderedHandle:
    """Register ``hook(module, x) -> None | new x`` on the module's first input ``x`` (a forward
    pre-hook; ``x`` is ``None`` when the module receives no tensor) at ``stage`` of
    :data:`HOOK_STAGES`: ``"modify"`` hooks may replace the input, ``"observe"`` hooks see the
    input the module receives. Its forward hooks (``inputs``) see the replaced input too."""
    return _add_ordered(module, hook, stage, "input")


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


class _StopForward(Exception):
    """Raised by a :class:`FeatureCapture` hook armed with ``stop=True`` once every one of its
    layers has recorded the batch: the rest of the forward pass (the layers after the deepest
    captured one, the head) is skipped. :meth:`FeatureCapture.forward` catches it.

    A plain ``Exception`` subclass, not a ``RuntimeError`` / ``ValueError``: the forward wrappers
    that turn those into clearer errors let it through. A model whose ``forward`` catches every
    ``Exception`` would swallow it (the pass then simply runs to the end)."""


POOLINGS = ("mean", "last", "first", "flatten")
INPUT_SUFFIX = ":input"
"""Suffix of a layer name that selects the layer's input instead of its output
(``"classifier:input"``: what the classifier receives)."""
LayerSpec = Union[str, nn.Module, Sequence[Union[str, nn.Module]]]
Pooling = Union[str, Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]]
PoolingSpec = Union[Pooling, Mapping[str, Pooling]]
OutputKey = Union[int, str, None]


def check_pooling(pooling: PoolingSpec, allowed: Sequence[str] = POOLINGS) -> PoolingSpec:
    """Validate a pooling argument: a name of ``allowed`` (default :data:`POOLINGS`), a callable,
    or a dict ``{layer name or glob: pooling}`` of those (per-layer pooling)."""
    if isinstance(pooling, Mapping):
        for key, how in pooling.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"pooling keys must be layer names or globs; got {type(key).__name__} {key!r}."
                )
            _check_one(how, allowed, f"pooling[{key!r}]")
        return dict(pooling)
    return _check_one(pooling, allowed, "pooling")


def _check_one(how: Any, allowed: Sequence[str], arg: str) -> Pooling:
    if callable(how) or (isinstance(how, str) and how in allowed):
        return how
    raise ValueError(
        f"{arg}={how!r} is not supported; use one of {', '.join(allowed)} or a callable "
        "(output: (B, ..., d), mask: (B, T) or None) -> (B, d)."
    )


def layers_key(layers: LayerSpec) -> str:
    """A stable text form of a ``layers`` argument (for callback state keys): ``"net.3"`` and
    ``["net.3"]`` give the same key; modules are named by their class."""
    if layers is None:
        return "None"
    items = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
    return str([x if isinstance(x, str) else type(x).__name__ for x in items])


# ---------------------------------------------------------------------- names and globs
def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _translate_segment(seg: str) -> str:
    """Regex of one dotted segment of a layer glob: ``*`` / ``?`` stay inside the segment,
    ``[...]`` is a character class (``[!...]`` negated), ``**`` crosses dots."""
    out, i = [], 0
    while i < len(seg):
        c = seg[i]
        if seg.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append(r"[^.]*")
            i += 1
        elif c == "?":
            out.append(r"[^.]")
            i += 1
        elif c == "[":
            j = i + 1
            j += seg[j : j + 1] == "!"
            j += seg[j : j + 1] == "]"
            j = seg.find("]", j)
            if j < 0:
                out.append(re.escape(c))
                i += 1
                continue
            body = seg[i + 1 : j].replace("\\", "\\\\")
            if body.startswith("!"):
                body = "^" + body[1:]
            elif body.startswith("^"):
                body = "\\" + body
            out.append(f"[{body}]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


@functools.lru_cache(maxsize=512)
def _layer_regex(pattern: str, suffix: bool) -> re.Pattern:
    """Compiled layer glob: ``*``, ``?`` and ``[...]`` match within one dotted segment; a ``**``
    segment matches any number of segments (``"**.query"``, ``"a.**.b"``; a last ``**`` at least
    one: ``"encoder.**"`` is everything below ``encoder``). ``suffix``: the
    pattern may match the dotted ending of a name (``"encoder.layer.*"`` finds
    ``"model.bert.encoder.layer.0"``)."""
    if pattern == "**":
        return re.compile(r".+")
    parts, need_sep = [], False
    segs = pattern.split(".")
    for k, seg in enumerate(segs):
        if seg == "**":
            if k == 0:  # "**.x": x at any depth
                parts.append(r"(?:[^.]+\.)*")
            else:  # "a.**.x": zero or more segments between; "a.**": everything below a
                parts.append(r"(?:\.[^.]+)+" if k == len(segs) - 1 else r"(?:\.[^.]+)*")
            need_sep = k > 0
            continue
        if need_sep:
            parts.append(r"\.")
        parts.append(_translate_segment(seg))
        need_sep = True
    body = "".join(parts)
    return re.compile(rf"(?:.+\.)?{body}" if suffix else body)


def match_names(pattern: str, names: Sequence[str]) -> List[str]:
    """The names (in their order) matching a layer name or glob.

    A name matches itself; a glob matches with ``*``, ``?`` and ``[...]`` inside one dotted
    segment and ``**`` across segments (``"encoder.layer.*"``: the blocks, not their
    submodules; ``"**.query"``: every ``query`` at any depth). When nothing matches the full
    names, the pattern is matched against their dotted endings, so Hugging Face names work
    inside a wrapper: ``"encoder.layer.5"`` finds ``"model.bert.encoder.layer.5"`` and
    ``"base_model.model.bert.encoder.layer.5"`` (PEFT).
    """
    if not _is_glob(pattern):
        if pattern in names:
            return [pattern]
        tail = "." + pattern
        return [n for n in names if n.endswith(tail)]
    for suffix in (False, True):
        rx = _layer_regex(pattern, suffix)
        hits = [n for n in names if rx.fullmatch(n)]
        if hits:
            return hits
    return []


def _split_input(spec: str) -> Tuple[str, bool]:
    """``"classifier:input"`` -> ``("classifier", True)``; other names -> ``(name, False)``."""
    if spec.endswith(INPUT_SUFFIX):
        return spec[: -len(INPUT_SUFFIX)], True
    return spec, False


def is_input_layer(name: str) -> bool:
    """Whether a resolved layer name selects the layer's input (``"...:input"``)."""
    return name.endswith(INPUT_SUFFIX)


def _ambiguous(spec: str, hits: Sequence[str], what: str) -> LayerNotFoundError:
    shown = ", ".join(hits[:6]) + (f", ... ({len(hits)} in all)" if len(hits) > 6 else "")
    return LayerNotFoundError(
        f"{what} {spec!r} is the ending of {len(hits)} names ({shown}); write more of the name "
        f"(e.g. {hits[0]!r}) to choose one, or a glob (e.g. '**.{spec}') to take them all."
    )


def resolve_layers(
    model: nn.Module, layers: LayerSpec, inputs: bool = False
) -> Dict[str, nn.Module]:
    """Map layer names, globs or modules to ``{name: module}`` in the order given.

    Names follow :func:`match_names`: full names from ``model.named_modules()``, or their dotted
    endings (``"encoder.layer.5"``), with segment globs (``"encoder.layer.*"``, ``"**.query"``).
    With ``inputs=True`` a name ending in ``":input"`` (``"classifier:input"``) selects the
    layer's input; its resolved name keeps the suffix.

    Raises:
        LayerNotFoundError: a name or glob matches nothing (lists the closest names), or a name
            without glob characters is the ending of several names.
        ValueError: a ``":input"`` name where ``inputs=False``.
    """
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    named = dict(model.named_modules())
    names = [n for n in named if n]
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
        base, is_input = _split_input(spec)
        if is_input and not inputs:
            raise ValueError(
                f"layers={spec!r}: the ':input' suffix (a layer's input) is read by "
                "MemorizationMonitor and ConceptErasure; here layers are differentiated through "
                f"their parameters, so name the layer itself ({base!r})."
            )
        tag = INPUT_SUFFIX if is_input else ""
        if base in named:
            out[(base or "<root>") + tag] = named[base]
            continue
        hits = match_names(base, names)
        if not hits:
            raise LayerNotFoundError.for_name(spec, named.keys())
        if len(hits) > 1 and not _is_glob(base):
            raise _ambiguous(base, hits, "Layer")
        for n in hits:
            out[n + tag] = named[n]
    if not out:
        raise LayerNotFoundError("layers= is empty: name at least one layer of the model.")
    return out


def pooling_config(pooling: PoolingSpec, per_layer: Mapping[str, Pooling]) -> Any:
    """A pooling argument as JSON for ``config.json``: the name (a callable's ``repr``), or, for
    a per-layer dict, ``{resolved layer name: pooling}`` from ``per_layer``."""

    def text(p: Pooling) -> str:
        return p if isinstance(p, str) else repr(p)

    if isinstance(pooling, Mapping):
        return {n: text(p) for n, p in per_layer.items()}
    return text(pooling)


def layer_pooling(
    pooling: PoolingSpec, names: Sequence[str], default: Pooling = "mean"
) -> Dict[str, Pooling]:
    """The pooling of each resolved layer name.

    Args:
        pooling: one pooling for every layer, or ``{layer name or glob: pooling}`` (keys as in
            ``layers=``, e.g. ``{"encoder.layer.1": "first", "classifier:input": "mean"}``; the
            first key that matches a layer wins).
        names: resolved layer names (:func:`resolve_layers`).
        default: pooling of the layers no key matches.

    Raises:
        ValueError: a key matches none of ``names`` (a typo would silently pool with the
            default otherwise).
    """
    if not isinstance(pooling, Mapping):
        return dict.fromkeys(names, pooling)
    out: Dict[str, Pooling] = {}
    for key, how in pooling.items():
        base, is_input = _split_input(key)
        pool_names = [n for n in names if is_input_layer(n) == is_input]
        stripped = [_split_input(n)[0] for n in pool_names]
        hits = match_names(base, stripped)
        if not hits:
            raise ValueError(
                f"pooling key {key!r} matches none of the layers {list(names)}; key the dict by "
                "the names (or globs) given in layers=."
            )
        for n in hits:
            out.setdefault(pool_names[stripped.index(n)], how)
    return {n: out.get(n, default) for n in names}


def resolve_parameters(model: nn.Module, patterns: Union[str, Sequence[str]]) -> List[str]:
    """Parameter names of ``model`` matching each name or glob, in the order given, once each.

    Unlike layer globs, parameter globs are ``fnmatch`` patterns over the whole dotted name:
    ``*`` crosses dots, so ``"*lora_*"`` selects every LoRA matrix
    (``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight``) and
    ``"head.*"`` the parameters of ``head`` and of its submodules (``**`` means the same as
    ``*``). A pattern that matches no full name is matched against the dotted endings
    (``"classifier.weight"`` finds ``"model.classifier.weight"``).

    Args:
        model: the model owning the parameters.
        patterns: names from ``model.named_parameters()`` or ``fnmatch`` globs (``"head.*"``,
            ``"net.4.b*"``, ``"*lora_*"``); a single string is one pattern.

    Raises:
        LayerNotFoundError: a pattern matches no parameter (lists the closest names), a name
            without glob characters is the ending of several names, or ``patterns`` is empty.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [n for n, _ in model.named_parameters()]
    out: List[str] = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            hits = [n for n in names if fnmatch.fnmatchcase(n, "*." + pat)]
            if len(hits) > 1 and not _is_glob(pat):
                raise _ambiguous(pat, hits, "Parameter")
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


# ---------------------------------------------------------------------- layer outputs
_MISSING = object()


def _output_slot(output: Any, key: OutputKey) -> Any:
    """Where the selected tensor sits in a layer output: ``None`` (the output itself), an int
    position or a str key / field; ``_MISSING`` when there is none."""
    if isinstance(output, torch.Tensor):
        return None
    if isinstance(output, Mapping):
        model_output = hasattr(output, "to_tuple")  # transformers' ModelOutput
        keys = [k for k, v in output.items() if v is not None]
        if key is None:
            if not model_output:
                return _MISSING  # a plain dict has no "hidden states" field: output_key= says
            if isinstance(output.get("last_hidden_state"), torch.Tensor):
                return "last_hidden_state"
            return next((k for k in keys if isinstance(output[k], torch.Tensor)), _MISSING)
        if isinstance(key, int):
            return keys[key] if -len(keys) <= key < len(keys) else _MISSING
        return key if key in output else _MISSING
    if isinstance(output, (tuple, list)):
        if key is None:
            return next((i for i, v in enumerate(output) if isinstance(v, torch.Tensor)), _MISSING)
        if isinstance(key, int):
            return key if -len(output) <= key < len(output) else _MISSING
        fields = getattr(output, "_fields", ())  # namedtuple
        return fields.index(key) if key in fields else _MISSING
    attr = "last_hidden_state" if key is None else key
    if isinstance(attr, str) and isinstance(getattr(output, attr, None), torch.Tensor):
        return ("attr", attr)
    return _MISSING


def _describe_output(output: Any) -> str:
    if isinstance(output, Mapping):
        return f"{type(output).__name__} with keys {list(output.keys())}"
    if isinstance(output, (tuple, list)):
        kinds = ", ".join(type(v).__name__ for v in output[:6])
        return f"{type(output).__name__} of {len(output)} elements ({kinds})"
    return type(output).__name__


def select_output(output: Any, key: OutputKey = None, name: str = "layer") -> torch.Tensor:
    """The tensor of a layer output that is captured or erased.

    A tensor output is used as it is (``key`` ignored). Otherwise ``key=None`` takes the hidden
    states: ``last_hidden_state`` of a Hugging Face ``ModelOutput``, else its first tensor, the
    first tensor of a tuple / list; an int ``key`` takes that position (of a ``ModelOutput``:
    of its non-``None`` fields, as ``output[key]`` does), a str ``key`` that key or field
    (``"attentions"``, a namedtuple field). A plain dict needs a str ``key``.

    Raises:
        TypeError: nothing (or no tensor) at ``key``; the message names the output's parts.
    """
    slot = _output_slot(output, key)
    if slot is None:
        return output
    if slot is not _MISSING:
        val = getattr(output, slot[1]) if isinstance(slot, tuple) else output[slot]
        if isinstance(val, torch.Tensor):
            return val
    how = "" if key is None else f" at output_key={key!r}"
    raise TypeError(
        f"Layer {name!r} returned {_describe_output(output)}, with no tensor{how} to use. Pass "
        "output_key= (a position or a key of the output holding a (B, ..., d) tensor), or choose "
        "a submodule that outputs a tensor."
    )


def replace_output(output: Any, new: torch.Tensor, key: OutputKey = None) -> Any:
    """``output`` with the tensor :func:`select_output` picks replaced by ``new``: a tensor, or a
    new container of the same type (tuple, list, namedtuple, dict, ``ModelOutput``); the other
    parts are left as they are and ``output`` itself is not changed."""
    slot = _output_slot(output, key)
    if slot is None:
        return new
    if isinstance(slot, tuple):
        out = copy.copy(output)
        setattr(out, slot[1], new)
        return out
    if isinstance(output, Mapping):
        out = copy.copy(output)
        out[slot] = new
        return out
    items = list(output)
    items[slot] = new
    if hasattr(output, "_fields"):  # namedtuple
        return type(output)(*items)
    return tuple(items) if isinstance(output, tuple) else items


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
        feats = cap.buffers["model.bert.encoder.layer.5"][cap.seen["model.bert.encoder.layer.5"]]

    Args:
        model: the model owning the layers.
        layers: names, globs or modules (see :func:`resolve_layers`); a name ending in
            ``":input"`` records the layer's input (a forward pre-hook) instead of its output.
        pooling: see :func:`pool`; or a dict ``{layer name or glob: pooling}`` (layers no key
            matches pool with ``"mean"``; see :func:`layer_pooling`).
        num_samples: ``N``; buffers are allocated at the first record (``d`` unknown before).
        dtype: buffer dtype (floating).
        device: buffer device (CPU by default, so ``N x d`` never occupies accelerator memory).
        owner: the callback recording; other callbacks' extra passes are not recorded
            (:func:`exclusive_pass`). ``None`` records every pass.
        output_key: which part of a tuple / ``ModelOutput`` output is recorded (see
            :func:`select_output`); ``None``: the hidden states.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec,
        pooling: PoolingSpec = "mean",
        num_samples: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        owner: Optional[object] = None,
        output_key: OutputKey = None,
    ) -> None:
        if not dtype.is_floating_point:
            raise ValueError(
                f"feature dtype {dtype} is not a floating dtype; use torch.float32, float64, "
                "float16 or bfloat16."
            )
        self.owner = owner
        self.modules = resolve_layers(model, layers, inputs=True)
        self.pooling = check_pooling(pooling)
        self.poolings = layer_pooling(self.pooling, list(self.modules))
        self.output_key = output_key
        self.num_samples = num_samples
        self.dtype = dtype
        self.device = torch.device(device)
        self.buffers: Dict[str, torch.Tensor] = {}
        self.seen: Dict[str, torch.Tensor] = {}
        self.repeated: Dict[str, List[int]] = {}  # indices recorded twice since reset()
        self._handles: List[OrderedHandle] = []
        self._indices: Optional[torch.Tensor] = None
        self._mask: Optional[torch.Tensor] = None
        self._stop = False
        self._fired: set = set()

    @property
    def names(self) -> List[str]:
        """Resolved layer names, in order."""
        return list(self.modules)

    # -------------------------------------------------------------- hooks
    def attach(self) -> FeatureCapture:
        """Register the forward hooks (idempotent)."""
        if not self._handles:
            for name, module in self.modules.items():
                if is_input_layer(name):
                    handle = add_input_hook(module, self._make_input_hook(name), "observe")
                else:
                    handle = add_forward_hook(module, self._make_hook(name), "observe")
                self._handles.append(handle)
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

    def arm(
        self, indices: torch.Tensor, mask: Optional[torch.Tensor] = None, stop: bool = False
    ) -> None:
        """Record the following forward passes for samples ``indices: (B,)``; ``mask: (B, T)``.

        ``stop=True``: once every layer has recorded, the hook that recorded last raises
        :class:`_StopForward`, so nothing after the deepest captured layer runs (call the model
        through :meth:`forward`, which catches it). A layer that runs several times in one pass
        is then recorded at its first call (without ``stop``: at its last)."""
        self._indices = indices.detach().to(self.device, torch.long)
        self._mask = mask
        self._stop = bool(stop)
        self._fired = set()

    def disarm(self) -> None:
        """Stop recording (hooks stay registered)."""
        self._indices = None
        self._mask = None
        self._stop = False
        self._fired = set()

    @staticmethod
    def forward(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Tuple[Any, bool]:
        """``fn(*args, **kwargs)`` (a forward pass), catching :class:`_StopForward`.

        Returns:
            ``(output, stopped)``: the output, or ``None`` and ``True`` when the pass was stopped
            after the last captured layer (``arm(..., stop=True)``).
        """
        try:
            return fn(*args, **kwargs), False
        except _StopForward:
            return None, True

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if self._indices is None or not recording_allowed(self.owner):
                return
            self._record_output(name, select_output(output, self.output_key, name))

        return hook

    def _make_input_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, x: Optional[torch.Tensor]) -> None:
            if self._indices is None or not recording_allowed(self.owner):
                return
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"Layer {name!r} received no tensor input (first positional argument or "
                    "tensor keyword argument) to capture; name another layer."
                )
            self._record_output(name, x)

        return hook

    def _record_output(self, name: str, out: torch.Tensor) -> None:
        with torch.no_grad():
            pooled = pool(out.detach(), self.poolings[name], self._mask)
            self.record(name, self._indices, pooled)
        if self._stop:
            self._fired.add(name)
            if len(self._fired) == len(self.modules):
                raise _StopForward

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
            # normal tensors even when the first record runs under torch.inference_mode (an eval
            # pass): reset() zeroes them in place outside it, which inference tensors refuse
            with torch.inference_mode(False):
                buf = torch.zeros(
                    self.num_samples, pooled.shape[1], dtype=self.dtype, device=self.device
                )
                self.seen[name] = torch.zeros(
                    self.num_samples, dtype=torch.bool, device=self.device
                )
            self.buffers[name] = buf
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
