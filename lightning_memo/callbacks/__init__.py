"""Lightning callbacks: thin adapters from Lightning hooks to the math core."""

from .erasure import ConceptErasure
from .memorization import MemorizationMonitor

__all__ = ["ConceptErasure", "MemorizationMonitor"]
