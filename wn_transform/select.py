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
from .fold import FoundWeightNorm
from .targets import Skipped, Target, split_qualname

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

    def apply(self, model: nn.Module, targets: list[Target], kept: Sequence[FoundWeightNorm] = (),
              skipped: Sequence[Skipped] = ()) -> tuple[list[Target], list[Skipped]]:
        """Split ``targets`` into the selected ones and the ones a rule left out.

        ``kept``: weights that already have weight norm and stay as they are (``existing="keep"``).
        A rule that matches one of them matches something, so applying twice with the same rules
        is no error, and neither is a selection all of whose weights already have weight norm.
        ``skipped``: weights discovery left alone (a tied output layer); an exclude pattern that
        matches one of them, under any name of its Parameter, matches something (the same rules
        serve a model whose output layer is tied to its embedding and one whose is not),
        and an include pattern that matches only such weights names them and why.
        """
        named = [*targets, *kept]
        modules = {t.qualname: model.get_submodule(t.module) for t in named}
        available = ", ".join(t.qualname for t in named) or "none"

        aliases: dict[str, list[str]] | None = None
        for rule, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                if any(_matches(pattern, t.qualname) for t in named):
                    continue
                aliases = _aliases(model) if aliases is None else aliases
                left_alone = [s for s in skipped
                              if any(_matches(pattern, name) for name in aliases.get(s.qualname, [s.qualname]))]
                if rule == "exclude" and left_alone:
                    continue
                msg = f"{rule} pattern {pattern!r} matches none of the weights found ({available})"
                if left_alone:
                    reasons = "; ".join(f"{s.qualname}: {s.reason}" for s in left_alone[:3])
                    msg = (f"{rule} pattern {pattern!r} matches only weights that are left as they are "
                           f"({reasons}); the weights found to normalize are {available}")
                raise SelectionError(msg)
        for kind in self.types:
            if not any(isinstance(modules[t.qualname], kind) for t in named):
                msg = f"types entry {kind.__name__} matches none of the weights found ({available})"
                raise SelectionError(msg)

        selected, left_out = [], []
        for target in targets:
            reason = self._left_out_because(target, modules[target.qualname])
            if reason is None:
                selected.append(target)
            else:
                left_out.append(Skipped(target.qualname, reason))
        kept_selected = any(self._left_out_because(k, modules[k.qualname]) is None for k in kept)
        if targets and not selected and not kept_selected:
            msg = f"the selection rules leave no weight to normalize (found: {available})"
            raise SelectionError(msg)
        return selected, left_out

    def _left_out_because(self, target: Target | FoundWeightNorm, module: nn.Module) -> str | None:
        """Why a rule leaves ``target`` out, or None where it is selected."""
        if self.include and not any(_matches(p, target.qualname) for p in self.include):
            return "not matched by include"
        if any(_matches(p, target.qualname) for p in self.exclude):
            return "matched by exclude"
        if self.types and not isinstance(module, self.types):
            return "module type not in types"
        if self.filter_fn is not None and not self.filter_fn(module, target.module):
            return "rejected by filter_fn"
        return None


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Each Parameter's name -> every name it has (a tied Parameter has several)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {name: group for group in names.values() for name in group}


def _matches(pattern: str, qualname: str) -> bool:
    """``pattern`` against the weight's qualified name or its module's."""
    return fnmatchcase(qualname, pattern) or fnmatchcase(split_qualname(qualname)[0], pattern)
