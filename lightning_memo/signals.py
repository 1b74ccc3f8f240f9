"""Per-sample training signals used as baselines beside memorization scores (math core, torch only).

The loss and the logit margin of each sample are the two classic memorization baselines that PSMI
is compared with (Dentan et al., ECAI 2025, report PSMI against both); ``MemorizationMonitor``
writes them beside its scores.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["loss_and_margin"]


def loss_and_margin(
    logits: torch.Tensor, labels: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy loss and logit margin of each sample.

    ``loss_i = -log softmax(logits_i)[y_i]`` and ``margin_i = logits_i[y_i] - max_{c != y_i}
    logits_i[c]`` (positive: the sample is classified as its label, by that gap).

    Args:
        logits: (B, C) class logits, C >= 2, floating.
        labels: (B,) integer class ids in ``[0, C)``.

    Returns:
        loss: (B,) and margin: (B,), in the dtype and on the device of ``logits`` (not reduced,
        no gradient detached: wrap the call in ``torch.no_grad()`` for monitoring).

    Raises:
        ValueError: ``logits`` is not ``(B, C)`` with C >= 2 or ``labels`` is not ``(B,)``.
    """
    if logits.ndim != 2 or logits.shape[1] < 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be floating (B, C) class logits with C >= 2; got dtype {logits.dtype}, "
            f"shape {tuple(logits.shape)}."
        )
    if labels.shape != (logits.shape[0],):
        raise ValueError(
            f"labels must be (B,) = ({logits.shape[0]},) class ids; got shape "
            f"{tuple(labels.shape)}."
        )
    labels = labels.to(device=logits.device, dtype=torch.long)
    loss = F.cross_entropy(logits, labels, reduction="none")
    own = logits.gather(1, labels[:, None]).squeeze(1)
    top = logits.topk(2, dim=1)
    other = torch.where(top.indices[:, 0] == labels, top.values[:, 1], top.values[:, 0])
    return loss, own - other
