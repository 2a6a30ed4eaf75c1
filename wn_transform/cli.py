"""The ``wn-transform`` command line: inspect, fold, convert, apply and export checkpoints.

Exit codes: 0 success, 1 the operation failed (the message says which file, key or layer),
2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import importlib.util
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .apply import apply_weight_norm, plan_weight_norm, weight_norm_report
from .checkpoint import (
    CheckpointError, check_output, files_of, load_batch, load_checkpoint, map_state_dicts, optimizer_states,
    rebuilt_like, safetensors_metadata, save_checkpoint, state_dict_paths,
)
from ._copy import routed_module
from .errors import NoTargetsError, WeightNormError, few, first_line, unknown_keep_message
from .state_dict import (StateDictWeightNorm, convert_one_state_dict, fit_state_dict, fold_one_state_dict, pair_keys,
                         state_dict_pairs)
from .uses import param_aliases

FAILURES = (WeightNormError, CheckpointError, OSError, ValueError)  # ValueError: the library's argument checks

EXAMPLES = {
    "inspect": """examples:
  wn-transform inspect generator.pt
  wn-transform inspect --model mypkg.models:build_generator --model-kwargs '{"channels": 256}' --input-shape 1,80,100""",
    "fold": """example:
  wn-transform fold hifigan_g.pt -o hifigan_g_plain.safetensors
  wn-transform fold hifigan.pt -o hifigan_plain.pt
  (nested checkpoints such as {"generator": ..., "discriminator": ..., "epoch": 3} keep their structure in a .pt;
  --key generator writes that state dict alone, which a .safetensors file can hold)""",
    "convert": """examples:
  wn-transform convert old_legacy.pt -o new.pt --to parametrizations   # weight_g/weight_v -> parametrizations.weight.original0/1
  wn-transform convert new.pt -o old.pt --to legacy""",
    "apply": """examples:
  wn-transform apply --model mypkg.models:build_classifier --checkpoint trained.pt --preserve -o wn.pt
  wn-transform apply --model mypkg.models:build_lm --checkpoint lm.safetensors --preserve --sample ids.pt -o wn.pt
  (--sample/--input-shape with --preserve: a batch the model is traced with to find its weights, for a
  model the module walk cannot follow; the data init traces with its --calib batch)
  wn-transform apply --model mypkg.models:build_classifier --calib calib_batch.pt -o wn_init.safetensors""",
    "export": """examples:
  wn-transform export --model mypkg.models:build_generator --checkpoint g.pt --input-shape 1,80,100 -o generator.onnx
  wn-transform export --model mypkg.models:build_generator --input-shape 1,80,100 --dynamic 0=batch,2=frames -o generator.onnx
  wn-transform export --model mypkg.models:build_encoder --sample sample_inputs.pt -o encoder.onnx --opset 18
  wn-transform export --model mypkg.models:build_fp16_vocoder --sample mel_fp16.pt -o vocoder.onnx --rtol 2e-2 --atol 2e-3
  (--dynamic: which input axes stay dynamic in the graph, [INPUT:]AXIS[=NAME], INPUT a position or
  keyword of the batch, every input when left out; default: the batch axis 0 of every input; none: all fixed;
  an unnamed axis is batch (0), dimAXIS, or INPUT_dimAXIS with several inputs; one name: one size;
  --rtol/--atol: how close onnxruntime must come to PyTorch, by default set by the model's float dtype)""",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wn-transform",
        description="Weight normalization (Salimans & Kingma, 2016) for PyTorch models and checkpoints.",
        epilog="Run 'wn-transform COMMAND --help' for a worked example of each command.",
    )
    parser.add_argument("--version", action="version", version=f"wn-transform {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(usage_error=sub.error)  # a usage error found later shows this command's usage
        sub.add_argument("--safe-global", action="append", default=[], metavar="MODULE.NAME", type=_safe_global,
                         help="a class the checkpoint's pickle needs that you trust, e.g. argparse.Namespace "
                              "(fairseq's args): allowed to torch's safe loader (torch.serialization.safe_globals); "
                              "repeatable")
        return sub

    inspect = command("inspect", "Show what a checkpoint holds, or what apply would convert in a model.")
    inspect.add_argument("file", nargs="?", help="checkpoint (.pt/.pth/.bin/.safetensors)")
    _model_arguments(inspect, required=False)
    _batch_arguments(inspect, "sample", required=False)

    fold = command("fold", "Fold every weight-normalized tensor of a checkpoint into a plain weight (no model code).")
    fold.add_argument("input", help="checkpoint to fold")
    fold.add_argument("--keep", action="append", default=[], metavar="WEIGHT",
                      help="a weight left weight-normalized, e.g. encoder.pos_conv_embed.conv.weight (one a model has "
                           "by construction, so that the file still loads into its class); repeatable")
    _one_state_dict_argument(fold)
    _output_arguments(fold)

    convert = command("convert", "Convert a checkpoint between torch's two weight-norm layouts.")
    convert.add_argument("input", help="checkpoint to convert")
    convert.add_argument("--to", required=True, choices=("parametrizations", "legacy"), help="target layout")
    _one_state_dict_argument(convert)
    _output_arguments(convert)

    apply = command("apply", "Weight-normalize a model's checkpoint (data-dependent init, or --preserve: g = ||w||, v = w).")
    _model_arguments(apply, required=True)
    mode = apply.add_mutually_exclusive_group(required=True)
    mode.add_argument("--calib", metavar="FILE", help="calibration batch for the data-dependent init")
    mode.add_argument("--preserve", action="store_true", help="exact reparameterization: g = ||w||, v = w")
    apply.add_argument("--include", action="append", metavar="PATTERN", help="only weights/modules matching (repeatable)")
    apply.add_argument("--exclude", action="append", metavar="PATTERN", help="leave weights/modules matching (repeatable)")
    apply.add_argument("--init-scale", type=float, default=1.0, help="std of every pre-activation after init (default 1)")
    apply.add_argument("--exp-scale", action="store_true", help="store g as e^s")
    apply.add_argument("--existing", choices=("keep", "convert"), default="keep",
                       help="weights the model already weight-normalizes (torch's weight norm, built in): keep them "
                            "as they are (default), or fold and convert them too (existing='convert')")
    handing = apply.add_mutually_exclusive_group()
    handing.add_argument("--exact-init", action="store_true",
                         help="run each layer's op again with the new g, b and hand its real output on "
                              "(each op runs twice; default: hand on g*t + b, as the paper's code does)")
    handing.add_argument("--fast-init", action="store_true", help="hand on g*t + b (the default; kept for old scripts)")
    _batch_arguments(apply, "sample", required=False)
    _output_arguments(apply)

    export = command("export", "Load a model, fold its weight norm, export it to ONNX and verify it in onnxruntime.")
    _model_arguments(export, required=True)
    _batch_arguments(export, "sample", required=True)
    export.add_argument("--dynamic", metavar="AXES", type=_dynamic_axes, default=None,
                        help="input axes the graph keeps dynamic: comma-separated [INPUT:]AXIS[=NAME], e.g. "
                             "0=batch,2=frames or mel:2=frames; 'none' fixes every shape (default: axis 0 of every input)")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    export.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                        help="torch's ONNX exporter: auto (dynamo, falling back to TorchScript when it fails or its "
                             "file fails the checks), dynamo or torchscript (default: auto)")
    export.add_argument("--rtol", type=_tolerance, default=None, metavar="R",
                        help="relative tolerance of the onnxruntime check: |onnx - torch| <= atol + rtol*max(|torch|, the "
                             "typical magnitude of the output's values) "
                             "(default: by the model's dtype, 1e-3 for float32, 1e-2 for float16, 8e-2 for bfloat16)")
    export.add_argument("--atol", type=_tolerance, default=None, metavar="A",
                        help="absolute tolerance of the onnxruntime check (default: by the model's dtype, 1e-5 for "
                             "float32, 1e-3 for float16, 8e-3 for bfloat16)")
    _output_arguments(export, ".onnx")
    return parser


