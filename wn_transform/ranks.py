"""Before an init across a process group: every rank must hold the same model.

The data-dependent init reduces each layer's statistics over every rank's shard of the batch,
and ``resample=True`` broadcasts the first rank's directions.  Both hold only if every rank has
the same layers to normalize (else one rank waits in a reduction the others never join, until
the group's timeout) and the same parameter values (else the statistics of different
directions ``v`` are summed, and every rank gets a wrong ``g`` and bias, silently).  Models
built without a common seed differ so: ``DistributedDataParallel`` hides it by copying the
first rank's parameters when it wraps, which comes after the init.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import WeightNormError, few
from .moments import all_reduce, collective_device
from .targets import Target

__all__ = ["check_same_model"]


def check_same_model(model: nn.Module, targets: list[Target], group: dist.ProcessGroup) -> None:
    """Raise :class:`WeightNormError` on every rank unless every rank of ``group`` has the same
    ``targets`` (names, shapes) and the same parameters (names, shapes, values).

    Two all-reduces (MAX of each number and of its negation): one of four numbers (the count and
    a CRC-32 of the targets' names and shapes, in any order, and of the parameters' in
    ``named_parameters`` order), then, when those agree, one of two float64 numbers per parameter (the sum of its values and of their squares).
    """
    params = [(name, p) for name, p in model.named_parameters() if not p.is_meta]
    device = collective_device(group, next((p.device for _, p in params if p.is_cuda), None))
    header = torch.tensor([len(targets), _crc(sorted(f"{t.qualname}{tuple(t.shape)}" for t in targets)),
                           len(params), _crc(f"{name}{tuple(p.shape)}" for name, p in params)],
                          dtype=torch.float64, device=device)
    if _differs(header, group).any():
        names = few([t.qualname for t in targets])
        msg = (f"the ranks of the process group found different weights to normalize: this rank has "
               f"{len(targets)} ({names}) among {len(params)} parameters, another rank other ones; every rank must "
               "build the same model, call apply_weight_norm with the same selection (include, exclude, types) and "
               "run the same layers on its shard (a branch taken on some ranks only hides the others' layers from "
               "them), or pass distributed=False for an init on each rank's batch alone")
        raise WeightNormError(msg)
    if not params:
        return
    with torch.no_grad():
        sums = torch.stack([_sums(p.detach()) for _, p in params]).to(device)
    differs = _differs(torch.nan_to_num(sums, nan=0.5), group).view(-1, 2).any(dim=1)
    if differs.any():
        names = [name for (name, _), bad in zip(params, differs.tolist()) if bad]
        msg = (f"the ranks of the process group hold different parameter values ({few(names)}): the init would mix "
               "the statistics of different weights; build the model from the same seed on every rank "
               "(torch.manual_seed before building it), or copy the first rank's values to the others before "
               "apply_weight_norm (for each tensor of model.state_dict(): torch.distributed.broadcast(tensor, src=0)), "
               "as DistributedDataParallel does when it wraps")
        raise WeightNormError(msg)


def _sums(p: Tensor) -> Tensor:
    """``[sum, sum of squares]`` of ``p``'s values (real and imaginary parts), in float64, a chunk
    of :data:`_CHUNK` values at a time (no float64 copy of a large embedding at once)."""
    if p.layout != torch.strided:  # sparse: its stored values (COO coalesced; CSR, CSC, BSR, BSC as they are)
        p = p.coalesce().values() if p.layout == torch.sparse_coo else p.values()
    p = torch.view_as_real(p) if p.is_complex() else p
    total = torch.zeros(2, dtype=torch.float64, device=p.device)
    for chunk in p.reshape(-1).split(_CHUNK):
        chunk = chunk.to(torch.float64)
        total += torch.stack([chunk.sum(), chunk.square().sum()])
    return total


_CHUNK = 1 << 20


def _crc(lines: Iterable[str]) -> int:
    return zlib.crc32("\n".join(lines).encode())


def _differs(values: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Per element of ``values``, whether some rank of ``group`` has another value (one all-reduce)."""
    flat = values.reshape(-1)
    both = torch.cat([flat, -flat])
    all_reduce(both, dist.ReduceOp.MAX, group)
    n = flat.numel()
    return both[:n] != -both[n:]
