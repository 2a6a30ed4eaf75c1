"""The native kernels (wn_transform/kernels.c): the paper's formulas in float64, the eager route,
and every way they can be unavailable."""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import shutil
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wn_transform as wn
from wn_transform import kernels
from wn_transform.data_init import data_init
from wn_transform.fast import ScaledLinear
from wn_transform.norm import UnitLayout, compose_weight


def _toolchain() -> bool:
    """A C compiler and an x86-64 CPU with AVX2 and FMA: where the kernels must build."""
    if shutil.which(os.environ.get("CC", "cc")) is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = kernels._cpu_fingerprint().split()
    return "avx2" in flags and "fma" in flags


x86_only = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the kernels are built on x86-64 only")
needs_kernels = pytest.mark.skipif(not kernels.kernel_status().available,
                                   reason=f"native kernels unavailable: {kernels.kernel_status().reason}")


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Forget the loaded library (put back afterwards) and build into an empty cache folder."""
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setenv("WN_TRANSFORM_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def count_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"forward": 0, "backward": 0}
    for name in (*calls, "calibrate"):
        real = getattr(kernels, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    return calls


def test_the_kernels_build_wherever_a_compiler_and_avx2_exist(fresh_build: Path) -> None:
    """From scratch, into an empty cache folder (the user's cache may hold a library already)."""
    if not _toolchain():
        pytest.skip("no C compiler or no AVX2/FMA here: the eager route is the only one")
    status = kernels.kernel_status()
    assert status.available, status.reason
    name = Path(status.path).name  # the library, and its hash, which a later process checks before loading it
    assert Path(status.path).parent == fresh_build
    assert sorted(p.name for p in fresh_build.iterdir()) == [name, f"{name}.lock", f"{name}.sha256"]  # (one build at a time)
    assert wn.kernel_status() == status


def test_a_layer_the_kernels_cannot_take_never_builds_them(fresh_build: Path) -> None:
    """Training at a batch beyond the kernels' rows costs no compiler run (about a second)."""
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(1024, 512)), init="preserve")  # the output form at 64 rows
    model(torch.randn(64, 1024)).sum().backward()
    assert kernels._loaded is None and not any(fresh_build.iterdir())


def test_the_row_limit_is_eight_on_amd_cpus_and_four_elsewhere() -> None:
    """On Intel, MKL's matmuls beat the kernels' per-row backward from 5 rows; on AMD not before 8;
    an unknown vendor gets the rows proven everywhere."""
    assert kernels._row_limit("AuthenticAMD") == kernels.MAX_ROWS == 8
    assert kernels._row_limit("GenuineIntel") == kernels._row_limit("") == 4
    status = kernels.kernel_status()
    assert status.rows == (kernels._row_limit(kernels._cpu_vendor()) if status.available else 0)


# -- the kernels against float64 formulas ---------------------------------------------------


def _paper(x, g, v, b, grad_y, exp_scale):
    """The layer and its gradients by the paper's formulas (sec. 2.1), in float64: ``w = gain v/||v||``
    (a zero direction has norm 1, as in :func:`wn_transform.norm.compose_weight`), ``grad_w = gy' x``,
    ``dL/dgain = grad_w . v/||v||``, ``grad_v = gain/||v|| (grad_w - dL/dgain v/||v||)``."""
    x, g, v, b, grad_y = (t.double() for t in (x, g, v, b, grad_y))
    norm = v.norm(dim=1, keepdim=True)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    gain = g.exp() if exp_scale else g
    w = gain * v / safe
    grad_w = grad_y.t() @ x
    grad_gain = (grad_w * v).sum(1, keepdim=True) / safe
    return {
        "y": x @ w.t() + b, "u": x @ v.t(), "safe": safe.view(-1), "scale": (gain / safe).view(-1),
        "grad_x": grad_y @ w, "grad_g": (grad_gain * gain if exp_scale else grad_gain).view(-1),
        "grad_v": gain / safe * grad_w - gain * grad_gain / safe**2 * v, "grad_bias": grad_y.sum(0),
    }


def _kernels(x, g, v, b, grad_y, exp_scale):
    y, u, safe, scale = kernels.forward(x, g, v, b, exp_scale, x.shape[:-1])
    grad_x, grad_g, grad_v, grad_bias = kernels.backward(grad_y, x, u, safe, scale, v, exp_scale=exp_scale,
                                                         input_grad=True, bias_grad=True)
    return {"y": y, "u": u, "safe": safe, "scale": scale, "grad_x": grad_x, "grad_g": grad_g, "grad_v": grad_v,
            "grad_bias": grad_bias}