def _model_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--model", required=required, metavar="MODULE:FACTORY",
                        help="factory that builds the model: importable, e.g. mypkg.models:build_generator, "
                             "or in a file, e.g. ./models.py:build_generator")
    parser.add_argument("--model-kwargs", default="{}", metavar="JSON", help="keyword arguments for the factory")
    parser.add_argument("--checkpoint", metavar="FILE", help="weights to load into the model")
    parser.add_argument("--key", metavar="PATH", help="which nested state dict to use, e.g. generator or model.ema")


def _batch_arguments(parser: argparse.ArgumentParser, name: str, *, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument(f"--{name}", metavar="FILE", help="input batch: torch.save'd tensor/tuple/dict, .npy, .npz or .safetensors")
    group.add_argument("--input-shape", metavar="N,C,...", type=_shape,
                       help="a random input of this shape (seed 0), in the model's floating dtype")


def _one_state_dict_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", metavar="PATH", help="write only the nested state dict at PATH, e.g. generator, "
                                                       "or the keys under the prefix 'PATH.', that prefix taken "
                                                       "off (a LightningModule's generator.*; state_dict.model for "
                                                       "those of one state dict among several): one flat state dict, "
                                                       "what a .safetensors output holds")


def _output_arguments(parser: argparse.ArgumentParser, kinds: str = ".pt/.pth/.bin/.safetensors") -> None:
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help=f"where to write ({kinds})")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")


# -- commands ------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace, say: _Progress) -> int:
    if args.file is None and args.model is None:
        msg = "inspect needs a checkpoint FILE, or --model to plan what apply would convert"
        raise _UsageError(msg)
    if args.file is not None:
        checkpoint = load_checkpoint(args.file)
        paths = state_dict_paths(checkpoint)
        if not paths:
            msg = f"{args.file}: holds no state dict (no mapping of names to tensors)"
            raise CheckpointError(msg)
        prefixed = None
        if args.key is not None and args.checkpoint in (None, args.file):  # else --key names --checkpoint's
            prefixed = _under_prefix(checkpoint, paths, args.key, args.file)  # as a model loads it (a LightningModule's)
            paths = [] if prefixed is not None else [_keyed_path(paths, args.key, args.file)]
        if prefixed is not None:
            print(_describe_state_dict(prefixed, f"{args.key} (the keys under '{args.key}.')"))
        for path in paths:
            print(_describe_state_dict(_get(checkpoint, path), _path_name(path)))
    if args.model is not None:
        model = _build_model(args, say)
        batch = _read_batch(args, "sample", model) if (args.sample or args.input_shape) else None
        with _advice_in_cli_terms(batch):
            print(plan_weight_norm(model, batch))
    return 0


def cmd_fold(args: argparse.Namespace, say: _Progress) -> int:
    keep = set(args.keep)  # each name in one of the state dicts (_rewrite checks)
    return _rewrite(args, say, lambda sd: fold_one_state_dict(sd, keep=keep), "folded", keep=keep)


def cmd_convert(args: argparse.Namespace, say: _Progress) -> int:
    return _rewrite(args, say, lambda sd: convert_one_state_dict(sd, args.to), f"converted to {args.to}",
                    to=args.to)


def cmd_apply(args: argparse.Namespace, say: _Progress) -> int:
    if not (math.isfinite(args.init_scale) and args.init_scale > 0):
        msg = f"--init-scale must be a positive finite number (the std every pre-activation starts with), got {args.init_scale}"
        raise _UsageError(msg)
    if args.preserve and (args.init_scale != 1 or args.exact_init):
        given = " and ".join(flag for flag, on in (("--init-scale", args.init_scale != 1), ("--exact-init", args.exact_init))
                             if on)
        msg = f"{given} set{'s' if ' and ' not in given else ''} the data-dependent init; --preserve keeps every weight as it is"
        raise _UsageError(msg)
    if not args.preserve and (args.sample or args.input_shape):
        given = "--sample" if args.sample else "--input-shape"
        msg = f"{given} goes with --preserve (a batch to find the weights with); the data init traces with its --calib batch"
        raise _UsageError(msg)
    _check_output_free(args)
    model = _build_model(args, say)
    if args.preserve:  # a sample batch, if given, finds the weights: torch.export traces with it
        batch = _read_batch(args, "sample", model) if (args.sample or args.input_shape) else None
    else:
        batch = _read_batch(args, "calib", model)
    say("applying weight norm" + ("" if args.preserve else " with data-dependent init"))
    with _advice_in_cli_terms(batch):
        model = apply_weight_norm(model, batch, init="preserve" if args.preserve else "data", include=args.include,
                                  exclude=args.exclude, init_scale=args.init_scale, exp_scale=args.exp_scale,
                                  exact_init=args.exact_init, existing=args.existing, inplace=True)
    say(f"writing {args.output}")
    metadata = safetensors_metadata(args.checkpoint) if args.checkpoint else None  # (a file: --key's state dict too)
    save_checkpoint(model.state_dict(), args.output, force=args.force, inputs=_inputs(args), metadata=metadata)
    say.wrote(args.output)  # before the report: a reader that closes the pipe (| head) loses nothing
    print(weight_norm_report(model))
    return 0


@contextlib.contextmanager
def _advice_in_cli_terms(batch: Any) -> Iterator[None]:
    """The library's advice to pass a ``sample_batch``, given as the CLI's flags."""
    try:
        yield
    except NoTargetsError as exc:
        if batch is None and "pass a sample_batch" in str(exc):
            msg = str(exc).replace("pass a sample_batch", "pass a sample batch (--sample FILE or --input-shape N,C,...)")
            raise NoTargetsError(msg) from exc
        raise


def cmd_export(args: argparse.Namespace, say: _Progress) -> int:
    from .export import export_onnx

    _check_output_free(args)
    model = _build_model(args, say)
    batch = _read_batch(args, "sample", model)
    shapes = _dynamic_shapes(args.dynamic, batch, model) if args.dynamic is not None else None
    report = export_onnx(model, batch, args.output, opset=args.opset, dynamic_batch=args.dynamic is None,
                         dynamic_shapes=shapes, exporter=args.exporter, rtol=args.rtol, atol=args.atol,
                         overwrite=args.force, progress=say)
    say.wrote(args.output)
    print(report)
    return 0


