"""The weight-norm parametrization: ``module.<name>`` becomes ``g * v / ||v||``.

It is registered with :mod:`torch.nn.utils.parametrize`, so ``module.weight`` is recomputed
from its two parameters wherever the model reads it (in its own forward, in a parent's
functional call, in ``nn.MultiheadAttention``), and the state-dict keys are torch's own:

    <module>.parametrizations.<name>.original0   g, shape ``layout.g_shape(v.shape)``
    <module>.parametrizations.<name>.original1   v, the weight's shape

With ``exp_scale=True``, ``original0`` stores ``s`` and ``g = e^s``, and the state dict holds a
marker ``<module>.parametrizations.<name>.0.g_is_log`` so that checkpoint tools can tell.

Two things torch's mechanism leaves us to do:

* its generated class raises on pickling (``torch.save(model)``); :func:`register` gives the
  per-instance class a ``__reduce_ex__`` that rebuilds the module on load;
* :func:`remove` takes a parametrization off *one instance* without touching the generated
  class, which ``copy.deepcopy`` shares between the original and the copy (torch's own
  ``remove_parametrizations`` deletes the property from that shared class and breaks the
  original).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.utils import parametrize

from .errors import WeightNormError, warn_user
from .fast import ScaledLinear, eager_weight, plain_formula_only, prefer_output_form, weight_norm_weight
from .kernels import PLAIN_TYPES
from .norm import (UnitLayout, compose_weight, direct_zero_units_on_load, exp_gain, layout_from_shapes, traceable_weight,
                   unit_norm)
from ._parametrized import is_parametrized, plain_type

__all__ = ["WeightNorm", "no_weight_cache", "put_back", "register", "remove", "weight_memo", "weight_norm_of"]

_TINY = torch.finfo(torch.float32).tiny
EXP_SCALE_MARKER = "g_is_log"  # state-dict key <module>.parametrizations.<name>.0.g_is_log


class WeightNorm(nn.Module):
    """``forward(g, v) = g * v / ||v||`` per output unit; ``right_inverse(w) = (||w||, w)``.

    ``dim``: the unit axis of the weight (0 for Linear and conv, 1 for a ConvTranspose's output
    channels); ``groups``: a grouped ConvTranspose's groups, whose output channels are
    ``groups * weight.shape[1]``; ``exp_scale``: ``g`` is stored as ``s = log g`` (``w = e^s * v/||v||``);
    ``qualname``: the weight's name in the model it was applied to (``"blocks.2.fc.weight"``), which
    warnings name.  The right inverse makes registration exact: the model computes the same function (up to
    float rounding) right after ``torch.nn.utils.parametrize.register_parametrization``.
    """

    def __init__(self, dim: int = 0, groups: int = 1, *, exp_scale: bool = False, qualname: str | None = None) -> None:
        super().__init__()
        self.layout = UnitLayout(dim, groups)
        self.exp_scale = exp_scale
        self.qualname = qualname
        if exp_scale:  # marks the state dict, so checkpoint tools know original0 holds s = log g
            self.register_buffer(EXP_SCALE_MARKER, torch.ones(()))

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def groups(self) -> int:
        return self.layout.groups

    # Set on an instance by the data-dependent init pass (wn_transform.data_init) until it has
    # calibrated the layer.  direction_only: the weight is v itself (the pass measures op(x, v));
    # each read then sets direction_read, which tells the pass the layer ran.
    # calibrator: a stock Linear hands its input to it instead of computing; any other read of
    # the weight calls calibrator.weight_read(), which stops that pass (the other pass then runs).
    direction_only = False
    calibrator: Any = None

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        if self.direction_only:
            self.direction_read = True
            return v
        if self.calibrator is not None:
            self.calibrator.weight_read()
        if torch.compiler.is_compiling() or plain_formula_only():  # the plain route
            return weight_norm_weight(g, v, self.layout, exp_scale=self.exp_scale)
        if is_fx_symbolic_tracing():  # a Tracer that enters the layer (not a leaf) records the formula
            return traceable_weight(g, v, self.layout, exp_scale=self.exp_scale)
        if torch.is_grad_enabled():
            memo = _MEMO.get()  # within one module call (weight_memo), the graph is shared by every read
            if memo is None:  # (the plain route is ruled out above)
                return eager_weight(exp_gain(g) if self.exp_scale else g, v, self.layout)
            return self._kept_weight(memo, id(self), g, v)
        if not _SERVING.get():  # read from outside a forward: a fresh tensor, as torch's own is
            return weight_norm_weight(g, v, self.layout, exp_scale=self.exp_scale)
        return self.cached_weight(g, v)

    def _kept_weight(self, store: dict, slot: object, g: Tensor, v: Tensor, *, check_gain: bool = False) -> Tensor:
        """The weight kept in ``store[slot]``, recomputed unless it was made from these very ``g``
        and ``v`` (the same tensor objects, storage, dtype and version counters: optimizer steps
        and ``load_state_dict`` bump them) and has not itself been written in place.
        Parameters made under ``torch.inference_mode()``, and weights computed there, have no
        version counter: never kept.

        ``check_gain``: also compare ``g``'s bytes with those the weight was made from.  Writes
        through ``.data`` bypass version counters; an update written that way (SGD by hand, an
        EMA of the parameters) changes every parameter it trains, and ``g`` has one value per
        unit: comparing it costs well under a microsecond (a ctypes array at its address, kept with
        the weight while its storage is the same: see :class:`_Kept`).  So the weight is not kept where such an
        update could change ``v`` alone: ``g`` frozen while ``v`` trains.  Off the CPU the
        comparison would wait for the device, so there the weight is not kept either.  Fused
        optimizers write in place without bumping version counters, and may leave ``g`` as it
        was (an ``lr=0`` group, a step that rounds away): their steps bump the versions of the
        parameters they step (:func:`_watch_optimizer_steps`).
        """
        if (g.is_inference() or v.is_inference() or torch.is_inference_mode_enabled()
                or type(g) not in PLAIN_TYPES or type(v) not in PLAIN_TYPES  # (a FakeTensor: no data to point at)
                or (check_gain and not _gain_tells_updates(g, v))):
            return weight_norm_weight(g, v, self.layout, exp_scale=self.exp_scale)
        if _steps_hook is None:
            _watch_optimizer_steps()
        key = (g.data_ptr(), v.data_ptr(), g._version, v._version, v.dtype)
        kept = store.get(slot)
        if kept is None or not kept.made_from(g, v, key) or (check_gain and kept.gain_changed()):
            weight = weight_norm_weight(g, v, self.layout, exp_scale=self.exp_scale)
            if type(weight) not in PLAIN_TYPES:  # made under FakeTensorMode from real g and v: not theirs to keep
                return weight
            kept = _Kept(g, v, key, weight, check_gain)
            store[slot] = kept
        return kept.weight

    def cached_weight(self, g: Tensor, v: Tensor) -> Tensor:
        """The weight, for a forward without autograd, kept until ``g`` or ``v`` changes (see
        :meth:`_kept_weight`).  Write ``v`` alone through ``.data`` only inside
        :func:`no_weight_cache`.  Only a layer's own forward gets the kept tensor (a read of
        ``module.weight`` from outside gets a fresh one, which the reader may write into).

        The cache holds one weight per layer; :func:`no_weight_cache` turns it off (the init
        pass does, so that a large model never holds a second copy of its weights).
        """
        if not _CACHING.get():
            self.__dict__.pop("_cached", None)
            return weight_norm_weight(g, v, self.layout, exp_scale=self.exp_scale)
        return self._kept_weight(self.__dict__, "_cached", g, v, check_gain=True)

    def __prepare_scriptable__(self) -> WeightNorm:
        """``torch.jit.script`` calls this on every submodule before compiling it: refuse with what to
        do instead (TorchScript cannot compile this module's Python state, nor torch's own weight norm
        at run time)."""
        msg = ("torch.jit.script cannot compile a weight-normalized layer: fold the model first "
               "(wn.fold_weight_norm(model)), or use torch.jit.trace, torch.compile or torch.export")
        raise WeightNormError(msg)

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_cached", None)
        return state

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``(g, v) = (||w||, w)`` per unit (``g = log ||w||`` with ``exp_scale``), in ``w``'s dtype
        (a half-precision norm beyond the dtype's range is inf: see :func:`check_gain_fits`)."""
        with torch.no_grad():
            norm = unit_norm(weight, self.layout)
            g = norm.clamp_min(_TINY).log() if self.exp_scale else norm
        return g.to(weight.dtype), weight

    def extra_repr(self) -> str:
        extra = ", exp_scale=True" if self.exp_scale else ""
        groups = f", groups={self.groups}" if self.groups > 1 else ""
        return f"dim={self.dim}{groups}{extra}"


