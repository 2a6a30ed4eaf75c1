"""Fast paths: the same math as :mod:`wn_transform.norm`, with hand-written gradients.

Two forms of a weight-normalized layer ``y = op(x, w) + b`` with ``w = g * v/||v||``:

* **weight form** (:func:`weight_norm_weight`): build ``w``, then run the op.  Uses torch's
  fused ``_weight_norm_interface`` kernel (one pass for the norms and the scaling, one fused
  backward) where it applies, on the CPU and, with zero directions mended on the device
  (:func:`guarded_weight`), on CUDA; the plain formula elsewhere.  Cost: O(parameters).
* **output form** (:class:`ScaledLinear`), for ``nn.Linear``: ``y = (x @ v') * s + b`` with
  ``s = g/||v||`` per output unit, so ``w`` is never built.  The paper's gradients (eq. 3-4)
  become, with ``u = x @ v'`` and ``gy`` the output gradient:

      grad_x = (gy * s) @ v
      grad_g = sum_batch(gy * u) / ||v||
      grad_v = (gy * s)' @ x  -  (s * grad_g / ||v||) * v     (the matmul gradient, then one
                                                              in-place per-row correction)

  Cost beyond the plain layer: one read of ``v`` for the norms, one pass for the correction,
  and O(batch x outputs) for the scaling: cheaper than the weight form when few rows go
  through the layer (small batches), which :func:`prefer_output_form` decides per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

from . import kernels
from .norm import UnitLayout, compose_weight, exp_gain, safe_norm, scale_from_norm, unit_norm

__all__ = ["ScaledLinear", "eager_weight", "guarded_on_device", "guarded_weight", "plain_formula_only",
           "prefer_output_form", "weight_norm_weight"]

_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_ROWS = UnitLayout(0)  # nn.Linear: one unit per row of [out, in]


def plain_formula_only() -> bool:
    """Whether every layer must compute the plain formula ``g * v/||v||`` with ordinary torch ops:
    under a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ``jacrev``...), forward-mode AD
    (``torch.autograd.forward_ad.dual_level``) or ``torch.jit.trace``.

    The fast paths step aside then: :class:`ScaledLinear` has no forward-mode or batching rule,
    torch's fused kernel has no forward-mode derivative, a wrapped tensor has no storage to read a
    flag or an address from, and a trace must record the weight as ops on ``g`` and ``v`` (not a
    cached tensor, a native kernel or a branch taken on a value).  Cost: about 0.3 us.
    """
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0 or torch._C._is_tracing()


def weight_norm_weight(g: Tensor, v: Tensor, layout: UnitLayout, *, exp_scale: bool = False) -> Tensor:
    """``w = g * v/||v||`` (``g = e^s`` with ``exp_scale``), by the fastest exact route.

    Where torch's fused kernel applies (one unit axis first or last, no groups, contiguous
    float32/float64/bfloat16, and float16 on CUDA), it computes ``w`` and the norms in one pass
    and its backward in one more.  It divides by zero for a zero direction, where the plain
    formula gives a zero weight and finite gradients.  On the CPU, reading ``min ||v||`` costs
    nanoseconds: a layer with a zero norm then takes the plain formula.  On CUDA the read would
    wait for the device, so :func:`guarded_weight` mends the kernel's zero-norm rows on the
    device instead (three more small kernels forward, none backward; two without autograd), or,
    under saved-tensor hooks, the plain formula is used.
    Elsewhere, and under ``torch.func`` transforms, forward-mode AD and ``torch.jit.trace``
    (:func:`plain_formula_only`), the plain formula is used.
    """
    gain = exp_gain(g) if exp_scale else g
    # a compiler fuses the plain formula itself (and cannot trace plain_formula_only's checks); under
    # torch.jit.trace the size checks below would be recorded as traced values: both first
    if torch.compiler.is_compiling() or plain_formula_only():
        return compose_weight(gain, v, layout)
    return eager_weight(gain, v, layout)


def guarded_on_device(v: Tensor) -> bool:
    """Whether ``v`` takes :func:`guarded_weight`: a plain tensor on a CUDA device (a subclass,
    such as DTensor, follows its own rules through the plain formula)."""
    return v.is_cuda and type(v) in kernels.PLAIN_TYPES


def eager_weight(gain: Tensor, v: Tensor, layout: UnitLayout) -> Tensor:
    """:func:`weight_norm_weight` with the gain ``g`` (or ``e^s``) given, for a caller that has
    ruled out compilers, ``torch.func`` transforms, forward-mode AD and tracing itself."""
    dim = layout.dim % v.ndim
    guarded = guarded_on_device(v)
    fusable = (layout.groups == 1 and (dim == 0 or dim == v.ndim - 1) and (guarded or (v.is_cpu and type(v) in kernels.PLAIN_TYPES))
               and (v.dtype in _FUSED_DTYPES or (guarded and v.dtype == torch.float16)) and v.is_contiguous()
               and gain.numel() == v.shape[dim]  # the kernel writes a norm per element of g: one per unit
               and (gain.dtype == v.dtype or v.dtype != torch.float16))  # (e^s past float16's range: see exp_gain)
    if not fusable:
        return compose_weight(gain, v, layout)
    fused_gain = gain.contiguous()  # an expanded g (stride 0) has room for fewer norms than units
    fused_gain = fused_gain if fused_gain.dtype == v.dtype else fused_gain.to(v.dtype)
    if guarded:
        if torch.is_grad_enabled() and (v.requires_grad or fused_gain.requires_grad) and kernels.saved_tensors_hooked():
            return compose_weight(gain, v, layout)  # a pack hook could copy the norms before they are mended
        return guarded_weight(v, fused_gain, dim)
    weight, norms = torch._weight_norm_interface(v, fused_gain, dim)
    # no zero norm (a reduction and a read, cheaper than all()); under FakeTensorMode (shape
    # inference, memory estimates) the norms are fake, with no value to read
    if type(norms) is Tensor and norms.min().item() > 0:
        return weight
    return compose_weight(gain, v, layout)


def guarded_weight(v: Tensor, gain: Tensor, dim: int) -> Tensor:
    """``w = g * v/||v||`` by torch's fused kernel, a zero direction giving a zero weight without
    reading the device.  The kernel computes ``0 * g/0 = NaN`` for a zero direction and its backward
    divides by the norms it saved; both are mended in place, right after the kernel and before
    anything reads them: the weight's NaN rows set to 0, the saved norms of those units set to 1.
    The kernel's own backward (C++, one kernel) then gives the plain formula's gradient there
    (:func:`~wn_transform.norm.safe_norm`: ``dL/dg = 0``, ``dL/dv = g dL/dw``).  The writes go
    through ``.data``, which autograd's saved-tensor version check does not see: that is the point,
    and it is sound only because nothing has read the norms yet (:func:`eager_weight` takes the plain
    formula instead when saved-tensor hooks could have copied them).

    Shapes: ``v`` the weight, ``gain`` one value per unit along ``dim`` (0 or the last axis; shaped
    like ``g`` in its layout, or 1-D), contiguous and in ``v``'s dtype.  Cost: three small kernels
    beyond torch's one (two without autograd).  A NaN in ``v`` gives a NaN norm, which is not 0:
    that unit's row stays NaN.  A zero direction's row is 0 even where its ``g`` is NaN or
    infinite (the formula: NaN); training cannot make it so (such a ``g`` gets a zero gradient),
    and telling it apart would cost a kernel more on every call.
    """
    weight, norms = torch._weight_norm_interface(v, gain, dim)
    zero = norms == 0  # shaped like gain
    rows = zero if zero.ndim == weight.ndim else zero.view([-1 if d == dim else 1 for d in range(weight.ndim)])
    weight.data.masked_fill_(rows, 0)
    if weight.requires_grad:  # the norms autograd saved for the kernel's backward
        norms.data.masked_fill_(zero, 1)
    return weight


OUTPUT_FORM_MIN_WEIGHT = 1 << 17  # elements: below this, the output form's extra ops cost more than it saves


def prefer_output_form(rows: int, in_features: int, out_features: int) -> bool:
    """Scale the output when the weight is large and few rows pass through the layer.

    The output form trades O(parameters) passes (building ``w`` and its gradient) for
    O(rows x outputs) ones and a dozen more small ops.  Measured on CPU (1 thread, forward and
    backward of one layer, ``tools/bench.py`` machine): it wins for weights of at least 2^17
    elements (0.71-0.93 of the weight form's time from 512x256 to 1024x1024) while
    ``rows <= in/4``, and loses on smaller weights (1.2-1.6 at 256x256 and below).
    """
    # the weight's size first: under torch.compile(dynamic=True) a test on the rows is a guard on the
    # batch size, which a layer too small for the output form must not add (a recompile per threshold)
    return in_features * out_features >= OUTPUT_FORM_MIN_WEIGHT and 4 * rows <= in_features


class ScaledLinear(torch.autograd.Function):
    """``y = (x @ v') * s + b``, ``s = g/||v||`` (``e^g/||v||`` with ``exp_scale``), no ``w`` built.

    Shapes: ``x [..., in]``, ``v [out, in]``, ``g [out, 1]``, ``b [out]`` or None.  Norms and
    scales are float32 (or wider); a zero direction gives a zero row, never NaN.  At a few float32
    rows on CPU (1-8 on AMD CPUs, 1-4 elsewhere: :attr:`~wn_transform.KernelStatus.rows`), the
    native kernels (:mod:`wn_transform.kernels`) do the forward and backward, with the same math.
    """

    @staticmethod
    def forward(ctx, x: Tensor, g: Tensor, v: Tensor, bias: Tensor | None, exp_scale: bool) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        ctx.fused = kernels.usable(rows, g, v, bias)  # a few float32 rows on CPU: the fused kernels
        if ctx.fused:
            ctx.hooked = kernels.saved_tensors_hooked()  # what it saves comes back through the user's hook
            y, u, safe, scale = kernels.forward(rows.contiguous(), g, v, bias, exp_scale, x.shape[:-1])
        else:
            u = F.linear(x, v)
            safe, scale = _scales(g, unit_norm(v, _ROWS).view(-1), exp_scale)  # float32 or wider
            y = u * scale.to(u.dtype) if bias is None else torch.addcmul(bias, u, scale.to(u.dtype))
        ctx.save_for_backward(x, g, v, safe, scale, u)
        ctx.exp_scale, ctx.has_bias = exp_scale, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, g, v, safe, scale, u = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1])
        recorded = torch.is_grad_enabled()  # a double backward: its ops must be on the graph
        if ctx.fused and not recorded and kernels.backward_usable(grad_y, rows, u, safe, scale, v, hooked=ctx.hooked):
            grad_x, grad_g, grad_v, grad_bias = kernels.backward(
                grad_y.reshape(-1, grad_y.shape[-1]), rows.contiguous(), u, safe, scale, v, exp_scale=ctx.exp_scale,
                input_grad=ctx.needs_input_grad[0], bias_grad=ctx.has_bias)
            return grad_x.view(x.shape) if grad_x is not None else None, grad_g.view(g.shape), grad_v, grad_bias, None
        if recorded:  # what the forward saved, recomputed on the graph
            safe, scale = _scales(g, unit_norm(v, _ROWS).view(-1), ctx.exp_scale)
            u = F.linear(rows, v)
        grad_y, u = grad_y.reshape(-1, grad_y.shape[-1]), u.reshape(-1, u.shape[-1])
        grad_u = grad_y * scale.to(grad_y.dtype)
        grad_gain = torch.linalg.vecdot(grad_y, u, dim=0).to(safe.dtype) / safe  # dL/d(gain)
        coef = grad_gain * scale / safe  # project out v: grad_v -= (s * dL/dgain / ||v||) v, per row
        grad_x = grad_u @ v if ctx.needs_input_grad[0] else None
        grad_v = (grad_u.t() @ rows).addcmul_(v, coef.to(v.dtype).unsqueeze(1), value=-1)  # matmul gradient, projected
        grad_g = grad_gain * scale * safe if ctx.exp_scale else grad_gain  # gain = e^g: times e^g
        grad_bias = grad_y.sum(0) if ctx.has_bias else None
        grad_x = grad_x.view(x.shape) if grad_x is not None else None
        grad_g = grad_g.view(g.shape) if g.numel() == grad_g.numel() else grad_g.sum().view(g.shape)  # one gain for all units
        return grad_x, grad_g.to(g.dtype), grad_v, grad_bias, None


def _scales(g: Tensor, norms: Tensor, exp_scale: bool) -> tuple[Tensor, Tensor]:
    """``(||v||, gain/||v||)`` per unit, with 1 for a zero norm (see :func:`safe_norm`)."""
    safe = safe_norm(norms)
    return safe, scale_from_norm(g.view(-1), safe, exp_scale=exp_scale)