def _layer(rows: int, in_features: int, out_features: int, seed: int, v: torch.Tensor | None = None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen)
    v = torch.randn(out_features, in_features, generator=gen) if v is None else v
    v[min(5, out_features - 1)] = 0  # a zero direction: a zero row, never NaN
    g = torch.rand(out_features, 1, generator=gen) + 0.5
    b = torch.randn(out_features, generator=gen)
    return x, g, v, b, torch.randn(rows, out_features, generator=gen)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """``torch``'s intra-op threads set to ``count`` for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _assert_matches(got: dict, want: dict, in_features: int) -> None:
    for name, expected in want.items():
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name].double(), expected, rtol=1e-5, atol=1e-5 * in_features ** 0.5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@needs_kernels
@pytest.mark.parametrize("exp_scale", [False, True], ids=["g", "exp"])
@pytest.mark.parametrize("threads", [1, 2, 5])  # 5: more threads than 256-column bands at in=1001
@pytest.mark.parametrize("in_features", [5, 37, 256, 1001], ids=lambda n: f"in{n}")  # < 1 vector, ragged, aligned, odd
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
def test_the_kernels_compute_the_papers_formulas(rows: int, in_features: int, threads: int, exp_scale: bool) -> None:
    layer = _layer(rows, in_features, 67, seed=rows * 1000 + in_features)  # 67: not a multiple of 4 units
    with _threads(threads):
        got = _kernels(*layer, exp_scale)
        x, g, v, b, grad_y = layer
        _, grad_g, grad_v, none = kernels.backward(grad_y, x, got["u"], got["safe"], got["scale"], v,
                                                   exp_scale=exp_scale, input_grad=False, bias_grad=False)
    _assert_matches(got, _paper(*layer, exp_scale), in_features)
    assert none is None
    torch.testing.assert_close(grad_v, got["grad_v"], rtol=0, atol=0)
    torch.testing.assert_close(grad_g, got["grad_g"], rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("stream", [False, True], ids=["cached", "streamed"])
def test_a_weight_that_starts_off_alignment(monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    """A view one float into its storage: every row starts off the 32-byte boundary."""
    monkeypatch.setattr(kernels, "_STREAM_MIN_ELEMENTS", 0 if stream else 1 << 62)
    v = torch.randn(1 + 40 * 300)[1:].view(40, 300)
    assert v.is_contiguous() and v.data_ptr() % 32
    layer = _layer(2, 300, 40, seed=3, v=v)
    _assert_matches(_kernels(*layer, False), _paper(*layer, False), 300)


# -- ScaledLinear on the kernels ---------------------------------------------------------------


def _reference(x, g, v, b, exp_scale):
    """The paper's layer: ``x @ (g * v/||v||)' + b``."""
    return F.linear(x, compose_weight(g.exp() if exp_scale else g, v, UnitLayout(0)), b)


def _double(*tensors):
    return [t.double() if t is not None else None for t in tensors]


def _outputs_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype))
    return out.detach(), [leaf.grad if leaf is not None else None for leaf in leaves]


@needs_kernels
@pytest.mark.parametrize("exp_scale", [False, True], ids=["g", "exp"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_kind", ["batch1", "2x2", "unbatched", "transposed"])
def test_scaled_linear_on_the_kernels_matches_the_paper(x_kind: str, bias: bool, exp_scale: bool,
                                                       count_calls: dict[str, int]) -> None:
    gen = torch.Generator().manual_seed(11)
    in_features, out_features = 70, 33
    x = {"batch1": lambda: torch.randn(1, in_features, generator=gen),
         "2x2": lambda: torch.randn(2, 2, in_features, generator=gen),
         "unbatched": lambda: torch.randn(in_features, generator=gen),
         "transposed": lambda: torch.randn(in_features, 3, generator=gen).t()}[x_kind]()
    v = torch.randn(out_features, in_features, generator=gen)
    v[5] = 0  # a zero direction: a zero row, no NaN
    g = torch.rand(out_features, 1, generator=gen) + 0.5
    b = torch.randn(out_features, generator=gen) if bias else None
    got, got_grads = _outputs_and_grads(lambda *t: ScaledLinear.apply(*t, exp_scale), x, g, v, b)
    want, want_grads = _outputs_and_grads(lambda *t: _reference(*t, exp_scale), *_double(x, g, v, b))
    assert count_calls == {"forward": 1, "backward": 1}
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for name, a, e in zip("xgvb", got_grads, want_grads):
        if e is None:
            assert a is None
            continue
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")
    assert (got[..., 5] == (b[5] if bias else 0)).all()  # the zero direction's unit gives its bias alone


@needs_kernels
def test_a_double_backward_takes_the_recorded_eager_ops(count_calls: dict[str, int]) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 30, generator=gen, requires_grad=True)
    g = (torch.rand(20, 1, generator=gen) + 0.5).requires_grad_()
    v = torch.randn(20, 30, generator=gen, requires_grad=True)

    def grad_norm(layer):
        (grad_x,) = torch.autograd.grad(layer(x, g, v).square().sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), (g, v))

    got = grad_norm(lambda x, g, v: ScaledLinear.apply(x, g, v, None, False))
    want = grad_norm(lambda x, g, v: F.linear(x, compose_weight(g, v, UnitLayout(0))))
    # the create_graph backward records eager ops; the second, plain one may take the kernel
    assert count_calls == {"forward": 1, "backward": 1}
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def _paper_linear(seed: int, rows: int = 2, in_features: int = 40, out_features: int = 24):
    """A float32 input and layer ``(x, g, v, b)``, and the paper's layer in float64 as the oracle."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen)
    g = torch.rand(out_features, 1, generator=gen) + 0.5
    v = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen)
    return (x, g, v, b), lambda x, g, v, b: _reference(x, g, v, b, False)


