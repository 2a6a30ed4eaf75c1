"""Weight norm at the state-dict level: find, fold and convert it with no model code.

Key layouts (``X`` is the module prefix, ``name`` the tensor, usually ``weight``):

* ``parametrizations``: ``X.parametrizations.name.original0`` (g) and ``.original1`` (v), written
  by ``torch.nn.utils.parametrizations.weight_norm`` and by this library (which adds
  ``X.parametrizations.name.0.g_is_log`` when g is stored as ``s = log g``);
* ``legacy``: ``X.name_g`` and ``X.name_v``, written by ``torch.nn.utils.weight_norm``.

The normalized axis is read off the shapes: ``g`` has ``v``'s rank with size 1 everywhere but
the unit axis ``d``, where it is ``v.shape[d]`` (any ``dim``, e.g. wav2vec2's ``dim=2``) or, for
this library's grouped ConvTranspose layout, ``G * v.shape[1]``; a ``g`` with one element is
the whole-tensor norm (``dim=None``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .checkpoint import map_state_dicts, state_dict_paths
from .errors import FoldError, WeightNormError, unknown_keep_message
from .norm import (UnitLayout, accumulation_dtype, compose_weight, direct_zero_units_on_load, exp_gain, layout_from_shapes,
                   unit_norm)
from .parametrization import EXP_SCALE_MARKER

__all__ = [
    "StateDictWeightNorm", "convert_one_state_dict", "convert_state_dict", "find_state_dict_weight_norms", "fit_state_dict",
    "fold_one_state_dict", "fold_state_dict", "pair_keys", "state_dict_pairs",
]

_PARAMETRIZED = ".parametrizations."


@dataclass(frozen=True)
class StateDictWeightNorm:
    """One weight-normalized tensor in a state dict: where its g and v are, and its axis."""

    weight_key: str  # the key the folded weight gets: X.name
    g_key: str
    v_key: str
    layout: str  # "parametrizations" | "legacy"
    dim: int | None  # None: one norm over the whole tensor
    groups: int
    exp_scale: bool
    g_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    marker_key: str | None = None
    stacked_key: str | None = None  # an entry of another parametrization in the same chain (spectral norm's _u)

    @property
    def axis(self) -> str:
        if self.dim is None:
            return "whole tensor"
        return f"dim {self.dim}" + (f", {self.groups} groups" if self.groups > 1 else "")


def _legacy_pair(weight_key: str, g: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether tensors named ``X_g``/``X_v`` are torch's legacy weight norm.  Where ``X`` names a
    weight (``weight``, an LSTM's ``weight_ih_l0``, attention's ``in_proj_weight``: torch's own
    names) they are (a ``g`` that does not fit is then an error, and a single-input LSTM's
    ``[4H, 1]`` pair has units of one element).  Other
    names are where ``v`` has more than one axis, ``g`` fits it (one norm per unit along one axis,
    or one for the whole tensor) and each unit holds more than one element: mixing coefficients
    such as RWKV's ``time_maa_g``/``time_maa_v``, both ``[1, 1, C]``, a gated unit's
    ``w_g``/``w_v`` and its biases ``b_g``/``b_v`` (``[C]`` each) are ordinary tensors."""
    if "weight" in weight_key.rpartition(".")[2]:
        return True
    return v.ndim > 1 and g.numel() < v.numel() and _fits(g, v)


def _could_be_gain(g: Tensor, v: Tensor) -> bool:
    """Whether ``g`` has the form of a weight norm's ``g`` for ``v``: one element (the whole-tensor
    norm, any rank), one that fits (:func:`_fits`: a depthwise ConvTranspose's ``[1, G, 1]`` for
    ``v [G, 1, k]`` too), or ``v``'s rank with size 1 on every axis but one, on which ``v`` has
    more than one unit (a g of the wrong size there: :func:`_unit_axis` names it).  Low-rank
    factors (``U [out, r]``, ``V [r, in]``; rank 1: ``U [out, 1]``, ``V [1, in]``) have not."""
    if g.numel() == 1 or _fits(g, v):
        return True
    long_axes = [axis for axis, size in enumerate(g.shape) if size != 1]
    return g.ndim == v.ndim and len(long_axes) == 1 and v.shape[long_axes[0]] > 1


