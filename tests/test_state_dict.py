"""Weight norm at the state-dict level against models weight-normalized by torch itself."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as parametrized_weight_norm

import wn_transform as wn
from tests.fixtures.weight_norm import legacy_weight_norm, perturb_scales
from tests.fixtures.hifigan import build_generator
from wn_transform.parametrization import register
from wn_transform.state_dict import convert_state_dict, find_state_dict_weight_norms, fit_state_dict, fold_state_dict


LAYERS = {"linear": lambda: nn.Linear(6, 5), "conv1d": lambda: nn.Conv1d(4, 6, 3),
          "conv_transpose1d": lambda: nn.ConvTranspose1d(4, 6, 3)}
STYLES = {"parametrizations": parametrized_weight_norm, "legacy": legacy_weight_norm}
CASES = [(style, layer, dim) for style in STYLES for layer in LAYERS for dim in (0, 1, None) + ((2,) if layer != "linear" else ())]


@pytest.mark.parametrize(("style", "layer", "dim"), CASES, ids=[f"{s}-{layer}-dim{d}" for s, layer, d in CASES])
def test_fold_state_dict_equals_folding_the_model(style: str, layer: str, dim: int | None) -> None:
    torch.manual_seed(0)
    model = perturb_scales(nn.Sequential(nn.Identity(), STYLES[style](LAYERS[layer](), dim=dim)))
    (found,) = find_state_dict_weight_norms(model.state_dict())
    assert (found.layout, found.dim, found.weight_key) == (style, None if dim is None else dim, "1.weight")
    folded = fold_state_dict(model.state_dict())
    expected = wn.fold_weight_norm(model).state_dict()
    assert folded.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(folded[key], expected[key], msg=key)


def test_our_layouts_fold_too_including_grouped_conv_transpose_and_exp_scale() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 6, 3), nn.ConvTranspose1d(6, 4, 2, groups=2), nn.Linear(4, 3))
    batch = torch.randn(8, 4, 5)
    for exp_scale in (False, True):
        normalized = wn.apply_weight_norm(model, batch, exp_scale=exp_scale)
        found = {f.weight_key: f for f in find_state_dict_weight_norms(normalized.state_dict())}
        assert (found["1.weight"].dim, found["1.weight"].groups, found["1.weight"].exp_scale) == (1, 2, exp_scale)
        folded = fold_state_dict(normalized.state_dict())
        expected = wn.fold_weight_norm(normalized).state_dict()
        assert folded.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(folded[key], expected[key], msg=key)


def test_other_entries_keep_their_order_and_values() -> None:
    model = build_generator("parametrizations")
    state = model.state_dict()
    folded = fold_state_dict(state)
    plain_keys = [k for k in state if "parametrizations" not in k]
    assert [k for k in folded if k in plain_keys] == plain_keys
    assert all(folded[k] is state[k] for k in plain_keys)


def test_layouts_convert_both_ways_and_load_into_torchs_models() -> None:
    new = build_generator("parametrizations").state_dict()
    old = convert_state_dict(new, "legacy")
    legacy_model = build_generator("legacy", seed=1)
    legacy_model.load_state_dict(old)
    parametrized = build_generator("parametrizations", seed=1)
    parametrized.load_state_dict(convert_state_dict(legacy_model.state_dict(), "parametrizations"))
    mel = torch.randn(2, 80, 12)
    torch.testing.assert_close(parametrized(mel), build_generator("parametrizations")(mel))
    torch.testing.assert_close(legacy_model(mel), parametrized(mel))
    assert convert_state_dict(old, "parametrizations").keys() == new.keys()


def test_layouts_torch_cannot_express_are_refused_with_the_key() -> None:
    model = wn.apply_weight_norm(nn.Sequential(nn.ConvTranspose1d(4, 4, 2, groups=2)), init="preserve")
    with pytest.raises(wn.WeightNormError, match=r"0\.parametrizations\.weight\.original0: grouped ConvTranspose"):
        convert_state_dict(model.state_dict(), "legacy")


@pytest.mark.parametrize("to", ["parametrizations", "legacy"])
def test_an_exp_scale_pair_converts_to_g_as_torchs_layouts_store_it(to: str) -> None:
    """``s = log g`` and its marker become ``g = e^s``: the result loads into torch's own weight norm
    (strict) and computes the same function; ``to="parametrizations"`` is a conversion too, not a
    no-op that would leave s where torch reads g."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.randn(16, 4),
                                 exp_scale=True)
    converted = convert_state_dict(model.state_dict(), to)
    assert not any(key.endswith("g_is_log") for key in converted)
    torchs = nn.Sequential(STYLES[to](nn.Linear(4, 3)), nn.ReLU(), STYLES[to](nn.Linear(3, 2)))
    torchs.load_state_dict(converted)
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(torchs(x), model(x))
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    half["0.parametrizations.weight.original0"] = torch.full_like(half["0.parametrizations.weight.original0"], 12.0)
    with pytest.raises(wn.WeightNormError, match=r"0\.parametrizations\.weight\.original0: g = e\^s beyond "
                                                 r"torch\.float16's range"):  # (e^12 > 65504: not an inf g)
        convert_state_dict(half, to)


@pytest.mark.parametrize(("g", "v"), [((3, 2), (3, 4)),
                                      ((1, 8), (8, 4)),  # a Linear's g saved transposed: no grouped layout for [out, in]
                                      ((1, 3), (1, 0)), ((1, 0), (4, 4))])  # an empty axis
def test_a_g_that_does_not_fit_its_v_is_named(g: tuple[int, ...], v: tuple[int, ...]) -> None:
    state = {"fc.weight_g": torch.ones(g), "fc.weight_v": torch.ones(v)}
    with pytest.raises(wn.WeightNormError, match=rf"fc\.weight_g: g of shape \({g[0]}, {g[1]}.*\) does not fit v of shape"):
        fold_state_dict(state)


