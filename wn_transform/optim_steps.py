"""What an optimizer step tells the eval-mode weight cache: which parameters it wrote.

The cache (:meth:`~wn_transform.parametrization.WeightNorm.cached_weight`) counts on version
counters to notice writes to ``g`` and ``v``.  torch's fused optimizers (``fused=True``) and
optimizers from outside ``torch.optim`` (which may write through raw pointers) write without
bumping them; a global ``torch.optim`` step post-hook, which every ``Optimizer`` subclass runs,
bumps the counters of the parameters they step.  torch's other optimizers write with in-place
ops, which bump them already.  Only the stepped optimizer's parameters: a frozen teacher's kept
weights stay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["watch"]

_hook: Any = None


def watch() -> None:
    """Register the step post-hook, once per process (``torch.optim`` is imported on the first call)."""
    global _hook
    if _hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _hook = register_optimizer_step_post_hook(_bump_written_parameters)


def _bump_written_parameters(optimizer: Any, args: tuple, kwargs: dict) -> None:
    outside = not type(optimizer).__module__.startswith("torch.optim")
    written = [p for group in optimizer.param_groups if outside or group.get("fused")
               for p in group["params"] if isinstance(p, Tensor) and not p.is_inference()]
    if written:
        torch.autograd.graph.increment_version(written)