def _fits(g: Tensor, v: Tensor) -> bool:
    """Whether ``g`` has a weight-norm shape for ``v`` (one norm per unit, or one in all)."""
    try:
        layout_from_shapes(tuple(g.shape), tuple(v.shape))
    except ValueError:
        return False
    return True


def find_state_dict_weight_norms(state_dict: Mapping[str, object]) -> list[StateDictWeightNorm]:
    """Every (g, v) pair in ``state_dict``, in key order (see :func:`state_dict_pairs`); a checkpoint
    whose pairs are all in the state dicts it holds (``{"generator": sd}``, ``{"model": sd,
    "mel_mean": t}``) is refused with where they are, rather than answered with none."""
    found = state_dict_pairs(state_dict)
    if not found:
        _refuse_checkpoint(state_dict)
    return found


def state_dict_pairs(state_dict: Mapping[str, object]) -> list[StateDictWeightNorm]:
    """Every (g, v) pair in ``state_dict`` itself, in key order.

    Raises if a legacy ``X.weight_g`` does not fit its ``X.weight_v``, if a parametrization's g or
    v is there without the other, or if one weight is there twice (in both layouts, or as a pair
    and a plain tensor).  torch's legacy names are paired only when both are there:
    ``X.weight_v`` alone is an ordinary parameter (an attention's value projection), as
    ``X.weight_g`` is (a gate).  A parametrization's ``original0``/``original1`` where
    ``original0`` has not the form of a ``g`` (another rank, or more than one axis longer than 1)
    are another parametrization's two tensors (low-rank factors), not weight norm.  A pair that
    shares its chain with another parametrization's entries is found with ``stacked_key`` set:
    folding or converting it without the model is refused.
    """
    if not isinstance(state_dict, Mapping):
        hint = "; pass model.state_dict(), or fold the model with fold_weight_norm" if isinstance(state_dict, torch.nn.Module) else ""
        msg = f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}{hint}"
        raise TypeError(msg)
    odd = next((key for key in state_dict if not isinstance(key, str)), None)
    if odd is not None:
        msg = f"a state dict's keys are parameter names (strings); this one has {odd!r} ({type(odd).__name__})"
        raise TypeError(msg)
    _refuse_pruned(state_dict)
    found = []
    seen: dict[str, str] = {}  # weight key -> its g key
    stacked = _stacked_entries(state_dict)
    unknowable: str | None = None  # (for pairs without their dots: found at the first one)
    for key, g in state_dict.items():
        if key.endswith(".original0") and _PARAMETRIZED in f".{key}":  # "parametrizations.weight...": a bare layer's
            base = key[: -len(".original0")]
            v_key = f"{base}.original1"
            prefix, _, name = f".{base}".rpartition(_PARAMETRIZED)
            weight_key = f"{prefix[1:]}.{name}" if prefix else name
            marker = f"{base}.0.{EXP_SCALE_MARKER}"
            layout = "parametrizations"
            _check_partner(state_dict, key, v_key, "g without its v")
        elif (dotless := _dotless_weight_key(key)) is not None and f"{key[:-1]}1" in state_dict:
            weight_key, v_key, marker, layout = dotless, f"{key[:-1]}1", None, "parametrizations"
            # what a pair named without its dots (an EMA's copy of the parameters alone) cannot be told apart from
            if unknowable is None:
                unknowable = next((k for k in state_dict if k.endswith(f".{EXP_SCALE_MARKER}")), None) or next(
                    iter(stacked.values()), "")
            if unknowable:
                msg = (f"{key}: a weight-norm pair named without its dots (an EMA's copy of the parameters, such as "
                       f"CompVis's LitEma) beside {unknowable}: whether the pair holds g or s = log g, or is stacked with "
                       "another parametrization, is not stored with it; copy the EMA into the model (ema.copy_to(model)) "
                       "and fold the model")
                raise WeightNormError(msg)
        elif key.endswith("_g") and f"{key[:-2]}_v" in state_dict:
            weight_key, v_key, marker, layout = key[:-2], f"{key[:-2]}_v", None, "legacy"
        else:
            if key.endswith(".original1") and _PARAMETRIZED in f".{key}":
                _check_partner(state_dict, key, f"{key[: -len('.original1')]}.original0", "v without its g")
            continue
        v = state_dict.get(v_key)
        if not (_is_real_tensor(g) and _is_real_tensor(v)):  # integer count_g/count_v buffers: ordinary tensors
            continue
        if layout == "legacy" and not _legacy_pair(weight_key, g, v):  # RWKV's time_maa_g/_v, a gate's w_g/w_v
            continue
        if layout == "parametrizations" and not _could_be_gain(g, v):  # another parametrization's (low-rank factors)
            continue
        dim, groups = _unit_axis(g, v, key, v_key)
        if weight_key in state_dict:
            msg = (f"{key}: this state dict holds both a plain {weight_key} and its weight-norm pair ({key}, "
                   f"{v_key}); keep one of the two")
            raise WeightNormError(msg)
        if weight_key in seen:
            msg = (f"{key}: {weight_key} is weight-normalized twice in this state dict (also {seen[weight_key]}); "
                   f"keep one of the two")
            raise WeightNormError(msg)
        seen[weight_key] = key
        exp_scale = marker is not None and marker in state_dict
        found.append(StateDictWeightNorm(weight_key, key, v_key, layout, dim, groups, exp_scale, tuple(g.shape),
                                         tuple(v.shape), marker if exp_scale else None,
                                         stacked.get(key[: -len(".original0")]) if marker is not None else None))
    return found


