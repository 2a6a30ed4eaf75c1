"""The dynamic axes of an exported ONNX file, and sample batches grown along them.

An input axis of the file is dynamic when its dim is a name (``"batch"``, ``"s58"``) or an
expression of names (``"2*T"``, ``"s0 + 1"``: how torch.export writes derived dims).  Each name is
a *symbol*.  Verifying the file along a symbol means running it on the sample batch with that
symbol's value changed and every axis whose expression holds the symbol resized to match, so
that the relations between axes (``y`` twice as long as ``x``, a square mask) still hold:

    symbol T = 8 in the sample; axes x[2] = T, y[2] = 2*T, mask[1] = mask[2] = T
    grown to T = 10:            x[2] = 10,     y[2] = 20,    mask 10 x 10

An axis is resized by repeating its slices cyclically (``index_select`` with ``arange(n) % m``),
so the grown batch holds the sample's own values (valid token ids, masks of 0 and 1).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch.utils._pytree import tree_map

__all__ = ["Place", "Symbol", "find_symbols", "grow"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: What a derived dim of torch.export looks like (``2*T``, ``s0 + 1``, ``(T//2)``, ``Max(1, s0 - 1)``):
#: names, integers, arithmetic, parentheses and commas; nothing else is read as an expression.
_EXPRESSION = re.compile(r"[A-Za-z0-9_+\-*/%() ,]+")


@dataclass(frozen=True)
class Place:
    """One input axis whose size is ``expr`` of the file's symbols."""

    index: int  # the input's position among the tensor inputs
    axis: int
    expr: sympy.Expr