COMMANDS = {"inspect": cmd_inspect, "fold": cmd_fold, "convert": cmd_convert, "apply": cmd_apply, "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``wn-transform`` command; its exit code."""
    return _run(argv)[0]


def console_script() -> None:
    """The ``wn-transform`` command: :func:`main`, then an exit that a stop signal cannot turn into a
    failure once the output is in place (the interpreter's cleanup after a large export takes about
    a second, where the default handlers would end the process with the signal's status)."""
    code, progress = _run()
    if progress is not None and progress.output_written():
        for name in _STOP_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
    sys.exit(code)


def _run(argv: Sequence[str] | None = None) -> tuple[int, _Progress | None]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2, None
    progress = _Progress(time.perf_counter(), getattr(args, "output", None))
    return _run_command(args, progress), progress


def _run_command(args: argparse.Namespace, progress: _Progress) -> int:
    try:
        with _stopped_by_signals(progress), torch.serialization.safe_globals(args.safe_global):
            code = COMMANDS[args.command](args, progress)
    except BrokenPipeError:  # `inspect big.pt | head`: the reader has what it wanted
        _quiet_stdout()
        return 0 if progress.output_written() else 128 + _SIGPIPE
    except _UsageError as exc:
        args.usage_error(str(exc))
    except FAILURES as exc:
        if progress.received is not None:  # the stop surfaced as another error (raised inside torch's lazy import)
            return _stopped(args, progress, progress.received)
        print(f"wn-transform {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outputs are written atomically: nothing half-written is left
        return _stopped(args, progress, signal.SIGINT)
    except _Stopped as exc:
        return _stopped(args, progress, exc.signal)
    except Exception:
        if progress.received is not None:  # a library turned the stop into its own error (an extension's import
            return _stopped(args, progress, progress.received)  # fails with ImportError mid-initialization)
        raise
    if progress.received is not None:  # noted after the output was written, or swallowed by a library
        return _stopped(args, progress, progress.received)
    return code


_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
_SIGPIPE = getattr(signal, "SIGPIPE", 13)  # (Windows has none; a shell reports a process it stopped as 128 + 13)


class _Progress:
    """The CLI's progress messages (``[  1.2s] loading x.pt`` on stderr), and what stop signals did
    meanwhile: the first that arrived (``received``), and whether the output was in place by then
    (``written``: a stop after that lets the command finish, since the output is complete)."""

    def __init__(self, started: float, output: str | None = None) -> None:
        self.started = started
        self.received: signal.Signals | None = None
        self.written: str | None = None
        self.output, self._output_before = output, _file_identity(output)

    def output_written(self) -> bool:
        """Whether this run put its output in place: marked so (:meth:`wrote`), or renamed into its
        path since the run started (a signal can land between the writer's rename and the mark)."""
        return self.written is not None or (self.output is not None
                                            and _file_identity(self.output) not in (None, self._output_before))

    def __call__(self, message: str) -> None:
        if self.received is not None and self.written is None:  # a library caught the stop: raise it again here
            raise _stop_exception(self.received)
        print(f"[{time.perf_counter() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def wrote(self, path: str) -> None:
        """The output is in place (renamed into its path): from here on a stop signal is noted, not raised."""
        self.written = path


def _stopped(args: argparse.Namespace, progress: _Progress, signum: signal.Signals) -> int:
    """Say that the command was stopped: with nothing written, the exit code a shell gives; once
    the output is in place (outputs are renamed into their path whole), 0 and a line saying so."""
    if progress.output_written():
        print(f"wn-transform {args.command}: {signum.name} arrived after {progress.output} was written in full; "
              "it is complete", file=sys.stderr)
        return 0
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signum.name}"
    print(f"wn-transform {args.command}: {what}; no output was written", file=sys.stderr)
    return 128 + signum.value


def _file_identity(path: str | None) -> tuple[int, ...] | None:
    """What tells a file at ``path`` from the one there before (device, inode, mtime, size), or None."""
    try:
        info = os.stat(path) if path is not None else None
    except OSError:
        return None
    return None if info is None else (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


def _quiet_stdout() -> None:
    """Point the process's stdout, whose reader has gone, at the null device, so that the
    interpreter's last flush is silent (the pipe could take no more anyway).  Only the process's own
    stdout: a caller's replacement (a capture) is left as it is."""
    if sys.stdout is not sys.__stdout__:
        return
    with contextlib.suppress(OSError, ValueError, AttributeError):
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, sys.stdout.fileno())
        finally:
            os.close(null)


class _Stopped(BaseException):
    """A termination signal arrived (``kill``, ``timeout``, a job scheduler, a closed terminal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal = signal.Signals(signum)


def _stop_exception(signum: signal.Signals) -> BaseException:
    """What a stop signal raises: ``KeyboardInterrupt`` for Ctrl-C (as Python's own handler), else :class:`_Stopped`."""
    return KeyboardInterrupt() if signum == signal.SIGINT else _Stopped(signum)


@contextlib.contextmanager
def _stopped_by_signals(progress: _Progress) -> Iterator[None]:
    """Within this context, SIGTERM and SIGHUP raise :class:`_Stopped` where the command is, and
    SIGINT (Ctrl-C) ``KeyboardInterrupt``: the writers' cleanup runs, and no temporary file is left
    (by default the first two end the process at once).  Each is noted in ``progress``, whose next
    message raises it again where a library caught it (torch's lazy imports turn it into an
    ``AttributeError``, which an exporter's fallback would take as a failure); once the output is
    written, a signal is only noted.  Only the main thread can set handlers."""
    wanted = [getattr(signal, name) for name in _STOP_SIGNALS if hasattr(signal, name)]
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        if progress.received is None:
            progress.received = signal.Signals(signum)
        if progress.written is None:  # every one, as Python's Ctrl-C: a library may have caught the first
            raise _stop_exception(signal.Signals(signum))

    previous = {signum: signal.signal(signum, stop) for signum in wanted}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# -- helpers ---------------------------------------------------------------------------------
class _UsageError(Exception):
    """Arguments that parse but make no sense together (exit code 2)."""


def _rewrite(args: argparse.Namespace, say: _Progress, fn: Callable[[dict], dict], done: str,
             to: str | None = None, keep: frozenset[str] | set[str] = frozenset()) -> int:
    """Load ``args.input``, apply ``fn`` to each state dict, write ``args.output``; ``to``: the
    layout ``convert`` writes (pairs already in it are not counted as converted); ``keep``: the
    weights ``fold`` leaves weight-normalized (each must be one, in some state dict)."""
    _check_output_free(args)
    say(f"loading {args.input}")
    checkpoint = load_checkpoint(args.input)
    paths = state_dict_paths(checkpoint)
    if args.key is not None:  # that state dict alone, or the keys under that prefix (a LightningModule's)
        prefixed = _under_prefix(checkpoint, paths, args.key, args.input)
        checkpoint = prefixed if prefixed is not None else _without_nested_state_dicts(
            _get(checkpoint, _keyed_path(paths, args.key, args.input)))
        paths = state_dict_paths(checkpoint)
    prefix = () if args.key is None else (args.key,)  # printed as the file names them
    found = {_path_name((*prefix, *p)): _pairs_in(_get(checkpoint, p), _path_name((*prefix, *p)), args.input)
             for p in paths}
    if not any(found.values()):
        msg = f"{args.input}: no weight-normalized tensors found (looked in {', '.join(found) or 'no state dict'})"
        raise CheckpointError(msg)
    weights = [wn.weight_key for pairs in found.values() for wn in pairs]
    unknown = sorted(keep - set(weights))
    if unknown:
        msg = f"{args.input}: --{unknown_keep_message(unknown, weights, 'any of its state dicts')}"
        raise CheckpointError(msg)
    counts = {where: sum((wn.layout != to or (to is not None and wn.exp_scale)) and wn.weight_key not in keep
                         for wn in pairs) for where, pairs in found.items()}  # (g = e^s pairs become g)
    if not any(counts.values()):
        msg = (f"{args.input}: every weight-normalized tensor is already in the {to} layout; nothing to convert" if to
               else f"{args.input}: every weight-normalized tensor is kept (--keep); nothing to fold")
        raise CheckpointError(msg)
    result = map_state_dicts(checkpoint, fn)
    optimizers = optimizer_states(result)
    renamed = {} if to is None else _rename_parameter_names(
        optimizers, [(set(_get(checkpoint, p)), found[_path_name((*prefix, *p))]) for p in paths], to)
    say(f"writing {args.output}")
    save_checkpoint(result, args.output, force=args.force, inputs=_inputs(args), metadata=safetensors_metadata(args.input))
    say.wrote(args.output)
    for where, count in counts.items():
        kept = len(found[where]) - count
        left = f"already {to}" if to else "kept"
        print(f"{where}: {count} weight-normalized tensors {done}" + (f" ({kept} {left})" if kept else ""))
    built_in = [(where, wn) for where, pairs in found.items() for wn in pairs
                if to is None and wn.weight_key not in keep and wn.dim is not None and wn.dim >= 2]
    for where, wn in built_in:  # no layer type puts its output units there: a class built with it (wav2vec2's pos_conv)
        print(f"{where}: {wn.weight_key} was normalized on dim {wn.dim}, a kernel axis, as a model that builds weight "
              f"norm into its class does (wav2vec2's pos_conv): where the file must load into that class, keep it "
              f"with --keep {wn.weight_key}")
    for path, _ in optimizers:
        if to is None:
            print(f"{_path_name(path)}: an optimizer's state, kept as it was: where it steps g and v, it does not load "
                  "into an optimizer of the folded model (resume training from the unfolded checkpoint)")
        else:
            if renamed.get(path):
                print(f"{_path_name(path)}: an optimizer's state: {renamed[path]} parameter names (param_names) renamed")
            if any(wn.exp_scale for pairs in found.values() for wn in pairs):
                print(f"{_path_name(path)}: an optimizer's state, kept as it was: the moments it holds for s = log g now "
                      "stand beside g itself (resume with a fresh optimizer state for those parameters, or from the "
                      "unconverted checkpoint)")
    return 0


def _rename_parameter_names(optimizers: list[tuple[tuple[str, ...], Any]],
                            state_dicts: list[tuple[set[str], list[StateDictWeightNorm]]], to: str) -> dict[tuple[str, ...], int]:
    """Rename, in place, the g and v names that optimizers made from ``named_parameters()`` keep in
    their ``param_groups`` (``param_names``) to the layout ``to``, each by the state dict (its keys,
    its pairs) that holds all of its names and the fewest others: a discriminator's optimizer
    beside a generator's is not renamed by the generator's pairs.  How many per optimizer; an
    optimizer whose names no state dict holds is left out.  (The checkpoint is the CLI's own
    copy, just loaded.)"""
    counts = {}
    for path, state in optimizers:
        groups = [group for group in state["param_groups"] if isinstance(group, dict)
                  and isinstance(group.get("param_names"), list)]
        names = {name for group in groups for name in group["param_names"]}
        holders = [(len(keys - names), pairs) for keys, pairs in state_dicts if names and names <= keys]
        if not holders:
            continue
        pairs = min(holders, key=lambda holder: holder[0])[1]  # the state dict of its model: the fewest keys beyond
        renames = {old: new for wn in pairs if wn.layout != to
                   for old, new in zip((wn.g_key, wn.v_key), pair_keys(wn.weight_key, to), strict=True)}
        counts[path] = sum(name in renames for name in names)
        for group in groups:
            group["param_names"] = [renames.get(name, name) for name in group["param_names"]]
    return counts


def _describe_state_dict(state_dict: dict[str, torch.Tensor], where: str) -> str:
    found = state_dict_pairs(state_dict)
    in_pairs = {k for wn in found for k in (wn.g_key, wn.v_key, wn.marker_key) if k}
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    plain = [k for k in tensors if k not in in_pairs]
    others = f", {len(state_dict) - len(tensors)} other entries" if len(tensors) < len(state_dict) else ""
    lines = [f"{where}: {len(found)} weight-normalized tensors, {len(plain)} plain tensors{others}, "
             f"{sum(v.numel() for v in tensors.values()):,} values, "
             f"{sum(v.numel() * v.element_size() for v in tensors.values()):,} bytes"]
    if found:
        rows = [("weight", "layout", "axis", "g shape", "v shape")]
        rows += [(wn.weight_key, wn.layout + (" (g = e^s)" if wn.exp_scale else ""), wn.axis,
                  "x".join(map(str, wn.g_shape)) or "scalar", "x".join(map(str, wn.v_shape))) for wn in found]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if plain:
        shown = ", ".join(plain[:8]) + (f", ... ({len(plain) - 8} more)" if len(plain) > 8 else "")
        lines.append(f"  plain: {shown}")
    return "\n".join(lines)


def _build_model(args: argparse.Namespace, say: Callable[[str], None]) -> nn.Module:
    factory = _import_factory(args.model)
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as exc:
        msg = f"--model-kwargs is not valid JSON ({exc})"
        raise _UsageError(msg) from exc
    if not isinstance(kwargs, dict):
        msg = "--model-kwargs must be a JSON object, e.g. '{\"channels\": 256}'"
        raise _UsageError(msg)
    say(f"building {args.model}")
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's code: report whatever it raised
        msg = f"calling {args.model}(**{kwargs}) failed: {type(exc).__name__}: {exc}"
        raise WeightNormError(msg) from exc
    if not isinstance(model, nn.Module):
        msg = f"{args.model} returned a {type(model).__name__}, not a torch.nn.Module"
        raise WeightNormError(msg)
    if args.checkpoint:
        say(f"loading {args.checkpoint}")
        _load_weights(model, load_checkpoint(args.checkpoint), args)
    return model


def _safe_global(name: str) -> tuple[Any, str]:
    """``--safe-global argparse.Namespace``: the object that dotted name imports to (a class nested
    in another, ``mycfg.Outer.Inner``, too; a module in the current folder too), with that name, the
    one the pickle gives it (``numpy.core.multiarray.scalar``, an alias of ``numpy._core``'s)."""
    _current_folder_importable()
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):  # the longest importable module, then attributes
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for part in parts[split:]:
                obj = getattr(obj, part)
        except AttributeError as exc:
            msg = f"{name!r} is not an importable MODULE.NAME ({first_line(exc)})"
            raise argparse.ArgumentTypeError(msg) from exc
        return obj, name
    msg = f"{name!r} is not an importable MODULE.NAME (no module {parts[0]!r} can be imported)"
    raise argparse.ArgumentTypeError(msg)


def _current_folder_importable() -> None:
    """Modules in the current folder can be imported (``--model mypkg.models:build``), as
    ``python -m`` allows."""
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))


