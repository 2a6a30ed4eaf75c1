"""What torch's standard layers do with their weights, known from their source.

Used where a graph does not show the ops: leaf modules in a ``symbolic_trace`` graph, and
the last step of the discovery ladder (a walk of module types).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.conv import _ConvNd

from .norm import UnitLayout

__all__ = ["standard_weights"]


def standard_weights(module: nn.Module) -> list[tuple[str, str, UnitLayout]]:
    """``(tensor name, op kind, unit layout)`` for each linear/conv weight ``module`` owns directly."""
    if isinstance(module, nn.Linear):
        return [("weight", "linear", UnitLayout(0))]
    if isinstance(module, _ConvNd):
        if module.transposed:
            return [("weight", "conv_transpose", UnitLayout(1, module.groups))]
        return [("weight", "conv", UnitLayout(0))]
    if isinstance(module, nn.RNNBase):  # weight_ih_l0, weight_hh_l0_reverse, weight_hr_l1 ...: one row per gate unit
        return [(name, "recurrent", UnitLayout(0)) for name in module._flat_weights_names if name.startswith("weight_")]
    if isinstance(module, nn.RNNCellBase):
        return [(name, "recurrent", UnitLayout(0)) for name in ("weight_ih", "weight_hh")]
    if isinstance(module, nn.MultiheadAttention):
        names = ["in_proj_weight"] if module._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        return [(name, "linear", UnitLayout(0)) for name in names]
    return []
