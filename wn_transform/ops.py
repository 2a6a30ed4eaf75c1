"""The op vocabulary shared by every discovery step and by the init pass.

Torch-level functions (``F.linear``), FX method calls (``"t"``) and aten overloads
(``aten.linear.default``) are all reduced to a plain name (:func:`op_name`), and their
arguments bound to names by one signature table, so that one set of rules says:

* which argument of a linear/conv/matmul op is the *weight*, and which axis of that weight
  holds the op's output units (:func:`weight_use`);
* how a view op (``t``, ``transpose``, ``permute``, ``split``...) maps the axes of its result
  to the axes of its input (:func:`view_dims`), so a parameter can be followed through them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CELL_OPS", "CONVERSIONS_LIKE", "METADATA_OPS", "RECURRENT_OPS", "VALUE_ATTRIBUTES", "WeightUse", "attribute_read", "bind", "op_name",
           "reads_metadata", "view_dims", "weight_use"]

_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")

SIGNATURES: dict[str, tuple[str, ...]] = {
    "linear": ("input", "weight", "bias"),
    **{f"conv{n}d": _CONV for n in (1, 2, 3)},
    **{f"conv_transpose{n}d": _CONV_T for n in (1, 2, 3)},
    "convolution": ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups"),
    "addmm": ("input", "mat1", "mat2"),
    "matmul": ("input", "other"),
    "mm": ("input", "other"),
    "__matmul__": ("input", "other"),
}

# Ops that read only a tensor's metadata: using a parameter here is not a use of its values.
METADATA_OPS = frozenset(
    {"__get__", "size", "dim", "numel", "stride", "getattr", "is_contiguous", "sym_size", "__len__",
     "element_size", "is_floating_point", "data_ptr", "sym_numel", "sym_stride", "get_device",
     # new tensors of the parameter's dtype, device (and shape): w.new_zeros(n), torch.zeros_like(w)
     "new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like",
     "full_like", "rand_like", "randn_like", "randint_like"}
)
# Ops whose second tensor lends only its dtype and device: x.type_as(w), x.to(w).
CONVERSIONS_LIKE = frozenset({"type_as", "to"})
# Recurrent layers' ops (``_VF.lstm``, ``aten.gru.input``...): their weights come in a list, one gate
# unit per row (weight_ih, weight_hh, weight_hr); whole layers, and cells.
RECURRENT_OPS = frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu"})
CELL_OPS = frozenset({"lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"})
# Ops whose result has the same axes as their input.
_SAME_AXES = frozenset(
    {"contiguous", "to", "_to_copy", "type_as", "float", "half", "bfloat16", "double", "clone", "alias",
     "type", "cpu", "cuda", "lift_fresh_copy"}
)
# Python functions that are another op under another name (``torch.linalg.matmul``).
_ALIASES = {"linalg_matmul": "matmul"}
# Ops that cut their input along one axis into pieces with the same axes.
_SPLITS = frozenset({"chunk", "split", "split_with_sizes", "tensor_split", "unsafe_split", "unsafe_chunk"})


def op_name(func: Callable | str) -> str:
    """``"linear"`` for ``F.linear``, ``"t"`` for FX's ``call_method('t')``, ``aten.linear.default``..."""
    if isinstance(func, str):
        return func
    if func is operator.getitem:
        return "getitem"
    if func is operator.matmul:
        return "matmul"
    name = getattr(func, "_opname", None)  # torch._ops.OpOverload / OpOverloadPacket
    if name is None:
        name = getattr(func, "__name__", "")
    return _ALIASES.get(name, name)


def bind(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Name the arguments of a call to one of the ops in :data:`SIGNATURES`."""
    bound = dict(zip(SIGNATURES[name], args))
    bound.update(kwargs)
    return bound


@dataclass(frozen=True)
class WeightUse:
    """A linear/conv/matmul op reads ``weight`` (an argument of the call) with its output
    units on ``unit_dim`` of that argument, in ``groups`` groups (grouped ConvTranspose)."""

    kind: str  # "linear" | "conv" | "conv_transpose" | "matmul"
    weight: Any
    bias: Any
    unit_dim: int
    groups: int = 1


def weight_use(func: Callable | str, args: Sequence[Any], kwargs: dict[str, Any]) -> WeightUse | None:
    """The weight this call reads as a linear/conv weight, or ``None`` for other ops."""
    name = op_name(func)
    if name not in SIGNATURES:
        return None
    bound = bind(name, args, kwargs)
    if name == "linear":
        return WeightUse("linear", bound.get("weight"), bound.get("bias"), 0)
    if name.startswith("conv_transpose") or (name == "convolution" and bound.get("transposed")):
        groups = int(bound.get("groups", 1) or 1)
        return WeightUse("conv_transpose", bound.get("weight"), bound.get("bias"), 1, groups)
    if name.startswith("conv"):
        return WeightUse("conv", bound.get("weight"), bound.get("bias"), 0)
    if name == "addmm":
        if bound.get("beta", 1) != 1 or bound.get("alpha", 1) != 1:
            return None
        return WeightUse("matmul", bound.get("mat2"), bound.get("input"), -1)
    return WeightUse("matmul", bound.get("other"), None, -1)


VALUE_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "data"})  # attribute reads that hand out a tensor's values


def reads_metadata(func: Callable | str, args: Sequence[Any]) -> bool:
    """Whether the call reads only its tensor's metadata (``w.shape``, ``w.size(0)``, ``w.dtype``),
    not its values (``w.T`` is a view)."""
    return op_name(func) in METADATA_OPS and attribute_read(func, args) not in VALUE_ATTRIBUTES


def attribute_read(func: Callable | str, args: Sequence[Any]) -> str | None:
    """The attribute an attribute read takes (FX's ``getattr(W, "T")``, eager ``Tensor.T.__get__``)."""
    name = op_name(func)
    if name == "getattr" and len(args) > 1 and isinstance(args[1], str):
        return args[1]
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", None)
    return None


def view_dims(func: Callable | str, args: Sequence[Any], kwargs: dict[str, Any], ndim: int) -> tuple[list[int], int | None] | None:
    """How a view op on a tensor of rank ``ndim`` (``args[0]``) maps axes.

    Returns ``(source_axes, split_axis)``: axis ``i`` of the result is axis
    ``source_axes[i]`` of the input, and ``split_axis`` is the input axis the op cut along
    (``None`` if it cuts nothing).  ``None`` when the op is not a view we can follow.
    """
    name = op_name(func)
    axes = list(range(ndim))
    attribute = attribute_read(func, args)
    if attribute in ("T", "H"):  # W.T: every axis reversed
        return axes[::-1], None
    if attribute in ("mT", "mH") and ndim >= 2:  # the last two axes swapped
        return [*axes[:-2], axes[-1], axes[-2]], None
    if name in _SAME_AXES:
        return axes, None
    if name in ("t", "numpy_T") and ndim == 2:
        return [1, 0], None
    if name in ("transpose", "swapaxes", "swapdims"):
        d0 = args[1] if len(args) > 1 else kwargs.get("dim0")
        d1 = args[2] if len(args) > 2 else kwargs.get("dim1")
        d0, d1 = d0 % ndim, d1 % ndim
        axes[d0], axes[d1] = axes[d1], axes[d0]
        return axes, None
    if name == "permute":
        dims = args[1:] if len(args) > 1 else kwargs.get("dims")
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        return [d % ndim for d in dims], None
    if name in _SPLITS:
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        return axes, dim % ndim
    return None