def _gain_tells_updates(g: Tensor, v: Tensor) -> bool:
    """Whether comparing ``g``'s bytes detects updates written through ``.data``: ``g`` on the
    CPU and contiguous, trained whenever ``v`` is (a hand-written update of the trainable
    parameters changes ``g`` too), and at least float32: a step on a float16 or bfloat16 ``g``
    rounds away below about 1e-3 or 8e-3 of its size, as a learning rate's steps do (float32: 1e-7)."""
    return (g.is_cpu and g.is_contiguous() and g.element_size() >= 4  # (not device.type: 0.9 us)
            and (g.requires_grad or not v.requires_grad))


_steps_hook: Any = None


def _watch_optimizer_steps() -> None:
    """Register (once per process) a global ``torch.optim`` step post-hook, which every
    ``Optimizer`` subclass runs, that bumps the version counters of the parameters an optimizer
    may have written without bumping them: those of torch's fused groups (``fused=True``) and of
    optimizers from outside ``torch.optim`` (which may write through raw pointers).  torch's other
    optimizers write with in-place ops, which bump them already.  Only the stepped optimizer's
    ``g`` and ``v`` (:data:`_CHAINS`) that it stepped (those with a gradient): a frozen teacher's
    kept weights stay, and a graph kept for a later backward through parameters the step skipped
    (an actor's step beside a critic's graph), or through any model without weight norm, stays
    valid, as in torch."""
    global _steps_hook
    if _steps_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook  # torch.optim loads on first use

        _steps_hook = register_optimizer_step_post_hook(_bump_written_parameters)


REPLACED_MARK = "_wn_transform_replaced"  # on a Parameter the model no longer uses: what replaced it
# id of a Parameter of a model apply_weight_norm copied (inplace=False) -> (the Parameter, the copies it
# returned), all weakly: in this process only (a pickled model carries no mark), see mark_copied.  (Not a
# WeakKeyDictionary: it compares keys with ==, which a tensor answers elementwise.)
_COPIED: dict[int, tuple[weakref.ref, weakref.WeakSet]] = {}
_COPY_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> steps it was looked at again
_COPY_PATIENCE = 5  # steps an optimizer is looked at again while neither it nor the copy has gradients
_replacements = 0  # how many times mark_replaced marked Parameters in this process
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> _checked_key when last checked
_CHAINS: weakref.WeakSet = weakref.WeakSet()  # every parametrization list holding our WeightNorm (g, v: its originals)
_chains_added = 0  # how many times a list joined _CHAINS
_UNBUMPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> the g and v it writes unbumped


def mark_replaced(parameters: Iterable[Tensor | None], by: str) -> None:
    """Mark ``parameters`` as replaced by ``by`` (``"apply_weight_norm"``: by g and v;
    ``"fold_weight_norm"``: g and v by a plain weight): an optimizer made before that still steps
    them, and its next step warns (:func:`_warn_of_replaced_weights`)."""
    global _replacements
    marked = [p for p in parameters if isinstance(p, nn.Parameter)]
    for parameter in marked:
        parameter.__dict__[REPLACED_MARK] = by
    if marked:
        _replacements += 1  # every optimizer is looked at again at its next step
        _watch_optimizer_steps()


