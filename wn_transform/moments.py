"""Per-unit mean and (biased) variance of a pre-activation, over one or many processes.

With a process group, each rank's batch is a shard of one calibration batch: the per-unit
counts, sums and sums of squares are reduced across the ranks in float64, so every rank gets
the statistics of the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import WeightNormError, first_line

__all__ = ["Scratch", "all_reduce", "broadcast", "centre_", "collective_device", "per_unit", "resolve_group"]


class Scratch:
    """One buffer reused for a temporary of varying shape, layer after layer.

    A fresh activation-sized temporary per layer makes the allocator hand memory back to the
    system and fault it in again (thousands of page faults per pass on CPU); one kept buffer,
    grown to the largest shape, costs no more memory than the largest temporary.
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None
        self._last: Tensor | None = None  # the last view handed out (layers often repeat a shape)

    def like(self, tensor: Tensor) -> Tensor:
        """An uninitialized tensor of ``tensor``'s shape, dtype and device."""
        last = self._last
        if last is not None and last.shape == tensor.shape and last.dtype == tensor.dtype and last.device == tensor.device:
            return last
        n = tensor.numel()
        buffer = self._buffer
        if buffer is None or buffer.numel() < n or buffer.dtype != tensor.dtype or buffer.device != tensor.device:
            buffer = self._buffer = torch.empty(n, dtype=tensor.dtype, device=tensor.device)
        self._last = buffer[:n].view(tensor.shape)
        return self._last

def resolve_group(distributed: bool | dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """``None``: the default group when ``torch.distributed`` runs with more than one rank;
    ``False``: no reduction; a group: that group.  Returns the group to reduce over, or None."""
    if distributed is False:
        return None
    if distributed is None or distributed is True:
        if not (dist.is_available() and dist.is_initialized()):
            if distributed is True:
                msg = "distributed=True, but torch.distributed is not initialized (call init_process_group first)"
                raise WeightNormError(msg)
            return None
        return dist.group.WORLD if dist.get_world_size() > 1 else None
    if _outside(distributed):
        msg = ("distributed= names a process group this rank is not a member of (dist.new_group returns "
               "GroupMember.NON_GROUP_MEMBER on the other ranks): on this rank pass distributed=False, or call "
               "apply_weight_norm on the group's ranks only")
        raise WeightNormError(msg)
    if not isinstance(distributed, dist.ProcessGroup):
        msg = (f"distributed must be None (the default group when torch.distributed runs), True, False or a "
               f"torch.distributed.ProcessGroup, got {distributed!r}"
               + (" (a DeviceMesh: pass mesh.get_group())" if type(distributed).__name__ == "DeviceMesh" else ""))
        raise TypeError(msg)
    return distributed


def centre_(t: Tensor, unit_dim: int, group: dist.ProcessGroup | None = None, scratch: Scratch | None = None,
            out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(t - mean, mean, var)`` per unit of ``t`` (units on ``unit_dim``; biased variance).

    ``t - mean`` is ``t`` itself, centred in place, when ``t`` is float32/float64 (a float32
    copy for half precision): the caller owns ``t``.  Two passes (mean, then the squares of the
    centred values) in float32 at least: accurate, and no float64 copy of ``t``.  Across ranks,
    the per-unit counts, sums and sums of squares are reduced in float64, and mean and var are
    float64.  ``scratch``: where to put the squares (a buffer kept across calls); ``out``: where
    to put mean and var as well (written there directly when their dtype is that of the
    statistics; the results are then these tensors).
    """
    unit_dim %= t.ndim
    reduce = [d for d in range(t.ndim) if d != unit_dim] if t.ndim != 2 else 1 - unit_dim
    x = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    if group is None:
        into = out if out is not None and out[0].dtype == x.dtype else (None, None)
        mean = torch.mean(x, dim=reduce, out=into[0])  # two plain reductions: faster than var_mean on CPU
        centred = x.sub_(per_unit(mean, t.ndim, unit_dim))
        squares = torch.square(centred, out=scratch.like(centred)) if scratch is not None else centred.square()
        var = torch.mean(squares, dim=reduce, out=into[1])
    else:
        t64 = x.double()
        count = torch.tensor([x.numel() / x.shape[unit_dim]], dtype=torch.float64, device=x.device)
        packed = torch.cat([count, t64.sum(dim=reduce), t64.square().sum(dim=reduce)])
        all_reduce(packed, dist.ReduceOp.SUM, group)
        total, sums, sum_squares = packed[0], *packed[1:].chunk(2)
        mean = sums / total
        var = (sum_squares / total - mean.square()).clamp_min(0)
        centred = x.sub_(per_unit(mean.to(x.dtype), t.ndim, unit_dim))
    if out is not None and mean is not out[0]:
        out[0].copy_(mean)
        out[1].copy_(var)
    return centred, mean, var


def collective_device(group: dist.ProcessGroup, cuda: torch.device | None = None) -> torch.device:
    """Where a tensor for a collective of ``group`` lives: for NCCL, ``cuda`` (the data's device) or
    the current CUDA device; else the CPU."""
    if dist.get_backend(group) == "nccl":
        return cuda if cuda is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _outside(distributed: object) -> bool:
    """Whether ``distributed`` is torch's marker for a group this rank is not in (``-100``)."""
    member = getattr(dist, "GroupMember", None)
    return member is not None and distributed is getattr(member, "NON_GROUP_MEMBER", object())


def all_reduce(tensor: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup) -> None:
    """``dist.all_reduce`` for the data-dependent init; a failure (a timeout, a lost peer, a mismatch
    of collectives) is a :class:`WeightNormError` that says what every rank must do."""
    try:
        dist.all_reduce(tensor, op=op, group=group)
    except RuntimeError as exc:
        raise WeightNormError(_failed("reduction", exc)) from exc


def broadcast(tensor: Tensor, group: dist.ProcessGroup) -> None:
    """``tensor`` set, in place, to the group's first rank's on every rank (random draws every rank
    must share), through the device the backend needs; a failure as in :func:`all_reduce`."""
    device = collective_device(group, tensor.device if tensor.is_cuda else None)
    carrier = tensor if tensor.device == device else tensor.to(device)
    try:
        dist.broadcast(carrier, src=dist.get_global_rank(group, 0), group=group)
    except RuntimeError as exc:
        raise WeightNormError(_failed("broadcast", exc)) from exc
    if carrier is not tensor:
        tensor.copy_(carrier)


def _failed(collective: str, exc: RuntimeError) -> str:
    return (f"apply_weight_norm's {collective} across ranks failed ({first_line(exc)}): every rank of the process "
            "group must call apply_weight_norm at the same time with its own valid shard of the batch and run "
            "the same layers in the same order (a rank that raised first, on a NaN in its shard, leaves the "
            "others waiting), or pass distributed=False for an init on each rank's batch alone")


def per_unit(values: Tensor, ndim: int, unit_dim: int) -> Tensor:
    """``values`` (one per unit) shaped to broadcast against a rank-``ndim`` tensor whose units
    are on ``unit_dim`` (as they are when the units are the last axis: no view)."""
    unit_dim %= ndim
    if unit_dim == ndim - 1:
        return values
    shape = [1] * ndim
    shape[unit_dim] = -1
    return values.view(shape)
