"""Folding: every layout of weight norm back to plain weights, the same function, nothing broken."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

import wn_transform as wn
from tests.fixtures.weight_norm import legacy_weight_norm, perturb_scales

LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (4, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 6, 4, stride=2), (2, 4, 7)),
}
DIMS = {"linear": [0, 1, None], "conv1d": [0, 1, 2, None], "conv_transpose1d": [0, 1, 2, None]}
CASES = [(layer, dim) for layer, dims in DIMS.items() for dim in dims]


@pytest.mark.parametrize("make", ["parametrizations", "legacy"])
@pytest.mark.parametrize(("layer", "dim"), CASES, ids=[f"{layer}-dim{dim}" for layer, dim in CASES])
def test_fold_undoes_torchs_weight_norm_in_both_layouts(make: str, layer: str, dim: int | None) -> None:
    torch.manual_seed(0)
    factory, shape = LAYERS[layer]
    module = factory()
    normalized = torch_weight_norm(module, dim=dim) if make == "parametrizations" else legacy_weight_norm(module, dim=dim)
    model = perturb_scales(nn.Sequential(normalized))
    x = torch.randn(shape)
    expected = model(x)
    folded = wn.fold_weight_norm(model)
    torch.testing.assert_close(folded(x), expected)
    assert list(folded.state_dict()) == ["0.weight", "0.bias"]
    assert type(folded[0]) is type(factory())
    assert isinstance(folded[0].weight, nn.Parameter) and folded[0].weight.requires_grad
    torch.testing.assert_close(model(x), expected)  # the original still works


def test_folding_a_deepcopy_does_not_break_the_original() -> None:
    """torch's remove_parametrizations on a deepcopy deletes the property from the shared
    generated class and the original raises AttributeError; our fold must not."""
    torch.manual_seed(0)
    model = nn.Sequential(torch_weight_norm(nn.Linear(4, 3)), nn.Tanh(), wn.apply_weight_norm(nn.Linear(3, 2), init="preserve"))
    x = torch.randn(5, 4)
    expected = model(x)
    replica = copy.deepcopy(model)
    assert type(replica[0]) is type(model[0])  # the generated class really is shared
    wn.fold_weight_norm(replica, inplace=True)
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(replica(x), expected)
    assert parametrize.is_parametrized(model[0]) and not parametrize.is_parametrized(replica[0])


def test_fold_of_apply_is_the_identity_in_preserve_mode_and_keeps_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 4, 2, groups=2))
    x = torch.randn(4, 3, 8, 8)
    normalized = wn.apply_weight_norm(model, init="preserve")
    torch.testing.assert_close(wn.fold_weight_norm(normalized)(x), model(x))
    optimizer = torch.optim.SGD(normalized.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        normalized(x).pow(2).mean().backward()
        optimizer.step()
    trained = normalized(x)
    assert not torch.allclose(trained, model(x))
    torch.testing.assert_close(wn.fold_weight_norm(normalized)(x), trained)


def test_legacy_layer_after_a_forward_with_grad_can_be_folded_without_touching_it() -> None:
    """copy.deepcopy refuses such a model (its weight is a non-leaf attribute)."""
    model = nn.Sequential(legacy_weight_norm(nn.Linear(3, 3)))
    x = torch.randn(2, 3)
    model(x).sum().backward()
    with pytest.raises(RuntimeError):
        copy.deepcopy(model)
    folded = wn.fold_weight_norm(model)
    torch.testing.assert_close(folded(x), model(x))
    assert hasattr(model[0], "weight_g")


def test_other_parametrizations_survive_folding() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    torch_weight_norm(layer)
    parametrize.register_parametrization(layer, "bias", _Double())
    x = torch.randn(3, 4)
    expected = layer(x)
    folded = wn.fold_weight_norm(layer)
    torch.testing.assert_close(folded(x), expected)
    assert parametrize.is_parametrized(folded, "bias") and not parametrize.is_parametrized(folded, "weight")
    assert isinstance(folded.weight, nn.Parameter)


def test_weight_norm_stacked_with_another_parametrization_is_a_clear_error() -> None:
    layer = torch_weight_norm(nn.Linear(4, 4))
    parametrize.register_parametrization(layer, "weight", _Double())
    with pytest.raises(wn.FoldError, match="stacked"):
        wn.fold_weight_norm(layer)
    model = nn.Sequential(wn.apply_weight_norm(nn.Linear(4, 4), init="preserve"), layer)
    with pytest.raises(wn.FoldError, match=r"cannot fold 1\.weight: weight norm is stacked"):
        wn.fold_weight_norm(model, inplace=True)
    assert [f.qualname for f in wn.find_weight_norms(model)] == ["0.weight", "1.weight"]  # nothing folded
    assert parametrize.is_parametrized(model[0], "weight")


@pytest.mark.parametrize("inplace", [False, True])
def test_a_folded_lstm_scripts_to_the_same_function(inplace: bool) -> None:
    """An RNN keeps a list of its weights, which TorchScript never refreshes: the fold rebuilds it."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    model = wn.apply_weight_norm(nn.Sequential(nn.LSTM(4, 8, batch_first=True)), x)
    folded = wn.fold_weight_norm(model, inplace=inplace)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(folded)(x)[0], folded(x)[0], rtol=0, atol=0)