_PAIRED = {".original0": ".original1", ".original1": ".original0", "_g": "_v", "_v": "_g"}  # a g's or v's partner


def _refuse_pruned(state_dict: Mapping[str, object]) -> None:
    """Raise if a weight norm's g or v is stored as ``torch.nn.utils.prune`` stores a pruned tensor,
    ``<name>_orig`` and ``<name>_mask`` (their product is the value), beside its partner: without the
    model the pair would be found incomplete, or, in the legacy layout, not found at all."""
    def value(name: str) -> object:  # a tensor as it is, or as prune stores it
        return state_dict.get(name, state_dict.get(f"{name}_orig"))

    for key in state_dict:
        base = key.removesuffix("_orig")
        if base == key or f"{base}_mask" not in state_dict:
            continue
        for own, other in _PAIRED.items():
            if not base.endswith(own):
                continue
            g, v = (value(base), value(base.removesuffix(own) + other))[:: 1 if own in ("_g", ".original0") else -1]
            if not (_is_real_tensor(g) and _is_real_tensor(v)):
                continue
            paired = (_could_be_gain(g, v) if own.startswith(".") else _legacy_pair(base.removesuffix(own), g, v))
            if paired:  # the shapes of a weight norm's (g, v), as the pair finder takes them
                msg = (f"{key}: {base} of a weight norm is pruned by torch.nn.utils.prune ({key} times {base}_mask); "
                       "fold the model with fold_weight_norm, which bakes the mask in, or call prune.remove on it "
                       "before saving")
                raise WeightNormError(msg)


def _dotless_weight_key(key: str) -> str | None:
    """The weight a parametrization's g is stored for under a name without its dots, or None:
    an EMA that keeps each parameter as a buffer named ``name.replace(".", "")`` (CompVis's
    ``LitEma``, in latent diffusion and many audio models) stores ``0.parametrizations.weight.original0``
    as ``0parametrizationsweightoriginal0``, for the weight ``0weight`` (what it names the
    folded model's ``0.weight``)."""
    head, _, last = key.rpartition(".")
    before, found, name = last.removesuffix("original0").rpartition("parametrizations")
    if not (found and name and last.endswith("original0")):
        return None
    return f"{head}.{before}{name}" if head else f"{before}{name}"


