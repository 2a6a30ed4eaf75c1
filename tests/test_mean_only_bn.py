"""Mean-only batch normalization (the paper's sec. 4) on its own and behind weight-normalized layers."""

from __future__ import annotations

import copy
import io

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wn_transform as wn


def _channel_stats(x: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x.ndim) if d != channel_dim % x.ndim]
    var, mean = torch.var_mean(x.double(), dim=dims, correction=0)
    return mean, var.sqrt()


@pytest.mark.parametrize(("shape", "channel_dim"), [((16, 6, 5, 5), 1), ((4, 7, 6), -1), ((32, 6), -1)])
def test_training_output_has_zero_channel_mean_and_keeps_the_spread(shape: tuple[int, ...], channel_dim: int) -> None:
    torch.manual_seed(0)
    norm = wn.MeanOnlyBatchNorm(6, channel_dim=channel_dim)
    with torch.no_grad():
        norm.bias.copy_(torch.arange(6.0))
    x = torch.randn(shape) * 3 + 2
    y = norm(x)
    mean, std = _channel_stats(y, channel_dim)
    torch.testing.assert_close(mean, torch.arange(6.0, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(std, _channel_stats(x, channel_dim)[1])  # no division by the std


@pytest.mark.parametrize("momentum", [0.2, None], ids=["momentum", "cumulative"])
def test_running_mean_updates_like_batchnorms(momentum: float | None) -> None:
    """With a momentum, an exponential average; with None, the mean of every batch since the reset."""
    torch.manual_seed(0)
    ours = wn.MeanOnlyBatchNorm(5, channel_dim=1, momentum=momentum)
    reference = nn.BatchNorm2d(5, momentum=momentum, affine=False)
    ours(torch.randn(8, 5, 3, 3) + 7.0)
    ours.reset_running_stats()
    for _ in range(4):
        x = torch.randn(8, 5, 3, 3) * 2 + torch.randn(1, 5, 1, 1)
        ours(x)
        reference(x)
    torch.testing.assert_close(ours.running_mean, reference.running_mean)


def test_update_bn_recomputes_the_running_means_of_an_averaged_model_as_torchs_does_batchnorms() -> None:
    """SWA: the averaged model's weights are new, its running statistics those copied with it.
    torch's ``update_bn`` finds only ``BatchNorm``; ours recomputes mean-only batch norms too, to
    the mean over the loader of what each sees, as torch's gives a BatchNorm beside them."""
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8) + 2.0
    model = nn.Sequential(*_model()[:3], nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5))
    out = wn.apply_weight_norm(model, x, mean_only_bn=True)
    swa = torch.optim.swa_utils.AveragedModel(out)
    optimizer = torch.optim.SGD(out.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(out(x), torch.arange(32) % 5).backward()
        optimizer.step()
        swa.update_parameters(out)
    swa.eval()
    loader = [(x[:16], None), (x[16:], None)]
    expected = copy.deepcopy(swa)
    torch.optim.swa_utils.update_bn(loader, expected)  # the BatchNorm's statistics, by torch
    wn.update_bn(loader, swa)
    assert not swa.training and swa.module[0].mean_only_bn.momentum == 0.1
    torch.testing.assert_close(swa.module[3].running_mean, expected.module[3].running_mean)
    torch.testing.assert_close(swa.module[3].running_var, expected.module[3].running_var)
    with torch.no_grad():  # the first norm: the mean over the batches of its conv's per-channel means
        weight = swa.module[0].weight
        means = [F.conv2d(batch, weight).mean((0, 2, 3)) for batch, _ in loader]
    torch.testing.assert_close(swa.module[0].mean_only_bn.running_mean, torch.stack(means).mean(0))


def test_an_empty_batch_leaves_the_running_mean_as_batchnorms() -> None:
    """An empty batch has no mean (NaN): it must not poison the running mean for good."""
    torch.manual_seed(0)
    ours = wn.MeanOnlyBatchNorm(5, channel_dim=-1)
    reference = nn.BatchNorm1d(5, affine=False)
    for rows in (8, 0, 8):
        x = torch.randn(rows, 5) + 3
        assert ours(x).shape == (rows, 5)
        reference(x)
    assert torch.isfinite(ours.running_mean).all()
    torch.testing.assert_close(ours.running_mean, reference.running_mean)


def test_eval_mode_subtracts_the_running_mean_and_the_state_dict_round_trips() -> None:
    torch.manual_seed(0)
    norm = wn.MeanOnlyBatchNorm(4, channel_dim=-1)
    for _ in range(3):
        norm(torch.randn(10, 4) + 1)
    norm.eval()
    x = torch.randn(3, 4)
    torch.testing.assert_close(norm(x), x - norm.running_mean + norm.bias)
    other = wn.MeanOnlyBatchNorm(4, channel_dim=-1).eval()
    other.load_state_dict(norm.state_dict())
    torch.testing.assert_close(other(x), norm(x))
    assert set(norm.state_dict()) == {"bias", "running_mean"}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, bias=False), nn.Flatten(), nn.Linear(64, 5))


