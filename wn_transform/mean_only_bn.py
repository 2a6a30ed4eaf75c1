"""Mean-only batch normalization (Salimans & Kingma, 2016, sec. 4), and attaching it to a layer.

    training:   y = x - mean_batch[x] + b        (per channel; the running mean is updated)
    inference:  y = x - running_mean + b         (an affine shift)

It centres the pre-activations (and so the back-propagated gradients) without dividing by the
minibatch std, which weight normalization makes unnecessary.  :func:`attach` puts one behind a
layer as a forward hook on that layer (the layer's bias moves into it), so the model keeps its
class and forward; :func:`detach` folds it back into the layer's bias for inference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .moments import per_unit
from ._parametrized import plain_type

__all__ = ["MeanOnlyBatchNorm", "attach", "channels", "detach", "mean_only_bn_of", "update_bn"]

ATTRIBUTE = "mean_only_bn"  # the submodule name on the layer: <layer>.mean_only_bn.running_mean


class MeanOnlyBatchNorm(nn.Module):
    """Subtract the per-channel mean of ``x`` (channels on ``channel_dim``), then add ``bias``.

    Shapes: ``x`` is ``[N, C, *]`` (``channel_dim=1``, conv outputs) or ``[*, C]``
    (``channel_dim=-1``, linear outputs); ``bias`` and ``running_mean`` are ``[C]``, ``C`` being
    ``num_features``.  ``bias=False``: no bias is added (the layer's own, if any, comes before).
    ``running_mean`` follows ``BatchNorm``'s rule: ``(1 - momentum) * running + momentum * mean``;
    with ``momentum=None``, the mean of every batch since :meth:`reset_running_stats` (as
    ``BatchNorm``'s cumulative average, which :func:`update_bn` uses).
    """

    def __init__(self, num_features: int, *, channel_dim: int = 1, momentum: float | None = 0.1,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = num_features
        self.channel_dim = channel_dim
        self.momentum = momentum
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
        # Batches since the last reset, which momentum=None averages over; not in the state dict.  A
        # tensor, not an int: torch.compile takes a module's int attribute as a constant (one graph per value).
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long, device=device), persistent=False)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "batches_seen" not in self._buffers:  # a pickle of an earlier version: an int, or nothing
            count = self.__dict__.pop("batches_seen", 0)
            self.register_buffer("batches_seen", torch.tensor(count, device=self.running_mean.device), persistent=False)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        if self.batches_seen.is_meta and not self.running_mean.is_meta:  # assign=True into a meta model: the count
            self.batches_seen = torch.zeros((), dtype=torch.long, device=self.running_mean.device)  # is no entry

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.batches_seen.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            if x.numel() == x.shape[self.channel_dim] > 0:  # one value per channel: it would subtract itself
                msg = (f"MeanOnlyBatchNorm expects more than 1 value per channel when training, got input size "
                       f"{tuple(x.shape)} (as BatchNorm does): use a batch of 2 or more, or eval mode (the running "
                       "mean) for single samples")
                raise ValueError(msg)
            dims = [d for d in range(x.ndim) if d != self.channel_dim % x.ndim]
            mean = x.mean(dim=dims)
            if x.numel() > 0:  # an empty batch has no mean (NaN): the running mean stays, as BatchNorm's does
                with torch.no_grad():
                    self.batches_seen.add_(1)
                    weight = self.momentum if self.momentum is not None else self.batches_seen.float().reciprocal()
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), weight)
        else:
            mean = self.running_mean
        shift = -mean if self.bias is None else self.bias - mean
        return x + per_unit(shift.to(x.dtype), x.ndim, self.channel_dim)

    def extra_repr(self) -> str:
        return f"{self.num_features}, channel_dim={self.channel_dim}, momentum={self.momentum}"


def _apply_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """The forward hook: the layer's output goes through its mean-only batch norm.  An unbatched
    call (``[C, L]`` into a Conv1d, ``[F]`` into a Linear) is a batch of one."""
    norm = getattr(module, ATTRIBUTE)
    batched_ndim = 2 if norm.channel_dim == -1 else len(module.kernel_size) + 2
    if output.ndim == batched_ndim - 1:
        return norm(output.unsqueeze(0)).squeeze(0)
    return norm(output)


def channels(layer: nn.Module, name: str) -> tuple[int, int] | None:
    """``(num_features, channel_dim)`` if ``layer.<name>`` feeds the layer's own output, else None.

    Only torch's standard layers with their own ``forward`` qualify: their output *is* the
    linear/conv op's output, when the op runs in their own call (discovery's ``Target.own_call``,
    which the caller checks).  A subclass that overrides ``forward`` may do more after the op (an
    activation, a scale), which a hook on the layer's output would wrongly centre.
    """
    if name != "weight" or plain_type(layer).forward not in _STOCK_FORWARDS:
        return None
    if isinstance(layer, nn.Linear):
        return layer.out_features, -1
    if isinstance(layer, _ConvNd):
        return layer.out_channels, 1
    return None


_STOCK_FORWARDS = {cls.forward for cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                           nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)}


def mean_only_bn_of(layer: nn.Module) -> MeanOnlyBatchNorm | None:
    norm = layer._modules.get(ATTRIBUTE)
    return norm if isinstance(norm, MeanOnlyBatchNorm) else None


def attach(layer: nn.Module, num_features: int, channel_dim: int) -> MeanOnlyBatchNorm:
    """Put a mean-only batch norm behind ``layer``, in the layer's train/eval mode; ``layer.bias``
    (if any) moves into it."""
    bias = layer._parameters.get("bias")
    reference = next(layer.parameters())
    with torch.inference_mode(False):  # (an apply under inference_mode: buffers a training forward can update)
        norm = MeanOnlyBatchNorm(num_features, channel_dim=channel_dim, device=reference.device, dtype=reference.dtype)
    norm.train(layer.training)  # a layer in eval mode: its norm subtracts the running mean, as it will after .eval()
    trainable = bias.requires_grad if bias is not None else any(p.requires_grad for p in layer.parameters())
    norm.bias.requires_grad_(trainable)  # a frozen layer's norm trains nothing either
    if bias is not None:
        with torch.no_grad():
            norm.bias.copy_(bias.reshape(-1))
        for name, value in vars(bias).items():  # flags other code groups parameters by (_no_weight_decay)
            if not hasattr(norm.bias, name):
                setattr(norm.bias, name, value)
        layer.register_parameter("bias", None)
    layer.add_module(ATTRIBUTE, norm)
    layer.register_forward_hook(_apply_hook, prepend=True)  # on the forward's output, before the user's hooks
    layer._register_load_state_dict_pre_hook(_load_plain_bias, with_module=True)
    return norm


def _load_plain_bias(layer: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """A ``load_state_dict`` pre-hook: a checkpoint of the layer without its norm (the plain model's,
    or one weight-normalized without ``mean_only_bn``) gives the norm its bias and a running mean of
    0, so that the layer computes what the checkpoint's layer did, at inference (``op(x) + b``)."""
    own = f"{prefix}{ATTRIBUTE}."
    if any(key.startswith(own) for key in state_dict):
        return  # the norm's own entries: torch loads them
    if not any(key.startswith(prefix) for key in state_dict):
        return  # nothing of this layer's (a partial load): the norm stays as it is
    norm = mean_only_bn_of(layer)
    if norm is None:
        return
    bias = state_dict.pop(f"{prefix}bias", None)
    like = next((v for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)), bias)
    device = like.device if like is not None else norm.running_mean.device  # (the checkpoint's: assign=True on
    if norm.bias is not None:  # a meta model keeps what it is given)
        state_dict[f"{own}bias"] = bias.reshape(-1) if bias is not None else torch.zeros_like(norm.bias, device=device)
    state_dict[f"{own}running_mean"] = torch.zeros_like(norm.running_mean, device=device)