def _nested_paths(obj: Mapping[str, object]) -> list[tuple[str, ...]]:
    """Where the state dicts nested in ``obj`` are (``[]`` for a flat state dict: one pass over
    its values), ``obj`` itself not among them."""
    if not any(isinstance(value, (Mapping, list, tuple)) for value in obj.values()):
        return []
    return [path for path in state_dict_paths(obj) if path]


def _holds_weights(obj: Mapping[str, object]) -> bool:
    """Whether ``obj`` holds a tensor of one dimension or more itself: a state dict, whatever its
    keys (a ``ParameterDict`` key may hold a space, which :func:`~wn_transform.checkpoint.is_state_dict`
    takes for a phrase)."""
    return any(isinstance(value, Tensor) and value.ndim for value in obj.values())


def _refuse_checkpoint(obj: Mapping[str, object]) -> None:
    """Raise if ``obj``, which holds no weight-norm pair itself, is a checkpoint whose nested state
    dicts hold some (``{"generator": sd}``, a Lightning ``.ckpt``, ``{"model": sd, "mel_mean": t}``):
    their pairs have keys of their own."""
    holders = []
    for path in _nested_paths(obj):
        try:
            if state_dict_pairs(_at(obj, path)[1]):
                holders.append(path)
        except WeightNormError as exc:  # (a nested state dict's own error: named with where it is)
            msg = f"checkpoint{_at(obj, path)[0]}: {exc}"
            raise WeightNormError(msg) from exc
        if len(holders) > 4:  # enough to name them
            break
    if holders:
        where = ", ".join(".".join(path) for path in holders[:4]) + (", ..." if len(holders) > 4 else "")
        msg = (f"this is a checkpoint that holds state dicts with weight norm ({where}), not one state dict: pass one "
               f"of them (checkpoint{_at(obj, holders[0])[0]}); fold_state_dict and convert_state_dict take the whole "
               "checkpoint")
        raise WeightNormError(msg)


def _at(obj: object, path: tuple[str, ...]) -> tuple[str, object]:
    """What is at ``path`` in ``obj``, and how Python reaches it: ``["callbacks"]["EMA"]["ema"]``, ``["ema"][0]``."""
    parts = []
    for key in path:
        if isinstance(obj, (list, tuple)):
            parts.append(f"[{key}]")
            obj = obj[int(key)]
        else:
            parts.append(f'["{key}"]')
            obj = obj[key]  # type: ignore[index]
    return "".join(parts), obj


def _each_state_dict(obj: Mapping[str, object], fn: Callable[[Mapping[str, object]], dict[str, object]]) -> dict[str, object]:
    """``fn(obj)`` for a state dict; for a checkpoint that holds state dicts (``{"generator": sd,
    "optim_g": ...}``, a Lightning ``.ckpt`` with an EMA callback's copy, ``{**sd, "ema": sd}``),
    ``fn`` of each, the rest kept as it is (:func:`~wn_transform.checkpoint.map_state_dicts`)."""
    nested = _nested_paths(obj) if isinstance(obj, Mapping) else []
    if not nested:
        return fn(obj)
    if _holds_weights(obj) and () not in state_dict_paths(obj):  # a root map_state_dicts does not take for one
        obj = fn(obj)
    return map_state_dicts(obj, fn)


def _stacked_entries(state_dict: Mapping[str, object]) -> dict[str, str]:
    """``X.parametrizations.name`` -> the first entry of another parametrization in that chain
    (``...weight.1._u``: spectral norm stacked on weight norm), whose function a fold without the
    model's code would drop.  The chain's own tensors and this library's ``g = e^s`` marker are not."""
    own = {"original", "original0", "original1", f"0.{EXP_SCALE_MARKER}"}
    stacked: dict[str, str] = {}
    for key in state_dict:
        head, found, tail = f".{key}".rpartition(_PARAMETRIZED)
        name, _, rest = tail.partition(".")
        if found and rest and rest not in own:
            stacked.setdefault(f"{head[1:]}{_PARAMETRIZED}{name}".lstrip("."), key)
    return stacked