@needs_kernels
@pytest.mark.parametrize("how", ["jacobian", "is_grads_batched"])
def test_a_batched_backward_takes_the_eager_route(how: str, count_calls: dict[str, int]) -> None:
    """``jacobian(vectorize=True)`` and ``autograd.grad(is_grads_batched=True)`` run the backward
    under vmap, on tensors without storage: the kernel cannot read them."""
    tensors, paper = _paper_linear(3)
    x, g, v, b = (t.requires_grad_() for t in tensors)
    if how == "jacobian":
        got = torch.autograd.functional.jacobian(lambda x: ScaledLinear.apply(x, g, v, b, False), x, vectorize=True)
        want = torch.autograd.functional.jacobian(lambda x: paper(x, *_double(g, v, b)), x.double())
    else:
        cotangents = torch.randn(3, 2, 24, generator=torch.Generator().manual_seed(4))
        got = torch.autograd.grad(ScaledLinear.apply(x, g, v, b, False), (x, g, v), cotangents, is_grads_batched=True)
        x64, g64, v64, b64 = (t.detach().double().requires_grad_() for t in (x, g, v, b))
        want = torch.autograd.grad(paper(x64, g64, v64, b64), (x64, g64, v64), cotangents.double(), is_grads_batched=True)
    assert count_calls["forward"] == 1 and count_calls["backward"] == 0
    for a, e in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_saved_tensors_unpacked_in_another_layout_take_the_eager_route(count_calls: dict[str, int]) -> None:
    """A saved-tensor hook may hand back what the forward saved as a strided copy of the same
    values: the kernel, which reads raw contiguous float32 rows, must not see it."""
    def strided(t: torch.Tensor) -> torch.Tensor:
        return t.t().contiguous().t() if t.ndim == 2 else t.clone()

    tensors, paper = _paper_linear(6)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, strided):
        got, got_grads = _outputs_and_grads(lambda *t: ScaledLinear.apply(*t, False), *tensors)
    want, want_grads = _outputs_and_grads(paper, *_double(*tensors))
    assert count_calls == {"forward": 1, "backward": 0}
    for a, e in zip([got, *got_grads], [want, *want_grads]):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_saved_tensors_unpacked_in_another_dtype_never_reach_the_kernel(count_calls: dict[str, int]) -> None:
    """An unpack hook that changes the dtype breaks autograd's contract: a clean error from the eager
    route, never float32 writes into a buffer sized for bfloat16 (heap corruption)."""
    tensors, _ = _paper_linear(6)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.bfloat16() if t.is_floating_point() else t):
        with pytest.raises(RuntimeError, match="dtype"):
            _outputs_and_grads(lambda *t: ScaledLinear.apply(*t, False), *tensors)
    assert count_calls["backward"] == 0


@needs_kernels
@pytest.mark.parametrize("batch", [1, 3, 8, 9])
def test_a_training_step_gives_the_eager_routes_gradients(monkeypatch: pytest.MonkeyPatch, batch: int,
                                                          count_calls: dict[str, int]) -> None:
    """An MLP whose layers are large enough for the output form: with and without the kernels."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(400, 512), nn.ReLU(), nn.Linear(512, 10)), init="preserve")
    eager = copy.deepcopy(model)
    x, y = torch.randn(batch, 400), torch.randint(0, 10, (batch,))
    F.cross_entropy(model(x), y).backward()
    with monkeypatch.context() as m:
        m.setattr(kernels, "usable", lambda *args: False)
        F.cross_entropy(eager(x), y).backward()
    assert count_calls["forward"] == (1 if batch <= kernels.kernel_status().rows else 0)  # 400 x 512: the output form
    for (name, a), e in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@needs_kernels
def test_a_nan_in_a_direction_spreads_as_on_the_eager_route(monkeypatch: pytest.MonkeyPatch,
                                                           count_calls: dict[str, int]) -> None:
    """A diverged weight must show: the same NaNs (and the same finite values) by either route."""
    x, g, v, b, _ = _layer(2, 40, 12, seed=9)
    v[3, 7] = float("nan")
    got, got_grads = _outputs_and_grads(lambda *t: ScaledLinear.apply(*t, False), x, g, v, b)
    with monkeypatch.context() as m:
        m.setattr(kernels, "usable", lambda *args: False)
        want, want_grads = _outputs_and_grads(lambda *t: ScaledLinear.apply(*t, False), x, g, v, b)
    assert count_calls == {"forward": 1, "backward": 1}
    assert got[:, 3].isnan().all()
    for a, e in zip([got, *got_grads], [want, *want_grads]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, equal_nan=True)


@needs_kernels
def test_disabled_sends_a_block_to_the_eager_route_and_only_that_block(count_calls: dict[str, int]) -> None:
    x, g, v, b, _ = _layer(1, 30, 20, seed=2)
    inside, inside_grads = _outputs_and_grads(lambda *t: _disabled(ScaledLinear.apply, *t, False), x, g, v, b)
    assert count_calls == {"forward": 0, "backward": 0}
    outside, outside_grads = _outputs_and_grads(lambda *t: ScaledLinear.apply(*t, False), x, g, v, b)
    assert count_calls == {"forward": 1, "backward": 1}
    for a, e in zip([inside, *inside_grads], [outside, *outside_grads]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def _disabled(fn, *args):
    with kernels.disabled():
        assert not kernels.usable(args[0].reshape(-1, args[0].shape[-1]), *args[1:4])
        return fn(*args)


@needs_kernels
@pytest.mark.parametrize("x_shape", [(1, 512), (2, 1, 512), (512,)], ids=["batch1", "2x1", "unbatched"])
def test_an_in_place_activation_after_the_layer_works_as_on_the_eager_route(monkeypatch: pytest.MonkeyPatch,
                                                                           x_shape: tuple[int, ...],
                                                                           count_calls: dict[str, int]) -> None:
    """``nn.ReLU(inplace=True)`` writes into the layer's output: it must be a tensor of its own, not a
    view made inside the autograd function (which autograd refuses to modify in place)."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, 300),
                                               nn.ReLU(inplace=True)), init="preserve")
    eager = copy.deepcopy(model)
    x = torch.randn(x_shape)
    out = model(x)
    out.sum().backward()
    with monkeypatch.context() as m:
        m.setattr(kernels, "usable", lambda *args: False)
        want = eager(x)
        want.sum().backward()
    assert count_calls == {"forward": 2, "backward": 2}
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for (name, a), e in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_usable_takes_only_what_the_kernels_compute() -> None:
    x, g, v, b = torch.randn(2, 16), torch.rand(8, 1), torch.randn(8, 16), torch.randn(8)
    assert kernels.usable(x, g, v, b) == kernels.usable(x, g, v, None) == kernels.kernel_status().available
    assert not kernels.usable(torch.randn(kernels.kernel_status().rows + 1, 16), g, v, b)
    assert not kernels.usable(torch.randn(0, 16), g, v, b)
    assert not kernels.usable(x.double(), g.double(), v.double(), b.double())
    assert not kernels.usable(x.bfloat16(), g.bfloat16(), v.bfloat16(), b.bfloat16())
    assert not kernels.usable(x, g.double(), v, b)
    assert not kernels.usable(x, g, v, b.double())
    assert not kernels.usable(x, g, torch.randn(16, 8).t(), b)  # not contiguous
    assert not kernels.usable(x, g, v, torch.randn(16)[::2])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not kernels.usable(torch.randn(2, 16), torch.rand(8, 1), torch.randn(8, 16), None)