def test_preserve_mode_moves_the_bias_and_keeps_the_function_in_eval_mode() -> None:
    model = _model().eval()
    x = torch.randn(4, 3, 8, 8)
    out = wn.apply_weight_norm(model, init="preserve", mean_only_bn=True).eval()
    assert out[0].bias is None and isinstance(out[0].mean_only_bn, wn.MeanOnlyBatchNorm)
    torch.testing.assert_close(out[0].mean_only_bn.bias, model[0].bias)
    torch.testing.assert_close(out(x), model(x))
    assert wn.weight_norm_report(out).mean_only_bn == ["0", "2", "4"]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_each_norm_takes_its_layers_mode(mode: str) -> None:
    """A model in eval mode stays one: its new norms subtract the running mean (no call of
    ``.eval()`` needed after apply), and a forward changes no running mean."""
    model = getattr(_model(), mode)()
    out = wn.apply_weight_norm(model, init="preserve", mean_only_bn=True)
    norms = [m for m in out.modules() if isinstance(m, wn.MeanOnlyBatchNorm)]
    assert len(norms) == 3 and all(norm.training == (mode == "train") for norm in norms)
    if mode == "eval":
        x = torch.randn(4, 3, 8, 8)
        torch.testing.assert_close(out(x), model(x))
        assert all(torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean)) for norm in norms)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_data_init_with_mean_only_bn_starts_every_layer_centred_with_unit_std(mode: str) -> None:
    """Decision: g = s/sigma[t], running mean = mean of g*t on the batch, bias = 0; so training mode
    (batch mean) and eval mode (running mean) agree on the calibration batch."""
    x = torch.randn(64, 3, 8, 8) + 0.5
    out = wn.apply_weight_norm(_model(), x, mean_only_bn=True)
    getattr(out, mode)()
    outputs = {}
    for name in ("0", "2", "4"):
        out.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: outputs.__setitem__(name, o.detach()))
    out(x)
    for name, value in outputs.items():
        mean, std = _channel_stats(value, 1 if value.ndim > 2 else -1)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(std, torch.ones_like(std), atol=1e-4, rtol=0, msg=name)
        assert torch.equal(out.get_submodule(name).mean_only_bn.bias, torch.zeros(value.shape[1 if value.ndim > 2 else -1]))


def test_init_pass_sets_only_the_running_means_it_means_to() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    bn_before = model[1].running_mean.clone()
    out = wn.apply_weight_norm(model, torch.randn(32, 4) + 1, mean_only_bn=True)
    assert torch.equal(out[1].running_mean, bn_before)
    assert out[0].mean_only_bn.running_mean.abs().sum() > 0


