"""The public face: arguments, selection, errors, copies, state dicts, and the tools torch users
rely on (optimizers, torch.save, torch.compile).  DistributedDataParallel and FSDP: in
test_distributed.py, in spawned processes (a gloo group torn down in the test process itself
can hang in its destructor, pytorch#75097)."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import json
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

import wn_transform as wn


class Net(nn.Module):
    """A small model with a method of its own, to check it survives."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose1d(8, 4, 2, stride=2)
        self.head = nn.Linear(4 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.up(torch.relu(self.conv(x)))).flatten(1))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(-1)


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def batch() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(16, 3, 8)


def test_by_default_a_copy_is_changed_and_the_original_is_untouched(net: Net, batch: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = wn.apply_weight_norm(net, batch)
    assert out is not net and isinstance(out, Net)
    assert out.predict(batch).shape == (16,)
    assert {type(m) for m in net.modules()} == {Net, nn.Conv1d, nn.ConvTranspose1d, nn.Linear}
    assert net.state_dict().keys() == before.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("normalized_by", ["torch", "wn_transform"])
def test_taking_a_parametrization_off_the_copy_leaves_the_original_as_it_was(normalized_by: str) -> None:
    """A vocoder that carries weight norm, passed through with ``existing="keep"``, then the repo's own
    ``remove_weight_norm()`` (torch's ``remove_parametrizations``) on what came back: a deep copy would
    share each layer's generated class with the original, and the removal would take the original's
    ``weight`` property away."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Conv1d(3, 2, 1))
    if normalized_by == "torch":
        for layer in (model[0], model[2]):
            torch.nn.utils.parametrizations.weight_norm(layer)
    else:
        model = wn.apply_weight_norm(model, init="preserve")
    x = torch.randn(1, 2, 8)
    expected = model(x)
    out = wn.apply_weight_norm(model, init="preserve")
    assert not wn.weight_norm_report(out).converted  # both kept as they were
    for layer in (out[0], out[2]):
        parametrize.remove_parametrizations(layer, "weight")
    torch.testing.assert_close(out(x), expected)
    torch.testing.assert_close(model(x), expected)
    assert parametrize.is_parametrized(model[0], "weight") and parametrize.is_parametrized(model[2], "weight")


def test_a_plain_deepcopy_of_a_weight_normalized_model_has_classes_of_its_own() -> None:
    """``export_copy = copy.deepcopy(model); export_copy.remove_weight_norm()`` (a vocoder's deploy
    step, an EMA copy): torch's deepcopy of a parametrized layer shares its generated class, so
    the removal on the copy would take the weight property off the training model too."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Linear(6, 2)), init="preserve")
    x = torch.randn(1, 2, 8)
    expected = model(x)
    replica = copy.deepcopy(model)
    assert type(replica[0]) is not type(model[0]) and type(replica[0]).__name__ == type(model[0]).__name__
    for layer in (replica[0], replica[2]):
        parametrize.remove_parametrizations(layer, "weight")
    torch.testing.assert_close(replica(x), expected)
    torch.testing.assert_close(model(x), expected)
    assert parametrize.is_parametrized(model[0], "weight") and parametrize.is_parametrized(model[2], "weight")
    again = copy.deepcopy(model)  # a copy of a copy's class: the same behaviour
    torch.testing.assert_close(copy.deepcopy(again)(x), expected)


def test_inplace_changes_and_returns_the_model_itself(net: Net) -> None:
    out = wn.apply_weight_norm(net, init="preserve", inplace=True)
    assert out is net and parametrize.is_parametrized(net.conv, "weight")


@pytest.mark.parametrize("enabled", [True, False], ids=["gc-on", "gc-off"])
def test_the_garbage_collector_is_paused_during_apply_and_left_as_it_was(net: Net, batch: torch.Tensor,
                                                                          enabled: bool) -> None:
    seen: list[bool] = []
    net.head.register_forward_pre_hook(lambda m, a: seen.append(gc.isenabled()))
    (gc.enable if enabled else gc.disable)()
    try:
        wn.apply_weight_norm(net, batch, inplace=True)
        with pytest.raises(wn.BatchError):  # a failure puts it back too
            wn.apply_weight_norm(Net(), torch.randn(2, 5, 8))
        after = gc.isenabled()
    finally:
        gc.enable()
    assert seen and not any(seen)
    assert after is enabled


def test_state_dict_keys_follow_torchs_layout_and_round_trip(net: Net, batch: torch.Tensor) -> None:
    out = wn.apply_weight_norm(net, batch)
    keys = list(out.state_dict())
    assert "conv.parametrizations.weight.original0" in keys and "conv.parametrizations.weight.original1" in keys
    assert "conv.weight" not in keys
    other = wn.apply_weight_norm(Net(), init="preserve")
    other.load_state_dict(out.state_dict())
    torch.testing.assert_close(other(batch), out(batch))


def test_checkpoints_are_interchangeable_with_torchs_weight_norm_where_the_axes_agree(batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    ours = wn.apply_weight_norm(Net(), batch)
    theirs = Net()
    torch_weight_norm(theirs.conv, dim=0)
    torch_weight_norm(theirs.up, dim=1)  # ConvTranspose: torch's dim=1 is the output channel
    torch_weight_norm(theirs.head, dim=0)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(theirs(batch), ours(batch))
    with torch.no_grad():
        for p in theirs.parameters():
            p.mul_(1.5)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(batch), theirs(batch))


def test_optimizer_trains_g_and_v(net: Net, batch: torch.Tensor) -> None:
    out = wn.apply_weight_norm(net, batch)
    optimizer = torch.optim.Adam(out.parameters(), lr=1e-2)
    target = torch.randint(0, 5, (16,))
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(out(batch), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert out.conv.parametrizations.weight.original0.grad is not None


def test_the_whole_model_pickles_with_torch_save(net: Net, batch: torch.Tensor) -> None:
    out = wn.apply_weight_norm(net, batch)
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(batch), out(batch))
    assert isinstance(loaded, Net) and parametrize.is_parametrized(loaded.up, "weight")
    torch.testing.assert_close(wn.fold_weight_norm(loaded)(batch), out(batch))


def test_a_model_pickled_by_an_earlier_version_still_loads(net: Net, batch: torch.Tensor) -> None:
    """Files from before the pickled state came apart from the class (``_rebuild_parametrized``,
    whose name the pickle holds) load to the same model."""
    from wn_transform import parametrization
    out = wn.apply_weight_norm(net, batch)
    _, (base, names), state = parametrization._reduce_parametrized(out.up, 4)
    old_payload = pickle.dumps((parametrization._rebuild_parametrized, (base, list(names), state)))
    rebuild, args = pickle.loads(old_payload)
    out.up = rebuild(*args)
    assert parametrize.is_parametrized(out.up, "weight") and type(out.up).__bases__[0] is base
    torch.testing.assert_close(wn.fold_weight_norm(out)(batch), out(batch))


def test_torch_compile_gives_the_same_outputs_and_gradients(net: Net, batch: torch.Tensor) -> None:
    eager = wn.apply_weight_norm(net, batch)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(batch), eager(batch))
    compiled(batch).sum().backward()
    eager(batch).sum().backward()
    torch.testing.assert_close(compiled_model.up.parametrizations.weight.original0.grad,
                               eager.up.parametrizations.weight.original0.grad)


