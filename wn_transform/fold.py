"""Fold weight norm back into plain weights: ``w = g * v / ||v||`` computed once and stored.

Three layouts are recognized on a model:

* ``wn_transform``: this library's :class:`~wn_transform.parametrization.WeightNorm`;
* ``torch``: ``torch.nn.utils.parametrizations.weight_norm`` (any ``dim``, ``dim=None``);
* ``legacy``: ``torch.nn.utils.weight_norm`` (``weight_g``/``weight_v`` and a forward pre-hook).

Folding a layer gives it back its original class and a plain ``nn.Parameter`` under the
original name, with the value the parametrization computes.  It works on one instance at a
time and never edits a class, so folding a copy leaves the original working.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm as LegacyWeightNorm

from ._copy import copy_model, held_by_ddp, refuse_ddp, refuse_offloaded, refuse_sharded
from .discover import pruned_by
from .errors import FoldError, unknown_keep_message
from .mean_only_bn import detach as detach_mean_only_bn
from .norm import compose_weight, layout_from_shapes
from .parametrization import WeightNorm, mark_replaced, no_weight_cache, put_back, remove
from ._parametrized import is_parametrized

__all__ = ["FoundWeightNorm", "find_weight_norms", "fold_weight_norm"]


@dataclass(frozen=True)
class FoundWeightNorm:
    """A weight-normalized tensor ``<module>.<name>`` in one of the three layouts."""

    module: str
    name: str
    layout: str  # "wn_transform" | "torch" | "legacy"
    dim: int | None  # the unit axis (None: one norm over the whole tensor)
    groups: int = 1

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}" if self.module else self.name


def find_weight_norms(model: nn.Module) -> list[FoundWeightNorm]:
    """Every weight-normalized tensor of ``model``, in module order."""
    found = []
    for module_name, module in model.named_modules():
        if is_parametrized(module):
            for name, chain in module.parametrizations.items():
                wn = next((p for p in chain if isinstance(p, (WeightNorm, _WeightNorm))), None)
                if isinstance(wn, WeightNorm):
                    found.append(FoundWeightNorm(module_name, name, "wn_transform", wn.dim, wn.groups))
                elif wn is not None:
                    dim = None if wn.dim == -1 else wn.dim
                    found.append(FoundWeightNorm(module_name, name, "torch", dim))
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, LegacyWeightNorm):
                dim = None if hook.dim == -1 else hook.dim
                found.append(FoundWeightNorm(module_name, hook.name, "legacy", dim))
    return found


def fold_weight_norm(model: nn.Module, *, keep: Collection[str] = (), inplace: bool = False) -> nn.Module:
    """Replace every weight-normalized weight by a plain Parameter with the same value.

    Args:
        model: any module; weights in any of the three layouts (this library's, torch's
            ``parametrizations.weight_norm`` and its legacy ``weight_norm`` hooks) are folded,
            others kept.
        keep: weights (``"encoder.pos_conv_embed.conv.weight"``) left weight-normalized: those a
            model has by construction (wav2vec2's ``pos_conv``, EnCodec's convs), so that its
            ``state_dict`` still loads into its own class.  A name that is not weight-normalized
            is an error.
        inplace: fold ``model`` itself; by default a deep copy is folded and returned.  A
            ``DistributedDataParallel`` wrapper (which would keep all-reducing g and v) is refused
            in place; a copy is of the module it holds, through ``torch.compile``'s wrapper too
            (a plain model to save or export).  A model whose weights ``accelerate`` offloads is
            refused (its hooks hold the values under the old names): fold before offloading.

    Returns:
        The folded model: same classes, same parameter names (``conv.weight``), same function.
        A mean-only batch norm is folded into its layer's bias as its inference-mode shift
        ``bias - running_mean``, so the folded model equals the unfolded one in eval mode.
    """
    if not isinstance(model, nn.Module):
        msg = f"fold_weight_norm expects a torch.nn.Module, got {type(model).__name__}"
        raise TypeError(msg)
    if not inplace and (held := held_by_ddp(model)) is not None:
        model = held  # (copied below)
    refuse_ddp(model, "fold_weight_norm", FoldError)
    refuse_sharded(model, "fold_weight_norm", FoldError)
    founds = find_weight_norms(model)
    if founds:  # (a model without weight norm is returned as it is, offloaded or not)
        refuse_offloaded(model, "fold_weight_norm", FoldError)
    keep = _first_names(model, [keep] if isinstance(keep, str) else keep)
    weights = [found.qualname for found in founds]
    unknown = sorted(keep - set(weights))
    if unknown:
        raise FoldError(unknown_keep_message(unknown, weights, "this model"))
    for found in founds:  # before anything is folded: an in-place fold is all or nothing
        if found.qualname not in keep:
            _check_foldable(model, found)
    if not inplace:
        model = copy_model(model)
    with no_weight_cache():  # one folded layer at a time: no second copy of the weights
        for found in find_weight_norms(model):
            if found.qualname not in keep:
                fold_one(model, found)
                _forget_built_with(model.get_submodule(found.module), found.name)  # plain now
            elif (built_with := built_with_of(model, found)) is not None:
                fold_one(model, found)  # kept as the class builds it: torch's weight norm, on its axis
                _put_back_torchs(model.get_submodule(found.module), found.name, *built_with)
    for module in model.modules():
        if not isinstance(module, torch.jit.ScriptModule):  # scripted modules carry no mean-only batch norm
            detach_mean_only_bn(module)  # its inference-mode shift goes into the layer's bias
    return model


def _first_names(model: nn.Module, qualnames: Collection[str]) -> set[str]:
    """Each of ``qualnames`` under its module's first name (the one :func:`find_weight_norms` gives)
    where the module is reachable under several (``self.head = self.blocks[-1]``)."""
    first = {id(m): name for name, m in reversed(list(model.named_modules(remove_duplicate=False)))}
    named = set()
    for qualname in qualnames:
        module_name, _, tensor = qualname.rpartition(".")
        try:
            module_name = first.get(id(model.get_submodule(module_name)), module_name)
        except AttributeError:  # no such module: named as given, in the error
            pass
        named.add(f"{module_name}.{tensor}" if module_name else tensor)
    return named


BUILT_WITH = "_wn_transform_built_with"  # on a layer: {name: (layout, dim)} of the torch weight norm existing="convert" replaced


def remember_built_with(model: nn.Module, found: FoundWeightNorm) -> None:
    """Note on ``found``'s layer the torch weight norm (layout and axis) that ``existing="convert"``
    replaces with ours: a ``keep`` of that weight in :func:`fold_weight_norm` puts it back, so that
    the folded model's state dict loads into the class that builds it (wav2vec2's ``pos_conv``,
    normalized on ``dim=2``, where ours is per output channel)."""
    if found.layout not in ("torch", "legacy"):  # ours again (a second apply): the record of torch's stays
        return
    layer = model.get_submodule(found.module)
    layer.__dict__.setdefault(BUILT_WITH, {})[found.name] = (found.layout, found.dim)


def built_with_of(model: nn.Module, found: FoundWeightNorm) -> tuple[str, int | None] | None:
    """The torch weight norm this library's ``found`` replaced (:func:`remember_built_with`), or None."""
    if found.layout != "wn_transform":
        return None
    return model.get_submodule(found.module).__dict__.get(BUILT_WITH, {}).get(found.name)