def detach(layer: nn.Module) -> None:
    """Fold the (inference-mode) shift ``bias - running_mean`` into ``layer.bias`` and remove the norm."""
    norm = mean_only_bn_of(layer)
    if norm is None:
        return
    for key, hook in list(layer._forward_hooks.items()):
        if hook is _apply_hook:
            del layer._forward_hooks[key]
    for key, wrapped in list(layer._load_state_dict_pre_hooks.items()):
        if getattr(wrapped, "hook", wrapped) is _load_plain_bias:
            del layer._load_state_dict_pre_hooks[key]
    shift = -norm.running_mean if norm.bias is None else norm.bias - norm.running_mean
    del layer._modules[ATTRIBUTE]
    reference = next(iter(layer._parameters.values()), None)
    dtype = reference.dtype if reference is not None else shift.dtype
    layer.bias = nn.Parameter(shift.detach().to(dtype).clone())


@torch.no_grad()
def update_bn(loader: Iterable[Any], model: nn.Module, device: torch.device | str | int | None = None) -> None:
    """``torch.optim.swa_utils.update_bn`` for a model with mean-only batch norm: one pass over
    ``loader`` in training mode recomputes the running statistics of every ``MeanOnlyBatchNorm``,
    and of torch's ``BatchNorm`` layers, as the average over its batches (each batch one term, as
    torch's; torch's own finds ``BatchNorm`` alone, and would leave the running means of an SWA or
    EMA model as they were copied).  A mean-only norm's half-precision running mean is averaged in
    float32 (in bfloat16 the late batches' terms round away) and stored back in its buffer; torch's
    ``BatchNorm`` layers average in their own dtype, as under torch's ``update_bn``.

    ``loader`` yields a tensor, a list/tuple whose first element is the model's input (as for
    torch's), or a dict of keyword inputs; ``device``: where to move its tensors.  Momenta and
    every module's mode are restored after; if the pass fails, the running statistics too.
    """
    norms = [m for m in model.modules() if isinstance(m, (MeanOnlyBatchNorm, _BatchNorm)) and m.running_mean is not None]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    modes = [(m, m.training) for m in model.modules()]  # each one's: a batch norm frozen in eval mode stays so
    kept = {m: {name: b.clone() for name, b in m.named_buffers(recurse=False) if b is not None} for m in norms}
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    originals = {m: m.running_mean for m in norms  # (half-precision buffers, which others may hold: kept)
                 if isinstance(m, MeanOnlyBatchNorm) and m.running_mean.is_floating_point() and m.running_mean.element_size() < 4}
    for norm, original in originals.items():
        norm.running_mean = original.float()
    model.train()
    try:
        for batch in loader:
            if isinstance(batch, Mapping):
                model(**{key: _moved(value, device) for key, value in batch.items()})
            else:
                model(_moved(batch[0] if isinstance(batch, (list, tuple)) else batch, device))
    except BaseException:  # (a bad batch, Ctrl-C): the statistics as they were, not reset nor half averaged
        for norm, buffers in kept.items():
            for name, value in buffers.items():
                getattr(norm, name).copy_(value)
        raise
    finally:
        for norm, original in originals.items():  # the float32 average into the buffer object itself
            original.copy_(norm.running_mean)
            norm.running_mean = original
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in modes:
            module.training = training


def _moved(value: Any, device: torch.device | str | int | None) -> Any:
    return value.to(device) if device is not None and isinstance(value, Tensor) else value
