"""What torch's standard layers do with their weights, known from their source.

Used where a graph does not show the ops: leaf modules in a ``symbolic_trace`` graph, and
the last step of the discovery ladder (a walk of module types).
"""

from __future__ import annotations

from torch import nn
from torch.ao.nn.quantized.dynamic.modules.rnn import RNNBase, RNNCellBase  # (imported by torch itself)
from torch.ao.nn.quantized.modules.utils import WeightedQuantizedModule
from torch.ao.nn.quantized.reference.modules.rnn import RNNBase as ReferenceRNNBase
from torch.ao.nn.quantized.reference.modules.rnn import RNNCellBase as ReferenceRNNCellBase
from torch.ao.nn.quantized.reference.modules.utils import ReferenceQuantizedModule
from torch.nn.modules.conv import _ConvNd

from .norm import UnitLayout

__all__ = ["quantized_kind", "quantized_layers", "quantized_weight_reason", "standard_weights"]



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


def quantized_kind(module: nn.Module) -> str | None:
    """What a layer of PyTorch's quantization holds (``"Linear (torch.ao.nn.quantized.dynamic)"``)
    when it is one with a weight (a quantized or dynamically quantized Linear, conv or RNN): an
    int8 tensor packed for its kernel, read through a method, not a Parameter; else None."""
    if not isinstance(module, (WeightedQuantizedModule, RNNBase, RNNCellBase)):
        return None
    kind = type(module)
    return f"{kind.__name__} ({kind.__module__.rsplit('.modules', 1)[0]})"


def quantized_weight_reason(module: nn.Module) -> str | None:
    """Why ``module.weight`` is left as it is when the layer quantizes it before its op: prepared
    for quantization-aware training (``weight_fake_quant``, the fused ``ConvBnReLU2d``... too), or
    a reference quantized layer (``convert_to_reference_fx``: quantize and dequantize with a
    fixed scale); else None.  Weight norm would change what is quantized."""
    if hasattr(module, "weight_fake_quant"):
        return "fake-quantized before its op (quantization-aware training); weight norm would change what is quantized"
    if isinstance(module, (ReferenceQuantizedModule, ReferenceRNNBase, ReferenceRNNCellBase)):
        return ("quantized and dequantized before its op with a fixed scale (a reference quantized layer); weight norm "
                "would change what is quantized")
    return None


def quantized_layers(model: nn.Module) -> list[str]:
    """``"name: kind"`` for each quantized layer of ``model`` (:func:`quantized_kind`)."""
    return [f"{name or '(root)'}: {kind}" for name, module in model.named_modules()
            if (kind := quantized_kind(module)) is not None]