def _put_back_torchs(layer: nn.Module, name: str, layout: str, dim: int | None) -> None:
    """Torch's weight norm on ``layer.<name>`` again, in ``layout`` (``"torch"``: its
    parametrization; ``"legacy"``: its hooks), on axis ``dim``: ``g = ||w||``, ``v = w``, the same
    function to float rounding."""
    requires_grad = getattr(layer, name).requires_grad
    if layout == "legacy":
        with warnings.catch_warnings():  # (torch deprecates the legacy hooks; the class builds them)
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(layer, name, dim=dim)
        parameters = (getattr(layer, f"{name}_g"), getattr(layer, f"{name}_v"))
    else:
        torch.nn.utils.parametrizations.weight_norm(layer, name, dim=dim)
        parameters = tuple(layer.parametrizations[name].parameters(recurse=False))
    for parameter in parameters:
        parameter.requires_grad_(requires_grad)
    _forget_built_with(layer, name)  # torch's again: a later existing="convert" records it anew


def _forget_built_with(layer: nn.Module, name: str) -> None:
    layer.__dict__.get(BUILT_WITH, {}).pop(name, None)


def fold_one(model: nn.Module, found: FoundWeightNorm, *, by: str = "fold_weight_norm") -> None:
    """Fold the single weight-normalized tensor ``found`` of ``model``, in place; its g and v are
    marked as replaced by ``by`` (the function named in an optimizer's warning)."""
    module = model.get_submodule(found.module)
    if found.layout == "legacy":
        hook_id, hook = next((k, h) for k, h in module._forward_pre_hooks.items()
                             if isinstance(h, LegacyWeightNorm) and h.name == found.name)
        g, v = getattr(module, f"{found.name}_g"), getattr(module, f"{found.name}_v")
        weight = _composed(g, v)
        mark_replaced([g, v], by)  # an optimizer made before the fold may hold them
        del module._parameters[f"{found.name}_g"], module._parameters[f"{found.name}_v"], module._forward_pre_hooks[hook_id]
        if found.name in vars(module):
            delattr(module, found.name)
        put_back(module, found.name, nn.Parameter(weight.detach(), requires_grad=v.requires_grad or g.requires_grad))
        return
    _check_foldable(model, found)
    chain = module.parametrizations[found.name]
    if found.layout == "torch":
        weight = _composed(_current(chain, "original0"), _current(chain, "original1"))
    else:
        with torch.no_grad():
            weight = getattr(module, found.name)
    requires_grad = any(p.requires_grad for p in chain.parameters(recurse=False))
    mark_replaced(chain.parameters(recurse=False), by)
    remove(module, found.name, weight, requires_grad=requires_grad)
    if found.layout == "torch":
        _drop_torch_compat_hook(module, found.name)


