"""wn_transform's promises, checked on every model of a zoo of small models (``tests/zoo.py``).

Each test is parametrized over the zoo.  The expectations come from what each model computes
(its weights, their output units, the pre-activations a forward hook can see), and every
property is checked independently of the library: outputs against the original model,
per-unit statistics from hooks, fan-in norms recomputed from the weights, classes and
state dicts against snapshots taken before the call.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

import wn_transform as wn

try:  # tests/ as a package, or as a plain directory on sys.path (pytest's rootdir-based import)
    from .zoo import ZOO, ZooEntry
except ImportError:
    from zoo import ZOO, ZooEntry

TRACED = {"symbolic_trace", "torch.export", "recorded"}
WALK = "module walk"

# Outputs of the weight-normalized model vs the original (preserve init, folding).
OUT_TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 5e-2, "atol": 5e-2},
}
# Per-unit mean and std of a pre-activation after the data-dependent init.
STAT_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}

zoo = pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])


def _entries(predicate) -> list[Any]:
    return [pytest.param(e, id=e.name) for e in ZOO if predicate(e)]


# -- helpers (deliberately independent of wn_transform) ----------------------------------


def _call(model: nn.Module, batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(*batch)


def _outputs(model: nn.Module, batch: Any, *, inference: bool = False, batch_norms_as_given: bool = False) -> Tensor:
    """The model's output in eval mode (buffers untouched); train/eval flags are restored.

    By default grad mode stays on so that torch's inference fast paths (TransformerEncoderLayer,
    MultiheadAttention) are not taken and every call goes through the modules' forwards;
    ``inference=True`` runs under ``no_grad``, where those fast paths are taken.
    ``batch_norms_as_given``: batch norms that are training stay training (batch statistics; the
    running ones are put back), the regime the data init calibrates for.
    """
    modes = _modes(model)
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    model.eval()
    for name, module in model.named_modules():
        if batch_norms_as_given and isinstance(module, nn.modules.batchnorm._NormBase):
            module.training = modes[name]
    try:
        with torch.set_grad_enabled(not inference):
            out = _call(model, batch)
    finally:
        for name, module in model.named_modules():
            module.training = modes[name]
        with torch.no_grad():
            for name, value in model.named_buffers():
                value.copy_(buffers[name])
    return out.detach()


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _user_modes(model: nn.Module) -> dict[str, bool]:
    """Train/eval flags of the model's own modules (not the parametrization containers)."""
    return {name: flag for name, flag in _modes(model).items() if ".parametrizations" not in f".{name}"}


def _classes(model: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "classes": _classes(model),
        "params": {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)},
        "modes": _modes(model),
    }


def _assert_unchanged(model: nn.Module, snapshot: dict[str, Any]) -> None:
    state = model.state_dict()
    assert list(state) == list(snapshot["state"])
    for key, before in snapshot["state"].items():
        assert torch.equal(state[key], before), f"{key} changed"
    assert _classes(model) == snapshot["classes"]
    assert {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)} == snapshot["params"]
    assert _modes(model) == snapshot["modes"]


