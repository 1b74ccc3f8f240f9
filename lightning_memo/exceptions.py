"""Error classes of lightning_memo.

Every message says what happened, why, and the change that fixes it, with the user's own names.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class LayerNotFoundError(ValueError):
    """A layer name or glob matched no module of the model."""

    @classmethod
    def for_name(cls, name: str, available: Iterable[str]) -> LayerNotFoundError:
        available = [a for a in available if a]
        close = difflib.get_close_matches(name, available, n=5, cutoff=0.3)
        hint = f" Closest names: {', '.join(close)}." if close else ""
        return cls(
            f"Layer {name!r} matches no module of the model.{hint} Pass a name from "
            f"`dict(model.named_modules())` (globs such as 'encoder.*.fc' are allowed) or the "
            f"module object itself. The model has {len(available)} named modules."
        )


class MissingIndexError(ValueError):
    """A batch carries no sample index."""


class MissingLabelError(ValueError):
    """A batch carries no usable integer label."""


class SampleIndexError(ValueError):
    """A sample index is out of range or duplicated within a batch."""


class OutputDirError(RuntimeError):
    """The result folder cannot be written, or two callbacks would share it."""


class NotFittedError(RuntimeError):
    """An estimator was used before `fit`."""


WRAP_HINT = (
    "Wrap your dataset so every item carries its position:\n"
    "    from lightning_memo import IndexedDataset\n"
    "    train_set = IndexedDataset(train_set)   # tuple items gain the index last,\n"
    "                                            # dict items gain the key 'index'\n"
    "    DataLoader(train_set, ...)\n"
    "or pass `index_key=` (a dict key, a tuple position or a callable batch -> indices); a\n"
    "2-tuple (inputs, index) from IndexedDataset over unlabeled items needs index_key=1."
)
