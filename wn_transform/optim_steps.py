"""What an optimizer step tells this library: which parameters it wrote.

Two things count on version counters to notice writes to ``g`` and ``v``: the eval-mode weight
cache (:meth:`~wn_transform.parametrization.WeightNorm.cached_weight`) and, on CUDA, the
verdict that a direction has no zero unit (:mod:`wn_transform.nonzero`).  Global
``torch.optim`` step hooks, which every ``Optimizer`` subclass runs, keep both true:

* after a step, the version counters of the parameters an optimizer may have written without
  bumping them are bumped: those of torch's fused groups (``fused=True``) and of optimizers from
  outside ``torch.optim`` (which may write through raw pointers).  torch's other optimizers write
  with in-place ops, which bump them already.  Only the stepped optimizer's parameters: a frozen
  teacher's kept weights stay;
* a step carries the no-zero-direction verdicts of the parameters it wrote over to their new
  values (:func:`~wn_transform.nonzero.before_step`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import nonzero

__all__ = ["watch"]

_hooks: tuple[Any, Any] | None = None


def watch() -> None:
    """Register the step hooks, once per process (``torch.optim`` is imported on the first call)."""
    global _hooks
    if _hooks is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        _hooks = (register_optimizer_step_pre_hook(_before_step), register_optimizer_step_post_hook(_after_step))


def _before_step(optimizer: Any, args: tuple, kwargs: dict) -> None:
    nonzero.before_step(optimizer)


def _after_step(optimizer: Any, args: tuple, kwargs: dict) -> None:
    outside = not type(optimizer).__module__.startswith("torch.optim")
    written = [p for group in optimizer.param_groups if outside or group.get("fused")
               for p in group["params"] if isinstance(p, Tensor) and not p.is_inference()]
    if written:
        torch.autograd.graph.increment_version(written)
    nonzero.after_step(optimizer)