def mark_copied(parameters: Iterable[Tensor], copy: nn.Module) -> None:
    """Mark the Parameters of a model that ``apply_weight_norm`` copied, returning ``copy``: an
    optimizer made on them before, whose first step after finds none of its own with a gradient
    while the copy has some, is training the copy with the old model's Parameters, and warns
    (:func:`_warn_of_replaced_weights`).  (One that trains the model given has gradients; one
    stepped while the copy has none, a warm-up step, says nothing.)"""
    global _replacements
    marked = [p for p in parameters if isinstance(p, nn.Parameter)]
    for parameter in marked:
        refs = _COPIED.get(id(parameter))
        if refs is None or refs[0]() is not parameter:
            refs = (weakref.ref(parameter, lambda _, key=id(parameter): _COPIED.pop(key, None)), weakref.WeakSet())
            _COPIED[id(parameter)] = refs
        refs[1].add(copy)
    if marked:
        _replacements += 1
        _watch_optimizer_steps()


def _bump_written_parameters(optimizer: Any, args: tuple, kwargs: dict) -> None:
    if torch.compiler.is_compiling():  # traced into a compiled step (torch.compile(optimizer.step)), whose
        return  # runtime bumps the versions of the inputs its graph writes; the warning is an eager step's
    key = (_replacements, _chains_added, *map(len, (group["params"] for group in optimizer.param_groups)))
    if _CHECKED.get(optimizer) != key:  # (add_param_group, another model weight-normalized)
        ours = {id(p) for chain in list(_CHAINS) for p in (chain.original0, chain.original1)}
        outside = not type(optimizer).__module__.startswith("torch.optim")
        _UNBUMPED[optimizer] = [p for group in optimizer.param_groups if outside or group.get("fused")
                                for p in group["params"] if id(p) in ours and not p.is_inference()]
        _CHECKED[optimizer] = key
        _warn_of_replaced_weights(optimizer)  # (last: -W error makes it raise)
    elif optimizer in _COPY_PENDING:  # it steps a copied model's Parameters, and nothing had a gradient yet
        _warn_of_training_a_copy(optimizer)
    written = [p for p in _UNBUMPED.get(optimizer, ()) if p.grad is not None]
    if written:
        torch.autograd.graph.increment_version(written)


def _warn_of_replaced_weights(optimizer: Any) -> None:
    """Warn (at an optimizer's first step, and at its first step after Parameters were marked
    replaced) when it steps Parameters the model no longer uses: created before
    ``apply_weight_norm(..., inplace=True)`` or ``fold_weight_norm(..., inplace=True)``, it trains
    none of those that replaced them."""
    stale = Counter(p.__dict__[REPLACED_MARK] for group in optimizer.param_groups for p in group["params"]
                    if REPLACED_MARK in getattr(p, "__dict__", {}))
    for by, count in stale.items():
        what = "weights" if by == "apply_weight_norm" else "g and v parameters"
        new = "g and v" if by == "apply_weight_norm" else "plain weights"
        msg = (f"this {type(optimizer).__name__} steps {count} {what[:-1] if count == 1 else what} that {by} "
               f"replaced by {new}: the model no longer uses {'it' if count == 1 else 'them'}, and its {new} are not "
               f"in this optimizer, so they do not train; create the optimizer after {by}")
        warn_user(msg, UserWarning)  # the caller of optimizer.step() (or of GradScaler.step)
    _warn_of_training_a_copy(optimizer)


def _warn_of_training_a_copy(optimizer: Any) -> None:
    """Warn when ``optimizer`` steps Parameters of a model that ``apply_weight_norm`` copied
    (:func:`mark_copied`), none of which has a gradient, while a copy it returned has: it trains
    the copy with the old model's Parameters, and nothing trains.  Where neither has a gradient
    yet (a warm-up step), it looks again at the next step."""
    waited = _COPY_PENDING.pop(optimizer, 0)
    marked = [(p, refs[1]) for group in optimizer.param_groups for p in group["params"]
              if (refs := _COPIED.get(id(p))) is not None and refs[0]() is p]
    if not marked or any(_has_gradient(p) for p, _ in marked):  # (it trains the model given: as meant)
        return
    mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
    theirs = list({id(q): q for _, held in marked for copy in held for q in copy.parameters()}.values())
    if any(id(q) in mine for q in theirs):  # it steps the copy too: as meant
        return
    if not any(_has_gradient(q) for q in theirs):
        if waited < _COPY_PATIENCE:  # neither has one yet (a warm-up step): again at the next step
            _COPY_PENDING[optimizer] = waited + 1
        return
    msg = (f"this {type(optimizer).__name__} steps the Parameters of the model apply_weight_norm copied, and none of "
           "them has a gradient while the copy it returned has: apply_weight_norm returns a new model "
           "(inplace=False), whose Parameters are not in this optimizer, so nothing trains; create the optimizer "
           "from the returned model's parameters (or pass inplace=True)")
    warn_user(msg, UserWarning)


def _has_gradient(parameter: Tensor) -> bool:
    """A gradient, and not one ``zero_grad(set_to_none=False)`` left as zeros."""
    grad = parameter.grad
    return grad is not None and (grad.is_sparse or bool(grad.any()))


