"""``apply_weight_norm``: discover -> select -> reparameterize -> (data-dependent) init."""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_leaves

from . import batch as batch_mod
from ._copy import compiled_wrapper, copy_model, held_by_ddp, refuse_ddp, refuse_offloaded, refuse_sharded, routed_module
from ._gc import gc_paused
from .data_init import InitNotes, data_init, resample_directions
from .discover import WALK, Discovery, account_for_every_layer, discover, preserved_state
from .errors import NoTargetsError, WeightNormError, few, warn_user
from .fold import FoundWeightNorm, find_weight_norms, fold_one, foldable, pruned, remember_built_with
from .mean_only_bn import attach as attach_mean_only_bn
from .mean_only_bn import channels as mean_only_bn_channels
from .mean_only_bn import mean_only_bn_of
from .moments import broadcast, resolve_group
from .ranks import check_same_model
from .norm import direct_zero_units, unit_norm
from .parametrization import REPLACED_MARK, WeightNorm, check_gain_fits, mark_copied, register
from .report import WeightNormReport
from .select import FilterFn, Selection
from .targets import Skipped, Target
from .uses import gradient_hooks

__all__ = ["apply_weight_norm", "plan_weight_norm", "weight_norm_report"]

Init = Literal["data", "preserve"]
Existing = Literal["keep", "convert"]
_REPORTS: weakref.WeakKeyDictionary[nn.Module, WeightNormReport] = weakref.WeakKeyDictionary()
_LAYOUT_NAMES = {"wn_transform": "wn_transform", "torch": "torch.nn.utils.parametrizations.weight_norm",
                 "legacy": "legacy torch.nn.utils.weight_norm"}


