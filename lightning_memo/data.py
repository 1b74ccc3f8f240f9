"""Sample identity: ``IndexedDataset`` and the accessors that read indices, labels and inputs.

Every training sample has a stable integer index in ``[0, N)``. Accessors find it in a batch:
default key ``"index"`` of a dict batch, else the last element of a tuple batch of at least three
elements (``(inputs, labels)`` has none); labels default to
key ``"label"`` (or ``"labels"``) / the second element; inputs to key ``"input"`` (or ``"x"``,
``"input_ids"``, ``"pixel_values"``) / the first element. Each is overridable by a key, a tuple
position or a callable ``batch -> tensor``. ``make_describer`` gives the text shown for a dataset
item in the callbacks' tables (a ``describe`` callable, or the item's ``"text"`` field).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch.utils.data import Dataset, IterableDataset

from .exceptions import WRAP_HINT, MissingIndexError, MissingLabelError, SampleIndexError

__all__ = [
    "IndexedDataset",
    "Accessor",
    "make_accessor",
    "Describe",
    "make_describer",
    "get_indices",
    "get_labels",
]

Accessor = Union[None, str, int, Callable[[Any], Any]]

_DEFAULT_KEYS = {
    "index": ("index",),
    "label": ("label", "labels", "y"),
    "input": ("input", "inputs", "x", "input_ids", "pixel_values", "features"),
}
_DEFAULT_POS = {"index": -1, "label": 1, "input": 0}


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so each item carries its index.

    Tuple (or list) items become ``(*item, index)``; dict items gain the key ``index_key``; any
    other item ``x`` becomes ``(x, index)``.

    Args:
        dataset: a map-style dataset (``__getitem__`` and ``__len__``).
        index_key: key used for dict items.
    """

    def __init__(self, dataset: Any, index_key: str = "index") -> None:
        if isinstance(dataset, IterableDataset) or not (
            hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
        ):
            raise TypeError(
                f"IndexedDataset needs a map-style dataset (with __getitem__ and __len__); got "
                f"{type(dataset).__name__}. Iterable datasets have no stable sample positions: "
                "materialise it (e.g. list(dataset)) or give each item an 'index' yourself."
            )
        self.dataset = dataset
        self.index_key = index_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if isinstance(item, dict):
            return {**item, self.index_key: i}
        if isinstance(item, (tuple, list)):
            return (*item, i)
        return (item, i)


class _DefaultAccessor:
    """Reads ``kind`` with the default dict keys / tuple positions (picklable for ddp_spawn)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, batch: Any) -> Any:
        kind, keys, pos = self.kind, _DEFAULT_KEYS[self.kind], _DEFAULT_POS[self.kind]
        if isinstance(batch, dict):
            for k in keys:
                if k in batch:
                    return batch[k]
            raise KeyError(keys[0])
        if isinstance(batch, (tuple, list)):
            # (inputs, labels) has no index: the index is last of at least 3 elements
            need = 3 if kind == "index" else 2 if kind == "label" else 1
            if len(batch) < need:
                raise KeyError(f"position {pos} of a batch with at least {need} elements")
            return batch[pos]
        if kind == "input":
            return batch
        raise KeyError(pos)


class _KeyAccessor:
    """Reads ``batch[key]`` (a dict key or a tuple position)."""

    def __init__(self, key: Union[str, int]) -> None:
        self.key = key

    def __call__(self, batch: Any) -> Any:
        return batch[self.key]


def make_accessor(spec: Accessor, kind: str) -> Callable[[Any], Any]:
    """Build ``batch -> value`` for ``kind`` in {"index", "label", "input"}.

    Args:
        spec: ``None`` (defaults above), a dict key, a tuple position or a callable.
        kind: what is read.
    """
    if callable(spec):
        return spec
    if spec is None:
        return _DefaultAccessor(kind)
    if isinstance(spec, (str, int)):
        return _KeyAccessor(spec)
    raise TypeError(
        f"{kind}_key={spec!r}: use a dict key (str), a tuple position (int) or a callable."
    )


Describe = Optional[Callable[[Any], str]]


class _TextField:
    """``item -> item[key]`` when the item is a dict holding a string there, else ``None``
    (picklable for ddp_spawn)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, item: Any) -> Optional[str]:
        if isinstance(item, Mapping):
            value = item.get(self.key)
            if isinstance(value, str):
                return value
        return None