@pytest.mark.parametrize("function", [fold_state_dict, find_state_dict_weight_norms, lambda s: convert_state_dict(s, "legacy")],
                         ids=["fold", "find", "convert"])
def test_something_other_than_a_state_dict_is_refused_with_what_it_is(function) -> None:
    with pytest.raises(TypeError, match="expected a state dict .*, got list$"):
        function([1, 2])
    with pytest.raises(TypeError, match=r"got Linear; pass model\.state_dict\(\), or fold the model with fold_weight_norm"):
        function(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"keys are parameter names \(strings\); this one has 0 \(int\)"):
        function({"fc.weight": torch.ones(2, 2), 0: torch.ones(1)})



@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_a_bare_layers_keys_without_a_module_prefix(layer: str) -> None:
    model = parametrized_weight_norm(LAYERS[layer]())
    state = model.state_dict()
    assert [wn_.weight_key for wn_ in find_state_dict_weight_norms(state)] == ["weight"]
    torch.nn.utils.parametrize.remove_parametrizations(model, "weight")
    folded = fold_state_dict(state)
    assert folded.keys() == model.state_dict().keys()
    torch.testing.assert_close(folded["weight"], model.weight)
    legacy = convert_state_dict(state, "legacy")
    assert set(legacy) == {"weight_g", "weight_v", "bias"}
    assert convert_state_dict(legacy, "parametrizations").keys() == state.keys()


@pytest.mark.parametrize(("present", "missing", "what"), [
    ("fc.parametrizations.weight.original0", "fc.parametrizations.weight.original1", "g without its v"),
    ("fc.parametrizations.weight.original1", "fc.parametrizations.weight.original0", "v without its g"),
])
def test_half_a_parametrized_pair_is_an_incomplete_checkpoint(present: str, missing: str, what: str) -> None:
    tensor = torch.ones(3, 1) if present.endswith("original0") else torch.ones(3, 4)
    state = {present: tensor, "fc.bias": torch.zeros(3)}
    for check in (fold_state_dict, find_state_dict_weight_norms, lambda s: convert_state_dict(s, "legacy")):
        with pytest.raises(wn.WeightNormError, match=rf"{re.escape(present)}: has no {re.escape(missing)} beside it \({what}\)"):
            check(state)


def test_legacy_names_alone_are_ordinary_parameters() -> None:
    """``weight_g``/``weight_v`` pair up only together: alone, they are a gate's or an attention
    value projection's weight (torch's load_state_dict takes them as such)."""
    state = {"attn.weight_q": torch.ones(4, 4), "attn.weight_k": torch.ones(4, 4), "attn.weight_v": torch.ones(4, 4),
             "gate.weight_g": torch.ones(4, 4), "ln.scale_g": torch.ones(4), "fc.weight": torch.ones(3, 4)}
    assert find_state_dict_weight_norms(state) == []
    assert fold_state_dict(state).keys() == state.keys()


@pytest.mark.parametrize("other", ["legacy", "plain"])
def test_a_weight_normalized_twice_is_an_error(other: str) -> None:
    pair = {"fc.parametrizations.weight.original0": torch.ones(3, 1), "fc.parametrizations.weight.original1": torch.ones(3, 4)}
    extra = {"fc.weight_g": torch.ones(3, 1) * 2, "fc.weight_v": torch.ones(3, 4)} if other == "legacy" else {"fc.weight": torch.ones(3, 4)}
    for state in ({**pair, **extra}, {**extra, **pair}):
        for check in (fold_state_dict, find_state_dict_weight_norms, lambda s: convert_state_dict(s, "legacy")):
            twice = "fc.weight is weight-normalized twice" if other == "legacy" else \
                "holds both a plain fc.weight and its weight-norm pair"
            with pytest.raises(wn.WeightNormError, match=twice):
                check(state)


@pytest.mark.parametrize("style", ["legacy", "parametrizations"])
def test_fitting_an_exp_scale_checkpoint_to_torchs_weight_norm_stores_g(style: str) -> None:
    """A checkpoint with ``g = e^s`` (ours, exp_scale=True) into a model built with torch's weight
    norm, which stores g itself: ``g = e^s``, the marker dropped."""
    torch.manual_seed(0)
    ours = wn.apply_weight_norm(nn.Sequential(nn.Conv1d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)), init="preserve",
                                exp_scale=True)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("original0"):
                p.add_(torch.rand_like(p) - 0.5)
    norm = legacy_weight_norm if style == "legacy" else parametrized_weight_norm
    theirs = nn.Sequential(norm(nn.Conv1d(2, 4, 3)), nn.Tanh(), nn.Flatten(), norm(nn.Linear(4, 3)))
    fitted = fit_state_dict(ours.state_dict(), theirs.state_dict().keys())
    theirs.load_state_dict(fitted)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(theirs(x), ours(x))


