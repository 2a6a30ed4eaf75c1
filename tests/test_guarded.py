"""The CUDA route of the weight: torch's fused kernel with zero directions mended on the device.

On CUDA, :func:`wn_transform.fast.eager_weight` computes ``w = g * v/||v||`` with
:func:`~wn_transform.fast.guarded_weight`: torch's fused kernel, its NaN rows (a zero
direction: ``0 * g/0``) zeroed and the norms its backward divides by set to 1 there, in place
(under saved-tensor hooks: the plain formula).  CI has no GPU,
so the ``on_device`` fixture sends CPU tensors down that route; ``tests/test_device.py`` runs it
on a GPU.  The oracle is the paper's formula in float64, a zero direction's norm counting as 1
(a zero weight; ``dL/dg = 0`` and ``dL/dv = g dL/dw`` there).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune

import wn_transform as wn
from wn_transform import fast


@pytest.fixture
def on_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain CPU tensors take the CUDA route."""
    monkeypatch.setattr(fast, "guarded_on_device", lambda v: type(v) in (Tensor, nn.Parameter))


def _oracle(v: Tensor, g: Tensor, dim: int) -> Tensor:
    """``g * v/||v||`` in float64 with autograd, the norm over every axis but ``dim``, 1 where it is 0."""
    dims = [d for d in range(v.ndim) if d != dim]
    norms = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    return g * v / torch.where(norms == 0, torch.ones_like(norms), norms)


