"""The weight-norm arithmetic, as pure tensor functions (no modules, no state).

A weight tensor ``v`` holds a set of *output units*; each unit owns a slice of ``v``
(its fan-in) and gets one scale ``g``.  The weight is

    w[unit] = g[unit] * v[unit] / ||v[unit]||          (Salimans & Kingma, 2016, eq. 2)

A :class:`UnitLayout` says where the units are:

* ``dim=d, groups=1``: unit ``u`` is ``v.select(d, u)``.  ``g`` has ``v``'s rank with
  size 1 everywhere but ``d`` (torch's ``weight_norm(dim=d)`` layout), e.g.
  Linear ``[out, in]`` -> ``d=0``, ``g: [out, 1]``; GPT-2 ``Conv1D`` ``[in, out]`` -> ``d=1``,
  ``g: [1, out]``.
* ``dim=1, groups=G`` (grouped ConvTranspose, weight ``[in, out/G, *k]``): output channel
  ``c = grp * out/G + j`` has fan-in ``v[grp*in/G:(grp+1)*in/G, j]``.  ``g`` is
  ``[1, out, 1, ...]`` with ``out = G * out/G``, so ``g.reshape(-1)`` is indexed by output
  channel in every layout, and ``G = g.shape[1] // v.shape[1]`` can be read off the shapes.

Norms are accumulated in float32 for half-precision weights; a zero fan-in gives a zero
weight (never NaN): its norm counts as 1, so ``g`` gets a zero gradient and ``v`` that of
``g * v``, which can bring the unit back to life (freeze or mask it to keep it pruned).  A 1-D ``v`` with ``dim=0`` (torch's ``weight_norm`` on a
LayerNorm's weight) has one element per unit: its norm is ``|v|``, as in torch's ``norm_except_dim``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor

__all__ = ["UnitLayout", "compose_weight", "layout_from_shapes", "safe_norm", "scale_from_norm", "unit_norm"]


@dataclass(frozen=True)
class UnitLayout:
    """Where the output units of a weight are: the unit axis ``dim`` and the ``groups``."""

    dim: int = 0
    groups: int = 1

    def __post_init__(self) -> None:
        if self.groups < 1:
            msg = f"groups must be >= 1, got {self.groups}"
            raise ValueError(msg)
        if self.groups > 1 and self.dim != 1:
            msg = f"grouped layouts put the units on dim 1 (ConvTranspose), got dim={self.dim}"
            raise ValueError(msg)

    def g_shape(self, v_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """The shape of ``g`` for a weight of shape ``v_shape``."""
        shape = [1] * len(v_shape)
        shape[self.dim] = v_shape[self.dim] * self.groups
        return tuple(shape)

    def num_units(self, v_shape: torch.Size | tuple[int, ...]) -> int:
        return v_shape[self.dim] * self.groups

    def check(self, v_shape: torch.Size | tuple[int, ...]) -> None:
        """Raise ``ValueError`` if a weight of this shape cannot have this layout."""
        if len(v_shape) < 2:
            msg = f"a weight needs at least 2 dims to have output units, got shape {tuple(v_shape)}"
            raise ValueError(msg)
        if not -len(v_shape) <= self.dim < len(v_shape):
            msg = f"unit dim {self.dim} is out of range for a weight of shape {tuple(v_shape)}"
            raise ValueError(msg)
        if self.groups > 1 and v_shape[0] % self.groups:
            msg = f"dim 0 of shape {tuple(v_shape)} does not split into {self.groups} groups"
            raise ValueError(msg)


def layout_from_shapes(g_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> UnitLayout | None:
    """The layout in which ``g`` of shape ``g_shape`` fits a weight of shape ``v_shape``; None for a
    0-d ``g`` (one norm over the whole tensor, torch's ``dim=None``), or a ``g`` of one element that
    names no axis of ``v`` of size 1 (a weight with one unit along ``d``, ``dim=d``: HiFi-GAN's
    ``conv_post``, one output channel, ``g`` ``[1, 1, 1]``, is ``dim 0``).

    ``g`` has ``v``'s rank with size 1 everywhere but the unit axis ``d``, where it is ``v.shape[d]``
    (any ``dim``), or ``G * v.shape[1]`` for the grouped ConvTranspose layout (``v`` of rank 3 or
    more, ``G > 1``).  Raises
    ``ValueError`` for a ``g`` that fits no layout.
    """
    if math.prod(g_shape) == 1:
        ones = [d for d, size in enumerate(v_shape) if size == 1]
        return UnitLayout(ones[0]) if len(g_shape) == len(v_shape) and len(g_shape) > 1 and ones else None
    off_one = [d for d, size in enumerate(g_shape) if size != 1]
    if len(g_shape) == len(v_shape) and len(off_one) == 1:
        d = off_one[0]
        if g_shape[d] == v_shape[d]:
            return UnitLayout(d)
        groups = g_shape[1] // v_shape[1] if d == 1 and v_shape[1] > 0 else 0
        if len(v_shape) >= 3 and groups > 1 and g_shape[1] == groups * v_shape[1] and v_shape[0] % groups == 0:
            return UnitLayout(1, groups)  # a grouped ConvTranspose's [in, out/G, *k] (never a Linear's [out, in])
    msg = (f"g of shape {tuple(g_shape)} does not fit v of shape {tuple(v_shape)}: g must have v's rank "
           f"with size 1 on every axis but the normalized one")
    raise ValueError(msg)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _grouped(x: Tensor, groups: int) -> Tensor:
    """View ``[in, out/G, *k]`` as ``[G, in/G, out/G, *k]``."""
    return x.unflatten(0, (groups, x.shape[0] // groups))


def _g_to_grouped(g_like: Tensor, groups: int) -> Tensor:
    """View a ``[1, out, 1...]`` tensor as ``[G, 1, out/G, 1...]`` to broadcast on ``_grouped``."""
    return g_like.reshape(groups, 1, g_like.shape[1] // groups, *g_like.shape[2:])


def unit_norm(v: Tensor, layout: UnitLayout, *, out: Tensor | None = None) -> Tensor:
    """``||v[unit]||`` for every output unit, shaped like ``g``, in float32 or wider.

    ``out``: a contiguous tensor with one element per unit to write the norms to (no new
    tensor where its dtype is the norms'); the result is then ``out`` shaped like ``g``.
    """
    if v.dtype.itemsize == 1 and v.dtype.is_floating_point:  # float8: torch promotes it with nothing
        v = v.float()
    dtype = accumulation_dtype(v.dtype)
    target = out.view(layout.g_shape(v.shape)) if out is not None and out.dtype == dtype else None
    if layout.groups == 1:
        dim = layout.dim % v.ndim
        dims = [d for d in range(v.ndim) if d != dim]
        if dims:
            norms = torch.linalg.vector_norm(v, dim=dims, keepdim=True, dtype=dtype, out=target)
        else:  # a 1-D weight: each element is a unit, its norm |v| (an empty dim list would reduce them all)
            norms = torch.linalg.vector_norm(v.unsqueeze(-1), dim=-1, dtype=dtype, out=target)
    else:
        grouped = _grouped(v, layout.groups)  # [G, in/G, out/G, *k]
        dims = [1, *range(3, grouped.ndim)]
        norms = torch.linalg.vector_norm(grouped, dim=dims, keepdim=True, dtype=dtype).reshape(layout.g_shape(v.shape))
    if out is not None and norms is not target:
        return out.view(norms.shape).copy_(norms)
    return norms


def safe_norm(norm: Tensor) -> Tensor:
    """``norm`` with 1 where it is 0, to divide by: a zero direction (``v[unit] = 0``) then gives a
    zero weight or output row, never NaN (a NaN norm stays NaN)."""
    return norm.masked_fill(norm == 0, 1.0)


def scale_from_norm(g: Tensor, safe: Tensor, *, exp_scale: bool = False) -> Tensor:
    """``g / ||v||`` per unit (``e^g / ||v||`` when ``exp_scale``); ``safe``: the norms from
    :func:`safe_norm`, so a zero direction's unit gets ``g``, and its weight stays zero."""
    gain = g.to(safe.dtype)
    if exp_scale:
        gain = gain.exp()
    return gain / safe


def direct_zero_units(v: Tensor, zero: Tensor, layout: UnitLayout, draw: Tensor) -> Tensor:
    """``v`` with each unit flagged in ``zero`` (shaped like ``g``, where ``v[unit] = 0``) given the
    direction of ``draw[unit]`` (a tensor of ``v``'s shape), rescaled to norm 1; the other units
    as they are.  With ``g = 0`` there, ``w = g * v/||v||`` stays 0 and ``dL/dg = dL/dw . v/||v||``
    is no longer 0, so the unit can train."""
    return v + compose_weight(zero.to(torch.float32), draw.to(v.device), layout).to(v.dtype)


def direct_zero_units_on_load(v: Tensor, g: Tensor, layout: UnitLayout) -> Tensor:
    """:func:`direct_zero_units` for the units whose ``g`` is 0 in a pair made from a plain weight
    (``g = ||w||``, ``v = w``) as a checkpoint loads, the directions drawn from a generator seeded
    with 0, so that every process that loads the same checkpoint gets the same ones; ``v`` itself
    where there is none (or no values: a meta tensor)."""
    zero = g == 0
    if v.is_meta or v.numel() == 0 or not bool(zero.any()):
        return v
    draw = torch.randn(v.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    return direct_zero_units(v, zero.reshape(layout.g_shape(v.shape)), layout, draw)


def traceable_weight(g: Tensor, v: Tensor, layout: UnitLayout, *, exp_scale: bool = False) -> Tensor:
    """:func:`compose_weight` in ops ``torch.fx`` can record: its proxies have no shape or dtype
    to branch on, so the norms are taken in ``v``'s own dtype, with the unit axis moved first
    (``[units, rest]``); a zero direction still gives a zero weight.  One unit axis (no groups)."""
    if layout.groups != 1:
        msg = (f"torch.fx cannot trace into the weight norm of a grouped ConvTranspose ({layout.groups} groups): "
               "keep the layer a leaf module (the default Tracer does) or fold it first (fold_weight_norm)")
        raise TypeError(msg)
    if exp_scale:  # recorded as one call (e^s in float32 for a half-precision s: see exp_gain)
        return _exp_scaled_weight(g, v, layout)
    norms = torch.linalg.vector_norm(v.transpose(0, layout.dim).flatten(1), dim=1)
    safe = torch.where(norms == 0, torch.ones_like(norms), norms)
    return v * (g.reshape(-1) / safe).view_as(g)


def _exp_scaled_weight(s: Tensor, v: Tensor, layout: UnitLayout) -> Tensor:
    """``compose_weight`` with ``g = e^s``, which ``torch.fx`` records as one call (:func:`torch.fx.wrap`):
    the precision it takes depends on the dtypes, which a proxy does not have."""
    return compose_weight(s, v, layout, exp_scale=True)


torch.fx.wrap("_exp_scaled_weight")


def exp_gain(s: Tensor) -> Tensor:
    """``g = e^s``, taken in float32 for a half-precision ``s``: ``s = log ||w||`` fits float16 far
    beyond the point (about 11.1) where ``e^s`` leaves its range, and the weight ``g * v/||v||``
    does not."""
    return s.exp() if s.element_size() >= 4 else s.float().exp()


def compose_weight(g: Tensor, v: Tensor, layout: UnitLayout | None, *, exp_scale: bool = False) -> Tensor:
    """``w = g * v / ||v||`` per output unit, in ``v``'s dtype.

    Shapes: ``v`` is the weight shape, ``g`` is ``layout.g_shape(v.shape)``; ``layout=None``: one
    unit, the whole tensor (torch's ``dim=None``), ``g`` of one element.  ``exp_scale``: ``g``
    holds ``s = log g``, and ``w = e^s * v / ||v||``.
    """
    if layout is None:
        whole = compose_weight(g.reshape(1, 1), v.reshape(1, -1), UnitLayout(0), exp_scale=exp_scale)
        return whole.reshape(v.shape)
    if v.dtype.is_floating_point and v.dtype.itemsize == 1:  # float8: torch promotes it with nothing
        return compose_weight(g.float(), v.float(), layout, exp_scale=exp_scale).to(v.dtype)
    scale = scale_from_norm(g, safe_norm(unit_norm(v, layout)), exp_scale=exp_scale)
    if layout.groups == 1:
        return (v * scale).to(v.dtype)
    scaled = _grouped(v, layout.groups) * _g_to_grouped(scale, layout.groups)
    return scaled.flatten(0, 1).to(v.dtype)
