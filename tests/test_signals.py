"""Per-sample loss and margin (lightning_memo.signals) against a brute-force loop."""

import math

import pytest
import torch

from lightning_memo.signals import loss_and_margin


def _loop(logits: torch.Tensor, labels: torch.Tensor):
    """Oracle: one sample and one class at a time, in Python floats."""
    loss, margin = [], []
    for row, y in zip(logits.tolist(), labels.tolist()):
        big = max(row)
        lse = big + math.log(sum(math.exp(v - big) for v in row))
        loss.append(lse - row[y])
        margin.append(row[y] - max(v for c, v in enumerate(row) if c != y))
    return torch.tensor(loss, dtype=torch.float64), torch.tensor(margin, dtype=torch.float64)


@pytest.mark.parametrize("n_classes", [2, 3, 10])
def test_loss_and_margin_equal_a_loop(n_classes):
    g = torch.Generator().manual_seed(n_classes)
    logits = torch.randn(50, n_classes, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, n_classes, (50,), generator=g)
    logits[0] = 0.0  # ties: the margin is 0, not the gap to itself
    logits[1, labels[1]] = 100.0  # confident and right
    loss, margin = loss_and_margin(logits, labels)
    want_loss, want_margin = _loop(logits, labels)
    assert loss.shape == margin.shape == (50,) and loss.dtype == torch.float64
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(margin, want_margin, rtol=1e-12, atol=1e-12)
    assert margin[0] == 0 and margin[1] > 90 and (margin > 0).sum() > 0 and (margin < 0).sum() > 0


def test_loss_and_margin_dtype_and_bad_input():
    logits = torch.randn(4, 3)
    loss, margin = loss_and_margin(logits, torch.tensor([0, 1, 2, 0], dtype=torch.int32))
    assert loss.dtype == margin.dtype == torch.float32
    with pytest.raises(ValueError, match="C >= 2"):
        loss_and_margin(torch.randn(4, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="C >= 2"):
        loss_and_margin(torch.randn(4, 3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be \(B,\) = \(4,\)"):
        loss_and_margin(logits, torch.zeros(5, dtype=torch.long))
