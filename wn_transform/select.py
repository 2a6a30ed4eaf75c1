"""Which of the discovered weights to reparameterize: include/exclude patterns, types, a filter.

A pattern is matched (``fnmatch``) against the qualified name of the weight
(``encoder.fc1.weight``) and of its module (``encoder.fc1``).  A rule that matches none
of the discovered weights is an error, never a silent no-op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from .errors import SelectionError
from .targets import Skipped, Target

__all__ = ["FilterFn", "Selection"]

FilterFn = Callable[[nn.Module, str], bool]


def _as_tuple(value: str | Sequence[str] | type | Sequence[type] | None) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, type)):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class Selection:
    """``include``/``exclude``: name patterns; ``types``: module classes; ``filter_fn(module, module_name)``."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    types: tuple[type, ...] = ()
    filter_fn: FilterFn | None = None

    @classmethod
    def build(cls, include=None, exclude=None, types=None, filter_fn: FilterFn | None = None) -> Selection:
        selection = cls(_as_tuple(include), _as_tuple(exclude), _as_tuple(types), filter_fn)
        for t in selection.types:
            if not (isinstance(t, type) and issubclass(t, nn.Module)):
                msg = f"types must be nn.Module subclasses, got {t!r}"
                raise TypeError(msg)
        return selection

    def apply(self, model: nn.Module, targets: list[Target]) -> tuple[list[Target], list[Skipped]]:
        """Split ``targets`` into the selected ones and the ones a rule left out."""
        modules = {t.qualname: model.get_submodule(t.module) for t in targets}
        available = ", ".join(t.qualname for t in targets) or "none"

        def matches(pattern: str, target: Target) -> bool:
            return fnmatchcase(target.qualname, pattern) or fnmatchcase(target.module, pattern)

        for rule, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(matches(pattern, t) for t in targets):
                    msg = f"{rule} pattern {pattern!r} matches none of the weights found ({available})"
                    raise SelectionError(msg)
        for kind in self.types:
            if not any(isinstance(modules[t.qualname], kind) for t in targets):
                msg = f"types entry {kind.__name__} matches none of the weights found ({available})"
                raise SelectionError(msg)

        selected, left_out = [], []
        for target in targets:
            module = modules[target.qualname]
            if self.include and not any(matches(p, target) for p in self.include):
                left_out.append(Skipped(target.qualname, "not matched by include"))
            elif any(matches(p, target) for p in self.exclude):
                left_out.append(Skipped(target.qualname, "matched by exclude"))
            elif self.types and not isinstance(module, self.types):
                left_out.append(Skipped(target.qualname, "module type not in types"))
            elif self.filter_fn is not None and not self.filter_fn(module, target.module):
                left_out.append(Skipped(target.qualname, "rejected by filter_fn"))
            else:
                selected.append(target)
        if targets and not selected:
            msg = f"the selection rules leave no weight to normalize (found: {available})"
            raise SelectionError(msg)
        return selected, left_out
