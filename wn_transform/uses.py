"""Follow parameters through a forward (an FX graph or an eager run) and log how ops use them.

Every discovery step feeds calls into one :class:`UseLog`: a parameter enters as a *source*,
view ops (``t``, ``transpose``, ``split``...) carry it on with its axes remapped, and so do ops
that only take out or put in unit axes (``squeeze``, ``unsqueeze``, a ``view`` to the same sizes):
the value is the weight again once each unit axis is back in its place.  A linear/conv/matmul op
that reads it as its weight logs a *weight use* (with the parameter axis that holds the op's
output units), and any other op that reads it logs an *other use*; an op from outside torch (a
custom op, a function that a trace keeps whole) is named in the report whatever it does, since
what it does with the weight cannot be seen.
Values computed from parameters, buffers and constants alone (not from the batch) are followed
too, so that a weight the op reads only after other ops (weight standardization, spectral norm)
is logged as *computed* and reported, not lost.
:meth:`UseLog.resolve` then turns the log into targets and skips, by the same rules whatever
step produced the log.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from .norm import UnitLayout
from .ops import (CELL_OPS, CONVERSIONS_LIKE, METADATA_OPS, RECURRENT_OPS, VALUE_ATTRIBUTES, WeightUse, attribute_read, op_name, view_dims,
                  weight_use)
from .layers import quantized_weight_reason
from .targets import Skipped, Target, split_qualname
from ._parametrized import plain_type

__all__ = ["BIAS", "LOOPING_OPS", "UseLog", "gradient_hooks", "inside_torch_composite", "param_aliases"]


#: Higher-order ops that run their body in a loop (torch._higher_order_ops), whose subgraphs
#: discovery does not follow (discover._HOP_OPAQUE): a parameter read there is reported so.
LOOPING_OPS = frozenset({"map_impl", "scan", "associative_scan", "while_loop", "while_loop_stack_output"})


@dataclass(frozen=True)
class _Origin:
    """A value that is (a view of) parameter ``param``: its axis i is the parameter's ``axes[i]``,
    or a unit axis that an op put in (``None``)."""

    param: str
    axes: tuple[int | None, ...]
    cut: frozenset[int] = frozenset()  # parameter axes that a split has cut
    pieces: bool = False  # an FX node standing for a split's tuple of pieces: getitem picks one
    dropped: frozenset[int] = frozenset()  # parameter axes (of size 1) that an op took out
    reshaped_by: tuple[str, ...] = ()  # the ops that took out or put in unit axes not yet back in place

    @property
    def whole(self) -> bool:
        """Whether the value has the parameter's own axes (in some order): every unit axis taken
        out is back in its place, and no other was put in."""
        return not self.dropped and None not in self.axes


@dataclass(frozen=True)
class _Use:
    kind: str  # a WeightUse kind, "bias" or "other"
    layout: UnitLayout | None = None
    detail: str = ""  # for "other": the op; for a weight use: how it was found, if not by the log's step
    own: bool = False  # the op ran as the parameter's module's own call (not a parent's, not functional)
    part: bool = False  # the op read some of the units (a slice along the unit axis: attention's q, or k and v)


# Ops that select values of their first argument: the values come from it alone, whatever the index
# (``w[idx]`` is ``getitem`` in a trace, ``index`` in an exported graph).
_SELECTIONS = frozenset({"getitem", "__getitem__", "index_select", "take", "gather", "select", "index", "_unsafe_index",
                         "take_along_dim"})
_COMPUTED = "computed"  # a use kind: the parameter reaches a linear/conv op only through other ops
BIAS = "bias"  # a use kind: read as the bias of a linear/conv op
_NOT_WEIGHT = frozenset({"other", _COMPUTED, BIAS})
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Products that act on the data with a matrix other than as a linear/conv weight (a use is reported)
_MAP_OPS = frozenset({"einsum", "bmm", "baddbmm", "addbmm", "matmul", "__matmul__", "__rmatmul__", "mm", "mv", "bilinear",
                      "tensordot", "linear", "addmm", "addmv", "inner", "chain_matmul", "linalg_multi_dot",
                      "_grouped_mm", "grouped_mm", "_scaled_mm", "_scaled_grouped_mm",
                      "cdist", "_cdist_forward", "_euclidean_dist",  # distances to a codebook's rows (VQ)
                      "conv_tbc"})  # fairseq's ConvTBC (time, batch, channel), weight (k, in, out)
_AS_VECTOR = "as a 1-D weight"  # a linear/matmul op read the parameter as a vector
_ADDED_INPUT = frozenset({"addmm", "baddbmm", "addbmm", "addmv"})  # ops whose first operand is added, not multiplied
_ADDED_LAST = {"linear": 2, "bilinear": 3, "conv_tbc": 2}  # ops whose operands after these are added (a bias), not multiplied
# Namespaces of torch's own operators: an operator in any other one is a custom op (torch.library)
_TORCH_NAMESPACES = frozenset({"aten", "prim", "prims", "higher_order", "quantized", "_quantized", "quantized_decomposed",
                               "c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor", "inductor", "mkldnn",
                               "onednn", "profiler", "_export", "debugprims", "rngprims", "symm_mem"})
_TORCH_MODULES = frozenset({"torch", "operator", "_operator", "builtins", "math"})  # Python functions a trace may call
# Reads of a parameter by torch's own module machinery (``Module.to``, ``.float()`` in a forward): its tensor type
# compared, its ``.data`` set to itself converted.  Not a use of the values.
_MACHINERY = frozenset({"_has_compatible_shallow_copy_type"})
# Ops that may only take out or put in unit axes (``w.view(C, k)`` of a ``[C, 1, k]`` weight)
_SQUEEZES = frozenset({"squeeze", "squeeze_copy"})
_UNSQUEEZES = frozenset({"unsqueeze", "unsqueeze_copy"})
_RESHAPES = frozenset({"view", "reshape", "_unsafe_view", "view_copy", "flatten", "unflatten"})


def _einsum_contracts(values: list[Any], operand: Any) -> bool:
    """Whether ``einsum(equation, *operands)`` sums over an index of ``operand`` (a product that maps
    the data), not only multiplies it elementwise (``'bij,ij->bij'``: a gate)."""
    equation = values[0] if values and isinstance(values[0], str) else None
    index = next((i for i, v in enumerate(values[1:]) if v is operand), None)
    if equation is None or index is None:
        return True
    inputs, arrow, output = equation.replace(" ", "").replace(".", "").partition("->")
    terms = inputs.split(",")
    if not arrow:  # implicit output: the indices that appear once
        joined = "".join(terms)
        output = "".join(c for c in joined if joined.count(c) == 1)
    return index < len(terms) and bool(set(terms[index]) - set(output))


def _foreign_op(func: Callable | str) -> str | None:
    """The name of an op from outside torch, or ``None`` for torch's own ops and tensor methods.

    Such an op (a custom op, ``transformers::grouped_mm_fallback``; a Python function that a
    trace keeps whole) may multiply the data by a weight it reads, or do anything else with it:
    no rule here can tell, so the weight is named in the report with the op.
    """
    if isinstance(func, str):
        return None  # a method call in an FX graph
    qualified = getattr(func, "_qualified_op_name", None)  # an OpOverloadPacket: "namespace::name"
    namespace = getattr(func, "namespace", None)  # an OpOverload, a higher-order op
    if isinstance(qualified, str):
        namespace = qualified.partition("::")[0]
    elif isinstance(namespace, str):
        qualified = f"{namespace}::{op_name(func)}"
    if isinstance(namespace, str):
        return None if namespace in _TORCH_NAMESPACES else qualified
    module = getattr(func, "__module__", None)
    if not isinstance(module, str) or module.partition(".")[0] in _TORCH_MODULES:
        return None  # a tensor method (no module), a torch function, an operator, a builtin
    return f"{module}.{getattr(func, '__qualname__', op_name(func))}"


def _arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, key: str, default: Any = None) -> Any:
    """Argument ``index`` of a call, or its keyword ``key``."""
    return args[index] if len(args) > index else kwargs.get(key, default)


def _ints(values: Sequence[Any]) -> list[int] | None:
    """``values`` (a list or tuple argument spelled out) as plain ints; ``None`` if one is not an int
    (a traced size, a dtype): then the sizes are not known."""
    flat = _flat(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        return None
    return [int(v) for v in flat]


def _reshaped_sizes(name: str, args: Sequence[Any], kwargs: dict[str, Any], sizes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The sizes of the result of ``view``/``reshape``/``flatten``/``unflatten`` on a tensor of
    ``sizes``; ``None`` where they are not known (a size that is a traced value, a view as a dtype)."""
    ndim = len(sizes)
    if name == "flatten":
        dims = _ints([_arg(args, kwargs, 1, "start_dim", 0), _arg(args, kwargs, 2, "end_dim", -1)])
        if dims is None or ndim == 0:
            return None
        start, end = dims[0] % ndim, dims[1] % ndim
        return (*sizes[:start], math.prod(sizes[start:end + 1]), *sizes[end + 1:])
    if name == "unflatten":
        dim, new = _arg(args, kwargs, 1, "dim"), _ints([_arg(args, kwargs, 2, "sizes", ())])
        if not isinstance(dim, int) or new is None or ndim == 0:
            return None
        out = [*sizes[:dim % ndim], *new, *sizes[dim % ndim + 1:]]
    else:
        out = _ints(args[1:] if len(args) > 1 else [kwargs.get("size", kwargs.get("shape", ()))])
        if out is None:
            return None
    known = math.prod(s for s in out if s != -1)
    if out.count(-1) == 1 and known:
        out[out.index(-1)] = math.prod(sizes) // known
    return tuple(out) if math.prod(out) == math.prod(sizes) and min(out, default=0) >= 0 else None