def test_folding_puts_the_inference_shift_into_the_bias_and_leaves_no_trace() -> None:
    x = torch.randn(32, 3, 8, 8) + 0.5
    out = wn.apply_weight_norm(_model(), x, mean_only_bn=True)
    optimizer = torch.optim.SGD(out.parameters(), lr=0.05)
    for _ in range(3):  # train a little, so the running means and biases move
        optimizer.zero_grad()
        F.cross_entropy(out(x), torch.arange(32) % 5).backward()
        optimizer.step()
    out.eval()
    folded = wn.fold_weight_norm(out)
    torch.testing.assert_close(folded(x), out(x))
    assert list(folded.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert not any(isinstance(m, wn.MeanOnlyBatchNorm) for m in folded.modules())
    assert not folded[0]._forward_hooks
    by_state_dict = wn.fold_state_dict(out.state_dict())
    assert by_state_dict.keys() == folded.state_dict().keys()
    for key, value in folded.state_dict().items():
        torch.testing.assert_close(by_state_dict[key], value)


@pytest.mark.parametrize("source", ["plain", "weight norm without it"])
def test_a_checkpoint_without_the_norms_loads_as_the_same_function_at_inference(source: str) -> None:
    """Weight-normalize, then load pretrained weights: the layer's bias goes to its norm, with a
    running mean of 0, so the model in eval mode computes what the checkpoint's model did."""
    torch.manual_seed(0)
    pretrained = _model()
    for p in pretrained.parameters():  # biases far from 0, so that a lost bias shows
        p.data.add_(0.3)
    if source != "plain":
        pretrained = wn.apply_weight_norm(pretrained, init="preserve")
    x = torch.randn(8, 3, 8, 8)
    out = wn.apply_weight_norm(_model(), x, mean_only_bn=True)
    assert str(out.load_state_dict(pretrained.state_dict())) == "<All keys matched successfully>"
    torch.testing.assert_close(out.eval()(x), pretrained.eval()(x))
    torch.testing.assert_close(wn.fold_weight_norm(out)(x), pretrained(x))
    partial = {k: v for k, v in pretrained.state_dict().items() if k.startswith("0.")}
    kept = {k: v.clone() for k, v in out.state_dict().items() if k.startswith("2.mean_only_bn")}
    out.load_state_dict(partial, strict=False)  # a layer the checkpoint leaves out keeps its norm
    assert all(torch.equal(out.state_dict()[k], v) for k, v in kept.items())


def test_the_folded_model_keeps_no_load_hook_of_the_norms() -> None:
    import pickle

    out = wn.apply_weight_norm(_model(), torch.randn(8, 3, 8, 8), mean_only_bn=True)
    assert out[0]._load_state_dict_pre_hooks
    folded = wn.fold_weight_norm(out)
    assert b"mean_only_bn" not in pickle.dumps(folded)


def test_the_folded_export_has_the_plain_models_graph(tmp_path) -> None:
    x = torch.randn(8, 3, 8, 8)
    out = wn.apply_weight_norm(_model(), x, mean_only_bn=True).eval()
    report = wn.export_onnx(out, x, tmp_path / "mobn.onnx")
    plain = wn.export_onnx(_model(), x, tmp_path / "plain.onnx")
    assert report.node_counts == plain.node_counts
    ops = {node.op_type for node in onnx.load(tmp_path / "mobn.onnx").graph.node}
    assert not ops & {"ReduceMean", "Sub", "ReduceL2"}


def test_layers_whose_op_output_is_not_theirs_get_none_and_are_reported() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))
            self.fc = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(F.linear(x, self.w)))

    out = wn.apply_weight_norm(Model(), torch.randn(16, 4), mean_only_bn=True)
    report = wn.weight_norm_report(out)
    assert report.mean_only_bn == ["fc"] and report.mean_only_bn_missing == ["w"]
    assert "no mean-only batch norm" in str(report)


