"""Discovery through torch.export sees the layers that a forward runs inside ``torch.no_grad()``,
``torch.autocast`` or a reentrant checkpoint: torch.export wraps each such region in a
higher-order op whose body is a subgraph, and the ops in it are logged as if inline."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import wn_transform as wn
from wn_transform.discover import EXPORT, discover

pytestmark = pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # checkpoint in eval


class NoGrad(nn.Module):
    """A frozen teacher run without autograd, beside a student."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = nn.Linear(5, 8)
        self.student = nn.Linear(5, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # Python control flow on the input: symbolic_trace fails, torch.export does not
            x = x.flatten(0, 1)
        with torch.no_grad():
            t = self.teacher(x)
        return self.head(torch.relu(self.student(x) + t))


class Autocast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.flatten(0, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.fc(x)
        return self.head(torch.relu(h.float()))


class Reentrant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.flatten(0, 1)
        return self.head(torch.relu(checkpoint(self.block, x, use_reentrant=True)))


class Nested(nn.Module):
    """A weight viewed inside a no_grad region and used outside it; an autocast region inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.w = nn.Parameter(torch.randn(8, 5))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.flatten(0, 1)
        with torch.no_grad():
            wt = self.w.t()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.fc(x).float()
        return self.head(torch.relu(h + x @ wt))


CASES = {"no_grad": (NoGrad, ["teacher", "student", "head"]), "autocast": (Autocast, ["fc", "head"]),
         "reentrant_checkpoint": (Reentrant, ["block.0", "block.2", "head"])}


@pytest.mark.parametrize("name", list(CASES))
def test_layers_in_a_region_are_found_by_torch_export(name: str) -> None:
    torch.manual_seed(0)
    cls, layers = CASES[name]
    out = wn.apply_weight_norm(cls(), torch.randn(64, 5) + 0.5)
    report = wn.weight_norm_report(out)
    assert report.found_by == EXPORT, report.trace_failures
    assert sorted(t.qualname for t in report.converted) == sorted(f"{layer}.weight" for layer in layers)
    assert not report.skipped


@pytest.mark.parametrize("name", list(CASES))
def test_the_data_init_standardizes_the_layers_in_a_region(name: str) -> None:
    torch.manual_seed(0)
    cls, layers = CASES[name]
    x = torch.randn(64, 5) + 0.5
    out = wn.apply_weight_norm(cls(), x).eval()
    outputs = {}
    for layer in layers:
        out.get_submodule(layer).register_forward_hook(
            lambda m, a, y, layer=layer: outputs.__setitem__(layer, y.detach().double()))
    with torch.no_grad():
        out(x)
    tolerance = 0.05 if name == "autocast" else 1e-4  # bf16 rounding
    for layer, value in outputs.items():
        var, mean = torch.var_mean(value, dim=0, correction=0)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=tolerance, rtol=0, msg=layer)
        torch.testing.assert_close(var.sqrt(), torch.ones_like(var), atol=tolerance, rtol=0, msg=layer)


def test_a_weight_passed_through_a_region_keeps_its_view_and_nested_regions_are_walked() -> None:
    torch.manual_seed(0)
    discovery = discover(Nested().eval(), torch.randn(4, 5))
    assert discovery.found_by == EXPORT
    found = {t.qualname: t for t in discovery.targets}
    assert set(found) == {"fc.weight", "w", "head.weight"}, discovery.skipped
    assert found["w"].kind == "matmul" and found["w"].layout.dim == 0  # x @ w.t(): w's rows are the units


class _CondBase(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)


class CondHandsOutTheWeight(_CondBase):
    """Each branch of ``torch.cond`` hands out ``a.weight`` (a copy), which a sum then reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.cond(x.sum() > 0, lambda w: w.clone(), lambda w: w.clone(), (self.a.weight,))
        if x.shape[1] > 2:
            x = x + 1
        return self.b(self.a(x)) * w.sum()


class CondComputesTheWeight(_CondBase):
    """Each branch of ``torch.cond`` computes a weight from ``a.weight``, which F.linear then reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.cond(x.sum() > 0, lambda w: w * 2, lambda w: w * 3, (self.a.weight,))
        if x.shape[1] > 2:
            x = x + 1
        return self.b(torch.nn.functional.linear(x, w))


@pytest.mark.parametrize(("cls", "reason"), [(CondHandsOutTheWeight, "shared: also read by cond"),
                                             (CondComputesTheWeight, "reaches its linear op only through other ops")])
def test_a_weight_that_leaves_a_cond_is_followed_through_either_branch(cls: type, reason: str) -> None:
    """What either branch hands out may be what runs: a parameter (or a value made from it) that
    leaves ``torch.cond`` is still that parameter's, so it is skipped for the right reason."""
    report = wn.plan_weight_norm(cls(), torch.randn(3, 4))
    assert report.found_by == EXPORT
    assert [t.qualname for t in report.converted] == ["b.weight"]
    assert [s.qualname for s in report.skipped] == ["a.weight"] and report.skipped[0].reason.startswith(reason)


class _WhileLoop(nn.Module):
    """A layer applied in the body of ``torch.while_loop``, whose subgraph discovery does not follow."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._higher_order_ops import while_loop

        _, h = while_loop(lambda i, h: i < 3, lambda i, h: (i + 1, torch.tanh(self.a(h))),
                          (torch.zeros((), dtype=torch.int64), x))
        return self.c(h)


def test_a_layer_in_a_while_loop_body_is_skipped_with_that_reason() -> None:
    """Not "not read as the weight of a linear op by the forward that was traced": the report says
    it is read in a while_loop body, which discovery does not follow, and what to do."""
    torch.manual_seed(0)
    report = wn.plan_weight_norm(_WhileLoop(), torch.randn(8, 4))
    assert [t.qualname for t in report.converted] == ["c.weight"]
    assert {s.qualname: s.reason for s in report.skipped}["a.weight"].startswith(
        "read inside the body of torch's while_loop (a loop whose body torch.export keeps as a subgraph")
    assert [s.qualname for s in report.skipped] == ["a.weight"]  # (its bias is no weight: not listed)