def _unit_axes_moved(source: _Origin, sizes: tuple[int, ...], out: tuple[int, ...]) -> _Origin | None:
    """``source`` (of ``sizes``) reshaped to ``out``, if the reshape only takes out or puts in unit
    axes: the other axes keep their order; the parameter's unit axes count as taken out, and a unit
    axis of the result as put in, until one is back in its place (:meth:`UseLog._settled`)."""
    kept_in = [i for i, size in enumerate(sizes) if size != 1]
    kept_out = [j for j, size in enumerate(out) if size != 1]
    if [sizes[i] for i in kept_in] != [out[j] for j in kept_out]:
        return None
    axes: list[int | None] = [None] * len(out)
    for i, j in zip(kept_in, kept_out):
        axes[j] = source.axes[i]
    taken = {a for a, size in zip(source.axes, sizes) if size == 1 and a is not None}
    return replace(source, axes=tuple(axes), dropped=source.dropped | taken)


def _flat(values: Sequence[Any]) -> list[Any]:
    """The values, with those in a list or tuple argument (``torch.cat([a, b])``) spelled out."""
    flat = []
    for value in values:
        flat.extend(value if isinstance(value, (list, tuple)) else (value,))
    return flat


def _is_torch_composite(module: nn.Module) -> bool:
    """Whether ``module``'s forward is one of torch.nn's layers (not a container, not a bare Module)."""
    forward = getattr(plain_type(module), "forward", None)
    where = getattr(forward, "__module__", None) or ""
    return where.startswith("torch.nn.modules.") and where != "torch.nn.modules.module" and not isinstance(module, _CONTAINERS)