@pytest.mark.parametrize("momentum", [0.2, None], ids=["momentum", "cumulative"])
def test_training_steps_compile_to_one_graph_and_update_the_running_mean_as_eager(momentum: float | None) -> None:
    """The batch count is a tensor: dynamo would take an int attribute as a constant and compile
    one graph per value (then fall back to eager at its recompile limit)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    x = torch.randn(16, 8)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), x, mean_only_bn=True)
    for norm in (model[0].mean_only_bn, model[2].mean_only_bn):
        norm.momentum = momentum
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    for _ in range(5):
        batch = torch.randn(16, 8)
        compiled(batch).square().mean().backward()
        eager(batch).square().mean().backward()
    assert counters["stats"]["unique_graphs"] == 1
    assert int(model[0].mean_only_bn.batches_seen) == int(eager[0].mean_only_bn.batches_seen) == 5
    torch.testing.assert_close(model[0].mean_only_bn.running_mean, eager[0].mean_only_bn.running_mean)


def test_a_pickle_that_holds_the_batch_count_as_an_int_loads_with_it() -> None:
    """An earlier version kept ``batches_seen`` as an int attribute: it comes back as the buffer."""
    norm = wn.MeanOnlyBatchNorm(3, momentum=None)
    del norm._buffers["batches_seen"]
    norm.__dict__["batches_seen"] = 4
    loaded = copy.deepcopy(norm)  # pickles (__reduce_ex__ / __setstate__)
    assert "batches_seen" not in loaded.__dict__ and int(loaded.batches_seen) == 4
    loaded(torch.full((2, 3), 5.0))  # a fifth batch: weight 1/5
    torch.testing.assert_close(loaded.running_mean, torch.full((3,), 1.0))
    assert "batches_seen" not in loaded.state_dict()


def test_a_model_with_mean_only_bn_pickles() -> None:
    out = wn.apply_weight_norm(_model(), torch.randn(8, 3, 8, 8), mean_only_bn=True).eval()
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), out(x))


def test_an_unbatched_call_is_a_batch_of_one() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 3), nn.Flatten(0), nn.Linear(64, 5))
    x = torch.randn(3, 20)  # [C, L]: Conv1d's unbatched form
    out = wn.apply_weight_norm(model, x, mean_only_bn=True)
    seen = []
    out[2].register_forward_hook(lambda m, a, y: seen.append(y))  # after its mean-only batch norm
    out[:3](x)
    mean, _ = _channel_stats(seen[0].unsqueeze(0), 1)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-6, rtol=0)
    for training in (True, False):
        out.train(training)
        torch.testing.assert_close(out[:3](x), out[:3](x.unsqueeze(0)).squeeze(0))
    assert out(x).shape == (5,)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.attn(x, x, x)[0]))


class _Functional(nn.Module):
    """Reads a Linear's parameters itself: the Linear's own call never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(torch.nn.functional.linear(x, self.fc.weight, self.fc.bias)))


class _SharedBias(nn.Module):
    """Calls its Linear, and reads the Linear's bias again."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x) + self.fc.bias))


class _Branchy(_Functional):
    """The same, with Python control flow on the input (torch.export traces it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.flatten(0, 1)
        return super().forward(x)


class _DataDependent(_Functional):
    """The same, with control flow on the input's values (recorded: neither tracer takes it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            x = -x
        return super().forward(x)


class _ActLinear(nn.Module):
    """A Linear subclass whose forward applies an activation after the op: its output is not the op's."""

    class Layer(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.silu(super().forward(x))

    def __init__(self) -> None:
        super().__init__()
        self.fc = self.Layer(8, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x))


_MISSING = {
    _ActLinear: {"fc.weight"},
    _Attention: {"attn.in_proj_weight", "attn.out_proj.weight", "encoder.self_attn.in_proj_weight",
                 "encoder.self_attn.out_proj.weight", "encoder.linear1.weight", "encoder.linear2.weight"},
    _Functional: {"fc.weight"}, _SharedBias: {"fc.weight"}, _Branchy: {"fc.weight"}, _DataDependent: {"fc.weight"},
}


@pytest.mark.parametrize("cls", list(_MISSING), ids=lambda c: c.__name__.strip("_"))
def test_layers_whose_own_call_does_not_produce_the_op_output_keep_their_bias_and_the_function(cls: type) -> None:
    """MultiheadAttention reads out_proj's parameters itself, TransformerEncoderLayer reads its
    linears' in its inference fast path, user code may read a Linear's: a hook on the layer would
    never run, and moving its bias would change the function (or crash torch's fast path)."""
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()  # a trained model: biases matter
    x = torch.randn(4, 6, 8)
    out = wn.apply_weight_norm(model, x, init="preserve", mean_only_bn=True).eval()
    report = wn.weight_norm_report(out)
    assert set(report.mean_only_bn_missing) == _MISSING[cls]
    assert report.mean_only_bn == ["head"]
    for name in _MISSING[cls]:
        layer = out.get_submodule(name.rpartition(".")[0])
        assert isinstance(layer.bias if isinstance(layer, nn.Linear) else layer.in_proj_bias, nn.Parameter), name
    torch.testing.assert_close(out(x), model(x))
    with torch.no_grad():  # torch's inference fast paths read the parameters directly
        torch.testing.assert_close(out(x), model(x))
    text = str(report)
    assert all(f"{name}: no mean-only batch norm" in text for name in _MISSING[cls])


def test_a_data_init_centres_attention_outputs_without_a_mean_only_bn() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 6, 8)
    out = wn.apply_weight_norm(_Attention(), x, mean_only_bn=True).eval()
    seen = []
    out.attn.register_forward_hook(lambda m, a, y: seen.append(y[0].detach().double()))
    with torch.no_grad():
        out(x)
    mean = seen[0].reshape(-1, 8).mean(0)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)


