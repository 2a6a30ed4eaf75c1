"""Every linear/conv layer of a model is in the report: converted, or skipped with its reason.

Purpose-built models whose weights reach their op in ways weight norm must not touch: computed
before the op (weight standardization, spectral norm by hook or by parametrization), read
inside a list argument, or not read by the op at all.  Each model runs through every discovery
step that can trace it, so the rules hold whichever step found the weights.
"""

from __future__ import annotations

import io
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wn_transform as wn


class StdConv2d(nn.Conv2d):
    """Weight standardization (BiT, timm's ``StdConv2d``): the conv reads ``(w - mean)/std``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class ScaledLinear(nn.Module):
    """Not a torch layer type: a weight and a learned gain multiplied before ``F.linear``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.gain = nn.Parameter(torch.ones(n_out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.gain)


class Computed(nn.Module):
    def __init__(self, branch: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.branch = branch
        self.sn_hook = nn.utils.spectral_norm(nn.Conv2d(3, 8, 3, padding=1))
        self.sn_param = nn.utils.parametrizations.spectral_norm(nn.Conv2d(8, 8, 3, padding=1))
        self.std = StdConv2d(8, 8, 3, padding=1)
        self.plain = nn.Conv2d(8, 8, 1)
        self.scaled = ScaledLinear(8, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch and x.sum() > -1e9:  # data-dependent control flow: only recording traces it
            x = x + 0
        h = F.leaky_relu(self.sn_param(F.leaky_relu(self.sn_hook(x), 0.1)), 0.1)
        h = self.plain(torch.relu(self.std(h))).mean((2, 3))
        return self.head(torch.tanh(self.scaled(h)))


class ListRead(nn.Module):
    """``a.weight`` is a Linear's weight and also read by ``torch.cat``; ``b`` is never called."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x)) + torch.cat([self.a.weight, self.b.weight]).sum()


def _reasons(model: nn.Module, batch: torch.Tensor | None) -> tuple[wn.WeightNormReport, dict[str, str]]:
    report = wn.plan_weight_norm(model, batch)
    return report, {s.qualname: s.reason for s in report.skipped}


@pytest.mark.parametrize(("branch", "batch", "found_by"), [(False, None, "symbolic_trace"), (False, True, "symbolic_trace"),
                                                          (True, True, "recorded")], ids=["no-batch", "traced", "recorded"])
def test_computed_weights_are_reported_with_their_reason(branch: bool, batch: bool | None, found_by: str) -> None:
    model, x = Computed(branch), torch.randn(4, 3, 6, 6)
    report, skipped = _reasons(model, x if batch else None)
    assert report.found_by == found_by
    assert [t.qualname for t in report.converted] == ["plain.weight", "head.weight"]
    # Spectral norm: by hook, the weight is a plain tensor recomputed from weight_orig (recording sees
    # the ops and names weight_orig; a graph leaf is named by its weight); by parametrization likewise.
    hook = skipped.get("sn_hook.weight") or skipped["sn_hook.weight_orig"]
    param = skipped.get("sn_param.weight") or skipped["sn_param.parametrizations.weight.original"]
    assert "SpectralNorm" in hook or "reaches its conv op only through other ops" in hook
    assert "parametrization (_SpectralNorm)" in param or "reaches its conv op only through other ops" in param
    assert skipped["std.weight"].startswith("reaches its conv op only through other ops (mean, std, sub)")
    assert skipped["scaled.weight"].startswith("reaches its linear op only through other ops (mul)")
    assert skipped["scaled.gain"].startswith("reaches its linear op only through other ops (mul)")
    assert len(report.skipped) == 5


def test_computed_weights_are_left_as_they_are_and_the_function_kept() -> None:
    model, x = Computed(False), torch.randn(4, 3, 6, 6)
    out = wn.apply_weight_norm(model.eval(), x, init="preserve")
    torch.testing.assert_close(out(x), model(x))
    assert torch.equal(out.std.weight, model.std.weight) and torch.equal(out.scaled.gain, model.scaled.gain)
    assert not nn.utils.parametrize.is_parametrized(out.std)


@pytest.mark.parametrize("batch", [None, torch.randn(5, 4)], ids=["no-batch", "batch"])
def test_a_weight_read_inside_a_list_is_shared_and_an_unused_layer_is_named(batch: torch.Tensor | None) -> None:
    report, skipped = _reasons(ListRead(), batch)
    assert [t.qualname for t in report.converted] == ["c.weight"]
    assert skipped["a.weight"] == "shared: also read by cat, which weight norm would change"
    assert skipped["b.weight"] == "not read as the weight of a linear op by the forward that was traced"


class AttributeReads(nn.Module):
    """Weights read through tensor attributes: ``W.T`` and ``M.mT`` are views, ``D.data`` detaches."""

    def __init__(self, branch: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.branch = branch
        self.W = nn.Parameter(torch.randn(8, 5) / 5**0.5)
        self.M = nn.Parameter(torch.randn(6, 8) / 8**0.5)
        self.D = nn.Parameter(torch.randn(3, 6) / 6**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch and x.sum() > -1e9:
            x = x + 0
        h = torch.relu(x @ self.W.T + 1.0)
        h = torch.relu(h @ self.M.mT)
        return F.linear(h, self.D.data)


@pytest.mark.parametrize(("branch", "found_by"), [(False, "symbolic_trace"), (True, "recorded")], ids=["traced", "recorded"])
def test_transposing_attributes_are_views_and_data_is_a_detached_read(branch: bool, found_by: str) -> None:
    model, x = AttributeReads(branch), torch.randn(32, 5)
    report, skipped = _reasons(model, x)
    assert report.found_by == found_by
    assert {t.qualname: (t.kind, t.layout.dim) for t in report.converted} == {"W": ("matmul", 0), "M": ("matmul", 0)}
    assert list(skipped) == ["D"] and skipped["D"].startswith("reaches its linear op only through other ops (.data)")
    out = wn.apply_weight_norm(model, x)
    pre = torch.relu(x @ out.W.T + 1.0) @ out.M.mT  # M's pre-activation, through the real weights
    torch.testing.assert_close(pre.std(0, unbiased=False), torch.ones(6), atol=1e-4, rtol=0)


def test_a_quantization_aware_layer_is_skipped_with_its_reason() -> None:
    torch.manual_seed(0)
    qat = torch.ao.nn.qat.Linear(4, 8, qconfig=torch.ao.quantization.get_default_qat_qconfig())
    model, x = nn.Sequential(qat, nn.ReLU(), nn.Linear(8, 2)), torch.randn(16, 4)
    report, skipped = _reasons(model, x)
    assert [t.qualname for t in report.converted] == ["2.weight"]
    assert skipped == {"0.weight": "fake-quantized before its op (quantization-aware training); weight norm would change what is quantized"}


@pytest.mark.parametrize("fused", ["ConvReLU2d", "ConvBnReLU2d", "ConvBn2d"])
def test_a_fused_quantization_aware_layer_is_skipped_with_its_reason(fused: str) -> None:
    """torch.ao's fused QAT layers are containers fx traces through: their weight reaches the conv
    through the fake-quant op, which is QAT, not a computed weight; a fused batch norm's gamma
    scales the fake-quantized weight."""
    import torch.ao.nn.intrinsic.qat as nniqat

    torch.manual_seed(0)
    layer = getattr(nniqat, fused)(3, 8, 3, qconfig=torch.ao.quantization.get_default_qat_qconfig("x86"))
    model, x = nn.Sequential(layer, nn.Flatten(), nn.Linear(288, 4)), torch.randn(16, 3, 8, 8)
    report, skipped = _reasons(model, x)
    assert [t.qualname for t in report.converted] == ["2.weight"]
    assert skipped.pop("0.weight") == ("fake-quantized before its op (quantization-aware training); weight norm would "
                                       "change what is quantized")
    assert skipped == ({} if fused == "ConvReLU2d" else {"0.bn.weight": (
        "the batch norm that quantization-aware training folds into its conv's fake-quantized weight; weight norm "
        "would change what is quantized")})


class _KeepsItsState(nn.Module):
    """Keeps its last hidden state on itself (attention maps kept for a plot, a streaming context)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.last_hidden: torch.Tensor | None = None
        self.maps: list[torch.Tensor] = []
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if self.last_hidden is not None and self.last_hidden.shape == h.shape:
            h = h + 0 * self.last_hidden
        self.last_hidden = h.detach()
        self.maps.append(h.detach())
        self.cache["input"] = x.detach()
        return self.b(h)


def test_tracing_leaves_the_models_attributes_and_random_stream_as_they_were() -> None:
    """fx's trace runs the forward with Proxies: `self.last_hidden = h` must not keep one (the model
    would not pickle).  A forward that draws noise leaves the user's random stream unchanged."""
    torch.manual_seed(0)
    model = _KeepsItsState()
    assert wn.plan_weight_norm(model).found_by == "symbolic_trace" and model.last_hidden is None
    assert model.maps == [] and model.cache == {}
    out = wn.apply_weight_norm(model, init="preserve")
    assert out.last_hidden is None and out.maps == [] and out.cache == {}
    torch.save(out, io.BytesIO())
    wn.apply_weight_norm(model, torch.randn(16, 4))  # reads its state back in the init pass

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.dec = nn.Linear(8, 8), nn.Linear(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mu, log_var = self.enc(x).chunk(2, dim=-1)
            return self.dec(mu + torch.randn_like(mu) * (0.5 * log_var).exp())  # sampled in any mode

    noisy, batch = Noisy(), torch.randn(64, 8)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    wn.apply_weight_norm(noisy, batch, generator=torch.Generator().manual_seed(0))
    wn.plan_weight_norm(noisy, batch)
    assert torch.equal(torch.rand(4), expected)


def test_a_reference_quantized_layer_is_skipped_with_its_reason() -> None:
    """convert_to_reference_fx's layers quantize and dequantize their weight with a fixed scale."""
    from torch.ao.nn.quantized.reference import Linear as ReferenceLinear

    torch.manual_seed(0)
    qparams = {"qscheme": torch.per_tensor_affine, "dtype": torch.qint8, "scale": 0.01, "zero_point": 0}
    layer = ReferenceLinear(4, 8, weight_qparams=qparams)
    report, skipped = _reasons(nn.Sequential(layer, nn.ReLU(), nn.Linear(8, 2)), torch.randn(16, 4))
    assert [t.qualname for t in report.converted] == ["2.weight"]
    assert skipped == {"0.weight": "quantized and dequantized before its op with a fixed scale (a reference quantized "
                                   "layer); weight norm would change what is quantized"}
    from torch.ao.nn.quantized.reference import LSTM as ReferenceLSTM

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.out = ReferenceLSTM(4, 8, batch_first=True), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(x)[0])

    report, skipped = _reasons(Recurrent(), torch.randn(2, 5, 4))
    assert [t.qualname for t in report.converted] == ["out.weight"]
    assert {name for name, reason in skipped.items() if "reference quantized" in reason} == {
        "rnn.weight_ih_l0", "rnn.weight_hh_l0"}


def test_quantized_layers_are_reported_with_the_route_that_works() -> None:
    """A dynamically quantized Linear or LSTM, a statically quantized conv: int8 weights packed for
    their kernels, read through methods.  Each is in the report with its reason; a model of them
    alone names them in its NoTargetsError."""
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    quantized = torch.ao.quantization.quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8)
    quantized[2] = nn.Linear(16, 4)
    report, skipped = _reasons(quantized, torch.randn(8, 8))
    assert [t.qualname for t in report.converted] == ["2.weight"]
    assert skipped == {"0.weight": "a quantized layer, Linear (torch.ao.nn.quantized.dynamic): its int8 weight is "
                                   "packed for its kernel, not a Parameter; weight-normalize the float model, and fold "
                                   "it before quantizing"}
    lstm = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.LSTM(4, 4)), {nn.LSTM}, dtype=torch.qint8)
    conv = torch.ao.nn.quantized.Conv2d(3, 3, 3)
    for model, kind in [(lstm, "LSTM (torch.ao.nn.quantized.dynamic)"), (nn.Sequential(conv), "Conv2d (torch.ao.nn.quantized)")]:
        with pytest.raises(wn.NoTargetsError, match=re.escape(f"(0.weight: a quantized layer, {kind}: its int8")):
            wn.apply_weight_norm(model, init="preserve")


