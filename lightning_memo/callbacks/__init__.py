"""Lightning callbacks: thin adapters from Lightning hooks to the math core."""

from .erasure import ConceptErasure
from .influence import InfluenceAnalysis
from .memorization import MemorizationMonitor
from .tracin import TracIn

__all__ = ["InfluenceAnalysis", "ConceptErasure", "MemorizationMonitor", "TracIn"]
