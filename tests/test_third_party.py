"""wn_transform on third-party models we did not write (Hugging Face ``transformers``).

The models (``tests/third_party_zoo.py``) are built from tiny configs with random weights;
nothing is downloaded.  For every model:

1. ``apply_weight_norm(model, batch)`` (data-dependent init): the report names the discovery
   step and exactly the expected weights, every converted ``nn.Linear``/``nn.Conv*``/``Conv1D``
   layer's output has per-unit mean 0 (where it has a bias) and std 1 on the calibration batch
   (forward hooks), and weights the model already puts under torch's weight norm are kept and
   reported; ``existing="convert"`` replaces them (same function with ``init="preserve"``,
   standardized outputs with the data init);
2. one training step: finite gradients on every ``original0``/``original1``;
3. ``fold_weight_norm``: plain weights, original classes, the same outputs;
4. ``export_onnx``: onnxruntime agrees, or the error names what stopped torch's exporters.

Expectations come from each model's source (its module types, which layers it weight-normalizes
itself), never from the library's output.  The ONNX tests are the slow part: deselect them with
``-k "not onnx"``.
"""

from __future__ import annotations

import copy
import functools
import re
from fnmatch import fnmatchcase
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm
from torch.utils._pytree import tree_leaves

import wn_transform as wn

try:  # tests/ as a package, or as a plain directory on sys.path
    from .third_party_zoo import THIRD_PARTY, ThirdPartyEntry
except ImportError:
    from third_party_zoo import THIRD_PARTY, ThirdPartyEntry

from transformers.pytorch_utils import Conv1D

pytestmark = pytest.mark.third_party

STAT_TOL = 1e-3  # per-unit mean and std of a pre-activation after the data-dependent init
OUT_RTOL = 1e-4  # outputs, relative to the largest |output|

zoo = pytest.mark.parametrize("entry", THIRD_PARTY, ids=[e.name for e in THIRD_PARTY])


def _entries(predicate) -> list[Any]:
    return [pytest.param(e, id=e.name) for e in THIRD_PARTY if predicate(e)]


# -- helpers (deliberately independent of wn_transform) ----------------------------------


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(*batch)


def _tensors(output: Any) -> list[Tensor]:
    return [leaf for leaf in tree_leaves(output) if isinstance(leaf, Tensor)]


def _eval_outputs(model: nn.Module, batch: Any) -> list[Tensor]:
    """Every tensor the model returns, in eval mode and without grad (train flags restored)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            return [t.detach() for t in _tensors(_call(model, batch))]
    finally:
        for module, flag in modes.items():
            module.training = flag


def _assert_same_outputs(got: list[Tensor], want: list[Tensor], rtol: float = OUT_RTOL) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, f"output {i}: {tuple(a.shape)} vs {tuple(b.shape)}"
        if not b.is_floating_point():
            assert torch.equal(a, b), f"output {i} (integer) differs"
            continue
        scale = float(b.abs().max()) if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale + 1e-12, msg=f"output {i}")


def _weight_layouts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear/conv/recurrent weight held as a plain Parameter -> (output-unit axis, groups).

    Written from the layers' definitions: ``nn.Linear`` ``[out, in]``; ``Conv1D`` (GPT-2)
    ``[in, out]``; ``nn.ConvNd`` ``[out, in/G, *k]``; ``nn.ConvTransposeNd`` ``[in, out/G, *k]``;
    RNN weights ``[gates*hidden, in]``.
    """
    layouts = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.RNNBase):
            for tensor in module._flat_weights_names:
                if tensor.startswith("weight_") and type(module._parameters.get(tensor)) is nn.Parameter:
                    layouts[prefix + tensor] = (0, 1)
            continue
        if type(module._parameters.get("weight")) is not nn.Parameter:
            continue  # no weight, or a parametrized one
        if isinstance(module, nn.Linear):
            layouts[prefix + "weight"] = (0, 1)
        elif isinstance(module, Conv1D):
            layouts[prefix + "weight"] = (1, 1)
        elif isinstance(module, _ConvNd):
            layouts[prefix + "weight"] = (1, module.groups) if module.transposed else (0, 1)
    return layouts


