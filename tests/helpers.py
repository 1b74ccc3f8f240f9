"""Plain helpers shared by the tests (torch only): per-sample losses, tiny float64 models, the
for-loop per-sample-gradient oracle, a relative closeness check and a PNG header reader.

Lightning models, loaders, ``Trainer`` and DDP scaffolding live in ``tests/callbacks/helpers.py``;
pytest fixtures (``one_thread``) in ``tests/conftest.py``.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

DT = torch.float64


def ce_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Per-sample cross-entropy of ``model(batch[0])`` against ``batch[1]``: (B,)."""
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def mse_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Per-sample summed squared error of ``model(batch[0])`` against ``batch[1]``: (B,)."""
    return ((model(batch[0]) - batch[1]) ** 2).sum(dim=1)


def mlp(sizes: Sequence[int] = (4, 5, 3), seed: int = 0, dtype: torch.dtype = DT) -> nn.Sequential:
    """``Linear -> Tanh -> ... -> Linear`` with the given widths, weights from ``manual_seed``."""
    torch.manual_seed(seed)
    layers: list = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


class TinyCNN(nn.Module):
    """``conv`` -> ReLU -> flatten -> Linear(classes) on ``hw x hw`` inputs."""

    def __init__(
        self, conv: nn.Conv2d, hw: int = 7, classes: int = 3, fc_bias: bool = True
    ) -> None:
        super().__init__()
        self.conv = conv
        with torch.no_grad():
            flat = conv(torch.zeros(1, conv.in_channels, hw, hw)).numel()
        self.fc = nn.Linear(flat, classes, bias=fc_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def loop_grads(
    model: nn.Module,
    params: Dict[str, torch.Tensor],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Tuple[torch.Tensor, ...],
    n: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Oracle: ``{name: (n, *shape)}`` from ``n`` single-sample backward passes (default: all)."""
    n = batch[0].shape[0] if n is None else n
    out: Dict[str, list] = {k: [] for k in params}
    for i in range(n):
        sample = tuple(t[i : i + 1] for t in batch)
        model.zero_grad()
        loss_fn(model, sample).sum().backward()
        for k, p in params.items():
            out[k].append(p.grad.detach().clone())
    model.zero_grad()
    return {k: torch.stack(v) for k, v in out.items()}


def assert_close_rel(got: Any, want: Any, rtol: float = 1e-5) -> None:
    """``got == want`` up to ``rtol`` relative to the largest magnitude of ``want`` (values near 0
    are compared in absolute terms)."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def png_size(path: str) -> Tuple[int, int]:
    """(width, height) from a PNG file's header, without an image library."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])