def _import_factory(spec: str) -> Callable[..., Any]:
    """The factory ``--model`` names: ``package.module:factory`` (importable from the current
    folder too), or ``path/to/file.py:factory``."""
    module_name, sep, attr = spec.rpartition(":")  # (a Windows path has a colon of its own)
    looks_like_a_path = any(mark in module_name for mark in ("/", "\\")) or module_name.startswith(".")
    if not sep or not module_name or not attr or (looks_like_a_path and not module_name.endswith(".py")):
        msg = f"--model must look like package.module:factory or path/to/models.py:factory, got {spec!r}"
        raise _UsageError(msg)
    _current_folder_importable()
    try:
        obj: Any = _module_from_file(Path(module_name)) if module_name.endswith(".py") else importlib.import_module(module_name)
    except OSError as exc:
        msg = f"cannot read {module_name} (from --model {spec}): {exc.strerror or exc}"
        raise WeightNormError(msg) from exc
    except Exception as exc:  # ImportError, or whatever the module raises at import
        msg = f"cannot import {module_name!r} (from --model {spec}): {type(exc).__name__}: {exc}"
        raise WeightNormError(msg) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            msg = f"{module_name!r} has no attribute {attr!r} (from --model {spec})"
            raise WeightNormError(msg)
        obj = getattr(obj, part)
    if not callable(obj):
        msg = f"{spec} is not callable"
        raise WeightNormError(msg)
    return obj


