"""The paper's data-dependent init, in one forward pass over a calibration batch.

For every reparameterized weight, on the op that reads it (Salimans & Kingma, 2016, sec. 3):

    t = op(x, v/||v||)                  pre-activation per output unit, without bias
    mu, sigma = mean, std of t over the batch (and spatial/time positions), per unit
    g <- s / sigma,   b <- -s * mu / sigma        (s = init_scale; biased sigma)

so the layer's output ``g*t + b = s * (t - mu) / sigma`` has zero mean and std ``s`` per unit.
The pass measures ``t' = op(x, v)`` with the raw direction (the parametrization hands out
``v`` itself until its layer is calibrated, so no weight is built for it), and divides its
per-unit moments by ``||v||``.

One pass suffices, in forward order (a second one only when a unit turns out to be constant
on the batch, see :func:`data_init`); what each layer hands on to the next is chosen by
``exact``:

* ``exact=False`` (default): ``g*t + b = s * (t - mu) / sigma`` is handed on, computed from
  ``t'`` (as the paper's reference code does, and as the design asks: the init needs no second
  pass): each op runs once.  It differs from the op's real output in the last bits.
* ``exact=True``: the op runs again with the new ``(g, b)`` and its real output is handed on,
  so every later layer is calibrated on the very bits the model computes on this batch.  Cost:
  each op runs twice.

  The difference matters only in a network that amplifies perturbations (a 100-layer ReLU MLP
  after this init does, about 1.2x per layer): there the fast pass's statistics are off by 1e-6
  at layer 10, 1e-3 at layer 50, O(1) at layer 100.  But such a network amplifies the rounding
  of any other execution of itself alike: after the exact init, the same batch run one sample
  at a time (another matmul kernel) is off by the same 1e-3 / O(1).  So the exact pass buys
  bit-exactness for one execution path, not a better-conditioned model, and is an option.
  Ops that the pass handles piece by piece (attention, recurrent layers, ``addmm``) always run
  exactly.

For a float32 CPU Linear or (transposed) conv the statistics, ``g``, the bias and the handed-on
output come from one native call (:func:`wn_transform.kernels.calibrate`, sums in float64) instead of a dozen
small ops; elsewhere (and without the kernels) the same formulas run as eager ops.

The ops are intercepted by a ``TorchFunctionMode``.  Until its layer is calibrated, a
parametrization hands out ``v`` itself, so an op reading a target's weight is recognized by
that tensor (or a view of it): functional calls, reused modules and the projections inside
``nn.MultiheadAttention`` are all handled by the same code.  Where every target is a stock
``nn.Linear``, nothing is intercepted: each layer hands its input to the pass
(:attr:`WeightNorm.calibrator`), which saves the mode's Python on every op of the model; a
read of such a weight anywhere else before its layer ran stops that pass, and the
intercepting one runs instead (same values, bit for bit).
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import weakref
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from . import batch as batch_mod
from . import kernels
from .discover import preserved_state
from .errors import BatchError, WeightNormError
from .fast import weight_norm_weight
from .mean_only_bn import MeanOnlyBatchNorm, mean_only_bn_of
from .layers import standard_weights
from .moments import Scratch, all_reduce, broadcast, centre_, per_unit
from .norm import exp_gain, safe_norm, unit_norm
from .ops import CELL_OPS, RECURRENT_OPS, SIGNATURES, op_name, reads_metadata, view_dims, weight_use
from .parametrization import WeightNorm, hands_input_to_calibrator, no_weight_cache, weight_norm_of
from .targets import Target

__all__ = ["InitNotes", "data_init", "resample_directions"]

_CONSTANT_STD = 1e-6  # below this (relative to |mean| + its group's scale), a unit counts as constant on the batch
# below this, a unit is nearly constant: float32 rounding of t is then a visible part of sigma[t]
# (measured, 2 rows: a spread of 1e-5 of the mean left the std 3 % off 1, 1e-3 still 1.6 %), and the report says so
_NEARLY_CONSTANT_STD = 1e-3


@dataclass
class InitNotes:
    """What the init pass could not do as the paper says, per weight."""

    constant_units: dict[str, int] = field(default_factory=dict)  # sigma ~ 0: kept a finite scale
    nearly_constant_units: dict[str, int] = field(default_factory=dict)  # sigma < 1e-3 |mu|: std 1 to within rounding
    unreached: list[str] = field(default_factory=list)  # never ran on a row of the batch: scale kept
    unreached_units: dict[str, int] = field(default_factory=dict)  # pieces of a split weight no op used: scale kept
    split_unfollowed: list[str] = field(default_factory=list)  # split in a way the pass does not follow: scale kept
    unseen: list[str] = field(default_factory=list)  # read by code the pass cannot follow (TorchScript): scale kept
    bias_not_set: list[str] = field(default_factory=list)  # bias is not a parameter of the model
    recurrent_kept: list[str] = field(default_factory=list)  # hidden-to-hidden weights: scale kept
    no_bias: list[str] = field(default_factory=list)  # the op adds no bias: std set, mean left as it is
    frozen: list[str] = field(default_factory=list)  # requires_grad=False before apply: left as it was
    passed_over: list[str] = field(default_factory=list)  # calibrated on a later call than a call on a constant

    def without_zero_units(self, zero_units: dict[str, int]) -> None:
        """Take units whose weight is all zero out of ``constant_units``: a zero direction is constant
        on any batch, and such a unit is given ``g = 0`` after the pass (the report's ``zero_units``)."""
        for name, count in zero_units.items():
            left = self.constant_units.get(name, 0) - count
            if left > 0:
                self.constant_units[name] = left
            else:
                self.constant_units.pop(name, None)


@dataclass
class _State:
    """A target during calibration: its parametrization and parameters."""

    target: Target
    module: nn.Module
    wn: WeightNorm
    g: nn.Parameter
    v: nn.Parameter
    mean_only_bn: MeanOnlyBatchNorm | None = None
    running_mean: Tensor | None = None  # what the init sets the norm's running mean to
    done: bool = False
    read: bool = False  # the layer's weight was read (handed out as v) in the pass
    seen: bool = False  # an op the pass intercepts used the weight, or read its metadata (w.shape): not hidden
    calls: int = 0  # op calls that read the weight in the pass, before it was calibrated
    pieces_done: Tensor | None = None  # per unit, whether calibrated through a piece split off v (bool, CPU)
    split_unfollowed: bool = False  # v was split in a way the pass does not follow (see _follow_views)


def resample_directions(model: nn.Module, targets: list[Target], *, std: float = 0.05, generator: torch.Generator | None = None,
                        group: dist.ProcessGroup | None = None) -> None:
    """``v ~ N(0, std^2)`` for every target (the paper's init of the directions).

    With a process ``group``, the group's first rank draws and the others receive its draw.
    """
    with torch.no_grad():
        for target in targets:
            chain = model.get_submodule(target.module).parametrizations[target.name]
            v = chain.original1
            v.copy_(torch.randn(v.shape, generator=generator, dtype=torch.float32, device=v.device) * std)
            if group is not None:
                broadcast(v, group)
            chain.original0.copy_(chain[0].right_inverse(v)[0])


def data_init(model: nn.Module, targets: list[Target], sample_batch: batch_mod.SampleBatch, *, init_scale: float = 1.0,
              group: dist.ProcessGroup | None = None, exact: bool = False) -> InitNotes:
    """Set ``g`` (and the bias) of every target from one forward pass over ``sample_batch``.

    The model's buffers, train/eval modes and gradients are left as they were.  With a process
    ``group``, each rank's batch is a shard of one calibration batch: the statistics are reduced
    across the ranks, so every rank ends with the same ``g`` and bias (every rank must run the
    same layers in the same order, as in any collective).  ``exact``: see the module docstring.

    Units whose pre-activation is constant on the batch get ``sigma[t] = 1`` instead (see
    :class:`InitNotes`).  They show in the statistics (and zero directions in the norms), which
    are checked all at once after the pass (checking each layer as it runs costs more than the
    rest of its bookkeeping): if one is found (also when the pass failed: a model may reject
    the NaN such a unit hands on), ``g`` and the biases are put back and the pass runs again
    with those units known (every zero direction, and the first layer's other constant units:
    see :meth:`_Moments.constants`), so the result is what a layer-by-layer check would give.
    """
    states = [_state(model, target) for target in targets]
    known: dict[int, Tensor] = {}  # id(state) -> mask of its units known to be constant on the batch
    backup = _Backup(states)
    # Under a process group every rank must take the same path: a fall-back on one rank only
    # (a weight read on a branch its shard took) would leave the others waiting in a collective.
    # A layer read by several calls per forward may be run on a constant first (see _passes_over),
    # which only intercepting every op shows.
    direct = group is None and all(hands_input_to_calibrator(s.module, s.target.name) and s.target.uses <= 1
                                   for s in states)
    try:
        while True:
            mode = _CalibrationMode(model, states, init_scale, group, backup, known, exact=exact)
            failure = None
            try:
                _run_pass(model, states, mode, sample_batch, direct=direct)
            except _ReadElsewhere:  # a weight is also read outside its layer: intercept every op instead
                direct = False
                backup.restore()
                continue
            except Exception as exc:  # it may come from an unguarded constant unit's NaN: check first
                failure = exc
            # Every rank whose pass ran through, or failed in the model's own code (a BatchError: a check on
            # the rows it uses, after the last reduction): the others wait for it there.  Not one stopped by
            # this library's error (ranks at different layers, a lost peer, an overflow every rank raises alike).
            if not isinstance(failure, WeightNormError) or isinstance(failure, BatchError):
                try:
                    mode.finished_on_every_rank(states[0].g.device)
                except WeightNormError:
                    if failure is None:
                        raise  # (a rank that failed first raises its own error below)
            found = [(state, mask) for state, mask in mode.unforeseen_constants()
                     if id(state) not in known or bool((mask & ~known[id(state)]).any())]  # only news: no endless loop
            if not found:
                if failure is not None:
                    raise failure
                break
            for state, mask in found:
                known[id(state)] = mask | known[id(state)] if id(state) in known else mask
            backup.restore()
            direct = False  # the pass that follows copies of the batch (see _CalibrationMode._note_copy)
        _check_finite_gains(states)
        _check_finite_offsets(mode.half_offsets)
    except BaseException:
        backup.restore()
        raise
    finally:
        for state in states:
            _stop_measuring(state)
    notes = mode.notes
    notes.nearly_constant_units = mode.nearly_constant_units()
    with torch.no_grad():
        for state in states:
            if not state.done and state.pieces_done is not None:  # the pieces calibrated keep g and bias; the
                notes.unreached_units[state.target.qualname] = int((~state.pieces_done).sum())  # others their scale
            elif not state.done:
                state.g.copy_(backup.g[id(state)])
                if state.split_unfollowed:
                    notes.split_unfollowed.append(state.target.qualname)
                elif state.read and not state.seen:  # read, then used where the pass cannot see (TorchScript)
                    notes.unseen.append(state.target.qualname)
                else:
                    notes.unreached.append(state.target.qualname)
            elif state.running_mean is not None:  # set after the pass, which restores every buffer
                state.mean_only_bn.running_mean.copy_(state.running_mean)
    return notes


def _check_finite_gains(states: list[_State]) -> None:
    """Refuse an init that measured NaN or infinity: name the first such layer in forward order.

    A model may compute NaN or inf at positions it never uses (a fully masked attention row
    softmaxed to NaN, zero padding L2-normalized); the statistics of every later layer would
    take them in, and their ``g`` and bias would poison every position.  ``sigma = inf`` shows
    as ``g = 0``, which is right only for a unit with no direction (a layer the init keeps as it
    was: an all-zero hidden-to-hidden row); ``g = s/sigma`` beyond a half-precision layer's range
    is an overflow of its dtype, said so."""
    states = [state for state in states if state.done or state.pieces_done is not None]  # (the other units: as given)
    if _gains_finite_and_nonzero(states):  # the usual case, told by one read per device
        return
    for state in states:
        gain = exp_gain(state.g) if state.wn.exp_scale else state.g
        if bool((gain.isfinite() & (gain != 0)).all()):
            continue
        no_direction = unit_norm(state.v, state.wn.layout).view(gain.shape) == 0
        if bool((gain.isfinite() & ((gain != 0) | no_direction)).all()):
            continue
        if not bool(gain.isnan().any()) and bool(gain.isinf().any()) and state.g.element_size() < 4:
            msg = (f"{state.target.qualname}: the data-dependent init's g = init_scale/std overflows {state.g.dtype} "
                   f"(the largest is {torch.finfo(state.g.dtype).max:g}): some pre-activations have a std below "
                   "init_scale/that on the sample batch; calibrate in float32 (apply to model.float(), then convert), scale the "
                   "inputs up, or use init='preserve'")
        else:
            msg = (f"{state.target.qualname}: the data-dependent init measured a non-finite mean or std on the sample "
                   "batch (the layer's input holds NaN or inf at some positions: a fully masked attention row, padding "
                   "divided by its zero norm); calibrate on a batch at whose every position the model computes finite "
                   "values, or use init='preserve'")
        raise WeightNormError(msg)


def _check_finite_offsets(offsets: list[tuple[str, Tensor]]) -> None:
    """Refuse a half-precision bias (or mean-only batch norm running mean) that the init made
    infinite: with every ``g`` finite, only ``b = -s*mu/sigma`` beyond the dtype's range does (a
    pre-activation whose mean is tens of thousands of its stds from zero).  One read per device."""
    if _all_true(offset.isfinite().all() for _, offset in offsets):
        return
    qualname, offset = next((name, o) for name, o in offsets if not bool(o.isfinite().all()))
    msg = (f"{qualname}: the data-dependent init's bias = -init_scale*mean/std overflows {offset.dtype} (the largest "
           f"is {torch.finfo(offset.dtype).max:g}): on the sample batch, some pre-activations' mean lies that many stds "
           "from zero; calibrate in float32 (apply to model.float(), then convert), centre the inputs, or use "
           "init='preserve'")
    raise WeightNormError(msg)


def _gains_finite_and_nonzero(states: list[_State]) -> bool:
    """Whether every ``g`` (``e^s`` with ``exp_scale``) of ``states`` is finite and non-zero: the gains
    of a device and dtype checked as one tensor, read once per device (per layer, each read would
    wait for the device: a hundred waits and four hundred small kernels in a 100-layer model)."""
    flats: dict[tuple[torch.device, torch.dtype, bool], list[Tensor]] = {}
    for state in states:
        flats.setdefault((state.g.device, state.g.dtype, state.wn.exp_scale), []).append(state.g.detach().reshape(-1))
    verdicts = []
    for (_, _, exp_scale), gains in flats.items():
        gain = torch.cat(gains) if len(gains) > 1 else gains[0]
        gain = exp_gain(gain) if exp_scale else gain
        verdicts.append((gain.isfinite() & (gain != 0)).all())
    return _all_true(verdicts)


def _all_true(verdicts: Iterable[Tensor]) -> bool:
    """Whether every one of ``verdicts`` (0-d bool tensors, on any devices) is true, read once per
    device: a read waits for the device, and per layer that is a wait per layer."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for verdict in verdicts:
        by_device.setdefault(verdict.device, []).append(verdict)
    return all(bool(torch.stack(flags).all()) for flags in by_device.values())


def _run_pass(model: nn.Module, states: list[_State], mode: _CalibrationMode, sample_batch: batch_mod.SampleBatch,
              *, direct: bool) -> None:
    """One forward pass over the batch, calibrating each target where it is first used.

    ``direct`` (every target a stock ``nn.Linear``, no process group): each layer hands its
    input to the pass (:class:`_LayerInput`), and no op is intercepted; a read of a weight
    anywhere else raises :class:`_ReadElsewhere`.  Otherwise ``mode`` intercepts every op:
    until calibrated, a layer computes with ``v`` itself, ``t' = op(x, v)``, which the mode
    recognizes.
    """
    for state in states:
        state.done = False
        state.running_mean = None
        _stop_measuring(state)  # what a stopped pass left
        state.read = state.seen = state.split_unfollowed = False
        state.calls = 0
        state.pieces_done = None
        if direct:
            state.wn.calibrator = _LayerInput(mode, state)
        else:
            state.wn.direction_only = True
    with preserved_state(model, batch_statistics=True), torch.no_grad(), no_weight_cache(), contextlib.nullcontext() if direct else mode:
        given = (lambda args, kwargs: mode.note_inputs((args, kwargs), sample_batch)) if mode.known else None
        batch_mod.run(model, sample_batch, given=given)  # (the batch matters on a rerun only: _batch_rounding_bound)


def _stop_measuring(state: _State) -> None:
    """The layer computes its real weight again (see :attr:`WeightNorm.calibrator`); whether
    the pass read its weight is kept in ``state.read``."""
    state.wn.__dict__.pop("direction_only", None)
    state.wn.__dict__.pop("calibrator", None)
    state.read |= state.wn.__dict__.pop("direction_read", False)


class _ReadElsewhere(BaseException):
    """During the direct pass, a weight not yet calibrated was read outside its layer's own
    forward: the pass stops and the general one runs.  Not an ``Exception``, so that a model's
    ``except Exception`` does not swallow it."""


class _LayerInput:
    """The direct pass's hand-in for one target (:attr:`WeightNorm.calibrator`)."""

    def __init__(self, mode: _CalibrationMode, state: _State) -> None:
        self.mode, self.state = mode, state

    def __call__(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return self.mode.calibrate_linear(self.state, x, bias)

    def weight_read(self) -> None:
        raise _ReadElsewhere


class _Backup:
    """What the pass overwrites: every target's ``g``, and each bias it sets (kept before its
    first write), put back after a failure or before a second pass."""

    def __init__(self, states: list[_State]) -> None:
        self.states = states
        self.g = {id(s): s.g.detach().clone() for s in states}
        self._kept: dict[int, tuple[Tensor, Tensor]] = {}
        for state in states:  # the biases the pass will set, kept now: see _Moments for why not later
            norm = state.mean_only_bn
            bias = (norm if norm is not None else state.module)._parameters.get("bias")
            if bias is not None:
                self.keep(bias)

    def keep(self, tensor: Tensor) -> None:
        if id(tensor) not in self._kept:
            self._kept[id(tensor)] = (tensor, tensor.detach().clone())

    def restore(self) -> None:
        with torch.no_grad():
            for state in self.states:
                state.g.copy_(self.g[id(state)])
            for tensor, value in self._kept.values():
                tensor.copy_(value)


def _state(model: nn.Module, target: Target) -> _State:
    module = model.get_submodule(target.module)
    wn = weight_norm_of(module, target.name)
    if wn is None:
        msg = f"{target.qualname} is not weight-normalized by this library; apply the parametrization first"
        raise ValueError(msg)
    params = module.parametrizations[target.name]._parameters
    return _State(target, module, wn, params["original0"], params["original1"], mean_only_bn_of(module))


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


@dataclass
class _Fit:
    """A calibrated layer's output on the batch, ``g*t + b = centred * gain + offset`` per unit."""

    centred: Tensor  # t' - mean[t'] (t' = op(x, v))
    gain: Tensor  # g / ||v||
    offset: Tensor | None  # mean[t'] * gain + b; None where the init set b to cancel it
    unit_dim: int
    dtype: torch.dtype  # of the op's output
    constant: Tensor | None = None  # units known to be constant on the batch (a rerun's)
    real: bool = False  # hand on the real op's output instead: see _needs_real_output

    def output(self) -> Tensor:
        """``g*t + b``, computed in place in ``centred``.  A unit known to be constant hands on its
        value in exact arithmetic, its mean: what float rounding leaves of its centred values is
        noise, which the next layer would take for features and scale up by orders of magnitude
        (every unit of a layer constant: a batch of identical rows)."""
        if self.constant is not None:
            self.centred.masked_fill_(per_unit(self.constant, self.centred.ndim, self.unit_dim), 0)
        out = self.centred.mul_(self._per_unit(self.gain))
        if self.offset is not None:
            out = out.add_(self._per_unit(self.offset))
        return _as(out, self.dtype)

    def _per_unit(self, values: Tensor) -> Tensor:
        return per_unit(_as(values, self.centred.dtype), self.centred.ndim, self.unit_dim)


@dataclass
class _Handed:
    """A calibrated layer's output on the batch, already computed (by the native kernel)."""

    tensor: Tensor
    real: bool = False  # hand on the real op's output instead: see _needs_real_output

    def output(self) -> Tensor:
        return self.tensor


@dataclass
class _Unbatched:
    """A calibrated layer's output on one unbatched sample, measured as a batch of one."""

    fit: _Fit | _Handed

    @property
    def real(self) -> bool:
        return self.fit.real

    def output(self) -> Tensor:
        return self.fit.output().squeeze(0)


def _unbroadcast(bias: Tensor) -> Tensor:
    """``bias`` without the axes an ``expand`` repeated it along (stride 0): the memory its values are
    in, which the init writes (``torch.addmm(b.expand(n, -1), x, w)`` adds ``b``)."""
    if 0 not in bias.stride():
        return bias
    return bias[tuple(0 if stride == 0 and size > 1 else slice(None) for size, stride in zip(bias.shape, bias.stride()))]


def _bias_key(bias: Tensor) -> tuple:
    """The bias an op adds: a Parameter, or one slice of it (attention's q, k and v thirds of
    ``in_proj_bias``, each its own projection's)."""
    source = bias if bias._base is None else bias._base
    return id(source), bias.storage_offset() - source.storage_offset(), tuple(bias.shape)


def _bias_holders(model: nn.Module, states: list[_State]) -> dict[int, int | None]:
    """``id(bias) -> id(layer)`` for each bias Parameter a layer of ``model`` holds, None where two
    layers hold it (``b.bias = a.bias``: one bias cannot centre both, and one that a frozen or
    skipped layer also adds must keep its value).  A layer is a target's module or a torch
    linear/conv layer; a module that only holds a layer's bias under a name of its own (an LM
    head's ``self.bias = self.decoder.bias``) adds nothing, and a module reachable under two
    names is one module."""
    layers = {id(state.module) for state in states}
    holders: dict[int, int | None] = {}
    for module in model.modules():
        bias = module._parameters.get("bias")
        if bias is not None and (id(module) in layers or standard_weights(module)):
            holders[id(bias)] = id(module) if id(bias) not in holders else None
    return holders


def _constant_units_flat(out: Tensor, fit: _Fit | _Handed | _Unbatched | None) -> Tensor:
    """``out``, the op's output with the new ``(g, b)`` (``exact_init``), with each unit that
    ``fit`` knows to be constant set to its mean over the batch: see :meth:`_Fit.output`."""
    if not isinstance(fit, _Fit) or fit.constant is None:
        return out
    unit_dim = fit.unit_dim % out.ndim
    mean = out.mean([d for d in range(out.ndim) if d != unit_dim], keepdim=True)
    return torch.where(per_unit(fit.constant, out.ndim, unit_dim), mean, out)


#: :func:`_needs_real_output`: a unit whose batch mean is this many stds from 0 (on ``t' = op(x, v)``).
_AMPLIFYING = 10.0


def _needs_real_output(mean: Tensor, var: Tensor) -> bool:
    """Whether a layer hands on the real op's output rather than ``g*t + b``: where a unit's rows are
    nearly alike (``|mu| > 10 sigma``: a calibration batch of two, a learned query every row shares),
    the real op's ``x @ w + b`` cancels ``g*mu/sigma`` against the bias, and its rounding, relative
    to the output's std, is ``|mu|/sigma`` times float rounding; the layers after it, calibrated on
    ``g*t + b``, would each carry that difference (a batch of rows 500 stds from 0: every later
    layer's std 1.5e-5 off 1, 1e-7 so).  Calibrated on the real output, they hold for it.  (A
    constant unit, infinite here, is found after the pass and run again anyway.)"""
    return bool((mean.square() > var * (_AMPLIFYING * _AMPLIFYING)).any())


def _as(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)``, without a dispatch when it already is (this runs per layer)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


@dataclass
class _Produced:
    """A weight tensor the forward is about to use: which target it is, and how to make it anew."""

    ref: weakref.ref
    state: _State
    calibrated: bool  # made after its target was calibrated
    rebuild: Callable[[], Tensor]  # the same tensor from the current (g, v)
    units: slice = field(default_factory=lambda: slice(None))  # the target's units it holds: all, or a piece
    # split off along the unit axis


@dataclass
class _Slot:
    """Where one calibration's ``||v||``, mean and variance of ``t'`` go (views of :class:`_Moments`)."""

    norms: Tensor
    mean: Tensor
    var: Tensor


class _Moments:
    """Every target's per-unit ``||v||`` and mean and variance of ``t'``, for the constant-unit
    check after the pass, in three buffers per device allocated before the pass; each
    calibration writes its statistics straight into its slice.

    Two small tensors kept per layer would split the activation-sized blocks that the
    allocator frees between layers, and every layer's activations would land on fresh memory
    (thousands of page faults per pass on CPU).  The norms are measured in the pass, after the
    layer's op (as fast as one sweep over every weight before the pass, measured; nothing is
    measured for a layer the batch never reaches).
    """

    def __init__(self, states: list[_State]) -> None:
        self._slot: dict[int, tuple[torch.device, int]] = {}  # id(state) -> (device, offset)
        sizes: dict[torch.device, int] = {}
        dtypes: dict[torch.device, torch.dtype] = {}
        for state in states:
            device = state.v.device
            self._slot[id(state)] = (device, sizes.get(device, 0))
            sizes[device] = sizes.get(device, 0) + state.g.numel()
            wide = torch.float64 if state.v.dtype == torch.float64 else torch.float32  # that of the statistics
            dtypes[device] = torch.promote_types(dtypes.get(device, wide), wide)
        # Units never calibrated are never constant (var = inf) and never zero directions (norm = 1).
        self._norms = {d: torch.ones(n, dtype=dtypes[d], device=d) for d, n in sizes.items()}
        self._mean = {d: torch.zeros(n, dtype=dtypes[d], device=d) for d, n in sizes.items()}
        self._var = {d: torch.full((n,), float("inf"), dtype=dtypes[d], device=d) for d, n in sizes.items()}
        self._order: list[tuple[_State, slice, torch.device, int, int, int]] = []  # in calibration order

    def slot(self, state: _State, units: slice, groups: int = 1) -> _Slot:
        """The slices for ``state``'s ``units`` (of an op in ``groups`` groups of consecutive units,
        each seeing its own inputs); calibrations are listed in the order they ask."""
        device, offset = self._slot[id(state)]
        start = offset + (units.start or 0)
        stop = offset + (units.stop if units.stop is not None else state.g.numel())
        self._order.append((state, units, device, start, stop, groups))
        return _Slot(self._norms[device][start:stop], self._mean[device][start:stop], self._var[device][start:stop])

    def _spread_below(self, relative: float) -> dict[torch.device, Tensor]:
        """Per device, the units with ``sigma[t] <= relative (|mu[t]| + r)`` (never those not
        calibrated, nor those known constant: their variance is inf).

        ``r`` is the scale of the unit's neighbours: the mean of ``|mu[t]| + sigma[t]`` over the units
        of its group (the units of one calibration that see the same inputs; each channel of a
        depthwise conv is a group of its own).  So the test holds at every scale of the input (a
        layer fed features of 1e-7 is not constant; nor is a depthwise channel in amperes beside one
        in pascals), and a unit whose mean cancels (``mu ~ 0``, a uniform row after a LayerNorm) is
        measured against what its inputs make of other directions: rounding noise is constant.
        """
        found = {}
        for device, var in self._var.items():
            norms, mean, std = self._norms[device], self._mean[device].abs(), var.sqrt()  # (sigma, not var: no overflow)
            scale = (mean + std) / norms  # per unit of ||v||; inf: not calibrated or known constant; nan: zero direction
            finite = scale.isfinite()
            below = std <= (mean + scale.where(finite, 0).max() * norms) * relative  # against the largest group's r
            if bool(below.any()):  # rare: measure those against their own group
                segment, count = _group_ids([(start, stop, groups) for _, _, d, start, stop, groups in self._order
                                             if d == device], scale.numel(), device)
                sums = scale.new_zeros(count).index_add_(0, segment, scale.where(finite, 0))
                counts = scale.new_zeros(count).index_add_(0, segment, finite.to(scale.dtype))
                below = std <= (mean + (sums / counts.clamp_min(1))[segment] * norms) * relative
            found[device] = below & finite  # (an overflowing bound must not take in what is not calibrated)
        return found

    def nearly_constant(self) -> dict[str, int]:
        """Per weight, how many of its units vary on the batch by less than ``1e-3 (|mu[t]| + r)``
        (after the last pass, none is constant): standardized to within float rounding only."""
        nearly = self._spread_below(_NEARLY_CONSTANT_STD)
        if not any(bool(flags.any()) for flags in nearly.values()):
            return {}
        counts: dict[str, int] = {}
        for state, _, device, start, stop, _ in self._order:
            if count := int(nearly[device][start:stop].sum()):
                counts[state.target.qualname] = counts.get(state.target.qualname, 0) + count
        return counts

    def constants(self) -> list[tuple[_State, Tensor]]:
        """The units shown constant on the batch (``sigma[t] <= 1e-6 (|mu[t]| + r)``, see :meth:`_spread_below`), as
        ``(state, mask over all its units)``: those of the first calibration, in forward order,
        that has any, or a zero direction (later ones ran on what it handed on: their statistics are
        not certain), and every zero direction (constant whatever the input)."""
        zero = {d: norms == 0 for d, norms in self._norms.items()}
        constant = self._spread_below(_CONSTANT_STD)
        if not any(bool(flags.any()) for flags in (*constant.values(), *zero.values())):
            return []
        found: list[tuple[_State, Tensor]] = []
        certain = True
        for state, units, device, start, stop, _ in self._order:
            units_found = zero[device][start:stop]
            if certain:
                part = constant[device][start:stop]
                certain = not bool(part.any())
                units_found = units_found | part
            # after a zero direction too: it handed on NaN, which an op may turn into a constant
            # (scaled_dot_product_attention's NaN queries give 0 on the CPU: ControlNet's zero convs)
            certain = certain and not bool(units_found.any())
            if bool(units_found.any()):
                mask = torch.zeros(state.g.numel(), dtype=torch.bool, device=state.g.device)
                mask[units] = units_found.to(mask.device)
                found.append((state, mask))
        return found


def _group_ids(blocks: list[tuple[int, int, int]], size: int, device: torch.device) -> tuple[Tensor, int]:
    """Per unit of a buffer of ``size`` units, the index of its group, and the number of indices:
    each ``(start, stop, groups)`` splits ``[start, stop)`` into ``groups`` equal runs, numbered
    from 1 on; 0 is every unit no block covers.  A few vectorized ops whatever the number of blocks
    (a loop over a 100-layer model's would cost a third of a forward pass)."""
    ids = torch.zeros(size, dtype=torch.long, device=device)
    if not blocks:
        return ids, 1
    start, stop, groups = (torch.tensor(column, dtype=torch.long) for column in zip(*blocks))
    length = stop - start
    per_run = (length // groups.clamp_min(1)).clamp_min(1)
    runs = -(-length // per_run)  # per block, how many groups it has
    owner = torch.repeat_interleave(torch.arange(len(blocks)), length)  # the block of each covered unit
    local = torch.arange(owner.numel()) - (length.cumsum(0) - length)[owner]  # its place in the block
    first_id = 1 + runs.cumsum(0) - runs
    ids[(start[owner] + local).to(device)] = (first_id[owner] + local // per_run[owner]).to(device)
    return ids, int(runs.sum()) + 1


class _CalibrationMode(TorchFunctionMode):
    def __init__(self, model: nn.Module, states: list[_State], init_scale: float, group: dist.ProcessGroup | None,
                 backup: _Backup, known: dict[int, Tensor], *, exact: bool = False) -> None:
        super().__init__()
        self.exact = exact
        self.group = group
        self.backup = backup
        self.known = known  # id(state) -> mask of its units known to be constant on the batch
        self.init_scale = init_scale
        self.notes = InitNotes()
        self.model = model
        self._param_ids: set[int] | None = None  # built on first need
        self._moments = _Moments(states)
        self._inputs: dict[int, Tensor] = {}  # the batch's tensors, by the memory of their copies: see note_inputs
        self._copies: dict[int, tuple[weakref.ref, int]] = {}  # id -> (tensor, version): copies of its values
        self._nearly_released: dict[str, int] = {}  # per weight, units _release let go within rounding
        self.half_offsets: list[tuple[str, Tensor]] = []  # biases, running means set in half precision: see _check_finite_offsets
        self._bias_holders = _bias_holders(model, states)  # id(bias) -> the layer that holds it (None: two do)
        self._bias_setter: dict[tuple, int] = {}  # bias (or the slice of it an op adds) -> the state that set it
        self._scratch = Scratch()
        # Tensors the forward builds from no input (torch.eye: peft's DoRA runs its LoRA layers on an
        # identity to get their product), and what a layer passed over made of them: see _passes_over
        # And the model's own tensors, which hold nothing of the batch: a shared layer's call on a
        # learned initial state or token (self.h0.expand(B, -1), tanh(self.h0)) is passed over as one
        # on zeros is (only a layer read by several op calls passes one over: where there is none,
        # none are noted).  A buffer the forward writes in place is data from then on.
        shared = any(state.target.uses > 1 for state in states)
        self._constants: dict[int, tuple[weakref.ref, int]] = {  # id -> (tensor, its version: unwritten since)
            id(t): (weakref.ref(t), t._version) for t in ((*model.parameters(), *model.buffers()) if shared else ())
            if not t.is_inference()}
        # Until its layer is calibrated, the parametrization hands out v itself: that tensor is
        # how an op is recognized as using a target's weight (views of it are followed).
        self._produced: dict[int, _Produced] = {
            id(s.v): _Produced(weakref.ref(s.v), s, False, lambda s=s: _current_weight(s)) for s in states}

    def _remember(self, weight: Tensor, state: _State, rebuild: Callable[[], Tensor],
                  units: slice = slice(None)) -> None:
        self._produced[id(weight)] = _Produced(weakref.ref(weight), state, state.done, rebuild, units)

    def _lookup(self, tensor: Any) -> _Produced | None:
        """The weight ``tensor`` is, if it is one: the tensor handed out, a view followed from it, or a
        chain of views that gives it back as it is (``w.squeeze(1).unsqueeze(1)``: same shape, strides
        and offset as the tensor it views)."""
        if not isinstance(tensor, Tensor):
            return None
        entry = self._produced.get(id(tensor))
        if entry is not None and entry.ref() is tensor:
            return entry
        base = tensor._base
        if (base is not None and tensor.shape == base.shape and tensor.stride() == base.stride()
                and tensor.storage_offset() == base.storage_offset()):
            return self._lookup(base)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        if name == "multi_head_attention_forward":
            return self._attention(func, args, kwargs)
        if name in RECURRENT_OPS:
            return self._recurrent(func, args, kwargs)
        if name in CELL_OPS:
            return self._cell(func, args, kwargs)
        if name in _METHOD_FACTORIES:  # (w.new_zeros reads w's metadata alone: _follow_views marks w seen)
            result = self._follow_views(func, args, kwargs)
            self._note_constant(result)
            return result
        if name in _FACTORIES:
            result = func(*args, **kwargs)
            source = args[0] if args else kwargs.get("data")  # torch.as_tensor(x): x itself, data or constant
            # torch.tensor(tokens): a list or an array holds values that may come from the batch (its token
            # ids, rebuilt or not): data; a tensor as it is; a number a constant.  Every other factory
            # builds its values itself (zeros((B, H)): a size, not values)
            values = (name not in _VALUE_FACTORIES or (isinstance(source, Tensor) and self._constant(source))
                      or isinstance(source, numbers.Number))  # (a scale: torch.tensor(0.5); a label too, then)
            if type(result) is Tensor and values:  # (zeros_like: its argument's shape alone)
                self._note_constant(result)
            return result
        use = weight_use(func, args, kwargs) if name in SIGNATURES else None
        found = self._lookup(use.weight) if use is not None else None
        if found is None:
            result = self._follow_views(func, args, kwargs)
            if self.known and name in _VALUE_COPIES and type(result) is Tensor:
                self._note_copy(args, kwargs, result)
            if self._constants and self._made_of_constants(name, args, kwargs):  # relu(prenet(go frame)): constant too
                self._note_constant(result)
            return result
        state = found.state
        bound = dict(zip(SIGNATURES[name], args)) | kwargs
        weight_key = "mat2" if name == "addmm" else "other" if use.kind == "matmul" else "weight"
        fit = None
        if not state.done and not _piece_calibrated(state, found.units):  # t' = op(x, v) without bias: v until calibrated
            x = _data_operand(bound)
            if self._passes_over(state, x):  # what the layer computes with its weight and bias before the init
                bound[weight_key] = found.rebuild()
                result = _call_as_given(func, SIGNATURES[name][:len(args)], bound)
                self._note_constant(result)
                return result
            traced = torch.is_grad_enabled()  # (the forward turned grad on to differentiate: see _measured_apart)
            with _measured_apart():
                if use.kind == "matmul":
                    t = torch.matmul(x, use.weight)
                    unit_dim = -1
                elif use.kind == "linear":  # x @ v' (faster on CPU than F.linear without a bias)
                    t = torch.matmul(x, use.weight.t())
                    unit_dim = -1
                else:
                    t = func(**(bound | {"bias": None}))
                    unit_dim = 1 if x.ndim == use.weight.ndim else 0
                fit = self._calibrate(state, t, unit_dim, use.bias, found.units,
                                      native=use.kind if use.weight is state.v else None,
                                      groups=int(bound.get("groups", 1)) if use.kind in ("conv", "conv_transpose") else 1,
                                      terms=_Terms(x, lambda: _op_terms(func, use, bound, weight_key)))
            if found.units != slice(None) and not isinstance(fit, _Handed):  # (no row here: a later call calibrates it)
                self._piece_done(state, found.units)
            if not self.exact and name != "addmm" and not fit.real and not traced:  # hand on g*t + b, from t'
                return fit.output()
        # Hand on what the model computes with the new (g, b): in float arithmetic g*t + b is not
        # bitwise that, and a deep network amplifies the difference layer after layer.
        if not found.calibrated:
            bound[weight_key] = found.rebuild()
        return _constant_units_flat(_call_as_given(func, SIGNATURES[name][:len(args)], bound), fit)

    def _passes_over(self, state: _State, x: Tensor) -> bool:
        """Count a call of a layer not yet calibrated, on data ``x``; whether it is left for a later
        call: ``x`` is a constant the forward built (peft's DoRA runs ``lora_B(lora_A(torch.eye(n)))``
        before ``lora_B(lora_A(x))``) or computed from the model's own tensors alone (a learned
        initial state), whose statistics say nothing of the batch, and the layer has calls to come
        (it is read by several op calls per forward).  Its last call is calibrated whatever its data."""
        state.calls += 1
        if state.calls >= state.target.uses or not self._constant(x):
            return False
        if state.target.qualname not in self.notes.passed_over:
            self.notes.passed_over.append(state.target.qualname)
        return True

    def _constant(self, x: Any) -> bool:
        """Whether ``x`` is a tensor the forward built from no input (or a passed-over call made of
        such), unwritten since (a buffer the forward filled with data is data)."""
        ref, version = self._constants.get(id(x), (None, None))
        return ref is not None and ref() is x and x._version == version

    def _made_of_constants(self, name: str, args: tuple, kwargs: dict) -> bool:
        """Whether an op's tensor arguments (in lists and tuples too: ``cat``) are all constants, and
        there is one.  Values that may come from the batch make it data: a numpy array, and in the
        index of a pick of rows (``weight[tokens]``, ``table[label]`` or ``table.select(0, label)``
        in a loop over the batch's labels) a list or a Python number (``self.hs[0]`` too, then); a
        size, a dim or a pad given as a list (``h0.expand([B, -1])``) is no value, nor a dim, start
        or length (``table.narrow(0, 0, Q)``, as ``table[:Q]``)."""
        index = args[1:2] if name == "__getitem__" else (args[2:3] or (kwargs.get("index"),)) if name == "select" else ()
        if any(_may_hold_batch_values(key) for key in index):
            return False
        found = False
        stack = [*args, *kwargs.values()]
        while stack:
            value = stack.pop()
            if isinstance(value, Tensor):
                if not self._constant(value):  # (most ops: their first argument, data)
                    return False
                found = True
            elif type(value).__module__ == "numpy" and hasattr(value, "shape"):
                return False
            elif isinstance(value, (list, tuple)):
                stack.extend(value)
        return found

    def _note_constant(self, value: Any) -> None:
        """Record the tensors of ``value`` as constants (see :meth:`_constant`)."""
        for tensor in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(tensor, Tensor) and not tensor.is_inference():  # (no version counter to watch)
                self._constants[id(tensor)] = (weakref.ref(tensor), tensor._version)

    def _follow_views(self, func, args, kwargs):
        """Run ``func``; a view of a weight that keeps whole units (``W.t()``) is that weight too, and
        the pieces ``v`` is split into along its unit axis (a fused q/k/v weight, ``W.chunk(3)``) are
        its units in turn, each calibrated by the op that reads it (:meth:`_piece_done`)."""
        result = func(*args, **kwargs)
        parent = self._lookup(args[0]) if args else None
        if parent is not None and reads_metadata(func, args):  # (w.shape: the layer is not hidden from the pass)
            parent.state.seen = True
        mapping = view_dims(func, args, kwargs, args[0].ndim) if parent is not None else None
        if mapping is None:
            return result
        if mapping[1] is None and isinstance(result, Tensor):
            self._remember(result, parent.state, lambda: func(parent.rebuild(), *args[1:], **kwargs), parent.units)
        elif mapping[1] is not None and isinstance(result, (tuple, list)):
            self._remember_pieces(parent, args[0], mapping[1], result,
                                  lambda: func(parent.rebuild(), *args[1:], **kwargs))
        return result

    def _remember_pieces(self, parent: _Produced, split: Tensor, axis: int, pieces: Sequence[Any],
                         rebuild: Callable[[], Sequence[Tensor]]) -> None:
        """Remember the pieces ``split`` was cut into along ``axis``, each with its range of units, where
        ``split`` is ``v`` itself, that axis is the layer's unit axis, and the layer has no groups and no
        mean-only batch norm (which centres the whole output); else the layer is noted: its split is
        not followed (a split of ``v.t()``), so it is not calibrated."""
        state = parent.state
        if (split is not state.v or axis != state.wn.dim % state.v.ndim or state.wn.groups != 1
                or state.mean_only_bn is not None or not all(isinstance(piece, Tensor) for piece in pieces)):
            state.split_unfollowed = not state.done
            return
        start = 0
        for i, piece in enumerate(pieces):
            size = piece.shape[axis]
            self._remember(piece, state, lambda i=i: rebuild()[i], slice(start, start + size))
            start += size

    def _piece_done(self, state: _State, units: slice) -> None:
        """A piece of the layer's units is calibrated; the layer is, once every unit is."""
        if state.pieces_done is None:
            state.pieces_done = torch.zeros(state.g.numel(), dtype=torch.bool)
        state.pieces_done[units] = True
        if bool(state.pieces_done.all()):
            self._finish(state)

    def _calibrate(self, state: _State, t_raw: Tensor, unit_dim: int, bias: Tensor | None,
                   units: slice = slice(None), *, native: str | None = None, groups: int = 1,
                   terms: _Terms | None = None) -> _Fit | _Handed | _Unbatched:
        """From ``t_raw = op(x, v)``, the statistics of ``t = t_raw/||v||`` per unit; set
        ``g[units]`` to ``s/sigma`` and the bias to ``-s*mu/sigma`` (or, behind a mean-only batch
        norm, its running mean to ``s*mu/sigma``).  ``t_raw`` is centred in place; the result
        turns it into the layer's new output.  ``native``: the kind of op (``"linear"``, ``"conv"``,
        ``"conv_transpose"``) when ``t_raw = op(x, v)`` with ``v`` itself, which the native kernel can
        take whole (:meth:`_calibrate_native`); ``groups``: the op's (a grouped conv's units see their
        group's inputs alone, which the constant-unit check takes into account); ``terms``: the op's
        input and how to compute ``op(|x|, |v|)``, looked at only when a unit of this layer is known
        to be constant (:meth:`_batch_rounding_bound`, :meth:`_release`).

        Every op here runs once per layer between two layers' matmuls, where a small op costs
        several times what it costs in a loop: the constant-unit check waits for the end of
        the pass (:meth:`unforeseen_constants`) and values are written with ``out=``.  (Across
        ranks, each layer's reductions wait for the other ranks anyway; a check that they are at
        the same layer goes first, :meth:`_same_layer_on_every_rank`.)
        """
        state.seen = True  # an op the pass intercepts used the weight (with rows or without)
        if t_raw.ndim == 1:  # F.linear on one unbatched sample [in]: a batch of one
            batched = _Terms(terms.x, lambda: terms.compute().unsqueeze(0)) if terms is not None else None
            return _Unbatched(self._calibrate(state, t_raw.unsqueeze(0), -1, bias, units, native=native, groups=groups,
                                              terms=batched))
        reduced = None
        if t_raw.numel() == 0:  # no row reached the layer here (an expert no token was routed to)
            if self.group is None or t_raw.shape[unit_dim] == 0:  # nothing to measure; a later call with rows
                # calibrates it, or its scale is kept
                return _Handed(t_raw)
            self._same_layer_on_every_rank(state, units, t_raw.shape[unit_dim], t_raw.device)
            reduced = centre_(t_raw, unit_dim, self.group)  # every rank joins the reduction: the others' rows count
            if bool(reduced[1].isnan().all()):  # 0/0: no rank had a row
                return _Handed(t_raw)
        whole = units == slice(None)
        slot = self._moments.slot(state, units, groups)
        if native is not None and whole and reduced is None:
            handed = self._calibrate_native(state, native, t_raw, unit_dim, bias, slot)
            if handed is not None:
                return handed
        if reduced is None:
            if self.group is not None:
                self._same_layer_on_every_rank(state, units, t_raw.shape[unit_dim], t_raw.device)
            centred, mean, var = centre_(t_raw, unit_dim, self.group, self._scratch, out=(slot.mean, slot.var))  # of t'
        else:
            centred, mean, var = reduced
            slot.mean.copy_(mean)
            slot.var.copy_(var)
        norms = _unit_norms(state, units, slot.norms)
        if norms.dtype != mean.dtype:
            norms = norms.to(mean.dtype)
        gain, norms, constant = self._unit_gains(state, t_raw, centred, var, norms, unit_dim, units, slot, terms)
        if self.init_scale != 1:
            gain = gain.mul_(self.init_scale)  # s / (sigma[t] ||v||)
        g = state.g.view(-1) if whole else state.g.view(-1)[units]
        if state.wn.exp_scale:  # s = log(s / sigma[t]), taken before a half-precision g could overflow
            g.copy_(torch.log(gain * norms).view(g.shape))
        else:
            _store(g, gain, norms)  # g = s / sigma[t]
        offset = self._set_offset(state, bias, mean, gain, units)
        if whole:
            self._finish(state)
        return _Fit(centred, gain, offset, unit_dim, t_raw.dtype, constant,
                    not self.exact and _needs_real_output(slot.mean, slot.var))

    def _unit_gains(self, state: _State, t_raw: Tensor, centred: Tensor, var: Tensor, norms: Tensor, unit_dim: int,
                    units: slice, slot: _Slot, terms: _Terms | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(gain, norms, constant)`` of :meth:`_calibrate`'s units: ``gain = 1/(sigma[t] ||v||)``
        per unit (``var`` is that of ``t' = t ||v||``), the norms to store ``g`` with, and the
        mask of the units known to be constant (None when there are none).

        A unit known to be constant (:meth:`constants`, found on an earlier pass) takes
        ``sigma[t] = 1``: ``g = s``, ``b = -s mu[t]``, and its slot is marked so that the check
        after the pass passes it by; one whose spread on this batch is above what rounding can
        explain (:meth:`_release`) is standardized after all.  Any other constant unit gets an
        infinite gain here, found after the pass (:meth:`unforeseen_constants`)."""
        whole = units == slice(None)
        known = self.known.get(id(state))
        if known is not None and not whole:
            known = known[units]
        released = None
        if known is not None and terms is not None and bool(known.any()):
            bound = self._batch_rounding_bound(state, t_raw, terms, unit_dim, units)
            if bound is not None:  # (across ranks, the reduced var is float64 already: see centre_)
                spread = _exact_spread(centred, unit_dim) if self.group is None else var.sqrt()
                released = self._release(state, known, bound.to(var.dtype), spread.to(var.dtype))
                known = known & ~released
        constant = known if known is not None and bool(known.any()) else None
        if constant is None:
            gain = var.rsqrt()  # 1 / (sigma[t] ||v||); inf for a constant unit, found after the pass
        else:
            qualname = state.target.qualname
            self.notes.constant_units[qualname] = self.notes.constant_units.get(qualname, 0) + int(constant.sum())
            norms = safe_norm(norms)  # a zero direction: any norm will do
            gain = torch.where(constant, norms.reciprocal(), var.rsqrt())
            slot.var.masked_fill_(constant, float("inf"))  # not constant, not a zero direction, for the check after
            slot.norms.masked_fill_(constant, 1.0)
        if released is not None:  # standardized: not constant, nor nearly (its spread is not rounding)
            slot.var.masked_fill_(released, float("inf"))  # (var may be slot.var: after the gains are taken)
        return gain, norms, constant

    def _set_offset(self, state: _State, bias: Tensor | None, mean: Tensor, gain: Tensor,
                    units: slice) -> Tensor | None:
        """Centre the layer's output, ``g*t + b = (t' - mu[t']) * gain + offset``: set the bias to
        ``-s*mu/sigma`` where the layer may (the offset is then 0: None), or a mean-only batch
        norm's running mean to ``s*mu/sigma``; else the offset the output keeps (and a note)."""
        offset = None
        norm = state.mean_only_bn
        if norm is not None:  # the norm centres the output: its running mean is the mean of g*t
            offset = mean * gain
            state.running_mean = offset.to(norm.running_mean.dtype)
            self._note_half(state, state.running_mean)
            norm.running_mean.copy_(state.running_mean)
            if norm.bias is not None:
                self.backup.keep(norm.bias)
                norm.bias.zero_()
        elif bias is not None and (own := _unbroadcast(bias)).numel() == mean.numel() and self._settable(own, state):
            self._bias_setter[_bias_key(own)] = id(state)
            self.backup.keep(own)
            _store(own.data, mean, gain).neg_()  # b = -s mu[t] / sigma[t]: the output is centred (through .data:
            # views of the bias a forward took on a graph, b.chunk(3) under enable_grad, stay valid for it)
            self._note_half(state, own)
        else:
            offset = mean * gain
            if bias is not None:
                self.notes.bias_not_set.append(state.target.qualname)
            elif units == slice(None) or units.start == 0:  # once per weight (attention's q/k/v rows are three slices)
                self.notes.no_bias.append(state.target.qualname)
        if offset is not None and bias is not None:
            offset = offset + bias.to(offset.dtype)
        return offset

    def _note_half(self, state: _State, offset: Tensor) -> None:
        if offset.element_size() < 4:
            self.half_offsets.append((state.target.qualname, offset.detach()))  # (q/k/v slices: views made under no_grad)

    def _calibrate_native(self, state: _State, kind: str, t_raw: Tensor, unit_dim: int, bias: Tensor | None,
                          slot: _Slot) -> _Handed | None:
        """:meth:`_calibrate` of a whole Linear or (transposed) conv layer in one native call
        (:func:`kernels.calibrate`), where it applies: float32 CPU, the op's output channels the
        units of ``g`` (rows of ``v``, or its dim 1 for a transposed conv), no process group, no
        unit known to be constant, no mean-only batch norm, the layer's own bias or none.
        Otherwise None (the eager route follows)."""
        wn = state.wn
        rows = wn.dim == 0  # a unit per row of v: the kernel reads the norms off v itself
        if (kind not in _NATIVE_DIMS or wn.dim != _NATIVE_DIMS[kind] or wn.groups != 1 or self.group is not None
                or id(state) in self.known or state.mean_only_bn is not None
                or (bias is not None and not self._settable(bias, state))
                or not kernels.calibration_usable(t_raw, unit_dim, state.v if rows else None, state.g, bias, slot.norms,
                                                  slot.mean, slot.var)):
            return None
        if bias is not None:
            self._bias_setter[_bias_key(bias)] = id(state)
            self.backup.keep(bias)
        else:
            self.notes.no_bias.append(state.target.qualname)
        if not rows:
            _unit_norms(state, slice(None), slot.norms)
        kernels.calibrate(t_raw, unit_dim, state.v if rows else None, state.g, bias, slot.norms, slot.mean, slot.var,
                          scale=self.init_scale, exp_scale=wn.exp_scale, output=not self.exact)
        self._finish(state)
        return _Handed(t_raw, not self.exact and _needs_real_output(slot.mean, slot.var))

    def note_inputs(self, copies: tuple[tuple, dict], sample_batch: batch_mod.SampleBatch) -> None:
        """Remember the batch's tensors, by the memory of the copies the model gets
        (:func:`batch_mod.run`), for :meth:`_is_sample`."""
        originals = tree_leaves(batch_mod.as_args(sample_batch))
        self._inputs = {copy.untyped_storage().data_ptr(): original
                        for copy, original in zip(tree_leaves(copies), originals)
                        if _strided(copy) and isinstance(original, Tensor) and original.layout == torch.strided
                        and copy.numel() > 0 and copy.dtype == original.dtype
                        and copy.untyped_storage().nbytes() == original.untyped_storage().nbytes()}

    def _is_sample(self, x: Tensor) -> bool:
        """Whether ``x`` holds the sample batch's own values: a copy the model got (or a view of
        it) whose elements still equal the user's batch, wherever the model may have written
        (compared, not trusted to a version counter: ``.data`` and inference tensors have none),
        or a tensor the model made by moving or converting such values (:meth:`_note_copy`)."""
        if not _strided(x) or x.numel() == 0:
            return False
        copy = self._copies.get(id(x))
        if copy is not None:
            return copy[0]() is x and not x.is_inference() and x._version == copy[1]
        original = self._inputs.get(x.untyped_storage().data_ptr())
        if original is None or original.dtype != x.dtype:
            return False
        return torch.equal(x, original.as_strided(x.shape, x.stride(), x.storage_offset()))

    def _note_copy(self, args: tuple, kwargs: dict[str, Any], result: Tensor) -> None:
        """Remember ``result`` of an op that only moves, pads or converts values (:data:`_VALUE_COPIES`)
        as the batch's own values, when every tensor it read holds them and a conversion is exact
        (it converts back to the same values): an integer batch made float, a reflect-padded input.
        Only on a pass that runs again because of constant units (``self.known``)."""
        sources = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)]
        if not sources or not all(self._is_sample(source) for source in sources):
            return
        source = sources[0]
        if result.dtype != source.dtype and not (len(sources) == 1 and result.shape == source.shape and torch.equal(
                result.to(device=source.device, dtype=source.dtype), source)):  # converts back exactly
            return
        if not result.is_inference():
            self._copies[id(result)] = (weakref.ref(result), result._version)

    def _batch_rounding_bound(self, state: _State, t_raw: Tensor, terms: _Terms, unit_dim: int,
                              units: slice) -> Tensor | None:
        """:func:`_rounding_bound` where the layer's input is the sample batch (:meth:`_is_sample`),
        else None; looked at only when a unit is known constant.

        The batch is data: its rounding is part of what the model sees, so a spread of
        ``op(x, v)`` beyond the op's own rounding is signal.  A layer's input computed by the model
        carries what rounding earlier ops handed on (a uniform row after a LayerNorm is noise of
        the size of its own terms), which no test on that layer can tell from a small real feature:
        the check against its neighbours decides alone there.  Across ranks, the largest bound, and
        None unless every rank with rows reads its shard of the batch: the ranks decide alike (one
        all-reduce)."""
        own = terms.compute() if t_raw.numel() > 0 and self._is_sample(terms.x) else None
        bound = _rounding_bound(state, t_raw, own, unit_dim, units) if own is not None else None
        if self.group is None:
            return bound
        count = t_raw.shape[unit_dim]
        packed = torch.zeros(1 + count, dtype=torch.float64, device=t_raw.device)
        if bound is not None:
            packed[1:] = bound
        else:
            packed[0] = float(t_raw.numel() > 0)  # a rank with rows that are not the batch's: no release anywhere
        all_reduce(packed, dist.ReduceOp.MAX, self.group)
        return packed[1:] if not bool(packed[0]) else None

    def _same_layer_on_every_rank(self, state: _State, units: slice, width: int, device: torch.device) -> None:
        """Before a reduction across ranks: check that every rank is at the same layer (its name,
        units and width), so that ranks that took different branches get an error naming the layer,
        not statistics mixed from two layers or a reduction of mismatched sizes."""
        if not self._at_one_point(f"{state.target.qualname}[{units.start}:{units.stop}]", width, device):
            msg = (f"the ranks of the process group are at different layers of the data-dependent init: this rank "
                   f"calibrates {state.target.qualname!r} while another calibrates another layer (a branch taken on "
                   "some ranks only, or a different model); every rank must run the same layers in the same order, "
                   "or pass distributed=False for an init on each rank's batch alone")
            raise WeightNormError(msg)

    def _at_one_point(self, point: str, width: int, device: torch.device) -> bool:
        """Whether every rank of the group is at ``point`` (a layer's units, the end of the pass) with
        ``width``: one all-reduce of the point's hash and the width, negated too, so that the
        maximum is this rank's own on every rank only where all agree."""
        tag = zlib.crc32(point.encode())  # the same in every process
        mine = torch.tensor([tag, -tag, width, -width], dtype=torch.float64, device=device)
        seen = mine.clone()
        all_reduce(seen, dist.ReduceOp.MAX, self.group)
        return torch.equal(seen, mine)

    def finished_on_every_rank(self, device: torch.device) -> None:
        """After a pass across ranks: check that every rank has finished it.  A rank whose shard skips
        the last layers (``if rows.numel() == 0: continue`` over experts) would return with them
        uncalibrated while another waits in their reduction: it is told that it finished early, and
        the other, in :meth:`_same_layer_on_every_rank`, which layer it is at."""
        if self.group is not None and not self._at_one_point("<the end of the pass>", 0, device):
            msg = ("the ranks of the process group are at different layers of the data-dependent init: this rank "
                   "has finished the pass while another still calibrates a layer (one this rank's shard skips: a "
                   "branch taken on some ranks only, an expert none of its rows was routed to and that the forward "
                   "skips); every rank must run the same layers in the same order (call an expert with no rows "
                   "too), or pass distributed=False for an init on each rank's batch alone")
            raise WeightNormError(msg)

    def _release(self, state: _State, known: Tensor, bound: Tensor, std: Tensor) -> Tensor:
        """The units of ``known`` (called constant against their neighbours' scale) whose spread
        ``std`` of ``t'`` is beyond what rounding can make of a constant (``bound``, see
        :func:`_rounding_bound`): they are standardized.  Those within 1000 times the bound are
        standardized to within rounding only, and noted as nearly constant."""
        released = known & (std > bound)
        nearly = int((released & (std <= bound * (_NEARLY_CONSTANT_STD / _CONSTANT_STD))).sum())
        if nearly:
            qualname = state.target.qualname
            self._nearly_released[qualname] = self._nearly_released.get(qualname, 0) + nearly
        return released

    def nearly_constant_units(self) -> dict[str, int]:
        """After the pass: per weight, its units standardized to within float rounding only."""
        counts = self._moments.nearly_constant()
        for qualname, count in self._nearly_released.items():
            counts[qualname] = counts.get(qualname, 0) + count
        return counts

    def unforeseen_constants(self) -> list[tuple[_State, Tensor]]:
        """After the pass: the units found constant on the batch that were not known to be, as
        ``(state, mask over all its units)`` (see :meth:`_Moments.constants`); empty if none."""
        return self._moments.constants()

    def _settable(self, bias: Tensor, state: _State) -> bool:
        """Whether the init may set ``bias`` for ``state``'s op: a parameter of the model that trains
        (a frozen bias keeps its value, as a frozen layer does), that no two layers hold (one bias
        cannot centre both), that belongs to no other layer than this one (``F.linear(h, w2,
        self.a.bias)``: ``a``'s to set), and that no other weight's op has set in this pass."""
        source = bias if bias._base is None else bias._base  # a view made under no_grad does not require grad
        if (not source.requires_grad or self._bias_holders.get(id(source), id(state.module)) != id(state.module)
                or not self._is_parameter(bias, state.module)):
            return False
        return self._bias_setter.get(_bias_key(bias), id(state)) == id(state)

    def _is_parameter(self, tensor: Tensor, owner: nn.Module) -> bool:
        """Whether ``tensor`` is (a view of) a parameter of the model: the bias can be set."""
        if any(p is tensor for p in owner._parameters.values()):  # the usual case: the layer's own bias
            return True
        if self._param_ids is None:
            self._param_ids = {id(p) for p in self.model.parameters()}
        return id(tensor) in self._param_ids or (tensor._base is not None and id(tensor._base) in self._param_ids)

    def calibrate_linear(self, state: _State, x: Tensor, bias: Tensor | None) -> Tensor:
        """A stock ``nn.Linear``'s output on ``x`` (direct pass), its target calibrated first on
        ``t' = x @ v'``: the same as the intercepted ``F.linear``, without intercepting anything."""
        traced = torch.is_grad_enabled()  # (the forward turned grad on to differentiate: see _measured_apart)
        with _measured_apart():
            fit = self._calibrate(state, torch.matmul(x, state.v.t()), -1, bias, native="linear",
                                  terms=_linear_terms(x, state.v))
        if not self.exact and not fit.real and not traced:
            return fit.output()
        return _constant_units_flat(F.linear(x, _current_weight(state), bias), fit)

    @staticmethod
    def _finish(state: _State) -> None:
        """The layer is calibrated: from now on it computes its real weight."""
        state.done = True
        _stop_measuring(state)

    def _attention(self, func, args, kwargs):
        """``F.multi_head_attention_forward``: calibrate the q/k/v and output projections."""
        apart = _measured_apart()  # (the statistics: off any graph the forward builds)
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        embed = a["embed_dim_to_check"]
        if not a["use_separate_proj_weight"]:
            found = self._lookup(a["in_proj_weight"])
            if found is not None and not found.state.done:
                state = found.state
                weights = a["in_proj_weight"].split(embed)
                biases = a["in_proj_bias"].split(embed) if a["in_proj_bias"] is not None else (None,) * 3
                for i, (x, w, b) in enumerate(zip((a["query"], a["key"], a["value"]), weights, biases)):
                    with apart:
                        self._calibrate(state, F.linear(x, w), -1, b, slice(i * embed, (i + 1) * embed),
                                        terms=_linear_terms(x, w))
                self._finish(state)
            if found is not None:
                a["in_proj_weight"] = _current_weight(found.state)
        else:
            biases = a["in_proj_bias"].split(embed) if a["in_proj_bias"] is not None else (None,) * 3
            for (key, x), b in zip((("q_proj_weight", a["query"]), ("k_proj_weight", a["key"]),
                                    ("v_proj_weight", a["value"])), biases):
                found = self._lookup(a[key])
                if found is not None and not found.state.done:
                    with apart:
                        self._calibrate(found.state, F.linear(x, a[key]), -1, b, terms=_linear_terms(x, a[key]))
                if found is not None:
                    a[key] = _current_weight(found.state)
        found = self._lookup(a["out_proj_weight"])
        if found is None:
            return func(*bound.args, **bound.kwargs)
        state = found.state
        out_weight, out_bias = a["out_proj_weight"], a["out_proj_bias"]
        a["out_proj_weight"] = torch.eye(out_weight.shape[1], dtype=out_weight.dtype, device=out_weight.device)
        a["out_proj_bias"] = None
        heads_out, attn_weights = func(*bound.args, **bound.kwargs)
        if not state.done:
            with apart:
                self._calibrate(state, F.linear(heads_out, out_weight), -1, out_bias)
        return F.linear(heads_out, _current_weight(state), out_bias), attn_weights


    def _input_projection(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, bool]:
        """Calibrate a recurrent layer's input projection ``x @ W_ih'`` per gate row; the weight to use,
        and whether this call was passed over (its input a constant: a decoder's zeros go frame, see
        :meth:`_passes_over`)."""
        found = self._lookup(weight)
        if found is None:
            return weight, False
        if not found.state.done:
            if self._passes_over(found.state, x):
                return weight, True  # what the layer computes before the init
            with _measured_apart():
                self._calibrate(found.state, F.linear(x, weight), -1, bias, terms=_linear_terms(x, weight))
        return found.rebuild(), False

    def _constant_state(self, hx: Any) -> bool:
        """Whether a recurrent call's initial state is none or constants (zeros the layer made)."""
        return all(self._constant(h) for h in (hx if isinstance(hx, (tuple, list)) else (hx,)) if h is not None)

    def _keep_recurrent(self, weight: Tensor) -> Tensor:
        """Hidden-to-hidden weights keep their scale (documented): restore it, note them."""
        found = self._lookup(weight)
        if found is None:
            return weight
        if not found.state.done:
            with torch.no_grad():  # (a forward that turned grad on: g is a leaf that requires grad)
                found.state.g.copy_(self.backup.g[id(found.state)])
            self._finish(found.state)
            self.notes.recurrent_kept.append(found.state.target.qualname)
        return found.rebuild()

    def _recurrent(self, func, args, kwargs):
        """``_VF.lstm``/``gru``/``rnn_*``: run it one layer at a time, calibrating each layer's
        input projections on the previous layer's output (the layers' own dropout is off here).

        Two call forms, told apart by where the weight list sits:
        padded ``(x, hx, weights, has_biases, layers, dropout, train, bidirectional, batch_first)``
        and packed ``(data, batch_sizes, hx, weights, has_biases, layers, dropout, train,
        bidirectional)``, where ``data`` holds only the real time steps (no padding).
        """
        packed = len(args) == 9 and isinstance(args[3], (list, tuple))
        if kwargs or len(args) != 9 or not (packed or isinstance(args[2], (list, tuple))):
            return func(*args, **kwargs)
        if packed:
            x, batch_sizes, hx, params, has_biases, num_layers, _, train, bidirectional = args
            layout: tuple = (batch_sizes,)
            tail: tuple = (train, bidirectional)
        else:
            x, hx, params, has_biases, num_layers, _, train, bidirectional, batch_first = args
            layout, tail = (), (train, bidirectional, batch_first)
        directions = 2 if bidirectional else 1
        per = len(params) // (num_layers * directions)  # w_ih, w_hh[, b_ih, b_hh][, w_hr]
        states = list(hx) if isinstance(hx, (tuple, list)) else [hx]
        finals: list[list[Tensor]] = [[] for _ in states]
        for layer in range(num_layers):
            first = layer * directions * per
            chunk = list(params[first:first + directions * per])
            passed = []
            for d in range(directions):
                bias = chunk[d * per + 2] if has_biases else None
                chunk[d * per], passed_over = self._input_projection(x, chunk[d * per], bias)
                passed.append(passed_over)
                for j in range(1, per):
                    chunk[d * per + j] = self._keep_recurrent(chunk[d * per + j])
            rows = slice(layer * directions, (layer + 1) * directions)
            layer_hx = tuple(h[rows] for h in states) if len(states) > 1 else states[0][rows]
            out = func(x, *layout, layer_hx, chunk, has_biases, 1, 0.0, *tail)
            if all(passed) and self._constant_state(hx):  # (a warm-up run on zeros: constant all through)
                self._note_constant(out)
            x = out[0]
            for final, value in zip(finals, out[1:]):
                final.append(value)
        return (x, *(torch.cat(final) for final in finals))

    def _cell(self, func, args, kwargs):
        """``_VF.lstm_cell`` etc.: ``(input, hx, w_ih, w_hh, b_ih, b_hh)``."""
        if kwargs or len(args) < 4:
            return func(*args, **kwargs)
        x, hx, w_ih, w_hh, *biases = args
        w_ih, passed = self._input_projection(x, w_ih, biases[0] if biases else None)
        out = func(x, hx, w_ih, self._keep_recurrent(w_hh), *biases)
        if passed and self._constant_state(hx):  # (a decoder's go frame, its state zeros: constant outputs)
            self._note_constant(out)
        return out


_NATIVE_DIMS = {"linear": 0, "conv": 0, "conv_transpose": 1}  # op kind: the axis of v that holds its output units
#: Functions that build a tensor from no input (torch.eye, zeros, arange...; zeros_like takes its argument's shape
#: alone, as_tensor its values): see _CalibrationMode._passes_over.
_FACTORIES = frozenset({"eye", "zeros", "ones", "full", "arange", "linspace", "logspace", "empty", "tensor",
                        "as_tensor", "zeros_like", "ones_like", "full_like", "empty_like"})
# Tensor methods that make a constant of the tensor's dtype and device (a recurrent state: h = x.new_zeros(B, H))
_METHOD_FACTORIES = frozenset({"new_zeros", "new_ones", "new_full", "new_empty"})
_VALUE_FACTORIES = frozenset({"tensor", "as_tensor"})  # factories whose values are their argument's


def _may_hold_batch_values(index: Any) -> bool:
    """Whether a pick's index holds a Python number or a list of them (a label, the batch's token
    ids), which may come from the batch; slices, ``None``, ``...`` and tensors (judged as tensors) not."""
    if isinstance(index, (list, tuple)):
        return any(_may_hold_batch_values(a) for a in index)
    return isinstance(index, numbers.Number) and not isinstance(index, bool)

# Ops whose result holds values of their tensor inputs (and constants), moved or converted, nothing computed.
_VALUE_COPIES = frozenset({
    "pad", "cat", "concat", "concatenate", "stack", "reshape", "view", "flatten", "unflatten", "permute", "transpose",
    "t", "movedim", "swapaxes", "contiguous", "clone", "unsqueeze", "squeeze", "narrow", "select", "__getitem__",
    "expand", "repeat", "flip", "roll", "to", "float", "double", "half", "bfloat16", "type", "_to_copy",
})


def _strided(tensor: Any) -> bool:
    """A plain dense tensor, whose memory can be read (not a sparse, nested or subclass tensor)."""
    return type(tensor) is Tensor and tensor.layout == torch.strided and not tensor.is_nested


class _Terms(NamedTuple):
    """A calibrated op's input ``x``, and how to compute ``op(|x|, |v|)``: the size of each output's
    own terms, for :meth:`_CalibrationMode._batch_rounding_bound`."""

    x: Tensor
    compute: Callable[[], Tensor]


def _linear_terms(x: Tensor, weight: Tensor) -> _Terms:
    """``|x| @ |W|'``."""
    return _Terms(x, lambda: F.linear(x.abs(), weight.abs()))


def _call_as_given(func: Callable, positional: Sequence[str], bound: dict[str, Any]) -> Any:
    """``func`` on the arguments ``bound`` names, those the call gave by position (``positional``)
    by position again: a Tensor method (``bias.addmm(x, w)``, ``x.matmul(w)``) takes its tensor
    only so, and ``torch.addmm``'s ``beta`` only by keyword."""
    return func(*(bound[key] for key in positional), **{k: v for k, v in bound.items() if k not in positional})


def _data_operand(bound: dict[str, Any]) -> Any:
    """The data a linear/conv/matmul call bound as ``bound`` multiplies (``addmm``'s ``mat1``)."""
    return bound["mat1"] if "mat1" in bound else bound["input"]


def _op_terms(func: Callable, use: Any, bound: dict[str, Any], weight_key: str) -> Tensor:
    """``op(|x|, |v|)`` without bias, for a linear, conv or matmul call bound as ``bound``."""
    x = _data_operand(bound)
    if use.kind == "matmul":
        return torch.matmul(x.abs(), use.weight.abs())
    if use.kind == "linear":
        return torch.matmul(x.abs(), use.weight.abs().t())
    return func(**(bound | {"input": x.abs(), weight_key: use.weight.abs(), "bias": None}))


def _rounding_bound(state: _State, t_raw: Tensor, terms: Tensor, unit_dim: int, units: slice) -> Tensor:
    """Per unit, how far rounding can spread ``t' = op(x, v)`` on the batch where the exact result
    is constant and ``x`` is exact (the sample batch): each ``t'`` sums ``k`` non-zero products
    (those with a zero weight are exact) whose sizes add up to ``m = op(|x|, |v|)`` (``terms``), and
    is computed to within ``k eps m`` (``eps``: the op's precision, :func:`_rounding_eps`); so
    ``(k + 2) eps max(m)``, the max over the batch (and positions).  A unit reading only a feature
    of std 1e-2 beside units reading 1e5 +- 100 (unnormalized tabular inputs) spreads far beyond it;
    one whose terms cancel does not."""
    reduce = [d for d in range(terms.ndim) if d != unit_dim % terms.ndim]
    nonzero = unit_norm((state.v != 0).to(terms.dtype), state.wn.layout).reshape(-1)[units].square()  # per unit
    return terms.amax(dim=reduce) * ((nonzero + 2) * _rounding_eps(t_raw))


def _exact_spread(centred: Tensor, unit_dim: int) -> Tensor:
    """Per unit, the population std of ``centred`` (``t'`` less its float mean) in float64: the
    spread of the values themselves, without the float32 statistics' own rounding (a column of
    equal values whose mean rounds by an ulp shows a float32 std of that ulp; here 0)."""
    reduce = [d for d in range(centred.ndim) if d != unit_dim % centred.ndim]
    wide = torch.float64 if centred.device.type != "mps" else torch.float32  # (MPS has no float64)
    return torch.var(centred.to(wide), dim=reduce, correction=0).sqrt()


def _rounding_eps(result: Tensor) -> float:
    """The relative precision of the op that computed ``result``: its dtype's (that of a linear or
    conv's inputs, or coarser under autocast); a float32 op counts as TF32 off the CPU (cuDNN's
    convolutions use it by default), and as bfloat16 where torch was allowed to compute float32
    matmuls in lower precision on the CPU."""
    eps = torch.finfo(result.dtype).eps
    if result.dtype == torch.float32 and result.device.type != "cpu":
        eps = max(eps, 2.0 ** -10)
    elif result.dtype == torch.float32 and _cpu_float32_lowered():
        eps = max(eps, torch.finfo(torch.bfloat16).eps)
    return eps


def _cpu_float32_lowered() -> bool:
    """Whether float32 matmuls or convs on the CPU may run in lower precision:
    ``torch.set_float32_matmul_precision("medium")``, or a oneDNN ``fp32_precision`` other than
    IEEE (the newer API, with which the older query raises)."""
    try:
        return torch.get_float32_matmul_precision() == "medium"
    except RuntimeError:
        settings = (torch.backends, torch.backends.mkldnn, torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv)
        return any(getattr(setting, "fp32_precision", "none") not in ("ieee", "none") for setting in settings)


def _store(dst: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``dst[:] = a * b`` (flat), in one op where ``out=`` can take it."""
    if dst.dtype == a.dtype == b.dtype and dst.is_contiguous():
        return torch.mul(a, b, out=dst if dst.shape == a.shape else dst.view(a.shape))
    return dst.copy_((a * b).view(dst.shape))


def _unit_norms(state: _State, units: slice, out: Tensor) -> Tensor:
    """``||v||`` of ``state``'s ``units``, written to ``out`` (flat).  Nothing is kept per layer:
    see :class:`_Moments`.  A slice of units (attention's packed q/k/v rows) reads only its rows."""
    v = state.v
    if units != slice(None):
        v = v.narrow(state.wn.layout.dim, units.start, units.stop - units.start)
    return unit_norm(v, state.wn.layout, out=out).view(-1)


def _measured_apart() -> contextlib.AbstractContextManager:
    """Where the statistics of a layer are taken: under ``no_grad`` where the forward turned grad on
    inside the pass's ``no_grad`` (to differentiate through its layers: the normals of a signed
    distance, a physics residual), so that no graph runs through them; the layer then hands on its
    real output with the new ``(g, b)``, on a graph, and the derivatives the forward takes are those
    of the calibrated layer."""
    return torch.no_grad() if torch.is_grad_enabled() else _AS_IT_IS


_AS_IT_IS = contextlib.nullcontext()  # (reusable: one per layer would cost a microsecond each)


def _piece_calibrated(state: _State, units: slice) -> bool:
    """Whether every unit of a piece split off the layer's ``v`` is calibrated (False for ``v`` whole,
    which is calibrated when its layer is done)."""
    return units != slice(None) and state.pieces_done is not None and bool(state.pieces_done[units].all())


def _current_weight(state: _State) -> Tensor:
    """The layer's weight from its current ``(g, v)``: the parametrization's, except while it still
    hands out ``v`` (a layer whose split pieces are calibrated one at a time): then the formula."""
    if state.wn.__dict__.get("direction_only"):
        return weight_norm_weight(state.g, state.v, state.wn.layout, exp_scale=state.wn.exp_scale)
    return getattr(state.module, state.target.name)