def _torch_weight_norms(model: nn.Module) -> dict[str, int]:
    """Weights under ``torch.nn.utils.parametrizations.weight_norm`` -> its ``dim``."""
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor, chain in module.parametrizations.items():
                if len(chain) == 1 and isinstance(chain[0], _WeightNorm):
                    found[f"{name}.{tensor}"] = chain[0].dim
    return found


def _parametrized(model: nn.Module) -> dict[str, nn.Module]:
    """Every parametrized tensor -> its parametrization chain (``original0``, ``original1``)."""
    return {f"{name}.{tensor}": chain for name, module in model.named_modules() if parametrize.is_parametrized(module)
            for tensor, chain in module.parametrizations.items()}


def _fan_in_norms(w: Tensor, dim: int, groups: int) -> Tensor:
    """||fan-in of output unit c|| for every output unit c, in output-unit order.

    A grouped ConvTranspose weight is ``[in, out/G, *k]``: output channel ``c = grp * out/G + j``
    reads input channels ``grp*in/G .. (grp+1)*in/G`` through ``w[:, j]`` of that block.
    """
    w = w.detach().double()
    if groups == 1:
        return torch.stack([w.select(dim, c).norm() for c in range(w.shape[dim])])
    block = w.shape[0] // groups
    return torch.stack([w[grp * block:(grp + 1) * block, j].norm() for grp in range(groups) for j in range(w.shape[1])])


def _assert_unit_layouts(model: nn.Module, expected: Mapping[str, tuple[int, int]]) -> None:
    """Each weight is this library's weight norm on the expected unit axis: one g per output
    unit, and |g| is the norm of that unit's fan-in in the weight the model computes with."""
    chains = _parametrized(model)
    for name, (dim, groups) in expected.items():
        chain = chains[name]
        assert isinstance(chain[0], wn.WeightNorm), name
        g, v = chain.original0, chain.original1
        shape = [1] * v.ndim
        shape[dim] = v.shape[dim] * groups
        assert list(g.shape) == shape, f"{name}: g {list(g.shape)}, expected {shape}"
        owner, _, tensor = name.rpartition(".")
        with torch.no_grad():
            weight = getattr(model.get_submodule(owner), tensor)
        torch.testing.assert_close(_fan_in_norms(weight, dim, groups), g.detach().double().reshape(-1).abs(),
                                   rtol=1e-5, atol=1e-7, msg=name)


