"""wn_transform beside Hugging Face ``accelerate``'s big-model tools (real accelerate, small models).

accelerate hooks a module that holds parameters by replacing its ``forward`` on the instance;
offloading (``cpu_offload``, ``dispatch_model`` with ``"cpu"``/``"disk"`` entries) keeps meta tensors
in the module between calls and loads the values from its ``weights_map`` in that hook.  For a
weight-normalized layer the holder of g and v is the parametrization list, so a weight read must
call it.  A model offloaded before weight norm holds its values under the old names: apply, fold
and export refuse it, naming the route that works.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import wn_transform as wn

accelerate = pytest.importorskip("accelerate")

pytestmark = pytest.mark.third_party


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _batch() -> torch.Tensor:
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("offload", ["cpu_offload", "disk", "checkpoint"])
def test_a_weight_normalized_model_offloaded_by_accelerate_computes_the_same_function(
        offload: str, grad: bool, tmp_path: Path) -> None:
    """Offloaded after weight norm: each layer's g and v are meta between calls, and the chain's
    hook loads them for the weight read (the fast getter would compute from the meta tensors)."""
    model, x = _mlp(), _batch()
    with torch.no_grad():
        expected = model(x)
    normalized = wn.apply_weight_norm(model)
    if offload == "cpu_offload":
        offloaded = accelerate.cpu_offload(normalized, execution_device=torch.device("cpu"))
    elif offload == "checkpoint":  # a model built empty, weight-normalized, loaded from its checkpoint
        torch.save(normalized.state_dict(), tmp_path / "model.bin")
        with accelerate.init_empty_weights():
            normalized = wn.apply_weight_norm(_mlp(), inplace=True)
        offloaded = accelerate.load_checkpoint_and_dispatch(
            normalized, str(tmp_path / "model.bin"), device_map={"0": "cpu", "2": "disk"}, offload_folder=str(tmp_path))
    else:
        offloaded = accelerate.dispatch_model(normalized, device_map={"0": "cpu", "2": "disk"}, main_device="cpu",
                                              offload_dir=str(tmp_path))
    assert normalized[2].parametrizations.weight.original1.is_meta  # offloaded indeed
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(offloaded(x), expected)


def test_a_hooked_model_folds_to_the_same_function() -> None:
    """accelerate keeps the class's forward of a hooked layer as ``_old_forward``: after the fold,
    the layer is a plain Linear again, called through that kept forward."""
    normalized, x = wn.apply_weight_norm(_mlp()), _batch()
    hooked = accelerate.dispatch_model(normalized, device_map={"": "cpu"}, force_hooks=True)
    with torch.no_grad():
        expected = hooked(x)
    for inplace in (False, True):
        folded = wn.fold_weight_norm(hooked, inplace=inplace)
        assert not wn.find_weight_norms(folded)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), expected)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_model_offloaded_by_accelerate_is_refused_by_apply_fold_and_export(when: str, tmp_path: Path) -> None:
    """Offloaded before weight norm: the hooks' ``weights_map`` holds ``0.weight``, which apply would
    rename; offloaded after: the values of g and v are not in the model to fold or export."""
    model, x = _mlp(), _batch()
    if when == "after":
        model = wn.apply_weight_norm(model)
    offloaded = accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(wn.WeightNormError, match=r"accelerate offloads \(module '0'.*apply weight norm before"):
        wn.apply_weight_norm(offloaded, x)
    with pytest.raises(wn.WeightNormError, match="accelerate offloads"):
        wn.plan_weight_norm(offloaded)
    if when == "after":
        with pytest.raises(wn.FoldError, match="accelerate offloads.*fold before offloading"):
            wn.fold_weight_norm(offloaded)
    else:  # no weight norm to fold: the model comes back as it is
        with torch.no_grad():
            torch.testing.assert_close(wn.fold_weight_norm(offloaded, inplace=True)(x), _mlp()(x))
    with pytest.raises(wn.ExportError, match="accelerate offloads.*without a device_map that offloads"):
        wn.export_onnx(offloaded, x, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("layout", ["plain", "torch"])
def test_assign_loads_a_bfloat16_checkpoint_into_a_meta_model_in_bfloat16(layout: str) -> None:
    """``load_state_dict(..., assign=True)`` makes the checkpoint's tensors the parameters, in their
    dtype: g and v converted from another layout are stored in the checkpoint's dtype too, as the
    bias is (a float32 g beside a bfloat16 bias could not run)."""
    source = _mlp()
    if layout == "torch":
        for layer in (source[0], source[2]):
            nn.utils.parametrizations.weight_norm(layer, dim=None)  # the whole tensor: another layout
    state = {key: value.bfloat16() for key, value in source.state_dict().items()}
    with torch.device("meta"):
        plain, model = _mlp(), _mlp()
    plain.load_state_dict({key: value.bfloat16() for key, value in _mlp().state_dict().items()}, assign=True)
    normalized = wn.apply_weight_norm(model, inplace=True)
    normalized.load_state_dict(state, assign=True)
    assert {p.dtype for p in normalized.parameters()} == {torch.bfloat16}
    x = _batch().bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(normalized(x), plain(x), rtol=2e-2, atol=2e-2)


def test_assign_refuses_a_float16_g_beyond_its_range() -> None:
    """Every element of the weight fits float16, their norm does not: the layer would compute NaN."""
    with torch.device("meta"):
        model = nn.Linear(4, 2)
    normalized = wn.apply_weight_norm(model, inplace=True)
    state = {"weight": torch.full((2, 4), 40000.0, dtype=torch.float16), "bias": torch.zeros(2, dtype=torch.float16)}
    with pytest.raises(wn.WeightNormError, match=r"weight: a unit's norm g = \|\|w\|\| = 80000 is beyond"):
        normalized.load_state_dict(state, assign=True)
