"""Model factories and weight-norm variants for ``tools/bench.py``.

Every factory is deterministic (it seeds its own generator state), so two calls build the
same weights; a factory called with ``batchnorm=True`` builds the same layers in the same
order plus a BatchNorm after each hidden linear/conv layer (BatchNorm has no random init, so
the linear/conv weights are the same too).

A *variant* is the same model with its linear/conv weights handled one way:

* ``plain``: untouched;
* ``wn_transform``: ``apply_weight_norm(model, init="preserve")``;
* ``torch``: ``torch.nn.utils.parametrizations.weight_norm`` on every weight that
  ``wn_transform`` normalizes (every Linear/Conv weight, and the fused q/k/v projection
  ``in_proj_weight`` of ``nn.MultiheadAttention``);
* ``torch_legacy``: ``torch.nn.utils.weight_norm`` on the same weights;
* ``folded``: the ``wn_transform`` variant passed through ``fold_weight_norm``;
* ``wn_transform_eager``: the ``wn_transform`` variant, which ``tools/bench.py`` runs with the
  native kernels off (``wn_transform.kernels.disabled()``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations
from torch.nn.utils import weight_norm as legacy_weight_norm
from torch.nn.utils.weight_norm import WeightNorm as LegacyWeightNorm

import wn_transform

__all__ = [
    "NORMALIZED_VARIANTS",
    "Site",
    "TransformerClassifier",
    "cifar_cnn",
    "count_normalized",
    "deep_mlp",
    "linear_layers",
    "make_variant",
    "mlp",
    "naive_data_init",
    "normalized_sites",
    "transformer",
]

#: The variants that reparameterize weights (and must agree on how many).
NORMALIZED_VARIANTS = ("wn_transform", "wn_transform_eager", "torch", "torch_legacy")

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# -- factories -------------------------------------------------------------------------


def mlp(widths: tuple[int, ...] = (784, 1024, 1024, 10), *, batchnorm: bool = False, seed: int = 0) -> nn.Sequential:
    """``Linear -> [BatchNorm1d] -> ReLU`` per hidden layer, then a final ``Linear``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            if batchnorm:
                layers.append(nn.BatchNorm1d(fan_out))
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def deep_mlp(depth: int, width: int, *, seed: int = 0) -> nn.Sequential:
    """``depth`` layers ``Linear(width, width)``, a ReLU after each but the last."""
    return mlp((width,) * (depth + 1), seed=seed)


def cifar_cnn(*, batchnorm: bool = False, channels: tuple[int, ...] = (3, 32, 64, 128), classes: int = 10,
              image_size: int = 32, seed: int = 0) -> nn.Sequential:
    """A small CIFAR-sized CNN: per stage ``Conv3x3 -> [BatchNorm2d] -> ReLU -> MaxPool2``, then ``Linear``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
        if batchnorm:
            layers.append(nn.BatchNorm2d(c_out))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
    side = image_size // 2 ** (len(channels) - 1)
    layers += [nn.Flatten(), nn.Linear(channels[-1] * side * side, classes)]
    return nn.Sequential(*layers)


class TransformerClassifier(nn.Module):
    """``nn.TransformerEncoder`` over ``[batch, seq, d_model]``, mean-pooled, then a linear head."""

    def __init__(self, d_model: int = 256, nhead: int = 4, dim_feedforward: int = 1024, num_layers: int = 4,
                 classes: int = 10) -> None:
        super().__init__()
        # dropout=0: the variants must compute the same function (dropout costs the same in all of them)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def transformer(*, seed: int = 0) -> TransformerClassifier:
    """The 4-layer encoder of workload 4 (d_model 256, 4 heads, feed-forward 1024)."""
    torch.manual_seed(seed)
    return TransformerClassifier()


# -- weight-norm variants ----------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """A weight to normalize: ``module.<name>`` where ``module`` is ``model.get_submodule(module_name)``."""

    module_name: str
    name: str


def normalized_sites(model: nn.Module) -> list[Site]:
    """Every Linear/Conv ``weight`` and every fused ``nn.MultiheadAttention.in_proj_weight``.

    This is the set ``wn_transform`` normalizes on the benchmark models (checked by
    ``bench.py``), so the ``torch`` and ``torch_legacy`` variants do the same work.
    """
    sites = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, *_CONV_TYPES)):
            sites.append(Site(module_name, "weight"))
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            sites.append(Site(module_name, "in_proj_weight"))
    return sites


def _apply_torch(model: nn.Module) -> nn.Module:
    for site in normalized_sites(model):
        parametrizations.weight_norm(model.get_submodule(site.module_name), site.name, dim=0)
    return model


def _apply_legacy(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm` is deprecated", FutureWarning)
        for site in normalized_sites(model):
            legacy_weight_norm(model.get_submodule(site.module_name), site.name, dim=0)
    _fire_unreached_legacy_hooks(model)
    return model


def _fire_unreached_legacy_hooks(model: nn.Module) -> None:
    """Recompute ``out_proj.weight`` of every ``nn.MultiheadAttention`` before its forward.

    The legacy ``weight_norm`` recomputes the weight in a forward pre-hook of the module that
    owns it, but ``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling
    ``out_proj.forward``: the hook never fires, the weight stays the tensor computed at
    registration, and the second backward fails.  A pre-hook on the attention module fires
    the child's legacy hook, which is what a user of the legacy API has to do.
    """
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            hooks = [h for h in module.out_proj._forward_pre_hooks.values() if isinstance(h, LegacyWeightNorm)]
            if hooks:
                module.register_forward_pre_hook(_child_hook_firer(module.out_proj, hooks))


def _child_hook_firer(child: nn.Module, hooks: list[LegacyWeightNorm]) -> Callable[[nn.Module, tuple], None]:
    def fire(module: nn.Module, args: tuple) -> None:
        for hook in hooks:
            hook(child, args)

    return fire


_VARIANT_BUILDERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "plain": lambda model: model,
    # the plain model; tools/bench.py adds the least work weight norm can add to its steps (LimitPasses)
    "limit": lambda model: model,
    "wn_transform": lambda model: wn_transform.apply_weight_norm(model, init="preserve", inplace=True),
    # the same model; tools/bench.py runs its steps with the native kernels off
    "wn_transform_eager": lambda model: wn_transform.apply_weight_norm(model, init="preserve", inplace=True),
    "torch": _apply_torch,
    "torch_legacy": _apply_legacy,
    "folded": lambda model: wn_transform.fold_weight_norm(
        wn_transform.apply_weight_norm(model, init="preserve", inplace=True), inplace=True),
}


def make_variant(name: str, model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with variant ``name`` applied (``model`` is left as it is)."""
    try:
        build = _VARIANT_BUILDERS[name]
    except KeyError:
        msg = f"unknown variant {name!r}; known: {', '.join(_VARIANT_BUILDERS)}"
        raise ValueError(msg) from None
    return build(copy.deepcopy(model))


