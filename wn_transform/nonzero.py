"""Which directions ``v`` are known to have no zero unit: on an accelerator, torch's fused kernel then needs no guard.

torch's fused kernel (``_weight_norm_interface``) computes ``w = g * v/||v||`` in one pass and
its gradients in one more, but divides by zero for a zero direction (``v[unit] = 0``), where this
library's formula gives a zero weight and finite gradients (:func:`~wn_transform.norm.safe_norm`).
Telling the two apart reads ``min ||v[unit]||`` off the device.  On the CPU that costs a few
nanoseconds and :func:`~wn_transform.fast.weight_norm_weight` reads it at every call.  On an
accelerator it waits for every queued kernel (a synchronization), so it is read once per value
of ``v`` and the verdict is kept on the tensor, with the ``(data_ptr, version)`` it holds for:

* any in-place write bumps the version (``load_state_dict``, ``copy_``, a write under
  ``torch.no_grad()``), and a new storage moves the address: the next call checks again;
* except an optimizer step, which carries the verdict over (:func:`before_step`,
  :func:`after_step`): a step cannot make a direction exactly zero.  The gradient of ``v`` is
  orthogonal to ``v`` (the paper's projection ``M_w``), so a plain SGD step only lengthens it;
  momentum, Adam and weight decay would have to cancel every element of a unit exactly.

A write through ``.data`` bypasses version counters: a direction zeroed that way after its check
gives NaN, as torch's own weight norm does (write through the parameter under ``torch.no_grad()``
instead).  A tensor that keeps being rewritten outside an optimizer (FSDP2 gathers its parameters
before every forward; an EMA of a model's parameters) is checked at most :data:`MAX_CHECKS`
times, then takes the guarded formula: a few more kernels, no waiting.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["MAX_CHECKS", "after_step", "before_step", "check", "known", "remembers", "worth_checking"]

MAX_CHECKS = 3
_VERDICT = "_wn_nonzero"  # attribute on v: (data_ptr, version, checks); data_ptr None after a failed check
_PENDING = "_wn_nonzero_pending"  # attribute on an optimizer between its step's pre- and post-hook
_seen = False  # whether any verdict was kept in this process (the optimizer hooks do nothing until then)


def remembers(v: Tensor) -> bool:
    """Whether ``v``'s check is kept rather than read at every call: a parameter on a CUDA device.
    Not a tensor computed afresh at each call (``torch.nn.utils.prune``'s masked direction), whose
    check would be read every time (such a ``v`` takes the guarded formula), nor a subclass
    (DTensor, a wrapper), whose own rules apply."""
    return v.is_cuda and type(v) is torch.nn.Parameter


def _key(v: Tensor) -> tuple[int, int]:
    return v.data_ptr(), v._version


def known(v: Tensor) -> bool:
    """Whether ``v`` was checked, holding the values it holds now, and had no zero direction."""
    verdict = getattr(v, _VERDICT, None)
    return verdict is not None and verdict[:2] == _key(v)


def worth_checking(v: Tensor) -> bool:
    """Whether ``v`` may be checked now: fewer than :data:`MAX_CHECKS` checks so far, and no CUDA
    graph being captured (reading the device is not allowed then; a graph captured after warm-up
    calls finds its directions checked)."""
    verdict = getattr(v, _VERDICT, None)
    if verdict is not None and verdict[2] >= MAX_CHECKS:
        return False
    return not (v.is_cuda and torch.cuda.is_current_stream_capturing())


def check(v: Tensor, norms: Tensor) -> bool:
    """Whether every unit of ``v`` has a nonzero norm (``norms``: one per unit; NaN counts as no),
    kept on ``v`` where :func:`remembers` says so.  Reads one number off ``norms``' device."""
    ok = norms.min().item() > 0 if norms.numel() else True  # (NaN > 0 is False)
    if remembers(v) and not v.is_inference():  # (an inference tensor has no version counter)
        global _seen
        verdict = getattr(v, _VERDICT, None)
        checks = 1 + (verdict[2] if verdict is not None else 0)
        setattr(v, _VERDICT, (*_key(v), checks) if ok else (None, None, checks))
        _seen = True
    return ok


def before_step(optimizer: Any) -> None:
    """A global optimizer-step pre-hook: note which of the optimizer's parameters hold a verdict
    for their present values."""
    if not _seen:
        return
    pending = [p for group in optimizer.param_groups for p in group["params"]
               if isinstance(p, Tensor) and getattr(p, _VERDICT, None) is not None and known(p)]
    if pending:
        setattr(optimizer, _PENDING, pending)


def after_step(optimizer: Any) -> None:
    """A global optimizer-step post-hook (after the versions of the parameters it wrote without
    bumping them were bumped): the verdicts noted by :func:`before_step` hold for the new values."""
    pending = optimizer.__dict__.pop(_PENDING, None)
    for p in pending or ():
        setattr(p, _VERDICT, (*_key(p), getattr(p, _VERDICT)[2]))
