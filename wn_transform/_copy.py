"""Deep copies of models, including those that ``copy.deepcopy`` refuses; telling ``torch.compile``'s wrapper,
FSDP's sharded modules and the modules whose weights ``accelerate`` offloads."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator

import torch
from torch import nn

from ._parametrized import is_parametrized, own_class, plain_type
from .errors import WeightNormError

__all__ = ["compiled_wrapper", "copy_model", "held_by_ddp", "refuse_ddp", "refuse_offloaded", "refuse_sharded",
           "routed_module"]


_INPLACE = "pass inplace=True to work on the model itself"


def copy_model(model: nn.Module, *, instead: str = _INPLACE) -> nn.Module:
    """A deep copy of ``model`` that leaves ``model`` untouched.  ``instead``: the way around a
    copy for the caller's user, in the error raised where ``copy.deepcopy`` gets the structure wrong.

    Layers carrying the legacy ``torch.nn.utils.weight_norm`` hook keep the weight of their
    last forward as a plain attribute, and parametrized RNNs keep theirs in ``_flat_weights``;
    after a forward with grad on they are non-leaf tensors, and ``copy.deepcopy`` raises on
    those.  Such attributes are copied detached.

    A parametrized layer's class is generated for it (``torch.nn.utils.parametrize``) and
    ``copy.deepcopy`` shares it between the copy and the original, so that taking a
    parametrization off the copy (``remove_parametrizations``, a repo's own
    ``remove_weight_norm()``) would take its property off the original too: each parametrized
    layer of the copy gets a class of its own, with the same contents.
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            # RNNs keep their (parametrized) weights in a list, _flat_weights
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, torch.Tensor) and not item.is_leaf:
                    memo[id(item)] = item.detach().clone()
    copied = copy.deepcopy(model, memo)
    _check_same_structure(model, copied, instead)
    for module in copied.modules():
        if is_parametrized(module):
            module.__class__ = own_class(type(module))
    _copy_gradient_hooks(model, copied)
    return copied


def _copy_gradient_hooks(model: nn.Module, copied: nn.Module) -> None:
    """Give each Parameter of the copy the gradient hooks of the original's (``copy.deepcopy`` of a
    Parameter leaves them out): a PixelCNN's ``weight.register_hook(lambda g: g * mask)`` is part
    of what the model does when it trains."""
    originals = dict(model.named_parameters(remove_duplicate=False))
    for name, param in copied.named_parameters(remove_duplicate=False):
        source = originals.get(name)
        if source is None or param is source:
            continue
        if not param._backward_hooks:
            for hook in (source._backward_hooks or {}).values():
                param.register_hook(hook)
        if not getattr(param, "_post_accumulate_grad_hooks", None):
            for hook in (getattr(source, "_post_accumulate_grad_hooks", None) or {}).values():
                param.register_post_accumulate_grad_hook(hook)


def _check_same_structure(model: nn.Module, copied: object, instead: str) -> None:
    """Raise where the copy is not the model's structure: ``copy.deepcopy`` looks ``__deepcopy__`` up
    on the instance, and a ``__getattr__`` that forwards unknown names to a module it holds hands
    out that module's, which copies the held module alone."""
    ours = [(name, _kind(module)) for name, module in model.named_modules()]
    theirs = [(name, _kind(module)) for name, module in copied.named_modules()] if isinstance(copied, nn.Module) else []
    if ours != theirs:
        first = next((i for i, pair in enumerate(ours) if i >= len(theirs) or theirs[i] != pair), 0)
        name, cls = ours[first]
        msg = (f"copy.deepcopy of the model gives another structure, from '{name or '<root>'}' ({cls.__name__}) on: "
               "a __getattr__ that passes unknown attributes to a module it holds passes on __deepcopy__ too, and "
               f"copies that module alone; give that class a __deepcopy__ of its own, or {instead}")
        raise WeightNormError(msg)


def _kind(module: nn.Module) -> type:
    """``plain_type(module)``, with every ``torch.fx.GraphModule`` one kind: each instance has a
    generated class of its own (``GraphModuleImpl``), which its copy does not share."""
    kind = plain_type(module)
    return torch.fx.GraphModule if isinstance(module, torch.fx.GraphModule) else kind


def compiled_wrapper(model: object) -> bool:
    """Whether ``model`` is the wrapper ``torch.compile`` returns for a module (``OptimizedModule``);
    the module itself is its ``_orig_mod``.  (Without importing ``torch._dynamo``, 2 s: a wrapper
    exists only once it is imported.)"""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def routed_module(model: nn.Module) -> nn.Module:
    """``model`` without the wrappers that only route calls to the module they hold (nested ones
    too): ``torch.compile``'s (``_orig_mod``), ``nn.DataParallel`` and ``DistributedDataParallel``
    (``module``).  The function is the held module's; what the wrappers add is where it runs
    (DataParallel scatters the batch over the GPUs and gathers the outputs)."""
    *_, held = _routing_chain(model)
    return held