class _Traced(nn.Module):
    """A CNN that ``symbolic_trace``, torch.export (``branch="shape"``) or only a recorded run
    (``branch="values"``) can trace."""

    def __init__(self, branch: str) -> None:
        super().__init__()
        self.branch = branch
        self.body = _model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch == "shape" and x.dim() == 5:
            x = x.flatten(0, 1)
        if self.branch == "values" and x.sum() > 1e9:
            x = -x
        return self.body(x)


@pytest.mark.parametrize(("branch", "found_by"), [("none", "symbolic_trace"), ("shape", "torch.export"), ("values", "recorded")])
def test_every_layer_called_as_itself_gets_a_mean_only_bn_whichever_step_traced_it(branch: str, found_by: str) -> None:
    model = _Traced(branch).eval()
    x = torch.randn(4, 3, 8, 8)
    out = wn.apply_weight_norm(model, x, init="preserve", mean_only_bn=True).eval()
    report = wn.weight_norm_report(out)
    assert report.found_by == found_by
    assert report.mean_only_bn == ["body.0", "body.2", "body.4"] and not report.mean_only_bn_missing
    torch.testing.assert_close(out(x), model(x))


def test_layers_inside_a_torch_wrapper_get_one() -> None:
    """fx takes ``DataParallel`` of torch layers as one leaf: its layers still run as their own calls."""
    torch.manual_seed(0)
    model = nn.DataParallel(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))).eval()
    out = wn.apply_weight_norm(model, init="preserve", mean_only_bn=True)
    assert wn.weight_norm_report(out).mean_only_bn == ["module.0", "module.2"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(out(x), model(x))


class _ReadsItsChild(nn.Module):
    """Untraceable by fx (a branch on the batch size); reads ``fc``'s parameters itself."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            x = x * 2
        return self.out(F.linear(x, self.fc.weight, self.fc.bias))


def test_the_module_walk_attaches_none() -> None:
    """Without a trace (no batch, fx fails) nothing shows how a layer is called: no layer loses its bias."""
    torch.manual_seed(0)
    model = _ReadsItsChild().eval()
    with pytest.warns(UserWarning, match="could not trace"):
        out = wn.apply_weight_norm(model, init="preserve", mean_only_bn=True)
    report = wn.weight_norm_report(out)
    assert report.found_by == "module walk" and report.mean_only_bn == []
    assert report.mean_only_bn_missing == ["fc.weight", "out.weight"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(out(x), model(x))


def test_a_subclass_with_the_stock_forward_gets_one_ahead_of_the_users_own_hooks() -> None:
    """A subclass that keeps torch's forward outputs the op's result, so it gets a norm; the norm runs
    on that output before any forward hook the user had set, which sees the centred output (as if
    the norm were part of the layer)."""

    class Layer(nn.Conv1d):
        pass

    seen: list[torch.Tensor] = []
    model = nn.Sequential(Layer(3, 5, 3), nn.ReLU(), nn.Conv1d(5, 2, 1))
    model[0].register_forward_hook(lambda module, args, y: seen.append(y.detach()))
    x = torch.randn(8, 3, 16)
    out = wn.apply_weight_norm(model, x, init="preserve", mean_only_bn=True)
    assert wn.weight_norm_report(out).mean_only_bn == ["0", "2"]
    seen.clear()
    out.train()(x)
    mean, _ = _channel_stats(seen[0], 1)  # the batch mean taken out, the layer's bias put back
    torch.testing.assert_close(mean.float(), out[0].mean_only_bn.bias.detach(), atol=1e-6, rtol=0)


def test_a_layer_called_twice_per_forward_gets_none_so_train_and_eval_agree_after_the_init() -> None:
    """One running mean cannot serve two calls that see different data (a shared projection, SEW-D's
    relative-position keys): such a layer keeps its bias, is listed, and the model computes the
    same in train and eval mode right after the data init, as every other layer's norm makes it."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.fc(x)) * torch.tanh(self.fc(3 * x + 1)))

    torch.manual_seed(0)
    x = torch.randn(64, 6)
    out = wn.apply_weight_norm(Shared(), x, mean_only_bn=True)
    report = wn.weight_norm_report(out)
    assert report.mean_only_bn == ["out"] and report.mean_only_bn_missing == ["fc.weight"]
    assert isinstance(out.fc.bias, nn.Parameter)
    with torch.no_grad():
        torch.testing.assert_close(out.train()(x), out.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 4), (4,), (1, 4, 1, 1)], ids=["one-row", "unbatched", "pooled-se"])