def inside_torch_composite(model: nn.Module, path: str) -> bool:
    """Whether a torch.nn layer other than a container holds the layer at ``path``.

    Such a parent may read its children's parameters itself on some path: MultiheadAttention
    always reads ``out_proj``'s, TransformerEncoderLayer reads ``linear1``'s in its inference
    fast path.  A trace of one path cannot show that the others call the child.
    """
    parent = model
    for part in path.split(".") if path else ():
        if _is_torch_composite(parent):
            return True
        parent = parent._modules[part]
    return False


def gradient_hooks(param: nn.Parameter) -> str:
    """Why a Parameter with gradient hooks is left alone, or ''.  A hook on the weight (a PixelCNN
    that keeps its masked taps at 0 with ``weight.register_hook(lambda g: g * mask)``) belongs to
    that tensor: ``g`` and ``v`` would replace it and the hook would never run again."""
    hooks = [*(getattr(param, "_backward_hooks", None) or {}).values(),
             *(getattr(param, "_post_accumulate_grad_hooks", None) or {}).values()]
    if not hooks:
        return ""
    return (f"its Parameter has {len(hooks)} gradient hook{'s' if len(hooks) > 1 else ''} (register_hook, "
            "register_post_accumulate_grad_hook: a mask on its gradient), which g and v would replace, and the hook "
            "would no longer run; exclude it, or remove the hook and put it on v")


def _adapter_base(model: nn.Module, qualname: str) -> str:
    """Why a weight is left alone as the frozen base layer of a peft adapter (LoRA, DoRA...), or ''.

    peft merges the adapter into that weight in place (``merge_and_unload``, ``merge_adapter``:
    ``base_layer.weight.data += delta``), which a computed weight would silently lose, and the
    base does not train; the adapter's own layers are normalized.  Told by the class (peft's
    ``BaseTunerLayer``) without importing peft.
    """
    module = split_qualname(qualname)[0]
    parent_path, child = split_qualname(module) if module else ("", "")
    if child != "base_layer":
        return ""
    parent = model.get_submodule(parent_path)
    if not any(k.__name__ == "BaseTunerLayer" and k.__module__.startswith("peft.") for k in type(parent).__mro__):
        return ""
    return (f"the base layer of a peft adapter ({type(parent).__name__}): peft merges the adapter into it in place "
            "(merge_and_unload), which a weight-normalized layer would lose; the adapter's own layers are normalized")


