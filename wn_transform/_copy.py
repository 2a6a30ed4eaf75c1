"""Deep copies of models, including those that ``copy.deepcopy`` refuses."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["copy_model"]


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that leaves ``model`` untouched.

    Layers carrying the legacy ``torch.nn.utils.weight_norm`` hook keep the weight of their
    last forward as a plain attribute; after a forward with grad on it is a non-leaf tensor,
    and ``copy.deepcopy`` raises on those.  Such attributes are copied detached.
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)