def foldable(model: nn.Module, found: FoundWeightNorm) -> bool:
    """Whether ``found`` is weight norm alone, not stacked with other parametrizations (spectral
    norm after it), which folding it alone would drop, nor its legacy g or v pruned by
    ``torch.nn.utils.prune`` (``weight_v_orig`` and a mask)."""
    module = model.get_submodule(found.module)
    if found.layout == "legacy":
        return not _pruned_pair(module, found.name)
    return len(module.parametrizations[found.name]) == 1


def pruned(model: nn.Module, found: FoundWeightNorm) -> list[str]:
    """The names of ``found``'s g and v that ``torch.nn.utils.prune`` masks: a fold bakes the mask
    into the weight (the same function), a conversion would drop it."""
    module = model.get_submodule(found.module)
    if found.layout == "legacy":
        return _pruned_pair(module, found.name)
    chain = module.parametrizations[found.name]
    return [name for name in ("original0", "original1") if pruned_by(chain, name)]


def _current(chain: nn.Module, name: str) -> torch.Tensor:
    """``chain.<name>`` as the next forward computes it: where ``torch.nn.utils.prune`` masks it, the
    attribute is what its hook wrote at the last forward (before an optimizer step since), so the
    product ``<name>_orig * <name>_mask`` is taken now."""
    if pruned_by(chain, name):
        with torch.no_grad():
            return getattr(chain, f"{name}_orig") * getattr(chain, f"{name}_mask")
    return getattr(chain, name)


def _pruned_pair(module: nn.Module, name: str) -> list[str]:
    return [tensor for tensor in (f"{name}_g", f"{name}_v") if pruned_by(module, tensor)]


def _check_foldable(model: nn.Module, found: FoundWeightNorm) -> None:
    """Refuse a weight norm that is not :func:`foldable`."""
    if found.layout == "legacy" and (masked := pruned(model, found)):
        msg = (f"cannot fold {found.qualname}: its {' and '.join(masked)} {'is' if len(masked) == 1 else 'are'} pruned "
               f"by torch.nn.utils.prune; call prune.remove(module, '{masked[0]}') first (it keeps the mask's zeros)")
        raise FoldError(msg)
    if not foldable(model, found):
        chain = model.get_submodule(found.module).parametrizations[found.name]
        msg = (f"cannot fold {found.qualname}: weight norm is stacked with other parametrizations "
               f"({', '.join(type(p).__name__ for p in chain)}); remove those first")
        raise FoldError(msg)


def _composed(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's weight norm ``g * v/||v||`` (either API; the axis read off the shapes) computed as
    :func:`~wn_transform.fold_state_dict` computes it: a unit whose ``v`` is all zeros (a pruned
    unit) gets a zero weight, where torch's own formula makes it 0/0 = NaN."""
    with torch.no_grad():
        return compose_weight(g, v, layout_from_shapes(tuple(g.shape), tuple(v.shape)))


def _drop_torch_compat_hook(module: nn.Module, name: str) -> None:
    """Remove the ``load_state_dict`` pre-hook that torch's ``parametrizations.weight_norm`` leaves on
    the layer for ``name`` (it renames legacy ``name_g``/``name_v`` keys): a plain weight takes no
    such keys, and the hook, a local function, makes the model impossible to pickle."""
    for hook_id, wrapped in list(module._load_state_dict_pre_hooks.items()):
        hook = getattr(wrapped, "hook", wrapped)
        if getattr(hook, "__qualname__", "") != "weight_norm.<locals>._weight_norm_compat_hook":
            continue
        names = dict(zip(hook.__code__.co_freevars, (cell.cell_contents for cell in hook.__closure__ or ())))
        if names.get("name") == name:
            del module._load_state_dict_pre_hooks[hook_id]