def _refuse_stacked(wn: StateDictWeightNorm, what: str) -> None:
    if wn.stacked_key is not None:
        msg = (f"{wn.g_key}: weight norm is stacked with another parametrization ({wn.stacked_key}); {what} without the "
               "model's code would drop it: load the checkpoint into the model and use fold_weight_norm after removing "
               "the other parametrization")
        raise WeightNormError(msg)


def _is_real_tensor(value: object) -> bool:
    """A tensor weight norm can hold: floating point (or complex), not an integer or bool buffer."""
    return isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex())


def _like(source: Mapping[str, object], entries: dict[str, object]) -> dict[str, object]:
    """``entries`` in ``source``'s container type: a ``model.state_dict()``'s ``OrderedDict`` stays
    one, with its ``_metadata`` (per-module versions ``load_state_dict`` reads) for the modules
    still there."""
    if not isinstance(source, OrderedDict):
        return entries
    out = OrderedDict(entries)
    metadata = getattr(source, "_metadata", None)
    if isinstance(metadata, Mapping):
        modules = {""} | {key[:i] for key in out for i, char in enumerate(key) if char == "."}
        out._metadata = type(metadata)((m, v) for m, v in metadata.items() if m in modules)  # type: ignore[attr-defined]
    return out


def _check_partner(state_dict: Mapping[str, object], key: str, partner: str, what: str) -> None:
    if partner not in state_dict:
        msg = f"{key}: has no {partner} beside it ({what}); the checkpoint is incomplete"
        raise WeightNormError(msg)


def fold_state_dict(state_dict: Mapping[str, object], *, keep: Collection[str] = ()) -> dict[str, object]:
    """``w = g * v/||v||`` for every weight-normalized pair; every other entry kept, in order.
    A whole checkpoint that holds state dicts (HiFi-GAN's ``{"generator": sd, ...}``, a Lightning
    ``.ckpt``'s ``state_dict`` and its EMA callback's) has each one folded, the rest kept.

    The folded weight takes the place of its g entry; v (and any marker) are dropped.  The result
    has the input's type (an ``OrderedDict`` stays one) and its ``_metadata`` for the modules left.
    A pair of integer or bool tensors (``count_g``/``count_v`` buffers) is no weight norm: kept
    as is.  A mean-only batch norm (``X.mean_only_bn.bias``/``.running_mean``) becomes the bias
    ``X.bias`` it adds at inference, ``bias - running_mean``.  ``keep``: weights (``X.weight``)
    left weight-normalized, for a model that has weight norm on those layers by construction
    (wav2vec2's ``pos_conv``).
    """
    keep = {keep} if isinstance(keep, str) else set(keep)
    weights: list[str] = []  # every state dict's weight-normalized weights

    def fold(one: Mapping[str, object]) -> dict[str, object]:
        found = state_dict_pairs(one)
        weights.extend(wn.weight_key for wn in found)
        return _fold_found(one, found, keep)

    folded = _each_state_dict(state_dict, fold)
    unknown = sorted(keep - set(weights))
    if unknown:
        msg = unknown_keep_message(unknown, weights, "this state dict")
        raise FoldError(msg)  # (as fold_weight_norm's keep)
    return folded


def fold_one_state_dict(state_dict: Mapping[str, object], *, keep: Collection[str] = ()) -> dict[str, object]:
    """:func:`fold_state_dict` of one state dict (a checkpoint's state dicts are found by the
    caller); ``keep``: names, those not in this state dict ignored."""
    keep = {keep} if isinstance(keep, str) else set(keep)
    return _fold_found(state_dict, state_dict_pairs(state_dict), keep)