def apply_weight_norm(
    model: nn.Module,
    sample_batch: batch_mod.SampleBatch | None = None,
    *,
    init: Init | None = None,
    init_scale: float = 1.0,
    exact_init: bool = False,
    resample: bool = False,
    exp_scale: bool = False,
    mean_only_bn: bool = False,
    distributed: bool | dist.ProcessGroup | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: type | Sequence[type] | None = None,
    filter_fn: FilterFn | None = None,
    existing: Existing = "keep",
    inplace: bool = False,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Reparameterize every linear/conv weight of ``model`` as ``w = g * v / ||v||``.

    Args:
        model: any ``nn.Module``, trained or not.
        sample_batch: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
            It traces models that ``symbolic_trace`` cannot, and calibrates ``init="data"``.
        init: ``"data"`` (default with a batch): per output unit, ``t = v·x/||v||`` on the
            batch, then ``g = s/sigma[t]`` and ``b = -s*mu[t]/sigma[t]``, layer by layer in
            forward order, in one forward pass.  ``"preserve"`` (default without a batch):
            ``g = ||w||``, ``v = w``, the same function to within float rounding.
        init_scale: ``s`` above (the std of every pre-activation after a data init).
        exact_init: ``False`` (default) hands on ``g*t + b`` from each layer to the next, as the
            paper's reference code does: each op runs once.  ``True`` runs each op a second
            time with the new ``g, b`` and hands on its real output, so every layer is
            calibrated on the very bits the model computes on this batch (the pass takes about
            1.8x as long).  The two differ by float rounding, which only a network that
            amplifies perturbations carries into its statistics (a 100-layer ReLU MLP: 1e-3 at
            layer 50, O(1) at layer 100); such a network amplifies the rounding of any other
            execution of itself just as much (after the exact init, its samples run one by one
            are off by the same O(1)), so ``True`` is for checking an init bit for bit.
        resample: draw the directions afresh, ``v ~ N(0, 0.05^2)``, as the paper does
            (default: the current weights give the directions, so training is kept).
        exp_scale: store ``s`` with ``g = e^s`` (the paper's exponential form).
        mean_only_bn: put a :class:`~wn_transform.MeanOnlyBatchNorm` behind every
            reparameterized ``nn.Linear``/conv layer (the paper's sec. 4); the layer's bias moves
            into it.  With ``init="data"`` the init sets ``g = s/sigma[t]``, the norm's running mean
            to the batch mean of ``g*t`` and its bias to 0, so training and eval mode both start
            at zero mean and std ``s``.  A layer gets one only where the op's output is its output:
            the op ran in the layer's own call, and its bias is read nowhere else.  Parameters read
            by other code (``F.linear(x, fc.weight, fc.bias)``), and layers inside torch's
            composites (``MultiheadAttention.out_proj``, ``TransformerEncoderLayer``'s linears,
            whose inference fast path reads them directly), get none and keep their bias; the
            report lists them.
        distributed: with ``torch.distributed`` initialized (``None``, the default), each rank's
            batch is a shard of one calibration batch: per-unit sums, sums of squares and counts
            are reduced across ranks in float64, so every rank ends with the same ``g``, ``b``
            and (with ``resample``) ``v``, equal to a single-process init on the concatenated
            batch.  A ``ProcessGroup`` restricts it to that group; ``False`` turns it off;
            ``True`` insists on it (an error where ``torch.distributed`` is not initialized).
        include, exclude: ``fnmatch`` patterns on weight or module names.
        types: keep only weights owned by modules of these classes.
        filter_fn: ``filter_fn(module, module_name) -> bool``.
        existing: weights that already carry weight norm are never normalized twice:
            ``"keep"`` leaves them (and reports them), ``"convert"`` folds them and
            reparameterizes them with this library (the right unit axis included).
        inplace: change ``model`` itself; by default a deep copy is changed and returned.
        generator: random source for ``resample``, and for the direction given to a unit whose
            weight is all zeros (it gets ``g = 0`` and a random unit ``v``).

    Returns:
        The weight-normalized model (same classes, methods and forward).  Its state dict holds
        ``<module>.parametrizations.weight.original0`` (g) and ``.original1`` (v), torch's keys.
        :func:`weight_norm_report` describes what was done.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``distributed`` is not a bool, None or a
            ``ProcessGroup``.
        ValueError: an unknown ``init`` or ``existing``.
        BatchError: the batch holds NaN, or (for the data init) is empty or on the meta device
            (nothing is changed); or the model rejects it (the layer is named).
        SelectionError: a selection rule matches no weight.
        WeightNormError: ``init_scale`` is not a positive finite number, or is given (as is
            ``exact_init``) with ``init="preserve"``, which sets no scale; a lazy layer
            (``nn.LazyLinear``...) has not run yet, so its weight has no shape; the model holds a
            TorchScript module, is (or holds) a ``DistributedDataParallel`` wrapper, FSDP-sharded
            modules or modules whose weights ``accelerate`` offloads (apply before offloading);
            ``distributed=True`` without ``torch.distributed`` initialized; or, for the data init,
            its parameters are on the meta device.
        NoTargetsError: the model has no linear/conv weight.
    """
    if compiled_wrapper(model):  # torch.compile's wrapper: the model is its _orig_mod
        wrapper = model if inplace else copy_model(model)  # a copy wraps a copy of the model
        inner = apply_weight_norm(
            wrapper._orig_mod, sample_batch, init=init, init_scale=init_scale, exact_init=exact_init,
            resample=resample, exp_scale=exp_scale, mean_only_bn=mean_only_bn, distributed=distributed,
            include=include, exclude=exclude, types=types, filter_fn=filter_fn, existing=existing, inplace=True,
            generator=generator)
        _REPORTS[wrapper] = _REPORTS[inner]
        if not inplace:
            mark_copied(model.parameters(), wrapper)
        return wrapper  # it compiles the weight-normalized model at its next call
    init = _check_arguments(model, sample_batch, init, existing)
    group = resolve_group(distributed)
    _warn_if_untrainable(model)
    if init == "data":
        _check_measurable(model, sample_batch, group)
    if not (math.isfinite(init_scale) and init_scale > 0):
        msg = f"init_scale is the std every pre-activation starts with: a positive finite number, got {init_scale!r}"
        raise WeightNormError(msg)
    if init == "preserve" and (init_scale != 1 or exact_init):
        given = ", ".join(name for name, on in (("init_scale", init_scale != 1), ("exact_init", exact_init)) if on)
        msg = (f"{given} set{'s' if ',' not in given else ''} the data-dependent init, and init='preserve' keeps "
               "every weight as it is: pass a sample batch (init='data'), or leave them out")
        raise WeightNormError(msg)
    selection = Selection.build(include, exclude, types, filter_fn)
    with gc_paused():  # a quarter to a third of the time on large models, see _gc
        working = model if inplace else copy_model(model)
        undo = _Undo()  # with inplace=True, a failure puts the user's model back as it was
        if inplace and existing == "convert":  # the plan folds these first
            undo.keep_modules(working.get_submodule(found.module) for found in find_weight_norms(working))
        try:
            report, targets = _plan(working, sample_batch, selection, existing, init)
            report.options = _non_default(init_scale=float(init_scale), exact_init=bool(exact_init),
                                          resample=bool(resample), exp_scale=bool(exp_scale),
                                          mean_only_bn=bool(mean_only_bn), existing=str(existing))
            if group is not None and (init == "data" or resample):  # before the first collective of the init
                check_same_model(working, targets, group)
            if inplace:
                undo.keep_modules(working.get_submodule(t.module) for t in targets)
                if resample:  # v will be the user's weight Parameter, drawn anew in place
                    undo.keep_values(working.get_submodule(t.module)._parameters[t.name] for t in targets)
            for target in targets:
                register(working.get_submodule(target.module), target.name,
                         WeightNorm(target.layout.dim, target.layout.groups, exp_scale=exp_scale,
                                    qualname=target.qualname))
            if mean_only_bn:
                report.mean_only_bn, report.mean_only_bn_missing = _attach_mean_only_bn(working, targets)
            trains = [_trainable(working, t) for t in targets]  # a frozen one (a pretrained backbone): left as it is
            trainable = [t for t, train in zip(targets, trains) if train]
            frozen = [t for t, train in zip(targets, trains) if not train]
            if resample:
                resample_directions(working, trainable, generator=generator, group=group)
            if init == "data":
                report.notes = data_init(working, trainable, sample_batch, init_scale=init_scale, group=group,
                                         exact=exact_init) if trainable else InitNotes()
                report.notes.frozen = [t.qualname for t in frozen]
            # g = ||w|| beyond a half-precision dtype's range (the data init sets a trained layer's g itself,
            # and refuses one beyond that range)
            for target in frozen if init == "data" else targets:
                chain = working.get_submodule(target.module).parametrizations[target.name]
                check_gain_fits(chain[0], chain.original0, chain.original1, target.qualname)
            if not resample and not (exp_scale and init == "preserve"):  # (there right_inverse gave s = log tiny)
                # (a preserve apply talks to no other rank: it may run on one rank alone; seed ranks alike)
                report.zero_units = _give_zero_units_a_direction(working, trainable, generator,
                                                                 group if init == "data" else None,
                                                                 undo.keep_values if inplace else None, exp_scale)
                if report.notes is not None:
                    report.notes.without_zero_units(report.zero_units)
        except BaseException:
            undo.restore()
            raise
    _REPORTS[working] = report
    if working is not model:  # an optimizer made on the model given would train nothing of the copy: it warns
        mark_copied(model.parameters(), working)
    return working


def _non_default(**options: object) -> dict[str, object]:
    """The given options of :func:`apply_weight_norm` whose values are not its defaults."""
    defaults = inspect.signature(apply_weight_norm).parameters
    return {name: value for name, value in options.items() if value != defaults[name].default}


def plan_weight_norm(
    model: nn.Module,
    sample_batch: batch_mod.SampleBatch | None = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: type | Sequence[type] | None = None,
    filter_fn: FilterFn | None = None,
    existing: Existing = "keep",
) -> WeightNormReport:
    """What :func:`apply_weight_norm` would convert and skip, and why; ``model`` is not changed.

    ``include``, ``exclude``, ``types``, ``filter_fn`` and ``existing`` select as they do for
    :func:`apply_weight_norm`; ``existing="convert"`` plans on a copy with the existing weight norm
    folded.  The report's ``init`` is ``"data"`` with a batch, ``"preserve"`` without.  A
    ``torch.compile`` or ``DistributedDataParallel`` wrapper is planned as the module it holds
    (the one to apply weight norm to: ``apply_weight_norm`` refuses a DDP wrapper).

    With a ``sample_batch``, the batch is checked as ``apply_weight_norm``'s data init would check it
    in one process: an empty batch (here, even where it is one rank's shard of a batch split across a
    process group, which ``apply_weight_norm`` accepts), or one the model rejects (the layer named),
    raises :class:`BatchError` here too
    (a discovery step that traces symbolically never runs it: then it runs once, the model's
    modes and buffers restored after).  A model or batch on the meta device (a plan for a model too
    large to build) is traced only: there are no values to check."""
    held = held_by_ddp(model)  # a DDP wrapper, which apply refuses: plan the module to apply it to
    model = held if held is not None else model._orig_mod if compiled_wrapper(model) else model
    init = _check_arguments(model, sample_batch, None, existing)
    checked = init == "data" and not _on_meta(model, sample_batch)
    if checked:
        _check_measurable(model, sample_batch)
    selection = Selection.build(include, exclude, types, filter_fn)
    working = copy_model(model, instead="plan with existing='keep', which needs no copy") if existing == "convert" else model
    report = _plan(working, sample_batch, selection, existing, init)[0]
    report.options, report.planned = _non_default(existing=existing), True
    if checked and report.found_by == "symbolic_trace":
        with preserved_state(model, batch_statistics=True), torch.no_grad():
            batch_mod.run(model, sample_batch)
    return report


def weight_norm_report(model: nn.Module) -> WeightNormReport:
    """The report of the :func:`apply_weight_norm` call that returned ``model`` (or the module a
    ``DistributedDataParallel``, ``DataParallel`` or ``torch.compile`` wrapper made since holds).

    Raises:
        WeightNormError: ``model`` did not come from ``apply_weight_norm``, or is a copy of one
            (``copy.deepcopy``, ``torch.save`` and load): the report stays with the model returned.
    """
    try:
        return _REPORTS[model] if model in _REPORTS else _REPORTS[routed_module(model)]  # a wrapper made after apply
    except KeyError:
        msg = (f"{type(model).__name__} did not come from apply_weight_norm, or is a copy of a model that did (a report "
               "stays with the model apply_weight_norm returned); plan_weight_norm(model) describes any model")
        raise WeightNormError(msg) from None


def _check_arguments(model: nn.Module, sample_batch, init: Init | None, existing: Existing) -> Init:
    if not isinstance(model, nn.Module):
        msg = f"apply_weight_norm expects a torch.nn.Module, got {type(model).__name__}"
        raise TypeError(msg)
    _check_modules(model)
    if existing not in ("keep", "convert"):
        msg = f"existing must be 'keep' or 'convert', got {existing!r}"
        raise ValueError(msg)
    if init is None:
        init = "preserve" if sample_batch is None else "data"
    if init not in ("data", "preserve"):
        msg = f"init must be 'data' or 'preserve', got {init!r}"
        raise ValueError(msg)
    if init == "data" and sample_batch is None:
        msg = "init='data' needs a sample_batch to calibrate on; pass one, or use init='preserve'"
        raise ValueError(msg)
    if sample_batch is not None:
        batch_mod.as_args(sample_batch)
        batch_mod.check_no_nan(sample_batch)
    return init


def _give_zero_units_a_direction(model: nn.Module, targets: list[Target], generator: torch.Generator | None,
                                 group: dist.ProcessGroup | None,
                                 keep: Callable[[Iterable[torch.Tensor]], None] | None,
                                 exp_scale: bool = False) -> dict[str, int]:
    """Units whose weight is all zero (a zero-initialized residual conv or LoRA ``B``, a pruned unit)
    get ``g = 0`` and a random unit direction ``v`` (drawn as ``resample`` draws, with ``generator``).
    ``init="preserve"`` would leave ``g = ||w|| = 0`` and ``v = w = 0``, both gradients zero forever;
    the data init keeps ``v = 0`` (a constant unit) with a finite ``g``, so that the first step's
    tiny ``v`` would jump to a full-norm weight.  Now ``w = 0 * v/||v||`` stays 0 (the function is
    unchanged) and ``dL/dg = dL/dw . v/||v||`` lets it grow from 0.  With a process ``group``, its
    first rank draws and the others receive the draw.  ``keep`` is called with each ``g`` and ``v``
    before they are written (an in-place apply's undo).  Returns the count per weight.  With
    ``exp_scale`` no ``g = e^s`` is 0: such a unit gets ``s = log(tiny)`` and keeps ``v = 0``, as
    ``init="preserve"`` gives it, so that it stays at about 0 (not counted).  (A meta tensor has no
    values to test.)"""
    counts: dict[str, int] = {}
    with torch.no_grad():
        for target in targets:
            chain = model.get_submodule(target.module).parametrizations[target.name]
            layout, g, v = chain[0].layout, chain.original0, chain.original1
            if v.numel() == 0 or v.is_meta:
                continue
            zero = unit_norm(v, layout) == 0
            if not bool(zero.any()):
                continue
            if keep is not None:
                keep([g, v])
            if exp_scale:
                g.masked_fill_(zero.view(g.shape), math.log(torch.finfo(torch.float32).tiny))
                continue
            draw = torch.randn(v.shape, generator=generator, dtype=torch.float32, device=v.device)
            if group is not None:
                broadcast(draw, group)
            v.copy_(direct_zero_units(v, zero, layout, draw))
            g.masked_fill_(zero.view(g.shape), 0)
            counts[target.qualname] = int(zero.sum())
    return counts


def _trainable(model: nn.Module, target: Target) -> bool:
    """Whether the user trains ``target``'s weight: its direction ``v`` requires grad (``g`` and ``v``
    take the weight's ``requires_grad`` when registered)."""
    return model.get_submodule(target.module).parametrizations[target.name].original1.requires_grad


def _warn_if_untrainable(model: nn.Module) -> None:
    """Weight norm is a reparameterization for training: say so when the parameters it makes will
    be inference tensors (``torch.inference_mode()``), which run but which autograd never trains."""
    inference = next((name for name, p in model.named_parameters() if p.is_inference()), None)
    if torch.is_inference_mode_enabled() or inference is not None:
        where = ("apply_weight_norm runs under torch.inference_mode()" if inference is None
                 else f"parameter {inference!r} is an inference tensor (made under torch.inference_mode())")
        msg = (f"{where}: the g and v it makes are inference tensors, so the model runs but can never be trained "
               "(backward leaves them without a gradient, an optimizer step fails); to train, call it outside "
               "inference mode (torch.no_grad() is fine) on a model whose parameters were made there")
        warn_user(msg)


def _on_meta(model: nn.Module, sample_batch: batch_mod.SampleBatch) -> bool:
    """Whether a parameter of ``model`` or a tensor of the batch is on the meta device (no values)."""
    leaves = tree_leaves(batch_mod.as_args(sample_batch))
    return any(p.is_meta for p in model.parameters()) or any(isinstance(t, torch.Tensor) and t.is_meta for t in leaves)


def _check_measurable(model: nn.Module, sample_batch: batch_mod.SampleBatch,
                      group: dist.ProcessGroup | None = None) -> None:
    """The data-dependent init runs the model on the batch: both must hold values (under a process
    group, the batch is every rank's shard together: one rank's may be empty)."""
    batch_mod.check_measurable(sample_batch, group)
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        msg = (f"parameter {meta!r} is on the meta device, which holds no values, and init='data' runs the model "
               "on the batch: materialize the model first (model.to_empty(device=...) and load its weights), or "
               "use init='preserve' and load a checkpoint afterwards (load_state_dict(..., assign=True))")
        raise WeightNormError(msg)


def _check_modules(model: nn.Module) -> None:
    """Refuse what cannot be reparameterized: a ``DistributedDataParallel`` wrapper (it keeps
    reducing the old weights), lazy layers (``nn.LazyLinear``...: no weight shape until their
    first forward), and TorchScript modules (nor copied as Python modules)."""
    refuse_ddp(model, "apply_weight_norm", WeightNormError)
    refuse_sharded(model, "apply_weight_norm", WeightNormError)
    refuse_offloaded(model, "apply_weight_norm", WeightNormError)
    modules = list(model.named_modules())
    scripted = [name or "(root)" for name, module in modules if isinstance(module, torch.jit.ScriptModule)]
    if scripted:
        msg = (f"{type(model).__name__} holds TorchScript modules ({few(scripted)}); weight norm needs the eager "
               "modules: apply it to the eager model; to script the result, fold it first (fold_weight_norm), or "
               "trace it (torch.jit.trace)")
        raise WeightNormError(msg)
    lazy = [f"{name or '(root)'} ({type(module).__name__})" for name, module in modules
            if any(nn.parameter.is_lazy(p) for p in module._parameters.values() if p is not None)]
    if lazy:
        msg = (f"{type(model).__name__} has lazy layers whose weights do not exist yet: {', '.join(lazy)}; "
               "run one forward pass (model(sample_batch)) to create them, then apply weight norm")
        raise WeightNormError(msg)


def _no_targets_message(model: nn.Module, discovery: Discovery, had_batch: bool) -> str:
    """Why nothing was found: the model has no such weight, or the ladder fell to the module walk."""
    name = type(model).__name__
    skips = "; ".join(f"{s.qualname}: {s.reason}" for s in discovery.skipped)
    skips = f" ({skips})" if skips else ""
    if discovery.found_by != WALK:
        return f"{name} has no weight that reaches a linear or convolution op that could be normalized{skips}"
    tried = "; ".join(f"{step}: {why}" for step, why in discovery.failures.items())
    hint = ("pass a sample_batch so that torch.export can trace it" if not had_batch
            else "the reasons above say what stopped each tracer")
    return (f"found no weight of {name} to normalize: tracing failed ({tried}), and the module walk that "
            f"stands in only recognizes torch's standard layers{skips}. Weights used through other modules "
            f"or functional calls may still reach a linear or convolution op; {hint}")


def _plan(model: nn.Module, sample_batch, selection: Selection, existing: Existing, init: Init) -> tuple[WeightNormReport, list[Target]]:
    already = find_weight_norms(model)
    # existing="convert": each weight norm is folded for discovery, but one stacked with another
    # parametrization is left as it is (discovery reports the weight as computed by them)
    kept, folded = already, {}
    if existing == "convert":  # (a pruned one too: a conversion would drop its mask)
        convertible = [found for found in already if foldable(model, found) and not pruned(model, found)]
        kept = [found for found in already if found not in convertible]
        folded = _fold_existing(model, convertible)
    discovery = discover(model, sample_batch)
    discovery.targets, not_real = _real_weights(model, discovery.targets)
    discovery.skipped += not_real
    account_for_every_layer(model, discovery, {found.qualname for found in already} if existing == "keep" else set())
    if not discovery.targets and not (already and existing == "keep"):
        raise NoTargetsError(_no_targets_message(model, discovery, sample_batch is not None))
    targets, left_out = selection.apply(model, discovery.targets, kept, discovery.skipped)
    skipped = [*discovery.skipped, *left_out]
    if existing == "keep":
        skipped += [_kept(found) for found in already]
    else:
        skipped = _unfold_unconverted(model, already, folded, targets, skipped)
        converted = {target.qualname for target in targets}
        for found in already:
            if found.qualname in converted:
                remember_built_with(model, found)
    report = WeightNormReport(targets, skipped, discovery.found_by, init, discovery.failures)
    return report, targets


def _fold_existing(model: nn.Module, already: list[FoundWeightNorm]) -> dict[str, _Undo]:
    """Fold each existing weight norm (``existing="convert"``), so that discovery sees plain
    weights; per layer, what puts its weight norm back (:func:`_unfold_unconverted`)."""
    undos: dict[str, _Undo] = {}
    for found in already:
        if found.module not in undos:
            undos[found.module] = _Undo()
            undos[found.module].keep_layer(model.get_submodule(found.module))
        fold_one(model, found, by="apply_weight_norm")
    return undos


def _unfold_unconverted(model: nn.Module, already: list[FoundWeightNorm], undos: dict[str, _Undo],
                        targets: list[Target], skipped: list[Skipped]) -> list[Skipped]:
    """Give the weights that ``existing="convert"`` folded but that are not converted (excluded,
    or skipped: a layer quantization-aware training fake-quantizes) their weight norm back, and
    say in the skip reasons of all it found but did not convert that their weight norm is kept."""
    converted = {target.qualname for target in targets}
    left = {found.qualname: found for found in already if found.qualname not in converted}
    for module, undo in undos.items():
        founds = [found for found in already if found.module == module]
        if any(found.qualname in left for found in founds):
            undo.restore()  # the layer as it was, then its converted weights folded again
            for found in founds:
                if found.qualname not in left:
                    fold_one(model, found, by="apply_weight_norm")
    def kept_reason(skip: Skipped) -> str:
        found = left[skip.qualname]
        if masked := pruned(model, found):
            return (f"already weight-normalized ({_LAYOUT_NAMES[found.layout]}) with its {' and '.join(masked)} pruned "
                    "by torch.nn.utils.prune: kept, not converted (converting it would drop the mask)")
        return f"{skip.reason}; its {_LAYOUT_NAMES[found.layout]} is kept"

    kept = [Skipped(s.qualname, kept_reason(s)) if s.qualname in left else s for s in skipped]
    named = {s.qualname for s in kept}
    return kept + [Skipped(q, f"already weight-normalized ({_LAYOUT_NAMES[found.layout]}); kept, not converted")
                   for q, found in left.items() if q not in named]


def _real_weights(model: nn.Module, targets: list[Target]) -> tuple[list[Target], list[Skipped]]:
    """The targets whose weight is a real floating-point tensor, and the others skipped with their
    dtype: ``g = ||w||`` and the data init's mean and std are defined for real weights only (a
    complex ``g`` would lose its imaginary part)."""
    real, skipped = [], []
    for target in targets:
        module = model.get_submodule(target.module)
        weight = module._parameters.get(target.name)
        weight = getattr(module, target.name) if weight is None else weight
        if weight.is_floating_point():
            real.append(target)
        else:
            reason = f"a {weight.dtype} weight: weight norm is defined for real floating-point weights"
            skipped.append(Skipped(target.qualname, reason))
    return real, skipped


def _attach_mean_only_bn(model: nn.Module, targets: list[Target]) -> tuple[list[str], list[str]]:
    """Attach a mean-only batch norm to each standard layer among the targets whose op ran as the
    layer's own call (its hook sees the op's output; its bias is read there alone), once per
    forward (one running mean cannot serve calls that see different data), and that trains, its
    bias too (a frozen layer keeps its function; a frozen bias, its value)."""
    attached, missing = [], []
    for target in targets:
        if target.kind == "recurrent":  # a recurrent layer's gates get none (nor are they listed as missing)
            continue
        layer = model.get_submodule(target.module)
        bias = layer._parameters.get("bias")
        trains = _trainable(model, target) and (bias is None or (bias.requires_grad and not gradient_hooks(bias)))
        alone = target.own_call and target.uses <= 1 and trains
        channels = mean_only_bn_channels(layer, target.name) if alone else None
        if channels is None:
            missing.append(target.qualname)
        else:
            if mean_only_bn_of(layer) is None:  # one from an earlier apply (existing="convert") is kept
                attach_mean_only_bn(layer, *channels)
            attached.append(target.module)
    return attached, missing


def _kept(found: FoundWeightNorm) -> Skipped:
    dim = "whole tensor" if found.dim is None else f"dim={found.dim}"
    reason = f"already weight-normalized ({_LAYOUT_NAMES[found.layout]}, {dim}); existing='convert' replaces it"
    return Skipped(found.qualname, reason)


class _Undo:
    """What an in-place apply changed, to put back exactly: each module's class and its own
    state (the dicts of parameters, submodules and hooks copied, the objects in them kept), and
    the values of tensors changed in place."""

    def __init__(self) -> None:
        self._modules: dict[int, tuple[nn.Module, type, dict]] = {}
        self._values: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep_modules(self, modules: Iterable[nn.Module]) -> None:
        """Each module and its submodules (a parametrization's list and originals)."""
        for module in (sub for top in modules for sub in top.modules()):
            self._keep(module)

    def keep_layer(self, layer: nn.Module) -> None:
        """One layer and its parametrizations, not the layers it holds."""
        chains = layer._modules.get("parametrizations")
        if chains is not None:
            self.keep_modules([chains])
        self._keep(layer)

    def _keep(self, module: nn.Module) -> None:
        if id(module) not in self._modules:  # the first state seen is the user's
            state = {key: value.copy() if isinstance(value, dict) else value for key, value in vars(module).items()}
            self._modules[id(module)] = (module, type(module), state)

    def keep_values(self, tensors: Iterable[torch.Tensor]) -> None:
        self._values += [(tensor, tensor.detach().clone()) for tensor in tensors]

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, saved in self._values:
                tensor.copy_(saved)
        for module, cls, state in self._modules.values():
            module.__class__ = cls
            vars(module).clear()
            vars(module).update(state)
            for parameter in module._parameters.values():  # back in the model: no longer "replaced"
                if parameter is not None:
                    vars(parameter).pop(REPLACED_MARK, None)
