"""Sample batches: a tensor, a tuple of positional inputs, or a dict of keyword inputs.

:func:`run` calls the model on a batch and, when the model raises, says which layer
raised (the innermost module whose forward was running).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_leaves, tree_map_only

from .errors import BatchError, WeightNormError
from .moments import all_reduce, collective_device
from ._parametrized import plain_type

__all__ = ["SampleBatch", "as_args", "check_measurable", "check_no_nan", "compiled_code_eager",
           "copied_args", "layer_tracker", "run", "tensors_of"]

SampleBatch = Union[torch.Tensor, tuple, list, Mapping[str, Any]]


def as_args(batch: SampleBatch) -> tuple[tuple, dict]:
    """Split a sample batch into ``(args, kwargs)`` for ``model(*args, **kwargs)``; a
    ``PackedSequence`` (a namedtuple) is one input, as a recurrent layer takes it."""
    if isinstance(batch, (torch.Tensor, PackedSequence)):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    msg = (
        f"sample_batch must be a tensor, a tuple of positional inputs or a dict of keyword "
        f"inputs, got {type(batch).__name__}"
    )
    raise TypeError(msg)


def check_no_nan(batch: SampleBatch) -> None:
    """Refuse a batch holding NaN, naming the input that holds it (a meta tensor has no values to
    check: tracing takes it).  Infinities are allowed: an additive attention mask holds -inf
    (``nn.Transformer.generate_square_subsequent_mask``); one that reaches a layer's statistics
    is the data-dependent init's error, which names the layer."""
    for where, leaf in tensors_of(batch):
        if leaf.is_floating_point() and not leaf.is_meta and bool(leaf.isnan().any()):
            msg = f"the sample batch holds NaN values ({where}); calibration and export checks need numbers"
            raise BatchError(msg)


def check_measurable(batch: SampleBatch, group: dist.ProcessGroup | None = None) -> None:
    """Refuse a batch the data-dependent init cannot measure: one on the meta device (no values),
    or one whose tensors are all empty (no rows).  A layer that only some rows reach (an expert
    of a mixture) is the init's business: it keeps its scale when no row reaches it.  Under a
    process ``group`` the batch is every rank's shard together: one rank's may be empty, and every
    rank takes the same decision (one all-reduce)."""
    tensors = tensors_of(batch)
    meta = next((where for where, leaf in tensors if leaf.is_meta), None)
    empty = bool(tensors) and all(leaf.numel() == 0 for _, leaf in tensors)
    if group is not None:
        device = collective_device(group, next((leaf.device for _, leaf in tensors if leaf.is_cuda), None))
        flags = torch.tensor([meta is not None, not empty], dtype=torch.float32, device=device)
        all_reduce(flags, dist.ReduceOp.MAX, group)
        if meta is None and bool(flags[0]):
            meta = "on another rank"
        empty = not bool(flags[1])
    if meta is not None:
        msg = (f"the sample batch is on the meta device ({meta}), which holds no values; the data-dependent init "
               "measures each layer's outputs on real data: pass a batch on the model's device, or use init='preserve'")
        raise BatchError(msg)
    if empty:
        shapes = ", ".join(f"{where} {tuple(leaf.shape)}" for where, leaf in tensors[:3])
        shards = " on every rank of the process group" if group is not None else ""
        msg = (f"the sample batch is empty{shards} ({shapes}); the data-dependent init measures each layer's outputs "
               "on its rows: pass at least one sample (a few hundred give steady statistics)")
        raise BatchError(msg)