@pytest.mark.parametrize("source", ["plain", "exp_scale"])
@pytest.mark.parametrize("style", ["legacy", "parametrizations"])
def test_fitting_with_the_models_pairs_normalizes_on_its_axis_and_gives_zero_units_a_direction(
        style: str, source: str) -> None:
    """Given the model's own pairs, a plain weight (a released vocoder's) is normalized on the
    model's axis, and a pair whose direction has an all-zero unit (a pruned unit of an exp_scale
    checkpoint: ``g = e^s`` tiny, ``v = 0``) is folded and normalized there too: torch's weight norm
    would compute ``0/0`` for it.  Each such unit gets ``g = 0`` and a unit direction."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        plain[0].weight[1].zero_()
        plain[3].weight[2].zero_()
    state = (plain.state_dict() if source == "plain"
             else wn.apply_weight_norm(plain, init="preserve", exp_scale=True).state_dict())
    if source == "exp_scale":
        with torch.no_grad():
            state["0.parametrizations.weight.original1"][1].zero_()  # the pruned unit's direction
    norm = legacy_weight_norm if style == "legacy" else parametrized_weight_norm
    theirs = nn.Sequential(norm(nn.Conv1d(2, 4, 3)), nn.Tanh(), nn.Flatten(), norm(nn.Linear(4, 3)))
    own = theirs.state_dict()
    fitted = fit_state_dict(state, own.keys(), find_state_dict_weight_norms(own))
    assert set(fitted) == set(own)
    theirs.load_state_dict(fitted)
    x = torch.randn(5, 2, 3)
    out = theirs(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, plain(x))
    g_key, v_key = (("3.weight_g", "3.weight_v") if style == "legacy"
                    else ("3.parametrizations.weight.original0", "3.parametrizations.weight.original1"))
    assert float(fitted[g_key][2]) == 0 and float(torch.linalg.vector_norm(fitted[v_key][2])) == pytest.approx(1)
    meta = fit_state_dict({k: v.to("meta") for k, v in plain.state_dict().items()}, own.keys(),
                          find_state_dict_weight_norms(own))
    assert {k: v.shape for k, v in meta.items()} == {k: v.shape for k, v in own.items()}


def test_keep_leaves_the_named_weights_normalized() -> None:
    model = build_generator("parametrizations")
    state = model.state_dict()
    folded = fold_state_dict(state, keep=["conv_pre.weight"])
    assert "conv_pre.parametrizations.weight.original0" in folded and "conv_pre.weight" not in folded
    assert "conv_post.weight" in folded and "conv_post.parametrizations.weight.original0" not in folded
    with pytest.raises(wn.FoldError, match="keep names conv_pre.bias, which is not weight-normalized"):
        fold_state_dict(state, keep=["conv_pre.bias"])


class _LitEma(nn.Module):
    """CompVis's ``LitEma`` (latent diffusion, many audio models): each trainable parameter kept
    as a buffer named without its dots, and copied back into the model by that name."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {name: name.replace(".", "") for name, p in model.named_parameters() if p.requires_grad}
        for name, p in model.named_parameters():
            self.register_buffer(self.names[name], p.detach().clone() * 1.5)

    def copy_to(self, model: nn.Module) -> None:
        buffers = dict(self.named_buffers())
        for name, p in model.named_parameters():
            p.data.copy_(buffers[self.names[name]])


class _LightningWithEma(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.model_ema = model, _LitEma(model)


@pytest.mark.parametrize("style", list(STYLES))
def test_an_ema_that_names_parameters_without_their_dots_is_folded_with_the_model(style: str) -> None:
    """``model_ema.0parametrizationsweightoriginal0``: folded to ``model_ema.0weight``, which the
    plain model's ``LitEma`` copies into ``0.weight``: the EMA's folded function."""
    torch.manual_seed(0)
    normalized = nn.Sequential(STYLES[style](nn.Conv1d(4, 6, 3)), nn.ReLU(), STYLES[style](nn.Linear(4, 3), dim=1))
    folded = fold_state_dict(_LightningWithEma(normalized).state_dict())
    plain = _LightningWithEma(nn.Sequential(nn.Conv1d(4, 6, 3), nn.ReLU(), nn.Linear(4, 3)))
    plain.load_state_dict(folded)  # strict: every key fits
    (found,) = [wn for wn in find_state_dict_weight_norms(_LightningWithEma(normalized).state_dict())
                if wn.weight_key == "model_ema.2weight"]
    assert found.dim == 1
    with torch.no_grad():
        for p in normalized.parameters():
            p.mul_(1.5)  # what the EMA holds
        plain.model_ema.copy_to(plain.model)
        x = torch.randn(2, 4, 6)
        torch.testing.assert_close(plain.model(x), normalized(x))
    legacy = nn.Sequential(legacy_weight_norm(nn.Conv1d(4, 6, 3)), nn.ReLU(), legacy_weight_norm(nn.Linear(4, 3), dim=1))
    converted = convert_state_dict(_LightningWithEma(normalized).state_dict(), "legacy")
    assert list(converted) == list(_LightningWithEma(legacy).state_dict())  # (the EMA's as its LitEma names them)


def test_an_ema_without_its_dots_beside_markers_it_does_not_carry_is_refused() -> None:
    """LitEma copies parameters only: a ``g = e^s`` marker (a buffer) or another parametrization's
    buffers stacked on weight norm are the model's alone, so the EMA's pair cannot be told to
    hold ``s`` rather than ``g``: refused, not folded as if it held ``g``."""
    x = torch.randn(8, 4, 6)
    exp_scale = wn.apply_weight_norm(nn.Sequential(nn.Conv1d(4, 6, 3), nn.ReLU(), nn.Linear(4, 3)), x, exp_scale=True)
    stacked = nn.Sequential(torch.nn.utils.parametrizations.spectral_norm(parametrized_weight_norm(nn.Linear(4, 3))))
    for model, beside in ((exp_scale, r"0\.parametrizations\.weight\.0\.g_is_log"),
                          (stacked, r"0\.parametrizations\.weight\.1\._u")):
        with pytest.raises(wn.WeightNormError, match=rf"model_ema\.0parametrizationsweightoriginal0: a weight-norm pair "
                                                     rf"named without its dots .* beside model\.{beside}"):
            fold_state_dict(_LightningWithEma(model).state_dict())


def test_a_whole_checkpoint_has_each_of_its_state_dicts_folded_and_the_rest_kept() -> None:
    """HiFi-GAN's ``g_*`` file (``{"generator": sd}``) and a Lightning ``.ckpt`` with an EMA
    callback's copy: each state dict folded or converted, the other entries the same objects;
    ``find_state_dict_weight_norms`` of such a checkpoint names where its state dicts are."""
    model = build_generator("legacy")
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 80, 6)).sum().backward()
    optimizer.step()
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    hyper = {"lr": 1e-3}
    ckpt = {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "epoch": 3,
            "callbacks": {"EMA": {"ema_state_dict": ema}}, "hyper_parameters": hyper}
    folded = fold_state_dict(ckpt, keep=["conv_pre.weight"])
    assert folded["hyper_parameters"] is hyper and folded["optimizer_states"] is ckpt["optimizer_states"]
    assert folded["epoch"] == 3
    for got, state in ((folded["state_dict"], ckpt["state_dict"]), (folded["callbacks"]["EMA"]["ema_state_dict"], ema)):
        expected = fold_state_dict(state, keep=["conv_pre.weight"])
        assert got.keys() == expected.keys() and "conv_pre.weight_g" in got and "conv_post.weight" in got
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], msg=key)
    converted = convert_state_dict({"generator": model.state_dict(), "steps": 10}, "parametrizations")
    assert converted["steps"] == 10
    assert converted["generator"].keys() == convert_state_dict(model.state_dict(), "parametrizations").keys()
    with pytest.raises(wn.FoldError, match="keep names conv_pre.bias, which is not weight-normalized"):
        fold_state_dict(ckpt, keep=["conv_pre.bias"])
    with pytest.raises(wn.WeightNormError, match=re.escape(
            "a checkpoint that holds state dicts with weight norm (state_dict, callbacks.EMA.ema_state_dict), not one state dict: pass "
            'one of them (checkpoint["state_dict"])')):
        find_state_dict_weight_norms(ckpt)


