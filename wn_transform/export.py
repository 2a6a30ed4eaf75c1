"""ONNX export of a weight-normalized model: fold, export, check, verify, write atomically.

:func:`export_onnx` never exports the user's model itself.  It folds a copy
(:func:`~wn_transform.fold.fold_weight_norm`), so the graph holds plain weights and no
``g * v / ||v||`` arithmetic, puts the copy in eval mode and exports it:

1. with the dynamo exporter (``torch.onnx.export(..., dynamo=True)``); when that raises, or its
   file fails the checks below, with the TorchScript exporter (``dynamo=False``), and the report
   says why it fell back;
2. with a dynamic batch axis (dim 0 of every tensor input) unless told otherwise;
3. with the model's parameter names on the initializers (``conv_pre.weight``).  Both
   exporters keep them for plain parameters; where one names a weight after the op that
   produced it (``val_12``, ``onnx::Conv_12``), the initializer is renamed back when its value
   is bit-for-bit equal to exactly one state-dict entry and to no other initializer.
   Weights the exporter transformed (a transposed ``Linear`` weight for a ``MatMul``, a
   parameter folded into a constant) keep the exporter's name and are listed in
   :attr:`ExportReport.unnamed_parameters`;
4. into a temporary folder next to the target, then ``onnx.checker.check_model`` on the
   file, onnxruntime (CPUExecutionProvider) on the sample batch and on a batch one sample
   larger, compared output by output with PyTorch; only then is the file moved into place
   with ``os.replace``.  Any failure leaves nothing behind: no target file, no temporary.
5. a TorchScript export is verified once more, on a batch with the sample's shapes and dtypes
   but other values (each input's values permuted; bools kept).  The tracer records
   the one path the sample batch took through Python control flow on tensor values (a loop
   over the experts a mixture-of-experts layer routed the sample to); the grown batches repeat
   the sample's rows and take that path again, so only other values show a graph that baked
   it in.  The tracer's own TracerWarnings are recorded rather than passed on: in the error
   when that check fails, else in one :class:`ExportWarning` and the report.  The dynamo
   exporter needs no such check: ``torch.export`` refuses data-dependent control flow rather
   than tracing one branch of it.

Default tolerances follow the least precise floating dtype of the model's parameters and
outputs (:data:`DEFAULT_TOLERANCES`): float16 rounding is far above float32's tolerance.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import inspect
import io
import math
import os
import re
import shutil
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.utils._pytree import (MappingKey, SequenceKey, tree_flatten, tree_flatten_with_path, tree_leaves, tree_map,
                                 tree_unflatten)

from . import batch as batch_mod
from ._logging import muted
from . import dynamic_axes
from .errors import WeightNormError, few, first_line, one_line, warn_user
from . import onnx_graph
from ._copy import copy_model, refuse_offloaded, refuse_sharded, routed_module
from .fold import fold_weight_norm
from .layers import quantized_layers

__all__ = ["DEFAULT_TOLERANCES", "EXTERNAL_DATA_THRESHOLD", "ExportError", "ExportMismatchError", "ExportReport",
           "ExportWarning", "export_onnx"]

Exporter = Literal["auto", "dynamo", "torchscript"]
Progress = Callable[[str], None]

#: ``external_data=None`` writes the weights to ``<file>.data`` above this many bytes of
#: parameters and buffers (a single protobuf cannot exceed 2 GB).
EXTERNAL_DATA_THRESHOLD = 1_500_000_000
_PROTOBUF_LIMIT = 2**31 - 1
_EXPORTERS = ("auto", "dynamo", "torchscript")

#: ``(rtol, atol)`` used when ``export_onnx`` is not given them, by the least precise floating
#: dtype among the model's parameters and its outputs on the sample batch (any other dtype,
#: float64 included, gets float32's).  rtol is taken of each element's magnitude, or of its
#: output's typical magnitude where that is larger (:func:`_compare`): rounding in a deep
#: network is absolute at the scale of the activations, so an element near zero carries the
#: absolute error of its neighbours.  float32's rtol of 1e-3 (``torch.onnx.verification``'s
#: default) is ~17000 times its unit roundoff 2^-24: onnxruntime and PyTorch sum in other orders
#: and with other kernels (Winograd convolutions), and a 53-conv MobileNetV2 differs by 1e-4 of
#: its output's scale.  float16 keeps 11 significant bits (unit roundoff 2^-11 ~ 4.9e-4): a
#: single rounding of an output near 1 moves it by up to 4.9e-4, and a few layers of them,
#: summed in another order, reach a few 1e-3; rtol=1e-2 is ~20 roundings.  bfloat16 keeps 8 bits
#: (2^-8 ~ 3.9e-3), so 20 roundings are ~8e-2.  atol, for outputs near zero, is 1e-5 for
#: float32 and rtol / 10 for the half-precision types.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-3, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (8e-2, 8e-3),
}
#: Seed of the batch with other values (:func:`_other_values`): the same batch on every run.
_OTHER_VALUES_SEED = 0
#: TracerWarnings quoted in an error or a warning (the report keeps them all).
_QUOTED_TRACER_WARNINGS = 2


class ExportError(WeightNormError):
    """The model could not be exported to ONNX, or the written file fails its checks."""


class ExportMismatchError(ExportError):
    """onnxruntime's outputs differ from PyTorch's beyond the tolerance (per output: max abs/rel).
    ``on_sample``: they differ on the sample batch itself, not only on the batches grown from it."""

    on_sample: bool = False


class ExportWarning(UserWarning):
    """The file was written and verified, but the exporter warned that it may not hold for other
    inputs (the TorchScript tracer's TracerWarnings, quoted)."""


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how it checked it.

    ``exporter``: ``"dynamo"`` or ``"torchscript"``; ``fallback_reason``: why the dynamo
    exporter was given up (one line), ``None`` when it was not.  ``inputs``/``outputs``: the
    graph's value names with their shapes (a string is a dynamic axis).  ``node_counts``: op
    type -> number of nodes of the main graph.  ``initializer_bytes``: the size of the
    initializers' data.  ``renamed_initializers``: exporter name -> parameter name, for the
    initializers renamed back; ``unnamed_parameters``: state-dict entries no initializer is
    named after (transformed or folded into constants by the exporter).
    ``max_abs_diff``/``max_rel_diff``: per output, the largest ``|onnx - torch|`` and
    ``|onnx - torch| / |torch|`` over every run checked: the sample batch, then the sample grown
    along each dynamic axis; ``batch_sizes_checked``: the batch size of each run.
    ``other_values_checked``: a TorchScript export was also verified on a batch of the sample's
    shapes with other values (the diffs include that run).  ``tracer_warnings``: what the
    TorchScript tracer warned about (``"Iterating over a tensor might cause the trace to be
    incorrect" at moe.py:17``), once each.  ``rtol``/``atol``: the tolerances verified against.
    ``file_size``: bytes of the ``.onnx`` file; ``external_data``: the weights file, if any.
    ``timings``: seconds spent folding (the copy, and running it on the batch), exporting
    (with renaming and writing), checking (``onnx.checker``) and verifying (onnxruntime).
    ``notes``: what could not be checked, and what the tracer's warnings leave open.
    """

    path: str
    exporter: str
    fallback_reason: str | None
    opset: int
    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]
    node_counts: dict[str, int]
    initializer_count: int
    initializer_bytes: int
    renamed_initializers: dict[str, str]
    unnamed_parameters: list[str]
    max_abs_diff: dict[str, float]
    max_rel_diff: dict[str, float]
    batch_sizes_checked: list[int]
    file_size: int
    external_data: str | None = None
    external_data_size: int = 0
    rtol: float = DEFAULT_TOLERANCES[torch.float32][0]
    atol: float = DEFAULT_TOLERANCES[torch.float32][1]
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    other_values_checked: bool = False
    tracer_warnings: list[str] = field(default_factory=list)

    @property
    def node_count(self) -> int:
        """Nodes in the main graph."""
        return sum(self.node_counts.values())

    @property
    def total_time(self) -> float:
        """Seconds from start to finish."""
        return sum(self.timings.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of every field."""
        return asdict(self)

    def table(self) -> str:
        """A plain-text summary: the file, the exporter, the graph, the agreement, the time."""
        exporter = self.exporter if self.fallback_reason is None else (
            f"{self.exporter} (dynamo exporter failed: {self.fallback_reason})")
        size = _human_bytes(self.file_size)
        if self.external_data is not None:
            size += f" + {_human_bytes(self.external_data_size)} in {os.path.basename(self.external_data)}"
        rows = [
            ("file", self.path), ("size", size), ("exporter", exporter), ("opset", str(self.opset)),
            ("inputs", ", ".join(f"{k} {_shape_str(v)}" for k, v in self.inputs.items())),
            ("outputs", ", ".join(f"{k} {_shape_str(v)}" for k, v in self.outputs.items())),
            ("nodes", f"{self.node_count} ({', '.join(f'{op} {n}' for op, n in self.node_counts.items())})"),
            ("initializers", f"{self.initializer_count} ({_human_bytes(self.initializer_bytes)})"),
        ]
        if self.renamed_initializers:
            rows.append(("renamed", ", ".join(f"{a} -> {b}" for a, b in self.renamed_initializers.items())))
        if self.unnamed_parameters:
            rows.append(("not by name", ", ".join(self.unnamed_parameters)))
        sizes = ", ".join(map(str, self.batch_sizes_checked))
        if self.other_values_checked:
            sizes += " (and the sample's shapes with other values)"
        rows.append(("batch sizes", sizes))
        width = max(len(key) for key, _ in rows)
        lines = [f"{key.ljust(width)}  {value}" for key, value in rows]
        diffs = [("output", "max abs diff", "max rel diff")]
        diffs += [(name, f"{self.max_abs_diff[name]:.3g}", f"{self.max_rel_diff[name]:.3g}") for name in self.max_abs_diff]
        widths = [max(len(row[i]) for row in diffs) for i in range(3)]
        lines.append("")
        lines.extend("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in diffs)
        lines.append(f"(tolerance: rtol={self.rtol:g}, atol={self.atol:g})")
        lines.append("time: " + ", ".join(f"{step} {seconds:.2f} s" for step, seconds in self.timings.items())
                     + f"; total {self.total_time:.2f} s")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@dataclass
class _Inputs:
    """A sample batch laid out for export: args, kwargs in signature order, a name per tensor."""

    args: tuple
    kwargs: dict[str, Any]
    names: list[str]  # one per tensor leaf of (args, kwargs), in flattening order
    tensors: list[torch.Tensor]
    bound: dict[str, Any] | None  # forward's argument name -> value (None: no signature)
    varargs: str | None = None  # the forward's *args parameter, where the batch fills it
    var_keyword: str | None = None  # the forward's **kwargs parameter, where the batch gives it inputs
    # (a Hugging Face model's output_hidden_states=True, everything peft's PeftModel.forward gets)
    output_rows: int | None = None  # dim 0 of the model's first output on the sample (see _batch_size)

    def feed(self, session_inputs: list[str]) -> dict[str, np.ndarray]:
        by_name = dict(zip(self.names, self.tensors))
        unknown = [name for name in session_inputs if name not in by_name]
        if unknown:
            msg = (f"the exported graph has inputs {unknown} that the sample batch does not provide "
                   f"(batch inputs: {self.names})")
            raise ExportError(msg)
        return {name: _to_numpy(by_name[name]) for name in session_inputs}


def export_onnx(
    model: nn.Module,
    sample_batch: batch_mod.SampleBatch,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    dynamic_shapes: dict[str, Any] | tuple | list | None = None,
    external_data: bool | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    exporter: Exporter = "auto",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportReport:
    """Fold weight norm on a copy of ``model``, export it to ONNX at ``path``, check and verify it.

    ``model`` itself is not changed: not its parameters, not its ``training`` flag.

    Args:
        model: any ``nn.Module``; weight norm in any of the three layouts
            :mod:`wn_transform.fold` knows is folded into plain weights first.  A
            ``torch.compile``, ``nn.DataParallel`` or ``DistributedDataParallel`` wrapper is
            exported as the module it holds (initializers named as in that module).
        sample_batch: a tensor, a tuple of positional inputs, or a dict of keyword inputs; it
            traces the model and is the batch the ONNX file is verified on.
        path: the ``.onnx`` file to write; its folder must exist.
        opset: the ONNX opset (default: the exporter's default).
        dynamic_batch: make dim 0 of every tensor input (of 1 or more dims) dynamic: ``batch``
            where it is the batch size (the most common dim 0 above 1 of the inputs of 2 or more
            dims, or of all where those have none; where they are 1 beside a longer 1-D input,
            the output's rows decide), static where it is 1 beside a larger batch (a row
            broadcast against it).
            ``False``: every shape is fixed to the sample's.
        dynamic_shapes: explicit dynamic shapes, in ``torch.export`` form (a tuple over the
            positional inputs or a dict over the forward's argument names; per tensor a dict
            ``{axis: Dim | str}``, a negative axis counted from the end; for a ``forward(*xs)``,
            one entry per input or torch.export's one tuple for ``xs``); replaces ``dynamic_batch``.
            An axis name is a Python identifier, and one name is given to axes of one size in
            the sample batch.  For the TorchScript
            exporter it is translated to ``dynamic_axes`` (top-level tensor inputs only).
            An axis asked to be dynamic (not ``Dim.AUTO``) that the exporter fixed is an
            error.  Every axis the file declares dynamic is verified: on the sample batch, then
            once per symbol on the sample grown along it (the batch axis by one sample; another
            axis by a quarter of its size, at least 1, then at the next size where an output
            length that follows it has the other parity, or else at every size that search ran;
            twice its size where the model refuses those),
            every axis that depends on the symbol resized with it (a ``T x T`` mask, a derived
            ``2*T``: :mod:`wn_transform.dynamic_axes`), so that a graph that baked the sample's
            size in (Python arithmetic on a shape, under the TorchScript exporter) is caught.
        external_data: write the weights to ``<path>.data`` next to the file (``True``),
            inside the file (``False``), or decide by size (``None``: external above
            :data:`EXTERNAL_DATA_THRESHOLD` bytes of parameters and buffers).
        rtol, atol: an output element agrees when ``|onnx - torch| <= atol + rtol * max(|torch|, f)``,
            ``f`` the typical magnitude of the output's computed values on the sample batch
            (rounding is absolute at the activations' scale, so an element near zero carries its
            neighbours' error; zeros, sentinels and a block of far larger magnitudes are left out
            of it: ``_floor_magnitude``).  Integer and bool outputs must be equal, compared in their
            own dtype; an output of another dtype than PyTorch's disagrees.
            Left out (``None``), each follows the least precise floating dtype among the
            model's parameters and outputs (:data:`DEFAULT_TOLERANCES`): float32's ``1e-3``,
            ``1e-5``; float16's ``1e-2``, ``1e-3``; bfloat16's ``8e-2``, ``8e-3``.
        exporter: ``"auto"`` (dynamo, falling back to TorchScript when the dynamo exporter
            raises or its file fails the checks), ``"dynamo"`` or ``"torchscript"``.  A TorchScript export is verified
            once more, on the sample's shapes with other values, since its trace can bake in
            the path the sample took through Python control flow on tensor values.
        overwrite: replace an existing file at ``path`` (and ``<path>.data``; a file written with its
            weights inside removes a ``<path>.data`` left by an earlier export to ``path``).
        progress: called with a short message as each step starts.

    Returns:
        An :class:`ExportReport`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or the batch is not a tensor/tuple/dict.
        ValueError: a bad argument (``exporter``, ``rtol``/``atol``, embedding > 2 GB, ``dynamic_shapes``
            that no exporter can honour).
        FileExistsError: ``path`` exists and ``overwrite`` is False (or ``<path>.data``, where the
            weights go there: refused before the model runs).
        FileNotFoundError: the folder of ``path`` does not exist.
        PermissionError: the folder of ``path`` cannot be written in (found before any work).
        OSError: the file did not fit (a full disk, a quota or a file-size limit); it names ``path``.
        BatchError: the batch holds NaN, or the model rejects it (the layer is named).
        ExportError: no exporter could export the model, or the file fails the ONNX checker
            or onnxruntime.
        ExportMismatchError: onnxruntime disagrees with PyTorch beyond ``rtol``/``atol``, or
            (TorchScript) agrees on the sample batch but not on the same shapes with other
            values: the trace baked in data-dependent control flow.

    Warns:
        ExportWarning: the TorchScript tracer warned that its trace may be incorrect for other
            inputs, and the file agreed on every batch checked (or the model rejects other
            values): the warnings are quoted, and kept in the report.
    """
    say = progress if progress is not None else _silent
    target, data_target = _check_arguments(model, path, exporter, rtol, atol, overwrite, external_data)
    model = routed_module(model)  # torch.compile's, DataParallel's, DDP's wrapper: export the module they hold
    refuse_sharded(model, "export_onnx", ExportError)
    refuse_offloaded(model, "export_onnx", ExportError)
    batch_mod.as_args(sample_batch)
    _refuse_meta(model, sample_batch)
    batch_mod.check_no_nan(sample_batch)
    job = _fold_for_export(model, sample_batch, target, data_target, opset=opset, dynamic_batch=dynamic_batch,
                           dynamic_shapes=dynamic_shapes, external_data=external_data, overwrite=overwrite, rtol=rtol,
                           atol=atol, say=say)

    tmpdir = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=os.path.dirname(target))
    job.tmp_file = os.path.join(tmpdir, os.path.basename(target))
    try:
        exported = _export_checked(job, exporter, tmpdir)
        _move_into_place(job, tmpdir, overwrite=overwrite)
    except OSError as exc:
        if exc.errno not in _FULL or exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, target) from exc  # "No space left on device: 'x.onnx'"
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    say(f"wrote {target}")
    checked = exported.checked
    if exported.tracer_warnings:
        checked.notes.append(_tracer_note(exported.tracer_warnings, checked.other_values_checked))
        warn_user(f"{target}: {checked.notes[-1]}", ExportWarning)
    for note in _non_finite_notes(job.reference, job.output_names):
        checked.notes.append(note)
        warn_user(f"{target}: {note}", ExportWarning)
    return _report(job, exported)


def _non_finite_notes(reference: Any, output_names: list[str]) -> list[str]:
    """A note per output whose PyTorch values on the sample batch hold NaN or inf: the check matched
    them position for position, which says nothing of the values the model should have computed."""
    notes = []
    for name, tensor in zip(output_names, _output_tensors(reference)):
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        nan, inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
        if nan or inf:
            counts = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
            notes.append(f"output '{name}': PyTorch's own output on the sample batch holds {counts} of "
                         f"{tensor.numel()} values (an overflow: a float16 model whose g went beyond its range, a "
                         "log or a division by 0); the file gives them in the same places, which checks nothing "
                         "there")
    return notes


@dataclass
class _Job:
    """One call of :func:`export_onnx`: the folded copy and its outputs on the sample batch,
    the options that shape the file, and where it goes (``tmp_file`` until it is verified)."""

    folded: nn.Module
    sample_batch: batch_mod.SampleBatch
    reference: Any  # the folded model's outputs on the sample batch
    inputs: _Inputs
    state: dict[str, torch.Tensor]  # the folded model's state dict: the initializers' names
    output_names: list[str]
    rtol: float
    atol: float
    opset: int | None
    dynamic_batch: bool
    dynamic_shapes: Any
    use_external: bool
    target: str
    data_target: str
    say: Progress
    timings: dict[str, float]
    tmp_file: str = ""


class _Checked(NamedTuple):
    """What checking an exported file in onnxruntime found (see :func:`_check`)."""

    diffs: dict[str, tuple]
    sizes: list
    notes: list[str]
    other_values_checked: bool
    outputs: dict[str, list[int | str]] | None = None  # the outputs' shapes as declared anew, if they were


class _Exported(NamedTuple):
    """A file written to ``tmp_file`` that passed its checks (see :func:`_export_checked`)."""

    exporter: str
    fallback_reason: str | None
    tracer_warnings: list[str]
    renamed: dict[str, str]
    unnamed: list[str]
    stats: dict[str, Any]
    checked: _Checked


def _fold_for_export(model: nn.Module, sample_batch: batch_mod.SampleBatch, target: str, data_target: str, *,
                     opset: int | None, dynamic_batch: bool, dynamic_shapes: Any, external_data: bool | None,
                     overwrite: bool, rtol: float | None, atol: float | None, say: Progress) -> _Job:
    """Fold a copy of ``model``, run it on the sample batch, and settle what the file will hold."""
    start = time.perf_counter()
    say("folding weight norm into plain weights (on a copy)")
    folded = fold_weight_norm(copy_model(model, instead="fold it yourself first, fold_weight_norm(model, "
                                                  "inplace=True), and export that"), inplace=True)
    folded.eval()
    if _external_data(_weights_of(folded), external_data) and external_data is None:  # (embedding > 2 GB refused,
        _refuse_existing(target, data_target, overwrite=overwrite)  # and an existing .data, before the work)
    say("running the folded model on the sample batch")
    with torch.no_grad():
        reference = batch_mod.run(folded, sample_batch)
    state = _weights_of(folded)  # (lazy layers have run, buffers made in the first forward are there)
    use_external = _external_data(state, external_data)
    if use_external and external_data is None:
        _refuse_existing(target, data_target, overwrite=overwrite)
    rtol, atol = _tolerances(folded, reference, rtol, atol)
    inputs = _layout_inputs(folded, sample_batch)
    inputs.output_rows = next((t.shape[0] for t in _output_tensors(reference) if t.dim() > 0), None)
    if dynamic_shapes is not None:
        dynamic_shapes = _prepared_dynamic_shapes(dynamic_shapes, inputs)
    timings = {"fold": time.perf_counter() - start}
    return _Job(folded, sample_batch, reference, inputs, state, _output_names(reference, inputs.names), rtol, atol,
                opset, dynamic_batch, dynamic_shapes, use_external, target, data_target, say, timings)


def _weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``model``'s state dict the file will hold: not a module's ``_extra_state``, a
    quantized layer's packed weights, nor a lazy layer's weight before its first call."""
    return {key: value for key, value in model.state_dict().items()
            if isinstance(value, torch.Tensor) and not value.is_quantized and not is_lazy(value)}


def _external_data(state: dict[str, torch.Tensor], external_data: bool | None) -> bool:
    """Whether the weights go to ``<path>.data``: as asked, else (``None``) above
    :data:`EXTERNAL_DATA_THRESHOLD` bytes.  Decided on the folded copy before it runs too, so that an
    existing ``<path>.data`` is refused before the export's work."""
    weight_bytes = _state_bytes(state)
    use_external = weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
    if not use_external and weight_bytes > _PROTOBUF_LIMIT:
        msg = (f"the model holds {_human_bytes(weight_bytes)} of weights, more than one ONNX file can embed "
               f"(2 GB); use external_data=True or None")
        raise ValueError(msg)
    return use_external


def _export_checked(job: _Job, exporter: Exporter, tmpdir: str) -> _Exported:
    """Export, write and check the file; with ``"auto"``, a dynamo file that fails its checks (an
    axis it fixed, onnxruntime failing or differing at a grown size: torch 2.13 bakes an LSTM's
    time steps into a Reshape) is given up for the TorchScript exporter's, as a dynamo export
    that raises is."""
    attempt, rejected = exporter, None
    while True:
        start = time.perf_counter()
        try:
            proto, used, fallback_reason, tracer_warnings = _export(
                job.folded, job.inputs, job.output_names, tmpdir, opset=job.opset, dynamic_batch=job.dynamic_batch,
                dynamic_shapes=job.dynamic_shapes, exporter=attempt, say=job.say)
        except ExportError as exc:
            hint = _number_outputs_hint(job.reference, job.output_names) + _cache_hint(job.reference)
            if rejected is None and not hint:
                raise
            hint += _static_axis_hint(job, rejected or "")
            msg = f"{exc}{hint}" if rejected is None else f"both exporters failed; dynamo: its {rejected}; {exc}{hint}"
            raise type(exc)(msg) from exc
        fallback_reason = fallback_reason or rejected
        try:
            renamed, unnamed, stats = _write(job, proto, used)
            del proto  # not held while onnxruntime runs the file
            job.timings["export"] = time.perf_counter() - start
            checked = _check(job, used, fallback_reason, tracer_warnings, stats["inputs"])
            return _Exported(used, fallback_reason, tracer_warnings, renamed, unnamed, stats, checked)
        except ExportError as exc:
            if exporter == "auto" and used == "dynamo":
                rejected = f"file failed its checks ({_middle_cut(f'{type(exc).__name__}: {exc}')})"  # our diagnosis ends it
                job.say(f"the dynamo exporter's {rejected}; exporting with the TorchScript exporter instead")
                attempt = "torchscript"
                continue
            if used != "torchscript" or not fallback_reason or fallback_reason in str(exc):
                raise
            why = rejected or f"export failed ({fallback_reason})"  # say why this is TorchScript's file
            msg = f"{exc} [this is the TorchScript exporter's file: the dynamo exporter's {why}]"
            raise type(exc)(f"{msg}{_static_axis_hint(job, why)}") from exc


def _static_axis_hint(job: _Job, dynamo_failure: str) -> str:
    """What to add where the dynamo exporter refused a dim 0 that the default dynamic batch made
    dynamic (a GNN's ``edge_index [2, E]``: torch.export found it static) and the fallback failed
    too: the way to export without it; '' otherwise."""
    found = re.search(r"static shape of \d+ for dimension inputs\['(\w+)'\]\.shape\[(\d+)\]", dynamo_failure)
    if found is None or job.dynamic_shapes is not None or not job.dynamic_batch:
        return ""
    return (f" (the dynamo exporter found axis {found[2]} of input '{found[1]}' static, which the default dynamic "
            "batch made dynamic as every input's dim 0: pass dynamic_batch=False, or dynamic_shapes naming the axes "
            "that vary; on the command line, --dynamic none or --dynamic INPUT:AXIS=NAME)")


def _number_outputs_hint(reference: Any, output_names: list[str]) -> str:
    """What to add to a failed export of a model that returns Python numbers beside its tensors: the
    exporters write one computed from an input's shape (``x.shape[0]``) as a 0-d output, but not a
    constant (``3``, ``0.5``, ``True``), which no graph computes from the inputs; '' where it returns none."""
    numbers = [f"'{name}' = {leaf!r}" for name, leaf in zip(output_names, _output_leaves(reference))
               if isinstance(leaf, _NUMBERS)]
    if not numbers:
        return ""
    return (f" [the model returns Python numbers beside its tensors ({few(numbers, 3)}): an exporter writes one "
            "read off an input's shape as a 0-d output, but not a constant; return such a value as a tensor "
            "computed from the inputs, or leave it out of the forward's outputs]")


def _cache_hint(reference: Any) -> str:
    """What to add to a failed export of a model that returns a transformers key/value cache
    (``DynamicCache``: a language model's or seq2seq model's default ``use_cache=True``), which
    neither exporter takes as an output; '' where it returns none."""
    caches = sorted({type(leaf).__name__ for leaf in tree_leaves(reference)
                     if type(leaf).__module__.startswith("transformers.cache_utils")})
    if not caches:
        return ""
    return (f" [the model returns a transformers cache ({', '.join(caches)}), which the exporters cannot write as an "
            "output: pass use_cache=False in the batch ({'input_ids': ..., 'use_cache': False}) or set "
            "model.config.use_cache = False]")


def _middle_cut(text: str, most: int = 1000) -> str:
    """``text`` on one line, at most ``most`` characters: where longer, its start and its end (where
    the library's own diagnosis of an onnxruntime failure is), the middle left out."""
    text = " ".join(text.split())
    if len(text) <= most:
        return text
    half = (most - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def _write(job: _Job, proto: onnx.ModelProto, used: str) -> tuple[dict[str, str], list[str], dict[str, Any]]:
    """Write ``proto`` to ``job.tmp_file`` with the parameters' names, if it has the opset and the
    dynamic axes asked for; its renamed and unnamed initializers and its stats."""
    renamed, unnamed = onnx_graph.restore_initializer_names(proto, job.state)
    stats = onnx_graph.graph_stats(proto)
    if job.opset is not None and stats["opset"] != job.opset:  # the dynamo exporter falls back to its own opset
        msg = (f"opset {job.opset} was asked for, but the {used} exporter could only write opset {stats['opset']} "
               f"(it cannot convert this graph to {job.opset}); ask for an opset it supports, or leave it out")
        raise ExportError(msg)
    if job.dynamic_shapes is not None:
        _check_requested_axes(job.dynamic_shapes, job.inputs, stats["inputs"], used)
    elif job.dynamic_batch:
        _check_batch_axis(stats["inputs"], job.inputs)
    onnx_graph.save(proto, job.tmp_file, os.path.basename(job.data_target) if job.use_external else None)
    return renamed, unnamed, stats


def _check(job: _Job, used: str, fallback_reason: str | None, tracer_warnings: list[str],
           graph_inputs: dict[str, list[int | str]]) -> _Checked:
    """Check the written file: onnx.checker, then onnxruntime against the folded model."""
    say, tmp_file, folded = job.say, job.tmp_file, job.folded
    check_start = time.perf_counter()
    say(f"checking {os.path.basename(job.target)} with onnx.checker")
    try:
        onnx.checker.check_model(tmp_file)
    except onnx.checker.ValidationError as exc:
        msg = f"the exported file fails onnx.checker: {one_line(exc)}"
        raise ExportError(msg) from exc
    job.timings["check"] = time.perf_counter() - check_start

    verify_start = time.perf_counter()
    session = _open_session(tmp_file, _low_precision(folded, job.inputs))
    tolerance = {"rtol": job.rtol, "atol": job.atol}
    try:
        diffs, sizes, notes, fixed_outputs = _verify(session, folded, job.sample_batch, job.inputs, job.reference,
                                                     graph_inputs, **tolerance, say=say,
                                                     batch_at_dim_0=job.dynamic_shapes is None)
    except ExportError as exc:
        # A trace that kept the sample's values also fails on grown batches (not on the sample itself,
        # whose path it follows): name that cause
        if used == "torchscript" and not getattr(exc, "on_sample", False):  # (other ExportErrors have none)
            _verify_other_values(session, folded, job.sample_batch, {}, [], **tolerance,
                                 tracer_warnings=tracer_warnings, fallback_reason=fallback_reason, say=say,
                                 blame_only=True)
        raise
    other_values_checked = False
    if used == "torchscript":
        other_values_checked = _verify_other_values(session, folded, job.sample_batch, diffs, notes, **tolerance,
                                                    tracer_warnings=tracer_warnings,
                                                    fallback_reason=fallback_reason, say=say)
    del session
    if absent := [name for name in job.inputs.names if name not in graph_inputs]:
        notes.append(f"input{'s' if len(absent) > 1 else ''} {', '.join(map(repr, absent))} not in the file: the "
                     f"{used} exporter leaves out an input the graph does not use; feed the file without it")
    declared = None
    if fixed_outputs:  # the values are right at every size: only the declaration is wrong
        for name, axes in onnx_graph.declare_dynamic_outputs(tmp_file, fixed_outputs).items():
            notes.append(f"output '{name}': the exporter declared {', '.join(axes)} of a fixed size, which "
                         "follow the dynamic axes (verified); declared dynamic in the file")
        declared = onnx_graph.output_shapes(tmp_file)
    job.timings["verify"] = time.perf_counter() - verify_start
    return _Checked(diffs, sizes, notes, other_values_checked, declared)


def _move_into_place(job: _Job, tmpdir: str, *, overwrite: bool) -> None:
    """Move the verified file (and its weights file) from ``tmpdir`` to the target: the weights
    first, so that a target file never points at weights that are not there."""
    target, data_target = job.target, job.data_target
    _refuse_existing(target, data_target if job.use_external else None, overwrite=overwrite)
    if job.use_external:
        os.replace(os.path.join(tmpdir, os.path.basename(data_target)), data_target)
    try:
        os.replace(job.tmp_file, target)
    except OSError:
        if job.use_external:
            os.remove(data_target)
        raise
    if not job.use_external and overwrite and os.path.isfile(data_target):
        os.remove(data_target)  # the replaced file's external weights: the new file holds its own


def _report(job: _Job, exported: _Exported) -> ExportReport:
    """The :class:`ExportReport` of a file moved into place."""
    checked, stats, external = exported.checked, exported.stats, job.use_external
    return ExportReport(
        path=job.target, exporter=exported.exporter, fallback_reason=exported.fallback_reason, opset=stats["opset"],
        inputs=stats["inputs"], outputs=checked.outputs or stats["outputs"], node_counts=stats["node_counts"],
        initializer_count=stats["initializer_count"], initializer_bytes=stats["initializer_bytes"],
        renamed_initializers=exported.renamed, unnamed_parameters=exported.unnamed,
        max_abs_diff={name: d[0] for name, d in checked.diffs.items()},
        max_rel_diff={name: d[1] for name, d in checked.diffs.items()},
        batch_sizes_checked=checked.sizes, file_size=os.path.getsize(job.target),
        external_data=job.data_target if external else None,
        external_data_size=os.path.getsize(job.data_target) if external else 0,
        rtol=job.rtol, atol=job.atol, timings=job.timings, notes=checked.notes,
        other_values_checked=checked.other_values_checked, tracer_warnings=exported.tracer_warnings,
    )


# -- arguments and inputs ----------------------------------------------------------------


def _silent(message: str) -> None:
    """The default ``progress``: say nothing."""


def _check_arguments(model: nn.Module, path: str | os.PathLike, exporter: str, rtol: float | None,
                     atol: float | None, overwrite: bool, external_data: bool | None) -> tuple[str, str]:
    if not isinstance(model, nn.Module):
        msg = f"export_onnx expects a torch.nn.Module, got {type(model).__name__}"
        raise TypeError(msg)
    if exporter not in _EXPORTERS:
        msg = f"exporter must be one of {', '.join(map(repr, _EXPORTERS))}, got {exporter!r}"
        raise ValueError(msg)
    if not all(tol is None or tol >= 0 for tol in (rtol, atol)):
        msg = f"rtol and atol must be >= 0 (or None for the model's dtype's defaults), got rtol={rtol!r}, atol={atol!r}"
        raise ValueError(msg)
    target = os.path.abspath(os.fspath(path))
    if os.fspath(path).endswith((os.sep, "/")):  # abspath drops it: "exports/" would become a file "exports"
        msg = f"{os.fspath(path)} names a folder (it ends with a separator); give the path of the .onnx file to write"
        raise IsADirectoryError(msg)
    if os.path.isdir(target):
        msg = f"{target} is a folder; give the path of the .onnx file to write"
        raise IsADirectoryError(msg)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        msg = f"the folder {folder} does not exist; create it first"
        raise FileNotFoundError(msg)
    if not os.access(folder, os.W_OK | os.X_OK):  # found before the export's work, not at its end
        msg = f"{target}: cannot write in {folder} (permission denied)"
        raise PermissionError(msg)
    data_target = target + ".data"
    _refuse_existing(target, data_target if external_data else None, overwrite=overwrite)
    return target, data_target


def _refuse_meta(model: nn.Module, sample_batch: batch_mod.SampleBatch) -> None:
    """An export writes the model's weights and compares the file's outputs with the model's on
    the batch: a parameter, buffer or batch tensor on the meta device has no values for either."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    meta = next((f"{'parameter' if isinstance(t, nn.Parameter) else 'buffer'} {name!r}"
                 for name, t in tensors if t.is_meta), None)
    meta = meta or next((f"the sample batch's {where}" for where, t in batch_mod.tensors_of(sample_batch) if t.is_meta), None)
    if meta is not None:
        msg = (f"{meta} is on the meta device, which holds no values, and an export writes the weights and checks "
               "the file's outputs against the model's: materialize the model (model.to_empty(device='cpu') and "
               "load its weights) and pass a batch of real tensors")
        raise ExportError(msg)


def _tolerances(model: nn.Module, reference: Any, rtol: float | None, atol: float | None) -> tuple[float, float]:
    """``(rtol, atol)``: the ones given, else :data:`DEFAULT_TOLERANCES` for the least precise
    floating dtype among the model's parameters and its outputs on the sample batch (a float16
    model rounds every layer to float16, even where it returns float32)."""
    if rtol is not None and atol is not None:
        return rtol, atol
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(_least_precise_float(model, reference),
                                                        DEFAULT_TOLERANCES[torch.float32])
    return (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)


def _least_precise_float(model: nn.Module, reference: Any) -> torch.dtype | None:
    """The floating dtype with the largest epsilon among the parameters and output tensors."""
    leaves = [*model.parameters(), *tree_leaves(reference)]
    dtypes = {leaf.dtype for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()}
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).eps, default=None)


def _refuse_existing(target: str, data_target: str | None, *, overwrite: bool) -> None:
    """An existing output is replaced only with ``overwrite``, and only if it is a regular file:
    never a device (``/dev/null``), a FIFO or a socket, which the final rename would replace."""
    for candidate in (target, data_target):
        if candidate is None or not os.path.lexists(candidate):
            continue
        if os.path.exists(candidate) and not os.path.isfile(candidate):
            msg = f"{candidate} exists and is not a regular file (a device, FIFO or socket); give another path"
            raise ExportError(msg)
        if not overwrite:
            msg = f"{candidate} already exists; pass overwrite=True to replace it"
            raise FileExistsError(msg)


def _layout_inputs(model: nn.Module, sample_batch: batch_mod.SampleBatch) -> _Inputs:
    """Order keyword inputs as the forward's signature does and name every tensor input.

    A top-level tensor is named after its argument (``mel``); a tensor inside a tuple, list
    or dict argument gets the path appended (``pair_0``, ``feats_energy``).
    """
    args, kwargs = batch_mod.as_args(sample_batch)
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        signature, bound = None, None
    varargs, var_keyword = None, None
    if signature is not None and bound is not None:
        bound = dict(bound)
        ordered = {}
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                ordered.update(bound.get(name, {}))
            elif name in kwargs:
                ordered[name] = kwargs[name]
        kwargs = ordered
        named = []
        for name, param in signature.parameters.items():
            if name not in bound:
                continue
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                named += [(f"{name}_{i}", value) for i, value in enumerate(bound[name])]
                varargs = name
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                named += list(bound[name].items())
                var_keyword = name
            else:
                named.append((name, bound[name]))
    else:
        named = [(f"input_{i}", value) for i, value in enumerate(args)] + list(kwargs.items())
    names, tensors = [], []
    top_level = {base for base, value in named if isinstance(value, torch.Tensor)}
    for base, value in named:
        for key_path, leaf in _leaves_with_paths(value):
            if isinstance(leaf, torch.Tensor):
                names.append(_input_name(base, [_key_str(k) for k in key_path], top_level, names))
                tensors.append(leaf)
    return _Inputs(args, kwargs, names, tensors, bound, varargs, var_keyword)


def _input_name(base: str, parts: list[str], top_level: set[str], taken: list[str]) -> str:
    """The name of a tensor input: ``base`` for a top-level tensor, else ``base`` and its path joined
    by ``_`` (``pair_0``), with ``_in`` appended until it is no top-level tensor's name and no earlier
    input's: a ``forward(x, x_0)`` whose ``x`` is a pair would otherwise give two inputs ``x_0``, which
    the dynamo exporter refuses and onnxruntime cannot be fed.  Top-level names stay as they are:
    ``dynamic_shapes`` and the file's users know the inputs by them."""
    name = "_".join([base, *parts])
    while parts and (name in top_level or name in taken):
        name += "_in"
    return name


def _leaves_with_paths(value: Any) -> list[tuple[tuple, Any]]:
    """``tree_flatten_with_path(value)[0]``, also for a pytree class registered without key paths
    (diffusers registers every ``BaseOutput`` with a flatten function alone, on which torch 2.13
    raises): a mapping by its keys, a sequence by its indices, anything else by the position of
    its leaves, in ``tree_leaves`` order."""
    try:
        return tree_flatten_with_path(value)[0]
    except ValueError:
        pass
    if isinstance(value, Mapping):
        children = [(MappingKey(key), child) for key, child in value.items()]
    elif isinstance(value, (tuple, list)):
        children = [(SequenceKey(i), child) for i, child in enumerate(value)]
    else:
        return [((SequenceKey(i),), leaf) for i, leaf in enumerate(tree_leaves(value))]
    return [((key, *path), leaf) for key, child in children for path, leaf in _leaves_with_paths(child)]


def _key_str(key: Any) -> str:
    for attr in ("idx", "key", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _output_names(outputs: Any, input_names: list[str]) -> list[str]:
    """``output`` for a lone tensor; ``output_0``, ``output_1.0`` for sequences; dict keys as is.  A Python
    number beside the tensors (``x.shape[0]``) is an output too (:func:`_output_tensors`)."""
    names = []
    for key_path, leaf in _leaves_with_paths(outputs):
        if not isinstance(leaf, (torch.Tensor, *_NUMBERS)):
            continue
        parts = [_key_str(k) for k in key_path]
        if not parts:
            name = "output"
        elif isinstance(getattr(key_path[0], "idx", None), int):
            name = "output_" + ".".join(parts)
        else:
            name = ".".join(parts)
        while name in input_names or name in names:
            name += "_out"
        names.append(name)
    return names


#: Python values a forward may return beside its tensors that the exporters write as 0-d outputs (a
#: length read off a dynamic axis, ``x.shape[1]``).
_NUMBERS = (bool, int, float)


def _output_leaves(outputs: Any) -> list[torch.Tensor | bool | int | float]:
    """The leaves of a forward's outputs that the file has as outputs, in its order: tensors and
    Python numbers."""
    return [leaf for leaf in tree_leaves(outputs) if isinstance(leaf, (torch.Tensor, *_NUMBERS))]


def _output_tensors(outputs: Any) -> list[torch.Tensor]:
    """The outputs the file has, in its order: each tensor, and each Python number (``x.shape[0]``)
    as the 0-d tensor the exporters write it as (an int as int64, a bool as bool)."""
    return [leaf if isinstance(leaf, torch.Tensor) else torch.tensor(leaf) for leaf in _output_leaves(outputs)]


def _batch_axes(inputs: _Inputs) -> dict[str, dict[int, str]]:
    """``{input: {0: axis name}}`` for every tensor input of 1 or more dims.

    Inputs whose dim 0 is the batch size (:func:`_batch_size`) share the name ``batch``; others get
    their own, except a dim 0 of size 1 beside a larger batch: a row broadcast against it, kept
    static (an exporter would tie it to the batch, which it broadcasts against).
    """
    axes = {}
    batch = _batch_size(inputs.tensors, inputs.output_rows)
    for name, tensor in zip(inputs.names, inputs.tensors):
        if tensor.dim() > 0 and not (tensor.shape[0] == 1 != batch):
            axes[name] = {0: "batch" if tensor.shape[0] == batch else f"{name}_dim0"}
    return axes


def _batch_size(tensors: list[torch.Tensor], output_rows: int | None = None) -> int | None:
    """The batch size of the sample: the most common dim 0 above 1 among the tensor inputs of 2 or more
    dims (the first input's on a tie), 1 where each of those is 1 (``forward(text [1, T], lengths [1],
    scales [3])``, ``forward(image [1, 3, H, W], mean [3], std [3])``: a batch of one beside tables);
    among 1-D inputs where there are no others; None without an input of 1 or more dims.  Not simply
    the first input's: a row broadcast against the batch (``forward(row [1, D], x)``) may come first.
    Where those say 1 and a 1-D input is longer, ``output_rows`` (dim 0 of the model's first output on
    the sample) tells a row broadcast against a 1-D batch (``forward(row [1, D], t [6])`` returns 6
    rows) from tables beside a batch of one (the image's output has 1)."""
    sizes = [t.shape[0] for t in tensors if t.dim() > 1] or [t.shape[0] for t in tensors if t.dim() > 0]
    if any(size > 1 for size in sizes):
        return _most_common_above_1(sizes)
    if output_rows is not None and output_rows > 1 and any(t.dim() == 1 and t.shape[0] == output_rows for t in tensors):
        return output_rows
    return sizes[0] if sizes else None


def _most_common_above_1(sizes: list[int]) -> int:
    """The most common of ``sizes`` above 1, the first on a tie."""
    return collections.Counter(size for size in sizes if size > 1).most_common(1)[0][0]


def _dynamo_batch_shapes(inputs: _Inputs, axes: dict[str, dict[int, str]]) -> tuple | dict:
    """``dynamic_shapes`` for ``torch.export`` mirroring the inputs, axis names as strings.

    ``torch.onnx.export`` turns a string into ``torch.export.Dim.DYNAMIC`` and names the
    ONNX axis after it.
    """
    names = iter(inputs.names)

    def spec(leaf: Any) -> dict[int, str] | None:
        if not isinstance(leaf, torch.Tensor):
            return None
        return axes.get(next(names))

    if not inputs.kwargs and not inputs.varargs:
        return tuple(tree_map(spec, inputs.args))
    if inputs.bound is None:
        msg = "keyword inputs to a forward without a signature need an explicit dynamic_shapes"
        raise ExportError(msg)
    # torch.export keys a dict of dynamic shapes by signature.bind(*args, **kwargs).arguments (a
    # forward(self, *inputs): one entry, a tuple over them)
    return {name: tree_map(spec, value) for name, value in inputs.bound.items()}


def _named_specs(dynamic_shapes: Any, inputs: _Inputs) -> list[tuple[str, Any]]:
    """``(input name, its spec)`` for each entry of ``torch.export`` dynamic shapes: a tuple's entries
    named after the parameters they bind to, a var-keyword parameter's dict opened into its inputs."""
    if isinstance(dynamic_shapes, Mapping):
        items = list(dynamic_shapes.items())
    else:  # one entry per positional input, named after the parameter it binds to
        params = list(inputs.bound) if inputs.bound is not None else [f"input_{i}" for i in range(len(inputs.args))]
        items = list(zip(params, dynamic_shapes))
    # a var-keyword parameter (forward(self, **inputs)) holds its keyword inputs, each a top-level input
    # (not a dict input's entries, whose keys may repeat a top-level input's name); a var-positional one
    # (forward(self, *xs)) a tuple over its inputs, named xs_0, xs_1 as _layout_inputs names them
    return [pair for name, spec in items for pair in (
        spec.items() if name == inputs.var_keyword and _keyed_by_name(spec) else
        [(f"{name}_{i}", part) for i, part in enumerate(spec)]
        if name == inputs.varargs and isinstance(spec, (tuple, list)) else [(name, spec)])]


def _positional_entries(inputs: _Inputs) -> int:
    """How many entries a tuple of dynamic shapes has: one per positional input, where the forward's
    ``*args`` parameter takes one for all of its inputs (``torch.export`` binds them to it)."""
    if inputs.varargs is None or inputs.bound is None:
        return len(inputs.args)
    return list(inputs.bound).index(inputs.varargs) + 1


def _prepared_dynamic_shapes(dynamic_shapes: Any, inputs: _Inputs) -> Any:
    """``dynamic_shapes`` checked and in the one form both exporters read alike: a ``*args``
    parameter's inputs under its name (:func:`_regrouped_varargs`), every axis numbered from 0
    (:func:`_nonnegative_axes`: torch 2.13's dynamo exporter ignores a negative axis, and its
    TorchScript exporter aborts the process on one), every axis name an identifier given to axes
    of one size (:func:`_check_axis_names`)."""
    dynamic_shapes = _regrouped_varargs(dynamic_shapes, inputs)
    _check_dynamic_shapes(dynamic_shapes, inputs)
    dynamic_shapes = _map_tensor_specs(dynamic_shapes, inputs, _nonnegative_axes)
    _check_axis_names(dynamic_shapes, inputs)
    return dynamic_shapes


def _regrouped_varargs(dynamic_shapes: Any, inputs: _Inputs) -> Any:
    """For a ``forward(self, *xs)``, a tuple of dynamic shapes with one entry per input (as for any
    other forward) regrouped into ``torch.export``'s form, where ``xs`` takes one entry, a tuple over
    its inputs.  One given in that form already is returned as it is (with a single input, a tuple of
    one spec in ``xs``'s place is that form)."""
    if inputs.varargs is None or inputs.bound is None or not isinstance(dynamic_shapes, (tuple, list)):
        return dynamic_shapes
    at, count = _positional_entries(inputs) - 1, len(inputs.bound[inputs.varargs])
    specs = list(dynamic_shapes)
    if len(specs) != at + count or (count == 1 and _varargs_form(specs[at], count)):
        return dynamic_shapes
    return (*specs[:at], tuple(specs[at:]))


def _varargs_form(entry: Any, count: int) -> bool:
    """Whether a dynamic-shapes entry in a ``*xs`` parameter's place is a tuple over its ``count``
    inputs (each None or a spec), not one tensor's spec (a dict of axes, or a list of one entry per axis)."""
    return isinstance(entry, (tuple, list)) and len(entry) == count and all(
        part is None or isinstance(part, (Mapping, tuple, list)) for part in entry)


def _map_tensor_specs(dynamic_shapes: Any, inputs: _Inputs, change: Callable[[str, torch.Tensor, Any], Any]) -> Any:
    """``dynamic_shapes`` rebuilt with ``change(input name, tensor, spec)`` in place of each tensor
    input's spec (a dict or list of its axes), nested ones included (a tuple input's parts, a dict
    input's entries), each named as :func:`_layout_inputs` names it; a spec that sits on no tensor of
    the batch (None, or one torch.export will refuse) is kept as it is."""
    bound = inputs.bound if inputs.bound is not None else {
        **{f"input_{i}": value for i, value in enumerate(inputs.args)}, **inputs.kwargs}
    named: dict[int, str] = {}  # (x_0_in beside a top-level x_0; one tensor given twice: its first name)
    for name, tensor in zip(inputs.names, inputs.tensors):
        named.setdefault(id(tensor), name)

    def as_named(name: str, tensor: torch.Tensor, spec: Any) -> Any:  # change, under the file's name
        return change(named.get(id(tensor), name), tensor, spec)

    if isinstance(dynamic_shapes, Mapping):
        return {key: _map_spec(spec, bound.get(key), str(key), as_named, by_key=key == inputs.var_keyword)
                for key, spec in dynamic_shapes.items()}
    specs = [_map_spec(spec, value, name, as_named) for spec, (name, value) in zip(dynamic_shapes, bound.items())]
    return tuple(specs) if isinstance(dynamic_shapes, tuple) else specs


def _map_spec(spec: Any, value: Any, name: str, change: Callable[[str, torch.Tensor, Any], Any], *,
              by_key: bool = False) -> Any:
    """:func:`_map_tensor_specs` of one input ``value`` called ``name``; ``by_key``: the entries of a
    ``**kwargs`` parameter, named by their keys alone."""
    if isinstance(value, torch.Tensor):
        return change(name, value, spec) if isinstance(spec, (Mapping, tuple, list)) else spec
    if isinstance(value, (tuple, list)) and isinstance(spec, (tuple, list)) and len(spec) == len(value):
        parts = [_map_spec(part, item, f"{name}_{i}", change) for i, (part, item) in enumerate(zip(spec, value))]
        return tuple(parts) if isinstance(spec, tuple) else parts
    if isinstance(value, Mapping) and isinstance(spec, Mapping):
        return {key: _map_spec(part, value.get(key), str(key) if by_key else f"{name}_{key}", change)
                for key, part in spec.items()}
    return spec


def _nonnegative_axes(name: str, tensor: torch.Tensor, spec: Any) -> Any:
    """A tensor's spec with each negative axis numbered from 0 (``-1`` of a 3-D input is ``2``); an
    axis given twice, once from each end, is refused."""
    if not isinstance(spec, Mapping):
        return spec
    axes: dict[Any, Any] = {}
    for axis, dim in spec.items():
        if isinstance(axis, int) and not isinstance(axis, bool) and -tensor.dim() <= axis < 0:
            if axis + tensor.dim() in spec:
                msg = (f"dynamic_shapes gives axis {axis + tensor.dim()} of input '{name}' twice, as "
                       f"{axis + tensor.dim()} and as {axis}: give each axis once")
                raise ValueError(msg)
            axis += tensor.dim()
        axes[axis] = dim
    return axes


def _check_axis_names(dynamic_shapes: Any, inputs: _Inputs) -> None:
    """Refuse an axis name that is not a Python identifier (``"batch-size"``, ``"time.steps"``: the
    file's dims are read back as expressions of names, ``2*T``, so it would be read as
    ``batch - size``), and one name given to axes of different sizes in the sample batch (the file
    would declare them one dim, and the verification could only grow them together)."""
    axes: list[tuple[str, str, int, int]] = []

    def collect(name: str, tensor: torch.Tensor, spec: Any) -> Any:
        for axis, dim in (spec.items() if isinstance(spec, Mapping) else enumerate(spec)):
            if isinstance(dim, str) and not dim.isidentifier():
                msg = (f"dynamic_shapes names axis {axis} of input '{name}' {dim!r}, which is not a Python identifier "
                       f"(letters, digits and '_', not starting with a digit): the file's dims are read as "
                       f"expressions of names ('2*T'); use e.g. {_identifier(dim)!r}")
                raise ValueError(msg)
            label = dim if isinstance(dim, str) else _root_dim_name(dim)
            if label is not None and isinstance(axis, int) and 0 <= axis < tensor.dim():
                axes.append((label, name, axis, tensor.shape[axis]))
        return spec

    _map_tensor_specs(dynamic_shapes, inputs, collect)
    if (conflict := size_conflict(axes)) is not None:
        (label, first, first_axis, first_size), (_, other, axis, size) = conflict
        msg = (f"dynamic_shapes names axis {first_axis} of input '{first}' ({first_size} in the sample batch) and "
               f"axis {axis} of input '{other}' ({size}) both {label!r}, which declares them one length: give them "
               f"different names (e.g. {label}_{other!s}), or a sample batch where they are equal")
        raise ValueError(msg)


def size_conflict(axes: list[tuple[str, str, int, int]],
                  ) -> tuple[tuple[str, str, int, int], tuple[str, str, int, int]] | None:
    """The first two of ``(axis name, input, axis, size in the sample)`` that give one name to
    different sizes, or None.  (Shared with the command line's ``--dynamic``.)"""
    first: dict[str, tuple[str, str, int, int]] = {}
    for entry in axes:
        seen = first.setdefault(entry[0], entry)
        if seen[3] != entry[3]:
            return seen, entry
    return None


def _root_dim_name(dim: Any) -> str | None:
    """The name of a ``torch.export.Dim`` of its own (``Dim("T")``), which stands for one size;
    None for anything else (a derived ``2*T``, ``Dim.AUTO``, a static axis)."""
    if isinstance(dim, torch.export.Dim) and not hasattr(dim, "root"):
        return dim.__name__
    return None


def _identifier(name: str) -> str:
    """``name`` made an identifier, for an error's example: other characters as ``_``."""
    fixed = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return fixed if fixed.isidentifier() else f"d_{fixed}"


def _check_dynamic_shapes(dynamic_shapes: Any, inputs: _Inputs) -> None:
    """Refuse what no exporter should be left to guess at: a tuple of another length than the
    positional inputs, an axis the input lacks, a dim that is neither a name, a ``torch.export.Dim``
    nor None/an int (static), a ``Dim`` whose range leaves out the sample's size.  (``torch.export``
    refuses these too, and ``"auto"`` would then take the TorchScript exporter, which ignores them.)"""
    if not isinstance(dynamic_shapes, (Mapping, tuple, list)):
        msg = f"dynamic_shapes must be a tuple, list or dict mirroring the inputs, got {type(dynamic_shapes).__name__}"
        raise ValueError(msg)
    entries = _positional_entries(inputs)
    if not isinstance(dynamic_shapes, Mapping) and not inputs.kwargs and len(dynamic_shapes) != entries:
        varargs = (f", or one for *{inputs.varargs} (a tuple over its {len(inputs.args) - entries + 1} inputs), as "
                   "torch.export takes it" if inputs.varargs is not None and inputs.bound is not None else "")
        msg = (f"dynamic_shapes has {len(dynamic_shapes)} entries for {len(inputs.args)} positional inputs "
               f"({', '.join(inputs.names)}): give one per input (None for one with no dynamic axis){varargs}")
        raise ValueError(msg)
    if isinstance(dynamic_shapes, Mapping) and inputs.bound is not None:
        _check_spec_keys(dynamic_shapes, inputs)
    tensors = dict(zip(inputs.names, inputs.tensors))
    for name, spec in _named_specs(dynamic_shapes, inputs):
        if name not in tensors or not isinstance(spec, (Mapping, tuple, list)):
            continue  # a nested input's spec, or None: torch.export's to check
        if not isinstance(spec, Mapping) and len(spec) != tensors[name].dim():  # torch.onnx's dynamic_axes list: [0, 2]
            msg = (f"dynamic_shapes gives input '{name}' ({tensors[name].dim()} axes) the list {list(spec)!r}: a list has "
                   f"one entry per axis (a name or Dim for a dynamic one, None for a static one); to name axes by "
                   f"number give a dict, e.g. {{0: 'batch', 2: 'time'}}")
            raise ValueError(msg)
        for axis, dim in (spec.items() if isinstance(spec, Mapping) else enumerate(spec)):
            if not isinstance(axis, int) or not -tensors[name].dim() <= axis < tensors[name].dim():
                msg = f"dynamic_shapes names axis {axis!r} of input '{name}', which has {tensors[name].dim()} axes"
                raise ValueError(msg)
            if isinstance(dim, int) and not isinstance(dim, bool) and dim != tensors[name].shape[axis]:
                msg = (f"dynamic_shapes gives axis {axis} of input '{name}' the static size {dim}, but it is "
                       f"{tensors[name].shape[axis]} in the sample batch (to make the axis dynamic, give it a name)")
                raise ValueError(msg)
            static_or_named = dim is None or (isinstance(dim, (int, str)) and not isinstance(dim, bool))
            if static_or_named or (_DIM_AUTO is not None and isinstance(dim, type(_DIM_AUTO))):  # a name, or Dim.AUTO/DYNAMIC/STATIC
                continue
            if not isinstance(dim, torch.export.Dim):
                msg = (f"dynamic_shapes gives axis {axis} of input '{name}' as {dim!r}: give a name (str), a "
                       f"torch.export.Dim, or None / an int for a static axis")
                raise ValueError(msg)
            size = tensors[name].shape[axis]
            if not dim.min <= size <= dim.max:
                msg = (f"dynamic_shapes: axis {axis} of input '{name}' is {size} in the sample batch, outside the "
                       f"range [{dim.min}, {dim.max}] of Dim('{dim.__name__}')")
                raise ValueError(msg)


def _check_spec_keys(dynamic_shapes: Mapping, inputs: _Inputs) -> None:
    """A dict of dynamic shapes has one entry per argument the batch gives the forward, as
    ``torch.export`` binds it (None for one with no dynamic axis); an input left out would be
    exported with every axis static."""
    given = set(inputs.bound)
    unknown = sorted(str(key) for key in dynamic_shapes if key not in given)
    missing = sorted(name for name in given if name not in dynamic_shapes)
    if unknown:
        msg = (f"dynamic_shapes names {', '.join(map(repr, unknown))}, which the sample batch does not give the "
               f"forward (its inputs: {', '.join(inputs.bound)})")
        raise ValueError(msg)
    if missing:
        msg = (f"dynamic_shapes has no entry for {', '.join(map(repr, missing))}: give one per input of the "
               f"forward (None for an input with no dynamic axis)")
        raise ValueError(msg)


def _dynamic_axes_from_shapes(dynamic_shapes: Any, inputs: _Inputs, *, required: bool = False,
                              ) -> dict[str, dict[int, str]]:
    """Translate ``torch.export`` dynamic shapes of top-level tensor inputs to ``dynamic_axes``.
    ``required``: leave out ``Dim.AUTO`` axes (dynamic only where the model allows)."""
    axes: dict[str, dict[int, str]] = {}
    for name, spec in _named_specs(dynamic_shapes, inputs):
        if spec is None:
            continue
        if name not in inputs.names:
            msg = (f"cannot translate dynamic_shapes for '{name}' to the TorchScript exporter's dynamic_axes: "
                   f"only top-level tensor inputs are supported ({inputs.names})")
            raise ExportError(msg)
        pairs = spec.items() if isinstance(spec, Mapping) else enumerate(spec)
        for axis, dim in pairs:
            label = _axis_label(dim, name, axis)
            if label is not None and not (required and dim is _DIM_AUTO):
                axes.setdefault(name, {})[axis] = label
    return axes


def _keyed_by_name(spec: Any) -> bool:
    """Whether a dynamic-shapes entry maps input names to their specs (not axes to dims)."""
    return isinstance(spec, Mapping) and bool(spec) and all(isinstance(key, str) for key in spec)


_DIM_AUTO = getattr(torch.export.Dim, "AUTO", None)


def _check_requested_axes(dynamic_shapes: Any, inputs: _Inputs, graph_inputs: dict[str, list[int | str]],
                          exporter: str) -> None:
    """Raise when an axis ``dynamic_shapes`` asks to be dynamic came out of the exporter fixed."""
    try:
        requested = _dynamic_axes_from_shapes(dynamic_shapes, inputs, required=True)
    except ExportError:  # nested inputs: not checked here (the verification still grows what is dynamic)
        return
    for name, axes in requested.items():
        shape = graph_inputs.get(name)
        for axis in axes:
            if shape is not None and axis < len(shape) and not isinstance(shape[axis], str):
                msg = (f"dynamic_shapes asks for axis {axis} of input '{name}' to be dynamic, but the {exporter} "
                       f"exporter fixed it to {shape[axis]} (the model computes with that size in Python, or the "
                       f"exporter specialized it); make the model's shape arithmetic traceable, or leave that axis static")
                raise ExportError(msg)


def _axis_label(dim: Any, name: str, axis: int) -> str | None:
    if dim is None or isinstance(dim, int):
        return None
    if isinstance(dim, str):
        return dim
    if dim == getattr(torch.export.Dim, "STATIC", None):
        return None
    label = getattr(dim, "__name__", None)
    return label if isinstance(label, str) and label else f"{name}_dim{axis}"


# -- export --------------------------------------------------------------------------------


_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a write failed for want of room: the disk, a quota, a file-size limit


def _export(model: nn.Module, inputs: _Inputs, output_names: list[str], tmpdir: str, *, opset: int | None,
            dynamic_batch: bool, dynamic_shapes: Any, exporter: Exporter, say: Progress,
            ) -> tuple[onnx.ModelProto, str, str | None, list[str]]:
    """Export with the chosen exporter(s); return the model, the exporter used, the fallback
    reason and the TorchScript tracer's warnings (:func:`_recorded_tracer_warnings`)."""
    fallback_reason = None
    if exporter in ("auto", "dynamo"):
        say("exporting with the dynamo exporter (torch.export)")
        try:
            proto = _export_dynamo(model, inputs, output_names, opset, dynamic_batch, dynamic_shapes,
                                   echo_failure=exporter == "dynamo")
            return proto, "dynamo", None, []
        except Exception as exc:  # the dynamo exporter raises many kinds; any of them means "fall back"
            fallback_reason = one_line(exc)
            if exporter == "dynamo":
                msg = f"the dynamo exporter failed: {fallback_reason}"
                raise ExportError(msg) from exc
            say(f"dynamo exporter failed ({fallback_reason}); falling back to the TorchScript exporter")
    if exporter == "torchscript":
        say("exporting with the TorchScript exporter")
    try:
        proto, tracer_warnings = _export_torchscript(model, inputs, output_names, tmpdir, opset, dynamic_batch,
                                                     dynamic_shapes)
    except Exception as exc:  # idem: the TorchScript exporter raises many kinds
        if isinstance(exc, OSError) and exc.errno in _FULL:  # its file did not fit (a full disk): not the model's fault
            raise
        msg = f"the TorchScript exporter failed: {one_line(exc)}"
        if fallback_reason is not None:
            msg = f"both exporters failed; dynamo: {fallback_reason}; TorchScript: {one_line(exc)}"
        if quantized := quantized_layers(model):
            msg += (f" [the model holds layers of PyTorch's quantization ({few(quantized, 3)}), whose packed ops "
                    "these exporters may not take: export the float model, then quantize the ONNX file with "
                    "onnxruntime.quantization (quantize_dynamic, quantize_static)]")
        raise ExportError(msg) from exc
    return proto, "torchscript", fallback_reason, tracer_warnings


def _export_args(inputs: _Inputs) -> tuple:
    """Positional args as the exporters want them: a trailing dict would be read as kwargs."""
    args = tuple(inputs.args)
    if args and isinstance(args[-1], dict):
        args = (*args, {})
    return args


@contextlib.contextmanager
def _held_output(echo_failure: bool) -> Iterator[None]:
    """Hold back what an exporter prints, and pass it on only if the export succeeds.

    A failed capture prints its partial graph (torch.export to stderr, the TorchScript exporter
    to stdout); the report and the error sum the failure up instead, unless ``echo_failure``.
    """
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    except Exception:
        if echo_failure:
            sys.stdout.write(out.getvalue())
            sys.stderr.write(err.getvalue())
        raise
    sys.stdout.write(out.getvalue())
    sys.stderr.write(err.getvalue())


@contextlib.contextmanager
def _held_native_stdout() -> Iterator[None]:
    """Hold back what native code writes to file descriptor 1 (the TorchScript exporter logs its
    whole IR graph there when it fails, through C++: out of ``sys.stdout``'s reach); pass it on
    only if the block succeeds."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        held.seek(0)
        sys.stdout.write(held.read().decode(errors="replace"))


# torch's registry of ONNX functions logs, at WARNING, each torchvision op it skips when torchvision
# is not installed (on every process's first export): noise about torch's tables, not the model
_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"
# ... and, for an opset below the exporter's own, a warning that it will convert the file, then a
# traceback of the converter's failure: the export reports the opset it got (and "auto" falls back);
# and onnxscript's optimizer warns of each constant it could not fold ("Evaluation failed: ..."),
# leaving that node as it was
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._compat", "onnxscript.version_converter", "onnxscript.optimizer")


def _export_dynamo(model: nn.Module, inputs: _Inputs, output_names: list[str], opset: int | None,
                   dynamic_batch: bool, dynamic_shapes: Any, *, echo_failure: bool) -> onnx.ModelProto:
    args, kwargs = _export_args(inputs), inputs.kwargs or None
    if dynamic_shapes is None and dynamic_batch:
        axes = _batch_axes(inputs)
        dynamic_shapes = _dynamo_batch_shapes(inputs, axes) if axes else None
    if dynamic_shapes is not None and (inputs.var_keyword is not None or _other_values_given(inputs)):
        # torch.export takes no dynamic shapes for inputs a **kwargs collects (torch 2.13: "Must provide a
        # tree_name"), and drops the axis names beside a flag (return_dict=False: axes named s17): the
        # tensors go in flat, positionally, and the other values stay in the forward
        flat = _flat_shapes(dynamic_shapes, inputs)
        if flat is not None:
            model, args, kwargs, dynamic_shapes = _tensors_only(model, inputs), tuple(inputs.tensors), None, flat
    with _held_output(echo_failure), muted(_REGISTRY_LOGGER, *_NOISY_LOGGERS), warnings.catch_warnings(), torch.no_grad():
        # torch-internal noise: the same axis name given to inputs torch.export unified, and a
        # deprecation inside torch's own pytree code
        warnings.filterwarnings("ignore", r"# The axis name: (\S+) will not be used.* another axis: \1\.$",
                                UserWarning)
        warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
        # ... and two about torch's own code: RNN modules' _flat_weights cache, and a deprecated
        # helper in the graphs torch.export writes
        warnings.filterwarnings("ignore", r"The tensor attributes .* were assigned during export", UserWarning)
        warnings.filterwarnings("ignore", r"_check_is_size will be removed", FutureWarning)
        program = torch.onnx.export(
            model, args, kwargs=kwargs, dynamo=True, opset_version=opset,
            dynamic_shapes=dynamic_shapes, input_names=inputs.names, output_names=output_names,
            optimize=True, verbose=False,
        )
    if program is None:
        msg = "torch.onnx.export(dynamo=True) returned no ONNXProgram"
        raise ExportError(msg)
    return program.model_proto


def _flat_shapes(dynamic_shapes: Any, inputs: _Inputs) -> tuple | None:
    """``dynamic_shapes`` for the forward of :func:`_tensors_only` (one entry, a tuple over the
    batch's tensors in input order), or None where a spec is for no top-level tensor input (a
    tuple input's parts, given whole)."""
    specs = {}
    for name, spec in _named_specs(dynamic_shapes, inputs):
        if spec is None:
            continue
        if name not in inputs.names:
            return None
        specs[name] = spec
    return (tuple(specs.get(name) for name in inputs.names),)


def _other_values_given(inputs: _Inputs) -> bool:
    """Whether the batch gives the forward a value other than a tensor (a flag, a number, a string)."""
    return any(not isinstance(leaf, torch.Tensor) for leaf in tree_leaves((inputs.args, inputs.kwargs)))


def _export_torchscript(model: nn.Module, inputs: _Inputs, output_names: list[str], tmpdir: str,
                        opset: int | None, dynamic_batch: bool, dynamic_shapes: Any,
                        ) -> tuple[onnx.ModelProto, list[str]]:
    """Export with the TorchScript exporter; return the model and the tracer's warnings."""
    if dynamic_shapes is not None:
        dynamic_axes = _dynamic_axes_from_shapes(dynamic_shapes, inputs)
    else:
        dynamic_axes = _batch_axes(inputs) if dynamic_batch else {}
    # The TorchScript exporter writes a file (and, above 2 GB, one file per weight): use a
    # folder of its own inside the temporary folder, then read it all back.
    raw_dir = tempfile.mkdtemp(prefix="torchscript", dir=tmpdir)
    raw_file = os.path.join(raw_dir, "model.onnx")
    with _held_native_stdout(), _held_output(echo_failure=False), _recorded_tracer_warnings() as tracer_warnings, \
            torch.no_grad(), _attention_fast_path_off():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            _tensors_only(model, inputs), tuple(inputs.tensors), raw_file, dynamo=False,
            opset_version=opset, input_names=inputs.names, output_names=output_names,
            dynamic_axes=dynamic_axes or None,
        )
    proto = onnx.load(raw_file)
    shutil.rmtree(raw_dir, ignore_errors=True)
    return proto, tracer_warnings


@contextlib.contextmanager
def _attention_fast_path_off() -> Iterator[None]:
    """Without autograd, ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` in eval mode run
    fused kernels (``aten::_native_multi_head_attention``, ``aten::_transformer_encoder_layer_fwd``)
    that the TorchScript exporter cannot convert; with torch's switch off they run their ops, the
    same function."""
    switch = torch.backends.mha
    enabled = switch.get_fastpath_enabled()
    switch.set_fastpath_enabled(False)
    try:
        yield
    finally:
        switch.set_fastpath_enabled(enabled)


@contextlib.contextmanager
def _recorded_tracer_warnings() -> Iterator[list[str]]:
    """Record the TracerWarnings raised in the block, once each, as ``"<first sentence>" at
    file.py:LINE``; every other warning is shown as it would have been.

    The tracer warns where the model's Python code reads a tensor's value (iterates over it,
    converts it to a Python number or bool): the trace keeps the value the sample batch gave.
    Those warnings are recorded even where the caller ignores TracerWarnings, since the export
    quotes them (:func:`_tracer_note`, :func:`_value_dependence_error`); torch's own modules
    stay ignored, as torch itself ignores them (``TracerWarning.ignore_lib_warnings``).  The
    hook is ``warnings.showwarning``, called after the filters: other warnings keep the
    caller's filters (by module too) and reach the caller's ``showwarning``.
    """
    recorded: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always", torch.jit.TracerWarning)
        torch.jit.TracerWarning.ignore_lib_warnings()
        show = warnings.showwarning

        def record(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   file: Any = None, line: str | None = None) -> None:
            if not issubclass(category, torch.jit.TracerWarning):
                show(message, category, filename, lineno, file, line)
                return
            described = _describe_warning(message, filename, lineno)
            if described not in recorded:
                recorded.append(described)

        warnings.showwarning = record
        yield recorded


def _describe_warning(message: Warning | str, filename: str, lineno: int) -> str:
    """``"<the message's first sentence>" at <file name>:<line>``."""
    sentence = str(message).strip().split(". ")[0].rstrip(".")
    return f'"{sentence}" at {os.path.basename(filename)}:{lineno}'


def _tensors_only(model: nn.Module, inputs: _Inputs) -> nn.Module:
    """A shallow copy of ``model`` whose forward takes the batch's tensors, flat, in input order.

    The TorchScript exporter reads keyword inputs against the signature, fills in defaults
    and turns Python numbers among them into graph inputs; called with nothing but tensors,
    its graph inputs are exactly ``inputs.names``.  The copy shares the model's submodules and
    parameters (same names) and rebuilds the original ``(args, kwargs)``, non-tensor values
    included, before calling the model's own forward.  The copy is of the model's own class, its
    flat forward set on the instance: a subclass would run the class's ``__init_subclass__`` (a
    registry of model classes by name would get the copy's class in place of the user's).
    """
    leaves, spec = tree_flatten((inputs.args, inputs.kwargs))
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    base = type(model)
    own = model.__dict__.get("forward")  # a forward set on the instance (accelerate's hooks): the one that runs

    def forward(self: nn.Module, *tensors: torch.Tensor) -> Any:
        filled = list(leaves)
        for position, tensor in zip(positions, tensors):
            filled[position] = tensor
        args, kwargs = tree_unflatten(filled, spec)
        return own(*args, **kwargs) if own is not None else base.forward(self, *args, **kwargs)

    flat = base.__new__(base)  # not copy.copy: parametrized classes refuse pickling
    flat.__dict__.update(model.__dict__)
    flat.__dict__["forward"] = types.MethodType(forward, flat)  # found before the class's forward
    return flat


# -- checking ------------------------------------------------------------------------------


def _check_batch_axis(graph_inputs: dict[str, list[int | str]], inputs: _Inputs) -> None:
    """Raise when an input's dim 0 that :func:`_batch_axes` made dynamic came out of the exporter fixed."""
    requested = _batch_axes(inputs)
    for name in inputs.names:
        shape = graph_inputs.get(name)
        if name in requested and shape and not isinstance(shape[0], str):
            msg = f"the batch axis of input '{name}' was exported with a fixed size {shape[0]}, not a dynamic one"
            raise ExportError(msg)


def _low_precision(model: nn.Module, inputs: _Inputs) -> str:
    """The dtypes other than float32 the model's parameters or inputs hold (``"bfloat16"``), for
    which onnxruntime's CPU provider lacks kernels (bfloat16 ``MatMul``, float64 ``Conv``), if any."""
    dtypes = {t.dtype for t in (*model.parameters(), *inputs.tensors)} & {torch.bfloat16, torch.float16, torch.float64}
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def _open_session(file: str, low_precision: str = "") -> Any:
    """An onnxruntime CPU session on ``file`` (one for every verification run: loading costs).
    ``low_precision``: the model's dtypes other than float32, named in the error where loading fails
    (the CPU provider lacks many kernels for them: bfloat16 ``Gemm`` and ``MatMul``, float64 ``Conv``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failing run's error is raised, with its message, by the caller
    try:
        return ort.InferenceSession(file, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented kinds
        msg = f"onnxruntime cannot load the exported file: {one_line(exc)}"
        if low_precision:
            msg += (f" (the model computes in {low_precision}, for which onnxruntime's CPU provider lacks many "
                    "kernels: export a float32 copy, model.float() with a float32 batch, or check the file on "
                    "the runtime that will serve it)")
        raise ExportError(msg) from exc


def _verify(session: Any, model: nn.Module, sample_batch: batch_mod.SampleBatch, inputs: _Inputs, reference: Any,
            graph_inputs: dict[str, list[int | str]], *, rtol: float, atol: float, say: Progress,
            batch_at_dim_0: bool = True) -> tuple[dict[str, tuple[float, float]], list[int], list[str]]:
    """Run the file in onnxruntime on the sample batch, and once more for each dynamic axis of
    the file (see :mod:`wn_transform.dynamic_axes`), and compare with PyTorch.  ``batch_at_dim_0``:
    the dynamic axes are the default batch axes (else the caller's ``dynamic_shapes`` named them).

    Returns per output (max abs diff, max rel diff) over the runs, each run's batch size, notes.
    """
    session_inputs = [i.name for i in session.get_inputs()]
    runs = [("the sample batch", "", inputs, reference)]
    symbols, notes = dynamic_axes.find_symbols(inputs.names, inputs.tensors, graph_inputs, batch_at_dim_0=batch_at_dim_0)
    tied: set[str] = set()  # symbols checked together with an earlier one
    for symbol in symbols:
        refusals: list[str] = []
        where = ", ".join(f"{inputs.names[p.index]}[{p.axis}] = {inputs.tensors[p.index].shape[p.axis]}"
                          for p in symbol.places)
        hint = (f"; axis '{symbol.name}' is marked dynamic, but the graph depends on its size in the sample "
                f"batch ({where}): mark it static (dynamic_batch=False, or leave it out of dynamic_shapes; "
                f"on the command line, --dynamic)")

        def grown_run(value: int, symbol: dynamic_axes.Symbol = symbol, refusals: list[str] = refusals,
                      together: tuple[dynamic_axes.Symbol, ...] = ()) -> tuple | None:
            """The grown batch's run (label, inputs, PyTorch's outputs), or None where the model refuses it."""
            grown = dynamic_axes.grow(sample_batch, inputs.names, inputs.tensors, graph_inputs, symbols, symbol, value,
                                      together)
            if grown is None:
                return None
            batch, change = grown
            try:
                with torch.no_grad():
                    expected = batch_mod.run(model, batch)
            except batch_mod.BatchError as exc:
                refusals.append(f"{change}: {exc}")
                return None
            label = " and ".join(f"'{s.name}'" for s in (symbol, *together))
            return f"{label} grown, {change}", _layout_inputs(model, batch), expected

        if symbol.name in tied:
            continue  # checked with the axis it is tied to
        checked = _checked_sizes(symbol, grown_run, reference)
        candidates = tuple(s for s in symbols if s is not symbol and s.value == symbol.value and not s.batch_like)
        if not checked and candidates and not symbol.batch_like:
            # axes of the same size that the model needs equal (a mask's length and its input's), which the
            # file names apart: grown together, one other axis at a time, else all of them
            for partners in [*((c,) for c in candidates), *([candidates] if len(candidates) > 1 else [])]:
                checked = _checked_sizes(symbol, functools.partial(grown_run, together=partners), reference)
                if checked:
                    break
            if checked:
                tied.update(s.name for s in partners)
                names = ", ".join(f"'{s.name}'" for s in (symbol, *partners))
                notes.append(f"dynamic axes {names} were checked grown together: the PyTorch model rejects each one "
                             f"grown alone, so they are one length, which the file names apart (give them one name, "
                             f"as dynamic_shapes or --dynamic x:2=T,mask:1=T do, so that the file says so)")
        runs += [(label, hint, run_inputs, expected) for label, run_inputs, expected in checked]
        if not checked:
            notes.append(f"dynamic axis '{symbol.name}' was not checked: the PyTorch model rejects the grown batches "
                         f"({'; '.join(refusals) or 'no size fits its axes'})")
    diffs: dict[str, tuple[float, float]] = {}
    sizes: list[int] = []
    failures: list[str] = []
    excesses: list[float] = []  # per failure, its largest difference over its allowance
    off_on_sample: set[str] = set()  # outputs already off on the sample batch: not the dynamic axes' doing
    shapes: dict[str, set[tuple[int, ...]]] = {}  # per output, the shapes it came out in over the runs
    floors = _output_floors(reference)
    for label, hint, run_inputs, expected in runs:
        sizes.append(1 if (size := _batch_size(run_inputs.tensors)) is None else size)
        say(f"verifying with onnxruntime ({label})")
        try:
            got = session.run(None, run_inputs.feed(session_inputs))
        except ExportError:
            raise
        except Exception as exc:  # onnxruntime's own error kinds
            msg = f"onnxruntime failed to run the exported file on {label}: {one_line(exc)}"
            error = ExportError(msg + hint)
            error.on_sample = run_inputs is inputs  # it cannot run the sample itself: no baked path's doing
            raise error from exc
        for output, value in zip(session.get_outputs(), got):
            shapes.setdefault(output.name, set()).add(tuple(np.shape(value)))
        for name, abs_diff, rel_diff, ok, why, excess in _compare_outputs(session, got, expected, rtol, atol,
                                                                          floors=floors):
            _merge_diff(diffs, name, abs_diff, rel_diff)
            if not ok:
                failures.append(f"'{name}' ({label}): {why}{'' if name in off_on_sample else hint}")
                excesses.append(excess)
                if run_inputs is inputs:
                    off_on_sample.add(name)
    if failures:
        msg = (f"onnxruntime disagrees with PyTorch beyond rtol={rtol:g}, atol={atol:g}: {'; '.join(failures)}"
               f" [all outputs: {_diff_table(diffs)}]{_fake_quant_note(model)}{_rounding_note(max(excesses))}")
        if off_on_sample and (drawn := _random_ops(model, sample_batch, reference)) is not None:
            why = (f"the model draws random numbers in inference mode ({drawn}), so no file can agree with it; turn "
                   "the noise off for export (a vocoder's noise flag), or draw it from an input" if drawn else
                   "its outputs change from run to run (state kept across calls, such as a counter or a cache, or a "
                   "non-deterministic op), so no file can agree with it; make the forward a function of its inputs")
            msg = f"PyTorch itself gives other outputs on another run of the same sample batch: {why}. {msg}"
        error = ExportMismatchError(msg)
        error.on_sample = bool(off_on_sample)  # off on the sample batch itself, not only on grown ones
        raise error
    return diffs, sizes, notes, _fixed_but_varying(session, shapes)


#: Ops that draw random numbers (their in-place and ``_like`` forms included), named when a
#: model's outputs change from one run of the same batch to the next.
_RANDOM_OPS = frozenset({"rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson",
                         "uniform_", "normal_", "bernoulli_", "exponential_", "geometric_", "cauchy_", "log_normal_",
                         "random_", "rand_like", "randn_like", "randint_like", "dropout", "alpha_dropout",
                         "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "rrelu"})


class _RandomOpLog(torch.overrides.TorchFunctionMode):
    """Records the names of the random ops a forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _RANDOM_OPS and name not in self.seen:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _random_ops(model: nn.Module, sample_batch: batch_mod.SampleBatch, reference: Any) -> str | None:
    """Where the model's outputs on the sample batch change from run to run (a vocoder's noise in
    inference mode), the random ops its forward called (``"torch.randn"``; ``""`` where it called
    none: state kept across calls); None where another run gives ``reference`` again.  The
    caller's random state is left as it was."""
    log = _RandomOpLog()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), log:
        torch.manual_seed(torch.initial_seed() + 1)
        again = batch_mod.run(model, sample_batch)
    leaves, others = tree_leaves(reference), tree_leaves(again)
    same = len(leaves) == len(others) and all(
        not isinstance(a, torch.Tensor) or (isinstance(b, torch.Tensor) and a.shape == b.shape
                                            and torch.equal(a.cpu(), b.cpu()))
        for a, b in zip(leaves, others))
    if same:
        return None
    return ", ".join(f"torch.{name}" for name in log.seen)


#: A disagreement whose every element is within this many times its allowance is a near miss,
#: which float rounding can make (a path the graph baked in is off by the output's own scale;
#: float32's allowance is 1e-3 of that scale, so a near miss is within 0.3 % of it).
_NEAR_MISS = 3.0


def _rounding_note(excess: float) -> str:
    """What to add to a disagreement whose worst element is ``excess`` times its allowance: where
    that is a near miss, that float rounding can make it and how to allow it; else ''."""
    if not excess <= _NEAR_MISS:
        return ""
    return (f" [the worst difference is {excess:.2g} times the tolerance: float rounding can make that much "
            "(onnxruntime and PyTorch sum in other orders, with other kernels; a deep network carries it "
            "through every layer): if nothing else differs, pass larger rtol/atol (--rtol/--atol on the "
            "command line)]")


def _fake_quant_note(model: nn.Module) -> str:
    """What to add to a disagreement of a model that fake-quantizes (quantization-aware training,
    exported as QuantizeLinear/DequantizeLinear), or ''."""
    scales = [float(m.scale.max()) for m in model.modules() if isinstance(m, torch.ao.quantization.FakeQuantizeBase)
              and bool(m.fake_quant_enabled.all()) and isinstance(getattr(m, "scale", None), torch.Tensor)
              and m.scale.numel() > 0]
    if not scales:
        return ""
    return (f"; the model fake-quantizes (quantization-aware training; its largest step is {max(scales):g}): a value "
            "on a step's boundary can round to neighbouring steps in onnxruntime and PyTorch, which moves an output "
            "by about a step; where the differences are of that size, pass atol of a step or more")


_PARITY_SEARCH = 8  # sizes tried past the first check for one that flips a derived length's parity


def _checked_sizes(symbol: dynamic_axes.Symbol, grown_run: Callable[[int], tuple | None], reference: Any) -> list[tuple]:
    """The runs that check ``symbol``: the first of its candidates the model takes and, for an axis
    other than the batch's, the next size within :data:`_PARITY_SEARCH` the model takes where an
    output length that follows the axis has the other parity, else every size the search ran (a
    graph may have baked in a branch that only odd or only even lengths take, of the input or of a
    length derived from it: SEW pads its features when their frame count is odd; a model that pads
    odd lengths keeps its outputs' parity, and is caught where the file does not).  The search stops
    early once every such length has moved by the same even amount on two steps in a row (an
    upsampler's ``hop * frames``), whose parity no later step flips."""
    first = next(((value, run) for value in symbol.candidates() if (run := grown_run(value)) is not None), None)
    if first is None:
        return []
    first_value, first_run = first
    if symbol.batch_like:
        return [first_run]
    moved = [(i, d, size) for i, (shape, grown) in enumerate(zip(_output_shapes(reference), _output_shapes(first_run[2])))
             for d, size in enumerate(grown) if d < len(shape) and shape[d] != size]
    tried, previous, step = [], _output_shapes(first_run[2]), None
    for value in range(first_value + 1, first_value + 1 + _PARITY_SEARCH):
        second = grown_run(value)
        if second is None:
            previous = step = None  # a size the model refuses: the next run is not one step on
            continue
        shapes = _output_shapes(second[2])
        if not moved or any(i < len(shapes) and d < len(shapes[i]) and (shapes[i][d] - size) % 2 for i, d, size in moved):
            return [first_run, second]
        tried.append(second)
        now = _length_steps(previous, shapes, moved) if previous is not None else None
        if now is not None and now == step and all(delta and delta % 2 == 0 for delta in now):
            break  # each length moves by the same even amount per step twice (an upsampler's 64 frames): no flip ahead
        previous, step = shapes, now
    # No flip found: every size the search ran in PyTorch is checked in the file too (small batches);
    # a branch that pads odd lengths keeps PyTorch's output lengths even and shows only there.
    return [first_run, *tried]


def _length_steps(before: list[tuple[int, ...]], after: list[tuple[int, ...]],
                  moved: list[tuple[int, int, int]]) -> tuple[int, ...] | None:
    """How far each tracked output length (output ``i``, axis ``d``) moved between two runs; None if
    one of them lacks it."""
    if any(i >= min(len(before), len(after)) or d >= min(len(before[i]), len(after[i])) for i, d, _ in moved):
        return None
    return tuple(after[i][d] - before[i][d] for i, d, _ in moved)


def _output_shapes(outputs: Any) -> list[tuple[int, ...]]:
    return [tuple(leaf.shape) for leaf in tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]


def _fixed_but_varying(session: Any, shapes: dict[str, set[tuple[int, ...]]]) -> dict[str, list[int]]:
    """Per output, the axes the file declares of a fixed size that came out in other sizes over the
    verification runs (the dynamo exporter declares an LSTM's output time fixed at the sample's)."""
    found: dict[str, list[int]] = {}
    for output in session.get_outputs():
        declared, seen = output.shape, shapes.get(output.name, set())
        axes = [axis for axis, size in enumerate(declared or ()) if isinstance(size, int)
                and any(len(shape) == len(declared) and shape[axis] != size for shape in seen)]
        if axes:
            found[output.name] = axes
    return found


def _compare_outputs(session: Any, got: list[Any], expected: Any, rtol: float, atol: float, *,
                     other_values: bool = False, floors: list[float | np.ndarray] | None = None,
                     ) -> list[tuple[str, float, float, bool, str, float]]:
    """Per output of the graph: (name, max abs diff, max rel diff, within tolerance, why not, the
    largest ratio of a difference to its allowance: :func:`_compare`).

    ``other_values`` (the permuted batch of :func:`_verify_other_values`): floating outputs only, and
    a NaN on either side counts as agreement.  Permuted values can leave the model's domain (the log
    of an unsorted sequence's gaps), and runtimes carry NaN through ``max``/pooling differently;
    integer outputs (top-k indices) break the ties that permuted values make in their own ways.
    """
    onnx_names = [o.name for o in session.get_outputs()]
    want = _output_tensors(expected)
    if len(got) != len(want):
        msg = (f"the exported graph has {len(got)} outputs ({onnx_names}), the PyTorch model "
               f"returns {len(want)} tensors and numbers")
        raise ExportError(msg)
    floors = floors or [None] * len(want)
    return [(name, *_compare(np.asarray(onnx_value), torch_value, rtol, atol, nan_either=other_values, floor=floor))
            for name, onnx_value, torch_value, floor in zip(onnx_names, got, want, floors)
            if not other_values or torch_value.is_floating_point()]


def _merge_diff(diffs: dict[str, tuple[float, float]], name: str, abs_diff: float, rel_diff: float) -> None:
    """Keep the largest abs and rel difference of output ``name`` over the runs."""
    old = diffs.get(name, (0.0, 0.0))
    diffs[name] = (max(old[0], abs_diff), max(old[1], rel_diff))


def _diff_table(diffs: dict[str, tuple[float, float]]) -> str:
    """Every output's max differences, for an error message (the failing ones may be a few)."""
    return "; ".join(f"'{name}': max abs diff {a:.3g}, max rel diff {r:.3g}" for name, (a, r) in diffs.items())


# -- the same shapes, other values (TorchScript exports) ------------------------------------


def _verify_other_values(session: Any, model: nn.Module, sample_batch: batch_mod.SampleBatch,
                         diffs: dict[str, tuple[float, float]], notes: list[str], *, rtol: float, atol: float,
                         tracer_warnings: list[str], fallback_reason: str | None, say: Progress,
                         blame_only: bool = False) -> bool:
    """Run the file on the sample's shapes with other values (:func:`_other_values`) and compare
    with PyTorch: a TorchScript trace keeps the path the sample batch took through Python control
    flow on tensor values, and the grown batches, which repeat the sample's rows, take it again.

    Adds the run's differences to ``diffs``; returns whether it ran.  The model rejecting that
    batch, or a batch with nothing to vary, is a note in ``notes``.  ``blame_only`` (after another
    check failed): raise only where the values are to blame, not for a near miss or quantization.

    Raises:
        ExportMismatchError: onnxruntime fails on that batch or disagrees with PyTorch.
    """
    batch, varied = _other_values(sample_batch)
    if not varied:
        notes.append("the file was not checked on other values: no input has values to permute (each is bool, "
                     "constant, or of one element)")
        return False
    try:
        with torch.no_grad():
            expected = batch_mod.run(model, batch)
    except batch_mod.BatchError as exc:
        notes.append(f"the file was not checked on other values (the sample's shapes, each input's values "
                     f"permuted): the PyTorch model rejects them ({first_line(exc)})")
        return False
    say("verifying with onnxruntime (the sample's shapes, other values)")
    session_inputs = [i.name for i in session.get_inputs()]
    try:
        got = session.run(None, _layout_inputs(model, batch).feed(session_inputs))
    except ExportError:
        raise
    except Exception as exc:  # onnxruntime's own error kinds
        failure = f"onnxruntime fails on them [{one_line(exc)}]"
        raise _value_dependence_error(failure, tracer_warnings, fallback_reason) from exc
    compared = _compare_outputs(session, got, expected, rtol, atol, other_values=True)
    for name, abs_diff, rel_diff, _, _, _ in compared:
        _merge_diff(diffs, name, abs_diff, rel_diff)
    failures = [f"'{name}': {why}" for name, _, _, ok, why, _ in compared if not ok]
    if failures:
        failure = f"onnxruntime disagrees with PyTorch beyond rtol={rtol:g}, atol={atol:g}: {'; '.join(failures)}"
        rounding = _rounding_note(max(excess for *_, ok, _, excess in compared if not ok))
        quantized = _fake_quant_note(model)  # a rounding at a step's boundary, more likely than a baked path
        if quantized or (rounding and not tracer_warnings):  # no sign of a baked path: say so, accuse nothing
            if blame_only:
                return True
            msg = (f"on a batch of the sample's shapes with other values (each input's values permuted), "
                   f"{failure}{quantized or rounding}")
            raise ExportMismatchError(msg)
        raise _value_dependence_error(failure + rounding, tracer_warnings, fallback_reason)
    return True


def _other_values(sample_batch: batch_mod.SampleBatch) -> tuple[batch_mod.SampleBatch, bool]:
    """The sample batch with other values, and whether any value changed.

    Same structure, shapes, dtypes and devices; the values of every floating and integer tensor
    permuted among themselves, across the whole tensor (:func:`_other_tensor`); bool tensors
    unchanged (masks keep their meaning).  Seeded: the same batch every time.
    """
    generator = torch.Generator().manual_seed(_OTHER_VALUES_SEED)
    changed = []

    def vary(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        other = _other_tensor(leaf, generator)
        changed.append(other is not leaf and not torch.equal(other, leaf))
        return other

    return tree_map(vary, sample_batch), any(changed)


def _other_tensor(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``tensor``'s values permuted among themselves; itself where there is nothing to permute.

    A permutation, not noise: every value stays one the model was given (token ids stay ids of
    the vocabulary, a float mask keeps its 0 and -1e9, audio its range), while each row gets
    other values than the sample's row, as independent as the batch allows, so that routing,
    sorting and top-k take another path.
    """
    if tensor.numel() < 2 or tensor.is_meta or tensor.dtype == torch.bool or tensor.is_complex():
        return tensor
    order = torch.randperm(tensor.numel(), generator=generator).to(tensor.device)
    return tensor.detach().reshape(-1)[order].reshape(tensor.shape)


def _value_dependence_error(failure: str, tracer_warnings: list[str], fallback_reason: str | None,
                            ) -> ExportMismatchError:
    """The error for a TorchScript graph that holds for the sample batch only: what failed, the
    tracer's warnings that point at the cause, and how to get a graph that holds."""
    why = f" (the dynamo exporter failed: {fallback_reason})" if fallback_reason else ""
    warned = f"the tracer warned: {_quoted(tracer_warnings)}" if tracer_warnings else "the tracer raised no TracerWarning"
    msg = (f"the exported graph depends on the values of the sample batch: it agrees with PyTorch on the sample "
           f"batch, but not on a batch of the same shapes with other values (each input's values "
           f"permuted): {failure}. The TorchScript exporter{why} traced the one path the sample took through "
           f"data-dependent control flow and baked it into the graph; {warned}. Make the model exportable by "
           f"torch.export (the dynamo exporter): no Python loops or branches on tensor values (iterating over a "
           f"tensor, int()/bool()/.item() of one, a loop over torch.unique or nonzero); a mixture of experts can "
           f"run every expert on every token and weight the results by the routing, or use torch.cond")
    return ExportMismatchError(msg)


def _tracer_note(tracer_warnings: list[str], other_values_checked: bool) -> str:
    """The note (and warning) for a TorchScript export whose tracer warned, though it verified."""
    checked = ("the file agrees with PyTorch on every batch checked, the sample's shapes with other values "
               "included, but" if other_values_checked else "the file was not checked on other values, so")
    return (f"the TorchScript tracer warned that its trace may be incorrect for other inputs: "
            f"{_quoted(tracer_warnings)}; {checked} a path through Python control flow that "
            f"those batches did not take may be baked in: check the file on your own data, or make the model "
            f"exportable by torch.export (no Python control flow on tensor values) so the dynamo exporter is used")


def _quoted(tracer_warnings: list[str]) -> str:
    """The first :data:`_QUOTED_TRACER_WARNINGS` warnings, and how many more there are."""
    more = len(tracer_warnings) - _QUOTED_TRACER_WARNINGS
    return "; ".join(tracer_warnings[:_QUOTED_TRACER_WARNINGS]) + (f" (and {more} more)" if more > 0 else "")


def _compare(got: np.ndarray, tensor: torch.Tensor, rtol: float, atol: float, *,
             nan_either: bool = False, floor: float | np.ndarray | None = None) -> tuple[float, float, bool, str, float]:
    """(max abs diff, max rel diff, within tolerance, a description of the worst difference, the
    largest ratio of an element's difference to its allowance).

    Within tolerance: every element's ``|got - want| <= atol + rtol * max(|want|, f)``, ``f`` the
    output's :func:`_floor_magnitudes` (``floor``, where given: the sample batch's); integer and
    bool outputs (token ids, indices, masks) must be equal, compared in their own dtype (int64 ids
    beyond 2**53 differ by 1 in float64 too).  An output of another dtype than PyTorch's disagrees
    whatever its values (an int32 sum that wraps where PyTorch's int64 does not).  NaN agrees with
    NaN; with ``nan_either``, with anything."""
    exact = not (tensor.is_floating_point() or tensor.is_complex())
    want = _to_numpy(tensor.detach().cpu().float() if tensor.dtype == torch.bfloat16 else tensor)
    torch_dtype = str(tensor.dtype).removeprefix("torch.")  # (numpy has no bfloat16: want holds it as float32)
    if got.dtype.name != torch_dtype:
        why = (f"dtype {got.dtype.name} instead of PyTorch's {torch_dtype} (the exporter changed the output's type: "
               f"its values can differ where the types' ranges or precisions do)")
        return math.inf, math.inf, False, why, math.inf
    if got.shape != want.shape:
        return math.inf, math.inf, False, f"shape {list(got.shape)} instead of {list(want.shape)}", math.inf
    if got.size == 0:
        return 0.0, 0.0, True, "", 0.0
    if exact:
        return _compare_exact(got, want)
    a = got.astype(np.float64)
    b = want.astype(np.float64)
    both_nan = (np.isnan(a) | np.isnan(b)) if nan_either else (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(both_nan | (a == b), 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    scale = np.abs(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, np.where(scale > 0, diff / np.where(scale > 0, scale, 1.0), np.inf))
    if not rtol:
        floor = 0.0
    elif floor is None or (isinstance(floor, np.ndarray) and not _broadcasts(floor.shape, b.shape)):
        floor = _floor_magnitudes(b, half=tensor.element_size() <= 2)  # (a grown axis that had floors per slice)
    allowance = atol + rtol * np.maximum(np.where(np.isfinite(scale), scale, 0.0), floor)
    ok = bool(np.all(diff <= allowance))
    with np.errstate(divide="ignore", invalid="ignore"):
        excess = float(np.max(np.where(diff == 0, 0.0, diff / allowance)))
    max_abs, max_rel = float(diff.max()), float(rel.max())
    return max_abs, max_rel, ok, f"max abs diff {max_abs:.3g}, max rel diff {max_rel:.3g}", excess


def _compare_exact(got: np.ndarray, want: np.ndarray) -> tuple[float, float, bool, str, float]:
    """:func:`_compare` of an integer or bool output, of PyTorch's dtype: equal element for element,
    compared as they are (not in float64, which holds integers exactly only up to 2**53).  A
    difference is reported as at least 1, the least two integers can differ by."""
    unequal = got != want
    differ = int(np.count_nonzero(unequal))
    if not differ:
        return 0.0, 0.0, True, "", 0.0
    a, b = got.astype(np.float64), want.astype(np.float64)
    diff = np.where(unequal, np.maximum(np.abs(a - b), 1.0), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(unequal, np.where(b != 0, diff / np.abs(np.where(b != 0, b, 1.0)), np.inf), 0.0)
    max_abs, max_rel = float(diff.max()), float(rel.max())
    why = f"{differ} of {diff.size} elements differ, max abs diff {max_abs:.3g}, max rel diff {max_rel:.3g}"
    if differ <= diff.size // 100:  # a few of many: a search over values that tie within rounding
        why += (" (an argmax, argmin or top-k over values that tie within rounding may pick either: so few "
                "differing indices may be such ties, common in float16 and bfloat16; run that search in float32)")
    return max_abs, max_rel, False, why, math.inf


#: :func:`_floor_magnitude`: a value held by more than this share of an output's elements is a
#: sentinel or a clamp's bound, not a computed value; magnitudes above this many times the
#: output's 1st percentile are another block (an additive mask's -1e4); at most this many
#: elements, drawn at random (seeded), estimate it.
_REPEATED_SHARE = 0.01
_FLOOR_SPAN = 1e4
_FLOOR_SAMPLE = 1_000_000


def _floor_magnitude(values: np.ndarray) -> float:
    """The typical magnitude of an output's computed values, of which rtol is taken for its
    smaller elements: rounding in a deep network is absolute at the scale of the activations, so
    an element that happens to be near zero (a logit, a waveform's zero crossing) carries the
    absolute error of its neighbours.  The median ``|x|`` of the finite values (a row that repeats
    another along the batch axis counted once), leaving out zeros (a ReLU's, padding), values held
    by more than 1 % of the elements and more than twice (a masked logit's
    ``finfo.min`` or -1e9, a clamp's bound: whatever their share) and magnitudes more than
    :data:`_FLOOR_SPAN` times the 1st percentile of the rest (logits masked by adding -1e4, on
    up to 99 % of the elements; a few huge values); 0 where nothing is left (the rule is then
    elementwise)."""
    if values.size == 0:
        return 0.0
    rows = np.ascontiguousarray(values.reshape(len(values), -1) if values.ndim > 1 else values.reshape(1, -1))
    if len(rows) > 1 and rows.shape[1] > 0:  # a batch that repeats a row: each value counts once
        keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()  # a row's bytes
        rows = rows[np.sort(np.unique(keys, return_index=True)[1])]
    flat = rows.reshape(-1)
    if flat.size > _FLOOR_SAMPLE:
        flat = flat[np.random.default_rng(0).integers(0, flat.size, _FLOOR_SAMPLE)]
    flat = flat[np.isfinite(flat) & (flat != 0)].astype(np.float64)
    if not flat.size:
        return 0.0
    _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    kept = np.abs(flat[counts[inverse] <= max(2.0, _REPEATED_SHARE * flat.size)])
    if not kept.size:
        return 0.0
    kept = kept[kept <= _FLOOR_SPAN * np.quantile(kept, 0.01)]
    return float(np.median(kept))


#: :func:`_floor_magnitudes`: slices along an axis whose typical magnitudes (medians of ``|x|``)
#: are this many times apart are parts of different scales side by side (a detector's boxes in
#: pixels beside its class probabilities); each such slice has at least this many values; its
#: floor is at least the whole output's over :data:`_MIXED_SCALES` (no stricter than that) and at
#: most the whole output's.
_MIXED_SCALES = 100.0
_SLICE_VALUES = 64
_MAX_SLICES = 4096


def _floor_magnitudes(values: np.ndarray, *, half: bool = False) -> float | np.ndarray:
    """:func:`_floor_magnitude` of the whole output, or, where the output puts parts of different
    scales side by side along one axis other than the batch's (``[boxes | probabilities]``: a
    detector's pixel coordinates beside values below 1), one floor per slice along that axis, shaped
    to broadcast: the whole output's median would let the small part be off by a tenth of the large
    part's scale.  Each slice's floor is its own :func:`_floor_magnitude`, kept within
    ``[whole / 100, whole]``.  Not in float16 and bfloat16 (``half``), whose rounding is absolute at
    the scale of the whole computation."""
    whole = _floor_magnitude(values)
    if half or values.ndim < 2 or not whole:
        return whole
    best, spread = None, _MIXED_SCALES
    sample = np.random.default_rng(0)
    for axis in range(1, values.ndim):
        n = values.shape[axis]
        if not 2 <= n <= _MAX_SLICES or values.size // n < _SLICE_VALUES:
            continue
        slices = np.moveaxis(values, axis, 0).reshape(n, -1)
        if slices.shape[1] > 1024:  # a median per slice, estimated
            slices = slices[:, sample.integers(0, slices.shape[1], 1024)]
        with np.errstate(invalid="ignore"):
            medians = np.median(np.abs(np.where(np.isfinite(slices), slices, np.nan)), axis=1)
        medians = medians[np.isfinite(medians) & (medians > 0)]
        if len(medians) > 1 and medians.max() > spread * medians.min():
            best, spread = axis, medians.max() / medians.min()
    if best is None:
        return whole
    slices = np.moveaxis(values, best, 0)
    floors = np.array([_floor_magnitude(piece) for piece in slices])
    floors = np.clip(np.where(floors > 0, floors, whole), whole / _MIXED_SCALES, whole)
    shape = [1] * values.ndim
    shape[best] = len(floors)
    return floors.reshape(shape)


def _broadcasts(shape: tuple[int, ...], onto: tuple[int, ...]) -> bool:
    """Whether an array of ``shape`` broadcasts onto ``onto`` without changing it."""
    return len(shape) == len(onto) and all(a in (1, b) for a, b in zip(shape, onto))


def _output_floors(expected: Any) -> list[float | np.ndarray]:
    """:func:`_floor_magnitudes` of each floating output (0 for the others), in output order: taken
    once from the sample batch's outputs, for its runs on grown batches too (which repeat its rows)."""
    return [_floor_magnitudes(_to_numpy(leaf.detach().cpu().double()), half=leaf.element_size() <= 2)
            if leaf.is_floating_point() else 0.0
            for leaf in _output_tensors(expected)]


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


def _state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the distinct tensors of a state dict (tied weights counted once)."""
    seen, total = set(), 0
    for tensor in state.values():
        key = onnx_graph.alias_key(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _shape_str(shape: list[int | str]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"