def tensors_of(batch: SampleBatch) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the batch, with where it is (``input 0``, ``input 'mask'``)."""
    args, kwargs = as_args(batch)
    named = [(f"input {i}", a) for i, a in enumerate(args)] + [(f"input '{k}'", v) for k, v in kwargs.items()]
    return [(where, leaf) for where, value in named for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


@contextlib.contextmanager
def layer_tracker() -> Iterator[list[nn.Module]]:
    """Yield the stack of modules whose forward is running, innermost last.

    Two global module hooks (not two per module: registering thousands of hooks on a large
    model costs more than the forward pass); modules are named only if something fails
    (:func:`describe_failure`).
    """
    stack: list[nn.Module] = []

    def enter(module: nn.Module, args: Any) -> None:
        stack.append(module)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop()

    handles = [nn.modules.module.register_module_forward_pre_hook(enter),
               nn.modules.module.register_module_forward_hook(leave)]
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def copied_args(batch: SampleBatch) -> tuple[tuple, dict]:
    """:func:`as_args` on a copy of the batch (see :func:`run`): a deep copy, so that objects holding
    tensors are copied too (a Hugging Face ``DynamicCache`` the forward appends to), and tensors
    that share memory still do; where the batch cannot be deep-copied (a tensor with a graph
    behind it, a tensor subclass, an object whose ``__getattr__`` answers every name), a copy of
    each tensor (with a subclass's attributes), a tensor given twice copied once."""
    try:
        return as_args(copy.deepcopy(batch))
    except Exception:  # noqa: BLE001 - a user object's __deepcopy__/__reduce_ex__/__getattr__ may raise anything
        pass
    copies: dict[int, torch.Tensor] = {}

    def clone_once(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in copies:
            clone = tensor.clone()
            if type(tensor) is not torch.Tensor and getattr(tensor, "__dict__", None):
                clone.__dict__.update(tensor.__dict__)  # a subclass's metadata (a sampling rate): clone() drops it
            copies[id(tensor)] = clone
        return copies[id(tensor)]

    return tree_map_only(torch.Tensor, clone_once, as_args(batch))


def run(model: nn.Module, batch: SampleBatch, *, given: Callable[[tuple, dict], None] | None = None) -> Any:
    """``model(*args, **kwargs)`` on a copy of the batch's tensors; a failure names the layer where it
    happened.

    The library may run the model on the batch several times (discovery, the init pass, an export's
    checks); a forward that changes its input in place (``x /= 255``, an in-place activation first)
    would otherwise see, from the second run on, what the first made of it, and leave the
    caller's batch changed.  A tensor given twice stays one tensor.  ``given`` is called with the
    copies, as the model gets them, before it runs.
    """
    args, kwargs = copied_args(batch)
    if given is not None:
        given(args, kwargs)
    with layer_tracker() as stack, compiled_code_eager():
        try:
            return model(*args, **kwargs)
        except WeightNormError:  # ours, raised while the model ran (a failed reduction across ranks): as it is
            raise
        except Exception as exc:
            raise BatchError(describe_failure(model, stack, exc)) from exc


@contextlib.contextmanager
def compiled_code_eager() -> Iterator[None]:
    """Run what ``torch.compile`` wraps inside a model (a compiled submodule, a compiled helper
    function) as plain Python: the library's passes intercept torch functions and swap what a
    layer's weight reads between runs, which dynamo cannot trace or guard on.  The same ops run,
    so the values are the model's.  (``torch.compiler.set_stance``, torch 2.6 on; before, as is;
    and nothing to do where dynamo was never imported: nothing is compiled.)  Torch's warning that
    a compiled module fires global module hooks (:func:`layer_tracker`'s) an extra time is muted:
    those hooks keep a balanced stack.

    Both are process-wide settings: the first of overlapping calls (threads) sets them and the last
    one out puts back what the first found."""
    global _eager_depth, _eager_settings
    with _eager_lock:
        if _eager_depth == 0:
            _eager_settings = _eager_stack()
        _eager_depth += 1
    try:
        yield
    finally:
        with _eager_lock:
            _eager_depth -= 1
            if _eager_depth == 0:
                _eager_settings.close()


_eager_lock = threading.Lock()
_eager_depth = 0  # compiled_code_eager calls in progress
_eager_settings = contextlib.ExitStack()  # what the first of them changed, to put back


def _eager_stack() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is not None and "torch._dynamo" in sys.modules:
        try:
            stack.enter_context(set_stance("force_eager"))
        except (RuntimeError, ImportError):  # a platform where dynamo cannot run: nothing can be compiled
            pass
    return stack


def describe_failure(model: nn.Module, stack: list[nn.Module], exc: Exception) -> str:
    """Name the innermost module of ``model`` on ``stack`` (modules outside it are skipped)."""
    names = {id(module): name for name, module in model.named_modules()}
    module = next((m for m in reversed(stack) if id(m) in names), model)
    name = names[id(module)] or "<root>"
    kind = plain_type(module).__name__
    return f"the model rejected the sample batch in layer '{name}' ({kind}): {type(exc).__name__}: {exc}"
