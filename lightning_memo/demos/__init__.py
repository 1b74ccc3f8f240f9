"""The demos behind ``lightning-memo demo``, on data shipped with scikit-learn.

Each demo trains a small MLP with Lightning and one or more of the package's callbacks, then
prints how well their scores find what the data hides (flipped labels, an injected concept):

- :func:`run_memorization_demo`: ``MemorizationMonitor`` (PSMI) on digits with flipped labels;
- :func:`run_erasure_demo`: ``ConceptErasure`` (LEACE) of a spurious corner patch;
- :func:`run_tracin_demo`: ``TracIn`` self-influence and proponents / opponents;
- :func:`run_influence_demo`: ``InfluenceAnalysis``, every influence method side by side;
- :func:`run_transformer_demo`: all four callbacks on one Trainer while all-MiniLM-L6-v2 is
  fine-tuned on real text (chatterbot topics); needs ``pip install lightning_memo[transformers]``.

The demos need the ``demo`` extras (scikit-learn, matplotlib): ``pip install lightning_memo[demo]``.
Importing this package works without them; running a demo then raises
:class:`MissingDemoDependency` with that command.
"""

from ._common import DigitsMLP, MissingDemoDependency, load_digits_flipped
from .erasure import run_erasure_demo
from .influence import run_influence_demo
from .memorization import run_memorization_demo
from .tracin import run_tracin_demo
from .transformer import run_transformer_demo

__all__ = [
    "load_digits_flipped",
    "DigitsMLP",
    "MissingDemoDependency",
    "run_memorization_demo",
    "run_erasure_demo",
    "run_tracin_demo",
    "run_influence_demo",
    "run_transformer_demo",
]
