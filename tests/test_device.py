"""The library on an accelerator: training, autocast, half precision, data init, eval cache, fold, export.

Every test runs on ``DEVICE``: the first CUDA device when there is one, else the module is
skipped (CI has none).  ``WN_TEST_DEVICE=cpu pytest tests/test_device.py`` runs the same
checks on the CPU, which is how this file's own logic is checked on a machine without a GPU.
The oracles are device-independent: the paper's formula ``w = g * v/||v||`` evaluated in
float64 on the CPU, and plain layers given the composed weights.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wn_transform as wn

DEVICE = os.environ.get("WN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (set WN_TEST_DEVICE=cpu to run on the CPU)")

HALF = [torch.float16, torch.bfloat16]


def _net() -> nn.Sequential:
    """Linear layers, a Conv1d and a ConvTranspose1d (output channels on dim 1 of its weight)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose1d(8, 6, 4, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 22, 32), nn.ReLU(), nn.Linear(32, 4))


def _batch(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, 10, generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _unit_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.ConvTranspose1d) else 0


def _formula_weight(g: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """The paper's ``w = g * v/||v||``, the norm over every axis of ``v`` but the unit axis ``dim``
    (a zero direction, whose norm is 0, gives a zero weight)."""
    shape = [1] * v.ndim
    shape[dim] = -1
    norms = v.transpose(0, dim).flatten(1).norm(dim=1)
    return g.reshape(shape) * v / torch.where(norms == 0, 1.0, norms).reshape(shape)


def _float64_pairs(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(g, v)`` of every reparameterized layer of ``model``, as float64 CPU leaves."""
    return {f.module: tuple(t.detach().double().cpu().requires_grad_()
                            for t in (model.get_submodule(f.module).parametrizations.weight.original0,
                                      model.get_submodule(f.module).parametrizations.weight.original1))
            for f in wn.find_weight_norms(model)}


def _float64_forward(model: nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     x: torch.Tensor) -> torch.Tensor:
    """``model``'s function in float64 on the CPU, each weight composed from ``pairs`` by the formula."""
    out = x.double().cpu()
    for name, module in _net().double().named_children():
        if name not in pairs:
            out = module(out)
            continue
        weight = _formula_weight(*pairs[name], _unit_dim(module))
        bias = model.get_submodule(name).bias.detach().double().cpu()
        if isinstance(module, nn.Linear):
            out = F.linear(out, weight, bias)
        elif isinstance(module, nn.Conv1d):
            out = F.conv1d(out, weight, bias, padding=1)
        else:
            out = F.conv_transpose1d(out, weight, bias, stride=2)
    return out


def test_a_training_step_on_the_device_follows_the_papers_formula() -> None:
    """Forward and the gradients of g and v against autograd through ``g * v/||v||`` in float64."""
    model = wn.apply_weight_norm(_net(), init="preserve").to(DEVICE)
    x = _batch()
    got = model(x)
    got.square().sum().backward()
    pairs = _float64_pairs(model)
    expected = _float64_forward(model, pairs, x)
    expected.square().sum().backward()
    torch.testing.assert_close(got.detach().double().cpu(), expected.detach(), rtol=1e-4, atol=1e-4)
    assert len(pairs) == 4
    for name, (g, v) in pairs.items():
        chain = model.get_submodule(name).parametrizations.weight
        assert chain.original0.grad.device.type == torch.device(DEVICE).type
        torch.testing.assert_close(chain.original0.grad.double().cpu(), g.grad, rtol=1e-3, atol=1e-3, msg=name)
        torch.testing.assert_close(chain.original1.grad.double().cpu(), v.grad, rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.parametrize("dtype", HALF, ids=["f16", "bf16"])
def test_under_autocast_outputs_have_the_plain_models_dtype_and_values(dtype: torch.dtype) -> None:
    plain = _net().to(DEVICE)
    model = wn.apply_weight_norm(plain, init="preserve").to(DEVICE)
    x = _batch()
    with torch.autocast(torch.device(DEVICE).type, dtype=dtype):
        expected, got = plain(x), model(x)
        got.float().square().sum().backward()
    assert got.dtype == expected.dtype
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("dtype", HALF, ids=["f16", "bf16"])
def test_a_half_precision_model_matches_the_float64_formula(dtype: torch.dtype) -> None:
    model = wn.apply_weight_norm(_net(), init="preserve").to(DEVICE, dtype)
    x = _batch()
    got = model(x.to(dtype))
    assert got.dtype == dtype
    with torch.no_grad():
        expected = _float64_forward(model, _float64_pairs(model), x)
    tolerance = 0.1 if dtype == torch.bfloat16 else 0.02
    torch.testing.assert_close(got.double().cpu(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("exact_init", [False, True], ids=["default", "exact"])
def test_the_data_init_on_the_device_standardizes_every_layer(exact_init: bool) -> None:
    model = _net().to(DEVICE)
    x = _batch(64) * 3 + 1
    out = wn.apply_weight_norm(model, x, exact_init=exact_init)
    assert all(p.device.type == torch.device(DEVICE).type for p in out.parameters())
    outputs: dict[str, torch.Tensor] = {}
    layers = {n: m for n, m in out.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d))}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: outputs.__setitem__(n, o)) for n, m in layers.items()]
    with torch.no_grad():
        out(x)
    for handle in handles:
        handle.remove()
    for name, o in outputs.items():
        dims = [0] if o.ndim == 2 else [0, 2]
        var, mean = torch.var_mean(o.double(), dims, correction=0)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-4, rtol=0, msg=name)
        torch.testing.assert_close(var.sqrt(), torch.ones_like(var), atol=1e-4, rtol=0, msg=name)