def _module_from_file(path: Path) -> Any:
    """Import the Python file ``path`` as the module named after it (its folder importable, for
    the imports of its own), as ``python path`` would run it; under a name of its own where that
    name is a module already imported (``./random.py``, ``./typing.py``: never replaced)."""
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)  # after the installed packages: a file named like one does not shadow it
    name = path.stem if path.stem not in sys.modules else f"_wn_transform_model_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (pickle and dataclasses look classes up there)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@dataclass(frozen=True)
class _ModelKeys:
    """What a checkpoint must hold to load into a model: its state-dict keys, their shapes, its own
    weight-norm pairs (a vocoder built with weight norm), and the keys tied to others."""

    keys: frozenset[str]
    shapes: dict[str, tuple[int, ...]]
    pairs: tuple[StateDictWeightNorm, ...]
    tied: dict[str, set[str]]

    @classmethod
    def of(cls, model: nn.Module) -> _ModelKeys:
        """A lazy layer's parameters (``nn.LazyLinear`` before its first call) have no shape yet:
        any fits, as ``load_state_dict`` materializes them."""
        full = model.state_dict()
        state = {k: v for k, v in full.items() if not (isinstance(v, torch.Tensor) and nn.parameter.is_lazy(v))}
        pairs = tuple(state_dict_pairs(state))
        shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        shapes.update({wn.weight_key: wn.v_shape for wn in pairs})  # a plain weight given for a pair
        return cls(frozenset(full), shapes, pairs, _tied_keys(model))

    def missing(self, present: set[str]) -> list[str]:
        """The keys ``present`` lacks, a key tied to a present one not counted, nor an ``exp_scale``
        marker (a pair without it holds ``g``, which the layer's load takes to ``s = log g``).  A
        pair of the model's that is wholly missing is named by its weight (``conv.weight``, not
        ``conv.weight_g`` and ``conv.weight_v``), as the checkpoint's own pairs are named folded;
        one given as a plain weight that could not become the pair (another shape) is not missing
        (:meth:`other_shapes` names it)."""
        markers = {wn.marker_key for wn in self.pairs if wn.marker_key}
        absent = {key for key in self.keys - present - markers if not self.tied.get(key, set()) & present}
        for wn in self.pairs:
            if wn.g_key in absent and wn.v_key in absent:
                absent -= {wn.g_key, wn.v_key}
                if wn.weight_key not in present:
                    absent.add(wn.weight_key)
        return sorted(absent)

    def mismatch(self, state_dict: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
        """The keys ``state_dict`` (fitted) lacks, the keys it has beyond the model's, and those it
        holds in another shape; all empty where it loads."""
        plain = {wn.weight_key for wn in self.pairs}  # a pair's plain weight of another shape: other_shapes
        return (self.missing(set(state_dict)), sorted(set(state_dict) - self.keys - plain),
                sorted(self.other_shapes(state_dict)))

    def distance(self, state_dict: dict[str, Any]) -> int:
        """How many keys ``state_dict`` lacks, has beyond the model's, or holds in another shape."""
        return len(set(state_dict) ^ self.keys) + len(self.other_shapes(state_dict))

    def other_shapes(self, state_dict: dict[str, Any]) -> list[str]:
        """The keys whose tensor in ``state_dict`` has another shape than the model's."""
        return [k for k, v in state_dict.items()
                if isinstance(v, torch.Tensor) and k in self.shapes and tuple(v.shape) != self.shapes[k]]


def _load_weights(model: nn.Module, checkpoint: Any, args: argparse.Namespace) -> None:
    """Load a (possibly nested, DataParallel-prefixed, weight-normalized) state dict: the one
    ``--key`` names, else the only one, else the only one that fits the model (the module a
    factory's ``DataParallel`` or ``torch.compile`` wrapper holds: the wrapper's keys carry a prefix)."""
    model = routed_module(model)
    paths = state_dict_paths(checkpoint)
    expected = _ModelKeys.of(model)
    prefixed = _under_prefix(checkpoint, paths, args.key, args.checkpoint) if args.key is not None else None
    hint_path: tuple[str, ...] = ()
    if prefixed is not None:  # Lightning's {"state_dict": {"generator.conv_pre.weight": ...}}: --key generator
        checkpoint, path, hint_path = prefixed, (), tuple(args.key.split("."))  # (a hint's prefix goes after --key's)
    elif args.key is not None:
        path = _keyed_path(paths, args.key, args.checkpoint)
    elif len(paths) == 1:
        path = paths[0]
    else:
        path = _the_one_that_fits(checkpoint, paths, expected, args)
    state_dict = _fitted(_get(checkpoint, path), expected)
    missing, unexpected, reshaped = expected.mismatch(state_dict)
    if missing or unexpected or (reshaped and not set(reshaped) <= expected.keys):  # (torch's error names shapes)
        msg = (f"{args.checkpoint}: does not fit {args.model}: {'; '.join(_mismatch(state_dict, expected))}"
               f"{_prefix_hint(state_dict, expected, hint_path) or _transformers_hint(model)}")
        raise CheckpointError(msg)
    disagree = sorted(f"{key} and {other}" for key, others in expected.tied.items() for other in others
                      if key < other and key in state_dict and other in state_dict
                      and not _same_values(state_dict[key], state_dict[other]))
    if disagree:
        msg = (f"{args.checkpoint}: holds different values for names that are one Parameter in {args.model} (tied): "
               f"{few(disagree)}; loading would keep one and lose the other")
        raise CheckpointError(msg)
    try:  # not strict where a key is left out for the one it is tied to (an LM head and its embedding)
        model.load_state_dict(state_dict, strict=set(state_dict) == expected.keys)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines()[1:] if line.strip()]  # after torch's header
        listed = "; ".join(lines[:3]) + (f"; ... ({len(lines) - 3} more)" if len(lines) > 3 else "")
        msg = f"{args.checkpoint}: does not fit {args.model}: {listed or str(exc).strip()}"
        raise CheckpointError(msg) from exc