def test_a_state_dict_with_a_spaced_key_and_a_nested_one_has_both_folded() -> None:
    """A ``ParameterDict`` key may hold a space (``spk.speaker 1``), which the checkpoint walk takes
    for a phrase: the root, which holds weights itself, is still a state dict, folded with the
    one nested in it, and ``find`` looks at it."""
    model = nn.Module()
    model.conv = parametrized_weight_norm(nn.Conv1d(2, 3, 3))
    model.spk = nn.ParameterDict({"speaker 1": nn.Parameter(torch.randn(4))})
    state = {**model.state_dict(), "ema": {k: v for k, v in model.state_dict().items() if k.startswith("conv.")}}
    assert [wn.weight_key for wn in find_state_dict_weight_norms(state)] == ["conv.weight"]
    folded = fold_state_dict(state)
    assert list(folded) == ["conv.weight", "conv.bias", "spk.speaker 1", "ema"]
    assert list(folded["ema"]) == ["conv.weight", "conv.bias"]
    expected = wn.fold_weight_norm(model.conv).weight
    torch.testing.assert_close(folded["conv.weight"], expected)
    torch.testing.assert_close(folded["ema"]["conv.weight"], expected)
    with pytest.raises(wn.WeightNormError, match=re.escape('pass one of them (checkpoint["models"][1])')):
        find_state_dict_weight_norms({"models": [{"n": 3}, model.conv.state_dict()]})
    with pytest.raises(wn.WeightNormError, match=re.escape("state dicts with weight norm (model), not one")):
        find_state_dict_weight_norms({"model": model.conv.state_dict(), "mel_mean": torch.zeros(80)})  # (a tensor beside)
    assert find_state_dict_weight_norms({"model": {"w": torch.ones(2)}, "mel_mean": torch.zeros(80)}) == []


@pytest.mark.parametrize("style", list(STYLES))
def test_a_pruned_g_or_v_is_named_as_pruned_not_taken_for_half_a_pair(style: str) -> None:
    """``torch.nn.utils.prune`` stores a pruned tensor as ``<name>_orig`` and ``<name>_mask``: without
    the model the pair would look incomplete (or, in the legacy layout, would not be found at all)."""
    from torch.nn.utils import prune

    model = nn.Sequential(STYLES[style](nn.Linear(4, 3)))
    owner, name = (model[0].parametrizations.weight, "original1") if style == "parametrizations" else (model[0], "weight_v")
    prune.l1_unstructured(owner, name, amount=0.5)
    key = "0.parametrizations.weight.original1" if style == "parametrizations" else "0.weight_v"
    with pytest.raises(wn.WeightNormError, match=re.escape(f"{key}_orig: {key} of a weight norm is pruned by "
                                                           "torch.nn.utils.prune")):
        fold_state_dict(model.state_dict())
    plain = nn.Linear(4, 3)
    prune.l1_unstructured(plain, "weight", amount=0.5)  # no weight norm: ordinary tensors
    assert find_state_dict_weight_norms(plain.state_dict()) == []
    gate = nn.Module()  # names like a legacy pair, shapes unlike one (a gate's w_g, a value projection's w_v)
    gate.w_g, gate.w_v = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(16, 32))
    prune.l1_unstructured(gate, "w_v", amount=0.5)
    assert find_state_dict_weight_norms(gate.state_dict()) == [] and fold_state_dict(gate.state_dict()).keys() == (
        gate.state_dict().keys())


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_1d_weight_folds_per_element_as_torch_does(style: str, dtype: torch.dtype) -> None:
    layer = nn.LayerNorm(4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, -2.0, 3.0, 1.0]))
    model = perturb_scales(nn.Sequential(STYLES[style](layer, dim=0))).to(dtype)
    (found,) = find_state_dict_weight_norms(model.state_dict())
    assert (found.dim, found.g_shape, found.v_shape) == (0, (4,), (4,))
    folded = fold_state_dict(model.state_dict())
    g, v = model.state_dict()[found.g_key], model.state_dict()[found.v_key]
    expected = torch._weight_norm(v, g, 0)  # what both of torch's weight norms compute: |v| per element
    assert torch.equal(expected.sign(), v.sign())
    torch.testing.assert_close(folded["0.weight"], expected)
    torch.testing.assert_close(folded["0.weight"], wn.fold_weight_norm(model).state_dict()["0.weight"])