def test_one_value_per_channel_in_training_is_an_error_as_in_batchnorm(shape: tuple[int, ...]) -> None:
    """A batch-1 RL actor, a squeeze-excite conv on ``[1, C, 1, 1]``: subtracting the batch mean
    would zero every output; torch's BatchNorm raises there, and so does this, in training only."""
    channel_dim = 1 if len(shape) == 4 else -1
    norm = wn.MeanOnlyBatchNorm(4, channel_dim=channel_dim)
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=r"more than 1 value per channel when training, got input size"):
        norm(x)
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        nn.BatchNorm1d(4)(torch.randn(1, 4))
    torch.testing.assert_close(norm.eval()(x), x)  # eval: the running mean (0) and the bias (0)


def test_fold_state_dict_folds_the_mean_only_batch_norm_of_a_bare_layer() -> None:
    """A bare layer's norm has keys 'mean_only_bn.bias'/'.running_mean' (no module prefix):
    they become its 'bias', as fold_weight_norm gives it."""
    torch.manual_seed(0)
    layer = wn.apply_weight_norm(nn.Linear(8, 4), torch.randn(64, 8) + 1.0, mean_only_bn=True)
    layer.eval()
    by_state_dict = wn.fold_state_dict(layer.state_dict())
    by_model = wn.fold_weight_norm(layer).state_dict()
    assert list(by_state_dict) == list(by_model) == ["weight", "bias"]
    for key in by_model:
        torch.testing.assert_close(by_state_dict[key], by_model[key], rtol=0, atol=1e-6)
    plain = nn.Linear(8, 4)
    plain.load_state_dict(by_state_dict)
    x = torch.randn(5, 8)
    torch.testing.assert_close(plain(x), layer(x), rtol=1e-5, atol=1e-6)


def test_update_bn_puts_back_each_modules_own_mode() -> None:
    """A batch norm frozen in eval mode inside a training model stays in eval mode after."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
                                 torch.randn(32, 4), mean_only_bn=True)
    model.train()
    model[1].eval()
    modes = [m.training for m in model.modules()]
    wn.update_bn([torch.randn(8, 4) for _ in range(3)], model)
    assert [m.training for m in model.modules()] == modes


def test_a_frozen_bias_keeps_its_value_and_gets_no_norm() -> None:
    """A trainable weight beside a frozen bias: without the norm the data init leaves the bias as it
    is (``bias_not_set``); with ``mean_only_bn`` the norm would take the bias over and zero it, for
    good.  The layer gets no norm (listed as missing) and keeps its bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].bias.fill_(0.7)
    model[0].bias.requires_grad_(False)
    out = wn.apply_weight_norm(model, torch.randn(32, 6), mean_only_bn=True)
    report = wn.weight_norm_report(out)
    assert report.mean_only_bn == ["2"] and report.mean_only_bn_missing == ["0.weight"]
    assert torch.equal(out[0].bias, torch.full((8,), 0.7)) and not out[0].bias.requires_grad
    assert report.notes.bias_not_set == ["0.weight"]


