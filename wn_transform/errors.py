"""The exceptions this library raises.  All derive from :class:`WeightNormError`."""

from __future__ import annotations

__all__ = ["BatchError", "FoldError", "NoTargetsError", "SelectionError", "WeightNormError"]


def few(names: list[str], most: int = 5) -> str:
    """``"a, b, c, ... (7 more)"`` for a message; ``"none"`` for no names."""
    if not names:
        return "none"
    return ", ".join(names[:most]) + (f", ... ({len(names) - most} more)" if len(names) > most else "")


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
