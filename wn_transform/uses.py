"""Follow parameters through a forward (an FX graph or an eager run) and log how ops use them.

Every discovery step feeds calls into one :class:`UseLog`: a parameter enters as a *source*,
view ops (``t``, ``transpose``, ``split``...) carry it on with its axes remapped, a
linear/conv/matmul op that reads it as its weight logs a *weight use* (with the parameter
axis that holds the op's output units), and any other op that reads it logs an *other use*.
:meth:`UseLog.resolve` then turns the log into targets and skips, by the same rules whatever
step produced the log.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .norm import UnitLayout
from .ops import METADATA_OPS, op_name, view_dims, weight_use
from .targets import Skipped, Target, split_qualname

__all__ = ["UseLog", "param_aliases"]


@dataclass(frozen=True)
class _Origin:
    """A value that is (a view of) parameter ``param``: its axis i is the parameter's ``axes[i]``."""

    param: str
    axes: tuple[int, ...]
    cut: frozenset[int] = frozenset()  # parameter axes that a split has cut


@dataclass(frozen=True)
class _Use:
    kind: str  # a WeightUse kind, or "other"
    layout: UnitLayout | None = None
    detail: str = ""  # for "other": the op; for a weight use: how it was found, if not by the log's step


def param_aliases(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> every qualified name it has`` (more than one when weights are tied)."""
    aliases: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases[id(param)].append(name)
    return dict(aliases)


@dataclass
class UseLog:
    """Uses of a model's parameters, keyed by canonical parameter name."""

    model: nn.Module
    key: Callable[[Any], Hashable | None]  # value -> key under which its origin is stored
    uses: dict[str, list[_Use]] = field(default_factory=lambda: defaultdict(list))
    _origins: dict[Hashable, _Origin] = field(default_factory=dict)
    _keep_alive: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.aliases = param_aliases(self.model)
        self._canonical = {name: names[0] for names in self.aliases.values() for name in names}

    def canonical(self, param_name: str) -> str:
        """The first name of a parameter that has several (tied weights)."""
        return self._canonical.get(param_name, param_name)

    # -- feeding -------------------------------------------------------------------------
    def source(self, value: Any, param_name: str, ndim: int) -> None:
        """``value`` is the parameter ``param_name`` itself."""
        self._set(value, _Origin(self.canonical(param_name), tuple(range(ndim))))

    def add_use(self, param_name: str, kind: str, layout: UnitLayout | None = None, detail: str = "") -> None:
        self.uses[self.canonical(param_name)].append(_Use(kind, layout, detail))

    def call(self, func: Callable | str, args: Sequence[Any], kwargs: dict[str, Any], result: Any) -> None:
        """Log one op call ``result = func(*args, **kwargs)``."""
        found = [(arg, self._origin(arg)) for arg in (*args, *kwargs.values())]
        found = [(arg, origin) for arg, origin in found if origin is not None]
        if not found:
            return
        name = op_name(func)
        if name in METADATA_OPS:
            return
        use = weight_use(func, args, kwargs)
        if use is not None:
            for arg, origin in found:
                if arg is use.weight:
                    self._weight_use(origin, use.kind, use.unit_dim, use.groups)
                elif arg is not use.bias:
                    self.add_use(origin.param, "other", detail=f"{name} (not as its weight)")
            return
        source = self._origin(args[0]) if args else None
        mapping = view_dims(func, args, kwargs, len(source.axes)) if source is not None else None
        if name == "getitem" and source is not None:  # an element of a split's result (FX)
            mapping = (list(range(len(source.axes))), None)
        if mapping is None:
            for _, origin in found:
                self.add_use(origin.param, "other", detail=name)
            return
        axes, cut_axis = mapping
        cut = source.cut | ({source.axes[cut_axis]} if cut_axis is not None else set())
        origin = _Origin(source.param, tuple(source.axes[a] for a in axes), frozenset(cut))
        for item in result if isinstance(result, (tuple, list)) else (result,):
            self._set(item, origin)

    # -- resolving -----------------------------------------------------------------------
    def resolve(self, found_by: str) -> tuple[list[Target], list[Skipped]]:
        """Targets: weights read only as linear/conv weights, with one unit layout, untied."""
        targets: list[Target] = []
        skipped: list[Skipped] = []
        params = dict(self.model.named_parameters())
        aliases = {names[0]: names for names in self.aliases.values()}
        for name, uses in self.uses.items():
            weight_uses = [u for u in uses if u.kind != "other"]
            if not weight_uses or name not in params:
                continue
            reason = self._reason_to_skip(aliases[name], uses, weight_uses)
            if reason:
                skipped.append(Skipped(name, reason))
                continue
            module, tensor = split_qualname(name)
            kinds = [u.kind for u in weight_uses]
            kind = max(kinds, key=kinds.count)  # the most common (the first, on a tie)
            layout = weight_uses[0].layout
            how = weight_uses[0].detail or found_by
            targets.append(Target(module, tensor, kind, tuple(params[name].shape), layout, how, len(weight_uses)))
        return targets, skipped

    @staticmethod
    def _reason_to_skip(names: list[str], uses: list[_Use], weight_uses: list[_Use]) -> str:
        """Why the weight ``names[0]`` (also reachable as ``names[1:]``) is not a target, or ''."""
        if len(names) > 1:
            return f"tied: the same Parameter is also {', '.join(names[1:])}; normalizing it would untie it"
        others = sorted({u.detail for u in uses if u.kind == "other"})
        if others:
            return f"shared: also read by {', '.join(others)}, which weight norm would change"
        layouts = {u.layout for u in weight_uses}
        if None in layouts:
            return "read through a slice or view that does not keep whole output units"
        if len(layouts) > 1:
            return f"read with different output-unit axes ({', '.join(sorted(str(l) for l in layouts))})"
        return ""

    # -- helpers -------------------------------------------------------------------------
    def _weight_use(self, origin: _Origin, kind: str, unit_dim: int, groups: int) -> None:
        if kind == "matmul" and len(origin.axes) != 2:
            self.add_use(origin.param, "other", detail="matmul with a weight of rank other than 2")
            return
        unit_axis = origin.axes[unit_dim]
        whole_units = origin.cut <= {unit_axis} and (groups == 1 or not origin.cut)
        layout = UnitLayout(unit_axis, groups) if whole_units and (groups == 1 or unit_axis == 1) else None
        self.uses[origin.param].append(_Use(kind, layout))

    def _origin(self, value: Any) -> _Origin | None:
        key = self.key(value)
        return self._origins.get(key) if key is not None else None

    def _set(self, value: Any, origin: _Origin) -> None:
        key = self.key(value)
        if key is not None:
            self._origins[key] = origin
            self._keep_alive.append(value)  # ids stay unique while the log lives