class _FunctionalHead(nn.Module):
    """A weight read by ``F.linear`` in the forward: only tracing finds it (the module walk cannot)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv1d(3, 4, 3)
        self.w = nn.Parameter(torch.randn(5, 24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.relu(self.body(x)).flatten(1), self.w)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_compiled_model_is_weight_normalized_through_its_wrapper(inplace: bool, batch: torch.Tensor) -> None:
    """``apply_weight_norm(torch.compile(model), batch)`` converts the model inside the wrapper, as it
    converts the model itself (the same report, the same init), and hands back a compiled model."""
    torch.manual_seed(0)
    model = _FunctionalHead()
    expected = wn.apply_weight_norm(model, batch)
    compiled = torch.compile(copy.deepcopy(model), backend="eager")
    assert wn.plan_weight_norm(compiled).to_dict() == wn.plan_weight_norm(model).to_dict()
    got = wn.apply_weight_norm(compiled, batch, inplace=inplace)
    assert type(got) is type(compiled) and (got is compiled) == inplace
    assert parametrize.is_parametrized(compiled._orig_mod) == inplace  # a copy leaves the user's wrapper as it was
    assert wn.weight_norm_report(got).to_dict() == wn.weight_norm_report(expected).to_dict()
    torch.testing.assert_close(got(batch), expected(batch))


@pytest.mark.parametrize("rows", [4, 256], ids=["output-form", "weight-form"])
def test_torch_compile_of_both_linear_routes_gives_the_same_outputs_and_gradients(rows: int) -> None:
    """A large Linear with few rows takes the output form (a custom autograd Function) under
    torch.compile too; with many rows, the weight form.  Both trace in one graph."""
    from wn_transform.fast import prefer_output_form

    assert prefer_output_form(rows, 512, 256) == (rows == 4)
    torch.manual_seed(0)
    eager = wn.apply_weight_norm(nn.Sequential(nn.Linear(512, 256), nn.Tanh(), nn.Linear(256, 8)), init="preserve")
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = torch.randn(rows, 512)
    torch.testing.assert_close(compiled(x), eager(x))
    compiled(x).square().sum().backward()
    eager(x).square().sum().backward()
    for (name, got), expected in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(got.grad, expected.grad, msg=name)
    with torch.no_grad():  # inference under the compiler: no weight cache (it reads data pointers)
        torch.testing.assert_close(compiled(x), eager(x))


def test_dict_and_tuple_batches(batch: torch.Tensor) -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(2, 3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(y)

    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    for sample in ((x, y), {"x": x, "y": y}):
        out = wn.apply_weight_norm(TwoInputs(), sample)
        assert {t.qualname for t in wn.weight_norm_report(out).converted} == {"a.weight", "b.weight"}
        pre = out.a(x).detach()
        torch.testing.assert_close(pre.std(0, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def test_selection_rules(net: Net) -> None:
    def converted(**rules) -> set[str]:
        return {t.qualname for t in wn.plan_weight_norm(net, **rules).converted}

    assert converted(include="conv") == {"conv.weight"}
    assert converted(include=["conv*", "up.weight"]) == {"conv.weight", "up.weight"}
    assert converted(exclude="head") == {"conv.weight", "up.weight"}
    assert converted(types=nn.Linear) == {"head.weight"}
    assert converted(filter_fn=lambda module, name: name != "up") == {"conv.weight", "head.weight"}
    report = wn.plan_weight_norm(net, exclude="head")
    assert [(s.qualname, s.reason) for s in report.skipped] == [("head.weight", "matched by exclude")]


@pytest.mark.parametrize(
    ("rules", "match"),
    [({"include": "encoder.*"}, "include pattern 'encoder.*' matches none"),
     ({"exclude": "nope"}, "exclude pattern 'nope' matches none"),
     ({"types": nn.Embedding}, "types entry Embedding matches none"),
     ({"filter_fn": lambda m, n: False}, "leave no weight")],
)
def test_a_rule_that_matches_nothing_is_an_error(net: Net, rules: dict, match: str) -> None:
    with pytest.raises(wn.SelectionError, match=match):
        wn.apply_weight_norm(net, **rules)


def test_bad_arguments_get_clear_errors(net: Net, batch: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got dict"):
        wn.apply_weight_norm({"conv.weight": torch.zeros(3)})
    with pytest.raises(wn.NoTargetsError, match="no weight that reaches a linear or convolution op"):
        wn.apply_weight_norm(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="init='data' needs a sample_batch"):
        wn.apply_weight_norm(net, init="data")
    with pytest.raises(ValueError, match="init must be"):
        wn.apply_weight_norm(net, batch, init="zeros")
    with pytest.raises(TypeError, match="sample_batch must be a tensor"):
        wn.apply_weight_norm(net, "batch.pt")


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_an_init_scale_that_is_no_positive_finite_number_is_a_weight_norm_error(net: Net, batch: torch.Tensor,
                                                                               scale: float) -> None:
    with pytest.raises(wn.WeightNormError, match="init_scale is the std every pre-activation starts with"):
        wn.apply_weight_norm(net, batch, init_scale=scale)


def test_lazy_layers_that_have_not_run_are_named_and_work_after_one_forward() -> None:
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(6, 3, 5, 5)
    for batch in (x, None):
        with pytest.raises(wn.WeightNormError, match=r"lazy layers .*: 0 \(LazyConv2d\), 3 \(LazyLinear\); run one forward"):
            wn.apply_weight_norm(model, batch)
    model(x)  # creates the weights (and makes the layers Conv2d and Linear)
    out = wn.apply_weight_norm(model, x, init="preserve")
    assert [t.qualname for t in wn.weight_norm_report(out).converted] == ["0.weight", "3.weight"]
    torch.testing.assert_close(out(x), model(x))


def test_torchscript_submodules_are_named_and_fold_leaves_them_alone() -> None:
    model = nn.Sequential(torch.jit.script(nn.Linear(3, 3)), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(wn.WeightNormError, match=r"holds TorchScript modules \(0\); weight norm needs the eager "
                                                 r"modules: apply it to the eager model; to script the result, fold "
                                                 r"it first \(fold_weight_norm\)"):
        wn.apply_weight_norm(model, torch.randn(4, 3))
    x = torch.randn(4, 3)
    torch.testing.assert_close(wn.fold_weight_norm(model)(x), model(x))
    eager = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))  # the advice works
    scripted = torch.jit.script(wn.fold_weight_norm(wn.apply_weight_norm(eager, x)))
    torch.testing.assert_close(scripted(x), wn.apply_weight_norm(eager, x)(x))


class _TransposedLinear(nn.Module):
    """A GPT-2-style ``[in, out]`` weight read by ``addmm``: not one of torch's layer types."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: symbolic_trace fails
            x = x * 1.0
        return torch.addmm(self.bias, x, self.weight)