def test_the_eval_weight_cache_follows_an_optimizer_step_on_the_device() -> None:
    model = wn.apply_weight_norm(_net(), init="preserve").to(DEVICE)
    x = _batch()
    model.eval()
    with torch.no_grad():
        before = model(x)
        assert torch.equal(model(x), before)  # served from the cache: the same bits
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(x)
        with wn.no_weight_cache():
            fresh = model(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)


def test_fold_on_the_device_keeps_the_function_and_the_device() -> None:
    model = wn.apply_weight_norm(_net(), _batch().cpu()).to(DEVICE)
    x = _batch()
    with torch.no_grad():
        expected = model(x)
    folded = wn.fold_weight_norm(model)
    assert not wn.find_weight_norms(folded)
    assert all(p.device.type == torch.device(DEVICE).type for p in folded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


def test_a_device_state_dict_loads_into_a_cpu_model_and_back() -> None:
    model = wn.apply_weight_norm(_net(), _batch().cpu()).to(DEVICE)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    cpu_model = wn.apply_weight_norm(_net(), init="preserve")
    cpu_model.load_state_dict(state)
    back = copy.deepcopy(cpu_model).to(DEVICE)
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
        torch.testing.assert_close(cpu_model(x.cpu()), model(x).cpu(), rtol=1e-4, atol=1e-5)


def test_training_on_the_device_takes_the_fused_kernel_and_guards_zero_directions() -> None:
    """On CUDA the weights come from torch's fused kernel (``fast.guarded_weight``), and a direction
    zeroed at any point, through ``.data`` too, gives a zero weight and finite gradients."""
    model = wn.apply_weight_norm(_net(), init="preserve").to(DEVICE)
    x = _batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(model(x).double().cpu(), _float64_forward(model, _float64_pairs(model), x),
                                   rtol=1e-4, atol=1e-4)
    model.get_submodule("5").parametrizations.weight.original1.data[3] = 0
    optimizer.zero_grad()
    out = model(x)
    if torch.device(DEVICE).type == "cuda":  # Conv1d and the Linear layers (ConvTranspose1d's unit axis is 1)
        assert type(model.get_submodule("5").weight.grad_fn).__name__ == "WeightNormInterfaceBackward0"
    out.square().sum().backward()
    assert torch.equal(model.get_submodule("5").weight[3].cpu(), torch.zeros(6 * 22))
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    torch.testing.assert_close(out.detach().double().cpu(), _float64_forward(model, _float64_pairs(model), x),
                               rtol=1e-4, atol=1e-4)


def test_a_cuda_graph_captures_an_eval_forward_with_or_without_warm_up_calls() -> None:
    """Capturing a CUDA graph forbids reading the device, which no weight norm does: a forward
    captures with or without warm-up calls, and its replay computes the formula."""
    if torch.device(DEVICE).type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    x = _batch()
    for warm_up in (0, 2):
        model = wn.apply_weight_norm(_net(), init="preserve").to(DEVICE).eval()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warm_up):
                model(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            out = model(x)
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            expected = _float64_forward(model, _float64_pairs(model), x)
        torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-4, atol=1e-4, msg=f"warm-up {warm_up}")


def test_export_of_a_model_on_the_device_verifies_and_leaves_it_there(tmp_path) -> None:
    """``export_onnx`` of a weight-normalized model whose parameters and batch are on the device:
    the file (run by onnxruntime on the CPU) agrees with the model, and the model stays where it was."""
    import onnxruntime

    model = wn.apply_weight_norm(_net(), init="preserve").to(DEVICE).eval()
    x = _batch(4)
    report = wn.export_onnx(model, x, tmp_path / "net.onnx")
    assert all(p.device.type == torch.device(DEVICE).type for p in model.parameters())
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x).cpu(), rtol=1e-4, atol=1e-5)
    assert report.batch_sizes_checked[0] == 4