def _unit_axis(module: nn.Module) -> int | None:
    """The axis of the module's output that holds its output units (None: not a plain layer)."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return -1
    if isinstance(module, _ConvNd):
        return 1
    return None


def _per_unit_stats(t: Tensor, unit_dim: int) -> tuple[Tensor, Tensor]:
    t = t.detach().double().movedim(unit_dim, -1)
    t = t.reshape(-1, t.shape[-1])
    return t.mean(dim=0), t.std(dim=0, correction=0)


def _assert_standardized(model: nn.Module, batch: Any, weights: set[str]) -> int:
    """Each module owning one of ``weights``: its first output on ``batch`` has per-unit std 1
    (and mean 0 where it adds a bias); LSTM layers: their layer-0 input projection.  Returns
    how many layers were checked."""
    records: dict[str, Tensor] = {}
    handles = []
    owners = {q.rpartition(".")[0] for q in weights}
    def keep_output(owner: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if owner not in records:  # the first call: the calibrated one; a copy (Mimi adds to it in place)
                records[owner] = out.detach().clone()

        return hook

    def keep_input_projection(owner: str):
        def hook(module: nn.RNNBase, args: tuple) -> None:
            if owner not in records:
                records[owner] = F.linear(args[0], module.weight_ih_l0, module.bias_ih_l0).detach()

        return hook

    for owner in owners:
        module = model.get_submodule(owner)
        if _unit_axis(module) is not None:
            handles.append(module.register_forward_hook(keep_output(owner)))
        elif isinstance(module, nn.RNNBase) and f"{owner}.weight_ih_l0" in weights:
            handles.append(module.register_forward_pre_hook(keep_input_projection(owner)))
    try:
        _eval_outputs(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    failures = []
    for owner, out in sorted(records.items()):
        module = model.get_submodule(owner)
        unit_dim = _unit_axis(module) if _unit_axis(module) is not None else -1
        has_bias = getattr(module, "bias", None) is not None or isinstance(module, nn.RNNBase) and module.bias
        mean, std = _per_unit_stats(out, unit_dim)
        if (std - 1).abs().max() > STAT_TOL:
            failures.append(f"{owner}: std off by {float((std - 1).abs().max()):.3g}")
        if has_bias and mean.abs().max() > STAT_TOL:
            failures.append(f"{owner}: mean off by {float(mean.abs().max()):.3g}")
    assert not failures, "; ".join(failures)
    missing = {o for o in owners if _unit_axis(model.get_submodule(o)) is not None} - set(records)
    assert not missing, f"these layers never ran on the batch: {sorted(missing)}"
    return len(records)


def _plain_keys(model: nn.Module) -> list[str]:
    """State-dict keys with every parametrized tensor put back under its own name."""
    keys = []
    for key in model.state_dict():
        plain = re.sub(r"\.parametrizations\.(\w+)\.original[01]$", r".\1", key)
        if plain not in keys:
            keys.append(plain)
    return sorted(keys)


def _base_classes(model: nn.Module) -> dict[str, type]:
    return {name: parametrize.type_before_parametrizations(m) for name, m in model.named_modules()
            if ".parametrizations" not in f".{name}"}


# -- one data-init apply per model, shared by the tests (Mimi's ladder alone takes ~15 s) ----


@functools.cache
def _applied(name: str) -> tuple[nn.Module, Any, nn.Module, wn.WeightNormReport]:
    """(the original model, its batch, ``apply_weight_norm(model, batch)``, its report).

    Only ever run under ``no_grad`` here; tests that train take a deep copy."""
    entry = next(e for e in THIRD_PARTY if e.name == name)
    model, batch = entry.model(), entry.sample()
    normalized = wn.apply_weight_norm(model, batch)
    return model, batch, normalized, wn.weight_norm_report(normalized)


def _expected_converted(entry: ThirdPartyEntry, model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: layout for name, layout in _weight_layouts(model).items() if name not in entry.skipped}


# -- the zoo itself ------------------------------------------------------------------------


@zoo
def test_third_party_expectations_name_real_weights(entry: ThirdPartyEntry) -> None:
    """Guards the table: a typo in an expectation would make the other tests vacuous."""
    model = entry.model()
    kept = entry.kept_weights(model)
    assert _torch_weight_norms(model) == kept
    for pattern in entry.kept:
        assert any(fnmatchcase(name, pattern) for name in kept), pattern
    layouts = _weight_layouts(model)
    params = dict(model.named_parameters())
    assert all(name in layouts or params[name].ndim >= 2 for name in entry.skipped)  # a layer, or another matrix
    names = set(layouts) | set(kept)
    for pattern in (*entry.unreached, *entry.unreached_when_converted):
        assert any(fnmatchcase(name, pattern) for name in names), pattern
    assert entry.unreached_weights(model, converted=True) - entry.unreached_weights(model) <= set(kept)
    assert set(entry.constant) <= set(layouts)
    for prefix in entry.no_grad:
        assert any(name.startswith(prefix) for name in names), prefix
    assert _eval_outputs(model, entry.sample())


# -- 1. apply with the data-dependent init -------------------------------------------------


@zoo
def test_third_party_report_names_the_expected_weights(entry: ThirdPartyEntry) -> None:
    model, batch, normalized, report = _applied(entry.name)
    assert report.found_by == entry.found_by, report.trace_failures
    assert report.init == "data"
    expected = _expected_converted(entry, model)
    converted = {t.qualname: t for t in report.converted}
    assert len(converted) == len(report.converted), "a weight is listed twice"
    assert set(converted) == set(expected)
    for name, target in converted.items():
        assert (target.layout.dim % len(target.shape), target.layout.groups) == expected[name], name
    kept = entry.kept_weights(model)
    skipped = {s.qualname: s.reason for s in report.skipped}
    assert set(skipped) == set(kept) | set(entry.skipped)
    for name in kept:
        assert "already weight-normalized" in skipped[name], skipped[name]
    for name, word in entry.skipped.items():
        assert word in skipped[name].lower(), skipped[name]
    assert set(report.notes.unreached) == entry.unreached_weights(model)
    assert set(report.notes.constant_units) == set(entry.constant)
    assert set(_parametrized(normalized)) == set(expected) | set(kept)
    _assert_unit_layouts(normalized, expected)


@zoo
def test_third_party_data_init_standardizes_every_layer(entry: ThirdPartyEntry) -> None:
    model, batch, normalized, report = _applied(entry.name)
    weights = {t.qualname for t in report.converted} - entry.unreached_weights(model) - set(entry.constant)
    checked = _assert_standardized(normalized, batch, weights)
    assert checked or not weights
    assert all(torch.isfinite(t.float()).all() for t in _eval_outputs(normalized, batch))


@zoo
def test_third_party_fast_data_init_agrees_with_the_exact_one(entry: ThirdPartyEntry) -> None:
    """``exact_init=False`` converts the same weights, reports the same, and standardizes every
    layer as well (its rounding drift stays far below the tolerance at these depths)."""
    model, batch, _, report = _applied(entry.name)
    fast = wn.apply_weight_norm(model, batch, exact_init=False)
    fast_report = wn.weight_norm_report(fast)
    assert [t.qualname for t in fast_report.converted] == [t.qualname for t in report.converted]
    assert set(fast_report.notes.unreached) == set(report.notes.unreached)
    assert set(fast_report.notes.constant_units) == set(report.notes.constant_units)
    weights = {t.qualname for t in report.converted} - entry.unreached_weights(model) - set(entry.constant)
    assert _assert_standardized(fast, batch, weights) or not weights


@pytest.mark.parametrize("entry", _entries(lambda e: e.kept))
def test_third_party_existing_weight_norm_is_kept(entry: ThirdPartyEntry) -> None:
    """existing="keep": torch's parametrization stays, with its dim and its (g, v) untouched."""
    model, batch, normalized, report = _applied(entry.name)
    kept = entry.kept_weights(model)
    assert _torch_weight_norms(normalized) == kept
    before, after = _parametrized(model), _parametrized(normalized)
    for name in kept:
        for key in ("original0", "original1"):
            assert torch.equal(getattr(after[name], key), getattr(before[name], key)), f"{name}.{key} changed"


