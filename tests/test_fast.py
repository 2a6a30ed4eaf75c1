"""Every fast path gives the reference formula's outputs and gradients (wn_transform.norm)."""

from __future__ import annotations

import copy

import warnings
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import wn_transform as wn
from wn_transform.fast import ScaledLinear, weight_norm_weight
from wn_transform.norm import UnitLayout, compose_weight


def _grads(fn, *tensors: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype))
    return out.detach(), [leaf.grad if leaf is not None else None for leaf in leaves]


def _reference_gain(g: torch.Tensor, exp_scale: bool) -> torch.Tensor:
    return g.exp() if exp_scale else g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("shape", "dim"), [((6, 5), 0), ((5, 6), 1), ((4, 3, 3), 0), ((3, 4, 2), 2)])
@pytest.mark.parametrize("exp_scale", [False, True], ids=["g", "exp"])
def test_fused_weight_form_matches_the_formula(dtype: torch.dtype, shape: tuple[int, ...], dim: int, exp_scale: bool) -> None:
    torch.manual_seed(0)
    layout = UnitLayout(dim)
    v = torch.randn(shape, dtype=dtype)
    g = torch.rand(layout.g_shape(shape), dtype=dtype) + 0.5
    fast, fast_grads = _grads(lambda g, v: weight_norm_weight(g, v, layout, exp_scale=exp_scale), g, v)
    ref, ref_grads = _grads(lambda g, v: compose_weight(_reference_gain(g, exp_scale), v, layout), g, v)
    torch.testing.assert_close(fast, ref)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_fused_weight_form_with_a_zero_direction_has_no_nan() -> None:
    v = torch.randn(4, 3)
    v[2] = 0
    g = torch.rand(4, 1) + 0.5
    fast, fast_grads = _grads(lambda g, v: weight_norm_weight(g, v, UnitLayout(0)), g, v)
    ref, ref_grads = _grads(lambda g, v: compose_weight(g, v, UnitLayout(0)), g, v)
    assert torch.isfinite(fast).all() and all(torch.isfinite(t).all() for t in fast_grads)
    torch.testing.assert_close(fast, ref)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b)
    grad_w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(0))  # what _grads backpropagates
    assert fast_grads[0][2].item() == 0  # the zero direction's norm counts as 1: w = g * v there,
    torch.testing.assert_close(fast_grads[1][2], g[2] * grad_w[2])  # so v gets the gradient of g * v


def _linear_reference(x, g, v, b, exp_scale):
    return F.linear(x, compose_weight(_reference_gain(g, exp_scale), v, UnitLayout(0)), b)