@dataclass(frozen=True)
class Symbol:
    """A symbol of the file, its value in the sample batch and the axes that depend on it."""

    name: str
    value: int
    places: tuple[Place, ...]
    batch_like: bool  # the batch axis: grown by one sample, not by a quarter, and checked once

    def candidates(self) -> list[int]:
        """Values to verify at first, in order: a small step (for an axis other than the batch's, the
        next one too: a model may take only even sizes), then twice the sample's (for a model that
        accepts only some sizes, multiples of a hop).  The export checks such an axis once more,
        near the first size it takes (``export._checked_sizes``)."""
        step = self.value + (1 if self.batch_like else max(1, self.value // 4))
        steps = [step] if self.batch_like else [step, step + 1]
        return list(dict.fromkeys([*steps, 2 * self.value]))


def find_symbols(names: Sequence[str], tensors: Sequence[torch.Tensor], graph_inputs: dict[str, list[int | str]],
                 *, batch_at_dim_0: bool = True) -> tuple[list[Symbol], list[str]]:
    """The file's symbols with their values in the sample batch, and notes on those that cannot
    be verified (size 0 in the sample, a value the sample's sizes do not determine).  A symbol is
    the batch axis where it is dim 0 of an input and ``batch_at_dim_0`` (the default dynamic
    axes), or where its name says so (:func:`_named_batch`); an axis the caller named
    otherwise is checked as a length, at two sizes (a time-major input's dim 0 too)."""
    places: list[tuple[int, int, sympy.Expr]] = []
    for index, (name, tensor) in enumerate(zip(names, tensors)):
        for axis, dim in enumerate(graph_inputs.get(name, ())):
            if isinstance(dim, str) and axis < tensor.dim():
                places.append((index, axis, _parse(dim)))
    order = list(dict.fromkeys(s for _, _, expr in places for s in sorted(expr.free_symbols, key=str)))
    values = _solve(order, [(tensors[i].shape[a], expr) for i, a, expr in places])
    symbols, notes = [], []
    for symbol in order:
        mine = tuple(Place(i, a, expr) for i, a, expr in places if symbol in expr.free_symbols)
        where = ", ".join(f"{names[p.index]}[{p.axis}]" for p in mine)
        if symbol not in values:
            notes.append(f"dynamic axis '{symbol}' ({where}) was not checked: the sample's sizes do not determine it")
        elif values[symbol] == 0:
            notes.append(f"dynamic axis '{symbol}' ({where}) was not checked: it has size 0 in the sample batch")
        else:
            batch = _named_batch(str(symbol)) or (batch_at_dim_0 and any(p.axis == 0 for p in mine))
            symbols.append(Symbol(str(symbol), values[symbol], mine, batch))
    return symbols, notes


def _named_batch(name: str) -> bool:
    """Whether a dynamic axis's name says it is the batch (``batch``, ``batch_size``, ``B``, ``N``, ``bsz``)."""
    return "batch" in name.lower() or name.lower() in ("b", "n", "bs", "bsz")


def grow(sample_batch: Any, names: Sequence[str], tensors: Sequence[torch.Tensor], graph_inputs: dict[str, Any],
         symbols: Sequence[Symbol], symbol: Symbol, value: int, together: Sequence[Symbol] = ()) -> tuple[Any, str] | None:
    """``sample_batch`` with ``symbol`` at ``value`` (the other symbols as in the sample, except
    those ``together`` with it, at ``value`` too: axes the model needs equal), and a description
    (``"x[2]: 16 -> 20"``); None when an axis would get a size that is not a non-negative integer.
    An input the file does not take (the exporter dropped it) follows a dim-0 symbol on its own dim
    0 when its size there is the symbol's."""
    moving = [symbol, *together]
    subs = {sympy.Symbol(s.name): s.value for s in symbols} | {sympy.Symbol(s.name): value for s in moving}
    sizes: dict[int, dict[int, int]] = {}
    for place in (p for s in moving for p in s.places):
        size = place.expr.subs(subs)
        if not (size.is_integer and size >= 0) or (tensors[place.index].shape[place.axis] == 0 and size > 0):
            return None  # not a size, or nothing to repeat
        sizes.setdefault(place.index, {})[place.axis] = int(size)
    if symbol.batch_like and any(p.axis == 0 and p.expr == sympy.Symbol(symbol.name) for p in symbol.places):
        for index, (name, tensor) in enumerate(zip(names, tensors)):
            if name not in graph_inputs and tensor.dim() > 0 and tensor.shape[0] == symbol.value:
                sizes.setdefault(index, {})[0] = value
    replaced = {id(tensors[i]): _resized(tensors[i], axes) for i, axes in sizes.items()}
    batch = tree_map(lambda leaf: replaced.get(id(leaf), leaf) if isinstance(leaf, torch.Tensor) else leaf, sample_batch)
    change = ", ".join(f"{names[i]}[{a}]: {tensors[i].shape[a]} -> {n}" for i, axes in sizes.items() for a, n in axes.items())
    return batch, change


def _parse(dim: str) -> sympy.Expr:
    """A dim name or expression as a sympy expression; anything else is one symbol: a name as it is
    (``lambda``, ``E``: not sympy's), and what sympy cannot read as an expression of the names in it
    alone (``time.steps``, an attribute access; ``batch-size``, where the names are not all symbols)."""
    if dim.isidentifier():
        return sympy.Symbol(dim)
    names = _NAME.findall(dim)
    if not _EXPRESSION.fullmatch(dim):
        return sympy.Symbol(dim)
    try:
        expr = sympy.sympify(dim, locals={name: sympy.Symbol(name) for name in names})
    except (sympy.SympifyError, SyntaxError, TypeError, AttributeError, ValueError):
        return sympy.Symbol(dim)
    if not isinstance(expr, sympy.Expr) or not expr.free_symbols or {str(s) for s in expr.free_symbols} - set(names):
        return sympy.Symbol(dim)
    return expr


def _solve(symbols: list[sympy.Symbol], sized: list[tuple[int, sympy.Expr]]) -> dict[sympy.Symbol, int]:
    """Each symbol's value, from the axes that are the symbol itself, then from expressions
    whose other symbols are known."""
    values: dict[sympy.Symbol, int] = {}
    for _ in range(len(symbols)):
        for size, expr in sized:
            unknown = expr.free_symbols - values.keys()
            if len(unknown) != 1:
                continue
            (symbol,) = unknown
            try:
                roots = sympy.solve(sympy.Eq(expr.subs(values), size), symbol)
            except (NotImplementedError, TypeError, ValueError):
                continue
            whole = [int(r) for r in roots if getattr(r, "is_integer", False) and r >= 0]
            if whole:
                values[symbol] = whole[0]
    return values


def _resized(tensor: torch.Tensor, sizes: dict[int, int]) -> torch.Tensor:
    for axis, size in sizes.items():
        index = torch.arange(size, device=tensor.device) % tensor.shape[axis]
        tensor = tensor.index_select(axis, index)
    return tensor