def test_untraceable_model_without_batch_error_says_tracing_failed_and_how_to_fix_it() -> None:
    model = nn.Sequential(_TransposedLinear(4, 3), nn.ReLU(), _TransposedLinear(3, 2))
    with pytest.warns(UserWarning, match="could not trace"):
        with pytest.raises(wn.NoTargetsError, match=r"(?s)tracing failed \(symbolic_trace: .*pass a sample_batch") as info:
            wn.plan_weight_norm(model)
    assert "has no weight" not in str(info.value)
    # ... and with the batch the message asked for, torch.export finds both weights.
    report = wn.plan_weight_norm(model, torch.randn(5, 4))
    assert [t.qualname for t in report.converted] == ["0.weight", "2.weight"]
    assert [t.layout.dim for t in report.converted] == [1, 1]


def test_a_plan_with_a_batch_checks_it_as_apply_would_and_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(wn.plan_weight_norm(model, torch.randn(16, 4) + 3.0).converted) == 2
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(wn.BatchError, match=r"rejected the sample batch in layer '0' \(Linear\)"):
        wn.plan_weight_norm(model, torch.randn(16, 5))
    with pytest.raises(wn.BatchError, match="the sample batch is empty"):
        wn.plan_weight_norm(model, torch.randn(0, 4))


