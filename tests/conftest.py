"""Shared pytest fixtures.

Plain helpers are modules, not fixtures: ``tests/helpers.py`` (losses, tiny float64 models, the
per-sample-gradient oracle) and ``tests/callbacks/helpers.py`` (``TinyMLP``, loaders, ``trainer``,
``seeded_fit``, the DDP scaffolding).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a test module (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): on a busy 2-core machine the OpenMP threads of tiny
    kernels contend with other processes (10-30x slower, measured); results do not change.

    Not for the DDP test modules: a parent at one thread made ``ddp_spawn`` children abort.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
