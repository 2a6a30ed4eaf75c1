"""The exceptions this library raises.  All derive from :class:`WeightNormError`."""

from __future__ import annotations

import os
import re
import sys
import warnings

import torch

__all__ = ["BatchError", "FoldError", "NoTargetsError", "SelectionError", "WeightNormError"]


def few(names: list[str], most: int = 5) -> str:
    """``"a, b, c, ... (7 more)"`` for a message; ``"none"`` for no names."""
    if not names:
        return "none"
    return ", ".join(names[:most]) + (f", ... ({len(names) - most} more)" if len(names) > most else "")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes some tools put in their messages
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep  # its modules call ours (.half(), hooks)


def first_line(exc: BaseException) -> str:
    """``Type: first non-blank line of the message`` (colour codes removed), for a one-line error;
    a line that announces more (it ends with ``:``) or leaves a bracket open runs on into the next
    ones (torch's "Found the following conflicts ...:" names the axis on the line after)."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    for line in lines[1:]:
        announces = first.endswith(":") or first.count("(") > first.count(")") or first.count("[") > first.count("]")
        if len(first) >= 300 or not announces or line.startswith(("Traceback", 'File "')):
            break
        first = f"{first} {line}"
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def one_line(exc: BaseException) -> str:
    """:func:`first_line` of the root cause (``raise ... from``), under ``exc``'s type; at most 300 characters."""
    root, seen = exc, {id(exc)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    line = first_line(root)
    if root is not exc:
        line = f"{type(exc).__name__}: {line}"
    return line if len(line) <= 300 else line[:297] + "..."


def warn_user(msg: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first line outside this package and torch: the user's call."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith((_PACKAGE, _TORCH)):
        frame, level = frame.f_back, level + 1
    warnings.warn(msg, category, stacklevel=level)


def unknown_keep_message(unknown: list[str], weights: list[str], where: str) -> str:
    """The error for ``keep`` names that are no weight-normalized weight of ``where`` (``weights``:
    those there are, as ``X.weight``); a name that is one's module, ``g`` or ``v`` (``X``,
    ``X.weight_g``, ``X.parametrizations.weight.original0``) is answered with the weight's name."""
    hints = []
    for name in unknown:
        parts = [w for w in weights if name in _keep_aliases(w)]
        if parts:
            names = " and ".join(map(repr, parts))
            hints.append(f"{name!r} is part of {names}, the name{'s' if len(parts) > 1 else ''} to pass")
    verb = "is" if len(unknown) == 1 else "are"
    hint = f" ({'; '.join(hints)})" if hints else f"; those there are: {few(weights)}"
    return f"keep names {', '.join(unknown)}, which {verb} not weight-normalized in {where}{hint}"


def _keep_aliases(weight: str) -> set[str]:
    module, _, name = weight.rpartition(".")
    prefix = f"{module}." if module else ""
    chain = f"{prefix}parametrizations.{name}"
    return {module, f"{prefix}{name}_g", f"{prefix}{name}_v", chain, f"{chain}.original0", f"{chain}.original1"}


class WeightNormError(ValueError):
    """Base class: the input cannot be weight-normalized or folded as asked."""


class BatchError(WeightNormError):
    """The sample batch is unusable: NaN values, no rows, on the meta device, or the model rejects it (the layer is named)."""


class SelectionError(WeightNormError):
    """An include/exclude/type/filter rule matches no weight the model has."""


class NoTargetsError(WeightNormError):
    """The model has no weight that reaches a linear or convolution op."""


class FoldError(WeightNormError):
    """A weight-normalized weight cannot be folded back to a plain tensor."""