def test_integer_g_and_v_are_ordinary_tensors() -> None:
    state = {"count_g": torch.tensor([1, 2]), "count_v": torch.tensor([3, 4]), "flag_g": torch.ones(2, dtype=torch.bool),
             "flag_v": torch.zeros(2, dtype=torch.bool), "lin.weight_g": torch.ones(2, 1), "lin.weight_v": torch.randn(2, 3)}
    assert [wn.weight_key for wn in find_state_dict_weight_norms(state)] == ["lin.weight"]
    folded = fold_state_dict(state)
    assert list(folded) == ["count_g", "count_v", "flag_g", "flag_v", "lin.weight"]
    assert all(folded[k] is state[k] for k in ("count_g", "count_v", "flag_g", "flag_v"))


@pytest.mark.parametrize("transform", [fold_state_dict, lambda sd: convert_state_dict(sd, "legacy")], ids=["fold", "convert"])
def test_an_ordered_dict_stays_one_and_keeps_its_metadata(transform) -> None:
    model = nn.Sequential(parametrized_weight_norm(nn.Linear(3, 2)), nn.BatchNorm1d(2))
    state = model.state_dict()
    out = transform(state)
    assert type(out) is type(state)
    assert out._metadata[""] == state._metadata[""] and out._metadata["1"] == state._metadata["1"]
    assert set(out._metadata) <= set(state._metadata) and "0" in out._metadata
    nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).load_state_dict(fold_state_dict(state))


LOAD_CASES = [(style, layer, dim) for style in [*STYLES, "plain"] for layer in LAYERS
              for dim in ((0, None) if style != "plain" else (0,))]


@pytest.mark.parametrize("exp_scale", [False, True], ids=["g", "exp"])
@pytest.mark.parametrize(("style", "layer", "dim"), LOAD_CASES, ids=[f"{s}-{layer}-dim{d}" for s, layer, d in LOAD_CASES])
def test_our_layers_load_checkpoints_of_every_other_layout_as_the_same_function(
        style: str, layer: str, dim: int | None, exp_scale: bool) -> None:
    """A checkpoint of the layer under torch's weight norm (either API; ConvTranspose normalized per
    input channel, or ``dim=None``), or of the plain layer, loads strictly into our weight-normalized
    layer and gives the layer it was written from; the caller's dict is left as it was.  A pair in
    torch's keys (ours) without the ``g_is_log`` marker holds ``g``, also into a layer that stores
    ``s = log g``."""
    torch.manual_seed(0)
    source = LAYERS[layer]()
    if style != "plain":
        source = perturb_scales(STYLES[style](source, dim=dim))
    ours = wn.apply_weight_norm(LAYERS[layer](), init="preserve", exp_scale=exp_scale)
    checkpoint = source.state_dict()
    keys = list(checkpoint)
    assert str(ours.load_state_dict(checkpoint)) == "<All keys matched successfully>"
    assert list(checkpoint) == keys
    x = torch.randn(2, 6) if layer == "linear" else torch.randn(2, 4, 7)
    torch.testing.assert_close(ours(x), source(x))
    if style == "legacy" and dim == 0 and layer != "conv_transpose1d" and not exp_scale:  # the same axis: kept
        torch.testing.assert_close(ours.parametrizations.weight.original1, checkpoint["weight_v"], rtol=0, atol=0)


def test_a_folded_layer_keeps_no_load_hook_of_ours() -> None:
    """Folding gives a plain model: its pickle needs nothing of this library."""
    import pickle

    model = wn.fold_weight_norm(wn.apply_weight_norm(nn.Sequential(nn.Linear(3, 2), nn.Conv1d(2, 2, 1)), init="preserve"))
    assert b"wn_transform" not in pickle.dumps(model)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("source", ["torch", "ours"])
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "not-strict"])
def test_a_pair_without_the_marker_holds_g_and_loads_into_an_exp_scale_layer_as_log_g(source: str, strict: bool) -> None:
    """torch's weight norm and ours without ``exp_scale`` store ``g`` under the same keys, with no
    marker: into a layer that stores ``s``, it becomes ``s = log g`` (with or without ``strict``)."""
    torch.manual_seed(0)
    if source == "torch":
        written = _mlp()
        for i in (0, 2):
            nn.utils.parametrizations.weight_norm(written[i])
    else:
        written = wn.apply_weight_norm(_mlp(), init="preserve")
    with torch.no_grad():
        written[0].parametrizations.weight.original0.mul_(torch.linspace(0.2, 3.0, 5).view(5, 1))  # g far from ||v||
    target = wn.apply_weight_norm(_mlp(), init="preserve", exp_scale=True)
    result = target.load_state_dict(written.state_dict(), strict=strict)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(4, 6)
    torch.testing.assert_close(target(x), written(x))
    torch.testing.assert_close(target[0].parametrizations.weight.original0.exp(),  # s = log ||w|| = log g
                               written[0].parametrizations.weight.original0)


@pytest.mark.parametrize("source", ["torch", "ours"])
def test_a_zero_gain_loads_into_an_exp_scale_model(source: str) -> None:
    """g = 0 is a pruned or zero-initialized unit's (torch's weight norm writes it, and so does this
    library for an all-zero unit): a g, not a lost s; it loads as the weight it gives."""
    torch.manual_seed(0)
    plain = _mlp()
    with torch.no_grad():
        plain[0].weight[1] = 0.0
    if source == "torch":
        parametrized_weight_norm(plain[0])
        parametrized_weight_norm(plain[2])
        saved = plain
    else:
        saved = wn.apply_weight_norm(plain, torch.randn(16, 6))
    assert float(saved[0].parametrizations.weight.original0.view(-1)[1]) == 0
    target = wn.apply_weight_norm(_mlp(), init="preserve", exp_scale=True)
    state = {k: v for k, v in saved.state_dict().items() if not k.endswith("g_is_log")}
    target.load_state_dict(state, strict=False)
    x = torch.randn(4, 6)
    torch.testing.assert_close(target(x), wn.fold_weight_norm(saved)(x), rtol=1e-5, atol=1e-6)  # (torch's: 0/0)