@pytest.mark.parametrize("entry", _entries(lambda e: e.kept))
def test_third_party_existing_weight_norm_converted_preserves_function(entry: ThirdPartyEntry) -> None:
    """existing="convert" with init="preserve": the right unit axis everywhere, the same function."""
    model, batch, _, _ = _applied(entry.name)
    converted = wn.apply_weight_norm(model, batch, existing="convert", init="preserve")
    report = wn.weight_norm_report(converted)
    assert not _torch_weight_norms(converted), "torch's weight norm left in place"
    folded_model = wn.fold_weight_norm(model)  # the expected layouts, on plain weights
    expected = _expected_converted(entry, folded_model)
    assert {t.qualname: (t.layout.dim % len(t.shape), t.layout.groups) for t in report.converted} == expected
    assert {s.qualname for s in report.skipped} == set(entry.skipped)
    assert set(_parametrized(converted)) == set(expected)
    _assert_unit_layouts(converted, expected)
    _assert_same_outputs(_eval_outputs(converted, batch), _eval_outputs(model, batch))


@pytest.mark.parametrize("entry", _entries(lambda e: e.kept))
def test_third_party_existing_weight_norm_converted_with_data_init(entry: ThirdPartyEntry) -> None:
    model, batch, _, _ = _applied(entry.name)
    converted = wn.apply_weight_norm(model, batch, existing="convert")
    report = wn.weight_norm_report(converted)
    assert not _torch_weight_norms(converted)
    unreached = entry.unreached_weights(model, converted=True)
    assert set(report.notes.unreached) == unreached
    assert set(report.notes.constant_units) == set(entry.constant)
    weights = {t.qualname for t in report.converted} - unreached - set(entry.constant)
    assert weights >= set(entry.kept_weights(model)) - unreached
    _assert_standardized(converted, batch, weights)