def _fold_found(state_dict: Mapping[str, object], found: list[StateDictWeightNorm], keep: set[str]) -> dict[str, object]:
    """``state_dict`` with the pairs ``found`` in it folded, but those of ``keep``."""
    pairs = {wn.g_key: wn for wn in found if wn.weight_key not in keep}
    for wn in pairs.values():
        _refuse_stacked(wn, "folding it")
    dropped = {wn.v_key for wn in pairs.values()} | {wn.marker_key for wn in pairs.values() if wn.marker_key}
    shifts = _mean_only_bn_shifts(state_dict)
    dropped |= {key for layer in shifts for key in _mobn_keys(layer)[:2]}
    # A folded weight goes first among its module's entries, where a plain layer has its weight (and
    # where fold_weight_norm puts it); torch's weight norm registers g and v after the bias.
    first = _first_keys(state_dict, {wn.weight_key.rpartition(".")[0] for wn in pairs.values()})
    folded_at: dict[str, list[StateDictWeightNorm]] = {}
    for wn in sorted(pairs.values(), key=lambda wn: wn.weight_key.count(".")):  # a layer's before its children's
        folded_at.setdefault(first[wn.weight_key.rpartition(".")[0]], []).append(wn)
    out: dict[str, object] = {}
    for key, value in state_dict.items():
        for wn in folded_at.get(key, ()):
            out[wn.weight_key] = _fold(state_dict[wn.g_key], state_dict[wn.v_key], wn)
        if key in pairs:
            continue
        if (layer := _mobn_layer(key)) is not None and layer in shifts:
            out[_mobn_keys(layer)[2]] = shifts[layer]
        elif key not in dropped:
            out[key] = value
    return _like(state_dict, out)


def _first_keys(state_dict: Mapping[str, object], modules: set[str]) -> dict[str, str]:
    """The first key of each of ``modules`` (``X`` -> the first ``X.*`` key; ``""``: the first key)."""
    first: dict[str, str] = {}
    for key in state_dict:
        prefixes = [""] + [key[:i] for i, char in enumerate(key) if char == "."]
        for module in prefixes:
            if module in modules and module not in first:
                first[module] = key
    return first


_MOBN = "mean_only_bn"


def _mobn_keys(layer: str) -> tuple[str, str, str]:
    """The keys of ``layer``'s mean-only batch norm (``""``: a bare layer, the state dict's root):
    its bias, its running mean, and the layer bias they fold into."""
    prefix = f"{layer}." if layer else ""
    return f"{prefix}{_MOBN}.bias", f"{prefix}{_MOBN}.running_mean", f"{prefix}bias"


def _mobn_layer(key: str) -> str | None:
    """The layer whose mean-only batch norm's running mean ``key`` is (``""`` at the root), or None."""
    head, found, tail = f".{key}".rpartition(f".{_MOBN}.running_mean")
    return head[1:] if found and not tail else None


def _mean_only_bn_shifts(state_dict: Mapping[str, object]) -> dict[str, Tensor]:
    """``layer -> bias - running_mean`` for every mean-only batch norm: its inference-mode shift."""
    shifts = {}
    for key, running_mean in state_dict.items():
        layer = _mobn_layer(key)
        if layer is not None and isinstance(running_mean, Tensor):
            bias = state_dict.get(_mobn_keys(layer)[0])
            shifts[layer] = -running_mean if bias is None else bias - running_mean
    return shifts


def convert_state_dict(state_dict: Mapping[str, object], to: str) -> dict[str, object]:
    """Rename weight-norm keys to the layout ``to``: torch's ``"parametrizations"`` or ``"legacy"``.

    Values are not changed (both layouts store g with v's rank, size 1 off the unit axis), but for
    this library's ``g = e^s`` pairs, which torch's layouts hold as ``g``.  A layout torch's cannot
    express (this library's grouped ConvTranspose) is refused.
    A whole checkpoint that holds state dicts has each one converted, the rest kept.
    """
    if to not in ("parametrizations", "legacy"):
        msg = f"unknown layout {to!r}; choose 'parametrizations' or 'legacy'"
        raise ValueError(msg)
    return _each_state_dict(state_dict, lambda one: convert_one_state_dict(one, to))


def convert_one_state_dict(state_dict: Mapping[str, object], to: str) -> dict[str, object]:
    """:func:`convert_state_dict` of one state dict.  A pair stored as ``s = log g`` (this library's
    ``exp_scale``, with its marker) becomes ``g = e^s``, the marker dropped: torch's layouts store g."""
    pairs = state_dict_pairs(state_dict)
    state_dict = _with_gains(state_dict, {wn.g_key: wn.marker_key for wn in pairs if wn.exp_scale})
    return _relayout(state_dict, {wn.weight_key: to for wn in pairs})