# -- the init pass's kernel ------------------------------------------------------------------


def _init_by_the_paper(t: torch.Tensor, v: torch.Tensor, unit_dim: int, scale: float, bias: bool):
    """Sec. 3 of the paper in float64, from ``t' = op(x, v)`` (units on ``unit_dim``): ``t = t'/||v||``,
    ``g = s/sigma[t]``, ``b = -s mu[t]/sigma[t]`` (statistics over every other axis), and the layer's
    new output ``g t + b`` (``g t`` without a bias)."""
    norm = v.double().flatten(1).norm(dim=1)
    unit = t.double().movedim(unit_dim, -1) / norm
    var, mean = torch.var_mean(unit.reshape(-1, unit.shape[-1]), dim=0, correction=0)
    g = scale / var.sqrt()
    b = -mean * g
    return {"norm": norm, "mean": mean * norm, "var": var * norm**2, "g": g, "bias": b if bias else None,
            "output": (unit * g + (b if bias else 0)).movedim(-1, unit_dim)}


_CALIBRATION_LAYOUTS = {  # name: (t's shape with U for the units, unit_dim, v's shape after the units)
    "linear2": ((2, "U"), -1, (37,)), "linear300": ((300, "U"), -1, (37,)), "linear3d": ((4, 75, "U"), -1, (37,)),
    "conv1d": ((3, "U", 50), 1, (4, 5)), "conv2d-1x1": ((8, "U", 1, 1), 1, (6, 1, 1)),  # inner 1: the column route
    "conv3d": ((2, "U", 3, 4, 5), 1, (2, 3, 3, 3)), "unbatched": (("U", 123), 0, (4, 7)),
    "norms-given": ((3, "U", 50), 1, (4, 5)),  # a transposed conv's units are not rows of v: norms passed in
}


@needs_kernels
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("units", [3, 67, 513], ids=lambda n: f"out{n}")  # < 1 vector, ragged, 3 column blocks
@pytest.mark.parametrize("layout", list(_CALIBRATION_LAYOUTS))
@pytest.mark.parametrize("variant", ["bias", "nobias-exp", "scale-stats-only"])
def test_the_calibration_kernel_computes_the_papers_init(layout: str, units: int, threads: int, variant: str) -> None:
    shape, unit_dim, v_shape = _CALIBRATION_LAYOUTS[layout]
    gen = torch.Generator().manual_seed(units + len(shape))
    t = torch.randn(*(units if n == "U" else n for n in shape), generator=gen) * 2 + 0.5
    v = torch.randn(units, *v_shape, generator=gen) * 0.05
    has_bias, exp_scale, output = variant == "bias" or variant.startswith("scale"), variant.endswith("exp"), \
        not variant.endswith("stats-only")
    scale = 0.5 if variant.startswith("scale") else 1.0
    want = _init_by_the_paper(t, v, unit_dim, scale, has_bias)
    g = torch.full((units, *(1,) * (v.ndim - 1)), 7.0)
    bias = torch.full((units,), 7.0) if has_bias else None
    norm, mean, var = torch.empty(units), torch.empty(units), torch.empty(units)
    before = t.clone()
    versions = [x._version for x in (g, norm, mean, var, t)]
    rows = None if layout == "norms-given" else v
    if rows is None:
        norm.copy_(v.flatten(1).norm(dim=1))
    with _threads(threads):
        assert kernels.calibration_usable(t, unit_dim, rows, g, bias, norm, mean, var)
        kernels.calibrate(t, unit_dim, rows, g, bias, norm, mean, var, scale=scale, exp_scale=exp_scale, output=output)
    # written through a pointer: the version counters must say so (the eval-mode weight cache reads them)
    assert all(x._version > before_version for x, before_version in zip((g, norm, mean, var), versions))
    assert (t._version > versions[-1]) == output
    got = {"norm": norm, "mean": mean, "var": var, "g": g.view(-1).exp() if exp_scale else g.view(-1), "bias": bias,
           "output": t if output else None}
    for name, value in want.items():
        if name == "output" and not output:
            assert torch.equal(t, before)  # statistics only: t untouched
        elif value is None:
            assert got[name] is None
        else:
            torch.testing.assert_close(got[name].double(), value, rtol=2e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_calibration_usable_takes_only_what_the_kernel_computes() -> None:
    t, v, g, b = torch.randn(5, 8), torch.randn(8, 3), torch.rand(8, 1), torch.randn(8)
    slots = [torch.empty(8) for _ in range(3)]
    available = kernels.kernel_status().available
    assert kernels.calibration_usable(t, -1, v, g, b, *slots) == available
    assert kernels.calibration_usable(t, 1, v, g, None, *slots) == available
    assert kernels.calibration_usable(t, 1, None, g, None, *slots) == available  # norms given
    assert kernels.calibration_usable(t.view(5, 1, 8), -1, v, g, b, *slots) == available
    assert kernels.calibration_usable(torch.randn(2, 8, 9), 1, torch.randn(8, 2, 3), g, b, *slots) == available
    assert not kernels.calibration_usable(t, 0, v, g, b, *slots)  # t's axis 0 is not the units
    assert not kernels.calibration_usable(t, 2, v, g, b, *slots)
    assert not kernels.calibration_usable(torch.randn(5, 3), -1, v, g, b, *slots)  # t has in, not out, columns
    assert not kernels.calibration_usable(t, -1, torch.randn(3, 8), g, b, *slots)  # v's rows are not the units
    assert not kernels.calibration_usable(torch.randn(0, 8), -1, v, g, b, *slots)
    assert not kernels.calibration_usable(t.double(), -1, v.double(), g.double(), b.double(),
                                          *(s.double() for s in slots))
    assert not kernels.calibration_usable(t, -1, v, g, b, slots[0].double(), *slots[1:])
    assert not kernels.calibration_usable(torch.randn(8, 5).t(), -1, v, g, b, *slots)  # not contiguous
    assert not kernels.calibration_usable(torch.randn(2, 8, 3, 3).to(memory_format=torch.channels_last), 1,
                                          torch.randn(8, 2, 3, 3), g, b, *slots)
    assert not kernels.calibration_usable(t, -1, torch.randn(3, 8).t(), g, b, *slots)
    assert not kernels.calibration_usable(t, -1, v, g, torch.randn(16)[::2], *slots)
    with kernels.disabled():
        assert not kernels.calibration_usable(t, -1, v, g, b, *slots)


def _init_mlp(bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 300, bias=bias), nn.ReLU(), nn.Linear(300, 64), nn.Tanh(), nn.Linear(64, 5))