def _the_one_that_fits(checkpoint: Any, paths: list[tuple[str, ...]], expected: _ModelKeys,
                       args: argparse.Namespace) -> tuple[str, ...]:
    """The path of the one state dict that fits the model; where none does, an error that names the
    closest and what keeps it from fitting; where several do, one that asks for ``--key``."""
    fitted = {path: state_dict for path in paths
              if (state_dict := _fitted_or_none(_get(checkpoint, path), expected)) is not None}
    fitting = [path for path, state_dict in fitted.items() if not _mismatch(state_dict, expected)]
    if len(fitting) == 1:
        return fitting[0]
    if fitting:
        msg = (f"{args.checkpoint}: holds {len(fitting)} state dicts that fit {args.model} "
               f"({_list_paths(fitting)}); choose one with --key")
        raise CheckpointError(msg)
    hint = next((hint for path in paths if (hint := _prefix_hint(_get(checkpoint, path), expected, path))), "")
    closest = min(fitted, key=lambda path: expected.distance(fitted[path]), default=None)
    why = "" if closest is None or hint else (f" (the closest, {_path_name(closest)}: "
                                              f"{'; '.join(_mismatch(fitted[closest], expected))})")
    msg = f"{args.checkpoint}: none of its {len(paths)} state dicts ({_list_paths(paths)}) fits {args.model}{why}{hint}"
    raise CheckpointError(msg)


def _mismatch(state_dict: dict[str, Any], expected: _ModelKeys) -> list[str]:
    """What keeps ``state_dict`` (fitted) from loading into the model, in words; empty where it fits."""
    return [f"{what} {few(keys)}" for what, keys in zip(("missing keys", "unexpected keys", "other shapes for"),
                                                         expected.mismatch(state_dict)) if keys]


def _fitted_or_none(state_dict: dict[str, Any], expected: _ModelKeys) -> dict[str, Any] | None:
    """:func:`_fitted`, or None for a state dict with a pair that cannot take the model's layout
    (not this model's weights)."""
    try:
        return _fitted(state_dict, expected)
    except WeightNormError:
        return None


def _fits(state_dict: dict[str, Any], expected: _ModelKeys) -> bool:
    """Whether ``state_dict`` loads into the model (see :func:`_fitted`): its keys, and their shapes."""
    fitted = _fitted_or_none(state_dict, expected)
    return fitted is not None and not _mismatch(fitted, expected)


def _same_values(a: Any, b: Any) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


def _tied_keys(model: nn.Module) -> dict[str, set[str]]:
    """Per state-dict key of ``model``, the other keys that hold the same tensor (tied weights: a
    language model's output layer and its embedding), which a checkpoint may hold once
    (``save_pretrained`` leaves the tied copy out)."""
    return {key: set(keys) - {key} for keys in param_aliases(model).values() if len(keys) > 1 for key in keys}


def _fitted(state_dict: dict[str, Any], expected: _ModelKeys) -> dict[str, Any]:
    """``state_dict`` as it would load into the model: without values that are neither tensors nor
    a module's ``_extra_state`` (``"epoch": 3``, a nested ``"ema": sd``, listed on its own),
    without wrapper prefixes, and with weight-norm pairs made to fit the model's layers, when that
    makes the keys fit (:func:`~wn_transform.state_dict.fit_state_dict`)."""
    keys = expected.keys
    state_dict = {k: v for k, v in state_dict.items()
                  if isinstance(v, torch.Tensor) or k in keys or k.endswith("_extra_state")}
    state_dict = _strip_wrapper_prefixes(state_dict, keys)
    if (set(state_dict) != keys or expected.other_shapes(state_dict)) and (
            expected.pairs or state_dict_pairs(state_dict)):
        # Trained with weight norm, loading into a plain model: fold the pairs the model does not
        # have; a model built with weight norm on some layers (wav2vec2's pos_conv, a vocoder) keeps
        # those, in the layout it was built with (torch's legacy hooks or parametrizations), and
        # normalizes a plain weight (or a pair on another axis) there.
        # A checkpoint that still does not fit is compared after this where that brings its keys
        # closer: a missing bias is named as missing, not every weight of the model.
        fitted = fit_state_dict(state_dict, keys, expected.pairs)
        if expected.distance(fitted) < expected.distance(state_dict):
            state_dict = fitted
    return state_dict


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP (and AveragedModel), torch.compile
_WRAPPER_ENTRIES = {"module.": {"n_averaged"}}  # a wrapper's own entries beside the prefixed ones: AveragedModel's count


def _strip_wrapper_prefixes(state_dict: dict[str, Any], expected: frozenset[str]) -> dict[str, Any]:
    """``state_dict`` without the prefixes DataParallel/DDP (``module.``) and ``torch.compile``
    (``_orig_mod.``) add to every key, for a model whose keys have none of them; an
    ``AveragedModel``'s ``module.`` keys without its ``n_averaged`` count."""
    while state_dict and not expected & set(state_dict):
        prefix = next((p for p in _WRAPPER_PREFIXES if any(k.startswith(p) for k in state_dict)
                       and all(k.startswith(p) or k in _WRAPPER_ENTRIES.get(p, ()) for k in state_dict)), None)
        if prefix is None:
            break
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def _pairs_in(state_dict: dict[str, Any], where: str, file: str) -> list:
    """:func:`~wn_transform.state_dict.state_dict_pairs` of the state dict ``where`` in ``file``,
    whose errors name both (a checkpoint holds a model's and its EMA's)."""
    try:
        return state_dict_pairs(state_dict)
    except WeightNormError as exc:
        msg = f"{file} (state dict {where}): {exc}"
        raise WeightNormError(msg) from exc