def fit_state_dict(state_dict: Mapping[str, object], expected: Collection[str],
                   pairs: Collection[StateDictWeightNorm] = ()) -> dict[str, object]:
    """``state_dict`` made to fit a model whose state-dict keys are ``expected``: each weight-norm
    pair put in the layout the model has for that weight (torch's ``"parametrizations"`` or
    ``"legacy"``, with ``g = e^s`` where the checkpoint stores ``s`` and the model does not),
    and folded where the model has a plain weight.  ``pairs``: the model's own weight-norm pairs
    (:func:`find_state_dict_weight_norms` of its ``state_dict()``); a plain weight for one of them
    (a plain checkpoint of a model built with weight norm, a vocoder's released weights), or a
    pair on another axis (a ConvTranspose normalized per input channel), is normalized on the
    model's axis: ``g = ||w||`` per unit, ``v = w`` (:func:`_normalized_pair`; for this library's
    ``exp_scale`` layer too, without its ``g_is_log`` marker: such a pair holds ``g``, which the
    layer's load takes to ``s = log g``).  Other entries are
    unchanged; the caller compares the keys.  torch's own ``load_state_dict`` renames legacy keys
    only for a layer with torch's parametrized weight norm, and folds nothing.
    """
    found = state_dict_pairs(state_dict)
    own = {wn.weight_key: wn for wn in pairs}
    layouts = {wn.weight_key: to for wn in found for to in ("parametrizations", "legacy")
               if pair_keys(wn.weight_key, to)[0] in expected and _takes_pair(own.get(wn.weight_key), wn, state_dict)}
    # g stored as s = log g (exp_scale), for a model that stores g itself: g = e^s, no marker
    state = _with_gains(state_dict, {wn.g_key: wn.marker_key for wn in found if wn.exp_scale and wn.weight_key in layouts
                                     and wn.marker_key not in expected})
    fitted = _relayout(fold_one_state_dict(state, keep=layouts.keys()), layouts)
    plain = {wn.weight_key: wn for wn in pairs if pair_keys(wn.weight_key, wn.layout)[0] not in fitted
             and isinstance(fitted.get(wn.weight_key), Tensor) and tuple(fitted[wn.weight_key].shape) == wn.v_shape}
    if not plain:
        return fitted
    out: dict[str, object] = {}
    for key, value in fitted.items():
        if key in plain:
            wn = plain[key]
            g_key, v_key = pair_keys(key, wn.layout)
            out[g_key], out[v_key] = _normalized_pair(value, wn)
        else:
            out[key] = value
    return _like(fitted, out)


def _takes_pair(own: StateDictWeightNorm | None, found: StateDictWeightNorm, state_dict: Mapping[str, object]) -> bool:
    """Whether the checkpoint's pair ``found`` loads as a pair into the model's pair ``own`` (None:
    the model's pair is not known): on the same axis, and, where the model's layer computes
    ``g * v/||v||`` itself (not ``e^s``), with no all-zero direction, for which torch's weight
    norm computes ``0/0``.  Otherwise it is folded, and normalized on the model's axis."""
    if own is None:
        return True
    if (own.dim, own.groups, own.v_shape) != (found.dim, found.groups, found.v_shape):
        return False
    v = state_dict[found.v_key]
    if own.exp_scale or v.is_meta or v.numel() == 0 or found.dim is None:
        return True
    return not bool((unit_norm(v.detach(), UnitLayout(found.dim, found.groups)) == 0).any())