class _FunctionalHead(nn.Module):
    """A conv (so the pass intercepts every op) and a Linear called functionally after it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(4, 8, 3)
        self.head = nn.Linear(8 * 14, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(self.conv(x)).flatten(1), self.head.weight, self.head.bias)


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3, groups=2, bias=False), nn.Tanh(),
                         _ToSequence(), nn.Conv1d(8, 12, 5, padding=2), nn.ReLU(), nn.ConvTranspose1d(12, 6, 4, stride=2),
                         nn.Flatten(), nn.Linear(6 * 74, 10))


class _ToSequence(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2)  # [N, C, H, W] -> [N, C, H*W]


@needs_kernels
@pytest.mark.parametrize("exact_init", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("case", ["mlp", "mlp-nobias", "exp-scale", "intercepted", "cnn"])
def test_the_init_pass_on_the_kernel_gives_the_eager_routes_values(case: str, exact_init: bool,
                                                                   count_calls: dict[str, int]) -> None:
    """Each layer's init in one native call (Linear or conv): the same g and bias as the eager ops, the same
    standardized layers, directly or through the intercepting pass."""
    make, batch = {"mlp": (_init_mlp, (256, 20)), "mlp-nobias": (lambda: _init_mlp(bias=False), (256, 20)),
                   "exp-scale": (_init_mlp, (256, 20)), "intercepted": (_FunctionalHead, (64, 4, 16)),
                   "cnn": (_cnn, (16, 3, 10, 10))}[case]
    x = torch.randn(*batch, generator=torch.Generator().manual_seed(3)) * 2 + 1
    options = {"exact_init": exact_init, "exp_scale": case == "exp-scale", "init_scale": 0.7}
    got = wn.apply_weight_norm(make(), x, **options)
    layers = len(wn.weight_norm_report(got).converted)
    assert count_calls.get("calibrate") == layers
    with kernels.disabled():
        want = wn.apply_weight_norm(make(), x, **options)
    assert count_calls["calibrate"] == layers
    for (name, a), e in zip(got.state_dict().items(), want.state_dict().values()):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@needs_kernels
@pytest.mark.parametrize("exact_init", [True, False], ids=["exact", "fast"])
def test_a_weight_cached_before_the_init_pass_is_not_used_after_it(exact_init: bool,
                                                                   count_calls: dict[str, int]) -> None:
    """The eval-mode weight cache is keyed on g's version counter: the kernel must bump it."""
    model = wn.apply_weight_norm(_init_mlp(), init="preserve").eval()
    x = torch.randn(64, 20)
    with torch.no_grad():
        model(x)  # caches every weight
    data_init(model, wn.weight_norm_report(model).converted, x, exact=exact_init)
    assert count_calls.get("calibrate") == 3
    with torch.no_grad():
        got = model(x)
        layer = model[0]
        fresh = compose_weight(layer.parametrizations.weight.original0, layer.parametrizations.weight.original1,
                               UnitLayout(0))
        t = F.linear(x, fresh, layer.bias)
    std = t.double().std(0, correction=0)
    torch.testing.assert_close(std, torch.ones_like(std), rtol=0, atol=1e-4)  # the new weight, calibrated
    want = model[4](model[3](model[2](model[1](t))))
    torch.testing.assert_close(got, want)


@needs_kernels
def test_a_grouped_transposed_conv_takes_the_eager_route(count_calls: dict[str, int]) -> None:
    """Its units (output channels) lie in groups across dim 1 of ``v``: not the kernel's layout."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, 20)
    model = wn.apply_weight_norm(nn.Sequential(nn.ConvTranspose1d(4, 6, 3, groups=2), nn.ReLU(), nn.Conv1d(6, 5, 3)), x)
    assert count_calls.get("calibrate") == 1  # the Conv1d only
    with torch.no_grad():
        hidden = model[0](x)
        t = model[2](model[1](hidden))
    for out in (hidden, t):
        var, mean = torch.var_mean(out.double(), dim=(0, 2), correction=0)
        torch.testing.assert_close(var.sqrt(), torch.ones_like(var), rtol=0, atol=1e-4)
        torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-4)


class _BufferBias(nn.Module):
    """A Linear's weight with a bias the model keeps as a buffer: the init cannot set it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 20, bias=False)
        self.register_buffer("shift", torch.randn(20))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.lin.weight, self.shift)


