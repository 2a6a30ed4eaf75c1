"""Deep copies of models, including those that ``copy.deepcopy`` refuses."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["copy_model"]


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that leaves ``model`` untouched.

    Layers carrying the legacy ``torch.nn.utils.weight_norm`` hook keep the weight of their
    last forward as a plain attribute, and parametrized RNNs keep theirs in ``_flat_weights``;
    after a forward with grad on they are non-leaf tensors, and ``copy.deepcopy`` raises on
    those.  Such attributes are copied detached.
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            # RNNs keep their (parametrized) weights in a list, _flat_weights
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, torch.Tensor) and not item.is_leaf:
                    memo[id(item)] = item.detach().clone()
    return copy.deepcopy(model, memo)