def test_a_parameters_only_dict_of_an_exp_scale_model_is_refused_with_the_key_to_put_back() -> None:
    """An EMA copy or a trainable-only save holds ``original0`` (= s) without the ``g_is_log`` marker
    buffer.  Read as a g it would give another function; its negative values (g = e^s < 1) show it is
    no g: the load is refused, naming the marker key; with that key put back it loads as stored."""
    torch.manual_seed(0)
    source = wn.apply_weight_norm(_mlp(), init="preserve", exp_scale=True)
    with torch.no_grad():
        source[0].parametrizations.weight.original0.sub_(3.0)  # some s < 0: g = e^s < 1
    target = wn.apply_weight_norm(_mlp(), init="preserve", exp_scale=True)
    parameters = dict(source.named_parameters())
    with pytest.raises(RuntimeError, match=r"0\.parametrizations\.weight\.original0 holds negative values and no "
                                           r"0\.parametrizations\.weight\.0\.g_is_log"):
        target.load_state_dict(parameters, strict=False)
    marked = {**parameters, **{k: v for k, v in source.state_dict().items() if k.endswith("g_is_log")}}
    assert str(target.load_state_dict(marked)) == "<All keys matched successfully>"
    x = torch.randn(4, 6)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn], ids=["bf16", "f16", "f8"])
def test_a_low_precision_plain_checkpoint_loads_as_a_plain_layer_would_load_it(dtype: torch.dtype) -> None:
    """The layer is float32: its ``g = ||w||`` is computed in float32, not rounded to the checkpoint's dtype."""
    torch.manual_seed(0)
    checkpoint = {key: value.to(dtype) for key, value in nn.Linear(64, 32).state_dict().items()}
    plain = nn.Linear(64, 32)
    plain.load_state_dict(checkpoint)
    ours = wn.apply_weight_norm(nn.Linear(64, 32), init="preserve")
    ours.load_state_dict(checkpoint)
    torch.testing.assert_close(ours.weight, plain.weight, rtol=2e-7, atol=0)


def test_models_from_torchs_weight_norm_pickle_after_convert_and_fold() -> None:
    """torch's ``parametrizations.weight_norm`` leaves a local-function load hook on the layer; once
    converted or folded the layer no longer has torch's parametrization, and the hook goes with it
    (legacy keys still load into the converted layer, through ours)."""
    import io
    import pickle

    torch.manual_seed(0)
    model = nn.Sequential(parametrized_weight_norm(nn.Conv1d(3, 4, 3)))
    legacy = legacy_weight_norm(nn.Conv1d(3, 4, 3))
    converted = wn.apply_weight_norm(model, init="preserve", existing="convert")
    torch.save(converted, io.BytesIO())
    pickle.dumps(wn.fold_weight_norm(model))
    converted[0].load_state_dict(legacy.state_dict())
    x = torch.randn(2, 3, 9)
    torch.testing.assert_close(converted[0](x), legacy(x))