def _normalized_pair(weight: Tensor, wn: StateDictWeightNorm) -> tuple[Tensor, Tensor]:
    """``(g, v)`` of ``weight`` on ``wn``'s axis: ``g = ||w||`` per unit, in float32 or wider (a
    bfloat16 weight's norm rounded to bfloat16 would change the function; the load casts ``g`` to
    the layer's own precision), ``v = w``; a unit whose weight is all zero gets a unit
    direction ``v`` (drawn from a generator seeded with 0, the same in every process) with
    ``g = 0``, so that it computes 0, not torch's ``0/0``, and can train."""
    with torch.no_grad():
        w = weight.detach()
        layout = None if wn.dim is None else UnitLayout(wn.dim, wn.groups)  # None: one norm over the whole tensor
        norms = (unit_norm(w, layout) if layout is not None
                 else torch.linalg.vector_norm(w, dtype=accumulation_dtype(w.dtype)))
        g = norms.reshape(wn.g_shape)  # float32 or wider: the load casts it to the layer's precision
        if layout is None:  # the whole tensor as one unit
            return g, direct_zero_units_on_load(w.clone().reshape(1, -1), g.reshape(1, 1), UnitLayout(0)).view_as(w)
        return g, direct_zero_units_on_load(w.clone(), g, layout)


def pair_keys(weight_key: str, layout: str) -> tuple[str, str]:
    """The (g, v) keys of ``weight_key`` in ``layout``."""
    if layout == "legacy":
        return f"{weight_key}_g", f"{weight_key}_v"
    prefix, _, name = weight_key.rpartition(".")
    base = f"{prefix}{_PARAMETRIZED}{name}" if prefix else f"parametrizations.{name}"
    return f"{base}.original0", f"{base}.original1"


def _with_gains(state_dict: Mapping[str, object], logs: Mapping[str, str | None]) -> Mapping[str, object]:
    """``state_dict`` with each pair stored as ``s = log g`` (``logs``: its g key -> its marker's)
    holding ``g = e^s`` instead, the marker dropped: torch's layouts store g."""
    if not logs:
        return state_dict
    gains = {key: _gain_of(key, state_dict[key]) for key in logs}
    return _like(state_dict, {key: gains.get(key, value) for key, value in state_dict.items() if key not in logs.values()})


def _gain_of(key: str, s: Tensor) -> Tensor:
    """``g = e^s`` in float32 (as the layer computes it) and stored in ``s``'s dtype; refused where
    it does not fit that dtype (a unit norm beyond float16's 65504)."""
    with torch.no_grad():
        g = exp_gain(s.detach())
        stored = g.to(s.dtype)
    if not bool(stored.isfinite().all()):
        msg = (f"{key}: g = e^s beyond {s.dtype}'s range ({float(g.max()):.4g}); torch's layouts store g itself: convert "
               "the checkpoint in float32 (.float() on its tensors), or fold it")
        raise WeightNormError(msg)
    return stored


def _relayout(state_dict: Mapping[str, object], layouts: Mapping[str, str]) -> dict[str, object]:
    """Rename the pair of each weight in ``layouts`` to the layout given there; the rest as is."""
    renames: dict[str, str] = {}
    for wn in state_dict_pairs(state_dict):
        to = layouts.get(wn.weight_key, wn.layout)
        if wn.layout == to:
            continue
        _refuse_stacked(wn, f"converting it to the {to} layout")
        if wn.groups > 1 or wn.exp_scale:
            what = "grouped ConvTranspose weight norm" if wn.groups > 1 else "weight norm with g = e^s"
            msg = f"{wn.g_key}: {what} has no {to} equivalent in torch; fold it instead"
            raise WeightNormError(msg)
        renames[wn.g_key], renames[wn.v_key] = pair_keys(wn.weight_key, to)
    return _like(state_dict, {renames.get(key, key): value for key, value in state_dict.items()})


def _unit_axis(g: Tensor, v: Tensor, g_key: str, v_key: str) -> tuple[int | None, int]:
    try:
        layout = layout_from_shapes(tuple(g.shape), tuple(v.shape))
    except ValueError as exc:
        msg = f"{g_key}: {exc} ({v_key})"
        raise WeightNormError(msg) from None
    return (None, 1) if layout is None else (layout.dim, layout.groups)


def _fold(g: Tensor, v: Tensor, wn: StateDictWeightNorm) -> Tensor:
    layout = None if wn.dim is None else UnitLayout(wn.dim, wn.groups)  # None: the whole tensor
    with torch.no_grad():
        return compose_weight(g, v, layout, exp_scale=wn.exp_scale)
