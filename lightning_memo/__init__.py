"""lightning_memo: memorization monitoring and data attribution for PyTorch Lightning."""

from .psmi import PSMI, sample_directions

__all__ = ["PSMI", "sample_directions"]
__version__ = "0.1.0"
