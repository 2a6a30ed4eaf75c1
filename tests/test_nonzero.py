"""The accelerator route of the weight: torch's fused kernel, its zero-direction check kept per value of ``v``.

On CUDA, :func:`wn_transform.fast.weight_norm_weight` reads ``min ||v[unit]||`` once per value
of ``v`` (:mod:`wn_transform.nonzero`).  CI has no GPU, so the ``remembered`` fixture sends
CPU tensors down that route; ``tests/test_device.py`` runs it on a GPU.  The oracle is the
paper's formula ``w = g * v/||v||`` in float64, with a zero direction giving a zero weight.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune

import wn_transform as wn
from wn_transform import nonzero


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[Tensor]:
    """Parameters on the CPU take the remembered route, as on CUDA; returns the remembered ``v``
    checked, in order."""
    monkeypatch.setattr(nonzero, "remembers", lambda v: type(v) is nn.Parameter)
    seen: list[Tensor] = []
    real_check = nonzero.check

    def counting(v: Tensor, norms: Tensor) -> bool:
        if nonzero.remembers(v):  # (the CPU route reads every other tensor's norms at every call)
            seen.append(v)
        return real_check(v, norms)

    monkeypatch.setattr(nonzero, "check", counting)
    return seen


def _model() -> nn.Module:
    torch.manual_seed(0)
    return wn.apply_weight_norm(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), init="preserve")


def _formula(model: nn.Module, x: Tensor) -> Tensor:
    """``model``'s function in float64, each weight ``g * v/||v||`` with a zero direction giving 0."""
    out = x.double()
    for layer in model:
        if not isinstance(layer, nn.Linear):
            out = layer(out)
            continue
        chain = layer.parametrizations.weight
        g, v = chain.original0.detach().double(), chain.original1.detach().double()
        norms = v.norm(dim=1, keepdim=True)
        out = F.linear(out, g * v / torch.where(norms == 0, 1.0, norms), layer.bias.detach().double())
    return out


def _directions(model: nn.Module) -> list[Tensor]:
    return [layer.parametrizations.weight.original1 for layer in model if isinstance(layer, nn.Linear)]


def _x() -> Tensor:
    return torch.randn(7, 6, generator=torch.Generator().manual_seed(1))


def test_a_direction_is_checked_once_then_the_kernel_alone_computes_it(checks: list[Tensor]) -> None:
    model, x = _model(), _x()
    for _ in range(3):
        out = model(x)
        out.square().sum().backward()
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x).double(), _formula(model, x))
        model.train()
    assert [id(v) for v in checks] == [id(v) for v in _directions(model)]  # one check per layer, the first call
    torch.testing.assert_close(out.double(), _formula(model, x))


def test_optimizer_steps_carry_the_check_over(checks: list[Tensor]) -> None:
    model, x = _model(), _x()
    sgd = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model[2].parameters(), lr=0.01, fused=True)  # fused: writes without bumping versions
    for _ in range(4):
        sgd.zero_grad()
        adam.zero_grad()
        out = model(x)
        torch.testing.assert_close(out.double(), _formula(model, x))
        out.square().sum().backward()
        sgd.step()
        adam.step()
    assert len(checks) == 2  # the first forward's: both steps carried the verdicts over


def test_a_write_outside_an_optimizer_is_checked_and_a_zero_direction_gives_a_zero_weight(checks: list[Tensor]) -> None:
    model, x = _model(), _x()
    model(x)
    v = model[0].parametrizations.weight.original1
    with torch.no_grad():
        v[2] = 0  # an in-place write bumps the version: the verdict no longer holds
    out = model(x)
    out.square().sum().backward()
    assert len(checks) == 3
    torch.testing.assert_close(out.double(), _formula(model, x))
    assert torch.equal(model[0].weight[2], torch.zeros(6))
    grads = [p.grad for p in model.parameters()]
    assert all(grad is not None and bool(torch.isfinite(grad).all()) for grad in grads)


def test_a_step_after_an_unchecked_write_does_not_vouch_for_it(checks: list[Tensor]) -> None:
    """The verdict is carried over only for parameters that held it when the step began."""
    model, x = _model(), _x()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()  # checked: 2
    with torch.no_grad():
        model[2].parametrizations.weight.original1[0] = 0
    optimizer.step()
    torch.testing.assert_close(model(x).double(), _formula(model, x))
    assert [id(v) for v in checks[2:]] == [id(model[2].parametrizations.weight.original1)]


def test_a_tensor_rewritten_again_and_again_stops_being_checked(checks: list[Tensor]) -> None:
    """An EMA, or FSDP2's gathers, rewrite the parameters outside an optimizer before each
    forward: after MAX_CHECKS checks the guarded formula takes over, with the same values."""
    model, x = _model(), _x()
    v = model[0].parametrizations.weight.original1
    for step in range(nonzero.MAX_CHECKS + 3):
        with torch.no_grad():
            v.mul_(1.01)
            if step == nonzero.MAX_CHECKS + 1:
                v[3] = 0
        torch.testing.assert_close(model(x).double(), _formula(model, x))
    assert sum(checked is v for checked in checks) == nonzero.MAX_CHECKS


def test_a_copy_and_a_moved_model_are_checked_afresh(checks: list[Tensor]) -> None:
    model, x = _model(), _x()
    model(x)
    twin = copy.deepcopy(model)  # its verdicts, if copied, name the original's storage
    with torch.no_grad():
        twin[0].parametrizations.weight.original1[1] = 0
    torch.testing.assert_close(twin(x).double(), _formula(twin, x))
    as_double = model.double()  # a new storage: a new address
    torch.testing.assert_close(as_double(x.double()), _formula(model, x))
    assert len(checks) == 6


def test_convolutions_and_exp_scale_take_the_route_too(checks: list[Tensor]) -> None:
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Conv1d(4, 2, 1)), init="preserve",
                                 exp_scale=True)
    x = torch.randn(2, 3, 9)
    out = model(x)
    plain = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Conv1d(4, 2, 1))
    with torch.no_grad():
        for i in (0, 2):
            chain = model[i].parametrizations.weight
            s, v = chain.original0.double(), chain.original1.double()
            plain[i].weight.copy_(s.exp() * v / v.flatten(1).norm(dim=1).view(-1, 1, 1))
            plain[i].bias.copy_(model[i].bias)
    torch.testing.assert_close(out, plain(x))
    model(x)
    assert len(checks) == 2


def test_a_pruned_direction_computed_at_each_call_takes_the_guarded_formula_unchecked(checks: list[Tensor]) -> None:
    """``torch.nn.utils.prune`` makes ``v`` a tensor computed at each call (``original1_orig * mask``):
    its check is not kept (on CUDA it would be read at every call, so the guarded formula computes
    its weight there), and its zero rows give zero weights."""
    model, x = _model(), _x()
    prune.ln_structured(model[0].parametrizations.weight, "original1", amount=2, n=2, dim=0)  # two zero rows
    out = model(x)
    out.square().sum().backward()
    assert [id(v) for v in checks] == [id(model[2].parametrizations.weight.original1)]
    torch.testing.assert_close(out.double(), _formula(model, x))
    assert int((model[0].weight.abs().sum(dim=1) == 0).sum()) == 2
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