# -- 2. training ---------------------------------------------------------------------------


@zoo
def test_third_party_one_training_step(entry: ThirdPartyEntry) -> None:
    original, batch, normalized, _ = _applied(entry.name)
    model = copy.deepcopy(normalized)
    model.train()
    torch.manual_seed(0)
    outputs = [t for t in _tensors(_call(model, batch)) if t.is_floating_point() and t.requires_grad]
    loss = sum((t.float() - 1).square().mean() for t in outputs)  # no vanishing gradient at a tiny output
    assert torch.isfinite(loss)
    loss.backward()
    chains = _parametrized(model)
    assert set(chains) >= set(entry.kept_weights(original))
    without_grad = []
    for name, chain in chains.items():
        for param in (chain.original0, chain.original1):
            if param.grad is None:
                without_grad.append(name)
            else:
                assert torch.isfinite(param.grad).all(), name
    expected_without = {n for n in chains if n.startswith(entry.no_grad)} if entry.no_grad else set()
    assert set(without_grad) == expected_without
    assert any(chain.original1.grad.abs().sum() > 0 for name, chain in chains.items() if name not in expected_without)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(".original1" in name for name in changed)
    after_step = _eval_outputs(model, batch)
    assert all(torch.isfinite(t.float()).all() for t in after_step)
    _assert_same_outputs(_eval_outputs(wn.fold_weight_norm(model), batch), after_step)  # no stale cached weight


# -- 3. folding ----------------------------------------------------------------------------


@zoo
def test_third_party_fold_gives_plain_weights_and_the_same_outputs(entry: ThirdPartyEntry) -> None:
    model, batch, normalized, _ = _applied(entry.name)
    expected = _eval_outputs(normalized, batch)
    folded = wn.fold_weight_norm(normalized)
    assert not any("parametrizations" in key for key in folded.state_dict())
    assert not _parametrized(folded)
    assert sorted(folded.state_dict()) == _plain_keys(model)
    assert {name: type(m) for name, m in folded.named_modules()} == _base_classes(model)
    assert type(folded) is type(model)
    _assert_same_outputs(_eval_outputs(folded, batch), expected)
    _assert_same_outputs(_eval_outputs(normalized, batch), expected, rtol=0)  # the normalized model is untouched


# -- 4. ONNX -------------------------------------------------------------------------------


def _onnxruntime_outputs(path: str, batch: Any) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if isinstance(batch, Tensor):
        feed = dict(zip(names, [batch.numpy()]))
    else:
        feed = {name: batch[name].numpy() for name in names}
    return session.run(None, feed)


@pytest.mark.parametrize("entry", _entries(lambda e: e.onnx_error is None))
def test_third_party_onnx_export_agrees_with_onnxruntime(entry: ThirdPartyEntry, tmp_path) -> None:
    model, batch, normalized, _ = _applied(entry.name)
    path = tmp_path / f"{entry.name}.onnx"
    report = wn.export_onnx(normalized, batch, path, **entry.onnx_kwargs)
    assert report.exporter == entry.onnx_exporter, report.fallback_reason
    if entry.onnx_exporter != "dynamo":
        assert re.search(entry.onnx_fallback, report.fallback_reason), report.fallback_reason
    got = _onnxruntime_outputs(str(path), batch)
    want = _eval_outputs(wn.fold_weight_norm(normalized), batch)
    _assert_same_outputs([torch.from_numpy(np.asarray(a)) for a in got], want, rtol=1e-3)