def _parametrized_weights(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor in module.parametrizations:
                names.add(f"{module_name}.{tensor}" if module_name else tensor)
    return names


def _chain(model: nn.Module, qualname: str) -> nn.Module:
    owner, _, tensor = qualname.rpartition(".")
    return model.get_submodule(owner).parametrizations[tensor]


def _weight(model: nn.Module, qualname: str) -> Tensor:
    owner, _, tensor = qualname.rpartition(".")
    return getattr(model.get_submodule(owner), tensor)


def _fan_in_norms(w: Tensor, dim: int, groups: int) -> Tensor:
    """||fan-in of output unit c|| for every output unit c, in output-unit order.

    groups == 1: unit c is ``w.select(dim, c)``.  A grouped ConvTranspose weight is
    ``[in, out/G, *k]``: output channel ``c = grp * out/G + j`` reads input channels
    ``grp*in/G .. (grp+1)*in/G`` through ``w[:, j]`` of that block.
    """
    w = w.detach().float()
    if groups == 1:
        return torch.stack([w.select(dim, c).norm() for c in range(w.shape[dim])])
    assert dim == 1
    in_per_group, out_per_group = w.shape[0] // groups, w.shape[1]
    norms = []
    for grp in range(groups):
        block = w[grp * in_per_group:(grp + 1) * in_per_group]
        norms.extend(block[:, j].norm() for j in range(out_per_group))
    return torch.stack(norms)


def _per_unit_stats(t: Tensor, unit_dim: int) -> tuple[Tensor, Tensor]:
    t = t.detach().double().movedim(unit_dim, -1)
    t = t.reshape(-1, t.shape[-1])
    return t.mean(dim=0), t.std(dim=0, correction=0)


def _capture(model: nn.Module, owners: set[str]) -> tuple[dict[str, list[Tensor]], list]:
    records: dict[str, list[Tensor]] = {o: [] for o in owners}
    handles = [
        model.get_submodule(owner).register_forward_hook(
            lambda module, args, out, owner=owner: records[owner].append(out.detach()))
        for owner in owners
    ]
    return records, handles


def _skip_names(report: wn.WeightNormReport) -> dict[str, str]:
    return {s.qualname: s.reason for s in report.skipped}


def _assert_expected_report(entry: ZooEntry, report: wn.WeightNormReport) -> None:
    converted = [t.qualname for t in report.converted]
    assert len(converted) == len(set(converted)), f"a weight is listed twice: {converted}"
    assert set(converted) == set(entry.converted)
    for target in report.converted:
        dim, groups = entry.converted[target.qualname]
        assert (target.layout.dim % len(target.shape), target.layout.groups) == (dim, groups), target.qualname
    skipped = _skip_names(report)
    for aliases, word in entry.skipped.items():
        listed = [name for name in aliases if name in skipped]
        assert len(listed) == 1, f"{aliases} must be reported skipped once, got {sorted(skipped)}"
        assert word in skipped[listed[0]].lower()
        assert not set(aliases) & set(converted)


# -- the zoo itself ----------------------------------------------------------------------


@zoo
def test_zoo_expectations_name_real_weights(entry: ZooEntry) -> None:
    """Guards the zoo: a typo in an expectation would make the other tests vacuous."""
    model = entry.model()
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in [*entry.converted, *(n for aliases in entry.skipped for n in aliases)]:
        assert name in params and params[name].ndim >= 2, name
    assert set(entry.preact) | set(entry.attention) == set(entry.converted)
    assert entry.has_bias <= set(entry.preact)
    assert all(p.dtype == entry.dtype for p in model.parameters() if p.is_floating_point())
    assert torch.isfinite(_outputs(model, entry.sample()).float()).all()


# -- 1. the plan and the report ----------------------------------------------------------


@zoo
def test_plan_lists_exactly_the_expected_weights(entry: ZooEntry) -> None:
    model, batch = entry.model(), entry.sample()
    before = _snapshot(model)
    report = wn.plan_weight_norm(model, batch)
    _assert_unchanged(model, before)
    _assert_expected_report(entry, report)
    assert report.found_by in TRACED, report.trace_failures
    if entry.found_by is not None:
        assert report.found_by == entry.found_by, report.trace_failures
    assert all(t.found_by == report.found_by for t in report.converted)


@zoo
def test_report_of_applied_model_matches_what_was_done(entry: ZooEntry) -> None:
    model, batch = entry.model(), entry.sample()
    out = wn.apply_weight_norm(model, batch)
    report = wn.weight_norm_report(out)
    _assert_expected_report(entry, report)
    assert report.init == "data"
    assert _parametrized_weights(out) == set(entry.converted)
    assert report.notes is not None
    assert not report.notes.unreached, f"the batch runs these layers, but the init reports them unreached: {report.notes.unreached}"


@pytest.mark.parametrize("entry", _entries(lambda e: e.walk_converted is None))
def test_plan_without_batch_traces_and_does_not_warn(entry: ZooEntry) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        report = wn.plan_weight_norm(entry.model())
    _assert_expected_report(entry, report)
    assert report.found_by == "symbolic_trace"


@pytest.mark.parametrize("entry", _entries(lambda e: e.walk_converted is not None))
def test_untraceable_model_without_batch_warns_and_converts_standard_layers(entry: ZooEntry) -> None:
    model, batch = entry.model(), entry.sample()
    with pytest.warns(UserWarning, match="trace"):
        report = wn.plan_weight_norm(model)
    assert report.found_by == WALK
    assert "symbolic_trace" in report.trace_failures
    assert {t.qualname for t in report.converted} == entry.walk_converted
    with pytest.warns(UserWarning):
        out = wn.apply_weight_norm(model)
    assert _parametrized_weights(out) == entry.walk_converted
    torch.testing.assert_close(_outputs(out, batch), _outputs(model, batch), **OUT_TOL[entry.dtype])


@zoo
def test_unit_layout_gives_one_scale_per_output_unit(entry: ZooEntry) -> None:
    """g has the unit layout's shape, and |g| is the norm of each output unit's fan-in."""
    model = entry.model()
    out = wn.apply_weight_norm(model, entry.sample())
    for qualname, (dim, groups) in entry.converted.items():
        chain = _chain(out, qualname)
        g, v = chain.original0, chain.original1
        assert v.shape == _weight(model, qualname).shape
        expected_g_shape = [1] * v.ndim
        expected_g_shape[dim] = v.shape[dim] * groups
        assert list(g.shape) == expected_g_shape, qualname
        norms = _fan_in_norms(_weight(out, qualname), dim, groups)
        torch.testing.assert_close(norms, g.detach().float().reshape(-1).abs(), rtol=STAT_TOL[entry.dtype], atol=1e-6,
                                   msg=qualname)


# -- 2. preserve init --------------------------------------------------------------------


@zoo
@pytest.mark.parametrize("with_batch", [False, True], ids=["no_batch", "batch"])
def test_preserve_init_keeps_function_class_and_original(entry: ZooEntry, with_batch: bool) -> None:
    model, batch = entry.model(), entry.sample()
    expected = _outputs(model, batch)
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # untraceable models without a batch warn (tested above)
        out = wn.apply_weight_norm(model, batch if with_batch else None, init="preserve")
    _assert_unchanged(model, before)
    assert out is not model
    assert isinstance(out, type(model))
    assert type(out).forward is type(model).forward
    assert out.describe() == model.describe() == f"zoo:{entry.name}"
    assert _user_modes(out) == before["modes"]
    if with_batch or entry.walk_converted is None:
        assert _parametrized_weights(out) == set(entry.converted)
    torch.testing.assert_close(_outputs(out, batch), expected, **OUT_TOL[entry.dtype])
    torch.testing.assert_close(_outputs(out, batch, inference=True), _outputs(model, batch, inference=True),
                               **OUT_TOL[entry.dtype])
    for key, value in out.state_dict().items():  # buffers (BatchNorm statistics) carried over untouched
        if key in before["state"]:
            assert torch.equal(value, before["state"][key]), key


# -- 3. data-dependent init --------------------------------------------------------------


@zoo
def test_data_init_standardizes_every_pre_activation(entry: ZooEntry) -> None:
    model, batch = entry.model(), entry.sample()
    before = _snapshot(model)
    out = wn.apply_weight_norm(model, batch)
    _assert_unchanged(model, before)
    assert _user_modes(out) == before["modes"]
    buffers = dict(out.named_buffers())
    for name, value in model.named_buffers():  # BatchNorm running stats untouched by the init pass
        assert torch.equal(buffers[name], value), name

    owners = {q.rpartition(".")[0]: q for q in entry.preact}
    records, handles = _capture(out, set(owners))
    try:
        final = _outputs(out, batch, batch_norms_as_given=True)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.isfinite(final.float()).all()
    tol = STAT_TOL[entry.dtype]
    for owner, qualname in owners.items():
        assert records[owner], f"{qualname}: its module never ran"
        mean, std = _per_unit_stats(records[owner][0], entry.preact[qualname])  # first call: the calibrated one
        torch.testing.assert_close(std, torch.ones_like(std), atol=tol, rtol=0, msg=f"std of {qualname}")
        if qualname in entry.has_bias:
            torch.testing.assert_close(mean, torch.zeros_like(mean), atol=tol, rtol=0, msg=f"mean of {qualname}")

    if entry.attention:
        preserved = wn.apply_weight_norm(model, batch, init="preserve")
        for qualname in entry.attention:
            g_data, g_kept = _chain(out, qualname).original0, _chain(preserved, qualname).original0
            assert torch.isfinite(g_data).all()
            assert not torch.allclose(g_data, g_kept), f"{qualname}: g was not calibrated"


@pytest.mark.parametrize("entry", _entries(lambda e: e.attention))
def test_data_init_standardizes_attention_input_projections(entry: ZooEntry) -> None:
    """q, k and v projections (with their biases) of every attention layer: mean 0, std 1."""
    out = wn.apply_weight_norm(entry.model(), entry.sample())
    attention = {q.rpartition(".")[0] for q in entry.attention}
    attention = {o for o in attention if isinstance(out.get_submodule(o), nn.MultiheadAttention)}
    assert attention
    inputs: dict[str, tuple] = {}

    def keep_first_inputs(owner: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs.setdefault(owner, (*args, *kwargs.values())[:3])  # query, key, value

        return hook

    handles = [out.get_submodule(o).register_forward_pre_hook(keep_first_inputs(o), with_kwargs=True) for o in attention]
    try:
        _outputs(out, entry.sample())
    finally:
        for handle in handles:
            handle.remove()
    for owner in attention:
        mha = out.get_submodule(owner)
        embed = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.split(embed)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.split(embed)
        for label, x, w, b in zip("qkv", inputs[owner], weights, biases):
            mean, std = _per_unit_stats(F.linear(x, w, b), -1)
            torch.testing.assert_close(std, torch.ones_like(std), atol=1e-3, rtol=0, msg=f"{owner} {label} std")
            torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-3, rtol=0, msg=f"{owner} {label} mean")


# -- 4. training -------------------------------------------------------------------------


@zoo
def test_one_training_step(entry: ZooEntry) -> None:
    model, batch = entry.model(), entry.sample()
    out = wn.apply_weight_norm(model, batch)
    out.train()
    loss = _call(out, batch).float().square().mean()
    assert torch.isfinite(loss)
    loss.backward()
    for qualname in entry.converted:
        chain = _chain(out, qualname)
        for param in (chain.original0, chain.original1):
            assert param.grad is not None, qualname
            assert torch.isfinite(param.grad.float()).all(), qualname
        assert chain.original1.grad.abs().sum() > 0, qualname
    v_before = {q: _chain(out, q).original1.detach().clone() for q in entry.converted}
    torch.optim.SGD(out.parameters(), lr=1e-2).step()
    assert any(not torch.equal(_chain(out, q).original1, v) for q, v in v_before.items())
    with torch.no_grad():
        assert torch.isfinite(_call(out, batch).float().square().mean())


# -- 5. folding --------------------------------------------------------------------------


@zoo
def test_fold_gives_plain_weights_same_function_and_original_classes(entry: ZooEntry) -> None:
    model, batch = entry.model(), entry.sample()
    normalized = wn.apply_weight_norm(model, batch)
    expected = _outputs(normalized, batch)
    before = _snapshot(normalized)
    folded = wn.fold_weight_norm(normalized)
    _assert_unchanged(normalized, before)  # folding a copy leaves the normalized model as it was
    torch.testing.assert_close(_outputs(normalized, batch), expected, rtol=0, atol=0)
    assert not any("parametrizations" in key for key in folded.state_dict())
    assert sorted(folded.state_dict()) == sorted(model.state_dict())
    assert _classes(folded) == _classes(model)
    assert not _parametrized_weights(folded)
    for qualname in entry.converted:
        assert type(_weight(folded, qualname)) is nn.Parameter
    assert folded.describe() == model.describe()
    torch.testing.assert_close(_outputs(folded, batch), expected, **OUT_TOL[entry.dtype])


@zoo
def test_fold_of_preserve_apply_is_the_original_function(entry: ZooEntry) -> None:
    model, batch = entry.model(), entry.sample()
    folded = wn.fold_weight_norm(wn.apply_weight_norm(model, batch, init="preserve"))
    torch.testing.assert_close(_outputs(folded, batch), _outputs(model, batch), **OUT_TOL[entry.dtype])
    for name, param in folded.named_parameters():
        torch.testing.assert_close(param, model.get_parameter(name), **OUT_TOL[entry.dtype], msg=name)


# -- model-specific promises --------------------------------------------------------------


@pytest.mark.parametrize("entry", _entries(lambda e: any("tied" in w for w in e.skipped.values())))
@pytest.mark.parametrize("init", ["preserve", "data"])
def test_tied_weights_stay_one_parameter(entry: ZooEntry, init: str) -> None:
    model, batch = entry.model(), entry.sample()
    out = wn.apply_weight_norm(model, batch, init=init)
    folded = wn.fold_weight_norm(out)
    for aliases in entry.skipped:
        for m in (out, folded):
            tensors = [_weight(m, name) for name in aliases]
            assert all(type(t) is nn.Parameter for t in tensors)
            assert all(t is tensors[0] for t in tensors), f"{aliases} were untied"
        assert not set(aliases) & _parametrized_weights(out)
    out.train()
    _call(out, batch).square().mean().backward()
    torch.optim.SGD(out.parameters(), lr=0.1).step()
    for aliases in entry.skipped:
        assert all(_weight(out, name) is _weight(out, aliases[0]) for name in aliases)


@pytest.mark.parametrize("entry", _entries(lambda e: e.name == "reused_module"))
def test_module_reused_in_one_forward_is_parametrized_once(entry: ZooEntry) -> None:
    model, batch = entry.model(), entry.sample()
    out = wn.apply_weight_norm(model, batch)
    chain = out.shared.parametrizations["weight"]
    assert len(chain) == 1
    assert sum(isinstance(m, wn.WeightNorm) for m in out.modules()) == len(entry.converted)
    (target,) = [t for t in wn.weight_norm_report(out).converted if t.qualname == "shared.weight"]
    assert target.uses == 2
    calls: list[Tensor] = []
    handle = out.shared.register_forward_hook(lambda m, a, o: calls.append(o))
    try:
        _outputs(out, batch)
    finally:
        handle.remove()
    assert len(calls) == 2


@zoo
def test_fold_keeps_parameter_and_state_dict_order(entry: ZooEntry) -> None:
    """Optimizer state dicts and positional tools index parameters by order: folding keeps it."""
    model = entry.model()
    folded = wn.fold_weight_norm(wn.apply_weight_norm(model, entry.sample()))
    assert [n for n, _ in folded.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(folded.state_dict()) == list(model.state_dict())
