"""Deep copies of models, including those that ``copy.deepcopy`` refuses; telling ``torch.compile``'s wrapper."""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

__all__ = ["compiled_wrapper", "copy_model"]


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


def compiled_wrapper(model: object) -> bool:
    """Whether ``model`` is the wrapper ``torch.compile`` returns for a module (``OptimizedModule``);
    the module itself is its ``_orig_mod``.  (Without importing ``torch._dynamo``, 2 s: a wrapper
    exists only once it is imported.)"""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)