class FunctionalBlock(nn.Module):
    """Code of the model's own: a functional weight, and a parameter under another parametrization."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(8, 5) / 5**0.5)
        self.temperature = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.W) / self.temperature


class _Softplus(nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return F.softplus(t) + 1.0


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.DataParallel(nn.Sequential(FunctionalBlock(), nn.ReLU()))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "no-batch"])
@pytest.mark.parametrize("wrap", ["data_parallel", "inner_data_parallel", "parametrized"])
def test_torch_containers_around_the_models_code_do_not_hide_its_weights(wrap: str, batch: bool) -> None:
    """Traced through, with a batch or without (symbolic_trace runs what ``nn.DataParallel`` runs:
    its ``forward(*inputs)`` cannot take fx's Proxies)."""
    torch.manual_seed(0)
    block = FunctionalBlock()
    model: nn.Module = nn.Sequential(block, nn.ReLU(), nn.Linear(8, 2))
    names = {"0.W", "2.weight"}
    if wrap == "data_parallel":
        model = nn.DataParallel(model)
        names = {f"module.{name}" for name in names}
    elif wrap == "inner_data_parallel":
        model, names = _Inner(), {"body.module.0.W", "head.weight"}
    else:
        nn.utils.parametrize.register_parametrization(block, "temperature", _Softplus())  # block becomes a torch class
    report, _ = _reasons(model, torch.randn(16, 5) if batch else None)
    assert {t.qualname for t in report.converted} == names
    assert report.found_by == "symbolic_trace"


class Experts(nn.Module):
    """Mixture-of-experts weights ``[experts, out, in]``, each expert's matrix picked by index."""

    def __init__(self, route: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.route = route
        self.gate = nn.Linear(6, 3)
        self.w = nn.Parameter(torch.randn(3, 4, 6) / 6**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.route:
            return F.linear(x, self.w[1]) + self.gate(x).sum(-1, keepdim=True)
        choice = self.gate(x).argmax(-1)
        out = x.new_zeros(x.shape[0], 4)
        for e in torch.unique(choice):  # data-dependent: found by recording
            rows = choice == e
            out[rows] = F.linear(x[rows], self.w[e])
        return out


@pytest.mark.parametrize(("route", "found_by"), [(False, "symbolic_trace"), (True, "recorded")], ids=["indexed", "routed"])
def test_expert_weights_picked_by_index_are_skipped_not_normalized_per_expert(route: bool, found_by: str) -> None:
    report, skipped = _reasons(Experts(route), torch.randn(32, 6))
    assert report.found_by == found_by
    assert [t.qualname for t in report.converted] == ["gate.weight"]
    assert list(skipped) == ["w"] and "only through other ops (" in skipped["w"] and "getitem" in skipped["w"]


class Factorized(nn.Module):
    """A low-rank weight ``U @ V`` (a merged LoRA) used by ``F.linear``: neither factor acts on the data."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.U, self.V = nn.Parameter(torch.randn(16, 4)), nn.Parameter(torch.randn(4, 8))
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.linear(x, self.U @ self.V))


@pytest.mark.parametrize("batch", [None, True], ids=["no-batch", "traced"])
def test_a_factorized_weight_is_computed_not_a_matmul_layer_on_its_first_factor(batch: bool | None) -> None:
    """``U @ V`` has no data operand: it is not ``x @ W`` with ``U`` for the data (the data init
    would standardize the entries of ``U @ V``); both factors reach the linear op only through it."""
    report, skipped = _reasons(Factorized(), torch.randn(8, 8) if batch else None)
    assert [t.qualname for t in report.converted] == ["head.weight"]
    assert sorted(skipped) == ["U", "V"]
    assert skipped["U"].startswith("reaches its linear op only through other ops (matmul")
    assert "as a factor of a weight computed in the forward" in skipped["V"]


class OtherMaps(nn.Module):
    """Matrices that act on the data through ops other than linear/conv: a torch layer (Bilinear),
    einsum, a left multiplication ``W @ h'``, stacked experts through ``bmm``; and parameters that
    are not linear maps at all (an embedding table, a gain vector), which are not listed."""

    def __init__(self, branch: bool, d: int = 8, experts: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.branch = branch
        self.bil = nn.Bilinear(d, d, d)
        self.wq, self.left = nn.Parameter(torch.randn(d, d)), nn.Parameter(torch.randn(d, d))
        self.experts = nn.Parameter(torch.randn(experts, d, d))
        self.table = nn.Embedding(5, d)
        self.gain = nn.Parameter(torch.ones(1, d))
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch and x.sum() > -1e9:  # data-dependent control flow: only recording traces it
            x = x + 0
        h = self.bil(x, x) + self.table(torch.arange(x.shape[0]) % 5) * self.gain
        h = torch.einsum("bd,ed->be", h, self.wq)
        h = (self.left @ h.T).T
        picked = self.experts.index_select(0, torch.arange(x.shape[0]) % self.experts.shape[0])
        h = torch.bmm(picked, h.unsqueeze(-1)).squeeze(-1)
        return self.fc(h)


@pytest.mark.parametrize(("branch", "batch", "found_by"), [(False, None, "symbolic_trace"), (False, True, "symbolic_trace"),
                                                          (True, True, "recorded")], ids=["no-batch", "traced", "recorded"])
def test_every_matrix_that_acts_on_the_data_otherwise_is_skipped_with_its_op_never_left_out(
        branch: bool, batch: bool | None, found_by: str) -> None:
    report, skipped = _reasons(OtherMaps(branch), torch.randn(6, 8) if batch else None)
    assert report.found_by == found_by
    assert [t.qualname for t in report.converted] == ["fc.weight"]
    ops = {"bil.weight": "bilinear", "wq": "einsum", "left": "matmul", "experts": "bmm"}
    assert sorted(skipped) == sorted(ops)
    for name, op in ops.items():
        assert skipped[name].lower().startswith(f"acts on the data through {op}"), (name, skipped[name])


class Counting(nn.Module):
    """Updates buffers in its forward while training: a step counter (rebound) and an EMA (in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.o = nn.Linear(8, 16), nn.Linear(16, 4)
        self.register_buffer("steps", torch.zeros(()))
        self.register_buffer("ema", torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.training:  # a Python flag: fx traces this branch, running the buffer ops for real
            self.steps = self.steps + 1
            self.ema.mul_(0.9).add_(0.1 * h.detach().mean(0))
        return self.o(torch.relu(h - self.ema))


@pytest.mark.parametrize("call", ["plan", "apply-preserve", "apply-data-inplace"])
def test_tracing_a_model_that_updates_buffers_in_its_forward_leaves_them_as_they_were(call: str) -> None:
    model, x = Counting(), torch.randn(32, 8)
    steps, ema = model.steps, model.ema.clone()
    if call == "plan":
        result = model
        assert wn.plan_weight_norm(model, x).found_by == "symbolic_trace"
    else:
        result = wn.apply_weight_norm(model, x, init="data" if call.endswith("inplace") else "preserve",
                                      inplace=call.endswith("inplace"))
        assert wn.weight_norm_report(result).found_by == "symbolic_trace" and result.training
    for m in {id(model): model, id(result): result}.values():
        assert m.steps is steps or m is result  # the model's own buffer object is kept ...
        assert float(m.steps) == 0 and torch.equal(m.ema, ema)  # ... with its values


class LearnedQueries(nn.Module):
    """Perceiver/DETR-style learned latents: a Parameter (normalized) is the input of a Linear."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.latents = nn.Parameter(torch.randn(4, d))
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(self.norm(self.latents))  # the same rows for every sample
        return torch.softmax(self.k(x) @ q.T, -1)


def test_a_layer_whose_input_is_a_learned_parameter_is_still_a_layer() -> None:
    """Unlike ``U @ V`` read as a weight, a Linear whose input is computed from parameters alone
    (learned queries) is a layer: converted, its weight read per row."""
    report, skipped = _reasons(LearnedQueries(), torch.randn(3, 8))
    assert [t.qualname for t in report.converted] == ["q.weight", "k.weight"]
    assert skipped == {}


class DataFlows(nn.Module):
    """Bare-matmul layers whose data passes through parameters on the way: rows picked from a table
    by the batch, a learned initial state in a loop, learned queries, noise scaled by a parameter,
    a state updated in place with the batch; beside additive biases (``baddbmm``, ``addmm``) and an
    elementwise einsum gate, which act on the data but are not linear maps of it."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table, self.w_table = nn.Parameter(torch.randn(10, d)), nn.Parameter(torch.randn(d, d))
        self.h0, self.w_h = nn.Parameter(torch.randn(1, d)), nn.Parameter(torch.randn(d, d))
        self.queries, self.w_q = nn.Parameter(torch.randn(3, d)), nn.Parameter(torch.randn(d, d))
        self.scale, self.w_noise = nn.Parameter(torch.ones(d)), nn.Parameter(torch.randn(d, d))
        self.start, self.w_state = nn.Parameter(torch.randn(1, d)), nn.Parameter(torch.randn(d, d))
        self.rel_bias, self.gate = nn.Parameter(torch.zeros(1, 3, 3)), nn.Parameter(torch.ones(3, 3))
        self.register_buffer("expanded", torch.ones(1).expand(d))  # cannot be copied into

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = self.h0.expand(x.shape[0], -1)
        for _ in range(2):
            h = torch.tanh(x + h @ self.w_h)
        state = self.start.repeat(x.shape[0], 1)
        state.add_(x)
        q = self.queries @ self.w_q  # [3, d]
        scores = torch.baddbmm(self.rel_bias, q.expand(x.shape[0], -1, -1), h.unsqueeze(-1).expand(-1, -1, 3))
        scores = torch.einsum("bij,ij->bij", scores, self.gate)
        noise = torch.randn_like(x) * self.scale
        return (self.table[tokens] @ self.w_table + noise @ self.w_noise + state @ self.w_state
                + scores.sum(-1).mean(-1, keepdim=True) * self.expanded)


@pytest.mark.parametrize("batch", [None, True], ids=["no-batch", "traced"])
def test_a_bare_matmul_on_data_that_passed_through_parameters_is_a_layer_and_biases_are_not_maps(batch: bool | None) -> None:
    x, tokens = torch.randn(4, 6), torch.randint(0, 10, (4,))
    report, skipped = _reasons(DataFlows(), (x, tokens) if batch else None)
    assert report.found_by == "symbolic_trace"
    assert sorted(t.qualname for t in report.converted) == ["w_h", "w_noise", "w_q", "w_state", "w_table"]
    assert skipped == {}


# -- ops the library does not know, views that put unit axes back, torch's module machinery ------------


@torch.library.custom_op("wn_test::stacked_linear", mutates_args=())
def stacked_linear(x: torch.Tensor, w: torch.Tensor, expert: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x[i] @ w[expert[i]].T + b``: a custom op over stacked expert weights ``[experts, out, in]``,
    as transformers' ``grouped_mm_fallback``; what it does is hidden from every trace."""
    return torch.einsum("bi,boi->bo", x, w[expert]) + b


@stacked_linear.register_fake
def _stacked_linear_fake(x: torch.Tensor, w: torch.Tensor, expert: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1])


def _branch(step: str, x: torch.Tensor) -> torch.Tensor:
    """Control flow that only the ladder step ``step`` and the ones below it can trace."""
    if step == "torch.export" and x.dim() == 2:  # a Proxy's dim() is no bool: symbolic_trace fails
        x = x + 0
    if step == "recorded" and x.sum() > -1e9:  # data-dependent: torch.export fails too
        x = x + 0
    return x


STEPS = ["symbolic_trace", "torch.export", "recorded"]


class CustomOpExperts(nn.Module):
    """Stacked expert weights read by a custom op, which also reads a Linear's weight (through a
    view) and a bias vector; nothing but the custom op reads any of them."""

    def __init__(self, step: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.step = step
        self.gate = nn.Linear(6, 3)
        self.experts = nn.Parameter(torch.randn(3, 4, 6) / 6**0.5)
        self.proj = nn.Linear(6, 4)
        self.shift = nn.Parameter(torch.zeros(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _branch(self.step, x)
        expert = self.gate(x).argmax(-1)
        h = stacked_linear(x, self.experts, expert, self.shift)
        h = h + stacked_linear(x, self.proj.weight.unsqueeze(0), torch.zeros_like(expert), self.shift)
        return self.head(torch.relu(h))


def _matrices(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.ndim >= 2}


@pytest.mark.parametrize("step", STEPS)
def test_a_matrix_read_by_a_custom_op_is_skipped_with_that_op_named(step: str) -> None:
    model = CustomOpExperts(step)
    report, skipped = _reasons(model, torch.randn(16, 6))
    assert report.found_by == step
    assert [t.qualname for t in report.converted] == ["gate.weight", "head.weight"]
    assert sorted(skipped) == ["experts", "proj.weight"]  # a matrix each; shift is a vector, proj.bias is unused
    for name in skipped:
        assert skipped[name].startswith("read by wn_test::stacked_linear, which weight norm does not know"), skipped[name]
    assert {t.qualname for t in report.converted} | set(skipped) == _matrices(model)


def fused_gate(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A function that symbolic_trace keeps whole (``torch.fx.wrap``): its ops are not in the graph."""
    return torch.sigmoid(x @ w.T)


torch.fx.wrap("fused_gate")


class WrappedFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(5, 5))
        self.fc = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(fused_gate(x, self.w))


def test_a_matrix_read_by_a_function_the_trace_keeps_whole_is_skipped_with_it_named() -> None:
    report, skipped = _reasons(WrappedFunction(), None)
    assert report.found_by == "symbolic_trace"
    assert [t.qualname for t in report.converted] == ["fc.weight"]
    assert list(skipped) == ["w"] and "fused_gate, which weight norm does not know" in skipped["w"]


class IndexedExperts(nn.Module):
    """Each row's expert matrix picked by ``w[idx]`` (``aten.index`` once exported), then ``bmm``."""

    def __init__(self, step: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.step = step
        self.gate = nn.Linear(6, 3)
        self.w = nn.Parameter(torch.randn(3, 6, 6) / 6**0.5)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _branch(self.step, x)
        expert = self.gate(x).argmax(-1)
        return self.head(torch.bmm(self.w[expert], x.unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize("step", STEPS)
def test_stacked_experts_picked_by_index_then_bmm_are_skipped_with_bmm_named(step: str) -> None:
    model = IndexedExperts(step)
    report, skipped = _reasons(model, torch.randn(16, 6))
    assert report.found_by == step
    assert [t.qualname for t in report.converted] == ["gate.weight", "head.weight"]
    assert list(skipped) == ["w"] and skipped["w"].startswith("acts on the data through bmm"), skipped
    assert {t.qualname for t in report.converted} | set(skipped) == _matrices(model)


class UnitAxisViews(nn.Module):
    """Weights read through views that take out unit axes and put them back in their place: a
    depthwise Conv1d's ``[C, 1, k]`` weight squeezed to ``[C, k]`` and unsqueezed again (HF Mamba's
    mixer), a Linear's weight unsqueezed and squeezed, a pointwise conv's ``[C, C, 1]`` weight
    reshaped to ``[C, C]`` and back.  And views that do not give the layout back: a Linear's
    ``[C, C]`` weight read by a conv as ``[C, C, 1]``, a depthwise ``[C, 1, k]`` weight read as
    ``[1, C, k]`` (one output channel)."""

    def __init__(self, step: str, c: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.step, self.c = step, c
        self.dw = nn.Conv1d(c, c, 3, groups=c, padding=1)
        self.fc = nn.Linear(c, c)
        self.pw = nn.Conv1d(c, c, 1)
        self.as_conv = nn.Linear(c, c)
        self.moved = nn.Conv1d(c, c, 3, groups=c, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, L]
        x = _branch(self.step, x)
        h = F.conv1d(x, self.dw.weight.squeeze(1).unsqueeze(1), self.dw.bias, padding=1, groups=self.c)
        h = F.linear(h.transpose(1, 2), self.fc.weight.unsqueeze(0).squeeze(0), self.fc.bias).transpose(1, 2)
        h = F.conv1d(torch.relu(h), self.pw.weight.reshape(self.c, self.c).unsqueeze(-1), self.pw.bias)
        h = h + F.conv1d(h, self.as_conv.weight.unsqueeze(-1))
        return h + F.conv1d(h, self.moved.weight.squeeze(1).unsqueeze(0), padding=1)


@pytest.mark.parametrize("step", STEPS)
def test_a_weight_whose_unit_axes_are_put_back_in_place_is_the_weight(step: str) -> None:
    model, x = UnitAxisViews(step), torch.randn(16, 4, 10)
    report, skipped = _reasons(model, x)
    assert report.found_by == step
    assert {t.qualname: (t.kind, t.layout.dim % len(t.shape), t.layout.groups) for t in report.converted} == {
        "dw.weight": ("conv", 0, 1), "fc.weight": ("linear", 0, 1), "pw.weight": ("conv", 0, 1)}
    assert sorted(skipped) == ["as_conv.weight", "moved.weight"]
    assert skipped["as_conv.weight"].startswith("reaches its conv op only through other ops (unsqueeze)")
    assert skipped["moved.weight"].startswith("reaches its conv op only through other ops (squeeze, unsqueeze)")
    out = wn.apply_weight_norm(model, x, init="preserve")
    torch.testing.assert_close(out(x), model(x))
    for name in ("dw", "fc", "pw"):  # one scale per output unit (dim 0 of each weight)
        g = getattr(out, name).parametrizations.weight.original0
        assert g.shape == (4, *[1] * (getattr(model, name).weight.ndim - 1)), (name, g.shape)


def test_the_data_init_standardizes_a_weight_read_through_unit_axis_views() -> None:
    model, x = UnitAxisViews("symbolic_trace"), torch.randn(16, 4, 10)
    out = wn.apply_weight_norm(model, x)
    pre = F.conv1d(x, out.dw.weight, out.dw.bias, padding=1, groups=4)  # per output channel: what the init targets
    torch.testing.assert_close(pre.std((0, 2), unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(pre.mean((0, 2)), torch.zeros(4), atol=1e-4, rtol=0)


class LeftMultipliedLayer(nn.Module):
    """A Linear's weight applied from the left, ``W @ h`` (HF Mamba's ``dt_proj.weight @ x``): never
    as a linear op's weight."""

    def __init__(self, step: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.step = step
        self.inner = nn.Linear(5, 5)
        self.dt = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(_branch(self.step, x))
        return (self.dt.weight @ h.T).T


@pytest.mark.parametrize("step", STEPS)
def test_a_layers_weight_multiplied_from_the_left_is_skipped_with_the_matmul_named(step: str) -> None:
    report, skipped = _reasons(LeftMultipliedLayer(step), torch.randn(8, 5))
    assert report.found_by == step
    assert [t.qualname for t in report.converted] == ["inner.weight"]
    assert list(skipped) == ["dt.weight"] and skipped["dt.weight"].startswith("acts on the data through matmul"), skipped


class RecastRouter(nn.Module):
    """A forward that casts a layer in place each call (``self.router = self.router.to(dtype)``, HF
    SwitchTransformers' router): torch's module machinery reads the weight, no op of the model does."""

    def __init__(self, cast: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cast = cast
        self.router = nn.Linear(6, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.router = self.router.to(torch.float32) if self.cast == "to" else self.router.float()
        x = _branch("recorded", x)
        return self.router(x).softmax(-1) * self.head(x)


@pytest.mark.parametrize("cast", ["to", "float"])
def test_a_layer_cast_in_the_forward_is_still_a_layer(cast: str) -> None:
    model, x = RecastRouter(cast), torch.randn(16, 6)
    report, skipped = _reasons(model, x)
    assert report.found_by == "recorded"
    assert [t.qualname for t in report.converted] == ["router.weight", "head.weight"]
    assert skipped == {}
    out = wn.apply_weight_norm(model, x, init="preserve")
    torch.testing.assert_close(out(x), model(x))


class CodebookDistances(nn.Module):
    """A VQ layer: a projection, then the distances of its output to a codebook's rows (``cdist``)."""

    def __init__(self, step: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.step = step
        self.proj = nn.Linear(4, 4)
        self.codebook = nn.Embedding(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(self.proj(_branch(self.step, x)), self.codebook.weight).argmin(-1)


@pytest.mark.parametrize("step", STEPS)
def test_a_codebook_read_through_cdist_is_skipped_with_the_op_named(step: str) -> None:
    report, skipped = _reasons(CodebookDistances(step), torch.randn(8, 4))
    assert report.found_by == step
    assert [t.qualname for t in report.converted] == ["proj.weight"]
    assert list(skipped) == ["codebook.weight"], skipped
    assert re.match(r"acts on the data through \S*cdist", skipped["codebook.weight"]), skipped


class FrozenProjections(nn.Module):
    """Standard layers whose weight no Parameter is behind: a buffer (a fixed random projection), a
    plain tensor attribute, and a parametrization of a buffer; each beside a trainable layer."""

    def __init__(self, step: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.step = step
        self.a = nn.Linear(6, 6)
        self.buffered = nn.Linear(6, 6)
        self.attribute = nn.Conv1d(6, 6, 1)
        self.computed = nn.Linear(6, 6)
        for layer, how in ((self.buffered, "buffer"), (self.attribute, "attribute"), (self.computed, "buffer")):
            weight = layer.weight.detach().clone()
            del layer.weight
            if how == "buffer":
                layer.register_buffer("weight", weight)
            else:
                layer.weight = weight
        nn.utils.parametrize.register_parametrization(self.computed, "weight", _Negated())
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.buffered(torch.relu(self.a(_branch(self.step, x)))))
        h = self.computed(self.attribute(h.unsqueeze(-1)).squeeze(-1))
        return self.head(torch.relu(h))


class _Negated(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return -weight


@pytest.mark.parametrize("step", STEPS)
def test_a_layer_whose_weight_is_no_parameter_is_skipped_with_what_it_is(step: str) -> None:
    model, x = FrozenProjections(step), torch.randn(8, 6)
    report, skipped = _reasons(model, x)
    assert report.found_by == step
    assert [t.qualname for t in report.converted] == ["a.weight", "head.weight"]
    assert skipped == {"buffered.weight": "a buffer, not a Parameter: nothing to train",
                       "attribute.weight": "a plain tensor attribute, not a Parameter: nothing to train",
                       "computed.weight": "computed by a parametrization from a buffer, not a Parameter: nothing to train"}
    out = wn.apply_weight_norm(model, x, init="preserve")
    torch.testing.assert_close(out(x), model(x))
    assert torch.equal(out.buffered.weight, model.buffered.weight)


class HyperNetwork(nn.Module):
    """A hypernetwork: ``target.0`` runs with a weight that ``hyper`` generates per call
    (``torch.func.functional_call``); its own ``weight`` Parameter is never what it computes with."""

    def __init__(self, step: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.step = step
        self.hyper = nn.Linear(4, 16 * 8)
        self.target = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        weight = self.hyper(z).view(16, 8)
        return torch.func.functional_call(self.target, {"0.weight": weight}, (_branch(self.step, x),))


@pytest.mark.parametrize("step", STEPS[1:])  # symbolic_trace cannot trace functional_call
def test_a_layer_run_with_another_weight_is_skipped_and_the_model_still_trains(step: str) -> None:
    model, batch = HyperNetwork(step), (torch.randn(32, 8), torch.randn(4))
    report, skipped = _reasons(model, batch)
    assert report.found_by == step
    assert [t.qualname for t in report.converted] == ["hyper.weight", "target.2.weight"]
    assert skipped["target.0.weight"].startswith("its layer runs with another tensor as its weight")
    assert {t.qualname for t in report.converted} | set(skipped) == _matrices(model)
    for init in ("preserve", "data"):
        out = wn.apply_weight_norm(model, batch, init=init)
        if init == "preserve":
            torch.testing.assert_close(out(*batch), model(*batch))
        out(*batch).square().sum().backward()  # target.0's Parameter untouched: nothing to break
        assert out.hyper.parametrizations.weight.original1.grad is not None


class _WeightBank(nn.Module):
    """``l`` runs with a buffer as its weight (``functional_call``): fx traces it (as a leaf call)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l, self.o = nn.Linear(4, 4), nn.Linear(4, 2)
        self.register_buffer("bank", torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.func.functional_call(self.l, {"weight": self.bank}, (x,)))


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "no-batch"])
def test_a_leaf_layer_run_with_another_weight_is_skipped_by_symbolic_trace_too(batch: bool) -> None:
    """fx records the layer as one ``call_module``; the tracer sees that its parameters are not its own
    during that call, and the layer is skipped as on the other steps; the model trains."""
    model, x = _WeightBank(), torch.randn(16, 4)
    report, skipped = _reasons(model, x if batch else None)
    assert report.found_by == "symbolic_trace"
    assert [t.qualname for t in report.converted] == ["o.weight"]
    assert skipped["l.weight"].startswith("its layer runs with another tensor as its weight")
    out = wn.apply_weight_norm(model, x if batch else None)
    out(x).square().sum().backward()
    if not batch:  # init="preserve": the same function
        torch.testing.assert_close(out(x), model(x))


def test_a_recurrent_cell_run_over_steps_is_not_said_to_be_standardized_by_its_hidden_weight() -> None:
    """A GRUCell looped over 5 steps reads both weights 5 times; the init standardizes the input
    weight's first call, and keeps the hidden-to-hidden weight's scale: the report says each."""

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.GRUCell(4, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.zeros(x.shape[1], 6)
            for step in x:
                h = self.cell(step, h)
            return h

    torch.manual_seed(0)
    text = str(wn.weight_norm_report(wn.apply_weight_norm(Loop(), torch.randn(5, 32, 4))))
    assert "cell.weight_ih: read by 5 op calls in one forward (a shared layer); the data init standardized" in text
    assert "cell.weight_hh: read by" not in text and "1 hidden-to-hidden weights kept their scale" in text


def test_a_stacked_experts_bias_is_not_reported_as_a_matrix_acting_on_the_data() -> None:
    """``F.linear(x, self.w[e], self.b[e])``: w is a weight selected in the forward (skipped with that
    reason); b is added, as a linear op's bias, not multiplied: no layer weight, not listed."""

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Linear(8, 3)
            self.w = nn.Parameter(torch.randn(3, 8, 8))
            self.b = nn.Parameter(torch.zeros(3, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pick = self.router(x).argmax(-1)
            return sum((pick == e).float()[:, None] * F.linear(x, self.w[e], self.b[e]) for e in range(3))

    report = wn.plan_weight_norm(Experts(), torch.randn(32, 8))
    reasons = {s.qualname: s.reason for s in report.skipped}
    assert reasons["w"].startswith("reaches its linear op only through other ops (getitem)")
    assert "b" not in reasons


def test_cross_attentions_projections_read_in_slices_are_not_called_a_shared_layer() -> None:
    """``MultiheadAttention(q, mem, mem)`` reads in_proj_weight as q's rows and k/v's rows: two calls
    on disjoint units, each calibrated on its own, not one layer run twice."""

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, q: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
            if q.shape[1] > mem.shape[1]:  # a branch on sizes: symbolic_trace fails, torch.export traces the ops
                q = q[:, : mem.shape[1]]
            return self.attn(q, mem, mem, need_weights=False)[0]

    torch.manual_seed(0)
    batch = (torch.randn(8, 3, 16), torch.randn(8, 5, 16))
    out = wn.apply_weight_norm(Cross(), batch)
    report = wn.weight_norm_report(out)
    assert report.found_by == "torch.export"
    assert {t.qualname: t.uses for t in report.converted}["attn.in_proj_weight"] == 1
    assert "read by" not in str(report)


class ReadsByOtherNames(nn.Module):
    """Ops that read weights under forms of their own: ``torch.linalg.matmul`` (``torch.matmul``
    under another name), ``x.type_as(w)`` / ``w.new_zeros`` / ``torch.zeros_like(w)`` (the weight's
    dtype, device and shape alone: no use of its values), a 1-D weight in ``F.linear`` (one output
    per row: no unit axis) and fairseq's ``torch.conv_tbc`` (a conv this library does not normalize)."""

    def __init__(self, step: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.step = step
        self.proj = nn.Parameter(torch.randn(6, 8) / 6**0.5)  # (in, out): x @ proj
        self.fc = nn.Linear(8, 8)
        self.score = nn.Parameter(torch.randn(8) / 8**0.5)
        self.tbc = nn.Parameter(torch.randn(3, 8, 8) / 5)  # (k, in, out)
        self.tbc_bias = nn.Parameter(torch.zeros(8))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.linalg.matmul(_branch(self.step, x), self.proj).type_as(self.fc.weight)
        h = torch.relu(self.fc(h)) + self.fc.weight.new_zeros(8) + torch.zeros_like(self.fc.weight).sum()
        sequence = torch.conv_tbc(h.unsqueeze(1).contiguous(), self.tbc, self.tbc_bias, 1)  # (T=rows, B=1, C)
        return F.linear(h, self.score), sequence


@pytest.mark.parametrize("step", STEPS)
def test_weights_read_by_aliases_metadata_ops_as_vectors_or_by_conv_tbc_are_accounted_for(step: str) -> None:
    model, x = ReadsByOtherNames(step), torch.randn(16, 6)
    report, skipped = _reasons(model, x)
    assert report.found_by == step
    converted = {t.qualname: t for t in report.converted}
    assert list(converted) == ["proj", "fc.weight"]
    assert converted["proj"].layout.dim == 1  # one unit per column of an (in, out) weight
    assert set(skipped) == {"score", "tbc"}, skipped
    assert skipped["score"].startswith("read by linear as a 1-D weight"), skipped
    assert re.match(r"acts on the data through \S*conv_tbc", skipped["tbc"]), skipped
    out = wn.apply_weight_norm(model, x, init="preserve")
    torch.testing.assert_close(out(x), model(x))
    out = wn.apply_weight_norm(model, x)  # the data init calibrates torch.linalg.matmul's weight too
    std = torch.linalg.matmul(x, out.proj).detach().std(dim=0, unbiased=False)
    torch.testing.assert_close(std, torch.ones_like(std), atol=1e-4, rtol=0)


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


@pytest.mark.parametrize("batch", [None, True], ids=["no-batch", "traced"])
def test_a_weight_masked_by_a_parametrization_is_named_by_the_layer_and_the_parametrization(batch: bool | None) -> None:
    """PixelCNN's mask as a torch parametrization: the trace follows into it and reads its original
    through ``mul``; the report names the layer's weight, computed by that parametrization."""
    conv = nn.Conv2d(1, 8, 5, padding=2)
    mask = torch.ones_like(conv.weight)
    mask[:, :, 2, 2:] = 0
    mask[:, :, 3:] = 0
    nn.utils.parametrize.register_parametrization(conv, "weight", _Mask(mask))
    report, skipped = _reasons(nn.Sequential(conv, nn.ReLU(), nn.Conv2d(8, 4, 1)), torch.randn(2, 1, 8, 8) if batch else None)
    assert [t.qualname for t in report.converted] == ["2.weight"]
    assert skipped == {"0.weight": "computed by another parametrization (_Mask); weight norm on top of it is not supported"}


class _PassThrough(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


def test_a_weight_under_a_pass_through_parametrization_is_converted_and_not_also_skipped() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    nn.utils.parametrize.register_parametrization(model[0], "weight", _PassThrough())
    report, skipped = _reasons(model, torch.randn(8, 4))
    assert skipped == {}
    assert [t.qualname for t in report.converted] == ["0.parametrizations.weight.original", "2.weight"]


class _Hyper(nn.Module):
    """A parametrization holding a layer of its own: ``w + net(z)`` (a hypernetwork's correction)."""

    def __init__(self) -> None:
        super().__init__()
        self.z = nn.Parameter(torch.randn(1, 3))
        self.net = nn.Linear(3, 16)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.net(self.z).view(4, 4)


@pytest.mark.parametrize("original", ["parameter", "buffer"])
def test_a_layer_whose_parametrization_holds_a_layer_is_reported_and_so_is_that_layer(original: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    if original == "buffer":  # a fixed base weight, the hypernetwork's correction trained
        weight = model[0].weight.detach().clone()
        del model[0].weight
        model[0].register_buffer("weight", weight)
    nn.utils.parametrize.register_parametrization(model[0], "weight", _Hyper())
    report, skipped = _reasons(model, torch.randn(8, 4))
    assert [t.qualname for t in report.converted] == ["0.parametrizations.weight.0.net.weight", "2.weight"]
    assert skipped["0.weight"].startswith("computed by another parametrization (_Hyper)")