class _Kept:
    """A weight computed from ``(g, v)``, with what tells whether it is still theirs."""

    __slots__ = ("g", "gain_bytes", "gain_memory", "key", "storages", "v", "weight", "weight_version")

    def __init__(self, g: Tensor, v: Tensor, key: tuple, weight: Tensor, check_gain: bool) -> None:
        # The tensors themselves, held: a freed tensor's address (and id) could come back for the
        # next one.  Not weak references: torch.utils.swap_tensors refuses tensors that have them.
        self.g, self.v = g, v
        # And their memory: `v.data = new` (no version bump) frees the old storage, and the new one
        # could be allocated at its address; held, the address stays taken until the weight is redone.
        self.storages = (g.untyped_storage(), v.untyped_storage())
        self.key, self.weight, self.weight_version = key, weight, weight._version
        # g's bytes, seen through a ctypes array at its address (not a NumPy view, which would make
        # the storage non-resizable for good: FSDP2 frees parameters by resizing it to 0), and
        # what they were.  Reading .raw costs 0.1 us (ctypes.string_at: 1 us).
        size = g.numel() * g.element_size()
        self.gain_memory = (ctypes.c_char * size).from_address(g.data_ptr()) if check_gain and size else None
        self.gain_bytes = self.gain_memory.raw if self.gain_memory is not None else None

    def made_from(self, g: Tensor, v: Tensor, key: tuple) -> bool:
        return (self.key == key and self.g is g and self.v is v
                and self.weight._version == self.weight_version)  # nobody wrote into the weight

    def gain_changed(self) -> bool:
        """Whether ``g``'s bytes changed.  Called once :meth:`made_from` holds: ``g`` is at the address
        it was, with the version it had (a resize would have bumped it), so the read is in bounds."""
        return self.gain_memory is not None and self.gain_memory.raw != self.gain_bytes


_CACHING: contextvars.ContextVar[bool] = contextvars.ContextVar("wn_transform_weight_cache", default=True)
_SERVING: contextvars.ContextVar[bool] = contextvars.ContextVar("wn_transform_in_forward", default=False)
_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("wn_transform_weight_memo", default=None)


@contextlib.contextmanager
def weight_memo() -> Iterator[None]:
    """Within this context, each weight is computed once and every read gets that tensor.

    For the span of *one* module call only: a weight reused across calls would share an
    autograd graph that the first ``backward()`` frees.  ``nn.MultiheadAttention`` reads
    ``in_proj_weight`` three times per training call (two of them only to check its dtype);
    its forward runs in this context.
    """
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


@contextlib.contextmanager
def no_weight_cache() -> Iterator[None]:
    """Within this context, weights computed without autograd (eval mode, ``torch.no_grad()``) are
    computed afresh and not kept."""
    token = _CACHING.set(False)
    try:
        yield
    finally:
        _CACHING.reset(token)


def register(module: nn.Module, name: str, parametrization: WeightNorm) -> None:
    """Reparameterize ``module.<name>`` as ``(g, v)``; the weight's value is kept.

    ``forward(right_inverse(w))`` has ``w``'s shape and dtype by construction, so torch's
    consistency check (which computes the weight once more: half of this call on a large layer)
    is skipped; the chain's ``unsafe`` flag is then put back, so that assigning
    ``module.<name> = tensor`` is checked as usual.
    """
    parametrization.layout.check(getattr(module, name).shape)
    mark_replaced([module._parameters.get(name)], "apply_weight_norm")  # an optimizer made before may hold it
    order = _parameter_order(module) or tuple(module._parameters)
    holder = module._modules.get("parametrizations")
    stacked = holder._modules.get(name) if holder is not None else None
    unsafe = bool(stacked.unsafe) if stacked is not None else False
    parametrize.register_parametrization(module, name, parametrization, unsafe=True)
    module.parametrizations[name].unsafe = unsafe
    module.parametrizations.__dict__[_ORDER] = order  # where fold puts the parameter back
    if _layout_hook(module, name) is None:
        module._register_load_state_dict_pre_hook(functools.partial(_load_other_layouts, name), with_module=True)
    _extend_class(module)


