"""The few collectives we need, written once, on top of a Lightning ``Strategy``.

``all_gather`` needs equal shapes on every rank: pad to the largest, gather, trim. Rows come back
rank-major, so the sample index always travels beside the values.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

__all__ = ["gather_rows", "gather_stats", "world_size"]


def world_size(strategy: Any) -> int:
    """Number of processes of a Lightning strategy (1 without one)."""
    return int(getattr(strategy, "world_size", 1) or 1) if strategy is not None else 1


def gather_rows(
    strategy: Any, index: torch.Tensor, values: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather ``(index: (n_r,), values: (n_r, k))`` from every rank to every rank.

    Rows are returned rank-major and may repeat an index (``DistributedSampler`` padding); callers
    scatter them back by index. Tensors travel on ``strategy.root_device`` (NCCL needs CUDA) and
    come back on the device of ``values``.

    Returns:
        index: (sum n_r,), values: (sum n_r, k).
    """
    if world_size(strategy) == 1:
        return index, values
    home = values.device
    dev = strategy.root_device
    n = torch.tensor([index.shape[0]], device=dev)
    sizes = strategy.all_gather(n).reshape(-1).tolist()
    top = max(sizes)
    k = values.shape[1]
    idx_pad = torch.full((top,), -1, dtype=torch.long, device=dev)
    idx_pad[: index.shape[0]] = index.to(dev)
    val_pad = torch.zeros(top, k, dtype=values.dtype, device=dev)
    val_pad[: values.shape[0]] = values.to(dev)
    all_idx = strategy.all_gather(idx_pad).reshape(len(sizes), top)
    all_val = strategy.all_gather(val_pad).reshape(len(sizes), top, k)
    idx = torch.cat([all_idx[r, :s] for r, s in enumerate(sizes)])
    val = torch.cat([all_val[r, :s] for r, s in enumerate(sizes)])
    return idx.to(home), val.to(home)


def gather_stats(strategy: Any, stats: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    """Every rank's ``stats`` (same keys and shapes on all ranks), in rank order, on every rank.

    Used to merge streaming statistics exactly (e.g. LEACE co-moments): callers fold the list in
    order, so all ranks compute the same result.
    """
    n = world_size(strategy)
    if n == 1:
        return [stats]
    dev = strategy.root_device
    gathered = {k: strategy.all_gather(v.to(dev)).reshape(n, *v.shape) for k, v in stats.items()}
    return [{k: g[r].to(stats[k].device) for k, g in gathered.items()} for r in range(n)]
