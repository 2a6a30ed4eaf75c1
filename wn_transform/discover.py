"""Find every weight that reaches a linear or convolution op: the tracing ladder.

1. ``torch.fx.symbolic_trace``: cheap, needs no batch, fails on Python control flow.
2. ``torch.export`` on the sample batch: an aten-level FX graph; parameters are its
   placeholders (``graph_signature.inputs_to_parameters``).
3. Recording: run the sample batch under a ``TorchFunctionMode`` and log the ops that
   actually read each parameter (keyed by tensor identity).
4. Without a usable trace: a walk of torch's standard layer types, with a warning.

Steps 1-3 feed one :class:`~wn_transform.uses.UseLog`, so a weight is judged by the same
rules whichever step saw it.  The first step that succeeds is used.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import operator
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.utils.parametrizations import _SpectralNorm as _SpectralNormParametrization
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.overrides import TorchFunctionMode

from . import batch as batch_mod
from ._logging import muted
from .errors import BatchError, one_line, warn_user
from .layers import quantized_kind, quantized_weight_reason, standard_weights
from .mean_only_bn import MeanOnlyBatchNorm
from .ops import op_name
from .targets import Skipped, Target, split_qualname
from .uses import BIAS, LOOPING_OPS, UseLog, inside_torch_composite, param_aliases
from ._parametrized import is_parametrized, plain_type

__all__ = ["Discovery", "account_for_every_layer", "discover", "preserved_state"]

SYMBOLIC_TRACE = "symbolic_trace"
EXPORT = "torch.export"
RECORDED = "recorded"
WALK = "module walk"


@dataclass
class Discovery:
    """The weights found, those skipped, the step that found them, and why earlier steps failed."""

    targets: list[Target]
    skipped: list[Skipped]
    found_by: str
    failures: dict[str, str] = field(default_factory=dict)


def discover(model: nn.Module, sample_batch: batch_mod.SampleBatch | None = None) -> Discovery:
    """Run the ladder on ``model`` (which it leaves as it found it)."""
    failures: dict[str, str] = {}
    # Only tracing failures move down the ladder; resolving a trace's log is the library's own code.
    try:
        with preserved_state(model, eval_mode=False, attributes=True):  # fx runs a forward's ops on buffers for
            log = _symbolic_trace_log(model)  # real, and a forward's `self.h = h` would keep a Proxy
    except Exception as exc:  # any tracing failure moves one step down the ladder
        failures[SYMBOLIC_TRACE] = one_line(exc)
    else:
        return _finish(log, model, SYMBOLIC_TRACE, failures)
    if sample_batch is not None:
        try:
            with preserved_state(model):
                log = _export_log(model, sample_batch)
        except Exception as exc:
            failures[EXPORT] = one_line(exc)
        else:
            return _finish(log, model, EXPORT, failures)
        try:
            with preserved_state(model):
                log = _recorded_log(model, sample_batch)
        except BatchError:
            raise
        except Exception as exc:
            failures[RECORDED] = one_line(exc)
        else:
            return _finish(log, model, RECORDED, failures)
    detail = "; ".join(f"{step}: {why}" for step, why in failures.items())
    hint = "" if sample_batch is not None else " Pass a sample_batch to trace it with torch.export."
    msg = (
        f"could not trace {type(model).__name__} ({detail}); converting torch's standard layers found "
        f"by module type. Weights used through functional calls may be missed.{hint}"
    )
    warn_user(msg)
    return Discovery(*_walk_log(model).resolve(WALK), WALK, failures)


def _finish(log: UseLog, model: nn.Module, found_by: str, failures: dict[str, str]) -> Discovery:
    """Resolve a trace's log; standard layers the forward never reached are added by type.

    A layer that a trace does not reach (used only by another method, or on a branch the
    sample batch did not take) still computes with its weight the way its type says.  One that
    ran torch's own forward without reading its weight was given another weight for the call
    (``torch.func.functional_call``, a hypernetwork's generated weight): its Parameter is not what
    it computes with, and is skipped.
    """
    ran_without: list[Skipped] = []
    for name, module in model.named_modules():
        for tensor, kind, layout in standard_weights(module):
            qualname = f"{name}.{tensor}" if name else tensor
            if not _is_own_parameter(module, tensor) or log.canonical(qualname) in log.uses:
                continue
            if id(module) in log.ran and _runs_torch_forward(module):
                ran_without.append(Skipped(qualname, (
                    f"its layer runs with another tensor as its {tensor} (torch.func.functional_call "
                    "or torch.nn.utils.stateless with other parameters, a generated weight): the Parameter is not what "
                    "it computes with")))
            else:
                log.add_use(qualname, kind, layout, detail=f"{WALK} (not reached by {found_by})")
    targets, skipped = log.resolve(found_by)
    return Discovery(targets, skipped + ran_without, found_by, failures)


def _runs_torch_forward(module: nn.Module) -> bool:
    """Whether ``module``'s forward is torch's own (its class's, from ``torch.nn``), which reads its weight."""
    forward = module.__dict__.get("forward", type(module).forward)
    return getattr(forward, "__module__", "").startswith("torch.nn.")


def account_for_every_layer(model: nn.Module, discovery: Discovery, kept: set[str]) -> None:
    """Make the skip list say why each standard linear/conv/recurrent layer weight is not a target.

    ``kept`` are weights that already carry weight norm (reported apart): the parameters behind
    them (``weight_g``, ``parametrizations.weight.original0``...) are dropped from the skips.  A
    layer weight listed nowhere gets a skip with its reason, so no layer goes unmentioned; one
    that is computed (spectral norm, another parametrization, a pre-hook) is named by that
    weight (``conv.weight``).
    """
    kept_ids = {id(p) for name in kept for p in _sources(model.get_submodule(split_qualname(name)[0]), split_qualname(name)[1])}
    params = dict(model.named_parameters(remove_duplicate=False))
    discovery.skipped = [s for s in discovery.skipped if id(params.get(s.qualname)) not in kept_ids]
    listed = {t.qualname for t in discovery.targets} | {s.qualname for s in discovery.skipped} | kept
    listed_ids = {id(p) for name, p in params.items() if name in listed}
    target_ids = {id(params[t.qualname]) for t in discovery.targets if t.qualname in params}
    aliases = param_aliases(model)
    for name, module in model.named_modules():
        quantized = quantized_kind(module)
        qualname = f"{name}.weight" if name else "weight"
        if quantized is not None and qualname not in listed:
            discovery.skipped.append(Skipped(qualname, f"a quantized layer, {quantized}: its int8 weight is packed for "
                                             "its kernel, not a Parameter; weight-normalize the float model, and "
                                             "fold it before quantizing"))
        for tensor, kind, _ in standard_weights(module):
            qualname = f"{name}.{tensor}" if name else tensor
            sources = _sources(module, tensor)
            if not sources:  # no Parameter behind it: a buffer or a plain tensor (a frozen projection), or none
                if qualname not in listed and (frozen := _held_tensor(module, tensor)):
                    discovery.skipped.append(Skipped(qualname, f"{frozen}, not a Parameter: nothing to train"))
                continue
            parametrized = is_parametrized(module, tensor)
            originals = list(module.parametrizations[tensor]._parameters.values()) if parametrized else []
            if qualname not in listed and originals and not any(id(p) in target_ids for p in originals):
                # a trace that followed the parametrization names its originals with an op's reason: the
                # layer's weight, computed by it, says what it is (a layer held by the parametrization,
                # a hypernetwork's, is a layer of its own)
                chain = f"{name}.parametrizations.{tensor}.original".lstrip(".")
                discovery.skipped = [s for s in discovery.skipped if not s.qualname.startswith(chain)]
                listed_ids -= {id(p) for p in originals}
            if qualname not in listed and not any(id(p) in listed_ids for p in (originals if parametrized else sources)):
                reason = _why_not_a_target(module, tensor, kind)
                param = module._parameters.get(tensor)
                tied = [n for n in aliases.get(id(param), []) if n != qualname] if param is not None else []
                if tied:
                    reason += f" (the same Parameter is also {', '.join(tied)})"
                discovery.skipped.append(Skipped(qualname, reason))


def _sources(module: nn.Module, tensor: str) -> list[nn.Parameter]:
    """The parameters ``module.<tensor>`` is, or is computed from: ``weight_orig`` (spectral norm's
    hook), ``weight_g``/``weight_v`` (torch's legacy weight norm), a parametrization's originals."""
    own = {tensor, f"{tensor}_orig", f"{tensor}_g", f"{tensor}_v"}
    return [p for n, p in module.named_parameters() if n in own or n.startswith(f"parametrizations.{tensor}.")]


def _held_tensor(module: nn.Module, tensor: str) -> str | None:
    """What ``module.<tensor>`` is when it is a tensor but no Parameter is behind it: a buffer
    (of the module, or the original of a parametrization) or a plain attribute; None otherwise
    (no weight at all, or one computed from Parameters)."""
    if isinstance(module._buffers.get(tensor), Tensor):
        return "a buffer"
    if is_parametrized(module, tensor):
        return "computed by a parametrization from a buffer"
    if isinstance(module.__dict__.get(tensor), Tensor):
        return "a plain tensor attribute"
    return None


def _is_own_parameter(module: nn.Module, tensor: str) -> bool:
    """Whether ``module.<tensor>`` is a Parameter, read without computing it (a parametrization's
    forward, such as spectral norm's power iteration in training, changes its buffers)."""
    return not is_parametrized(module, tensor) and isinstance(module._parameters.get(tensor), nn.Parameter)


def pruned_by(module: nn.Module, tensor: str) -> list[str]:
    """The ``torch.nn.utils.prune`` methods that compute ``module.<tensor>`` from ``<tensor>_orig``
    and a mask before each forward (their hooks name it ``_tensor_name``), or ``[]``."""
    return _pre_hooks_computing(module, tensor, "_tensor_name")


def _pre_hooks_computing(module: nn.Module, tensor: str, attribute: str) -> list[str]:
    """The kinds of ``module``'s forward pre-hooks whose ``attribute`` names ``tensor``: those that
    compute it before each forward (spectral norm's ``name``, prune's ``_tensor_name``)."""
    return sorted({type(hook).__name__ for hook in module._forward_pre_hooks.values()
                   if getattr(hook, attribute, None) == tensor})


def _why_not_a_target(module: nn.Module, tensor: str, kind: str) -> str:
    if tensor.startswith("weight") and (quantized := quantized_weight_reason(module)):  # (an RNN's weight_ih_l0)
        return quantized
    if is_parametrized(module, tensor):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations[tensor])
        return f"computed by another parametrization ({kinds}); weight norm on top of it is not supported"
    if not _is_own_parameter(module, tensor):
        if methods := pruned_by(module, tensor):
            return (f"pruned by torch.nn.utils.prune ({', '.join(methods)}: {tensor} is "
                    f"{tensor}_orig times a mask); call prune.remove(module, '{tensor}') first, or apply weight norm "
                    f"first and prune its direction (prune.l1_unstructured(module.parametrizations.{tensor}, "
                    "'original1', ...))")
        hooks = _pre_hooks_computing(module, tensor, "name")
        by = f"a {', '.join(hooks)} forward pre-hook" if hooks else "the module"
        return f"computed by {by} before each forward, not a Parameter; weight norm would change that computation"
    return f"not read as the weight of a {kind} op by the forward that was traced"


# -- step 1 ------------------------------------------------------------------------------
class _Tracer(torch.fx.Tracer):
    """fx's tracer, whose leaves are torch's own modules, minus those that hold code of the
    model's (``nn.DataParallel(net)``, a parametrized custom module): traced through, so that the
    weights used in that code are seen."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.own = {id(module): dict(module._parameters) for module in model.modules()}
        self.swapped: set[str] = set()  # leaves called with other tensors in place of their own parameters

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) and not any(  # (a mean-only norm is no code of
            not plain_type(sub).__module__.startswith("torch.") and not isinstance(sub, MeanOnlyBatchNorm)  # the
            for sub in m.modules())  # model's: its layer stays a leaf, its hook unrun, as on the first apply)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict[str, Any]) -> Any:
        path = self.path_of_module(m)
        if isinstance(m, nn.DataParallel) and not self.is_leaf_module(m, path):
            return self.call_module(m.module, m.module.forward, args, kwargs)  # what it runs, on one device or none
        own = self.own.get(id(m), m._parameters)
        if self.is_leaf_module(m, path) and any(m._parameters.get(name) is not p for name, p in own.items()):
            self.swapped.add(path)  # torch.func.functional_call(layer, {"weight": other}): not its own weight
        return super().call_module(m, forward, args, kwargs)


def _symbolic_trace_log(model: nn.Module) -> UseLog:
    log = UseLog(model, key=lambda v: v if isinstance(v, torch.fx.Node) else None)
    tracer = _Tracer(model)
    if tracer.is_leaf_module(model, ""):  # a bare torch layer: its type says it all
        _log_leaf_module(log, model, "")
        return log
    # nn.DataParallel(net) at the root: its forward(*inputs) cannot take Proxies; trace what it runs
    root, prefix = model, ""
    while isinstance(root, nn.DataParallel) and not tracer.is_leaf_module(root, ""):
        root, prefix = root.module, f"{prefix}module."
    graph = tracer.trace(root)  # what symbolic_trace does, minus generating a GraphModule's code
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(root.named_modules(remove_duplicate=False))
    shapes: dict[torch.fx.Node, tuple[int, ...]] = {}  # a parameter's shape
    sizes: dict[torch.fx.Node, Any] = {}  # the sizes read off one: known numbers
    for node in graph.nodes:
        if node.op == "get_attr" and prefix + node.target in params:
            log.source(node, prefix + node.target, params[prefix + node.target].ndim)
            shapes[node] = tuple(params[prefix + node.target].shape)
        elif node.op == "get_attr":  # a buffer or constant
            log.static(node)
        elif node.op in ("call_function", "call_method"):
            _fold_size(node, shapes, sizes)
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: sizes.get(a, a))
            log.call(node.target, args, kwargs, node, _caller(node, modules))
        elif node.op == "call_module" and node.target in tracer.swapped:  # ran, without its weight: see _finish
            log.ran.add(id(model.get_submodule(prefix + node.target)))
        elif node.op == "call_module":
            _log_leaf_module(log, model, prefix + node.target)
    return log


def _fold_size(node: torch.fx.Node, shapes: dict[torch.fx.Node, tuple[int, ...]], sizes: dict[torch.fx.Node, Any]) -> None:
    """Record in ``sizes`` the value of ``node`` where it reads a parameter's size (``w.size(0)``,
    ``w.shape``, ``w.shape[2]``): symbolic tracing leaves them as nodes, and a view of a weight by
    its own sizes (HF Mamba's depthwise conv, ``w.view(w.size(0), w.size(2))``) keeps its unit axis."""
    args = node.args
    if not args or not isinstance(args[0], torch.fx.Node):
        return
    if args[0] in shapes:
        shape = shapes[args[0]]
        if node.op == "call_method" and node.target == "size":
            index = args[1] if len(args) > 1 else node.kwargs.get("dim")
            if index is None or isinstance(index, int):
                sizes[node] = shape if index is None else shape[index]
        elif node.op == "call_function" and node.target is getattr and args[1:] == ("shape",):
            sizes[node] = shape
    elif (node.op == "call_function" and node.target is operator.getitem and isinstance(sizes.get(args[0]), tuple)
          and isinstance(args[1], (int, slice))):
        sizes[node] = sizes[args[0]][args[1]]


def _log_leaf_module(log: UseLog, model: nn.Module, path: str, *, traced: bool = True) -> None:
    """A leaf module's parameters are used as its type says (every other use is 'other').

    The leaf's own parameters are read by its own call, and so are those of layers it holds in
    containers and wrappers (``nn.DataParallel(nn.Sequential(...))``); a torch.nn layer's
    submodules (MultiheadAttention's ``out_proj``) are read by that layer's code.  Not
    ``traced`` (the module walk): no use is known to be the layer's own call.
    """
    leaf = model.get_submodule(path)
    for sub_name, sub in leaf.named_modules():
        prefix = ".".join(p for p in (path, sub_name) if p)
        known = {name: (kind, layout) for name, kind, layout in standard_weights(sub)}
        if quantized_weight_reason(sub):  # quantization-aware training, reference layers: the op reads q(weight)
            known = {name: use for name, use in known.items() if not name.startswith("weight")}
        if "weight" in known and known["weight"][0] != "recurrent":  # a linear/conv layer: its op adds its bias
            known["bias"] = (BIAS, None)
        for name, _ in sub.named_parameters(recurse=False):
            qualname = f"{prefix}.{name}" if prefix else name
            kind, layout = known.get(name, ("other", None))
            detail = {"other": type(sub).__name__, BIAS: f"{type(sub).__name__} (as its bias)"}.get(kind, "")
            own = traced and (not sub_name or not inside_torch_composite(leaf, sub_name))
            log.add_use(qualname, kind, layout, detail=detail, own=own)
            if isinstance(sub, nn.Bilinear) and name == "weight":
                log.map_use(qualname, type(sub).__name__)


def _caller(node: torch.fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The innermost module whose call ran ``node``'s op (``nn_module_stack``; none: the root)."""
    stack = node.meta.get("nn_module_stack")
    path = next(reversed(stack.values()))[0] if stack else ""
    return modules.get(path)


# -- step 2 ------------------------------------------------------------------------------
_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._export", "torch._dynamo",
                   "torch._subclasses.fake_tensor")  # logs each op a bad batch fails on, at ERROR


@contextlib.contextmanager
def _quiet(loggers: tuple[str, ...]) -> Iterator[None]:
    """Silence torch's log messages and warnings (and the partial graph torch.export prints to
    stderr when it fails) while a ladder step is tried: its failure goes into the report
    instead.  The model's own warnings still reach the user from the real forward passes."""
    with muted(*loggers), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _export_log(model: nn.Module, sample_batch: batch_mod.SampleBatch) -> UseLog:
    args, kwargs = batch_mod.as_args(sample_batch)
    with _quiet(_EXPORT_LOGGERS):
        program = torch.export.export(model, args, kwargs=kwargs, strict=False)
    inputs_to_params = program.graph_signature.inputs_to_parameters
    signature = program.graph_signature
    constants = {*signature.inputs_to_buffers, *signature.inputs_to_lifted_tensor_constants}
    params = dict(model.named_parameters(remove_duplicate=False))
    log = UseLog(model, key=lambda v: v if isinstance(v, torch.fx.Node) else None)
    for node in program.graph_module.graph.nodes:
        if node.op == "placeholder" and node.name in inputs_to_params:
            name = inputs_to_params[node.name]
            log.source(node, name, params[name].ndim)
        elif node.op == "placeholder" and node.name in constants:
            log.static(node)
    _log_export_graph(log, program.graph_module, dict(model.named_modules(remove_duplicate=False)))
    return log


# Higher-order ops whose subgraphs take operands as they are, and where those operands are in
# the op's arguments (torch/_higher_order_ops: wrap.py, invoke_subgraph.py, cond.py, hints_wrap.py).
# torch.export puts a no_grad or autocast region, or a reentrant checkpoint, in one of these.
_HOP_OPERANDS: dict[str, Callable[[tuple], list]] = {
    "wrap_with_set_grad_enabled": lambda args: list(args[2:]),  # (enable_grad, body, *operands)
    "wrap_with_autocast": lambda args: list(args[5:]),  # (device, dtype, enabled, cache_enabled, body, *operands)
    "wrap": lambda args: list(args[1:]),  # (body, *operands)
    "tag_activation_checkpoint": lambda args: list(args[1:]),  # (body, *operands, **checkpoint options)
    "invoke_subgraph": lambda args: list(args[2:]),  # (body, identifier, *operands)
    "cond": lambda args: list(args[3]),  # (pred, true_body, false_body, operands): each body takes them all
    "hints_wrapper": lambda args: list(args[1]),  # (body, operands, kwargs, hints)
}
# Higher-order ops whose subgraphs see slices of operands, or values carried between iterations:
# a parameter passed to them is an opaque op's operand.
_HOP_OPAQUE = LOOPING_OPS | {"flex_attention", "flex_attention_backward"}


def _log_export_graph(log: UseLog, owner: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Log the ops of ``owner``'s graph (an exported program's, or a higher-order op's subgraph):
    a higher-order op's subgraphs are logged in place, their inputs and outputs tied to the op's."""
    results: dict[torch.fx.Node, list[list]] = {}  # a higher-order op -> each subgraph's outputs
    for node in owner.graph.nodes:
        if node.op == "get_attr":
            log.static(node)
        elif node.op != "call_function":
            continue
        elif node.target is operator.getitem and node.args[0] in results:
            _log_region_output(log, node, results[node.args[0]], node.args[1], _caller(node, modules))
        elif (outputs := _log_higher_order(log, owner, node, modules)) is not None:
            results[node] = outputs
        else:
            log.call(node.target, node.args, node.kwargs, node, _caller(node, modules))


def _log_region_output(log: UseLog, node: torch.fx.Node, outputs: list[list], index: object, caller: nn.Module | None) -> None:
    """``node`` picks output ``index`` of a higher-order op whose subgraphs gave ``outputs``: with
    one subgraph, that value itself; with several (``cond``'s branches), whichever ran, so a
    parameter (or a value made from one) that any branch hands out counts as read by ``cond``."""
    if not (isinstance(index, int) and all(-len(o) <= index < len(o) for o in outputs)):
        log.same(node, None)
    elif len(outputs) == 1:
        log.same(node, outputs[0][index])
    else:
        log.call("cond", [o[index] for o in outputs], {}, node, caller)


def _log_higher_order(log: UseLog, owner: nn.Module, node: torch.fx.Node, modules: dict[str, nn.Module]) -> list | None:
    """Log the subgraphs of a higher-order op as if their ops were inline, and return each one's
    outputs; ``None`` if ``node`` is no such op, or an opaque one."""
    found = [(i, body) for i, arg in enumerate(node.args) if (body := _subgraph(owner, arg)) is not None]
    if not found or op_name(node.target) in _HOP_OPAQUE:
        return None
    bodies = [body for _, body in found]
    convention = _HOP_OPERANDS.get(op_name(node.target))
    if convention is not None:
        operands = convention(node.args)
    else:  # another wrapper: the operands follow its last subgraph
        operands = [a for arg in node.args[found[-1][0] + 1:] for a in (arg if isinstance(arg, (list, tuple)) else (arg,))
                    if isinstance(a, torch.fx.Node)]
    inputs = [[n for n in body.graph.nodes if n.op == "placeholder"] for body in bodies]
    if any(len(placeholders) != len(operands) for placeholders in inputs):
        return None
    outputs: list[list] = []
    for body, placeholders in zip(bodies, inputs):
        for placeholder, operand in zip(placeholders, operands):
            log.same(placeholder, operand)
        _log_export_graph(log, body, modules)
        output = body.graph.output_node().args[0]
        outputs.append(list(output) if isinstance(output, (list, tuple)) else [output])
    return outputs


def _subgraph(owner: nn.Module, arg: object) -> torch.fx.GraphModule | None:
    """The GraphModule ``arg`` names, if it is a ``get_attr`` node of ``owner``'s graph that names one."""
    if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
        return None
    try:
        value = owner.get_submodule(arg.target)
    except AttributeError:  # a parameter, buffer or constant
        return None
    return value if isinstance(value, torch.fx.GraphModule) else None


# -- step 3 ------------------------------------------------------------------------------
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj_weight")


class _RecordingMode(TorchFunctionMode):
    """Logs every torch function call of a forward into a :class:`UseLog`; ``running`` is the
    stack of module calls in progress (innermost last)."""

    def __init__(self, log: UseLog, running: list[nn.Module]) -> None:
        super().__init__()
        self.log = log
        self.running = running

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = self.running[-1] if self.running else None
        if op_name(func) == "multi_head_attention_forward":  # a composite: its projections are linear
            bound = _MHA_SIGNATURE.bind(*args, **kwargs).arguments
            weights = [bound.get(name) for name in _MHA_WEIGHTS]
            for weight in weights:
                if weight is not None:
                    self.log.call("linear", (None, weight), {}, None, caller)
            rest = [v for k, v in bound.items() if k not in _MHA_WEIGHTS]
            self.log.call("multi_head_attention_forward", rest, {}, None, caller)
            return func(*args, **kwargs)
        result = func(*args, **kwargs)
        self.log.call(func, args, kwargs, result, caller)
        return result


@contextlib.contextmanager
def _module_calls(model: nn.Module) -> Iterator[list[nn.Module]]:
    """A stack of the module calls in progress in ``model`` (innermost last), kept by hooks on each
    module for the span of the context (its pre-hooks and hooks included in the module's call)."""
    running: list[nn.Module] = []

    def enter(module: nn.Module, args: tuple) -> None:
        running.append(module)

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        if running and running[-1] is module:
            running.pop()

    handles = []
    try:
        for module in _all_modules(model):
            handles.append(module.register_forward_pre_hook(enter, prepend=True))
            handles.append(module.register_forward_hook(leave, always_call=True))
        yield running
    finally:
        for handle in handles:
            handle.remove()


def _recorded_log(model: nn.Module, sample_batch: batch_mod.SampleBatch) -> UseLog:
    log = UseLog(model, key=lambda v: id(v) if isinstance(v, torch.Tensor) else None)
    for name, param in model.named_parameters(remove_duplicate=False):
        log.source(param, name, param.ndim)
    for buffer in model.buffers():
        log.static(buffer)
    try:
        with torch.no_grad(), _module_calls(model) as running, batch_mod.compiled_code_eager(), _RecordingMode(log, running):
            args, kwargs = batch_mod.copied_args(sample_batch)  # what the forward does to them stays there
            model(*args, **kwargs)
    except Exception:
        with torch.no_grad():
            batch_mod.run(model, sample_batch)  # raises BatchError naming the layer if the batch is bad
        raise
    return log


# -- step 4 ------------------------------------------------------------------------------
def _walk_log(model: nn.Module) -> UseLog:
    log = UseLog(model, key=lambda v: None)
    _log_leaf_module(log, model, "", traced=False)
    return log


# -- shared ------------------------------------------------------------------------------
@contextlib.contextmanager
def preserved_state(model: nn.Module, *, batch_statistics: bool = False, eval_mode: bool = True,
                    attributes: bool = False) -> Iterator[None]:
    """Put ``model`` in eval mode; afterwards restore every module's mode and every buffer, and the
    global random number generators (CPU and the model's CUDA devices): a forward that draws noise
    (a VAE's sample, a diffusion model's timestep) leaves the user's random stream as it was, and
    every pass the library runs starts from the same state (the init is reproducible).

    ``batch_statistics``: batch norms (and instance norms that track statistics) that were
    training stay training, so they normalize with the batch's statistics as they will in
    training; their running statistics are restored afterwards like every buffer.  So do layers
    under spectral norm (their power iteration: the first training step's sigma, not the one an
    un-iterated ``u`` gives).
    ``eval_mode=False``: leave the modes as they are (fx's symbolic trace follows the branches
    of the user's mode, and runs the ops on buffers that involve no traced value: a step counter's
    ``+= 1``, an EMA's ``mul_``), and only restore the buffers.
    ``attributes``: also restore each module's plain attributes (a forward's ``self.last_hidden =
    h``, which fx's trace would leave holding a ``Proxy``), removing those the block added, and the
    contents of those that are lists, dicts or sets (``self.maps.append(h)``, ``self.cache[k] = h``).
    """
    modules = _all_modules(model)
    kept = [(module, _plain_attributes(module)) for module in modules] if attributes else []
    contents = [(value, copy.copy(value)) for _, saved in kept for value in saved.values()
                if type(value) in (list, dict, set)]  # written into in place (self.maps.append(h)), not rebound
    devices = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda})
    modes = [module.training for module in modules]
    slots = [(m, name, b) for m in modules for name, b in m._buffers.items()]  # a forward may rebind one
    buffers = [(buf, buf.detach().clone()) for buf in {id(b): b for _, _, b in slots if b is not None}.values()
               if not buf.is_inference()]  # (an inference tensor cannot be written outside inference mode)
    if eval_mode:
        _eval(model)
    if batch_statistics:
        for module, training in zip(modules, modes):
            if training and _trains_its_statistics(module):
                object.__setattr__(module, "training", True)
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for module, saved in kept:
            for key in _plain_attributes(module).keys() - saved.keys():
                del module.__dict__[key]
            module.__dict__.update(saved)
        for container, saved_contents in contents:
            container.clear()
            if isinstance(container, list):
                container.extend(saved_contents)
            else:
                container.update(saved_contents)
        for module, training in zip(modules, modes):
            if module.training != training:
                object.__setattr__(module, "training", training)  # what Module.__setattr__ does, minus its checks
        for module, name, buf in slots:
            if module._buffers.get(name, buf) is not buf:
                module._buffers[name] = buf
        with torch.no_grad():
            for buf, saved in buffers:  # (batch norm's kernels write running stats without a version bump)
                if buf.shape == saved.shape and not torch.equal(buf, saved):  # only then: an expanded buffer,
                    buf.copy_(saved)  # whose elements share memory, cannot be copied into


_MODULE_STATE = frozenset({"_parameters", "_buffers", "_modules", "training"})


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    """``module.__dict__`` without the registries of parameters, buffers and submodules (restored
    apart) and its mode."""
    return {key: value for key, value in module.__dict__.items() if key not in _MODULE_STATE}


def _trains_its_statistics(module: nn.Module) -> bool:
    """Whether ``module`` computes with statistics it updates in training: a batch norm, or spectral
    norm (a layer with torch's legacy hook, or the parametrization's own module)."""
    return (isinstance(module, (_NormBase, _SpectralNormParametrization))
            or any(isinstance(hook, SpectralNorm) for hook in module._forward_pre_hooks.values()))


def _all_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``list(model.modules())`` (each once), breadth first rather than in its
    depth-first order, without a generator per module."""
    seen = {id(model)}
    order = [model]
    for module in order:  # grows while it is walked: breadth first
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                order.append(child)
    return order


def _eval(model: nn.Module) -> None:
    """``model.eval()``, with the flag set directly where ``train`` is not overridden.

    ``Module.train`` sets the flag through ``Module.__setattr__`` (slow on models with
    thousands of modules) and recurses; a module that overrides ``train`` still has it called,
    and its subtree is left to it, so the result is exactly ``model.eval()``'s.
    """
    stack = [model]
    while stack:
        module = stack.pop()
        if type(module).train is not nn.Module.train:
            module.train(False)
            continue
        object.__setattr__(module, "training", False)
        stack.extend(child for child in module._modules.values() if child is not None)
