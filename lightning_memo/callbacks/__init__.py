"""Lightning callbacks: thin adapters from Lightning hooks to the math core."""

from .memorization import MemorizationMonitor

__all__ = ["MemorizationMonitor"]