def test_a_graph_module_is_copied_and_folded() -> None:
    """Each torch.fx.GraphModule has a class of its own (GraphModuleImpl), which its copy does not share."""
    torch.manual_seed(0)
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    x = torch.randn(16, 4)
    model = wn.apply_weight_norm(traced, x)
    folded = wn.fold_weight_norm(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


def test_fold_refuses_a_non_module() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        wn.fold_weight_norm({"weight": torch.zeros(2)})


class _Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_the_exponential_scale_folds_the_same_way() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 6, 3), nn.ReLU(), nn.ConvTranspose1d(6, 4, 2, groups=2), nn.Flatten(), nn.Linear(16, 2))
    x = torch.randn(8, 3, 5)
    normalized = wn.apply_weight_norm(model, x, exp_scale=True)
    optimizer = torch.optim.SGD(normalized.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        normalized(x).pow(2).mean().backward()
        optimizer.step()
    folded = wn.fold_weight_norm(normalized)
    torch.testing.assert_close(folded(x), normalized(x))
    assert not any("g_is_log" in key or "parametrizations" in key for key in folded.state_dict())


class ForwardsAttributes(nn.Module):
    """A wrapper whose ``__getattr__`` passes unknown names to the layer it holds (``self.weight``
    works), ``__deepcopy__`` and ``parametrizations`` included."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 3)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(nn.Module.__getattr__(self, "layer"), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_a_wrapper_that_forwards_attributes_to_its_layer_is_not_taken_for_the_layer(tmp_path: Path) -> None:
    """torch's ``is_parametrized`` reads ``parametrizations`` through ``__getattr__``: the wrapper would
    look parametrized (a phantom weight; folding it in place failed inside torch).  ``copy.deepcopy``
    looks ``__deepcopy__`` up through it too: our layers have none (the copy goes through
    ``__reduce_ex__``), so the copy keeps the wrapper (peft's ``ModulesToSaveWrapper`` around a
    classifier) and fold, export and plan work on copies."""
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    model = wn.apply_weight_norm(ForwardsAttributes(), x)
    assert [f.qualname for f in wn.find_weight_norms(model)] == ["layer.weight"]
    assert [s.qualname for s in wn.plan_weight_norm(model).skipped] == ["layer.weight"]  # kept, as already normalized
    expected = model(x)
    replica = copy.deepcopy(model)
    assert type(replica) is ForwardsAttributes and list(replica.state_dict()) == list(model.state_dict())
    assert type(replica.layer) is not type(model.layer)  # a class of its own
    torch.testing.assert_close(replica(x), expected)
    folded = wn.fold_weight_norm(model)
    assert type(folded) is ForwardsAttributes and list(folded.state_dict()) == ["layer.weight", "layer.bias"]
    torch.testing.assert_close(folded(x), expected)
    assert max(wn.export_onnx(model, x, tmp_path / "wrapped.onnx").max_abs_diff.values()) < 1e-4
    assert [t.qualname for t in wn.plan_weight_norm(model, existing="convert").converted] == ["layer.weight"]
    folded = wn.fold_weight_norm(model, inplace=True)
    assert type(folded) is ForwardsAttributes and not wn.find_weight_norms(folded)
    assert list(folded.state_dict()) == ["layer.weight", "layer.bias"]
    torch.testing.assert_close(folded(x), expected)


def test_a_wrapper_that_forwards_deepcopy_to_a_layer_torch_normalized_is_refused_clearly() -> None:
    """torch's own parametrized class has a ``__deepcopy__``, which the wrapper hands out: a copy
    would be the held layer alone, so fold and plan on a copy say what to do instead."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    model = ForwardsAttributes()
    torch.nn.utils.parametrizations.weight_norm(model.layer)
    expected = model(x)
    with pytest.raises(wn.WeightNormError, match=r"from '<root>' \(ForwardsAttributes\) on: a __getattr__ .* inplace=True"):
        wn.fold_weight_norm(model)
    with pytest.raises(wn.WeightNormError, match="__deepcopy__ of its own, or plan with existing='keep'"):
        wn.plan_weight_norm(model, existing="convert")
    folded = wn.fold_weight_norm(model, inplace=True)
    assert type(folded) is ForwardsAttributes and list(folded.state_dict()) == ["layer.weight", "layer.bias"]
    torch.testing.assert_close(folded(x), expected)


class _BuiltWithWeightNorm(nn.Module):
    """A model that has torch's weight norm on one layer by construction (wav2vec2's ``pos_conv``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv1d(4, 8, 1)
        self.pos = torch.nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 3, padding=1), dim=2)
        self.head = nn.Conv1d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.head(h + torch.tanh(self.pos(h)))


def test_fold_can_keep_the_weight_norm_a_model_is_built_with_so_it_loads_into_its_class() -> None:
    x = torch.randn(6, 4, 10)
    model = wn.apply_weight_norm(_BuiltWithWeightNorm(), x)
    folded = wn.fold_weight_norm(model, keep=["pos.weight"])
    fresh = _BuiltWithWeightNorm()
    fresh.load_state_dict(folded.state_dict())  # strict: the layout its class builds
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    assert [f.qualname for f in wn.find_weight_norms(folded)] == ["pos.weight"]
    assert [f.qualname for f in wn.find_weight_norms(wn.fold_weight_norm(model))] == []
    with pytest.raises(wn.FoldError, match=r"keep names head\.bias, which is not weight-normalized in this model"):
        wn.fold_weight_norm(model, keep=["head.bias"])
    assert [f.qualname for f in wn.find_weight_norms(wn.fold_weight_norm(model, keep="pos.weight"))] == ["pos.weight"]
    state = wn.fold_state_dict(model.state_dict(), keep="pos.weight")  # a name, not its characters
    assert "pos.parametrizations.weight.original1" in state and "head.weight" in state


class _BuiltWithBothLayouts(_BuiltWithWeightNorm):
    """Built with torch's parametrization on ``dim=2`` and its legacy hooks on a ConvTranspose's
    input channels (torch's default ``dim=0``: EnCodec's, where ours is per output channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = legacy_weight_norm(nn.ConvTranspose1d(2, 3, 4, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(super().forward(x))


@pytest.mark.parametrize("init", ["preserve", "data"])
def test_a_kept_weight_that_existing_convert_replaced_gets_the_classs_own_weight_norm_back(init: str) -> None:
    """``existing="convert"`` replaces the class's weight norm by ours, on our axis; ``keep`` puts
    torch's back, in its layout and on its axis, so the folded state dict loads into the class."""
    x = torch.randn(6, 4, 10)
    model = wn.apply_weight_norm(_BuiltWithBothLayouts(), x, init=init, existing="convert")
    assert {f.qualname: f.layout for f in wn.find_weight_norms(model)}["pos.weight"] == "wn_transform"
    folded = wn.fold_weight_norm(model, keep=["pos.weight", "up.weight"])
    found = {f.qualname: (f.layout, f.dim) for f in wn.find_weight_norms(folded)}
    assert found == {"pos.weight": ("torch", 2), "up.weight": ("legacy", 0)}
    fresh = _BuiltWithBothLayouts()
    fresh.load_state_dict(folded.state_dict())  # strict, and every shape the class's
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    assert all(p.requires_grad for p in folded.parameters())
    again = wn.fold_weight_norm(model, keep=["pos.weight"])  # the model itself is unchanged: its copy folded
    assert {f.qualname: f.layout for f in wn.find_weight_norms(again)} == {"pos.weight": "torch"}
    twice = wn.apply_weight_norm(model, x, init=init, existing="convert")  # ours replaced by ours: torch's remembered
    found = {f.qualname: (f.layout, f.dim) for f in wn.find_weight_norms(wn.fold_weight_norm(twice, keep=["pos.weight"]))}
    assert found == {"pos.weight": ("torch", 2)}
    plain = wn.fold_weight_norm(model)  # folded whole: nothing left to put back
    kept = wn.fold_weight_norm(wn.apply_weight_norm(plain, x, init=init), keep=["pos.weight"])
    assert {f.qualname: (f.layout, f.dim) for f in wn.find_weight_norms(kept)} == {"pos.weight": ("wn_transform", 0)}


def test_fold_keep_takes_any_name_of_a_layer_reachable_under_two() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model.head = model[1]  # the same module under a second name
    model = wn.apply_weight_norm(model, init="preserve")
    for name in ("1.weight", "head.weight"):
        folded = wn.fold_weight_norm(model, keep=[name])
        assert [f.qualname for f in wn.find_weight_norms(folded)] == ["1.weight"]


@pytest.mark.parametrize("api", ["parametrizations", "legacy"])
def test_a_unit_with_no_direction_in_torchs_weight_norm_folds_to_zeros_on_every_route(api: str) -> None:
    """torch's formula makes a pruned unit (g = 0, v row = 0) 0/0 = NaN; the library's routes give it
    a zero weight, all alike: fold of the model, fold of its state dict, and existing='convert'
    (which then gives it g = 0 and a trainable direction, as apply does any zero unit)."""
    torch.manual_seed(0)
    layer = torch_weight_norm(nn.Linear(4, 3)) if api == "parametrizations" else legacy_weight_norm(nn.Linear(4, 3))
    g, v = ((layer.parametrizations.weight.original0, layer.parametrizations.weight.original1)
            if api == "parametrizations" else (layer.weight_g, layer.weight_v))
    with torch.no_grad():
        g[1], v[1] = 0.0, 0.0
    model = nn.Sequential(layer)
    folded = wn.fold_weight_norm(model)[0].weight
    assert torch.equal(folded[1], torch.zeros(4)) and bool(folded.isfinite().all())
    torch.testing.assert_close(folded[[0, 2]], torch._weight_norm(v, g, 0)[[0, 2]], rtol=0, atol=0)
    assert torch.equal(wn.fold_state_dict(model.state_dict())["0.weight"], folded)
    x = torch.randn(16, 4)
    for batch in (None, x):
        converted = wn.apply_weight_norm(model, batch, existing="convert")
        assert wn.weight_norm_report(converted).zero_units == {"0.weight": 1}
        assert bool(converted(x).isfinite().all())


def test_weight_norm_pruned_by_torch_is_folded_with_its_mask_or_refused_whole_and_kept_by_convert() -> None:
    """``torch.nn.utils.prune`` on a weight norm's v: on torch's parametrization (pruning its
    ``original1``) a fold bakes the mask in (the same function), and existing="convert" keeps it
    (a conversion would drop the mask), saying why; on the legacy hooks (``weight_v_orig`` and a
    mask) a fold is refused before anything changes, with the way out."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    x = torch.randn(6, 8)
    model = nn.Sequential(torch_weight_norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 2))
    prune.l1_unstructured(model[0].parametrizations.weight, "original1", amount=0.5)
    model(x).square().sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()  # (no forward since: prune's attribute is the last forward's)
    folded = wn.fold_weight_norm(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))
    assert int((folded[0].weight == 0).sum()) == 32 and not wn.find_weight_norms(folded)
    converted = wn.apply_weight_norm(model, x, existing="convert")
    report = wn.weight_norm_report(converted)
    (kept,) = [s for s in report.skipped if s.qualname == "0.weight"]
    assert kept.reason.endswith("with its original1 pruned by torch.nn.utils.prune: kept, not converted (converting it "
                                "would drop the mask)")
    assert "original1_mask" in dict(converted[0].parametrizations.weight.named_buffers())
    legacy = nn.Sequential(legacy_weight_norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 2))
    prune.l1_unstructured(legacy[0], "weight_v", amount=0.5)
    names = [name for name, _ in legacy.named_parameters()]
    with pytest.raises(wn.FoldError, match=r"cannot fold 0\.weight: its weight_v is pruned by torch\.nn\.utils\.prune; "
                                           r"call prune\.remove\(module, 'weight_v'\) first"):
        wn.fold_weight_norm(legacy, inplace=True)
    assert [name for name, _ in legacy.named_parameters()] == names  # all or nothing
    with torch.no_grad():
        legacy(x)  # still runs
    prune.remove(legacy[0], "weight_v")
    with torch.no_grad():
        torch.testing.assert_close(wn.fold_weight_norm(legacy)(x), legacy(x))