@pytest.mark.parametrize("x_shape", [(7, 5), (2, 3, 5), (5,)], ids=["2d", "3d", "unbatched"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("exp_scale", [False, True], ids=["g", "exp"])
def test_output_form_matches_the_weight_form(x_shape: tuple[int, ...], bias: bool, exp_scale: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(x_shape, dtype=torch.float64)
    v = torch.randn(4, 5, dtype=torch.float64)
    g = torch.randn(4, 1, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64) if bias else None
    fast, fast_grads = _grads(lambda x, g, v, b: ScaledLinear.apply(x, g, v, b, exp_scale), x, g, v, b)
    ref, ref_grads = _grads(lambda x, g, v, b: _linear_reference(x, g, v, b, exp_scale), x, g, v, b)
    torch.testing.assert_close(fast, ref)
    for a, r in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("exp_scale", [False, True], ids=["g", "exp"])
def test_output_form_double_backward_matches_the_weight_form(exp_scale: bool) -> None:
    """A gradient penalty (create_graph=True) differentiates the backward itself: it must see how
    the norms, scales and pre-activations depend on g and v, not take them as constants."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64)
    v, g, b = torch.randn(4, 5, dtype=torch.float64), torch.rand(4, 1, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)

    def penalty(layer):
        leaves = [t.clone().requires_grad_() for t in (x, g, v, b)]
        y = layer(*leaves, exp_scale)
        (grad_x,) = torch.autograd.grad((y.square() * y).sum(), leaves[0], create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), leaves)

    for a, r in zip(penalty(ScaledLinear.apply), penalty(_linear_reference)):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_output_form_in_half_precision_follows_the_float64_formula(dtype: torch.dtype) -> None:
    """Norms and scales in float32, activations in ``dtype``: within that dtype's rounding."""
    torch.manual_seed(0)
    x, v = torch.randn(6, 64).to(dtype), torch.randn(32, 64).to(dtype)
    g, b = (torch.rand(32, 1) + 0.5).to(dtype), torch.randn(32).to(dtype)
    grad_y = torch.randn(6, 32)

    def run(fn, *tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves, False)
        out.backward(grad_y.to(out.dtype))
        return out.detach(), [leaf.grad for leaf in leaves]

    fast, fast_grads = run(ScaledLinear.apply, x, g, v, b)
    ref, ref_grads = run(_linear_reference, *(t.double() for t in (x, g, v, b)))
    tolerance = {"rtol": 0, "atol": 0.03 if dtype == torch.bfloat16 else 0.004}
    assert fast.dtype == dtype and all(t.dtype == dtype for t in fast_grads)
    torch.testing.assert_close(fast.double(), ref, **tolerance)
    for a, r in zip(fast_grads, ref_grads):
        scale = r.abs().max()
        torch.testing.assert_close(a.double() / scale, r / scale, **tolerance)


def test_output_form_with_zero_scale_and_zero_direction_rows() -> None:
    """g = 0 (the scale's gradient must not be lost) and v = 0 (no NaN) in the same layer."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    v = torch.randn(4, 5, dtype=torch.float64)
    v[1] = 0
    g = torch.randn(4, 1, dtype=torch.float64)
    g[3] = 0
    b = torch.randn(4, dtype=torch.float64)
    fast, fast_grads = _grads(lambda x, g, v, b: ScaledLinear.apply(x, g, v, b, False), x, g, v, b)
    ref, ref_grads = _grads(lambda x, g, v, b: _linear_reference(x, g, v, b, False), x, g, v, b)
    assert fast_grads[1][3].abs() > 0
    torch.testing.assert_close(fast, ref)
    for a, r in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize(("shape", "rows", "output_form"), [
    ((512, 256), 1, True), ((512, 256), 128, True), ((512, 256), 129, False),  # rows <= in/4
    ((16, 8), 1, False),  # a small weight: the output form's extra ops would cost more
], ids=["batch1-output-form", "batch128-output-form", "batch129-weight-form", "small-weight-form"])
def test_a_linear_layer_gives_the_same_outputs_and_gradients_whatever_route_it_takes(
        shape: tuple[int, int], rows: int, output_form: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(*shape).double()
    ours = wn.apply_weight_norm(layer, init="preserve")
    with torch.no_grad():
        ours.parametrizations.weight.original0.mul_(1.7)
    reference = torch.nn.utils.parametrizations.weight_norm(nn.Linear(*shape).double())
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(rows, shape[0], dtype=torch.float64)
    calls = []
    apply = ScaledLinear.apply
    monkeypatch.setattr(ScaledLinear, "apply", lambda *args: calls.append(1) or apply(*args))
    for model in (ours, reference):
        model(x).pow(2).sum().backward()
    assert bool(calls) == output_form
    torch.testing.assert_close(ours(x), reference(x))
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, reference.get_parameter(name).grad, msg=name)


class _FrozenInPlaceResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre, self.frozen, self.head = nn.Linear(512, 512), nn.Linear(512, 512), nn.Linear(512, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        h += self.frozen(h)  # in place on the frozen layer's input: allowed, it needs no input for its gradient
        return self.head(h)


@pytest.mark.parametrize("rows", [4, 256], ids=["few-rows", "many-rows"])
def test_a_layer_frozen_after_apply_does_not_keep_its_input_and_the_gradients_are_torchs(rows: int) -> None:
    """At few rows a trained layer takes the output form, which saves its input; a frozen one builds
    its weight, as a plain layer needs only that, so an in-place change of its input is allowed
    (as with a plain layer and torch's weight norm)."""
    torch.manual_seed(0)
    plain = _FrozenInPlaceResidual()
    ours = wn.apply_weight_norm(plain, init="preserve")
    reference = copy.deepcopy(plain)
    for layer in (reference.pre, reference.frozen, reference.head):
        torch.nn.utils.parametrizations.weight_norm(layer)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(rows, 512)
    for model in (ours, reference):
        model.frozen.requires_grad_(False)
        model(x).square().sum().backward()
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, reference.get_parameter(name).grad, msg=name)


class _Doubled(nn.Module):
    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return 2 * bias


@pytest.mark.parametrize("rows", [1, 64], ids=["few-rows", "many-rows"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_under_cpu_autocast_a_linear_layer_computes_as_a_plain_one(rows: int, dtype: torch.dtype) -> None:
    """Autocast runs a Linear's matmul in its dtype and hands that dtype on, whatever the batch."""
    torch.manual_seed(0)
    layer = wn.apply_weight_norm(nn.Linear(512, 256), init="preserve")  # 2^17 weights: the output form's size
    x = torch.randn(rows, 512, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        got = layer(x)
        want = F.linear(x, layer.weight, layer.bias)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.float().sum().backward()
    assert x.grad is not None and layer.parametrizations.weight.original1.grad is not None


@pytest.mark.parametrize("rows", [1, 64], ids=["output-form", "weight-form"])
def test_a_linear_layer_whose_bias_is_parametrized_too_uses_the_parametrized_bias(rows: int) -> None:
    """The Linear forward reads the bias from the layer's own parameters when it is one, and
    through its property when another parametrization computes it."""
    torch.manual_seed(0)
    layer = nn.Linear(512, 256)
    ours = wn.apply_weight_norm(layer, init="preserve")
    torch.nn.utils.parametrize.register_parametrization(ours, "bias", _Doubled())
    x = torch.randn(rows, 512)
    expected = F.linear(x, layer.weight, 2 * layer.bias)
    torch.testing.assert_close(ours(x), expected)  # training, with grad: output or weight form
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected)  # the cached weight


def test_the_cached_eval_weight_follows_every_change_to_g_and_v() -> None:
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(4, 3)), init="preserve")
    x = torch.randn(2, 4)

    def expected(inputs: torch.Tensor = x) -> torch.Tensor:
        chain = model[0].parametrizations.weight
        return F.linear(inputs, compose_weight(chain.original0, chain.original1, UnitLayout(0)), model[0].bias)

    with torch.no_grad():
        torch.testing.assert_close(model(x), expected())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        with torch.enable_grad():
            model(x).sum().backward()
        optimizer.step()  # in-place update: version counters move
        torch.testing.assert_close(model(x), expected())
        state = {k: v * 2 for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        torch.testing.assert_close(model(x), expected())
        model[0].parametrizations.weight.original1.data = torch.randn(3, 4)  # storage swapped
        torch.testing.assert_close(model(x), expected())
        model.double()  # dtype changed
        torch.testing.assert_close(model(x.double()), expected(x.double()))


@pytest.mark.parametrize("width", [4, 1024], ids=["small", "large"])
def test_the_cached_eval_weight_follows_updates_written_through_data(width: int) -> None:
    """``.data`` writes bypass version counters; updates written that way (an EMA of a training
    model, SGD by hand) change g too, which the cache compares."""
    torch.manual_seed(0)
    student = wn.apply_weight_norm(nn.Sequential(nn.Linear(width, 3)), init="preserve")
    ema = wn.apply_weight_norm(nn.Sequential(nn.Linear(width, 3)), init="preserve").eval()
    x = torch.randn(1, width)
    with torch.no_grad():
        before = ema(x)
        for _ in range(3):
            for p, q in zip(ema.parameters(), student.parameters()):
                p.data.mul_(0.5).add_(q.data + 0.1, alpha=0.5)
        after = ema(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, wn.fold_weight_norm(ema)(x), rtol=0, atol=1e-6)
    for p in ema.parameters():  # SGD by hand
        p.data -= 0.3 * torch.ones_like(p)
    with torch.no_grad():
        torch.testing.assert_close(ema(x), wn.fold_weight_norm(ema)(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_eval_weight_follows_sgd_by_hand_that_rounds_away_on_g(dtype: torch.dtype) -> None:
    """A learning rate's step on a float16/bfloat16 g is below its resolution and rounds away,
    while v changes: g's bytes cannot tell the update, so such a layer is not cached."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(64, 64)), init="preserve").to(dtype).eval()
    g, v = model[0].parametrizations.weight.original0, model[0].parametrizations.weight.original1
    x = torch.randn(2, 64, dtype=dtype)
    with torch.no_grad():
        for _ in range(3):
            model(x)  # the cache is filled
            before = g.detach().clone()
            g.data.add_(g.data * 1e-5)  # a step on g under its resolution
            v.data.add_(torch.randn_like(v), alpha=1e-2)
            assert torch.equal(g, before)
            torch.testing.assert_close(model(x), wn.fold_weight_norm(model)(x), rtol=0, atol=0)


@pytest.mark.parametrize("gain", ["not in the optimizer", "in an lr=0 group"])
@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "SGD"])
def test_the_cached_eval_weight_follows_a_fused_optimizer_that_leaves_g_alone(optimizer: str, gain: str) -> None:
    """torch's fused optimizers (``fused=True``) write parameters in place without bumping their
    version counters (torch 2.13); with ``g`` unchanged by the step, only our step hook, which
    bumps them, tells the cache that ``v`` moved (the oracle: the folded model, whose weights are
    computed afresh)."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), x)
    gains = [q for name, q in model.named_parameters() if name.endswith("original0")]
    rest = [q for name, q in model.named_parameters() if not name.endswith("original0")]
    groups = [{"params": rest}] + ([{"params": gains, "lr": 0.0}] if gain.startswith("in") else [])
    step = getattr(torch.optim, optimizer)(groups, lr=0.05, fused=True)
    model.eval()  # train in eval mode (frozen dropout/BN), evaluate between the steps
    for _ in range(3):
        with torch.no_grad():
            torch.testing.assert_close(model(x), wn.fold_weight_norm(model)(x), rtol=0, atol=1e-6)
        step.zero_grad()
        model(x).square().sum().backward()
        step.step()


def test_a_copy_of_a_layer_with_a_parametrization_stacked_on_ours_follows_a_fused_step() -> None:
    """A chain whose WeightNorm has another parametrization after it, deep-copied (its class rebuilt):
    the step hook bumps its g and v too, so the eval cache never serves the weight from before a
    fused step that leaves g as it was."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16)
    original = wn.apply_weight_norm(nn.Sequential(nn.Conv1d(3, 4, 3)), x, init="preserve")
    parametrize.register_parametrization(original[0], "weight", nn.Identity())
    model = copy.deepcopy(original)
    conv, chain = model[0], model[0].parametrizations.weight
    step = torch.optim.Adam([{"params": [chain.original0], "lr": 0.0}, {"params": [chain.original1, conv.bias]}],
                            lr=0.1, fused=True)
    model.eval()
    with torch.no_grad():
        model(x)  # fills the cache
    model(x).sum().backward()
    step.step()
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.conv1d(x, conv.weight, conv.bias), rtol=0, atol=1e-6)


def test_the_step_hook_keeps_working_after_its_warning_was_raised_as_an_error() -> None:
    """Under ``-W error`` the stale-optimizer warning raises at the first step: the next step runs."""
    x = torch.randn(4, 8)
    model = nn.Sequential(nn.Linear(8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wn.apply_weight_norm(model, x, init="preserve", inplace=True)
    model(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="create the optimizer after apply_weight_norm"):
            optimizer.step()
        optimizer.step()


class _Adam(torch.optim.Adam):
    """An optimizer from outside torch.optim (the step hook bumps what such a one steps)."""


@pytest.mark.parametrize("critic_normalized", [False, True], ids=["plain critic", "weight-normalized critic"])
@pytest.mark.parametrize("make", [lambda p: torch.optim.Adam(p, lr=1e-3, fused=True), lambda p: _Adam(p, lr=1e-3)],
                         ids=["fused", "outside torch.optim"])
def test_a_step_bumps_only_the_g_and_v_it_stepped(make, critic_normalized: bool) -> None:
    """An actor and a critic in one optimizer; only the actor has gradients at the step, which
    leaves the critic alone: the critic's graph, kept for a later backward, stays valid, as in torch
    (bumping every parameter in the groups made that backward fail as "modified by an inplace
    operation"), with or without weight norm on the critic."""
    torch.manual_seed(0)
    actor = wn.apply_weight_norm(nn.Linear(4, 2), init="preserve")
    critic = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    if critic_normalized:
        critic = wn.apply_weight_norm(critic, init="preserve")
    optimizer = make([*actor.parameters(), *critic.parameters()])
    s = torch.randn(8, 4)
    value = critic(s)
    actor(s).square().mean().backward()
    before = actor.weight.detach().clone()
    optimizer.step()
    value.square().mean().backward()  # the critic's graph is still its parameters' values
    assert all(p.grad is not None for p in critic.parameters())
    assert not torch.equal(actor.weight, before)


@pytest.mark.parametrize("fused", [False, True], ids=["for-loop", "fused"])
def test_a_frozen_models_kept_weights_survive_another_models_optimizer_steps(
        fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen teacher (distillation, a DQN target network) run under ``no_grad`` between the
    student's steps keeps its weights: a step bumps the versions of its own optimizer's parameters
    only, so the teacher's weights are built once, not once per step."""
    import wn_transform.parametrization as parametrization

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    teacher = wn.apply_weight_norm(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), init="preserve").eval()
    teacher.requires_grad_(False)
    student = wn.apply_weight_norm(nn.Sequential(nn.Linear(8, 8)), init="preserve")
    optimizer = torch.optim.Adam(student.parameters(), lr=0.1, fused=fused)
    built: list[int] = []
    original = parametrization.weight_norm_weight

    def counting(g, v, layout, *, exp_scale=False):
        built.append(id(v))
        return original(g, v, layout, exp_scale=exp_scale)

    monkeypatch.setattr(parametrization, "weight_norm_weight", counting)
    teacher_vs = {id(m.parametrizations.weight.original1) for m in teacher if isinstance(m, nn.Linear)}
    for _ in range(4):
        with torch.no_grad():
            target = teacher(x)
        optimizer.zero_grad()
        (student(x) - target).square().mean().backward()
        optimizer.step()
    assert sum(v in teacher_vs for v in built) == 2  # each teacher weight built once
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(x), wn.fold_weight_norm(student)(x), rtol=0, atol=1e-6)


def test_the_cached_eval_weight_is_never_served_for_other_tensors_at_a_reused_address() -> None:
    """``functional_call`` with fresh ``v`` tensors: a freed tensor's address and version counter
    come back for the next one, which must not get the weight made from the first."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(512, 256)), init="preserve").eval()
    x = torch.randn(3, 512)
    params = dict(model.named_parameters())
    g = params["0.parametrizations.weight.original0"]

    def check(step: int) -> None:  # each call's v is freed on return
        v = torch.randn(256, 512)
        got = torch.func.functional_call(model, {**params, "0.parametrizations.weight.original1": v}, (x,))
        expected = F.linear(x, compose_weight(g, v, UnitLayout(0)), model[0].bias)
        torch.testing.assert_close(got, expected, msg=f"call {step}")

    with torch.no_grad():
        for step in range(20):
            check(step)


def test_the_cached_eval_weight_follows_a_storage_swapped_in_at_the_freed_address() -> None:
    """``v.data = new`` bumps no version; twice between two forwards, the allocator may hand the
    second new tensor the address the cached weight was made from (freed by the first).  The
    cache holds that memory until it is redone, so no new tensor can take the address."""
    torch.manual_seed(0)
    layer = wn.apply_weight_norm(nn.Linear(64, 64), init="preserve").eval()
    v = layer.parametrizations.weight.original1
    x = torch.randn(4, 64)
    for step in range(50):
        with torch.no_grad():
            layer(x)  # the weight kept, made from v's storage
        v.data = torch.randn(64, 64)  # the old storage is free for the next tensor, unless held
        v.data = torch.randn(64, 64)
        with torch.no_grad():
            expected = F.linear(x, compose_weight(layer.parametrizations.weight.original0, v, UnitLayout(0)), layer.bias)
            torch.testing.assert_close(layer(x), expected, msg=f"step {step}")


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_cached_eval_weight_follows_sgd_by_hand_with_a_frozen_gain(kind: str) -> None:
    """Fixed-length weight norm: ``g`` frozen, ``v`` trained by an update written through ``.data``."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 8) if kind == "linear" else nn.Conv1d(4, 8, 3)
    model = wn.apply_weight_norm(nn.Sequential(layer, nn.Tanh()), init="preserve")
    model[0].parametrizations.weight.original0.requires_grad_(False)
    x = torch.randn(5, 32) if kind == "linear" else torch.randn(5, 4, 8)
    for _ in range(3):
        model.train()
        model(x).pow(2).sum().backward()
        for p in model.parameters():
            if p.requires_grad:
                p.data -= 0.5 * p.grad
                p.grad = None
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), wn.fold_weight_norm(copy.deepcopy(model))(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("write", ["nn.init", "data", "copy_"])
def test_writing_into_a_read_weight_leaves_the_layer_as_torch_does(kind: str, write: str) -> None:
    """``module.weight`` is computed from ``(g, v)``; writing into what a read returned (a weight
    init routine run on a normalized model) changes nothing, in torch's parametrization and here."""
    torch.manual_seed(0)
    make = (lambda: nn.Linear(6, 4)) if kind == "linear" else (lambda: nn.Conv1d(3, 4, 3))
    ours = wn.apply_weight_norm(make(), init="preserve").eval()
    theirs = torch.nn.utils.parametrizations.weight_norm(make()).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6) if kind == "linear" else torch.randn(2, 3, 7)
    with torch.no_grad():
        ours(x)  # the eval weight is cached
        for model in (ours, theirs):
            if write == "nn.init":
                nn.init.normal_(model.weight)
            elif write == "data":
                model.weight.data.normal_()
            else:
                model.weight.copy_(torch.zeros_like(model.weight))
        torch.testing.assert_close(ours(x), theirs(x))
        torch.testing.assert_close(ours.weight, theirs.weight)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_an_eval_forward_under_inference_mode_computes_the_formula(kind: str) -> None:
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Linear(6, 4) if kind == "linear" else nn.Conv1d(3, 4, 3), init="preserve").eval()
    x = torch.randn(2, 6) if kind == "linear" else torch.randn(2, 3, 5)
    expected = wn.fold_weight_norm(copy.deepcopy(model))(x).detach()
    for _ in range(2):  # an empty cache, then one filled under no_grad
        with torch.inference_mode():
            torch.testing.assert_close(model(x), expected)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("change", ["double", "load_state_dict", "assign_weight"])
def test_a_filled_cache_lets_torch_swap_the_parameters(change: str) -> None:
    """``torch.utils.swap_tensors`` (the future default of ``Module.to`` and ``load_state_dict``)
    refuses tensors that have weak references; the cache holds none."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(6, 4)), init="preserve").eval()
    x = torch.randn(2, 6)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.no_grad():
            model(x)  # fills the cache
            if change == "double":
                model.double()
                x = x.double()
            elif change == "load_state_dict":
                model.load_state_dict({k: v * 2 if k.endswith("original0") else v for k, v in model.state_dict().items()})
            else:
                model[0].weight = torch.randn(4, 6)
            torch.testing.assert_close(model(x), wn.fold_weight_norm(copy.deepcopy(model))(x))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


@pytest.mark.parametrize("init", ["preserve", "data"])
def test_a_model_reparameterized_under_inference_mode_runs_there(init: str) -> None:
    """Parameters made under ``torch.inference_mode()`` are inference tensors, which have no version
    counter to key the eval-mode cache on: their weight is computed at every call, and follows
    in-place changes.  They can never be trained, which a warning says."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    x = torch.randn(64, 10)
    with torch.inference_mode():
        with pytest.warns(UserWarning, match="runs under torch.inference_mode.*can never be trained"):
            model = wn.apply_weight_norm(plain, x if init == "data" else None, init=init).eval()
        first = model[0]
        assert first.parametrizations.weight.original0.is_inference()
        got = model(x)
        first.parametrizations.weight.original0.mul_(2)
        doubled = model(x)

    @torch.no_grad()  # inference tensors cannot enter an autograd graph
    def expected(scale: float) -> torch.Tensor:
        chain = first.parametrizations.weight
        hidden = F.linear(x, compose_weight(chain.original0 * scale, chain.original1, UnitLayout(0)), first.bias)
        return model[2](model[1](hidden))

    torch.testing.assert_close(got, expected(0.5))
    torch.testing.assert_close(doubled, expected(1.0))
    if init == "preserve":
        with torch.no_grad():
            torch.testing.assert_close(got, plain(x))


# -- the direct weight getter and the per-call memo ------------------------------------------


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def _conv() -> nn.Module:
    torch.manual_seed(0)
    return wn.apply_weight_norm(nn.Sequential(nn.Conv2d(3, 4, 3)), init="preserve")[0]


def _formula(module: nn.Module) -> torch.Tensor:
    chain = module.parametrizations.weight
    return compose_weight(chain.original0, chain.original1, UnitLayout(0))


def test_the_direct_getter_computes_the_formula_with_and_without_grad() -> None:
    conv = _conv()
    torch.testing.assert_close(conv.weight, _formula(conv))
    with torch.no_grad():
        torch.testing.assert_close(conv.weight, _formula(conv))


def test_the_direct_getter_honours_torch_parametrize_cached() -> None:
    conv = _conv()
    assert conv.weight is not conv.weight
    with torch.nn.utils.parametrize.cached():
        assert conv.weight is conv.weight  # torch's cache, as for any parametrization


def test_the_direct_getter_honours_a_parametrization_stacked_on_ours() -> None:
    conv = _conv()
    expected = 2 * _formula(conv)
    torch.nn.utils.parametrize.register_parametrization(conv, "weight", _Double())
    torch.testing.assert_close(conv.weight, expected)
    torch.testing.assert_close(conv(torch.ones(1, 3, 3, 3)), F.conv2d(torch.ones(1, 3, 3, 3), expected, conv.bias))


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_the_direct_getter_runs_the_hooks_of_the_parametrization(kind: str) -> None:
    conv = _conv()
    seen: list[int] = []
    wn_module = conv.parametrizations.weight[0]
    handle = (wn_module.register_forward_hook(lambda module, args, out: seen.append(1)) if kind == "forward"
              else wn_module.register_forward_pre_hook(lambda module, args: seen.append(1)))
    conv.weight
    with torch.no_grad():
        conv(torch.ones(1, 3, 3, 3))
    handle.remove()
    conv.weight
    assert seen == [1, 1]


class _FunctionalLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)


def test_fx_traces_the_weight_as_a_function_of_g_and_v_not_a_constant() -> None:
    torch.manual_seed(0)
    model = wn.apply_weight_norm(_FunctionalLinear(), torch.randn(2, 4), init="preserve")
    traced = torch.fx.symbolic_trace(model)
    assert not any(n.op == "get_attr" and "_tensor_constant" in str(n.target) for n in traced.graph.nodes)
    x = torch.randn(2, 4)
    with torch.no_grad():
        model.parametrizations.w.original0.mul_(2)  # the traced module shares the parameters
    torch.testing.assert_close(traced(x), model(x))


class _LeafNothing(torch.fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return False


def test_fx_keeps_a_normalized_layer_a_leaf_and_records_the_formula_when_told_to_enter_it() -> None:
    """``torch.fx`` records a leaf module as one ``call_module`` node (hooks on it fire in the traced
    module, FX tools see the layer), for our layers as for torch's own weight norm; a Tracer that
    enters every module records ``g * v/||v||`` as ops on the parameters, the same function."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5))
    model = wn.apply_weight_norm(plain, init="preserve")
    with torch.no_grad():
        model[0].parametrizations.weight.original1[1] = 0  # a zero direction: a zero weight, not NaN
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["0", "1", "2", "3"]
    fired: list[bool] = []
    traced.get_submodule("0").register_forward_hook(lambda *_: fired.append(True))
    torch.testing.assert_close(traced(x), expected)
    assert fired == [True]
    inlined = torch.fx.GraphModule(model, _LeafNothing().trace(model))
    assert not any(n.op == "call_module" for n in inlined.graph.nodes)
    torch.testing.assert_close(inlined(x), model(x))
    with torch.no_grad():
        model[3].parametrizations.weight.original0.mul_(2)  # the parameters are read, not baked in
    torch.testing.assert_close(inlined(x), model(x))
    grouped = wn.apply_weight_norm(nn.Sequential(nn.ConvTranspose1d(4, 4, 3, groups=2)), init="preserve")
    with pytest.raises(TypeError, match="grouped ConvTranspose .*leaf module"):
        _LeafNothing().trace(grouped)


def _attention_pair() -> tuple[nn.MultiheadAttention, nn.MultiheadAttention]:
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(8, 2, batch_first=True)
    ours = wn.apply_weight_norm(nn.Sequential(plain), init="preserve")[0]
    reference = torch.nn.utils.parametrizations.weight_norm(copy.deepcopy(plain), "in_proj_weight")
    torch.nn.utils.parametrizations.weight_norm(reference.out_proj)
    return ours.train(), reference.train()


def test_attention_computes_each_weight_once_per_training_call(monkeypatch: pytest.MonkeyPatch) -> None:
    import wn_transform.parametrization as parametrization

    ours, _ = _attention_pair()
    calls: list[tuple[int, ...]] = []
    original = parametrization.weight_norm_weight

    def counting(g, v, layout, *, exp_scale=False):
        calls.append(tuple(v.shape))
        return original(g, v, layout, exp_scale=exp_scale)

    monkeypatch.setattr(parametrization, "weight_norm_weight", counting)
    x = torch.randn(2, 5, 8)
    ours(x, x, x)[0].sum().backward()
    assert sorted(calls) == [(8, 8), (24, 8)]  # torch's MultiheadAttention reads in_proj_weight 3 times


def test_attention_outputs_and_gradients_match_torch_weight_norm_across_calls() -> None:
    """Two forward/backward pairs before a step (gradient accumulation): the memo lives for one
    call only, so the second call builds a fresh graph; values match torch's weight_norm."""
    ours, reference = _attention_pair()
    x = torch.randn(2, 5, 8)
    for _ in range(2):
        for model in (ours, reference):
            model(x, x, x)[0].square().sum().backward()
    torch.testing.assert_close(ours(x, x, x)[0], reference(x, x, x)[0])
    got = dict(ours.named_parameters())  # torch's keys: parametrizations.<name>.original0 (g), original1 (v)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(got[name].grad, param.grad, msg=name)


def test_hooks_on_the_parametrization_chain_run_and_pruning_the_direction_works_as_with_torchs() -> None:
    """Tools that hook the chain (``torch.nn.utils.prune`` masks ``original1`` through a forward
    pre-hook that replaces the Parameter by an attribute) see the chain called, as with torch's
    own weight norm: the fast getters step aside for them."""
    import torch.nn.utils.prune as prune
    from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    ours = wn.apply_weight_norm(base, init="preserve")
    theirs = copy.deepcopy(base)
    torch_weight_norm(theirs[0])
    torch_weight_norm(theirs[2])
    theirs.load_state_dict(ours.state_dict())
    calls = []
    ours[2].parametrizations.weight.register_forward_pre_hook(lambda module, args: calls.append(module))
    for model in (ours, theirs):
        prune.l1_unstructured(model[0].parametrizations.weight, "original1", amount=0.5)
    x = torch.randn(4, 16)
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        torch.testing.assert_close(ours(x), theirs(x))
        assert float((ours[0].weight == 0).float().mean()) == 0.5
    assert len(calls) >= 2
    ours.train()
    ours(x).sum().backward()
    theirs(x).sum().backward()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(wn.fold_weight_norm(ours)(x), theirs(x))


@pytest.mark.parametrize("gain", ["expanded", "broadcast"])
@pytest.mark.parametrize(("mode", "rows"), [("eval", 4), ("train", 2), ("train", 64)],
                         ids=["eval-weight-form", "train-few-rows", "train-many-rows"])
def test_a_gain_swapped_in_with_another_layout_gives_the_formula(gain: str, mode: str, rows: int) -> None:
    """``functional_call`` or ``load_state_dict(assign=True)`` may hand a layer a gain that is an
    expanded view (stride 0: room for one norm, not one per unit) or a broadcast ``[1, 1]``: every
    route computes ``g * v/||v||`` with it (torch's fused kernel, given such a ``g`` as it is,
    writes past its end)."""
    torch.manual_seed(0)
    layer = wn.apply_weight_norm(nn.Linear(512, 256), init="preserve").train(mode == "train")
    v = layer.parametrizations.weight.original1
    g = torch.full((1, 1), 1.5).expand(256, 1) if gain == "expanded" else torch.full((1, 1), 1.5)
    x = torch.randn(rows, 512)
    expected = F.linear(x, 1.5 * v / v.norm(dim=1, keepdim=True), layer.bias)
    for _ in range(3):  # a cached weight, if any, must be the same
        with torch.set_grad_enabled(mode == "train"):
            got = torch.func.functional_call(layer, {"parametrizations.weight.original0": g}, (x,))
        torch.testing.assert_close(got, expected)
    if mode == "train":
        got.sum().backward()
        assert torch.isfinite(v.grad).all()


def test_a_float16_layer_trains_on_the_weight_form_where_the_output_would_overflow() -> None:
    """The output form computes ``x @ v'`` before normalizing: a float16 ``v`` with a large norm
    (entries near 1e3, norms near 2e4) would overflow float16 there; the weight ``g * v/||v||`` does not."""
    torch.manual_seed(0)
    layer = wn.apply_weight_norm(nn.Linear(1024, 256), init="preserve").half()
    reference = torch.nn.utils.parametrizations.weight_norm(nn.Linear(1024, 256).half())
    with torch.no_grad():
        layer.parametrizations.weight.original1.mul_(3e4)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 1024).half()
    for model in (layer, reference):
        model(x).float().square().sum().backward()
    torch.testing.assert_close(layer(x), reference(x))
    for name, param in layer.named_parameters():
        assert torch.isfinite(param.grad).all(), name
        torch.testing.assert_close(param.grad, reference.get_parameter(name).grad, msg=name)


def test_torch_export_of_an_unfolded_model_keeps_the_batch_dynamic() -> None:
    """Under ``torch.export`` no route is chosen by the number of rows: the program holds for
    every batch size, as a folded model's (and torch's own weight norm's) does."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4)), init="preserve")
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(8, 512),), dynamic_shapes=({0: batch},))
    for rows in (2, 8, 300):
        x = torch.randn(rows, 512)
        torch.testing.assert_close(program.module()(x), model(x))


def test_a_model_whose_parameters_are_inference_tensors_gets_a_warning_naming_one() -> None:
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(4, 3))
    with pytest.warns(UserWarning, match=r"parameter '0.weight' is an inference tensor.*can never be trained"):
        wn.apply_weight_norm(model)


@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 4), lambda: nn.Conv1d(4, 6, 3), lambda: nn.ConvTranspose1d(4, 6, 3, groups=2),
                                  lambda: nn.Linear(512, 256)], ids=["linear", "conv1d", "grouped_conv_transpose", "output_form"])
def test_fake_tensor_mode_gives_fake_outputs_and_leaves_no_fake_weight_behind(make) -> None:
    """Shape inference and memory estimates run a model under ``FakeTensorMode`` (torch's own weight
    norm runs there): the fused kernel's zero-norm read has no value to read, and a weight computed
    there is fake, so the eval cache must not keep it for the next real forward."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    torch.manual_seed(0)
    layer = make()
    model = wn.apply_weight_norm(copy.deepcopy(layer), init="preserve")
    x = torch.randn(2, 6) if isinstance(layer, nn.Linear) and layer.in_features == 6 else (
        torch.randn(2, 512) if isinstance(layer, nn.Linear) else torch.randn(2, 4, 5))
    expected = layer(x)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (reading a FakeTensor's data pointer warns)
            with FakeTensorMode(allow_non_fake_inputs=True), torch.set_grad_enabled(mode == "train"):
                fake = model(torch.empty_like(x))
        assert isinstance(fake, FakeTensor) and fake.shape == expected.shape
        with torch.set_grad_enabled(mode == "train"):
            real = model(x)
        assert type(real) is torch.Tensor
        torch.testing.assert_close(real, expected.detach() if mode == "eval" else expected)


def test_a_gradient_penalty_and_its_parameter_gradients_are_the_plain_formulas() -> None:
    """WGAN-GP's penalty ``(||dD/dx|| - 1)^2`` differentiates ``D``'s input gradient w.r.t. the
    parameters: only first derivatives of ``w(g, v)``, which every fast path has exactly (the fused
    kernel's incomplete double backward is not reached).  Oracle: ``torch.func``, where every layer
    computes the plain formula, in float64."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    critic = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LeakyReLU(0.2), nn.Conv2d(8, 8, 3, groups=2), nn.LeakyReLU(0.2),
                           nn.Flatten(), nn.Linear(8 * 4 * 4, 512), nn.Tanh(), nn.Linear(512, 256), nn.Tanh(),
                           nn.Linear(256, 1))  # (512 -> 256 at 2 rows: the output form)
    model = wn.apply_weight_norm(critic, init="preserve").double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)

    def penalty(run, inputs):
        (grad_x,) = torch.autograd.grad(run(inputs).sum(), inputs, create_graph=True)
        return (grad_x.flatten(1).norm(dim=1) - 1).square().mean()

    got = torch.autograd.grad(penalty(model, x), list(model.parameters()), materialize_grads=True)  # (a last bias: 0)
    parameters = {name: p.detach() for name, p in model.named_parameters()}

    def plain_penalty(params):
        input_grad = grad(lambda inputs: functional_call(model, params, (inputs,)).sum())(x.detach())
        return (input_grad.flatten(1).norm(dim=1) - 1).square().mean()

    expected = grad(plain_penalty)(parameters)
    for (name, _), value in zip(model.named_parameters(), got, strict=True):
        torch.testing.assert_close(value, expected[name], msg=name)