def _under_prefix(checkpoint: Any, paths: list[tuple[str, ...]], key: str, file: str) -> dict[str, Any] | None:
    """The entries of the one state dict whose keys start with ``<key>.``, the prefix taken off, where
    no state dict is *named* ``key`` (a LightningModule saves ``self.generator`` as
    ``state_dict["generator.conv_pre.weight"]``); ``PATH.PREFIX`` takes those under ``PREFIX.`` in the
    state dict ``PATH`` (Lightning's weight averaging keeps ``model.`` keys in ``state_dict`` and in
    ``current_model_state``: ``state_dict.model``).  None where no state dict holds such keys; an
    error where several do."""
    if any(_path_name(p) == key or p == tuple(key.split(".")) for p in paths):
        return None
    candidates = [(p, key) for p in paths] + [(p, key[len(_path_name(p)) + 1:]) for p in paths
                                              if key.startswith(f"{_path_name(p)}.")]
    holders = [(p, prefix) for p, prefix in candidates if any(k.startswith(f"{prefix}.") for k in _get(checkpoint, p))]
    if not holders:
        return None
    if len(holders) > 1:
        names = [f"{_path_name(p)}.{prefix}" for p, prefix in holders]
        msg = (f"{file}: keys under '{key}.' are in {len(holders)} state dicts ({_list_paths([p for p, _ in holders])}): "
               f"choose one with --key {' or --key '.join(names)}")
        raise CheckpointError(msg)
    path, prefix = holders[0]
    return {k[len(prefix) + 1:]: v for k, v in _get(checkpoint, path).items() if k.startswith(f"{prefix}.")}


def _prefix_hint(state_dict: dict[str, Any], expected: _ModelKeys, path: tuple[str, ...] = ()) -> str:
    """Advice for a state dict whose keys fit the model once a first component is taken off
    (a LightningModule's ``generator.conv_pre.weight``): ``--key generator`` (``PATH.generator``
    for the state dict at ``path`` among others); else nothing."""
    prefixes = sorted({k.split(".", 1)[0] for k in state_dict if "." in k})
    for prefix in prefixes:
        under = {k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
        if _fits(under, expected):
            key = f"{_path_name(path)}.{prefix}" if path else prefix
            return f" (the keys under '{prefix}.' fit it: choose them with --key {key})"
    module = {k.split(".", 1)[0] for k in expected.keys}
    if len(module) == 1 and all("." in k for k in expected.keys):
        (prefix,) = module
        if _fits({f"{prefix}.{k}": v for k, v in state_dict.items()}, expected):
            return (f" (they fit it under '{prefix}.': the checkpoint holds the state dict of the model's '{prefix}' "
                    f"module alone; give --model a factory that returns that module, or save the whole model's)")
    return ""


def _transformers_hint(model: nn.Module) -> str:
    """Advice for a Hugging Face ``transformers`` model whose checkpoint names do not fit its
    modules: transformers 5 saves many models (ViT, CLIP, Mimi...) under older checkpoint names
    that its ``from_pretrained`` renames on load; else nothing."""
    if not any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__):
        return ""
    return (" (a transformers model: save_pretrained writes some models' weights under older names that "
            "from_pretrained renames on load; build it in the factory with from_pretrained(folder) and leave out "
            "--checkpoint)")


def _keyed_path(paths: list[tuple[str, ...]], key: str, file: str) -> tuple[str, ...]:
    """The state dict ``--key`` names, as :func:`_list_paths` prints it (``model.ema`` for
    ``{"model.ema": ...}`` or ``{"model": {"ema": ...}}``)."""
    named = [p for p in paths if _path_name(p) == key] or [p for p in paths if p == tuple(key.split("."))]
    if len(named) != 1:
        what = "no state dict" if not named else f"{len(named)} state dicts"
        msg = f"{file}: {what} under --key {key} (found: {_list_paths(paths)})"
        raise CheckpointError(msg)
    return named[0]


def _shape(text: str) -> tuple[int, ...]:
    """``--input-shape``: comma-separated positive integers (argparse reports a bad one)."""
    try:
        shape = tuple(int(n) for n in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        msg = f"must be comma-separated positive integers such as 1,80,100, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return shape


def _tolerance(text: str) -> float:
    """``--rtol``/``--atol``: a finite number >= 0 (argparse reports a bad one)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        msg = f"must be a finite number >= 0 such as 1e-3, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


@dataclass(frozen=True)
class _DynamicAxis:
    """One ``--dynamic`` entry: ``axis`` of the input ``where`` (a position or keyword of the batch;
    None: every input) is dynamic, named ``name`` in the graph (None: a name made from the axis)."""

    where: str | None
    axis: int
    name: str | None


def _dynamic_axes(text: str) -> tuple[_DynamicAxis, ...]:
    """``--dynamic``: comma-separated ``[INPUT:]AXIS[=NAME]``, or ``none`` (argparse reports a bad one)."""
    if text.strip().lower() == "none":
        return ()
    axes = []
    for part in text.split(","):
        spec, _, name = part.strip().partition("=")
        where, _, axis = spec.rpartition(":")
        try:
            index = int(axis)
        except ValueError:
            index = None
        if index is None or (name and not name.isidentifier()) or (":" in spec and not where):
            msg = (f"{part.strip()!r} is not [INPUT:]AXIS[=NAME] (such as 2=frames, 0=batch or mel:2=frames); "
                   f"a list of them is comma-separated, or 'none'")
            raise argparse.ArgumentTypeError(msg)
        axes.append(_DynamicAxis(where or None, index, name or None))
    return tuple(axes)


def _dynamic_shapes(axes: tuple[_DynamicAxis, ...], batch: Any, model: nn.Module) -> tuple | dict | None:
    """``export_onnx``'s ``dynamic_shapes`` for ``--dynamic``: per input of ``batch`` (a tensor, a
    tuple or a dict of inputs) ``{axis: name}``.  An axis without a name is ``batch`` (axis 0),
    ``dim<axis>`` (a batch of one tensor) or ``<input>_dim<axis>``, so unnamed axes of different
    inputs are not tied.  Axes with one name must have one size in ``batch`` (the graph declares
    them equal).  A positional input is named by its position or by the forward's argument (``0``
    or ``mel``); a dict batch is keyed as ``torch.export`` binds it to the forward's signature
    (keys a ``**inputs`` forward collects go under ``inputs``)."""
    if not axes:
        return None
    if isinstance(batch, dict):
        inputs, aliases = dict(batch), {}
    else:
        values = batch if isinstance(batch, (tuple, list)) else (batch,)
        inputs = {str(i): v for i, v in enumerate(values)}
        aliases = dict(zip(_positional_names(model), inputs))
    axes = tuple(_DynamicAxis(aliases.get(a.where, a.where), a.axis, a.name) for a in axes)
    unknown = sorted({a.where for a in axes if a.where is not None} - set(inputs))
    if unknown:
        known = ", ".join(f"{key!r}" + (f" ({name})" if (name := _alias_of(aliases, key)) else "") for key in inputs)
        msg = f"--dynamic names {', '.join(map(repr, unknown))}, but the batch's inputs are {known}"
        raise _UsageError(msg)
    several = sum(isinstance(v, torch.Tensor) for v in inputs.values()) > 1
    shapes: dict[str, dict[int, str] | None] = {}
    for key, value in inputs.items():
        shapes[key] = _input_axes(key, value, [a for a in axes if a.where in (None, key)],
                                  _alias_of(aliases, key) or key, several=several, alone=len(inputs) == 1)
    _check_same_sizes(shapes, inputs, {key: _alias_of(aliases, key) or key for key in inputs})
    if not isinstance(batch, dict):
        return tuple(shapes.values())
    return _bound_shapes(shapes, model)


def _input_axes(key: str, value: Any, covered: list[_DynamicAxis], label: str, *, several: bool,
                alone: bool) -> dict[int, str] | None:
    """``{axis: name}`` for the ``--dynamic`` entries that cover one input (``key``, called
    ``label`` in default names); ``several``: the batch has more than one tensor input."""
    if not isinstance(value, torch.Tensor):
        if any(a.where == key for a in covered):
            msg = f"--dynamic: input {key!r} is not a tensor ({type(value).__name__}); it has no axes"
            raise _UsageError(msg)
        return None
    spec = {}
    for entry in covered:
        if not -value.ndim <= entry.axis < value.ndim:
            hint = "; give the input it belongs to, as INPUT:AXIS" if entry.where is None and not alone else ""
            msg = f"--dynamic: input {key!r} has shape {list(value.shape)}, no axis {entry.axis}{hint}"
            raise _UsageError(msg)
        axis = entry.axis % value.ndim
        spec[axis] = entry.name or _default_axis_name(axis, label, several=several)
    return spec or None


def _default_axis_name(axis: int, label: str, *, several: bool) -> str:
    """The name of an unnamed ``--dynamic`` axis: ``batch`` for axis 0, else ``dim<axis>``, or
    ``<input>_dim<axis>`` when the batch has several tensor inputs (their sizes may differ)."""
    if axis == 0:
        return "batch"
    if not several:
        return f"dim{axis}"
    return f"{label if label.isidentifier() else f'input_{label}'}_dim{axis}"


def _check_same_sizes(shapes: dict[str, dict[int, str] | None], inputs: dict[str, Any], labels: dict[str, str]) -> None:
    """Raise a usage error when one axis name covers axes of different sizes in the sample batch:
    the graph would declare them equal and verification would only try equal sizes."""
    from .export import size_conflict  # (as export_onnx: the CLI's other commands do not load the exporter)

    conflict = size_conflict([(name, labels[key], axis, inputs[key].shape[axis])
                              for key, spec in shapes.items() for axis, name in (spec or {}).items()])
    if conflict is not None:
        (name, first, first_axis, first_size), (_, label, axis, size) = conflict
        msg = (f"--dynamic: {name!r} names {first}[{first_axis}] ({first_size}) and {label}[{axis}] ({size}), which "
               f"differ in the sample batch; give them different names (INPUT:AXIS=NAME, e.g. {label}:{axis}={name}_{label})")
        raise _UsageError(msg)


def _bound_shapes(shapes: dict[str, dict[int, str] | None], model: nn.Module) -> dict[str, Any]:
    """Dynamic shapes of a dict batch keyed as ``torch.export`` wants them: by the forward's
    ``signature.bind(**batch).arguments``, so the keys a ``forward(self, **inputs)`` collects nest
    under ``inputs``; as they are when the forward has no signature or does not take them."""
    try:
        return dict(inspect.signature(model.forward).bind(**shapes).arguments)
    except (TypeError, ValueError):  # the export reports a batch the forward does not take
        return shapes


def _positional_names(model: nn.Module) -> list[str]:
    """The names of the forward's positional arguments, in order (none if it takes ``*args``)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in parameters if p.kind in kinds]