@needs_kernels
@pytest.mark.parametrize("case", ["float64", "mean-only-bn", "buffer-bias"])
def test_the_init_pass_takes_the_eager_route_where_the_kernel_does_not_apply(case: str,
                                                                             count_calls: dict[str, int]) -> None:
    """The first layer is standardized all the same (its output: the mean-only norm's input)."""
    torch.manual_seed(0)
    x = torch.randn(128, 10, dtype=torch.float64 if case == "float64" else torch.float32)
    model = _BufferBias() if case == "buffer-bias" else nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    out = wn.apply_weight_norm(model.to(x.dtype), x, mean_only_bn=case == "mean-only-bn")
    assert count_calls.get("calibrate", 0) == 0
    first = out.lin if case == "buffer-bias" else out[0]
    with torch.no_grad():
        t = F.linear(x, first.weight)
    std = t.double().std(0, correction=0)
    torch.testing.assert_close(std, torch.ones_like(std), rtol=0, atol=1e-4)
    if case == "buffer-bias":
        assert wn.weight_norm_report(out).notes.bias_not_set == ["lin.weight"]


# -- when the kernels cannot be had -------------------------------------------------------------


def test_disabled_by_the_environment_everything_takes_the_eager_route(monkeypatch: pytest.MonkeyPatch,
                                                                      fresh_build: Path) -> None:
    monkeypatch.setenv("WN_TRANSFORM_KERNELS", "0")
    status = kernels.kernel_status()
    assert not status.available and "WN_TRANSFORM_KERNELS=0" in status.reason
    x, g, v = torch.randn(1, 12), torch.rand(6, 1) + 0.5, torch.randn(6, 12)
    assert not kernels.usable(x, g, v, None)
    got, got_grads = _outputs_and_grads(lambda *t: ScaledLinear.apply(*t, None, False), x, g, v)
    want, want_grads = _outputs_and_grads(lambda *t: _reference(*t, None, False), *_double(x, g, v))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6)
    assert not any(fresh_build.iterdir())


def test_without_a_compiler_the_status_says_so(monkeypatch: pytest.MonkeyPatch, fresh_build: Path) -> None:
    monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))
    status = kernels.kernel_status()
    assert not status.available
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "no C compiler" in status.reason and "no-such-cc" in status.reason