def count_normalized(model: nn.Module) -> int:
    """How many weights of ``model`` carry weight norm, in any of the three layouts."""
    return len(wn_transform.find_weight_norms(model))


def linear_layers(model: nn.Module) -> Iterator[nn.Module]:
    """The Linear/Conv modules of ``model`` in module (= forward, for ``nn.Sequential``) order."""
    return (m for m in model.modules() if isinstance(m, (nn.Linear, *_CONV_TYPES)))


# -- reference: the naive data-dependent init ---------------------------------------------------


class _StopForward(Exception):
    """Raised by a forward hook to stop the model right after the layer being calibrated."""


def naive_data_init(model: nn.Module, batch: Tensor, *, init_scale: float = 1.0) -> nn.Module:
    """The paper's data-dependent init done naively: one forward pass *per layer*.

    ``model`` (a stack of Linear/Conv layers run in module order, e.g. ``nn.Sequential``) gets
    ``wn_transform``'s parametrization with ``init="preserve"``, in place; then, layer by
    layer in forward order, the forward is re-run from the input up to that layer (a forward
    hook stops it there), with ``g = 1`` and ``b = 0`` on that layer, so the hook sees
    ``t = v·x/||v||``; the layer gets ``g = s/sigma[t]`` and ``b = -s*mu[t]/sigma[t]``.
    ``L`` layers cost ``L(L+1)/2`` layer evaluations: the reference that a one-pass init beats.
    """
    wn_transform.apply_weight_norm(model, init="preserve", inplace=True)
    with torch.no_grad():
        for layer in linear_layers(model):
            _calibrate_layer(model, layer, batch, init_scale)
    return model


def _calibrate_layer(model: nn.Module, layer: nn.Module, batch: Tensor, init_scale: float) -> None:
    g = layer.parametrizations.weight.original0
    g.fill_(1.0)
    if layer.bias is not None:
        layer.bias.zero_()
    captured: list[Tensor] = []

    def stop_after(module: nn.Module, args: tuple, output: Tensor) -> None:
        captured.append(output)
        raise _StopForward

    handle = layer.register_forward_hook(stop_after)
    try:
        model(batch)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        msg = f"the batch never reached {type(layer).__name__} layer; cannot calibrate it"
        raise RuntimeError(msg)
    t = captured[0]
    unit_dim = t.ndim - 1 if isinstance(layer, nn.Linear) else 1
    var, mean = torch.var_mean(t, dim=[d for d in range(t.ndim) if d != unit_dim], correction=0)
    scale = init_scale / var.sqrt()
    g.copy_(scale.view_as(g))
    if layer.bias is not None:
        layer.bias.copy_(-mean * scale)
