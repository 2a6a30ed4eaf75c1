"""The parametrization against the paper's formulas and torch's own weight_norm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

import wn_transform as wn
from wn_transform.norm import UnitLayout, compose_weight, unit_norm


def _paper_gradients(g: torch.Tensor, v: torch.Tensor, grad_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3-4 of Salimans & Kingma (2016), one row (output unit) at a time, in float64.

    grad_g = grad_w . v/||v||;  grad_v = g/||v|| * M_w grad_w,  M_w = I - w w'/||w||^2.
    """
    grad_g = torch.empty(v.shape[0], dtype=torch.float64)
    grad_v = torch.empty_like(v, dtype=torch.float64)
    for i in range(v.shape[0]):
        vi, gw, gi = v[i].double().flatten(), grad_w[i].double().flatten(), g[i].double()
        norm = vi.norm()
        w = gi * vi / norm
        projector = torch.eye(vi.numel(), dtype=torch.float64) - torch.outer(w, w) / w.dot(w)
        grad_g[i] = gw.dot(vi / norm)
        grad_v[i] = (gi / norm * projector @ gw).view(v.shape[1:])
    return grad_g, grad_v


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 3), (5, 2, 3, 3)], ids=["linear", "conv1d", "conv2d"])
def test_gradients_match_the_paper(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    v = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(shape[0], dtype=torch.float64) + 0.5).view(-1, *[1] * (len(shape) - 1)).requires_grad_()
    grad_w = torch.randn(shape, dtype=torch.float64)
    w = wn.WeightNorm(0)(g, v)
    w.backward(grad_w)
    expected_g, expected_v = _paper_gradients(g.detach().view(-1), v.detach(), grad_w)
    torch.testing.assert_close(g.grad.view(-1), expected_g)
    torch.testing.assert_close(v.grad, expected_v)
    # The v-gradient is orthogonal to v, per output unit.
    dots = (v.grad * v.detach()).flatten(1).sum(1)
    torch.testing.assert_close(dots, torch.zeros_like(dots), atol=1e-12, rtol=0)


def test_sgd_never_shrinks_the_direction() -> None:
    """grad_v is orthogonal to v, so ||v - lr*grad_v||^2 = ||v||^2 + lr^2 ||grad_v||^2 >= ||v||^2."""
    torch.manual_seed(0)
    layer = wn.apply_weight_norm(nn.Linear(8, 4), init="preserve")
    v = layer.parametrizations.weight.original1
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.2)
    growth = torch.zeros(4)
    for _ in range(20):
        before = v.detach().norm(dim=1).clone()
        loss = (layer(torch.randn(16, 8)) - 1).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after = v.detach().norm(dim=1)
        assert (after >= before * (1 - 1e-6)).all()
        growth += after - before
    assert (growth > 0).all()  # the second-order term really is there


def test_exp_scale_gradients_are_chained_through_e_to_the_s() -> None:
    """With g = e^s: grad_s = e^s * grad_g, and grad_v is the same as for the plain scale."""
    torch.manual_seed(0)
    v = torch.randn(5, 4, dtype=torch.float64)
    s = torch.randn(5, 1, dtype=torch.float64)
    grad_w = torch.randn(5, 4, dtype=torch.float64)
    v1, s1 = v.clone().requires_grad_(), s.clone().requires_grad_()
    wn.WeightNorm(0, exp_scale=True)(s1, v1).backward(grad_w)
    expected_g, expected_v = _paper_gradients(s.exp().view(-1), v, grad_w)
    torch.testing.assert_close(s1.grad.view(-1), s.exp().view(-1) * expected_g)
    torch.testing.assert_close(v1.grad, expected_v)


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(7, 5), nn.Conv1d(3, 6, 3), nn.Conv2d(4, 8, 3, groups=2), nn.Conv3d(2, 3, 2)],
    ids=["linear", "conv1d", "conv2d-groups", "conv3d"],
)
def test_forward_agrees_with_torch_weight_norm(layer: nn.Module) -> None:
    torch.manual_seed(0)
    ours = wn.apply_weight_norm(layer, init="preserve")
    reference = torch_weight_norm(copy.deepcopy(layer), dim=0)
    with torch.no_grad():  # the same (g, v) in both, g away from ||v|| so g matters
        g = torch.rand_like(reference.parametrizations.weight.original0) + 0.5
        reference.parametrizations.weight.original0.copy_(g)
        ours.parametrizations.weight.original0.copy_(g)
    torch.testing.assert_close(ours.weight, reference.weight)


def test_conv_transpose_is_normalized_per_output_channel_within_its_group() -> None:
    """ConvTranspose weight [in, out/G, k]: output channel c = grp*out/G + j has fan-in
    weight[grp*in/G:(grp+1)*in/G, j] -- a hand-written loop, not torch's per-input-channel norm."""
    torch.manual_seed(0)
    groups, cin, cout = 2, 6, 4
    layer = nn.ConvTranspose1d(cin, cout, 3, groups=groups)
    ours = wn.apply_weight_norm(layer, init="preserve")
    g = torch.rand(cout) + 0.5
    with torch.no_grad():
        ours.parametrizations.weight.original0.copy_(g.view(1, cout, 1))
    v = ours.parametrizations.weight.original1.detach()
    expected = torch.empty_like(v)
    per_group_in, per_group_out = cin // groups, cout // groups
    for c in range(cout):
        grp, j = divmod(c, per_group_out)
        rows = slice(grp * per_group_in, (grp + 1) * per_group_in)
        expected[rows, j] = g[c] * v[rows, j] / v[rows, j].norm()
    torch.testing.assert_close(ours.weight, expected)
    x = torch.randn(2, cin, 5)
    torch.testing.assert_close(ours(x), F.conv_transpose1d(x, expected, layer.bias, groups=groups))


def test_conv_transpose_groups_one_agrees_with_torch_dim_one() -> None:
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(3, 5, 2)
    ours = wn.apply_weight_norm(layer, init="preserve")
    reference = torch_weight_norm(copy.deepcopy(layer), dim=1)
    assert ours.parametrizations.weight.original0.shape == reference.parametrizations.weight.original0.shape == (1, 5, 1, 1)
    torch.testing.assert_close(ours.parametrizations.weight.original0, reference.parametrizations.weight.original0)


def test_zero_direction_gives_zero_weight_and_finite_gradients() -> None:
    v = torch.randn(4, 3)
    v[1] = 0
    v.requires_grad_()
    g = torch.ones(4, 1, requires_grad=True)
    w = compose_weight(g, v, UnitLayout(0))
    assert torch.equal(w[1], torch.zeros(3))
    w.sum().backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(g.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norm_is_accumulated_in_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    v = (torch.randn(3, 4096) * 300).to(dtype)  # sum of squares overflows float16
    norm = unit_norm(v, UnitLayout(0))
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm.view(-1), v.float().norm(dim=1))
    w = compose_weight(norm.to(dtype), v, UnitLayout(0))
    assert w.dtype == dtype and torch.isfinite(w).all()
    torch.testing.assert_close(w.float(), v.float(), rtol=1e-2, atol=1e-2)