@x86_only
def test_a_failing_compiler_leaves_no_library_behind(monkeypatch: pytest.MonkeyPatch, fresh_build: Path, tmp_path_factory) -> None:
    bin_dir = tmp_path_factory.mktemp("bin")
    fake = bin_dir / "cc"
    # writes half a library to its -o argument, then fails as a compiler does
    fake.write_text('#!/bin/sh\nwhile [ $# -gt 0 ] && [ "$1" != "-o" ]; do shift; done\n[ $# -eq 0 ] && exit 0\n'
                    'echo half > "$2"\necho "kernels.c:1: error: boom" >&2\nexit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(fake))
    with pytest.warns(RuntimeWarning, match="the native kernels are off .*error: boom.*the same results"):
        status = kernels.kernel_status()
    assert not status.available and "error: boom" in status.reason and "kernels.c" in status.reason
    assert sorted(p.suffix for p in fresh_build.iterdir()) == [".failed", ".lock"], list(fresh_build.iterdir())  # no library
    assert not kernels.usable(torch.randn(1, 4), torch.rand(3, 1), torch.randn(3, 4), None)


def _fake_compiler(folder: Path, body: str) -> Path:
    """A ``cc`` that answers ``--version`` and runs ``body`` (sh) for a build, ``$OUT`` its ``-o``."""
    fake = folder / "cc"
    fake.write_text('#!/bin/sh\n[ "$1" = "--version" ] && { echo fake 1.0; exit 0; }\n'
                    'OUT=""; while [ $# -gt 0 ]; do [ "$1" = "-o" ] && OUT="$2"; shift; done\n' + body + "\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake


@x86_only
@pytest.mark.parametrize(("body", "said"), [
    (": > \"$OUT\"; exit 0", "reported success but wrote no whole shared library (0 bytes)"),  # exits 0, writes nothing
    ('echo "/usr/bin/ld: final link failed: No space left on device" >&2; '
     'echo "collect2: error: ld returned 1 exit status" >&2; exit 1',
     "final link failed: No space left on device; collect2: error: ld returned 1 exit status"),  # a full disk
    ("sleep 60", "did not finish compiling"),  # a wrapper waiting on a network: killed
])
def test_a_compiler_that_fails_its_own_way_is_said_so_once_and_leaves_nothing(
        monkeypatch: pytest.MonkeyPatch, fresh_build: Path, tmp_path_factory, body: str, said: str) -> None:
    monkeypatch.setattr(kernels, "_COMPILE_TIMEOUT", 2)
    monkeypatch.setenv("CC", str(_fake_compiler(tmp_path_factory.mktemp("bin"), body)))
    with pytest.warns(RuntimeWarning, match="the native kernels are off") as caught:
        status = kernels.kernel_status()
        kernels.kernel_status()  # (once per process)
    assert len(caught) == 1 and not status.available and said in status.reason, status.reason
    assert sorted(p.suffix for p in fresh_build.iterdir()) == [".failed", ".lock"], list(fresh_build.iterdir())  # no library


@x86_only
def test_a_failed_build_is_tried_once_even_where_warnings_are_errors_and_detached_helpers_hold_nothing(
        monkeypatch: pytest.MonkeyPatch, fresh_build: Path, tmp_path_factory) -> None:
    """Under ``-W error`` the warning raises once, after the outcome is kept: no second build (a
    hanging compiler would cost its time limit at every step).  A wrapper that leaves a detached
    helper running with its output open does not hold the call; an unreadable ``$CC`` is a reason."""
    import time

    folder = tmp_path_factory.mktemp("bin")
    calls = folder / "calls"
    fake = folder / "cc"
    fake.write_text(f'#!/bin/sh\necho x >> "{calls}"\n'
                    '[ "$1" = "--version" ] && { setsid sleep 30 & echo fake 1.0; exit 0; }\nexit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(fake))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="the native kernels are off"):
            kernels.kernel_status()
        status = kernels.kernel_status()  # kept: no second build, no second warning
        assert not kernels.usable(torch.randn(1, 4), torch.rand(3, 1), torch.randn(3, 4), None)
    assert not status.available and len(calls.read_text().split()) == 2  # --version, one build
    assert time.perf_counter() - start < 20
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setenv("CC", "gcc -DMSG='unclosed")
    with pytest.warns(RuntimeWarning, match="cannot be read as a command"):
        assert not kernels.kernel_status().available


@x86_only
def test_a_library_cut_short_by_its_compiler_is_never_published_and_a_failure_is_remembered(
        monkeypatch: pytest.MonkeyPatch, fresh_build: Path, tmp_path_factory) -> None:
    """A compiler that exits 0 with a library cut short (mapping one kills the process): loaded in
    another process first, refused.  The failure left beside the library stops the next processes
    from building again for ten minutes (eight ranks would each wait out a hanging compiler)."""
    folder = tmp_path_factory.mktemp("bin")
    calls = folder / "calls"
    library = next(Path(p) for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6",
                                      "/lib64/libm.so.6") if Path(p).exists())
    fake = _fake_compiler(folder, f'echo x >> "{calls}"; head -c 20000 {library} > "$OUT"; exit 0')
    monkeypatch.setenv("CC", str(fake))
    with pytest.warns(RuntimeWarning, match="reported success but wrote no whole shared library"):
        status = kernels.kernel_status()
    assert not status.available and not list(fresh_build.glob("*.so"))
    monkeypatch.setattr(kernels, "_loaded", None)  # (another process)
    with pytest.warns(RuntimeWarning, match="reported success but wrote no whole shared library"):
        assert not kernels.kernel_status().available
    assert len(calls.read_text().split()) == 1  # built once


def test_a_file_system_without_flock_still_builds(monkeypatch: pytest.MonkeyPatch, fresh_build: Path) -> None:
    """Lustre mounted without flock answers ENOSYS: each process builds, the renames keep the
    library whole."""
    if not _toolchain():
        pytest.skip("no C compiler or no AVX2/FMA here")
    import errno

    def no_flock(*args) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(kernels.fcntl, "flock", no_flock)
    assert kernels.kernel_status().available


def test_a_damaged_or_foreign_library_in_the_cache_is_rebuilt_or_refused_never_loaded_as_it_is(fresh_build: Path) -> None:
    """A library cut short (a process that maps one dies of SIGBUS) does not hash to what its build
    wrote beside it: built again.  One with the right hash but not ours (no wn_ symbols) is
    refused with the version message, not an AttributeError on every step.  (Each in a new
    process: this one has the library mapped.)"""
    if not _toolchain():
        pytest.skip("no C compiler or no AVX2/FMA here")
    import subprocess
    import sys

    def status_elsewhere() -> str:
        code = "import wn_transform.kernels as k; s = k.kernel_status(); print(s.available, s.reason)"
        done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "WN_TRANSFORM_CACHE": str(fresh_build)})
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip()

    path = Path(kernels.kernel_status().path)
    whole = path.read_bytes()
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask  # as the umask allows (a shared cache's other users: 022)
    cut = fresh_build / "cut"
    cut.write_bytes(whole[: len(whole) // 2])
    os.replace(cut, path)
    stale = fresh_build / "kernels-0123456789abcdef-999999999-abcd.so.partial"  # (no such process, and old)
    stale.write_bytes(b"left by a killed build")
    os.utime(stale, (0, 0))
    live = fresh_build / f"kernels-0123456789abcdef-{os.getpid()}-abcd.so.partial"  # (a build still running: kept,
    live.write_bytes(b"being built")  # old as it may look, up to a day)
    an_hour_ago = __import__("time").time() - 3600
    os.utime(live, (an_hour_ago, an_hour_ago))
    kernels._digest_file(path).write_bytes(b"\xff\xfe not a hash")  # a damaged sidecar: built again too
    assert status_elsewhere().startswith("True") and path.read_bytes() == whole
    assert sorted(p.name for p in fresh_build.iterdir()) == [live.name, path.name, f"{path.name}.lock", f"{path.name}.sha256"]
    live.unlink()
    foreign = fresh_build / "foreign.c"
    foreign.write_text("int something(void) { return 1; }\n")
    compiler = shutil.which(os.environ.get("CC", "cc"))
    assert subprocess.run([compiler, "-shared", "-fPIC", str(foreign), "-o", str(cut)]).returncode == 0
    os.replace(cut, path)
    kernels._digest_file(path).write_text(__import__("hashlib").sha256(path.read_bytes()).hexdigest())
    said = status_elsewhere()
    assert said.startswith("False") and "does not match this version of wn_transform" in said


def test_no_home_folder_and_switch_values_give_a_reason_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A uid with no passwd entry and no ``$HOME`` (a container's ``--user``): the kernels stay off
    with the way to a cache; ``WN_TRANSFORM_KERNELS`` takes 0/false/off/no and 1/true/on/yes, in
    any case, and leaves them off, saying so, for anything else."""
    monkeypatch.setattr(kernels, "_loaded", None)
    for name in ("WN_TRANSFORM_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    if _toolchain():
        with pytest.warns(RuntimeWarning, match="no home folder"):
            status = kernels.kernel_status()
        assert not status.available and "set $WN_TRANSFORM_CACHE" in status.reason
    for value, reason in (("False", "disabled by WN_TRANSFORM_KERNELS=False"), (" off ", "disabled by"),
                          ("garbage", "WN_TRANSFORM_KERNELS='garbage' is none of 1/true/on/yes")):
        monkeypatch.setattr(kernels, "_loaded", None)
        monkeypatch.setenv("WN_TRANSFORM_KERNELS", value)
        status = kernels.kernel_status()
        assert not status.available and reason in status.reason, status.reason


def test_a_compiler_given_with_arguments_builds(monkeypatch: pytest.MonkeyPatch, fresh_build: Path) -> None:
    """``CC="ccache gcc"``, ``CC="gcc -O2"``: the first word is the compiler, the rest its arguments
    (and part of the cache key), as make and setuptools take it."""
    if not _toolchain():
        pytest.skip("no C compiler or no AVX2/FMA here")
    monkeypatch.setenv("CC", f"{shutil.which(os.environ.get('CC', 'cc'))} -O2")
    status = kernels.kernel_status()
    assert status.available and status.reason.endswith(" -O2"), status.reason


def test_a_built_library_is_reused_not_rebuilt(monkeypatch: pytest.MonkeyPatch, fresh_build: Path) -> None:
    if not _toolchain():
        pytest.skip("no C compiler or no AVX2/FMA here")
    first = kernels.kernel_status()
    assert first.available and Path(first.path).parent == fresh_build
    monkeypatch.setattr(kernels, "_loaded", None)

    def no_compile(*args):
        raise AssertionError("compiled again")

    monkeypatch.setattr(kernels, "_compile", no_compile)
    assert kernels.kernel_status() == first


@pytest.mark.parametrize("shape", [(1, 300), (2, 300), (4, 1000), (1, 0), (64, 300)])
def test_an_input_of_the_wrong_width_gets_torchs_shape_error_never_a_kernel_call(shape: tuple[int, int]) -> None:
    """At few rows the native kernels would read past a narrower input and write ``grad_x`` past
    its buffer: a width that is not the layer's is refused as a plain Linear refuses it."""
    layer = wn.apply_weight_norm(nn.Linear(512, 512), init="preserve").train()
    x = torch.randn(shape, requires_grad=True)
    assert not kernels.usable(x, layer.parametrizations.weight.original0, layer.parametrizations.weight.original1, None)
    with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied"):
        layer(x)


def _value_head(out: int = 512, width: int = 1024) -> nn.Module:
    """A large Linear trained at a few rows: the output form, on the kernels where they exist."""
    torch.manual_seed(0)
    return wn.apply_weight_norm(nn.Linear(width, out))


@pytest.mark.parametrize("where", ["output gradient", "input"])
def test_a_zero_tensor_without_memory_takes_the_eager_route(where: str) -> None:
    """``sgn``'s backward hands out a ZeroTensor (no memory, ``data_ptr() == 0``): the kernels would
    read address 0.  As an output gradient, every gradient is 0; as an input, the output is the bias."""
    layer = _value_head()
    if where == "output gradient":
        torch.sgn(layer(torch.randn(2, 1024))).sum().backward()
        assert all(bool((p.grad == 0).all()) for p in layer.parameters())
        return
    h = torch.randn(2, 1024, requires_grad=True)
    (zeros,) = torch.autograd.grad(torch.sgn(h).sum(), h)
    assert zeros._is_zerotensor()
    torch.testing.assert_close(layer(zeros), layer.bias.detach().expand(2, -1))


def test_an_output_gradient_negated_by_a_flag_is_read_negated() -> None:
    """``conj``'s backward on a single element sets the negative bit without rewriting the memory."""
    layer = _value_head(out=1, width=131072)  # (one output: a weight this wide takes the output form)
    y = layer(torch.randn(1, 131072))
    (torch.complex(torch.zeros_like(y), y).conj() * (2 + 3j)).real.sum().backward()  # = 3 y
    torch.testing.assert_close(layer.bias.grad, torch.tensor([3.0]))


def test_the_layer_computes_on_its_input_device_whatever_the_default_device() -> None:
    layer, x = _value_head(), torch.randn(2, 1024)
    expected = F.linear(x, layer.weight.detach(), layer.bias.detach())
    torch.set_default_device("meta")
    try:
        y = layer(x)
        y.sum().backward()
    finally:
        torch.set_default_device(None)
    assert y.device.type == "cpu" and layer.bias.grad.device.type == "cpu"
    torch.testing.assert_close(y.detach(), expected)


@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_a_sparse_input_at_a_few_rows_computes_as_a_plain_linear(layout: str) -> None:
    layer, x = _value_head(), torch.randn(2, 1024)
    sparse = x.to_sparse() if layout == "sparse_coo" else x.to_sparse_csr()
    torch.testing.assert_close(layer(sparse).detach(), F.linear(x, layer.weight.detach(), layer.bias.detach()))


def test_an_empty_cache_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WN_TRANSFORM_CACHE", "")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert kernels._cache_dir() == Path.home() / ".cache" / "wn_transform"


def test_a_nested_input_at_a_few_rows_computes_as_a_plain_linear() -> None:
    layer = _value_head()
    nested = torch.nested.nested_tensor([torch.randn(2, 1024), torch.randn(1, 1024)], layout=torch.strided)
    for got, x in zip(layer(nested).unbind(), nested.unbind()):
        torch.testing.assert_close(got.detach(), F.linear(x, layer.weight.detach(), layer.bias.detach()))


def test_an_input_whose_storage_was_freed_is_refused_by_torch_not_read() -> None:
    """A storage resized to 0 (FSDP2 frees memory so): torch's ops raise; the kernels would read past it."""
    layer, x = _value_head(), torch.randn(2, 1024)
    x.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError):
        layer(x)