def held_by_ddp(model: nn.Module) -> nn.Module | None:
    """The module a ``DistributedDataParallel`` wrapper at the root of ``model`` holds (through the
    other routing wrappers around or inside it: :func:`routed_module`), or None when there is none."""
    if not any(isinstance(wrapper, nn.parallel.DistributedDataParallel) for wrapper in _routing_chain(model)):
        return None
    return routed_module(model)


def _routing_chain(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` and the modules its routing wrappers hold, outermost first."""
    while True:
        yield model
        if compiled_wrapper(model):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return


def _sharded_module(model: nn.Module) -> str | None:
    """The name of the first module of ``model`` that FSDP has sharded (``fully_shard`` or
    ``FullyShardedDataParallel``), or None.  Its parameters are shards (DTensors) that FSDP
    gathers around each forward, and it cannot be copied.  (Without importing FSDP, which exists
    only once imported.)"""
    if "torch.distributed.fsdp" not in sys.modules:
        return None
    fsdp = sys.modules["torch.distributed.fsdp"]
    kinds = tuple(kind for kind in (getattr(fsdp, "FSDPModule", None), getattr(fsdp, "FullyShardedDataParallel", None))
                  if kind is not None)
    return next((name or "(root)" for name, module in model.named_modules() if isinstance(module, kinds)), None)


def refuse_ddp(model: nn.Module, what: str, error: type[Exception]) -> None:
    """Raise ``error`` if ``model`` is or holds a ``DistributedDataParallel`` wrapper: it keeps
    all-reducing the Parameters it was built with, which ``what`` (``apply_weight_norm``,
    ``fold_weight_norm``) replaces; the message says which route works."""
    wrapped = next((name for name, module in model.named_modules()
                    if isinstance(module, nn.parallel.DistributedDataParallel)), None)
    if wrapped is None:
        return
    if wrapped:
        where, inside = f"{type(model).__name__}.{wrapped} is", f"{wrapped}.module"
    else:
        where, inside = f"{what} got", "ddp.module"
    new = "the new g and v" if what == "apply_weight_norm" else "the folded weights"
    msg = (f"{where} a DistributedDataParallel wrapper, which keeps all-reducing the Parameters it was built with, "
           f"never {new}: call {what} on the model itself ({inside}, or before wrapping), then wrap the result in "
           "DistributedDataParallel anew")
    raise error(msg)


def refuse_sharded(model: nn.Module, what: str, error: type[Exception]) -> None:
    """Raise ``error`` if FSDP has sharded a module of ``model``: its shards cannot be reparameterized,
    copied or folded in place; the message says which route works."""
    sharded = _sharded_module(model)
    if sharded is not None:
        msg = (f"{what} got a model sharded by FSDP (module {sharded!r}): apply weight norm before sharding "
               "(apply_weight_norm, then fully_shard), and fold or export a trained model from its full state dict "
               "(torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
               "full_state_dict=True)), then wn_transform.fold_state_dict)")
        raise error(msg)


_OFFLOADED_ROUTES = {
    "apply_weight_norm": "apply weight norm before offloading (apply_weight_norm, then dispatch_model or cpu_offload), "
                         "or load the model without a device_map that offloads",
    "fold_weight_norm": "fold before offloading, or fold its checkpoint (wn_transform.fold_state_dict, or wn-transform "
                        "fold) and load that into the model",
    "export_onnx": "load the model without a device_map that offloads (device_map={'': 'cpu'}) and export that",
}


def _offloaded_module(model: nn.Module) -> str | None:
    """The name of the first module of ``model`` whose own parameters ``accelerate`` offloads
    (``cpu_offload``, ``dispatch_model`` with ``"cpu"``/``"disk"`` entries): an ``_hf_hook`` that
    loads them from its ``weights_map`` before each call, and puts meta tensors back after it.
    (Without importing accelerate.)"""
    return next((name or "(root)" for name, module in model.named_modules()
                 if getattr(module, "_hf_hook", None) is not None
                 and any(p.is_meta for p in module.parameters(recurse=False))), None)


def refuse_offloaded(model: nn.Module, what: str, error: type[Exception]) -> None:
    """Raise ``error`` if ``accelerate`` offloads weights of ``model``: between calls they are meta
    tensors, and the values sit in its hooks' ``weights_map`` under the old names, which ``what``
    (``apply_weight_norm``, ``fold_weight_norm``, ``export_onnx``) can neither read nor rename;
    the message says which route works."""
    offloaded = _offloaded_module(model)
    if offloaded is not None:
        msg = (f"{what} got a model whose weights accelerate offloads (module {offloaded!r} holds meta tensors "
               f"between calls and loads its values in a hook): {_OFFLOADED_ROUTES[what]}")
        raise error(msg)
