"""Per-unit mean and (biased) variance of a pre-activation, over one or many processes.

With a process group, each rank's batch is a shard of one calibration batch: the per-unit
counts, sums and sums of squares are reduced across the ranks in float64, so every rank gets
the statistics of the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["resolve_group", "unit_moments"]

def resolve_group(distributed: bool | dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """``None``: the default group when ``torch.distributed`` runs with more than one rank;
    ``False``: no reduction; a group: that group.  Returns the group to reduce over, or None."""
    if distributed is False:
        return None
    if distributed is None or distributed is True:
        if not (dist.is_available() and dist.is_initialized()):
            if distributed is True:
                msg = "distributed=True, but torch.distributed is not initialized (call init_process_group first)"
                raise RuntimeError(msg)
            return None
        return dist.group.WORLD if dist.get_world_size() > 1 else None
    return distributed


def unit_moments(t: Tensor, unit_dim: int, group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
    """``(mean, var)`` per unit of ``t`` (units on ``unit_dim``): float32 (float64 across ranks)."""
    unit_dim %= t.ndim
    reduce = [d for d in range(t.ndim) if d != unit_dim]
    if group is None:  # two passes in float32 (at least): accurate, and no float64 copy of t
        x = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        count = x.numel() // x.shape[unit_dim]
        mean = x.sum(dim=reduce, keepdim=True) / count  # sum(): much faster than var_mean on CPU
        var = (x - mean).square().sum(dim=reduce) / count
        return mean.reshape(-1), var
    t64 = t.double()
    count = torch.tensor([t.numel() / t.shape[unit_dim]], dtype=torch.float64, device=t.device)
    packed = torch.cat([count, t64.sum(dim=reduce), t64.square().sum(dim=reduce)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    total, sums, squares = packed[0], *packed[1:].chunk(2)
    mean = sums / total
    return mean, (squares / total - mean.square()).clamp_min(0)