def param_aliases(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> every qualified name it has`` (more than one when weights are tied)."""
    aliases: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases[id(param)].append(name)
    return dict(aliases)


@dataclass
class UseLog:
    """Uses of a model's parameters, keyed by canonical parameter name."""

    model: nn.Module
    key: Callable[[Any], Hashable | None]  # value -> key under which its origin is stored
    uses: dict[str, list[_Use]] = field(default_factory=lambda: defaultdict(list))
    _origins: dict[Hashable, _Origin] = field(default_factory=dict)
    _static: dict[Hashable, frozenset[str]] = field(default_factory=dict)  # batch-independent values: their parameters
    _keep_alive: list[Any] = field(default_factory=list)
    maps: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # parameter -> ops it maps data through
    unknown: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # parameter -> ops from outside torch
    ran: set[int] = field(default_factory=set)  # id() of every module seen running an op (a call's ``caller``)

    def __post_init__(self) -> None:
        self.aliases = param_aliases(self.model)
        self._canonical = {name: names[0] for names in self.aliases.values() for name in names}
        self._sizes = {name: tuple(p.shape) for name, p in self.model.named_parameters(remove_duplicate=False)}

    def canonical(self, param_name: str) -> str:
        """The first name of a parameter that has several (tied weights)."""
        return self._canonical.get(param_name, param_name)

    # -- feeding -------------------------------------------------------------------------
    def source(self, value: Any, param_name: str, ndim: int) -> None:
        """``value`` is the parameter ``param_name`` itself."""
        self._set(value, _Origin(self.canonical(param_name), tuple(range(ndim))))

    def add_use(self, param_name: str, kind: str, layout: UnitLayout | None = None, detail: str = "",
                own: bool = False) -> None:
        """``own``: the op ran as the module's own call (the module that holds ``param_name``)."""
        self.uses[self.canonical(param_name)].append(_Use(kind, layout, detail, own))

    def same(self, value: Any, like: Any) -> None:
        """``value`` is ``like`` under another name (a subgraph's input, or output, in its caller)."""
        origin = self._origin(like)
        key = self.key(like)
        if origin is not None:
            self._set(value, origin)
        elif key is not None and key in self._static:
            self._mark_static(value, self._static[key])

    def map_use(self, param_name: str, op: str) -> None:
        """The parameter (or a value computed from it) acts on the data through ``op``, which is not
        a linear/conv op this library normalizes (``einsum``, ``bmm``, ``Bilinear``...)."""
        self.maps[self.canonical(param_name)].add(op)

    def static(self, value: Any) -> None:
        """``value`` is a buffer or constant of the model: it does not depend on the batch."""
        self._mark_static(value, frozenset())

    def call(self, func: Callable | str, args: Sequence[Any], kwargs: dict[str, Any], result: Any,
             caller: nn.Module | None = None) -> None:
        """Log one op call ``result = func(*args, **kwargs)``; ``caller`` is the innermost module
        whose call ran it (``None``: not known)."""
        if caller is not None:
            self.ran.add(id(caller))
        name = op_name(func)
        foreign = _foreign_op(func)
        if foreign is not None:  # before the names below: a custom op may be called "linear" too
            self._unknown_call(foreign, _flat((*args, *kwargs.values())), result)
            return
        if name in RECURRENT_OPS or name in CELL_OPS:
            self._recurrent(args)
            return
        if self._machinery(name, func, args):
            return
        attribute = attribute_read(func, args)
        if attribute in VALUE_ATTRIBUTES:
            name = f".{attribute}"  # W.T is a view (below); W.data hands out the values, detached
        elif name in METADATA_OPS:
            self.static(result)
            return
        if name in CONVERSIONS_LIKE and len(args) > 1 and self._origin(args[1]) is not None:
            args = args[:1]  # x.type_as(w): w's dtype and device alone, not its values
        values = _flat((*args, *kwargs.values()))
        found = [(arg, origin) for arg in values if (origin := self._origin(arg)) is not None]
        if name in _MAP_OPS:
            self._note_maps(name, values)
        use = weight_use(func, args, kwargs)
        if use is not None:
            self._computed_weight_use(use)
            for arg, origin in found:
                own = caller is not None and caller is self._owner(origin.param)
                if arg is use.weight:
                    self._weight_use(origin, use.kind, use.unit_dim, use.groups, own)
                elif arg is use.bias and origin.whole:
                    self.add_use(origin.param, BIAS, detail=f"{name} (as its bias)", own=own)
                elif arg is use.bias:  # through a unit axis taken out or put in: another tensor than the bias
                    self._other_use(origin, f"{name} (as its bias)")
                else:
                    self._other_use(origin, f"{name} (not as its weight)")
            self._follow_static(values, result)  # U @ V: a weight computed in the forward, if an op reads it as one
            return
        source = self._origin(args[0]) if args else None
        mapping = view_dims(func, args, kwargs, len(source.axes)) if source is not None else None
        if name == "getitem" and source is not None and source.pieces:  # one piece of a split (FX)
            mapping = (list(range(len(source.axes))), None)
        unit_view = self._unit_view(name, args, kwargs, source) if source is not None and mapping is None else None
        if unit_view is not None:
            self._set(result, unit_view)
            return
        if mapping is None:  # indexing a weight (w[expert]) is not followed as a view: it drops an axis
            for _, origin in found:
                self._other_use(origin, name)
            self._follow_static(values[:1] if name in _SELECTIONS else values, result)
            return
        axes, cut_axis = mapping
        cut = source.cut | ({source.axes[cut_axis]} - {None} if cut_axis is not None else set())
        pieces = cut_axis is not None and not isinstance(result, (tuple, list))
        origin = replace(source, axes=tuple(source.axes[a] for a in axes), cut=frozenset(cut), pieces=pieces)
        for item in result if isinstance(result, (tuple, list)) else (result,):
            self._set(item, origin)

    # -- resolving -----------------------------------------------------------------------
    def resolve(self, found_by: str) -> tuple[list[Target], list[Skipped]]:
        """Targets: weights read only as linear/conv weights, with one unit layout, untied."""
        targets: list[Target] = []
        skipped: list[Skipped] = []
        params = dict(self.model.named_parameters())
        aliases = {names[0]: names for names in self.aliases.values()}
        for name, uses in self.uses.items():
            weight_uses = [u for u in uses if u.kind not in _NOT_WEIGHT]
            if name not in params:
                continue
            computed = [u.detail for u in uses if u.kind == _COMPUTED]
            if not weight_uses:
                reason = self._reason_not_a_weight(name, uses, params[name].ndim)
                if reason:
                    skipped.append(Skipped(name, reason))
                continue
            reason = (self._reason_to_skip(self._tied_names(aliases[name]), uses, weight_uses)
                      or _adapter_base(self.model, name) or gradient_hooks(params[name]))
            if computed and not reason:  # V of F.linear(x, U @ V): the matmul is a factor of a weight
                reason = (f"also reaches a {computed[0]} op as a factor of a weight computed in the forward "
                          "(a factorized or merged weight, U @ V), which weight norm on the Parameter would change")
            if not reason and params[name].numel() == 0:
                reason = f"empty (shape {tuple(params[name].shape)}): there is nothing to normalize"
            if reason:
                skipped.append(Skipped(name, reason))
                continue
            module, tensor = split_qualname(name)
            kinds = [u.kind for u in weight_uses]
            kind = max(kinds, key=kinds.count)  # the most common (the first, on a tie)
            layout = weight_uses[0].layout
            how = weight_uses[0].detail or found_by
            own_call = self._own_call(module, weight_uses, aliases)
            calls = sum(not u.part for u in weight_uses) + any(u.part for u in weight_uses)  # slices: one read
            targets.append(Target(module, tensor, kind, tuple(params[name].shape), layout, how, calls, own_call))
        return targets, skipped

    def _reason_not_a_weight(self, name: str, uses: list[_Use], ndim: int) -> str:
        """Why a parameter that no linear/conv op reads as its weight is reported, or '' (a vector, a
        table the data only indexes or is added to: not a layer's weight, not listed).

        A matrix that acts on the data through another op, or that an op from outside torch reads,
        is named with that op, a layer's weight too: :func:`~wn_transform.discover.account_for_every_layer`
        would only say that its op does not read it.
        """
        module, tensor = split_qualname(name)
        owner = self.model.get_submodule(module)
        if tensor == "weight" and (quantized := quantized_weight_reason(owner)):  # fused QAT layers (ConvBnReLU2d)
            return quantized
        parent = self.model.get_submodule(split_qualname(module)[0]) if module else None
        if (tensor == "weight" and parent is not None and hasattr(parent, "weight_fake_quant")
                and isinstance(owner, nn.modules.batchnorm._BatchNorm)):  # ConvBn2d's gamma scales the conv weight
            return ("the batch norm that quantization-aware training folds into its conv's fake-quantized weight; "
                    "weight norm would change what is quantized")
        computed = [u.detail for u in uses if u.kind == _COMPUTED]
        if computed:
            ops = ", ".join(sorted({u.detail for u in uses if u.kind == "other"}))
            return (f"reaches its {computed[0]} op only through other ops ({ops}): a weight computed or selected in the "
                    "forward (weight standardization, spectral norm, an expert picked by index...), which weight norm on "
                    "the Parameter would change")
        vector = sorted({u.detail for u in uses if u.kind == "other" and u.detail.endswith(_AS_VECTOR)})
        if vector:
            return (f"read by {vector[0]} (one output per row, a dot product): a 1-D weight has no output-unit axis "
                    "for weight norm; to normalize it, make it a (1, in) matrix (a Linear with one output)")
        if ndim < 2:
            return ""
        loops = sorted({u.detail for u in uses if u.kind == "other" and u.detail in LOOPING_OPS})
        if loops:
            return (f"read inside the body of torch's {', '.join(loops)} (a loop whose body torch.export keeps as a "
                    "subgraph, its carried values changing between iterations), which this library does not follow: "
                    "its op cannot be seen; write the loop in Python (a for loop over the steps) to normalize it")
        reasons = []
        if self.maps.get(name):
            reasons.append(f"acts on the data through {', '.join(sorted(self.maps[name]))}, not as the weight of a "
                           "linear/conv op: this library normalizes linear, conv and recurrent weights only")
        if self.unknown.get(name):
            reasons.append(f"{'also ' if reasons else ''}read by {', '.join(sorted(self.unknown[name]))}, which weight norm "
                           "does not know: an op from outside torch, whose use of the weight cannot be seen")
        return "; ".join(reasons)

    def _own_call(self, module: str, weight_uses: list[_Use], aliases: dict[str, list[str]]) -> bool:
        """Whether the op's output is the layer's output: every read of the weight, and every read
        of the layer's ``bias`` (which a mean-only batch norm takes over), ran as the layer's own
        module call, and no torch.nn layer around it reads them itself on another path."""
        if not all(u.own for u in weight_uses) or inside_torch_composite(self.model, module):
            return False
        bias = self.canonical(f"{module}.bias" if module else "bias")
        if bias not in aliases:
            return True  # no bias Parameter
        return not self._tied_names(aliases[bias]) and all(u.kind == BIAS and u.own for u in self.uses.get(bias, ()))

    def _tied_names(self, names: list[str]) -> list[str]:
        """The names of ``names[0]``'s Parameter that belong to another module or attribute.

        One module reachable under two paths (``self.head = self.blocks[-1]``) holds its
        Parameter once: a parametrization on that module serves both paths, so nothing is tied.
        """
        def owner(name: str) -> tuple[int, str]:
            module, tensor = split_qualname(name)
            return id(self.model.get_submodule(module)), tensor

        first = owner(names[0])
        return [name for name in names[1:] if owner(name) != first]

    @staticmethod
    def _reason_to_skip(tied: list[str], uses: list[_Use], weight_uses: list[_Use]) -> str:
        """Why a weight (the same Parameter as the ``tied`` names) is not a target, or ''."""
        if tied:
            return f"tied: the same Parameter is also {', '.join(tied)}; normalizing it would untie it"
        others = sorted({u.detail for u in uses if u.kind in ("other", BIAS)})
        if others:
            return f"shared: also read by {', '.join(others)}, which weight norm would change"
        layouts = {u.layout for u in weight_uses}
        if None in layouts:
            return "read through a slice or view that does not keep whole output units"
        if len(layouts) > 1:
            axes = sorted(f"dim {layout.dim}" + (f" in {layout.groups} groups" if layout.groups > 1 else "")
                          for layout in layouts)
            tie = " (the weight and its transpose: a transposed tie, as an autoencoder's decoder)" if {
                (layout.dim, layout.groups) for layout in layouts} == {(0, 1), (1, 1)} else ""
            return f"read with different output-unit axes ({', '.join(axes)}){tie}"
        return ""

    # -- helpers -------------------------------------------------------------------------
    def _recurrent(self, args: Sequence[Any]) -> None:
        """A recurrent op reads its matrices (in a list, for whole layers) one gate unit per row;
        its biases are added to the gates, which weight norm leaves alone."""
        for item in _flat(args):
            origin = self._origin(item)
            if origin is not None and len(origin.axes) == 2:
                self._weight_use(origin, "recurrent", 0, 1)

    def _owner(self, param_name: str) -> nn.Module:
        """The module that holds the parameter ``param_name``."""
        return self.model.get_submodule(split_qualname(param_name)[0])

    def _weight_use(self, origin: _Origin, kind: str, unit_dim: int, groups: int, own: bool = False) -> None:
        if not origin.whole:  # a unit axis taken out or put in: not the weight's own layout
            self._other_use(origin, "")
            if kind != "matmul":  # (as in _computed_weight_use)
                self.uses[origin.param].append(_Use(_COMPUTED, None, kind))
            return
        if len(origin.axes) < 2:  # F.linear(x, w) with w [in]: a dot product per row, no unit axis
            self.add_use(origin.param, "other", detail=f"{kind} {_AS_VECTOR}")
            return
        if kind == "matmul" and len(origin.axes) != 2:
            self.add_use(origin.param, "other", detail="matmul with a weight of rank other than 2")
            return
        unit_axis = origin.axes[unit_dim]
        whole_units = origin.cut <= {unit_axis} and (groups == 1 or not origin.cut)
        layout = UnitLayout(unit_axis, groups) if whole_units and (groups == 1 or unit_axis == 1) else None
        self.uses[origin.param].append(_Use(kind, layout, own=own, part=unit_axis in origin.cut))

    def _computed_weight_use(self, use: WeightUse) -> None:
        """A linear/conv op's weight is computed from parameters (and buffers) alone, not read as
        it is: note it against each parameter it came from.  (A bare matmul's computed operand is
        as often a codebook or a position table as a layer weight: not noted.)"""
        if use.kind == "matmul" or self._origin(use.weight) is not None:
            return
        for param in self._static.get(self.key(use.weight), ()) if self.key(use.weight) is not None else ():
            self.uses[param].append(_Use(_COMPUTED, None, use.kind))

    def _follow_static(self, values: list[Any], result: Any) -> None:
        """A result computed from parameters, buffers and constants alone does not depend on the
        batch: remember which parameters it came from (a weight computed in the forward)."""
        params: frozenset[str] = frozenset()
        for value in values:
            if self.key(value) is None:
                continue  # not a tensor: a number, a dtype, a shape
            origin = self._origin(value)
            known = frozenset({origin.param}) if origin is not None else self._static.get(self.key(value))
            if known is None:
                return  # depends on the batch, or on a tensor the log never saw
            params |= known
        for item in result if isinstance(result, (tuple, list)) else (result,):
            self._mark_static(item, params)

    def _mark_static(self, value: Any, params: frozenset[str]) -> None:
        key = self.key(value)
        if key is not None:
            self._static[key] = params
            self._keep_alive.append(value)

    def _note_maps(self, name: str, values: list[Any]) -> None:
        """A product op (``einsum``, ``bmm``, a matmul) between the data and parameters, or values
        computed from them alone: note it against those parameters."""
        operands = values[1:3] if name in _ADDED_INPUT else values[: _ADDED_LAST.get(name)]  # not an added input
        keys = [key for value in operands if (key := self.key(value)) is not None]
        if all(key in self._origins or self._static.get(key) for key in keys):
            return  # parameters alone (U @ V): at most a computed weight
        for value in operands:
            params = self._params_of(value)
            if len(params) == 1 and (name != "einsum" or _einsum_contracts(values, value)):  # one matrix, not a mix
                self.maps[next(iter(params))].add(name)

    def _other_use(self, origin: _Origin, op: str) -> None:
        """``op`` reads the value ``origin`` stands for, not as a weight ('': only the ops that took out
        or put in unit axes of it, which are named too)."""
        for name in (op, *origin.reshaped_by) if op else origin.reshaped_by:
            self.add_use(origin.param, "other", detail=name)

    def _unknown_call(self, op: str, values: list[Any], result: Any) -> None:
        """An op from outside torch reads ``values``: each parameter among them, or that they were
        computed from, is read by it (and the values it returns are computed from them)."""
        for value in values:
            origin = self._origin(value)
            if origin is not None:
                self._other_use(origin, op)
            for param in self._params_of(value):
                self.unknown[param].add(op)
        self._follow_static(values, result)

    def _params_of(self, value: Any) -> frozenset[str]:
        """The parameters ``value`` is a view of, or was computed from alone (none: it depends on the batch)."""
        key = self.key(value)
        origin = self._origins.get(key) if key is not None else None
        if origin is not None:
            return frozenset({origin.param})
        return self._static.get(key, frozenset()) if key is not None else frozenset()

    def _machinery(self, name: str, func: Callable | str, args: Sequence[Any]) -> bool:
        """Whether the call is torch's own module machinery on a parameter, not a use of its values:
        ``Module.to``/``.float()`` compare tensor types and set ``param.data`` to the parameter itself,
        converted (a forward that does ``self.router = self.router.to(dtype)``)."""
        if name in _MACHINERY:
            return True
        descriptor = getattr(getattr(func, "__self__", None), "__name__", None)
        if name != "__set__" or descriptor != "data" or len(args) != 2:
            return False
        target, value = self._origin(args[0]), self._origin(args[1])
        return target is not None and value is not None and target == value and target.whole

    def _unit_view(self, name: str, args: Sequence[Any], kwargs: dict[str, Any], source: _Origin) -> _Origin | None:
        """``source`` with unit axes taken out or put in by ``name`` (``squeeze``, ``unsqueeze``, a
        ``view`` or ``flatten`` that keeps the other sizes in order); ``None`` if the op does more, is
        no such op, or the sizes it needs are not known (an axis a split has cut, a traced size)."""
        if source.pieces or name not in _SQUEEZES | _UNSQUEEZES | _RESHAPES:
            return None
        sizes = tuple(1 if a is None else None if a in source.cut else self._sizes[source.param][a] for a in source.axes)
        if name in _UNSQUEEZES:
            dim = _arg(args, kwargs, 1, "dim")
            if not isinstance(dim, int):
                return None
            axes = list(source.axes)
            axes.insert(dim % (len(axes) + 1), None)
            moved: _Origin | None = replace(source, axes=tuple(axes))
        elif name in _SQUEEZES:
            moved = self._squeezed(source, sizes, _arg(args, kwargs, 1, "dim"))
        elif None in sizes:
            return None
        else:
            out = _reshaped_sizes(name, args, kwargs, sizes)
            moved = source if out == sizes else _unit_axes_moved(source, sizes, out) if out is not None else None
        if moved is None or moved == source:
            return moved
        return self._settled(replace(moved, reshaped_by=(*source.reshaped_by, name)))

    @staticmethod
    def _squeezed(source: _Origin, sizes: tuple[int | None, ...], dim: Any) -> _Origin | None:
        """``source`` (of ``sizes``, ``None`` where a split has cut) without its unit axes ``dim`` (an
        int, a list; ``None``: all); ``None`` if the size of one of those axes is not known."""
        if not sizes:
            return source  # a scalar: nothing to take out
        dims = list(range(len(sizes))) if dim is None else _ints([dim])
        if dims is None or any(sizes[d % len(sizes)] is None for d in dims):
            return None
        out = {d % len(sizes) for d in dims if sizes[d % len(sizes)] == 1}
        axes = tuple(a for i, a in enumerate(source.axes) if i not in out)
        taken = {source.axes[i] for i in out} - {None}
        return replace(source, axes=axes, dropped=source.dropped | taken)

    @staticmethod
    def _settled(origin: _Origin) -> _Origin:
        """``origin`` with each unit axis that is back in its place counted as the parameter's again: a
        parameter axis ``i`` taken out, and a unit axis put in at position ``i`` (``w.squeeze(1)
        .unsqueeze(1)``).  Once all are, the value is the weight in its own layout again."""
        back = {i for i, a in enumerate(origin.axes) if a is None and i in origin.dropped}
        axes = tuple(i if i in back else a for i, a in enumerate(origin.axes))
        settled = replace(origin, axes=axes, dropped=origin.dropped - back)
        return replace(settled, reshaped_by=()) if settled.whole else settled

    def _origin(self, value: Any) -> _Origin | None:
        key = self.key(value)
        return self._origins.get(key) if key is not None else None

    def _set(self, value: Any, origin: _Origin) -> None:
        key = self.key(value)
        if key is not None:
            self._origins[key] = origin
            self._keep_alive.append(value)  # ids stay unique while the log lives