def _alias_of(aliases: dict[str, str], key: str) -> str | None:
    return next((name for name, target in aliases.items() if target == key), None)


def _read_batch(args: argparse.Namespace, name: str, model: nn.Module) -> Any:
    """The batch file ``--<name>`` names, else a random ``--input-shape`` batch in the dtype of the
    model's first floating-point parameter (a half-precision model rejects float32 inputs)."""
    path = getattr(args, name, None)
    if path is not None:
        return load_batch(path)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        return torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    except (RuntimeError, MemoryError) as exc:  # the allocator: more memory than there is
        msg = (f"--input-shape {','.join(map(str, args.input_shape))}: cannot make a random batch of this shape "
               f"({first_line(exc)}); give a smaller shape")
        raise WeightNormError(msg) from exc


# Suffixes of files other than checkpoints, which the CLI reads as such (batches, configs): refused as outputs
_OTHER_FILES = frozenset({".onnx", ".npz", ".npy", ".json", ".yaml", ".yml", ".txt", ".csv", ".h5", ".hdf5", ".gguf",
                          ".msgpack", ".tflite", ".pb", ".pt2", ".engine", ".plan", ".mlmodel", ".xml"})  # (any case)


def _check_output_free(args: argparse.Namespace) -> None:
    """Fail before any work if an input file given is missing, if the output (or an export's
    ``<output>.data``) exists (without --force), is an input, a folder or not a regular file (a
    device, FIFO), or if its suffix names another kind of file than the command writes (a checkpoint
    to .onnx or .npz, an ONNX model to .pt)."""
    for name in ("checkpoint", "calib", "sample"):  # found missing now, not after the model is built
        given = getattr(args, name, None)
        if given is not None and not Path(given).is_file():
            msg = f"{given}: {'not a file' if Path(given).exists() else 'no such file'} (--{name})"
            raise CheckpointError(msg)
    check_output(args.output, force=args.force, inputs=_inputs(args))  # the text: a trailing separator counts
    output = Path(args.output)
    suffix = output.suffix.lower()
    if (args.command == "export") != (suffix == ".onnx") or (args.command != "export" and suffix in _OTHER_FILES):
        also = "; wn-transform export writes ONNX" if suffix == ".onnx" else ""
        msg = (f"{args.command} writes a checkpoint (torch.save's archive: .pt, .pth, .bin..., or .safetensors), "
               f"not {output.name}{also}" if args.command != "export"
               else f"export writes an ONNX model: name the output *.onnx, not {output.name}")
        raise _UsageError(msg)
    data = Path(f"{args.output}.data")  # where an export above 2 GB puts its weights
    if args.command == "export" and (data.exists() or data.is_symlink()):
        check_output(data, force=args.force, inputs=_inputs(args))


def _inputs(args: argparse.Namespace) -> tuple[str, ...]:
    names = ("input", "checkpoint", "calib", "sample")
    return tuple(file for n in names if getattr(args, n, None) for file in files_of(getattr(args, n)))


def _without_nested_state_dicts(state_dict: Any) -> Any:
    """``state_dict`` without the entries that hold other state dicts (``{**sd, "ema": sd}`` selected
    by ``--key "(top level)"``: its own tensors, not ``ema``); other values stay."""
    nested = {path[0] for path in state_dict_paths(state_dict) if path}
    if not nested or not isinstance(state_dict, Mapping):
        return state_dict
    return rebuilt_like(state_dict, ((k, v) for k, v in state_dict.items() if k not in nested))


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        obj = obj[int(part)] if isinstance(obj, (list, tuple)) else obj[part]
    return obj


def _path_name(path: tuple[str, ...]) -> str:
    """A state dict's path as the CLI prints it and ``--key`` takes it: ``generator``, ``ema.0``."""
    return ".".join(path) or "(top level)"


def _list_paths(paths: list[tuple[str, ...]]) -> str:
    return ", ".join(map(_path_name, paths)) or "none"



if __name__ == "__main__":
    console_script()