def _load_other_layouts(name: str, module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict,
                        strict: bool, missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
    """A ``load_state_dict`` pre-hook: the entries of ``module.<name>`` written in another layout become
    this library's ``(g, v)``, with the same weight.  torch's own weight norm renames the legacy keys
    for its layers; this also takes

    * the legacy ``<name>_g``/``<name>_v`` pair, kept as it is where its unit axis is ours;
    * a ``(g, v)`` pair normalized over another axis (torch's ConvTranspose: per input channel), over
      the whole tensor (``dim=None``), or with ``g`` (or ``s = log g``) where the layer stores the other:
      a pair holds ``s`` only with the marker ``<...>.0.g_is_log`` beside it (a ``state_dict()`` of an
      ``exp_scale`` layer has it); without it, ``g``, as in torch's layouts (a negative gain there is an
      error: an ``s`` that lost its marker, from a parameters-only save, or a ``g`` trained below 0;
      a gain of 0, a pruned or zero unit's, is a ``g``);
    * a plain ``<name>`` (a checkpoint of the model before weight norm): ``g = ||w||``, ``v = w``.

    ``state_dict`` is ``load_state_dict``'s own copy; entries that fit nothing are left for it to report.
    A plain or legacy weight of another shape is torch's "size mismatch" error (raised whatever
    ``strict`` says, as for a plain layer), not a missing and an unexpected key.
    """
    wn = weight_norm_of(module, name)
    if wn is None:
        return
    chain = module.parametrizations[name]
    base = f"{prefix}parametrizations.{name}."
    g_key, v_key, marker_key = f"{base}original0", f"{base}original1", f"{base}0.{EXP_SCALE_MARKER}"
    legacy = (f"{prefix}{name}_g", f"{prefix}{name}_v")
    dtype = chain.original1.dtype  # computed in the layer's own precision (a bfloat16 checkpoint: no bfloat16 g)
    assign = bool(local_metadata.get("assign_to_params_buffers", False))  # (then stored in the checkpoint's)
    if g_key in state_dict and v_key in state_dict:
        keys, stored_log = (g_key, v_key), marker_key in state_dict
        if state_dict[g_key].shape == chain.original0.shape and stored_log == wn.exp_scale:
            return  # this library's layout, as the layer stores g (without the marker: g, as torch's is)
        if wn.exp_scale and not stored_log and bool((state_dict[g_key] < 0).any()):
            error_msgs.append(f"{g_key} holds negative values and no {marker_key}: either s = log g from a model "
                              f"with exp_scale=True saved without its buffers (to load it as s, add {marker_key!r}: "
                              "torch.ones(()) to the state dict), or a g that training drove below 0 (torch's weight "
                              "norm does not keep it positive; to load it as g, fold the checkpoint first, "
                              "wn.fold_state_dict, and load its plain weights)")
            return
    elif all(key in state_dict for key in legacy):
        keys, stored_log = legacy, False
    elif f"{prefix}{name}" in state_dict:
        if state_dict[f"{prefix}{name}"].shape != chain.original1.shape:
            _size_mismatch(state_dict, f"{prefix}{name}", (f"{prefix}{name}",), chain, (g_key, v_key), error_msgs)
            return
        weight = state_dict.pop(f"{prefix}{name}")
        pair = _trainable_pair(wn, _widened(weight, dtype), f"{prefix}{name}")
        state_dict[g_key], state_dict[v_key] = _as_stored(wn, pair, weight.dtype if assign else None, f"{prefix}{name}")
        if wn.exp_scale:
            state_dict[marker_key] = torch.ones(())
        return
    else:
        return
    g, v = (state_dict[key] for key in keys)
    try:
        layout = layout_from_shapes(tuple(g.shape), tuple(v.shape))
    except ValueError:
        return
    if v.shape != chain.original1.shape:
        if keys == legacy:  # (our own keys of another shape are torch's to report, under their names)
            _size_mismatch(state_dict, legacy[1], (*legacy, marker_key), chain, (g_key, v_key), error_msgs)
        return
    for key in (*keys, marker_key):
        state_dict.pop(key, None)
    if layout == wn.layout and not stored_log and not wn.exp_scale:
        state_dict[g_key], state_dict[v_key] = g, v  # the same axis: kept as they are (the norm of v too)
        return
    stored = v.dtype if assign else None
    g, v = _widened(g, dtype), _widened(v, dtype)
    with torch.no_grad():
        weight = compose_weight(g, v, layout, exp_scale=stored_log)  # layout None: the whole tensor
    state_dict[g_key], state_dict[v_key] = _as_stored(wn, _trainable_pair(wn, weight, g_key), stored, g_key)
    if wn.exp_scale:
        state_dict[marker_key] = torch.ones(())


def _as_stored(wn: WeightNorm, pair: tuple[Tensor, Tensor], dtype: torch.dtype | None,
               key: str) -> tuple[Tensor, Tensor]:
    """``(g, v)`` as the load stores them: in ``dtype``, the checkpoint's, under ``load_state_dict(...,
    assign=True)`` (which makes the checkpoint's tensors the parameters, in their dtype, as it does the
    bias's: a bfloat16 checkpoint gives a bfloat16 layer); computed wider, kept as they are otherwise
    (None).  A ``g`` beyond a half-precision dtype's range is refused (``key``: the checkpoint's)."""
    if dtype is None or not dtype.is_floating_point:
        return pair
    g, v = pair[0].to(dtype), pair[1].to(dtype)
    check_gain_fits(wn, g, v, key)
    return g, v


def check_gain_fits(wn: WeightNorm, g: Tensor, v: Tensor, where: str) -> None:
    """Refuse ``g = ||w||`` that is inf in a half-precision layer whose weight is finite (every
    element fits, their norm does not): the layer would compute NaN.  ``where`` names it."""
    msg = _gain_overflow(wn, g, v, where, "weight-normalize this layer in float32 or bfloat16 (model.float() "
                                          "first), or with exp_scale=True (g = e^s)")
    if msg is not None:
        raise WeightNormError(msg)


def _gain_overflow(wn: WeightNorm, g: Tensor, v: Tensor, where: str, remedy: str,
                   before: Tensor | None = None) -> str | None:
    """What :func:`check_gain_fits` says of ``g``, or None where ``g`` fits.  ``before``: ``g`` as it
    was before a conversion made it overflow (its largest unit is the norm named); else ``g = ||v||``."""
    if wn.exp_scale or g.element_size() >= 4 or g.is_meta or not bool(g.isinf().any()) or not bool(v.isfinite().all()):
        return None
    norm = (before.detach().abs().max() if before is not None and bool(before.isfinite().all())
            else unit_norm(v.detach(), wn.layout).max()).item()
    return (f"{where}: a unit's norm g = ||w|| = {norm:g} is beyond {g.dtype}'s range (the largest is "
            f"{torch.finfo(g.dtype).max:g}), so g cannot hold it and the layer would compute NaN; {remedy}")


def _apply_checking_gains(self: nn.Module, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
    """The layer's own ``_apply`` (what ``.to()``, ``.half()``, ``.cuda()`` run), then a warning
    for each ``g`` that a conversion to float16 took beyond its range (the plain layer's weight
    would still fit: :func:`check_gain_fits`)."""
    gains = {name: chain.original0.detach() for name, chain in self._modules["parametrizations"].items()
             if _ours(chain) is not None}  # held, not copied (another parametrization, on the bias say, has no g)
    if recurse:  # as torch calls it on a child: a layer's own _apply(self, fn) may take fn alone
        plain_type(self)._apply(self, fn)
    else:
        plain_type(self)._apply(self, fn, recurse)
    for name, chain in self._modules["parametrizations"].items():
        wn = _ours(chain)
        if wn is not None and chain.original0.dtype == torch.float16:
            layer = f"{plain_type(self).__name__}({self.extra_repr()})"
            where = f"{wn.__dict__.get('qualname')} ({layer})" if wn.__dict__.get("qualname") else f"{layer}.{name}"
            msg = _gain_overflow(wn, chain.original0, chain.original1, where, "keep this layer in float32 or "
                                 "bfloat16, or weight-normalize it with exp_scale=True (g = e^s, which fits)",
                                 before=gains.get(name))
            if msg is not None:
                warn_user(msg, UserWarning)
    return self


def _trainable_pair(wn: WeightNorm, weight: Tensor, key: str) -> tuple[Tensor, Tensor]:
    """``(g, v) = wn.right_inverse(weight)``, except that a unit whose weight is all zero gets a unit
    direction ``v`` with ``g = 0``, as :func:`~wn_transform.apply_weight_norm` gives it: the same
    weight, but trainable (``v = 0`` would leave both gradients 0 forever).  The direction is drawn
    from a generator seeded with 0, so every process that loads the checkpoint gets the same one.
    ``key``: the checkpoint's, named in an error."""
    g, v = wn.right_inverse(weight)
    check_gain_fits(wn, g, v, key)
    if wn.exp_scale:
        return g, v  # no g = e^s is 0 (such a unit stays at about 0)
    return g, direct_zero_units_on_load(v, g, wn.layout)


def _size_mismatch(state_dict: dict, key: str, drop: tuple[str, ...], chain: nn.Module, ours: tuple[str, str],
                   error_msgs: list[str]) -> None:
    """Report ``state_dict[key]`` as torch reports a parameter of another shape; its entries ``drop``
    leave the checkpoint, and the layer's own ``(g, v)`` stand in for them, so that the error is
    that alone (not also a missing and an unexpected key)."""
    error_msgs.append(f"size mismatch for {key}: copying a param with shape {state_dict[key].shape} from checkpoint, the "
                      f"shape in current model is {chain.original1.shape} (weight-normalized, stored as {ours[0]} and "
                      f"{ours[1]}).")
    for dropped in drop:
        state_dict.pop(dropped, None)
    state_dict[ours[0]], state_dict[ours[1]] = chain.original0.detach(), chain.original1.detach()


def _widened(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` in ``dtype`` where that is wider (a float8/float16/bfloat16 checkpoint for a float32
    layer); as it is otherwise."""
    if not tensor.is_floating_point() or not dtype.is_floating_point:
        return tensor
    try:
        wide = torch.promote_types(tensor.dtype, dtype)
    except RuntimeError:  # torch promotes no float8 type: the layer's own dtype
        wide = dtype
    return tensor.to(wide)


def _layout_hook(module: nn.Module, name: str) -> int | None:
    """The id of the :func:`_load_other_layouts` hook of ``module.<name>``, if it has one."""
    for hook_id, wrapped in module._load_state_dict_pre_hooks.items():
        hook = getattr(wrapped, "hook", wrapped)
        if isinstance(hook, functools.partial) and hook.func is _load_other_layouts and hook.args == (name,):
            return hook_id
    return None


def weight_norm_of(module: nn.Module, name: str) -> WeightNorm | None:
    """This library's parametrization on ``module.<name>``, if there is one."""
    if not is_parametrized(module, name):
        return None
    return _ours(module.parametrizations[name])


def _ours(chain: nn.Module) -> WeightNorm | None:
    """The :class:`WeightNorm` of a parametrization chain that is exactly ours, else None."""
    modules = chain._modules
    wn = modules.get("0")
    return wn if len(modules) == 1 and isinstance(wn, WeightNorm) else None


def remove(module: nn.Module, name: str, value: Tensor, *, requires_grad: bool = True) -> None:
    """Drop the parametrization of ``module.<name>`` and store ``value`` as a plain Parameter.

    Only this instance changes: its class is swapped for a fresh one (or for the original
    class when nothing else is parametrized), never edited in place.  The restored
    parameter goes back to its place in ``_parameters`` (optimizer state dicts count on the
    order); where that place is unknown (torch's own weight norm), it goes first, where a
    freshly built layer keeps its weight.
    """
    order = _parameter_order(module)
    base = plain_type(module)
    module._load_state_dict_pre_hooks.pop(_layout_hook(module, name), None)  # a plain model needs nothing of ours
    del module.parametrizations[name]
    remaining = list(module.parametrizations.keys())
    module.__class__ = base
    if not remaining:
        del module.parametrizations
    else:
        parametrize._inject_new_class(module)
        for other in remaining:
            parametrize._inject_property(module, other)
        _extend_class(module)
    parameter = value if isinstance(value, nn.Parameter) else nn.Parameter(value.detach(), requires_grad=requires_grad)
    put_back(module, name, parameter, order)


def put_back(module: nn.Module, name: str, parameter: nn.Parameter, order: tuple[str, ...] | None = None) -> None:
    """Make ``parameter`` ``module.<name>`` again, where the module had it: at its place in ``order``
    (the parameters' order before this library parametrized any), else, for an RNN or a cell, its
    place in a plain one's (an optimizer's state is indexed by parameter position), else first;
    an RNN's cached list of weights is refreshed (TorchScript never refreshes it)."""
    params = {name: parameter, **module._parameters}
    if not order and isinstance(module, nn.RNNBase):
        order = tuple(module._flat_weights_names)
    elif not order and isinstance(module, nn.RNNCellBase):
        order = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    if order:
        rank = {key: i for i, key in enumerate(order)}
        params = dict(sorted(params.items(), key=lambda item: rank.get(item[0], len(rank))))
    module._parameters = params
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


_ORDER = "_wn_parameter_order"


def _parameter_order(module: nn.Module) -> tuple[str, ...] | None:
    """The order of ``module._parameters`` before this library parametrized any of them."""
    holder = module.__dict__.get("_modules", {}).get("parametrizations")
    return holder.__dict__.get(_ORDER) if holder is not None else None


def _reduce_parametrized(self: nn.Module, protocol: int) -> tuple:
    """Pickle, and deep-copy, a parametrized module as its original class, the names to
    re-parametrize and its own state, given last: ``copy.deepcopy`` records the copy in its memo
    before it copies the state (a submodule that refers back to the module gets the copy).

    The copy has a generated class of its own (torch's deepcopy shares the original's, so that
    ``remove_parametrizations`` on the copy, a repo's own ``remove_weight_norm()`` on an export
    copy, would take the weight's property off the original), and the weights an RNN computed in
    its last forward (see :func:`_computed`) are copied by value."""
    base = plain_type(self)
    names = tuple(self.parametrizations.keys())
    state = dict(base.__getstate__(self))  # the original class's own state (an RNN drops its weakrefs)
    if "_flat_weights" in state:
        state["_flat_weights"] = [w.detach() if _computed(w) else w for w in state["_flat_weights"]]
    return (_parametrized_shell, (base, names), state)


def _parametrized_shell(base: type, names: tuple[str, ...]) -> nn.Module:
    """An empty instance of a new parametrized class of ``base``; its state follows (unpickling,
    ``copy.deepcopy``) through :func:`_set_parametrized_state`."""
    module = base.__new__(base)
    parametrize._inject_new_class(module)
    for name in names:
        parametrize._inject_property(module, name)
    type(module).__setstate__ = _set_parametrized_state
    return module


def _set_parametrized_state(self: nn.Module, state: dict) -> None:
    """The original class's ``__setstate__``, then this library's additions to the class."""
    cls = type(self)
    del cls.__setstate__
    cls.__bases__[0].__setstate__(self, state)
    _extend_class(self)


def _rebuild_parametrized(base: type, names: list[str], state: dict) -> nn.Module:
    """How files pickled by wn_transform 0.x before the state came apart from the class load."""
    module = _parametrized_shell(base, tuple(names))
    module.__setstate__(state)
    return module


def _computed(weight: object) -> bool:
    """Whether an RNN's ``_flat_weights`` entry is a weight its last forward computed: a tensor with a
    graph, which pickling and deepcopy refuse.  A copy takes its values; its next forward computes
    them afresh from the parameters."""
    return isinstance(weight, Tensor) and weight.grad_fn is not None


def _join_chains(chains: Iterable[nn.Module]) -> None:
    """Add parametrization lists of ours to :data:`_CHAINS` (the step hook bumps their g and v)."""
    global _chains_added
    for chain in chains:
        if chain not in _CHAINS:
            _CHAINS.add(chain)
            _chains_added += 1


def _extend_class(module: nn.Module) -> None:
    """Give the instance's own generated class pickling, a direct getter for each weight this
    library normalizes and, for a stock ``nn.Linear`` or ``nn.MultiheadAttention``, a faster
    forward that computes the same thing; any other module keeps its forward.  Except for a
    stock Linear (whose forward reads the cache itself), the module's calls open the eval-mode
    weight cache to its weight reads (:func:`_serving_call`)."""
    cls = type(module)
    cls.__reduce_ex__ = _reduce_parametrized
    if "__deepcopy__" in cls.__dict__ and not hasattr(cls.__bases__[0], "__deepcopy__"):
        # torch's copier, given to a class that has none: copy.deepcopy looks __deepcopy__ up on
        # the instance, and a wrapper whose __getattr__ forwards unknown names to the layer it holds
        # (peft's ModulesToSaveWrapper) would copy the layer alone; deepcopy takes __reduce_ex__.
        del cls.__deepcopy__
    chains = module._modules["parametrizations"]._modules
    ours = {name for name, chain in chains.items() if _ours(chain) is not None}
    _join_chains(chain for chain in chains.values() if isinstance(chain._modules.get("0"), WeightNorm))  # (stacked too)
    if ours:
        cls._apply = _apply_checking_gains
    for name in ours:
        prop = cls.__dict__.get(name)
        if isinstance(prop, property) and not isinstance(prop, _DirectWeight):
            setattr(cls, name, _DirectWeight(name, prop))
    base = plain_type(module)
    if base.forward is nn.Linear.forward and "weight" in ours:
        cls.forward = _linear_forward  # reads the cache itself
        if "__call__" in cls.__dict__:  # set when the bias was parametrized first
            del cls.__call__
        return
    cls.forward = _attention_forward if base.forward is nn.MultiheadAttention.forward else base.forward
    cls.__call__ = _serving_call
    own = next(klass for klass in base.__mro__ if "__call__" in klass.__dict__)
    cls._wn_base_call = None if own is nn.Module else base.__call__  # None: nn.Module's, looked up per call


def _serving_call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The module's own ``__call__``, with the eval-mode weight cache open to the weight reads of
    this call (a read from outside a module call gets a fresh tensor: see
    :meth:`WeightNorm.cached_weight`).  ``forward`` stays the class's own.  ``nn.Module.__call__``
    is looked up at each call, not kept: ``torch.fx`` replaces it while tracing (to record a leaf
    module as one ``call_module`` node, as torch's own weight norm is).  A call with autograd on
    opens nothing (2.5 us saved per training call): its weights are computed on the graph, never
    kept, and a read under ``torch.no_grad()`` inside such a call gets a fresh tensor."""
    call = type(self)._wn_base_call or nn.Module.__call__  # not type_before_parametrizations: 2 us
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or _SERVING.get():  # (no ContextVar under a compiler)
        return call(self, *args, **kwargs)
    token = _SERVING.set(True)
    try:
        return call(self, *args, **kwargs)
    finally:
        _SERVING.reset(token)


class _DirectWeight(property):
    """``module.<name>`` computed by calling :meth:`WeightNorm.forward` on ``(g, v)`` directly.

    torch's parametrization property goes through ``ParametrizationList.forward`` and two
    module calls (about 10 us per read on CPU).  This getter skips them whenever they would
    do nothing more, and calls torch's own getter (``fallback``) otherwise (see :func:`_direct`).
    """

    def __init__(self, name: str, fallback: property) -> None:
        super().__init__(fallback.fget, fallback.fset, None, fallback.__doc__)
        self.name = name

    def __get__(self, module: nn.Module | None, owner: type | None = None) -> Any:
        if module is None:
            return self
        chain = module._modules["parametrizations"]._modules[self.name]
        wn = _direct(chain)
        if wn is None:
            return self.fget(module)  # torch's own getter
        params = chain._parameters
        return wn.forward(params["original0"], params["original1"])


def _direct(chain: nn.Module) -> WeightNorm | None:
    """The :class:`WeightNorm` of a parametrization chain if calling its ``forward`` directly
    computes exactly what torch's property would; None when the property must run (torch's
    ``parametrize.cached()`` is active, another parametrization is stacked on ours, a forward
    hook is set on the parametrization module or on its chain (``torch.nn.utils.prune``), the
    chain's ``forward`` is replaced on the instance (``accelerate``'s device and offload hooks,
    which load g and v around the chain's call), or ``torch.fx`` is tracing: the property's module
    call becomes a graph node that reads the parameters, where a direct call would bake the
    weight in as a constant).  This runs on every weight read, so it checks no more than that:
    torch's global module hooks do not see the parametrization's call.
    """
    wn = _ours(chain)
    if (wn is None or wn._forward_hooks or wn._forward_pre_hooks or chain._forward_hooks or chain._forward_pre_hooks
            or "forward" in chain.__dict__
            or parametrize._cache_enabled or is_fx_symbolic_tracing() or "original1" not in chain._parameters):
        return None  # (a hook on the chain: torch.nn.utils.prune turns original1 into a masked attribute;
    return wn  # FSDP's flat parameter leaves g and v as plain attributes, outside _parameters)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for this device type (``meta`` and others have no autocast, and
    ``torch.is_autocast_enabled`` raises for them)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def hands_input_to_calibrator(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s forward hands its input to :attr:`WeightNorm.calibrator` of its
    ``name`` weight (a stock ``nn.Linear`` this library normalizes: see :func:`_linear_forward`)."""
    return name == "weight" and type(module).forward is _linear_forward


def _attention_forward(self: nn.MultiheadAttention, *args, **kwargs):
    """``nn.MultiheadAttention.forward``, with each weight computed once per call (:func:`weight_memo`)."""
    if torch.compiler.is_compiling():  # the compiler removes the repeated reads itself
        return nn.MultiheadAttention.forward(self, *args, **kwargs)
    with weight_memo():
        return nn.MultiheadAttention.forward(self, *args, **kwargs)


def _linear_forward(self: nn.Linear, input: Tensor) -> Tensor:
    """``nn.Linear.forward``, computing the same thing by the cheapest route.

    Under ``torch.func`` transforms, forward-mode AD or ``torch.jit.trace``: the plain formula.  No graph to build:
    the cached weight.  Training ``g`` or ``v`` with few rows per call: the output form
    (:class:`~wn_transform.fast.ScaledLinear`, no weight built; a frozen layer builds its weight, as
    a plain one needs only that for its input's gradient, not the input).  Otherwise (and under autocast,
    so that the layer computes in autocast's dtype as a plain Linear does): the weight form.
    Where torch's property must run (see :func:`_direct`), it reads ``self.weight``.
    """
    chains = self._modules.get("parametrizations")
    chain = chains._modules.get("weight") if chains is not None else None
    if chain is None:  # folded since this forward was bound (accelerate's hooks keep it as _old_forward)
        return nn.Linear.forward(self, input)
    own = self._parameters
    bias = own["bias"] if "bias" in own else self.bias  # not Module.__getattr__: 3-4 % of a batch-1 forward
    wn = _direct(chain)
    if wn is None:
        return F.linear(input, self.weight, bias)
    if wn.calibrator is not None:  # the data-dependent init pass measures this layer on its input
        return wn.calibrator(input, bias)
    params = chain._parameters
    g, v = params["original0"], params["original1"]
    if not torch.compiler.is_compiling() and plain_formula_only():
        return F.linear(input, wn.forward(g, v), bias)  # torch.func, forward AD, jit.trace: the plain route
    if not torch.is_grad_enabled():
        if not torch.compiler.is_compiling():
            return F.linear(input, wn.forward(g, v) if wn.direction_only else wn.cached_weight(g, v), bias)  # (v, read)
    elif self.training and not wn.direction_only and (g.requires_grad or v.requires_grad) and _takes_output_form(input, v):
        return ScaledLinear.apply(input, g, v, bias, wn.exp_scale)
    return F.linear(input, wn.forward(g, v), bias)


def _takes_output_form(input: Tensor, v: Tensor) -> bool:
    """Whether a training call of a Linear with direction ``v [out, in]`` scales the output
    (:class:`~wn_transform.fast.ScaledLinear`) instead of building the weight: few rows through a
    large weight (:func:`~wn_transform.fast.prefer_output_form`), except

    * off the CPU: an accelerator's step is bound by kernel launches at the sizes where the
      output form saves work, and it launches more of them than torch's fused weight kernel;
    * in float16, whose range ``u = x @ v'`` can leave (``v`` is not normalized; ``w`` is);
    * under autocast, which casts ``F.linear``'s operands itself;
    * while ``torch.export`` traces: an exported program holds for every batch size, so nothing
      may branch on the number of rows;
    * for a sparse, MKL-DNN or nested input, which ``F.linear`` takes and the output form's reshape does not.
    """
    return (input.is_cpu and input.layout == torch.strided and not input.is_nested and input.dim() > 0
            and input.shape[-1] == v.shape[1]
            and v.dtype != torch.float16
            and not torch.compiler.is_exporting()
            and prefer_output_form(input.numel() // input.shape[-1], input.shape[-1], v.shape[0])
            and not _autocast_on(input.device.type))

