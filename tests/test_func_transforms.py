"""``torch.func`` transforms and forward-mode AD see the reference formula through every layer.

The fast paths (the output form's autograd Function, torch's fused kernel, the eval cache) have
no forward-mode or batching rule and read storage that wrapped tensors lack; under these
transforms a weight-normalized layer computes ``g * v/||v||`` with plain torch ops.  The oracle
here is that formula written out (``wn_transform.norm.compose_weight``) in a functional model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jacrev, jvp, stack_module_state, vmap

import wn_transform as wn
from wn_transform.fast import ScaledLinear
from wn_transform.norm import UnitLayout, compose_weight

G, V = "parametrizations.weight.original0", "parametrizations.weight.original1"


def _layer(seed: int = 0) -> nn.Module:
    """A Linear large enough that a training call with a few rows takes the output form."""
    torch.manual_seed(seed)
    layer = wn.apply_weight_norm(nn.Linear(512, 512).double(), init="preserve")
    with torch.no_grad():
        layer.parametrizations.weight.original0.mul_(torch.linspace(0.5, 2, 512, dtype=torch.float64).unsqueeze(1))
    return layer


def _reference(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, compose_weight(params[G], params[V], UnitLayout(0)), params["bias"])


def _params(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in layer.named_parameters()}


def _loss(call):
    return lambda params, x: call(params, x).pow(2).sum()


@pytest.fixture
def layer_and_input(monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, torch.Tensor]:
    layer = _layer()
    x = torch.randn(4, 512, dtype=torch.float64)
    calls = []
    apply = ScaledLinear.apply
    monkeypatch.setattr(ScaledLinear, "apply", lambda *args: calls.append(1) or apply(*args))
    layer(x)
    assert calls, "the premise: a plain training call of this layer takes the output form"
    return layer, x


def test_func_grad_and_per_sample_grads_match_the_formula(layer_and_input) -> None:
    layer, x = layer_and_input
    params = _params(layer)
    ours = _loss(lambda p, inputs: functional_call(layer, p, (inputs,)))
    got = grad(ours)(params, x)
    expected = grad(_loss(_reference))(params, x)
    for name in params:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    per_sample = vmap(grad(ours), in_dims=(None, 0))(params, x.unsqueeze(1))
    expected = vmap(grad(_loss(_reference)), in_dims=(None, 0))(params, x.unsqueeze(1))
    for name in params:
        torch.testing.assert_close(per_sample[name], expected[name], msg=name)


def test_jvp_jacrev_and_forward_ad_match_the_formula(layer_and_input) -> None:
    layer, x = layer_and_input
    params = _params(layer)
    tangents = {name: torch.randn_like(p) for name, p in params.items()}

    def ours(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(layer, p, (x,))

    out, tangent = jvp(ours, (params,), (tangents,))
    expected_out, expected_tangent = jvp(lambda p: _reference(p, x), (params,), (tangents,))
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(tangent, expected_tangent)

    row = x[:1]
    jacobian = jacrev(lambda p: functional_call(layer, p, (row,)))(params)[G]
    torch.testing.assert_close(jacobian, jacrev(lambda p: _reference(p, row))(params)[G])

    with forward_ad.dual_level():  # forward-mode AD without torch.func
        dual = {name: forward_ad.make_dual(p, tangents[name]) for name, p in params.items()}
        unpacked = forward_ad.unpack_dual(functional_call(layer, dual, (x,)))
    torch.testing.assert_close(unpacked.primal, expected_out)
    torch.testing.assert_close(unpacked.tangent, expected_tangent)


def _conv_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    tail = nn.Sequential(nn.Unflatten(-1, (8, 64)), nn.Conv1d(8, 4, 3), nn.Flatten())
    return nn.Sequential(_layer(seed), nn.Tanh(), wn.apply_weight_norm(tail.double(), init="preserve"))


@pytest.mark.parametrize("mode", ["train", "eval-no-grad"])
def test_an_ensemble_of_stacked_models_runs_under_vmap(mode: str) -> None:
    """``stack_module_state`` + ``vmap(functional_call)``: the model-ensembling recipe."""
    models = [_conv_net(seed).train(mode == "train") for seed in range(3)]
    params, buffers = stack_module_state(models)
    x = torch.randn(5, 512, dtype=torch.float64)
    template = copy.deepcopy(models[0])

    def call(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(template, (p, b), (x,))

    with torch.set_grad_enabled(mode == "train"):
        got = vmap(call)(params, buffers)
    with torch.no_grad():  # folding computes each weight by the formula
        expected = torch.stack([wn.fold_weight_norm(copy.deepcopy(m))(x) for m in models])
    torch.testing.assert_close(got.detach(), expected)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_second_derivatives_through_torch_func_are_exact(kind: str) -> None:
    """Hessians w.r.t. ``v`` and ``g`` (MAML, Newton steps) match the formula's; torch's fused CPU
    kernel, which the weight form uses outside torch.func, drops part of them (gradgradcheck fails
    on ``torch._weight_norm_interface``)."""
    torch.manual_seed(0)
    plain = nn.Linear(5, 3) if kind == "linear" else nn.Conv1d(2, 3, 3)
    layer = wn.apply_weight_norm(plain.double(), init="preserve")
    x = torch.randn(4, 5, dtype=torch.float64) if kind == "linear" else torch.randn(4, 2, 6, dtype=torch.float64)
    params = _params(layer)
    layout = UnitLayout(0)

    def ours(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, {**params, G: g, V: v}, (x,)).tanh().pow(2).sum()

    def formula(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        op = F.linear if kind == "linear" else F.conv1d
        return op(x, compose_weight(g, v, layout), params["bias"]).tanh().pow(2).sum()

    expected = torch.func.hessian(formula, argnums=(0, 1))(params[G], params[V])
    for got, want in zip(torch.func.hessian(ours, argnums=(0, 1))(params[G], params[V]), expected):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    # torch.autograd.functional.hessian over forward mode (README's exact alternative to its default
    # double backward): forward AD takes the plain formula too
    forward = torch.autograd.functional.hessian(ours, (params[G].detach(), params[V].detach()),
                                                outer_jacobian_strategy="forward-mode", vectorize=True)
    for got, want in zip(forward, expected):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


class _TraceNet(nn.Module):
    """A Linear that trains in the output form at a few rows, a conv and an attention block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(512, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).transpose(1, 2)  # [N, 32, 16]
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.fc(h.reshape(x.shape[0], -1))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # torch's own MHA checks, traced as constants
@pytest.mark.parametrize("mode", ["train", "eval-no-grad-warm"])
def test_jit_trace_records_the_formula_and_follows_new_parameters(mode: str) -> None:
    """``torch.jit.trace`` (its default check re-traces under ``no_grad``) records the weight as ops on
    ``g`` and ``v``: never the eval cache's tensor as a constant, nor a native kernel's call."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(_TraceNet(), init="preserve").train(mode == "train")
    x = torch.randn(2, 4, 32)
    with torch.set_grad_enabled(mode == "train"):
        if mode != "train":
            model(x)  # fills the eval weight cache before tracing
        traced = torch.jit.trace(model, x)
    state = {k: t * 1.5 if k.endswith("original0") else t for k, t in model.state_dict().items()}
    traced.load_state_dict(state)
    model.load_state_dict(state)
    oracle = wn.fold_weight_norm(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), oracle(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_jit_trace_of_a_model_that_traces_cleanly_plain_gives_no_tracer_warning(train: bool) -> None:
    """A model whose plain form traces without a TracerWarning (and with torch's weight norm) traces
    without one here too: no size check of ours is recorded as a traced value."""
    import warnings

    x = torch.randn(2, 16)
    plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Unflatten(1, (1, 32)), nn.Conv1d(1, 2, 3), nn.Flatten(),
                          nn.Linear(60, 4))
    model = wn.apply_weight_norm(plain, init="preserve").train(train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, x)
    assert [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)] == []
    torch.testing.assert_close(traced(x), wn.fold_weight_norm(model)(x))


def test_jit_script_refuses_a_weight_normalized_model_with_what_to_do_and_scripts_it_folded() -> None:
    """TorchScript cannot compile the parametrization: the error says to fold first (torch's own
    weight norm scripts, then fails at run time); the folded model scripts and computes the same."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Conv1d(3, 2, 1)), init="preserve")
    with pytest.raises(wn.WeightNormError, match=r"fold the model first \(wn.fold_weight_norm"):
        torch.jit.script(model)
    x = torch.randn(5, 3, 4)
    scripted = torch.jit.script(wn.fold_weight_norm(model))
    torch.testing.assert_close(scripted(x), model(x))