def test_a_bias_keeps_the_flags_set_on_it_when_the_norm_takes_it_over() -> None:
    """Optimizer grouping by a flag on the Parameter (timm's ``_no_weight_decay``): the norm's bias,
    which replaces the layer's in place, carries it."""
    model = nn.Sequential(nn.Linear(6, 8))
    model[0].bias._no_weight_decay = True
    out = wn.apply_weight_norm(model, torch.randn(16, 6), mean_only_bn=True, inplace=True)
    assert out[0].mean_only_bn.bias._no_weight_decay is True


def test_mean_only_bn_attached_under_inference_mode_runs_in_training_mode() -> None:
    """The running mean a training-mode forward updates in place must not be an inference tensor
    (the warning promises that the model runs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(16, 6)
    with pytest.warns(UserWarning, match="inference_mode"), torch.inference_mode():
        out = wn.apply_weight_norm(model, x, mean_only_bn=True)
    norm = out[0].mean_only_bn
    assert not norm.running_mean.is_inference()
    before = norm.running_mean.clone()
    with torch.no_grad():
        out.train()(x + 1)
    assert not torch.equal(norm.running_mean, before)  # updated by the training-mode forward


def test_a_meta_model_with_norms_takes_a_plain_checkpoint_with_assign() -> None:
    """``assign=True`` hands the checkpoint's tensors over: the norms' running means are made on the
    checkpoint's device, and their batch count (no state-dict entry) follows them off the meta device."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model = wn.apply_weight_norm(model, mean_only_bn=True, inplace=True)
    model.load_state_dict(plain.state_dict(), assign=True)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    x = torch.randn(5, 4)
    torch.testing.assert_close(model.eval()(x), plain(x))


def test_update_bn_takes_dict_batches_averages_half_precision_in_float32_and_keeps_the_statistics_on_failure() -> None:
    """A loader of keyword batches (the form apply and export take); a bfloat16 model's running mean
    as the float64 average of its batch means (summed in bfloat16, late batches' terms round away:
    18 % off); a pass that fails midway (a bad batch, Ctrl-C) leaves the running means as they were."""

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    torch.manual_seed(0)
    model = wn.apply_weight_norm(Keyword(), {"x": torch.randn(8, 4) + 1}, mean_only_bn=True)
    batches = [{"x": torch.randn(8, 4) + 2 + i / 10} for i in range(3)]
    wn.update_bn(batches, model)
    norm = model.fc.mean_only_bn
    with torch.no_grad():
        expected = torch.stack([F.linear(b["x"], model.fc.weight).mean(0) for b in batches]).mean(0)
    torch.testing.assert_close(norm.running_mean, expected, rtol=1e-5, atol=1e-5)
    before = norm.running_mean.clone()

    def failing():
        yield batches[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        wn.update_bn(failing(), model)
    torch.testing.assert_close(norm.running_mean, before, rtol=0, atol=0)

    half = copy.deepcopy(model).to(torch.bfloat16)
    drifting = [{"x": (torch.randn(16, 4) + i / 20).to(torch.bfloat16)} for i in range(200)]
    held = half.fc.mean_only_bn.running_mean  # (a reference from before: DDP's buffer list, a tie)
    wn.update_bn(drifting, half)
    assert half.fc.mean_only_bn.running_mean is held
    with torch.no_grad():
        means = torch.stack([F.linear(b["x"], half.fc.weight).double().mean(0) for b in drifting]).mean(0)
    assert half.fc.mean_only_bn.running_mean.dtype == torch.bfloat16
    torch.testing.assert_close(half.fc.mean_only_bn.running_mean.double(), means, rtol=2e-2, atol=2e-2)