def test_a_tokenizers_batch_encoding_is_the_batch_and_the_export_warns_of_nothing(tmp_path, caplog) -> None:
    """A tokenizer returns a ``BatchEncoding`` (a ``UserDict``, not a dict): apply and export take it
    as the keyword inputs.  onnxscript's optimizer warns of each constant it could not fold (BERT's
    attention-mask arithmetic), a node it leaves as it was: held back, like torch's own noise."""
    import logging

    import transformers
    from transformers import BatchEncoding

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128)  # 512 positions, as BERT has: a slice the optimizer cannot fold
    ids = torch.randint(0, 100, (4, 12))
    encoding = BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    out = wn.apply_weight_norm(transformers.BertModel(config).eval(), encoding)
    assert len(wn.weight_norm_report(out).converted) == 13  # 6 linears per layer, and the pooler's
    with caplog.at_level(logging.WARNING):
        exported = wn.export_onnx(out, encoding, tmp_path / "bert.onnx")
    assert exported.exporter == "dynamo" and set(exported.inputs) == {"input_ids", "attention_mask"}
    assert [(r.name, r.getMessage()[:60]) for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("entry", _entries(lambda e: e.onnx_error is not None))
def test_third_party_onnx_export_failure_names_the_construct(entry: ThirdPartyEntry, tmp_path) -> None:
    _, batch, normalized, _ = _applied(entry.name)
    path = tmp_path / f"{entry.name}.onnx"
    with pytest.raises(wn.ExportError, match=entry.onnx_error):
        wn.export_onnx(normalized, batch, path, **entry.onnx_kwargs)
    assert not path.exists()
    assert not list(tmp_path.iterdir()), "a failed export left files behind"


# -- without a batch -------------------------------------------------------------------------


def test_third_party_gpt2_without_batch_error_says_how_to_find_its_weights() -> None:
    """GPT-2 cannot be traced without a batch, and its ``Conv1D`` is not one of torch's layer
    types, so the module walk finds nothing.  The model does have 8 weights that reach a matmul
    (found with a batch, above): the error must not say it has none, and must say that the trace
    failed and that a sample batch lets torch.export find them."""
    entry = next(e for e in THIRD_PARTY if e.name == "gpt2")
    with pytest.warns(UserWarning, match="could not trace"):
        with pytest.raises(wn.NoTargetsError, match=r"(?s)(could not trace|symbolic_trace).*sample_batch"):
            wn.plan_weight_norm(entry.model())


def test_the_cli_says_how_to_load_a_transformers_checkpoint_saved_under_older_names(tmp_path, capsys) -> None:
    """transformers 5 saves a ViT under its older checkpoint names (``encoder.layer.0.attention.
    attention.query``) while its modules are ``layers.0.attention.q_proj``: ``from_pretrained``
    renames them on load, ``load_state_dict`` cannot; the CLI's error says which route works."""
    from wn_transform.cli import main

    model = next(e for e in THIRD_PARTY if e.name == "vit").model()
    model.save_pretrained(tmp_path / "vit")
    assert main(["apply", "--model", "tests.third_party_zoo:_vit", "--checkpoint", str(tmp_path / "vit" / "model.safetensors"),
                 "--preserve", "-o", str(tmp_path / "o.pt")]) == 1
    assert ("(a transformers model: save_pretrained writes some models' weights under older names that from_pretrained "
            "renames on load; build it in the factory with from_pretrained(folder) and leave out --checkpoint)"
            in capsys.readouterr().err)
    assert not (tmp_path / "o.pt").exists()