def make_describer(
    describe: Describe = None, text_key: Optional[str] = "text"
) -> Callable[[Any], Optional[str]]:
    """Build ``dataset item -> text or None``: the text a callback shows beside a sample.

    Args:
        describe: ``item -> str`` (e.g. decoding token ids); wins when given.
        text_key: otherwise the string under this key of a dict item (``None``: no text).
    """
    if describe is not None:
        if not callable(describe):
            raise TypeError(f"describe={describe!r}: pass a callable dataset item -> str, or None.")
        return describe
    if text_key is not None and not isinstance(text_key, str):
        raise TypeError(f"text_key={text_key!r}: pass a dict key (str) or None.")
    return _TextField(text_key) if text_key is not None else _no_text


def _no_text(item: Any) -> None:
    return None


def _describe(batch: Any) -> str:
    if isinstance(batch, dict):
        return f"a dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} elements"
    return f"a {type(batch).__name__}"


def get_indices(
    batch: Any,
    accessor: Callable[[Any], Any],
    num_samples: Optional[int] = None,
    check_duplicates: bool = True,
) -> torch.Tensor:
    """Read and validate the sample indices of a batch.

    Returns:
        indices: (B,) int64 tensor on the batch's device.
    """
    try:
        idx = accessor(batch)
    except (KeyError, IndexError, TypeError) as err:
        raise MissingIndexError(
            f"The batch has no sample index (looked for {err}); the batch is {_describe(batch)}.\n"
            + WRAP_HINT
        ) from None
    idx = torch.as_tensor(idx)
    if idx.ndim != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise MissingIndexError(
            f"The sample index read from the batch has dtype {idx.dtype} and shape "
            f"{tuple(idx.shape)}; expected one integer per sample. The batch is "
            f"{_describe(batch)}.\n" + WRAP_HINT
        )
    idx = idx.long()
    if idx.numel() and num_samples is not None:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= num_samples:
            bad = hi if hi >= num_samples else lo
            raise SampleIndexError(
                f"Sample index {bad} is out of range [0, {num_samples}) "
                "(the training set size). Indices must be positions in the training set: wrap the "
                "dataset itself with IndexedDataset, or pass num_samples= if it is larger."
            )
    if check_duplicates and idx.numel() != torch.unique(idx).numel():
        dup = [int(v) for v, c in zip(*torch.unique(idx, return_counts=True)) if c > 1][:5]
        raise SampleIndexError(
            f"Sample indices {dup} occur more than once in one batch; each sample needs its own "
            "index. Wrap the dataset with IndexedDataset instead of building indices by hand."
        )
    return idx


def get_labels(batch: Any, accessor: Callable[[Any], Any]) -> torch.Tensor:
    """Read and validate integer class labels ``(B,)`` of a batch."""
    try:
        lab = accessor(batch)
    except (KeyError, IndexError, TypeError) as err:
        raise MissingLabelError(
            f"The batch has no label (looked for {err}); the batch is {_describe(batch)}. Pass "
            "label_key= (a dict key, a tuple position or a callable batch -> labels)."
        ) from None
    lab = torch.as_tensor(lab)
    if lab.ndim == 2 and lab.shape[1] > 1 and not lab.is_floating_point():
        raise MissingLabelError(
            f"Labels of shape {tuple(lab.shape)} look like token labels; PSMI needs one class per "
            "sample. Pass label_key= as a callable returning (B,) class ids."
        )
    if lab.ndim != 1 or lab.is_floating_point() or lab.dtype == torch.bool:
        raise MissingLabelError(
            f"Labels must be (B,) integer class ids; got dtype {lab.dtype}, shape "
            f"{tuple(lab.shape)}. Convert them with .long(), or pass label_key= to read another "
            "field."
        )
    return lab.long()