def test_existing_weight_norm_is_never_applied_twice(batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = Net()
    torch_weight_norm(model.up)  # torch's default: per *input* channel for ConvTranspose
    expected = model(batch)
    kept = wn.apply_weight_norm(model, init="preserve")
    report = wn.weight_norm_report(kept)
    assert "up.weight" not in {t.qualname for t in report.converted}
    assert any(s.qualname == "up.weight" and "already weight-normalized" in s.reason for s in report.skipped)
    assert len(kept.up.parametrizations.weight) == 1
    again = wn.apply_weight_norm(kept, init="preserve")
    assert {t.qualname for t in wn.weight_norm_report(again).converted} == set()
    converted = wn.apply_weight_norm(model, init="preserve", existing="convert")
    chain = converted.up.parametrizations.weight
    assert len(chain) == 1 and isinstance(chain[0], wn.WeightNorm) and chain[0].dim == 1
    assert chain.original0.shape == (1, 4, 1)  # one g per output channel now
    torch.testing.assert_close(converted(batch), expected)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("layout", ["torch", "legacy"])
def test_existing_convert_keeps_the_weight_norm_of_weights_it_does_not_convert(layout: str, inplace: bool) -> None:
    """existing='convert' folds every existing weight norm before discovery; a weight the selection
    then leaves out (excluded, or a layer quantization-aware training fake-quantizes) gets its
    weight norm back, as it was, and its skip reason says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    for index in (0, 2, 4):
        torch_weight_norm(model[index]) if layout == "torch" else torch.nn.utils.weight_norm(model[index])
    x = torch.randn(64, 8)
    with torch.no_grad():
        expected = model[0](x)
    g = model[0].parametrizations.weight.original0 if layout == "torch" else model[0].weight_g
    out = wn.apply_weight_norm(model, x, existing="convert", exclude=["0.weight", "4.weight"], inplace=inplace)
    assert {f.qualname: f.layout for f in wn.find_weight_norms(out)} == {
        "0.weight": layout, "2.weight": "wn_transform", "4.weight": layout}
    g_now = out[0].parametrizations.weight.original0 if layout == "torch" else out[0].weight_g
    assert (g_now is g) == inplace  # the user's own Parameter, put back
    with torch.no_grad():
        torch.testing.assert_close(out[0](x), expected, rtol=0, atol=0)
    name = {"torch": "torch.nn.utils.parametrizations.weight_norm", "legacy": "legacy torch.nn.utils.weight_norm"}[layout]
    skipped = {s.qualname: s.reason for s in wn.weight_norm_report(out).skipped}
    assert skipped == {q: f"matched by exclude; its {name} is kept" for q in ("0.weight", "4.weight")}
    optimizer = torch.optim.SGD(out.parameters(), lr=0.1)
    out(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of the parameters it steps is marked as replaced
        optimizer.step()


def test_existing_convert_keeps_the_weight_norm_of_a_quantization_aware_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    torch_weight_norm(model[0])
    torch_weight_norm(model[2])
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    model[2].qconfig = None
    prepared = torch.ao.quantization.prepare_qat(model.train())  # moves layer 0's parametrization over
    x = torch.randn(64, 8)
    out = wn.apply_weight_norm(prepared, x, existing="convert")
    assert {f.qualname: f.layout for f in wn.find_weight_norms(out)} == {"0.weight": "torch", "2.weight": "wn_transform"}
    reason = next(s.reason for s in wn.weight_norm_report(out).skipped if s.qualname == "0.weight")
    assert reason.startswith("fake-quantized before its op") and reason.endswith(
        "; its torch.nn.utils.parametrizations.weight_norm is kept")


def test_the_report_is_a_table_and_a_dict(net: Net, batch: torch.Tensor) -> None:
    report = wn.weight_norm_report(wn.apply_weight_norm(net, batch))
    text = str(report)
    for name in ("conv.weight", "up.weight", "head.weight", "conv_transpose", "symbolic_trace", "init=data"):
        assert name in text
    as_dict = report.to_dict()
    assert [row["name"] for row in as_dict["converted"]] == ["conv.weight", "up.weight", "head.weight"]
    assert as_dict["converted"][1]["dim"] == 1
    assert {row["found_by"] for row in as_dict["converted"]} == {"symbolic_trace"}


def test_the_report_records_the_options_that_made_the_weights(net: Net, batch: torch.Tensor) -> None:
    """The report says how the weights were made: the options given away from their defaults (in
    the table's summary line and in ``to_dict``), nothing for a default call, and for a plan the
    ``existing`` rule it planned with."""
    default = wn.weight_norm_report(wn.apply_weight_norm(net, batch))
    assert default.options == {} and default.to_dict()["options"] == {}
    assert default.table().splitlines()[-1].endswith("init=data")
    made = wn.weight_norm_report(wn.apply_weight_norm(net, batch, init_scale=0.5, exp_scale=True, exact_init=True))
    assert made.to_dict()["options"] == {"init_scale": 0.5, "exact_init": True, "exp_scale": True}
    assert "init=data (init_scale=0.5, exact_init=True, exp_scale=True)" in made.table()
    json.loads(json.dumps(made.to_dict()))
    assert wn.plan_weight_norm(net, existing="convert").options == {"existing": "convert"}
    plan = wn.plan_weight_norm(net, batch)  # what apply would do: said so
    assert plan.to_dict()["planned"] and not default.to_dict()["planned"]
    assert "3 weights would be reparameterized, 0 skipped" in plan.table() and "would be" not in default.table()
    numpy_scale = wn.weight_norm_report(wn.apply_weight_norm(net, batch, init_scale=np.float32(0.5)))
    assert json.loads(json.dumps(numpy_scale.to_dict()))["options"] == {"init_scale": 0.5}


def test_the_cli_answers_help_and_version() -> None:
    version = subprocess.run([sys.executable, "-m", "wn_transform.cli", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"wn-transform {wn.__version__}"
    help_text = subprocess.run([sys.executable, "-m", "wn_transform.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: wn-transform" in help_text.stdout


class _ComplexHead(nn.Module):
    """A real layer, then a complex one (a spectral model's head)."""

    def __init__(self) -> None:
        super().__init__()
        self.real = nn.Linear(4, 3)
        self.complex = nn.Linear(3, 2, dtype=torch.cfloat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.complex(self.real(x).to(torch.cfloat))


def test_complex_weights_are_skipped_with_their_dtype_and_the_real_ones_converted() -> None:
    """``g = ||w||`` and the data init's mean and std are defined for real weights: a complex layer
    is reported, not converted (a complex ``g`` would lose its imaginary part)."""
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    model = wn.apply_weight_norm(_ComplexHead(), x)
    report = wn.weight_norm_report(model).to_dict()
    assert [t["name"] for t in report["converted"]] == ["real.weight"]
    assert [(s["name"], "complex64" in s["reason"]) for s in report["skipped"]] == [("complex.weight", True)]
    out = model.real(x)
    torch.testing.assert_close(out.std(0, correction=0), torch.ones(3), atol=1e-5, rtol=0)
    with pytest.raises(wn.NoTargetsError, match="complex64 weight"):
        wn.apply_weight_norm(nn.Linear(4, 3, dtype=torch.cfloat), x.to(torch.cfloat))


def test_preserve_gives_all_zero_units_a_direction_so_a_zero_initialized_layer_trains() -> None:
    """A zero-initialized last layer (Fixup, ControlNet's zero convs) or a pruned unit: ``g = ||w|| = 0``
    with ``v = w = 0`` would get no gradient ever.  Each such unit's ``v`` becomes a random unit
    direction with ``g = 0``: the function is kept (``w = 0``), the report says so, and the layer
    trains as the plain one does (its weights leave 0 after one step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Conv1d(6, 3, 1))
    with torch.no_grad():
        model[2].weight.zero_()
        model[0].weight[1] = 0
    x = torch.randn(16, 8, 1)
    out = wn.apply_weight_norm(model, init="preserve", generator=torch.Generator().manual_seed(1))
    report = wn.weight_norm_report(out)
    assert report.zero_units == {"0.weight": 1, "2.weight": 3}
    assert "2.weight: 3 units all zero" in str(report)
    xs = x.transpose(1, 2).squeeze(1)

    def forward(m: nn.Module) -> torch.Tensor:
        return m[2](m[1](m[0](xs)).unsqueeze(-1))

    torch.testing.assert_close(forward(out), forward(model))
    assert torch.equal(out[2].weight, torch.zeros(3, 6, 1)) and torch.equal(out[0].weight[1], torch.zeros(8))
    v = out[2].parametrizations.weight.original1
    torch.testing.assert_close(v.flatten(1).norm(dim=1), torch.ones(3))
    optimizer = torch.optim.SGD(out.parameters(), lr=0.1)
    forward(out).square().sum().neg().backward()
    optimizer.step()
    assert bool((out[2].weight.abs().flatten(1).amax(1) > 0).all())
    assert wn.weight_norm_report(wn.apply_weight_norm(nn.Linear(4, 2), init="preserve")).zero_units == {}


class _LoRA(nn.Module):
    """A frozen-free LoRA adapter: ``base(x) + B(A(x))`` with ``B`` zero-initialized (the branch starts at 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.base, self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2, bias=False), nn.Linear(2, 8, bias=False)
        nn.init.zeros_(self.b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.b(self.a(x))


def test_the_data_init_gives_a_zero_initialized_layer_g_zero_so_its_first_step_is_small() -> None:
    """The data init cannot standardize a zero direction (a constant unit).  With a finite ``g`` and
    ``v = 0``, the first step's tiny ``v`` would make a full-norm weight (LoRA's ``B`` jumping from 0
    to rows of norm ``g``, whatever the learning rate).  It gets ``g = 0`` and a unit direction, as in
    preserve mode: the branch stays 0 at init and moves by O(lr) in the first step."""
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    model = wn.apply_weight_norm(_LoRA(), x, generator=torch.Generator().manual_seed(0))
    chain = model.b.parametrizations.weight
    report = wn.weight_norm_report(model)
    assert report.zero_units == {"b.weight": 8}
    assert report.notes.constant_units == {} and "constant on the batch" not in str(report)  # one note, the true one
    assert torch.equal(chain.original0, torch.zeros(8, 1)) and torch.equal(model.b.weight, torch.zeros(8, 2))
    torch.testing.assert_close(chain.original1.norm(dim=1), torch.ones(8))
    before = model(x).detach()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    (model(x) - 1).square().mean().backward()
    optimizer.step()
    branch = model.b(model.a(x)).detach()
    assert 0 < float(branch.abs().max()) < 1e-3, "the branch moves by O(lr), not to a full-norm weight"
    assert float((model(x) - before).abs().max()) < 1e-2


def test_preserve_applies_to_a_meta_model_whose_weights_are_loaded_later() -> None:
    """The large-model recipe the data init's meta-device error recommends: build on meta, apply with
    ``init="preserve"``, load the weights with ``assign=True``: the same function as loading first."""
    torch.manual_seed(0)
    plain = _LoRA()
    with torch.device("meta"):
        meta = _LoRA()
    model = wn.apply_weight_norm(meta, init="preserve")
    assert model.b.parametrizations.weight.original1.is_meta
    model.load_state_dict(plain.state_dict(), assign=True)
    x = torch.randn(4, 8)
    torch.testing.assert_close(model(x), plain(x))


def test_an_optimizer_made_before_an_in_place_apply_is_warned_of_at_its_first_step() -> None:
    """It holds the weights that g and v replaced: its steps would train nothing the model uses."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    wn.apply_weight_norm(model, init="preserve", inplace=True)
    late = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    with pytest.warns(UserWarning, match=r"this SGD steps 2 weights that apply_weight_norm replaced .* create the "
                                         r"optimizer after apply_weight_norm") as caught:
        early.step()
    assert caught[0].filename == __file__  # points at the step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        early.step()  # once per optimizer
        late.step()  # made after apply: nothing to say
        plain = nn.Linear(4, 3)  # a model weight-normalized on a copy keeps its weights, and trains them
        wn.apply_weight_norm(plain, init="preserve")
        plain(torch.randn(5, 4)).sum().backward()
        torch.optim.SGD(plain.parameters(), lr=0.1).step()


def test_an_optimizer_of_the_model_given_stepped_for_the_returned_copy_is_warned_of() -> None:
    """``model = wn.apply_weight_norm(model, batch)`` returns a copy: an optimizer made before on the
    model given gets no gradient while the copy does, and would train nothing; its step says so.
    One that trains the model given (it has gradients), a warm-up step before any backward, and an
    optimizer stepped while a folded copy validates (fold's copy is for inference) say nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    trained = torch.optim.SGD(model.parameters(), lr=0.1)
    returned = wn.apply_weight_norm(model, init="preserve")
    unused = wn.apply_weight_norm(model, init="preserve")  # a second copy, kept unused: the first is trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        early.step()  # a warm-up step: nothing has a gradient yet
    returned(torch.randn(5, 4)).sum().backward()
    assert unused is not returned
    with pytest.warns(UserWarning, match=r"this SGD steps the Parameters of the model apply_weight_norm copied, and none "
                                         r"of them has a gradient while the copy it returned has: .* create the optimizer "
                                         r"from the returned model's"):
        early.step()
    head = nn.Linear(2, 2)  # an optimizer that also holds new parameters, and zeros left by zero_grad(set_to_none=False)
    mixed = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    head(returned(torch.randn(5, 4))).sum().backward()
    wn.apply_weight_norm(nn.Linear(2, 2), init="preserve")  # (a mark elsewhere: every optimizer looks again)
    with pytest.warns(UserWarning, match="steps the Parameters of the model apply_weight_norm copied"):
        mixed.step()
    for p in model.parameters():
        p.grad = None
    model(torch.randn(5, 4)).sum().backward()  # the model given, trained on purpose
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained.step()
        torch.optim.SGD(returned.parameters(), lr=0.1).step()
        frozen_head = torch.optim.SGD(returned[2].parameters(), lr=0.1)  # a fold to validate, a head without gradients
        returned.zero_grad()
        returned[0](torch.randn(5, 4)).sum().backward()
        wn.fold_weight_norm(returned)
        frozen_head.step()


def test_overlapping_runs_of_the_library_put_the_compile_stance_and_warning_filters_back() -> None:
    """``compiled_code_eager`` changes process-wide settings (dynamo's stance, a warnings filter):
    calls that overlap (threads: A in, B in, A out, B out) leave them as the first found them."""
    import contextlib
    import warnings

    from torch._dynamo import eval_frame  # (the stance is set only where dynamo is loaded)

    from wn_transform.batch import compiled_code_eager

    filters, stance = list(warnings.filters), eval_frame._stance.stance
    first, second = contextlib.ExitStack(), contextlib.ExitStack()
    first.enter_context(compiled_code_eager())
    assert eval_frame._stance.stance == "force_eager"
    second.enter_context(compiled_code_eager())
    first.close()
    assert eval_frame._stance.stance == "force_eager"  # the second call is still running
    second.close()
    assert eval_frame._stance.stance == stance and warnings.filters == filters


def test_a_failed_inplace_apply_leaves_no_replaced_mark_on_the_restored_weights() -> None:
    """The optimizer warning about weights replaced by g and v must not fire for a model that a
    failed in-place apply put back as it was (its weights are the model's again)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(8, 4)
    x[0, 0] = float("inf")  # passes the NaN check, then the init measures a non-finite std
    with pytest.raises(wn.WeightNormError, match="non-finite mean or std"):
        wn.apply_weight_norm(model, x, inplace=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    # and the warning still fires for a weight a successful apply did replace
    replaced = model[0].weight
    stale = torch.optim.SGD([replaced], lr=0.1)
    wn.apply_weight_norm(model, inplace=True)
    replaced.grad = torch.ones_like(replaced)
    with pytest.warns(UserWarning, match="replaced by g and v"):
        stale.step()


def test_an_optimizer_of_replaced_parameters_warns_after_any_replacement_not_only_at_its_first_step() -> None:
    """An optimizer that stepped plain weights before an in-place apply (while other models were
    weight-normalized earlier in the process), or g and v before an in-place fold, trains nothing
    the model uses from then on: its next step warns, naming what replaced them."""
    torch.manual_seed(0)
    wn.apply_weight_norm(nn.Linear(4, 4), init="preserve")  # weight norm was used before in this process
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)

    def step() -> None:
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step()  # plain training: no warning
    wn.apply_weight_norm(model, x, inplace=True)
    with pytest.warns(UserWarning, match=r"this SGD steps 2 weights that apply_weight_norm replaced by g and v"):
        step()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step()
    wn.fold_weight_norm(model, inplace=True)
    with pytest.warns(UserWarning, match=r"this SGD steps 4 g and v parameters that fold_weight_norm replaced by "
                                         r"plain weights: .* create the optimizer after fold_weight_norm"):
        step()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step()
        wn.fold_weight_norm(wn.apply_weight_norm(nn.Linear(4, 4), init="preserve"))  # others' copies: no warning
        step()
    backbone = nn.Linear(4, 4)  # progressive unfreezing: a group added after the replacement and first steps
    held = list(backbone.parameters())
    wn.apply_weight_norm(backbone, init="preserve", inplace=True)
    step()
    optimizer.add_param_group({"params": held})
    scaler = torch.amp.GradScaler("cpu")
    optimizer.zero_grad()
    scaler.scale(model(x).square().sum()).backward()
    with pytest.warns(UserWarning, match=r"this SGD steps 1 weight that apply_weight_norm replaced") as record:
        scaler.step(optimizer)  # the warning points at this line, not into torch.amp
    assert record[0].filename == __file__


def test_importing_the_library_does_not_load_dynamo() -> None:
    """torch loads without dynamo; importing it (``torch.compiler.disable`` does) costs 0.7 s more."""
    code = "import sys, torch, wn_transform; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def _compiled_graphs(model: nn.Module, calls) -> int:  # noqa: ANN001 - calls: the compiled model -> None
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    calls(torch.compile(model, backend="eager", dynamic=True))
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return graphs


def test_compiling_adds_no_graph_per_batch_size() -> None:
    """Under torch.compile(dynamic=True), a Linear too small for the output form adds no guard on the
    batch size (no recompile per size threshold)."""
    widths = [4, 8, 16, 32, 64, 128, 8]

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])])

    def sizes(compiled: nn.Module) -> None:
        for rows in (2, 3, 5, 9, 17, 33, 65, 129):
            compiled(torch.randn(rows, 4)).sum().backward()

    assert _compiled_graphs(wn.apply_weight_norm(mlp(), init="preserve"), sizes) == _compiled_graphs(mlp(), sizes)


def test_compiling_adds_no_graph_where_the_rows_leave_the_native_kernels_range() -> None:
    """A Linear trained at 16 rows then 4 takes the output form both times: the native kernels'
    row test (which never runs under a compiler) adds no guard on the batch size."""
    def layer() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(512, 512))

    def sizes(compiled: nn.Module) -> None:
        for rows in (16, 4):
            compiled(torch.randn(rows, 512)).sum().backward()

    assert _compiled_graphs(wn.apply_weight_norm(layer(), init="preserve"), sizes) == _compiled_graphs(layer(), sizes) == 1


def test_a_compiled_optimizer_step_trains_the_weight_normalized_model() -> None:
    """``torch.compile(optimizer.step)`` (torch's compiled-optimizer recipe) traces the global step
    hook the library registers: it compiles, every step trains g and v, and the eval-mode weights
    that follow are the new ones (a plain model's compiled step works beside it too)."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), init="preserve")
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = torch.compile(optimizer.step, backend="eager")
    torch._dynamo.reset()
    try:
        for _ in range(3):
            with torch.no_grad():
                before = model.eval()(x)  # fills the eval-mode weight cache
            optimizer.zero_grad()
            F.cross_entropy(model.train()(x), y).backward()
            step()
            with torch.no_grad():
                after = model.eval()(x)
                torch.testing.assert_close(after, wn.fold_weight_norm(model)(x), rtol=1e-6, atol=1e-6)
            assert not torch.equal(after, before)
        plain = nn.Linear(8, 3)
        plain_step = torch.compile(torch.optim.Adam(plain.parameters()).step, backend="eager")
        plain(x).sum().backward()
        plain_step()
    finally:
        torch._dynamo.reset()


def test_options_of_the_data_init_with_init_preserve_are_an_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(wn.WeightNormError, match=r"init_scale sets the data-dependent init, and init='preserve' keeps"):
        wn.apply_weight_norm(model, init="preserve", init_scale=0.5)
    with pytest.raises(wn.WeightNormError, match=r"init_scale, exact_init set the data-dependent init"):
        wn.apply_weight_norm(model, init="preserve", init_scale=0.5, exact_init=True)
    assert not wn.find_weight_norms(model)


def test_a_second_apply_with_mean_only_bn_keeps_the_first_norm() -> None:
    """existing='convert' with mean_only_bn=True on a model that has mean-only batch norms: each layer
    keeps its one norm (a second would centre twice), the data init sets it anew, init='preserve'
    keeps the function in both modes, and discovery traces the layers as before (the norm's hook
    is not run on fx's Proxies)."""
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    once = wn.apply_weight_norm(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), x, mean_only_bn=True)
    twice = wn.apply_weight_norm(once, x + 1, existing="convert", mean_only_bn=True)
    assert len(twice[0]._forward_hooks) == 1 and len(twice[2]._forward_hooks) == 1
    twice.eval()
    with torch.no_grad():
        torch.testing.assert_close(twice(x + 1), wn.fold_weight_norm(twice)(x + 1))
        assert float(twice[0](x + 1).mean(0).abs().max()) < 1e-4
    kept = wn.apply_weight_norm(once, existing="convert", mean_only_bn=True)
    report = wn.weight_norm_report(kept)
    assert report.found_by == "symbolic_trace" and report.mean_only_bn == ["0", "2"] and not report.mean_only_bn_missing
    for mode in (True, False):
        once.train(mode)
        kept.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(kept(x), once(x))


def test_the_float16_warning_names_the_gain_a_data_init_set_not_the_directions_norm() -> None:
    """After a data init g is not ||v||: the warning names g = ||w||, the norm that overflowed."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(300, 2)), torch.randn(64, 300) * 1e-5)
    g = float(model[0].parametrizations.weight.original0.max())
    assert g > 65504 > float(torch.linalg.vector_norm(model[0].parametrizations.weight.original1, dim=1).max())
    with pytest.warns(UserWarning, match=rf"a unit's norm g = \|\|w\|\| = {g:g} is beyond torch.float16's range"):
        model.half()


def test_converting_a_layer_with_weight_norm_and_another_parametrization_to_float16_works() -> None:
    """The float16 check looks at weight norm's g alone: a parametrization on the bias has none."""
    class _Clamp(nn.Module):
        def forward(self, b: torch.Tensor) -> torch.Tensor:
            return b.clamp(-1, 1)

    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(4, 3)), init="preserve")
    parametrize.register_parametrization(model[0], "bias", _Clamp())
    x = torch.randn(2, 4)
    want = model(x)
    model.half()
    torch.testing.assert_close(model(x.half()).float(), want, rtol=1e-2, atol=1e-2)


class _ScaledLinear(nn.Linear):
    """A layer with a tensor attribute of its own, converted by its ``_apply(self, fn)`` (the form
    torch calls on children, and that third-party layers write)."""

    def __init__(self, *args: int) -> None:
        super().__init__(*args)
        self.scale = torch.ones(())

    def _apply(self, fn):  # noqa: ANN001, ANN202 - the signature under test
        super()._apply(fn)
        self.scale = fn(self.scale)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


def test_a_layer_whose_apply_takes_fn_alone_converts_after_weight_norm() -> None:
    model = wn.apply_weight_norm(nn.Sequential(_ScaledLinear(4, 2)), init="preserve")
    model.double()
    assert model[0].scale.dtype == torch.float64 and model[0].parametrizations.weight.original1.dtype == torch.float64
    model(torch.randn(3, 4, dtype=torch.float64))


def test_existing_convert_leaves_a_weight_norm_stacked_with_another_parametrization() -> None:
    """It cannot be folded alone: it is left as it is, reported, and a rule may still exclude it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    torch_weight_norm(model[0])
    parametrize.register_parametrization(model[0], "weight", _Twice())
    torch_weight_norm(model[2])
    x = torch.randn(8, 4)
    for exclude in (None, "0.weight"):
        out = wn.apply_weight_norm(model, x, existing="convert", exclude=exclude)
        assert [t.qualname for t in wn.weight_norm_report(out).converted] == ["2.weight"]
        reason = next(s.reason for s in wn.weight_norm_report(out).skipped if s.qualname == "0.weight")
        assert reason == ("computed by another parametrization (_WeightNorm, _Twice); weight norm on top of it is not "
                          "supported; its torch.nn.utils.parametrizations.weight_norm is kept")
        assert len(out[0].parametrizations.weight) == 2


class _Twice(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_converting_a_weight_normalized_model_to_float16_warns_of_a_norm_beyond_its_range() -> None:
    """Every element of the weight fits in float16, their norm (96000) does not: g becomes inf and
    the layer would compute NaN.  apply_weight_norm on the float16 model refuses it; .half() after
    apply warns, naming the layer, at the user's line."""
    layer = nn.Linear(1024, 4)
    with torch.no_grad():
        layer.weight.fill_(3000.0)  # row norm 3000 * 32 = 96000 > 65504
    model = wn.apply_weight_norm(nn.Sequential(layer, copy.deepcopy(layer)), init="preserve")
    with pytest.warns(UserWarning, match=r"0.weight \(Linear\(in_features=1024, out_features=4, bias=True\)\): a "
                                         r"unit's norm g = \|\|w\|\| = 96000 is beyond torch.float16's range") as record:
        model.half()
    assert record[0].filename == __file__
    assert [str(r.message).split(" ")[0] for r in record] == ["0.weight", "1.weight"]  # one per layer, by its path
    assert torch.isinf(model[0].parametrizations.weight.original0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.float()
        model.bfloat16()  # fits: no warning
        wn.apply_weight_norm(nn.Sequential(nn.Linear(1024, 4)), init="preserve").half()
        wn.apply_weight_norm(nn.Sequential(layer), init="preserve", exp_scale=True).half()  # s = log g fits


def test_rules_that_match_only_weights_kept_with_their_weight_norm_are_satisfied(net: Net) -> None:
    """existing='keep': a rule is checked against the kept weights too, so applying twice with the
    same rules is no error, while a rule that matches nothing at all still is, even when every
    weight already has weight norm."""
    once = wn.apply_weight_norm(net, include="conv")
    twice = wn.apply_weight_norm(once, include="conv")
    assert wn.weight_norm_report(twice).converted == []  # up and head: left out by the rule, as the first time
    assert {s.qualname: s.reason for s in wn.weight_norm_report(twice).skipped}["head.weight"] == "not matched by include"
    assert "already weight-normalized" in {s.qualname: s.reason for s in wn.weight_norm_report(twice).skipped}["conv.weight"]
    everything = wn.apply_weight_norm(net)
    with pytest.raises(wn.SelectionError, match="include pattern 'decoder.*' matches none of the weights found "
                                                r"\(conv.weight, up.weight, head.weight\)"):
        wn.apply_weight_norm(everything, include="decoder.*")
    with pytest.raises(wn.SelectionError, match="types entry Embedding matches none"):
        wn.apply_weight_norm(everything, types=nn.Embedding)
    assert wn.weight_norm_report(wn.apply_weight_norm(everything, types=nn.Linear)).converted == []


class _TinyLM(nn.Module):
    """An embedding, a block and an output layer, the output tied to the embedding or not."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.block = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 16, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.block(self.embed(ids))))


@pytest.mark.parametrize("tied", [False, True])
def test_an_exclude_rule_for_a_weight_left_alone_anyway_is_satisfied(tied: bool) -> None:
    """``exclude="lm_head"`` serves a tied and an untied model alike: where the head is tied to
    the embedding it is skipped already (reported as tied), and the rule matches it; an include
    rule that matches only such a weight is an error that says why it is left alone."""
    ids = torch.randint(0, 16, (4, 6))
    report = wn.weight_norm_report(wn.apply_weight_norm(_TinyLM(tied), ids, exclude="lm_head"))
    assert [t.qualname for t in report.converted] == ["block.weight"]
    reasons = {s.qualname: s.reason for s in report.skipped}
    if tied:  # reported under its first name
        assert reasons["embed.weight"].startswith("tied: the same Parameter is also lm_head.weight")
        with pytest.raises(wn.SelectionError, match=r"include pattern 'lm_head' matches only weights that are left "
                                                    r"as they are \(embed.weight: tied.*\); the weights found to "
                                                    r"normalize are block.weight"):
            wn.apply_weight_norm(_TinyLM(tied), ids, include="lm_head")
    else:
        assert reasons["lm_head.weight"] == "matched by exclude"
    with pytest.raises(wn.SelectionError, match="exclude pattern 'decoder' matches none of the weights found"):
        wn.apply_weight_norm(_TinyLM(tied), ids, exclude="decoder")


def test_the_could_not_trace_warning_points_at_the_callers_line() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # symbolic_trace fails; no batch for the others

    for call in (wn.apply_weight_norm, wn.plan_weight_norm):
        with pytest.warns(UserWarning, match="could not trace Branchy") as caught:
            call(Branchy())
        assert [w.filename for w in caught if "could not trace" in str(w.message)] == [__file__]


def test_a_bug_in_resolving_a_trace_is_raised_not_taken_for_a_tracing_failure(net: Net, batch: torch.Tensor,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the tracers' failures move down the discovery ladder; the library's own code after a
    trace raises as it is."""
    from wn_transform import uses

    resolve, calls = uses.UseLog.resolve, []

    def broken_once(self, found_by):  # the next discovery step would succeed
        calls.append(found_by)
        if len(calls) == 1:
            raise KeyError("resolve broke")
        return resolve(self, found_by)

    monkeypatch.setattr(uses.UseLog, "resolve", broken_once)
    with pytest.raises(KeyError, match="resolve broke"):
        wn.apply_weight_norm(net, batch)


def test_a_half_precision_unit_whose_norm_overflows_its_dtype_is_refused_with_its_layer() -> None:
    """g = ||w|| beyond float16's range would be inf and make the layer compute NaN."""
    model = nn.Sequential(nn.Linear(4096, 4)).half()
    with torch.no_grad():
        model[0].weight.fill_(1100.0)  # every element finite, each row's norm 70400 > 65504
    with pytest.raises(wn.WeightNormError, match=r"^0.weight: a unit's norm g = \|\|w\|\| = 70[\d.]+ is beyond torch.float16's range"):
        wn.apply_weight_norm(model)
    x = torch.randn(3, 4096, dtype=torch.half) / 64
    as_exp = wn.apply_weight_norm(model, exp_scale=True)  # s = log ||w|| fits, and e^s is taken in float32
    torch.testing.assert_close(as_exp(x), model(x), rtol=1e-2, atol=1.0)  # (s in float16: e^s within 0.4 %)
    torch.testing.assert_close(wn.fold_weight_norm(as_exp)(x), as_exp(x), rtol=1e-2, atol=1.0)
    resampled = wn.apply_weight_norm(model, torch.randn(64, 4096, dtype=torch.half), resample=True)  # g from the init
    assert bool(resampled(x).isfinite().all())
    model[0].weight.requires_grad_(False)  # a frozen layer keeps g = ||w||, whatever the init
    with pytest.raises(wn.WeightNormError, match=r"^0.weight: a unit's norm"):
        wn.apply_weight_norm(model, torch.randn(64, 4096, dtype=torch.half))
    model[0].weight.requires_grad_(True)
    target = wn.apply_weight_norm(nn.Sequential(nn.Linear(4096, 4)).half())
    with pytest.raises(wn.WeightNormError, match=r"^0.weight: a unit's norm"):
        target.load_state_dict(model.state_dict())
    model[0].weight.data.fill_(1.0)  # in range: the same function
    assert torch.equal(wn.fold_weight_norm(wn.apply_weight_norm(model))(x), model(x))


def test_distributed_true_without_torch_distributed_is_a_clear_error(net: Net, batch: torch.Tensor) -> None:
    with pytest.raises(wn.WeightNormError, match="distributed=True, but torch.distributed is not initialized"):
        wn.apply_weight_norm(net, batch, distributed=True)


class _MambaMixer(nn.Module):
    """HF Mamba's slow path: the depthwise conv's weight viewed by its own sizes, then a unit axis put back."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.conv1d = nn.Conv1d(8, 8, 4, groups=8, padding=3)
        self.out_proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv1d.weight
        if self.spelling == "size":
            w = w.view(w.size(0), w.size(2))
        elif self.spelling == "shape":
            w = w.view(w.shape[0], w.shape[2])
        else:
            w = w.view(w.size()[0], -1)
        y = F.conv1d(F.pad(x, (3, 0)), w.unsqueeze(1), self.conv1d.bias, groups=8)
        return self.out_proj(F.silu(y).transpose(1, 2))


@pytest.mark.parametrize("spelling", ["size", "shape", "size()[i]"])
def test_a_weight_viewed_by_its_own_sizes_is_found_by_the_symbolic_trace(spelling: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 8, 12)
    model = _MambaMixer(spelling)
    out = wn.apply_weight_norm(model, x)
    report = wn.weight_norm_report(out)
    assert report.found_by == "symbolic_trace"
    assert {t.qualname: t.found_by for t in report.converted} == {"conv1d.weight": "symbolic_trace",
                                                                  "out_proj.weight": "symbolic_trace"}
    with torch.no_grad():  # the data init standardized the conv's pre-activations on the batch
        pre = F.conv1d(F.pad(x, (3, 0)), out.conv1d.weight, out.conv1d.bias, groups=8)
    torch.testing.assert_close(pre.mean((0, 2)), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(pre.std((0, 2), unbiased=False), torch.ones(8), atol=1e-4, rtol=0)



@pytest.mark.parametrize(("message", "expected"), [
    ("Found the following conflicts:\n- axis 1 is static\nmore", "RuntimeError: Found the following conflicts: - axis 1 is static"),
    ("output 1 (3\n[ torch.LongTensor{} ]) of traced region\nnext", "RuntimeError: output 1 (3 [ torch.LongTensor{} ]) of traced region"),
    ("kernel failed :(\nTraceback (most recent call last):\n  File \"x.py\"", "RuntimeError: kernel failed :("),
    ("\x1b[31mred\x1b[0m text\nsecond", "RuntimeError: red text"),
])
def test_one_line_errors_keep_what_a_line_announces_and_no_more(message: str, expected: str) -> None:
    from wn_transform.errors import first_line

    assert first_line(RuntimeError(message)) == expected
    long = first_line(RuntimeError("Unexpected keys:\n" + ", ".join(f"layer{i}.weight" for i in range(2000))))
    assert len(long) == 400 and long.endswith("...")


def test_the_report_of_a_copy_is_a_clear_weight_norm_error(net: Net) -> None:
    out = wn.apply_weight_norm(net)
    with pytest.raises(wn.WeightNormError, match="is a copy of a model that did .*plan_weight_norm"):
        wn.weight_norm_report(copy.deepcopy(out))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_an_fx_tracer_that_enters_an_exp_scale_layer_computes_what_the_layer_does(dtype: torch.dtype) -> None:
    """e^s in float32 for a half-precision s, in s's own precision above: one recorded call."""

    class Enter(torch.fx.Tracer):
        def is_leaf_module(self, module: nn.Module, name: str) -> bool:
            return False

    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(64, 4)).to(dtype), exp_scale=True)
    if dtype == torch.float16:
        with torch.no_grad():
            model[0].parametrizations.weight.original0.fill_(11.5)  # e^s = 98700: beyond float16, the weight is not
    traced = torch.fx.GraphModule(model, Enter().trace(model))
    x = torch.randn(3, 64, dtype=dtype) / 64
    with torch.no_grad():
        expected, got = model(x), traced(x)
    assert bool(got.isfinite().all())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class _MaskedConv(nn.Module):
    """PixelCNN's causal conv kept causal by a mask on its gradient: the masked taps start at 0 and
    the hook keeps them there."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 2, 1)
        mask = torch.ones_like(self.conv.weight)
        mask[:, :, 1, 2:] = 0
        mask[:, :, 2:] = 0
        with torch.no_grad():
            self.conv.weight.mul_(mask)
        self.conv.weight.register_hook(lambda grad: grad * mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)))


@pytest.mark.parametrize("inplace", [False, True])
def test_a_weight_with_a_gradient_hook_keeps_it_and_is_left_alone(inplace: bool) -> None:
    """g and v replacing the weight would drop its hook, and training would fill the masked taps
    (the model would see the pixel it predicts): the weight is skipped with that reason, in the copy
    too (whose deepcopy would lose the hook), and its taps stay 0 through training."""
    torch.manual_seed(0)
    model = _MaskedConv()
    masked = model.conv.weight.detach() == 0
    x = torch.randn(8, 2, 6, 6)
    out = wn.apply_weight_norm(model, x, inplace=inplace)
    report = wn.weight_norm_report(out)
    assert [t.qualname for t in report.converted] == ["head.weight"]
    assert "1 gradient hook (register_hook" in {s.qualname: s.reason for s in report.skipped}["conv.weight"]
    start = out.conv.weight.detach().clone()
    optimizer = torch.optim.SGD(out.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        out(x).square().mean().backward()
        optimizer.step()
    assert bool((out.conv.weight[masked] == 0).all())  # the mask held
    assert bool((out.conv.weight[~masked] != start[~masked]).any())  # the other taps trained


def test_a_transposed_tie_is_skipped_and_named_as_one() -> None:
    """An autoencoder whose decoder reads the encoder's weight transposed: one weight with two unit
    axes, which one g cannot serve; the reason says so in words (not a dataclass's repr)."""

    class TiedAutoencoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(8, 3)
            self.dec_bias = nn.Parameter(torch.zeros(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(torch.relu(self.enc(x)), self.enc.weight.t(), self.dec_bias)

    with pytest.raises(wn.NoTargetsError, match=re.escape(
            "enc.weight: read with different output-unit axes (dim 0, dim 1) (the weight and its transpose: a "
            "transposed tie, as an autoencoder's decoder)")):
        wn.apply_weight_norm(TiedAutoencoder(), torch.randn(16, 8))


def test_a_layer_pruned_by_torch_is_skipped_with_pruning_named_and_the_way_out() -> None:
    from torch.nn.utils import prune

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    report = wn.plan_weight_norm(model, torch.randn(8, 4))
    (skipped,) = report.skipped
    assert skipped.qualname == "0.weight" and skipped.reason.startswith(
        "pruned by torch.nn.utils.prune (L1Unstructured: weight is weight_orig times a mask); call "
        "prune.remove(module, 'weight') first, or apply weight norm first and prune its direction")