@pytest.mark.parametrize("shape,dim", [((5, 4), 0), ((6, 3, 2), 0), ((3, 2, 5), 2)], ids=["linear", "conv", "last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_the_guarded_kernel_matches_the_formula_with_zero_directions(shape: tuple[int, ...], dim: int,
                                                                   dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(shape, generator=generator, dtype=dtype)
    v.select(dim, 1).zero_()  # a zero direction with g = 1.5: a zero weight, finite gradients
    g_shape = [1] * len(shape)
    g_shape[dim] = shape[dim]
    g = torch.rand(g_shape, generator=generator, dtype=dtype) + 1
    grad_w = torch.randn(shape, generator=generator, dtype=dtype)
    v_fast, g_fast = v.clone().requires_grad_(), g.clone().requires_grad_()
    w = fast.guarded_weight(v_fast, g_fast, dim)
    w.backward(grad_w)
    v_ref, g_ref = v.double().requires_grad_(), g.double().requires_grad_()
    expected = _oracle(v_ref, g_ref, dim)
    expected.backward(grad_w.double())
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(w.detach().double(), expected.detach(), **tolerance)
    torch.testing.assert_close(v_fast.grad.double(), v_ref.grad, **tolerance)
    torch.testing.assert_close(g_fast.grad.double(), g_ref.grad, **tolerance)
    assert torch.equal(w.detach().select(dim, 1), torch.zeros_like(w.detach().select(dim, 1)))


@pytest.mark.parametrize("dim", [0, 1], ids=["first", "last"])
def test_a_one_dimensional_gain_mends_the_rows_of_its_units(dim: int) -> None:
    """``g`` given 1-D (one value per unit) for a square ``v``: the zero direction's unit is mended,
    not the slice across the other axis."""
    v = torch.randn(3, 3, dtype=torch.float64)
    v.select(dim, 1).zero_()
    g = torch.rand(3, dtype=torch.float64) + 0.5
    shape = [3, 1] if dim == 0 else [1, 3]
    torch.testing.assert_close(fast.guarded_weight(v, g, dim), _oracle(v, g.view(shape), dim))


def test_a_nan_direction_stays_nan_and_does_not_spread() -> None:
    v = torch.randn(4, 3)
    v[2, 0] = float("nan")
    g = torch.ones(4, 1)
    w = fast.guarded_weight(v, g, 0)
    assert bool(w[2].isnan().all())
    assert bool(torch.isfinite(w[[0, 1, 3]]).all())


def test_first_derivatives_under_create_graph_are_the_formulas() -> None:
    """``create_graph=True`` records the fused kernel's differentiable backward, given the mended
    norms: the first derivatives are the formula's, zero direction included (the second ones drop
    the terms through ``||v||``, as on the CPU and in torch's own weight norm: see README, Numerics)."""
    generator = torch.Generator().manual_seed(1)
    v = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    v[2] = 0
    g = torch.rand(4, 1, generator=generator, dtype=torch.float64) + 0.5
    grad_w = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    leaves = v.clone().requires_grad_(), g.clone().requires_grad_()
    got = torch.autograd.grad(fast.guarded_weight(*leaves, 0), leaves, grad_w, create_graph=True)
    assert all(t.requires_grad for t in got)  # on the graph
    refs = v.clone().requires_grad_(), g.clone().requires_grad_()
    expected = torch.autograd.grad(_oracle(*refs, 0), refs, grad_w)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.detach(), b)


def _pack_copy(t: Tensor) -> Tensor:
    return t.clone()  # what save_on_cpu and offloading hooks do: a copy taken at the forward


@pytest.mark.usefixtures("on_device")
def test_under_saved_tensor_hooks_a_layer_takes_the_plain_formula() -> None:
    """A pack hook copies what the kernel saves before it could be mended: with hooks on, the
    weight is the plain formula's, so a zero direction still gets finite gradients."""
    model, x = _model(), _x()
    with torch.no_grad():
        model[0].parametrizations.weight.original1[3] = 0
    with torch.autograd.graph.saved_tensors_hooks(_pack_copy, lambda t: t):
        out = model(x)
        assert type(model[0].weight.grad_fn).__name__ != "WeightNormInterfaceBackward0"
    out.square().sum().backward()
    torch.testing.assert_close(out.double(), _formula(model, x))
    assert _finite_grads(model)
    assert torch.equal(model[0].parametrizations.weight.original0.grad[3], torch.zeros(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return wn.apply_weight_norm(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), init="preserve")


def _formula(model: nn.Module, x: Tensor) -> Tensor:
    """``model``'s function in float64 by :func:`_oracle`."""
    out = x.double()
    for layer in model:
        if isinstance(layer, nn.Linear):
            chain = layer.parametrizations.weight
            weight = _oracle(chain.original1.detach().double(), chain.original0.detach().double(), 0)
            out = F.linear(out, weight, layer.bias.detach().double())
        else:
            out = layer(out)
    return out


def _x() -> Tensor:
    return torch.randn(7, 6, generator=torch.Generator().manual_seed(2))


def _finite_grads(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


@pytest.mark.usefixtures("on_device")
def test_a_model_trains_through_the_guarded_kernel_and_evaluates_without_a_graph() -> None:
    model, x = _model(), _x()
    out = model(x)
    assert type(model[0].weight.grad_fn).__name__ == "WeightNormInterfaceBackward0"  # the kernel's own
    out.square().sum().backward()
    torch.testing.assert_close(out.double(), _formula(model, x))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).double(), _formula(model, x))
        assert model[0].weight.grad_fn is None


@pytest.mark.usefixtures("on_device")
def test_directions_zeroed_by_any_write_give_zero_weights_and_finite_gradients() -> None:
    """Whoever zeroes a direction, between steps or inside one (a pruning hook on the optimizer, a
    proximal step, a write through ``.data`` that no version counter sees), the next forward
    gives that unit a zero weight: nothing is remembered between calls."""
    model, x = _model(), _x()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    v0, v2 = model[0].parametrizations.weight.original1, model[2].parametrizations.weight.original1

    def prune_row(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        with torch.no_grad():
            v0[1] = 0

    optimizer.register_step_post_hook(prune_row)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
    v2.data[0] = 0  # through .data
    out = model(x)
    out.square().sum().backward()
    torch.testing.assert_close(out.double(), _formula(model, x))
    assert torch.equal(model[0].weight[1], torch.zeros(6)) and torch.equal(model[2].weight[0], torch.zeros(5))
    assert _finite_grads(model)


@pytest.mark.usefixtures("on_device")
def test_a_pruned_direction_computed_at_each_call_takes_the_guarded_kernel() -> None:
    model, x = _model(), _x()
    prune.ln_structured(model[0].parametrizations.weight, "original1", amount=2, n=2, dim=0)  # two zero rows
    out = model(x)
    out.square().sum().backward()
    torch.testing.assert_close(out.double(), _formula(model, x))
    assert int((model[0].weight.abs().sum(dim=1) == 0).sum()) == 2
    assert _finite_grads(model)


@pytest.mark.usefixtures("on_device")
def test_convolutions_and_exp_scale_take_the_guarded_kernel() -> None:
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Conv1d(4, 2, 1)), init="preserve",
                                 exp_scale=True)
    with torch.no_grad():
        model[0].parametrizations.weight.original1[2] = 0
    x = torch.randn(2, 3, 9)
    out = model(x)
    out.square().sum().backward()
    plain = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Conv1d(4, 2, 1)).double()
    with torch.no_grad():
        for i in (0, 2):
            chain = model[i].parametrizations.weight
            plain[i].weight.copy_(_oracle(chain.original1.double(), chain.original0.double().exp(), 0))
            plain[i].bias.copy_(model[i].bias)
    torch.testing.assert_close(out.double(), plain(x.double()))
    assert type(model[2].weight.grad_fn).__name__ == "WeightNormInterfaceBackward0"
    assert _finite_grads(model)