class _Head(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.head = nn.Linear(32, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("layout", ["plain", "legacy"])
def test_a_checkpoint_weight_of_another_shape_is_torchs_size_mismatch_error(layout: str, strict: bool) -> None:
    """A head of 10 classes loaded into one of 4: a plain model raises torch's size mismatch (whatever
    ``strict`` says), and so does the weight-normalized one, naming the checkpoint's key, never
    dropping the weight silently (``strict=False``) nor calling it missing and unexpected."""
    torch.manual_seed(0)
    checkpoint = _Head(10)
    if layout == "legacy":
        legacy_weight_norm(checkpoint.head)
    state = checkpoint.state_dict()
    key = "head.weight" if layout == "plain" else "head.weight_v"
    with pytest.raises(RuntimeError, match=r"size mismatch for head\.weight") as plain_error:
        _Head(4).load_state_dict(_Head(10).state_dict(), strict=strict)
    model = wn.apply_weight_norm(_Head(4), init="preserve")
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(RuntimeError) as error:
        model.load_state_dict(state, strict=strict)
    message = str(error.value)
    assert f"size mismatch for {key}: copying a param with shape torch.Size([10, 32]) from checkpoint" in message
    assert "Missing key" not in message and "Unexpected key" not in message
    assert "size mismatch for head.weight" in str(plain_error.value)
    assert torch.equal(model.state_dict()["head.parametrizations.weight.original1"], before["head.parametrizations.weight.original1"])
    assert key in state  # the caller's dict keeps its entries


def test_ordinary_parameters_named_like_a_legacy_pair_are_left_alone() -> None:
    """``X_g``/``X_v`` pair up only as torch's legacy weight norm would write them: RWKV's mixing
    coefficients ``time_maa_g``/``time_maa_v`` (both ``[1, 1, C]``: one element per "unit") and a
    gated unit's ``w_g``/``w_v`` (two ``[8, 8]`` matrices) are plain tensors, folded as they are,
    beside a real pair, which is folded."""
    torch.manual_seed(0)
    real = legacy_weight_norm(nn.Linear(8, 4))
    state = {"att.time_maa_g": torch.randn(1, 1, 8), "att.time_maa_v": torch.randn(1, 1, 8),
             "glu.w_g": torch.randn(8, 8), "glu.w_v": torch.randn(8, 8),
             **{f"head.{k}": t for k, t in real.state_dict().items()}}
    found = find_state_dict_weight_norms(state)
    assert [f.weight_key for f in found] == ["head.weight"]
    folded = fold_state_dict(state)
    for key in ("att.time_maa_g", "att.time_maa_v", "glu.w_g", "glu.w_v"):
        assert torch.equal(folded[key], state[key]), key
    assert "att.time_maa" not in folded and "glu.w" not in folded
    torch.testing.assert_close(folded["head.weight"], real.weight.detach())


def test_a_single_input_lstms_legacy_pair_folds() -> None:
    """``weight_norm(nn.LSTM(1, 8), name="weight_ih_l0")``: ``g`` and ``v`` are both ``[32, 1]`` (units of
    one element), under torch's own weight name: a pair, folded, loading into a plain LSTM."""
    torch.manual_seed(0)
    lstm = nn.LSTM(1, 8)
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(lstm, name="weight_ih_l0")
    plain = nn.LSTM(1, 8)
    plain.load_state_dict(fold_state_dict(lstm.state_dict()))
    x = torch.randn(5, 2, 1)
    torch.testing.assert_close(plain(x)[0], lstm(x)[0])


def test_a_one_output_layer_normalized_on_dim_0_is_reported_and_converted_on_dim_0() -> None:
    """HiFi-GAN's ``conv_post`` (one output channel, ``weight_norm(dim=0)``: ``g`` is ``[1, 1, 1]``) is
    one unit along dim 0, not a whole-tensor norm (``dim=None``, a 0-d ``g``); converted to torch's
    parametrizations, it loads into the layer torch's ``weight_norm(dim=0)`` builds."""
    torch.manual_seed(0)
    legacy = legacy_weight_norm(nn.Conv1d(4, 1, 3))
    whole = legacy_weight_norm(nn.Conv1d(4, 1, 3), dim=None)
    assert [f.dim for f in find_state_dict_weight_norms(legacy.state_dict())] == [0]
    assert [f.dim for f in find_state_dict_weight_norms(whole.state_dict())] == [None]
    target = parametrized_weight_norm(nn.Conv1d(4, 1, 3), dim=0)
    target.load_state_dict(convert_state_dict(legacy.state_dict(), "parametrizations"))
    x = torch.randn(2, 4, 9)
    torch.testing.assert_close(target(x), legacy(x))


def test_a_plain_checkpoint_with_all_zero_units_loads_as_trainable_units_the_same_on_every_load() -> None:
    """Loading a plain checkpoint into a weight-normalized model (apply first, load later) gives an
    all-zero unit (a zero-initialized residual branch) ``g = 0`` and a unit direction, as
    ``apply_weight_norm`` does, not ``v = 0`` (no gradient ever): the same weights, the layer
    trains, and the direction is the same on every load (every process of a job)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Conv1d(5, 4, 1))
    with torch.no_grad():
        plain[2].weight.zero_()
        plain[0].weight[2] = 0
    loaded = [wn.apply_weight_norm(copy.deepcopy(plain), init="preserve") for _ in range(2)]
    for model in loaded:
        model.load_state_dict(plain.state_dict())
        assert torch.equal(model[2].weight, plain[2].weight) and torch.equal(model[0].weight, plain[0].weight)
    chain = loaded[0][2].parametrizations.weight
    assert torch.equal(chain.original0, torch.zeros(4, 1, 1))
    torch.testing.assert_close(chain.original1.flatten(1).norm(dim=1), torch.ones(4))
    assert torch.equal(chain.original1, loaded[1][2].parametrizations.weight.original1)
    x = torch.randn(8, 6)
    model = loaded[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model[2](model[1](model[0](x)).unsqueeze(-1)).square().sum().neg().backward()
    optimizer.step()
    assert bool((model[2].weight.abs().flatten(1).amax(1) > 0).all())  # (layer 0 gets no gradient through a zero layer)
    torch.testing.assert_close(model[0].parametrizations.weight.original1[2].norm(), torch.tensor(1.0))


def test_weight_norm_stacked_with_another_parametrization_is_refused_not_folded_without_it() -> None:
    """Spectral norm on top of weight norm: g*v/||v|| alone is not the layer's weight, and the
    spectral norm's entries would be left behind."""
    layer = torch.nn.utils.parametrizations.spectral_norm(parametrized_weight_norm(nn.Linear(4, 3)))
    state = layer.state_dict()
    (found,) = find_state_dict_weight_norms(state)
    assert found.stacked_key == "parametrizations.weight.1._u"
    with pytest.raises(wn.WeightNormError, match=r"^parametrizations\.weight\.original0: weight norm is stacked with "
                                                 r"another parametrization \(parametrizations\.weight\.1\._u\); folding"):
        fold_state_dict(state)
    with pytest.raises(wn.WeightNormError, match="stacked .* converting it to the legacy layout"):
        convert_state_dict(state, "legacy")
    assert fold_state_dict(state, keep="weight") == state  # left as it is: no error
    # this library's own marker (g = e^s) is part of the weight norm, not another parametrization
    ours = wn.apply_weight_norm(nn.Linear(4, 3), exp_scale=True).state_dict()
    assert find_state_dict_weight_norms(ours)[0].stacked_key is None and "weight" in fold_state_dict(ours)


def test_another_parametrizations_two_tensors_are_ordinary_tensors() -> None:
    """A parametrization whose right_inverse returns two tensors (low-rank factors U [5, 2],
    V [2, 6]) stores original0/original1 too; a g that cannot be weight norm's marks it."""

    class LowRank(nn.Module):
        def __init__(self, rank: int = 2) -> None:
            super().__init__()
            self.rank = rank

        def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return u @ v

        def right_inverse(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            return u[:, : self.rank] * s[: self.rank], vh[: self.rank]

    rank_one = nn.Linear(6, 5)  # U [5, 1], V [1, 6]: one axis of U is longer than 1, as a g's is
    torch.nn.utils.parametrize.register_parametrization(rank_one, "weight", LowRank(rank=1))
    assert find_state_dict_weight_norms(rank_one.state_dict()) == []
    layer = nn.Linear(6, 5)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", LowRank())
    state = nn.Sequential(layer, legacy_weight_norm(nn.Linear(5, 2))).state_dict()
    assert [f.weight_key for f in find_state_dict_weight_norms(state)] == ["1.weight"]
    folded = fold_state_dict(state)
    assert "0.parametrizations.weight.original0" in folded and "1.weight" in folded
    # a g that has the form of one (v's rank, one axis longer than 1) but does not fit is still an error
    broken = {"a.parametrizations.weight.original0": torch.ones(16, 1, 1, 1),
              "a.parametrizations.weight.original1": torch.ones(32, 8, 3, 3)}
    with pytest.raises(wn.WeightNormError, match=r"a\.parametrizations\.weight\.original0: g of shape \(16, 1, 1, 1\) "
                                                 r"does not fit v of shape \(32, 8, 3, 3\)"):
        fold_state_dict(broken)


@pytest.mark.parametrize("style", ["parametrizations", "legacy", "wn_transform"])
def test_folded_weights_take_the_place_a_plain_layer_gives_them(style: str) -> None:
    """torch's weight norm registers g and v after the bias; the folded state dict has the plain
    model's key order, as fold_weight_norm gives it (for tools that pair keys by position)."""
    torch.manual_seed(0)
    layers = [nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Linear(4, 3)]
    if style == "wn_transform":
        model = wn.apply_weight_norm(nn.Sequential(*layers))
    else:
        normalize = parametrized_weight_norm if style == "parametrizations" else legacy_weight_norm
        model = nn.Sequential(normalize(layers[0]), layers[1], normalize(layers[2]))
    folded = fold_state_dict(model.state_dict())
    assert list(folded) == list(wn.fold_weight_norm(model).state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    root = parametrized_weight_norm(nn.Linear(4, 3)) if style != "legacy" else legacy_weight_norm(nn.Linear(4, 3))
    assert list(fold_state_dict(root.state_dict())) == ["weight", "bias"]

    class Nested(nn.Module):  # a weight-normalized layer with a weight-normalized child: the parent's first
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))
            self.sub = nn.Linear(4, 3)

    nested = Nested()
    if style == "wn_transform":
        for module in (nested, nested.sub):
            register(module, "weight", wn.WeightNorm(0))
    else:
        normalize(nested)
        normalize(nested.sub)
    assert list(fold_state_dict(nested.state_dict())) == list(wn.fold_weight_norm(nested).state_dict()) == [
        "weight", "sub.weight", "sub.bias"]


@pytest.mark.parametrize("name", ["0.weight_g", "0.weight_v", "0"])
def test_a_keep_name_that_is_part_of_a_weight_is_answered_with_the_weights_name(name: str) -> None:
    model = nn.Sequential(legacy_weight_norm(nn.Linear(4, 3)))
    expected = re.escape(f"keep names {name}, which is not weight-normalized in this state dict ('{name}' is part of "
                         "'0.weight', the name to pass)")
    with pytest.raises(wn.WeightNormError, match=expected):
        fold_state_dict(model.state_dict(), keep=name)
    with pytest.raises(wn.FoldError, match=re.escape(f"'{name}' is part of '0.weight', the name to pass")):
        wn.fold_weight_norm(model, keep=name)
    with pytest.raises(wn.WeightNormError, match=r"keep names 2\.weight, .*; those there are: 0\.weight$"):
        fold_state_dict(model.state_dict(), keep="2.weight")


def test_a_keep_name_that_is_part_of_several_weights_names_them_all() -> None:
    lstm = nn.LSTM(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for name in ("weight_ih_l0", "weight_hh_l0"):
            torch.nn.utils.weight_norm(lstm, name)
    model = nn.Sequential(lstm)
    with pytest.raises(wn.WeightNormError, match=re.escape("'0' is part of '0.weight_ih_l0' and '0.weight_hh_l0', the names to pass")):
        fold_state_dict(model.state_dict(), keep="0")


@pytest.mark.parametrize("groups", [4, 2])
def test_a_grouped_conv_transpose_with_one_channel_per_group_is_folded(groups: int) -> None:
    """This library's grouped layout: g ``[1, G * (out/G), 1]`` for v ``[in, out/G, k]``, here one
    output channel per group (``v.shape[1] == 1``), which rank-1 factors' shapes resemble."""
    torch.manual_seed(0)
    layer = nn.ConvTranspose1d(4, groups, 3, groups=groups)
    model = wn.apply_weight_norm(nn.Sequential(layer), init="preserve")
    folded = fold_state_dict(model.state_dict())
    assert set(folded) == {"0.weight", "0.bias"}
    torch.testing.assert_close(folded["0.weight"], wn.fold_weight_norm(model)[0].weight.detach())


def test_a_float8_pair_folds_in_float32_and_is_stored_in_float8() -> None:
    """torch promotes float8 with no other dtype: the norms and the product are computed in float32."""
    v = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    g = torch.rand(4, 1, generator=torch.Generator().manual_seed(1)) + 0.5
    state = {"l.weight_g": g.to(torch.float8_e4m3fn), "l.weight_v": v.to(torch.float8_e4m3fn)}
    folded = fold_state_dict(state)["l.weight"]
    g8, v8 = (t.to(torch.float8_e4m3fn).float() for t in (g, v))
    assert folded.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(folded.float(), (g8 * v8 / v8.norm(dim=1, keepdim=True)).to(torch.float8_e4m3fn).float())


def test_a_gated_units_one_dimensional_b_g_and_b_v_are_ordinary_tensors() -> None:
    state = {"ffn.w_g": torch.randn(8, 4), "ffn.w_v": torch.randn(8, 4), "ffn.b_g": torch.randn(8),
             "ffn.b_v": torch.randn(8), "proj.weight_g": torch.ones(3, 1), "proj.weight_v": torch.randn(3, 4)}
    assert [found.weight_key for found in find_state_dict_weight_norms(state)] == ["proj.weight"]
    folded = fold_state_dict(state)
    assert list(folded) == ["ffn.w_g", "ffn.w_v", "ffn.b_g", "ffn.b_v", "proj.weight"]
    assert all(folded[key] is state[key] for key in ("ffn.b_g", "ffn.b_v"))
