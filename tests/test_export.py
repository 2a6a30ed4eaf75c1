"""ONNX export: folded, dynamic in the batch, named like the model, verified, written atomically."""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import stat
import warnings
from typing import Any, ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

import wn_transform as wn
from wn_transform import export as export_mod
from wn_transform.cli import main
from wn_transform.errors import BatchError, WeightNormError
from wn_transform.export import (
    DEFAULT_TOLERANCES, ExportError, ExportMismatchError, ExportReport, ExportWarning, export_onnx,
)

WN_OPS = {"ReduceL2", "Div", "Sqrt", "Pow", "ReduceSumSquare", "LpNormalization"}
SAMPLE_BATCH, OTHER_BATCH, FRAMES = 2, 5, 9

# -- models --------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Two dilated convolutions (dilations 1 and 3), each behind a leaky ReLU, with residuals."""

    def __init__(self, channels: int, dilations: tuple[int, ...] = (1, 3)) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, 3, dilation=d, padding=d) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = x + conv(F.leaky_relu(x, 0.1))
        return x


class TinyHiFiGAN(nn.Module):
    """A HiFi-GAN-shaped generator: mel [B, 80, T] -> audio [B, 1, 4T]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_pre = nn.Conv1d(80, 32, 7, padding=3)
        self.ups = nn.ModuleList([nn.ConvTranspose1d(32, 16, 4, stride=2, padding=1),
                                  nn.ConvTranspose1d(16, 8, 4, stride=2, padding=1)])
        self.resblocks = nn.ModuleList([ResBlock(16), ResBlock(8)])
        self.conv_post = nn.Conv1d(8, 1, 7, padding=3)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(mel)
        for up, block in zip(self.ups, self.resblocks):
            x = block(up(F.leaky_relu(x, 0.1)))
        return torch.tanh(self.conv_post(F.leaky_relu(x, 0.01)))


def plain_hifigan() -> TinyHiFiGAN:
    torch.manual_seed(0)
    return TinyHiFiGAN()


def torch_wn_hifigan() -> TinyHiFiGAN:
    """torch's parametrizations.weight_norm everywhere, the legacy hook on conv_post."""
    model = plain_hifigan()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)) and name != "conv_post":
            torch_weight_norm(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(model.conv_post)
    return model


def ours_wn_hifigan() -> nn.Module:
    return wn.apply_weight_norm(plain_hifigan(), mel_batch(SAMPLE_BATCH))


def mel_batch(batch: int, frames: int = FRAMES, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 80, frames, generator=torch.Generator().manual_seed(seed))


class DictInOut(nn.Module):
    """Keyword inputs (mel, speaker), a dict of outputs (audio, energy)."""

    def __init__(self) -> None:
        super().__init__()
        self.mel_proj = nn.Conv1d(8, 6, 3, padding=1)
        self.speaker = nn.Linear(4, 6)
        self.head = nn.Conv1d(6, 2, 1)

    def forward(self, mel: torch.Tensor, speaker: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.mel_proj(mel) + self.speaker(speaker).unsqueeze(-1))
        out = self.head(h)
        return {"audio": torch.tanh(out[:, 0]), "energy": out.square().mean(dim=(1, 2))}


class TupleIn(nn.Module):
    """Two positional inputs (x, cond), a tuple of outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(6, 5, 3, padding=1)
        self.cond = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x) * torch.sigmoid(self.cond(cond)).unsqueeze(-1)
        return h, h.amax(dim=-1)


class DataDependent(nn.Module):
    """A Python branch on a tensor value: torch.export refuses it, the TorchScript tracer records it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().sum() >= 0:
            return self.lin(x)
        return -self.lin(x)


class RefusesExport(nn.Module):
    """Runs eagerly, raises under every exporter (non-strict export, dynamo, the TorchScript tracer)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            msg = "this model refuses to be exported"
            raise RuntimeError(msg)
        return self.lin(x)


class ExportsSomethingElse(nn.Module):
    """Computes ``lin(x)`` eagerly but ``lin(x) + 1`` in the exported graph: a certain mismatch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y + 1 if torch.onnx.is_in_onnx_export() else y


class ThroughIdentityOps(nn.Module):
    """Weights that reach their op through value-preserving ops (``.clone()``, ``* 1.0``, ``+ 0``).

    Both exporters fold those into new initializers named after the op (``clone``, ``mul``,
    ``onnx::Conv_12``) with the parameter's exact value; ``lin.weight`` reaches a ``MatMul``
    transposed, so no initializer holds its value.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.lin = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv1d(x, self.conv.weight.contiguous().clone(), self.conv.bias * 1.0)
        return F.linear(h, self.lin.weight.detach().clone(), self.lin.bias + 0)


class TwinBiases(nn.Module):
    """Two biases with the same value, both folded into op-named constants: ambiguous, not renamed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        with torch.no_grad():
            self.b.bias.copy_(self.a.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.a.weight, self.a.bias * 1.0), self.b.weight, self.b.bias * 1.0)


# -- helpers -------------------------------------------------------------------------------


def run_onnx(path: str, feed: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v.numpy() for k, v in feed.items()})))


def op_counts(path: str) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(path).graph.node)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close(got: np.ndarray, want: torch.Tensor) -> None:
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-4, atol=1e-5)


# -- the HiFi-GAN-like generator, in three flavours -----------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, ExportReport, dict, list[str]]]:
    """name -> (model after export, report, its state dict before export, progress messages)."""
    folder = tmp_path_factory.mktemp("hifigan")
    results = {}
    for name, build in {"plain": plain_hifigan, "torch_wn": torch_wn_hifigan, "ours": ours_wn_hifigan}.items():
        model = build()
        model.train()
        if name == "torch_wn":  # a forward with grad leaves the legacy hook's weight non-leaf
            model(mel_batch(1)).sum().backward()
            model.zero_grad()
        before = snapshot(model)
        messages: list[str] = []
        report = export_onnx(model, mel_batch(SAMPLE_BATCH), folder / f"{name}.onnx", progress=messages.append)
        results[name] = (model, report, before, messages)
    return results


@pytest.mark.parametrize("name", ["torch_wn", "ours"])
def test_onnxruntime_agrees_on_sample_and_other_batch_size(exported, name: str) -> None:
    model, report, _, _ = exported[name]
    assert report.exporter == "dynamo" and report.fallback_reason is None
    reference = wn.fold_weight_norm(model).eval()
    for batch in (SAMPLE_BATCH, OTHER_BATCH, 1):
        mel = mel_batch(batch, seed=batch + 10)
        got = run_onnx(report.path, {"mel": mel})
        assert list(got) == ["output"]
        with torch.no_grad():
            assert_close(got["output"], reference(mel))
            assert_close(got["output"], model(mel))  # the weight-normalized model itself
    graph_input = onnx.load(report.path).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert report.inputs == {"mel": ["batch", 80, FRAMES]}
    assert report.batch_sizes_checked == [SAMPLE_BATCH, SAMPLE_BATCH + 1]


@pytest.mark.parametrize("name", ["torch_wn", "ours"])
def test_graph_carries_no_weight_norm_arithmetic(exported, name: str) -> None:
    counts = op_counts(exported[name][1].path)
    plain = op_counts(exported["plain"][1].path)
    assert not WN_OPS & set(plain)
    assert not WN_OPS & set(counts)
    assert counts == plain


def test_unfolded_export_would_carry_it(tmp_path) -> None:
    """The check above can fail: exporting the parametrized model itself computes g*v/||v||."""
    path = str(tmp_path / "unfolded.onnx")
    model = torch_wn_hifigan().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (mel_batch(SAMPLE_BATCH),), path, dynamo=False)
    assert WN_OPS & set(op_counts(path))


@pytest.mark.parametrize("name", ["torch_wn", "ours"])
def test_initializers_keep_parameter_names(exported, name: str) -> None:
    model, report, _, _ = exported[name]
    folded = wn.fold_weight_norm(model)
    names = {init.name for init in onnx.load(report.path).graph.initializer}
    wanted = {k for k in folded.state_dict() if k.endswith((".weight", ".bias"))}
    assert "conv_pre.weight" in wanted and "ups.1.weight" in wanted and "conv_post.weight" in wanted
    assert wanted <= names
    assert not report.unnamed_parameters


@pytest.mark.parametrize("name", ["torch_wn", "ours"])
def test_report_fields_are_real(exported, name: str) -> None:
    _, report, _, _ = exported[name]
    proto = onnx.load(report.path)
    assert report.node_counts == dict(collections.Counter(n.op_type for n in proto.graph.node))
    assert report.node_count == len(proto.graph.node)
    assert report.initializer_count == len(proto.graph.initializer)
    assert report.initializer_bytes == sum(onnx.numpy_helper.to_array(i).nbytes for i in proto.graph.initializer)
    assert report.file_size == os.path.getsize(report.path)
    assert report.opset == next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert list(report.outputs) == [o.name for o in proto.graph.output] == list(report.max_abs_diff)
    assert 0 <= report.max_abs_diff["output"] <= 1e-5 + 1e-4
    assert 0 <= report.max_rel_diff["output"] < 1
    assert set(report.timings) == {"fold", "export", "check", "verify"}
    assert all(t >= 0 for t in report.timings.values())
    assert report.external_data is None and report.external_data_size == 0
    assert (report.rtol, report.atol) == DEFAULT_TOLERANCES[torch.float32]  # a float32 model: unchanged
    assert not report.other_values_checked and report.tracer_warnings == []  # dynamo: no trace to bake values in
    json.dumps(report.to_dict())
    text = str(report)
    assert report.path in text and "dynamo" in text and "Conv" in text and "max abs diff" in text


def test_small_model_is_one_self_contained_file(exported) -> None:
    _, report, _, _ = exported["torch_wn"]
    folder = os.path.dirname(report.path)
    assert sorted(os.listdir(folder)) == ["ours.onnx", "plain.onnx", "torch_wn.onnx"]  # no .data, no temporaries
    for init in onnx.load(report.path, load_external_data=False).graph.initializer:
        assert init.data_location == onnx.TensorProto.DEFAULT
        assert not init.external_data


def test_user_model_untouched_and_still_trains(exported) -> None:
    model, _, before, _ = exported["torch_wn"]
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(wn.find_weight_norms(model)) == 8  # 7 parametrized + 1 legacy, still there
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(mel_batch(SAMPLE_BATCH)).square().mean()
    loss.backward()
    optimizer.step()
    g = model.conv_pre.parametrizations.weight.original0
    assert g.grad is not None and model.conv_post.weight_g.grad is not None
    assert not torch.equal(g.detach(), before["conv_pre.parametrizations.weight.original0"])


def test_a_compiled_model_exports_as_the_model_inside_it(exported, tmp_path) -> None:
    """``export_onnx(torch.compile(model), ...)`` exports the model the wrapper holds."""
    model = exported["ours"][0]
    report = export_onnx(torch.compile(model, backend="eager"), mel_batch(SAMPLE_BATCH), tmp_path / "c.onnx")
    assert op_counts(report.path) == op_counts(exported["plain"][1].path)
    mel = mel_batch(OTHER_BATCH)
    with torch.no_grad():
        assert_close(run_onnx(report.path, {"mel": mel})["output"], wn.fold_weight_norm(model).eval()(mel))


def test_progress_names_each_step(exported) -> None:
    messages = " | ".join(exported["ours"][3])
    for word in ("fold", "export", "check", "verif", "wrote"):
        assert word in messages


def test_torchscript_exporter_forced(exported, tmp_path) -> None:
    model = exported["torch_wn"][0]
    report = export_onnx(model, mel_batch(SAMPLE_BATCH), tmp_path / "ts.onnx", exporter="torchscript")
    assert report.exporter == "torchscript" and report.fallback_reason is None
    assert report.other_values_checked and report.tracer_warnings == [] and report.notes == []
    assert "other values" in str(report)
    names = {init.name for init in onnx.load(report.path).graph.initializer}
    assert {k for k in wn.fold_weight_norm(model).state_dict() if k.endswith((".weight", ".bias"))} <= names
    assert op_counts(report.path) == op_counts(exported["plain"][1].path)
    mel = mel_batch(OTHER_BATCH)
    with torch.no_grad():
        assert_close(run_onnx(report.path, {"mel": mel})["output"], wn.fold_weight_norm(model).eval()(mel))


def test_explicit_dynamic_shapes(exported, tmp_path) -> None:
    """A dynamic time axis too, given in torch.export form; translated for TorchScript."""
    model = exported["ours"][0]
    reference = wn.fold_weight_norm(model).eval()
    for exporter in ("dynamo", "torchscript"):
        path = tmp_path / f"{exporter}.onnx"
        report = export_onnx(model, mel_batch(SAMPLE_BATCH), path, exporter=exporter,
                             dynamic_shapes={"mel": {0: "batch", 2: "frames"}})
        assert report.inputs["mel"] == ["batch", 80, "frames"]
        mel = mel_batch(3, frames=13)
        with torch.no_grad():
            assert_close(run_onnx(report.path, {"mel": mel})["output"], reference(mel))


class PadsToHop(nn.Module):
    """Pads the time axis to a multiple of the hop as codec encoders do; the TorchScript tracer
    bakes the pad width computed in Python for the sample's length."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = math.ceil(x.shape[-1] / 4) * 4 - x.shape[-1]
        return self.conv(F.pad(x, (0, extra)))


def test_every_declared_dynamic_axis_is_verified(tmp_path) -> None:
    torch.manual_seed(0)
    model, x = PadsToHop(), torch.randn(2, 1, 16)
    shapes = ({0: "batch", 2: "time"},)
    report = export_onnx(model, x, tmp_path / "dynamo.onnx", exporter="dynamo", dynamic_shapes=shapes)
    assert report.batch_sizes_checked == [2, 3, 2, 2]  # the sample, 'batch' grown, 'time' grown (16 -> 20, 21)
    with pytest.raises(ExportMismatchError, match=r"'time' grown, x\[2\]: 16 -> 20\): shape \[2, 2, 4\] instead of "
                       r"\[2, 2, 5\]; axis 'time' is marked dynamic") as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warning about converting a size to a Python number
        export_onnx(model, x, tmp_path / "torchscript.onnx", exporter="torchscript", dynamic_shapes=shapes)
    assert "'batch'" not in str(info.value)  # the batch axis verifies
    assert os.listdir(tmp_path) == ["dynamo.onnx"]


class _PadsOddLengths(nn.Module):
    """Pads an odd-length input to even before a stride-2 conv: a graph that baked in the sample's
    (even) branch is right at every even size and wrong at every odd one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1))
        return self.conv(x)


class _PadsOddFrames(nn.Module):
    """A stride-4 conv, a pad to an even frame count, then pairs of frames pooled (SEW pads its
    features so): the branch depends on the parity of a length derived from the input's (its
    frames), which an odd input size does not flip; the output's length follows the frames'."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if h.shape[-1] % 2:
            h = F.pad(h, (0, 1))
        return h.unflatten(-1, (-1, 2)).mean(-1)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_dynamic_axis_is_verified_where_a_derived_length_has_the_other_parity(exporter: str, tmp_path) -> None:
    x = torch.randn(2, 1, 32)  # 8 frames -> 4; grown to 40 (10 -> 5), then 44 (11 frames: the branch the sample skipped)
    with pytest.raises(ExportError, match=r"'time' grown, x\[2\]: 32 -> 44"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(_PadsOddFrames(), x, tmp_path / "frames.onnx", exporter=exporter,
                    dynamic_shapes=({0: "batch", 2: "time"},))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_dynamic_axis_is_verified_at_an_odd_and_an_even_size(exporter: str, tmp_path) -> None:
    x = torch.randn(2, 1, 16)
    with pytest.raises(ExportMismatchError, match=r"'time' grown, x\[2\]: 16 -> 21\): shape \[2, 2, 10\] instead of \[2, 2, 11\]"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(_PadsOddLengths(), x, tmp_path / "odd.onnx", exporter=exporter, dynamic_shapes=({0: "batch", 2: "time"},))
    assert os.listdir(tmp_path) == []


def test_the_parity_search_stops_where_every_output_length_moves_by_the_same_even_step(tmp_path) -> None:
    """An upsampler (64 samples per frame): its output length's parity never flips, so the search
    for a size that flips it ends after two steps of 64, not after all eight sizes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ConvTranspose1d(8, 1, 64, stride=64))
    lengths: list[int] = []
    model[0].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[-1]))
    export_onnx(model, torch.randn(1, 4, 20), tmp_path / "up.onnx", dynamic_shapes=({2: "frames"},))
    grown = sorted({n for n in lengths if n != 20})
    assert len(grown) == 3 and grown == list(range(grown[0], grown[0] + 3))


def test_a_mismatch_on_the_sample_batch_itself_does_not_blame_the_dynamic_axis(tmp_path) -> None:
    """Off on the sample batch already (here by float rounding against a tolerance of zero): the
    error must not advise marking the batch axis static, which would change nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 32, 5, padding=2), nn.Tanh(), nn.Flatten(), nn.Linear(32 * 16, 8))
    with pytest.raises(ExportMismatchError, match=r"'output' \(the sample batch\).*'batch' grown") as info:
        export_onnx(model, torch.randn(4, 4, 16), tmp_path / "m.onnx", rtol=0.0, atol=1e-12)
    assert "marked dynamic" not in str(info.value)


class ScaledAttention(nn.Module):
    """With ``bake``, scales attention scores by the sequence length computed in Python, which
    the TorchScript tracer bakes in.  ``shift`` (optional) is twice as long as ``x``."""

    def __init__(self, bake: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.bake = bake

    def forward(self, x: torch.Tensor, mask: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj(x)
        scores = h @ h.transpose(1, 2) / (int(x.shape[1]) if self.bake else 6) + mask
        out = torch.softmax(scores, -1) @ h
        return out if shift is None else out + shift[:, ::2]


@pytest.mark.parametrize("case", ["square-mask", "derived-dim"])
def test_an_axis_is_verified_wherever_it_appears(tmp_path, case: str) -> None:
    """A symbol on two axes of one input (a T x T mask), or in an expression (``2*T``): every axis
    that depends on it grows with it, so the grown batch is one the model accepts."""
    torch.manual_seed(0)
    x, mask = torch.randn(2, 6, 8), torch.zeros(2, 6, 6)
    if case == "square-mask":
        batch, shapes = (x, mask), ({0: "B", 1: "T"}, {0: "B", 1: "T", 2: "T"})
        grown = r"x\[1\]: 6 -> 7, mask\[1\]: 6 -> 7, mask\[2\]: 6 -> 7"
    else:
        T = torch.export.Dim("T", min=2, max=64)
        batch, shapes = (x, mask, torch.randn(2, 12, 8)), ({1: T}, {1: T, 2: T}, {1: 2 * T})
        grown = r"x\[1\]: 6 -> 7, mask\[1\]: 6 -> 7, mask\[2\]: 6 -> 7, shift\[1\]: 12 -> 14"
    report = export_onnx(ScaledAttention(bake=False).eval(), batch, tmp_path / "dynamo.onnx", exporter="dynamo",
                         dynamic_shapes=shapes)
    # the sample, (the batch grown,) the time axis grown to an odd and an even size
    assert report.notes == [] and len(report.batch_sizes_checked) == (4 if case == "square-mask" else 3)
    with pytest.raises(ExportMismatchError, match=rf"'T' grown, {grown}\): max abs diff"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(ScaledAttention(bake=True).eval(), batch, tmp_path / "torchscript.onnx", exporter="torchscript",
                    dynamic_shapes=shapes)


class HopFrames(nn.Module):
    """Takes only lengths that are a multiple of its hop, as frame-based audio models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4:
            msg = f"length {x.shape[-1]} is not a multiple of the hop 4"
            raise ValueError(msg)
        return self.conv(x).reshape(x.shape[0], 3, -1, 4).mean(-1)


def test_an_axis_the_model_refuses_to_grow_a_little_is_checked_at_twice_its_size(tmp_path) -> None:
    with pytest.warns(ExportWarning, match="Python boolean"):  # the hop check, `if x.shape[-1] % 4`
        report = export_onnx(HopFrames(), torch.randn(2, 2, 12), tmp_path / "hop.onnx", exporter="torchscript",
                             dynamic_shapes=({0: "B", 2: "T"},))
    assert report.batch_sizes_checked == [2, 3, 2, 2]  # T: 15 refused, 16 checked, then 20 (5 frames: odd)
    assert len(report.notes) == 1 and "TorchScript tracer warned" in report.notes[0]  # and nothing left unchecked


def test_a_dynamic_axis_of_size_zero_in_the_sample_is_a_note(tmp_path) -> None:
    report = export_onnx(nn.Linear(4, 3), torch.randn(0, 4), tmp_path / "empty.onnx", exporter="dynamo")
    assert report.batch_sizes_checked == [0]
    assert report.notes == ["dynamic axis 'batch' (input[0]) was not checked: it has size 0 in the sample batch"]


class LengthScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) / math.sqrt(x.shape[-1])  # Python math on the length: specialized


def test_an_axis_dynamic_shapes_asks_for_that_comes_out_fixed_is_an_error(tmp_path) -> None:
    shapes = ({0: torch.export.Dim("B"), 2: torch.export.Dim("T")},)
    with pytest.raises(ExportError, match=r"dynamic_shapes asks for axis 2 of input 'x' to be dynamic, but the dynamo "
                                          r"exporter fixed it to 16"):
        export_onnx(LengthScaled(), torch.randn(2, 4, 16), tmp_path / "m.onnx", exporter="dynamo", dynamic_shapes=shapes)
    assert os.listdir(tmp_path) == []


class MaskedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * mask.unsqueeze(-1)


@pytest.mark.parametrize(("shapes", "error"), [
    (({0: "b"},), r"dynamic_shapes has 1 entries for 2 positional inputs \(x, mask\)"),
    (({0: 3.5}, {0: "b"}), r"gives axis 0 of input 'x' as 3\.5: give a name"),
    (({3: "b"}, None), r"names axis 3 of input 'x', which has 3 axes"),
    (({1: torch.export.Dim("T", max=5)}, {1: torch.export.Dim("T", max=5)}),
     r"axis 1 of input 'x' is 10 in the sample batch, outside the range \[\d+, 5\] of Dim\('T'\)"),
], ids=["arity", "float", "axis", "range"])
def test_dynamic_shapes_no_exporter_can_honour_are_refused_before_any_export(tmp_path, shapes, error: str) -> None:
    """torch.export refuses them too, but under "auto" the TorchScript exporter would then write a
    file that ignores them."""
    with pytest.raises(ValueError, match=error):
        export_onnx(MaskedLinear(), (torch.randn(3, 10, 4), torch.ones(3, 10)), tmp_path / "m.onnx", dynamic_shapes=shapes)
    assert os.listdir(tmp_path) == []


class PaddedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x, src_key_padding_mask=padding)
        return self.attention(h, h, h, need_weights=False)[0]


def test_the_torchscript_exporter_takes_torchs_attention_layers_without_their_fused_kernels(tmp_path) -> None:
    """In eval mode without autograd, torch's attention layers run fused kernels that have no ONNX
    conversion; the export runs their ops instead (the same function, checked in onnxruntime)."""
    x, padding = torch.randn(3, 7, 16), torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    model = wn.apply_weight_norm(PaddedEncoder(), (x, padding)).eval()
    report = export_onnx(model, (x, padding), tmp_path / "m.onnx", exporter="torchscript")
    assert report.exporter == "torchscript" and torch.backends.mha.get_fastpath_enabled()
    ops = {node.op_type for node in onnx.load(tmp_path / "m.onnx").graph.node}
    assert "MatMul" in ops and not any(op.startswith("_") for op in ops)


class ExpertsByValue(nn.Module):
    """Routes rows by their values through Python (``unique().tolist()``): the trace keeps the
    experts the sample's rows went to, which a grown batch (its rows repeated) reaches again."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(4, 4)
        self.experts = nn.ModuleList([nn.Linear(4, 2) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.router(x)
        expert = h[:, 0].gt(0).long() + h[:, 1].gt(0).long()
        out = torch.zeros(x.shape[0], 2)
        for e in expert.unique().tolist():
            out[expert == e] = self.experts[e](h[expert == e])
        return out


@pytest.mark.parametrize("dynamic_batch", [True, False], ids=["dynamic-batch", "static"])
def test_a_graph_that_kept_the_samples_values_is_named_as_such_not_blamed_on_the_batch_axis(
        tmp_path, dynamic_batch: bool) -> None:
    torch.manual_seed(0)
    sample = torch.randn(6, 4)  # its rows go to experts in numbers that a grown batch (row 0 once more) changes
    model = wn.apply_weight_norm(ExpertsByValue(), sample)
    with pytest.raises(ExportMismatchError, match="depends on the values of the sample batch") as failure:
        export_onnx(model, sample, tmp_path / "m.onnx", dynamic_batch=dynamic_batch)
    assert "mark it static" not in str(failure.value)
    assert os.listdir(tmp_path) == []


def test_fixed_batch_when_asked(tmp_path) -> None:
    report = export_onnx(TupleIn(), (torch.randn(3, 6, 7), torch.randn(3, 4)), tmp_path / "fixed.onnx",
                         dynamic_batch=False, exporter="torchscript")
    assert report.inputs == {"x": [3, 6, 7], "cond": [3, 4]}
    assert report.batch_sizes_checked == [3]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_initializers_named_after_ops_are_renamed_back(tmp_path, exporter: str) -> None:
    torch.manual_seed(0)
    model = ThroughIdentityOps()
    report = export_onnx(model, torch.randn(2, 3, 7), tmp_path / "m.onnx", exporter=exporter)
    proto = onnx.load(report.path)
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert "conv.bias" in report.renamed_initializers.values()  # "mul" / "onnx::Conv_.." before
    assert all(old not in arrays for old in report.renamed_initializers)
    for name in ("conv.weight", "conv.bias", "lin.bias"):
        assert np.array_equal(arrays[name], model.state_dict()[name].numpy())
    assert report.unnamed_parameters == ["lin.weight"]  # transposed for MatMul: its value is not kept
    used = {name for node in proto.graph.node for name in node.input}
    assert {"conv.weight", "conv.bias"} <= used  # the nodes read the renamed initializers
    x = torch.randn(4, 3, 7)
    with torch.no_grad():
        assert_close(run_onnx(report.path, {"x": x})["output"], model(x))


def test_equal_values_are_not_guessed(tmp_path) -> None:
    report = export_onnx(TwinBiases(), torch.randn(2, 4), tmp_path / "m.onnx", exporter="torchscript")
    names = {i.name for i in onnx.load(report.path).graph.initializer}
    assert {"a.weight", "b.weight"} <= names
    assert not {"a.bias", "b.bias"} & names
    assert {"a.bias", "b.bias"} <= set(report.unnamed_parameters)
    assert not report.renamed_initializers


def test_a_float64_conv_that_onnxruntime_cannot_load_is_named_by_its_dtype(tmp_path) -> None:
    """onnxruntime's CPU provider has no double Conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3)).double()
    with pytest.raises(ExportError, match=r"cannot load the exported file: .*the model computes in float64"):
        export_onnx(model, torch.randn(2, 2, 8, dtype=torch.float64), tmp_path / "double.onnx")
    assert not (tmp_path / "double.onnx").exists()


class _WithExtraState(nn.Linear):
    """A layer that keeps metadata in its state dict (a quantization recipe, FP8 scaling history)."""

    def get_extra_state(self) -> dict:
        return {"recipe": "e4m3", "amax_history": [1.0, 2.0]}

    def set_extra_state(self, state: dict) -> None:
        """Nothing to restore: the metadata is fixed."""


def test_state_dict_entries_that_are_not_weights_are_no_initializers(tmp_path) -> None:
    """A module's ``_extra_state`` (a dict) is not a tensor, and a counter (BatchNorm's
    ``num_batches_tracked``) is in no graph: neither is taken for a weight the exporter renamed
    or transformed."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), _WithExtraState(16, 4)), x)
    report = export_onnx(model, x, tmp_path / "extra.onnx")
    with torch.no_grad():
        assert_close(run_onnx(report.path, {"input": x})["output"], model(x))
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    report = export_onnx(conv, torch.randn(2, 3, 8, 8), tmp_path / "bn.onnx")
    assert not any(name.endswith("num_batches_tracked") for name in report.unnamed_parameters)


def test_a_fake_quantizing_model_that_disagrees_is_told_the_quantization_step(tmp_path) -> None:
    """Quantization-aware training exports QuantizeLinear/DequantizeLinear; a value on a step's
    boundary may round to the neighbouring step in onnxruntime: a disagreement names the largest
    step (not data-dependent control flow, which the model has none of), and an atol of a few
    steps exports."""
    from torch.ao.quantization import DeQuantStub, QuantStub, default_qat_qconfig, disable_observer, prepare_qat

    class Quantized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.dq, self.fc1, self.fc2 = QuantStub(), DeQuantStub(), nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dq(self.fc2(torch.relu(self.fc1(self.q(x)))))

    torch.manual_seed(0)
    x = torch.randn(32, 8)
    model = wn.apply_weight_norm(Quantized(), x)
    model.qconfig = default_qat_qconfig
    prepared = prepare_qat(model.train())
    prepared(x)
    prepared.apply(disable_observer)
    prepared.eval()
    with pytest.raises(ExportMismatchError) as error:
        export_onnx(prepared, x, tmp_path / "qdq.onnx", exporter="torchscript", rtol=0, atol=0)
    assert "the model fake-quantizes (quantization-aware training; its largest step is" in str(error.value)
    assert "control flow" not in str(error.value) and not (tmp_path / "qdq.onnx").exists()
    step = max(float(m.scale.max()) for m in prepared.modules() if isinstance(m, torch.ao.quantization.FakeQuantizeBase))
    report = export_onnx(prepared, x, tmp_path / "qdq.onnx", exporter="torchscript", atol=3 * step)
    assert report.node_counts.get("QuantizeLinear", 0) > 0


# -- other input and output structures -------------------------------------------------------


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_dict_inputs_and_outputs(tmp_path, exporter: str) -> None:
    torch.manual_seed(0)
    model = DictInOut()
    for module in (model.mel_proj, model.speaker, model.head):
        torch_weight_norm(module)

    def batch(n: int) -> dict[str, torch.Tensor]:  # keys deliberately not in signature order
        return {"speaker": torch.randn(n, 4), "mel": torch.randn(n, 8, 5)}

    report = export_onnx(model, batch(3), tmp_path / "dict.onnx", exporter=exporter)
    assert report.exporter == exporter
    assert list(report.inputs) == ["mel", "speaker"]
    assert list(report.outputs) == ["audio", "energy"]
    reference = wn.fold_weight_norm(model).eval()
    other = batch(OTHER_BATCH)
    got = run_onnx(report.path, other)
    with torch.no_grad():
        want = reference(**other)
    assert_close(got["audio"], want["audio"])
    assert_close(got["energy"], want["energy"])


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_tuple_inputs_and_outputs(tmp_path, exporter: str) -> None:
    torch.manual_seed(0)
    model = wn.apply_weight_norm(TupleIn(), init="preserve")
    report = export_onnx(model, (torch.randn(3, 6, 7), torch.randn(3, 4)), tmp_path / "tuple.onnx",
                         exporter=exporter)
    assert list(report.inputs) == ["x", "cond"]
    assert list(report.outputs) == ["output_0", "output_1"]
    x, cond = torch.randn(OTHER_BATCH, 6, 7), torch.randn(OTHER_BATCH, 4)
    got = run_onnx(report.path, {"x": x, "cond": cond})
    with torch.no_grad():
        h, peak = wn.fold_weight_norm(model).eval()(x, cond)
    assert_close(got["output_0"], h)
    assert_close(got["output_1"], peak)
    assert {"conv.weight", "conv.bias", "cond.weight", "cond.bias"} <= {
        i.name for i in onnx.load(report.path).graph.initializer}


class NestedInputs(nn.Module):
    """A tuple argument, a dict argument, a float with a default, tied weights, an int input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor], extra: dict[str, torch.Tensor],
                scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = pair
        return self.lin(a + b * scale) + extra["bias"], self.head(self.emb(extra["ids"]))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_nested_inputs(tmp_path, exporter: str) -> None:
    torch.manual_seed(0)
    model = wn.apply_weight_norm(NestedInputs(), init="preserve", include="lin.weight")

    def batch(n: int) -> tuple:
        return (torch.randn(n, 4), torch.randn(n, 4)), {"bias": torch.randn(n, 3), "ids": torch.randint(0, 10, (n, 5))}

    report = export_onnx(model, batch(3), tmp_path / "nested.onnx", exporter=exporter)
    assert list(report.inputs) == ["pair_0", "pair_1", "extra_bias", "extra_ids"]
    assert not report.unnamed_parameters  # head.weight is emb.weight
    (a, b), extra = batch(OTHER_BATCH)
    got = run_onnx(report.path, {"pair_0": a, "pair_1": b, "extra_bias": extra["bias"], "extra_ids": extra["ids"]})
    with torch.no_grad():
        want = wn.fold_weight_norm(model).eval()((a, b), extra)
    assert_close(got["output_0"], want[0])
    assert_close(got["output_1"], want[1])


# -- fallback, failure, mismatch, files --------------------------------------------------------


def test_falls_back_to_torchscript_and_says_why(tmp_path) -> None:
    messages: list[str] = []
    with pytest.warns(ExportWarning):
        report = export_onnx(DataDependent(), torch.randn(3, 4), tmp_path / "dd.onnx", progress=messages.append)
    assert report.exporter == "torchscript"
    assert report.fallback_reason and "\n" not in report.fallback_reason and len(report.fallback_reason) <= 300
    assert "\x1b" not in report.fallback_reason
    assert any("falling back" in m for m in messages)
    assert "dynamo exporter failed" in str(report)
    assert os.listdir(tmp_path) == ["dd.onnx"]


@pytest.mark.parametrize("exporter", ["auto", "torchscript"])
def test_failed_export_leaves_nothing(tmp_path, exporter: str) -> None:
    with pytest.raises(ExportError, match="refuses to be exported") as info:
        export_onnx(RefusesExport(), torch.randn(3, 4), tmp_path / "m.onnx", exporter=exporter)
    assert isinstance(info.value, WeightNormError)
    if exporter == "auto":
        assert "both exporters failed" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_mismatch_raises_with_differences_and_leaves_nothing(tmp_path) -> None:
    with pytest.raises(ExportMismatchError) as info:
        export_onnx(ExportsSomethingElse(), torch.randn(3, 4), tmp_path / "m.onnx", exporter="torchscript")
    message = str(info.value)
    assert isinstance(info.value, WeightNormError)
    assert "'output'" in message and "max abs diff 1" in message and "max rel diff" in message
    assert os.listdir(tmp_path) == []


def test_tolerance_is_applied(tmp_path) -> None:
    """The same +1 passes with atol=1.5: the check is |onnx - torch| <= atol + rtol * |torch|."""
    report = export_onnx(ExportsSomethingElse(), torch.randn(3, 4), tmp_path / "m.onnx",
                         exporter="torchscript", atol=1.5, rtol=0)
    assert report.max_abs_diff["output"] == pytest.approx(1.0, abs=1e-6)


def test_refuses_to_overwrite_unless_asked(tmp_path) -> None:
    path = tmp_path / "exists.onnx"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="exists.onnx"):
        export_onnx(TupleIn(), (torch.randn(2, 6, 7), torch.randn(2, 4)), path, exporter="torchscript")
    assert path.read_bytes() == b"old"
    report = export_onnx(TupleIn(), (torch.randn(2, 6, 7), torch.randn(2, 4)), path, exporter="torchscript",
                         overwrite=True)
    onnx.checker.check_model(report.path)
    assert sorted(os.listdir(tmp_path)) == ["exists.onnx"]


def test_never_replaces_a_fifo_even_with_overwrite(tmp_path) -> None:
    """A device or FIFO at the output path (``/dev/null``) would be replaced by the final rename."""
    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    with pytest.raises(ExportError, match="not a regular file"):
        export_onnx(nn.Linear(4, 2), torch.randn(2, 4), fifo, overwrite=True)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.listdir(tmp_path) == ["out.onnx"]


@pytest.mark.parametrize(("how", "exporter"), [("forced", "torchscript"), ("automatic", "torchscript"),
                                               ("forced", "dynamo")])
def test_external_data(tmp_path, monkeypatch, how: str, exporter: str) -> None:
    """Every weight goes to the data file; an op's small operands (a Reshape's shape, a
    ReduceMean's axes, a Resize's scales) stay in the graph, where onnxruntime's shape inference
    reads them."""
    model = wn.apply_weight_norm(plain_hifigan(), init="preserve")
    if how == "automatic":
        monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", 1000)
    report = export_onnx(model, mel_batch(SAMPLE_BATCH), tmp_path / "big.onnx", exporter=exporter,
                         external_data=True if how == "forced" else None)
    assert report.exporter == exporter and report.fallback_reason is None
    data = str(tmp_path / "big.onnx.data")
    assert report.external_data == data
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert report.file_size == os.path.getsize(report.path) < report.initializer_bytes / 2
    assert report.external_data_size == os.path.getsize(data) > 0.9 * report.initializer_bytes
    for init in onnx.load(report.path, load_external_data=False).graph.initializer:
        external = init.data_location == onnx.TensorProto.EXTERNAL
        size = int(next(e.value for e in init.external_data if e.key == "length")) if external else len(init.raw_data)
        assert external == (size >= 1024), init.name
    onnx.checker.check_model(report.path)
    mel = mel_batch(OTHER_BATCH)
    with torch.no_grad():
        assert_close(run_onnx(report.path, {"mel": mel})["output"], wn.fold_weight_norm(model).eval()(mel))


# -- bad input -----------------------------------------------------------------------------


def test_rejects_non_module(tmp_path) -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        export_onnx(lambda x: x, torch.randn(2, 3), tmp_path / "m.onnx")


def test_batch_the_model_rejects_names_the_layer(tmp_path) -> None:
    with pytest.raises(BatchError, match="conv_pre"):
        export_onnx(torch_wn_hifigan(), torch.randn(2, 7, FRAMES), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_refuses_nan_batch(tmp_path) -> None:
    mel = mel_batch(SAMPLE_BATCH)
    mel[0, 0, 0] = float("nan")
    with pytest.raises(BatchError, match="NaN"):
        export_onnx(plain_hifigan(), mel, tmp_path / "m.onnx")


def test_a_model_or_batch_on_the_meta_device_is_refused_before_any_exporter_runs(tmp_path) -> None:
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    with pytest.raises(wn.ExportError, match=r"parameter '0\.bias' is on the meta device, which holds no values"):
        export_onnx(model.to("meta"), torch.randn(2, 4), tmp_path / "m.onnx")
    with pytest.raises(wn.ExportError, match="the sample batch's input 0 is on the meta device"):
        export_onnx(model.to_empty(device="cpu"), torch.randn(2, 4, device="meta"), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_a_small_integer_constant_stays_in_the_graph_with_external_data(tmp_path) -> None:
    """A ReduceMean's axes in the data file: onnxruntime's shape inference cannot read it there,
    and every dynamo export with external data failed its check."""

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv1d(4, 6, 3, padding=1), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x).mean(-1))

    x = torch.randn(3, 4, 7)
    model = wn.apply_weight_norm(Pooled(), x)
    report = export_onnx(model, x, tmp_path / "m.onnx", exporter="dynamo", external_data=True)
    assert report.exporter == "dynamo" and os.path.exists(tmp_path / "m.onnx.data")
    other = torch.randn(5, 4, 7)
    (got,) = run_onnx(report.path, {"x": other}).values()
    with torch.no_grad():
        assert_close(got, wn.fold_weight_norm(model).eval()(other))


@pytest.mark.parametrize(("shapes", "match"), [
    (({0: "batch", 2: "time"}, None, None), None),
    (([0, 2], None), r"gives input 'x' \(3 axes\) the list \[0, 2\]: a list has one entry per axis .* give a dict"),
    ((["batch", 4, 9], None), r"axis 2 of input 'x' the static size 9, but it is 7 in the sample batch"),
    ({"x": {0: "batch"}}, r"dynamic_shapes has no entry for 'mask': give one per input of the forward"),
    ({"x": {0: "batch"}, "mask": None, "extra": None}, r"dynamic_shapes names 'extra', which the sample batch does not give"),
])
def test_dynamic_shapes_that_would_leave_axes_static_unasked_are_refused(tmp_path, shapes, match) -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(4, 3, 1)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * mask.unsqueeze(1)

    x, mask = torch.randn(3, 4, 7), torch.ones(3, 7)
    if match is None:  # (a tuple of another length than the inputs stays refused, as before)
        with pytest.raises(ValueError, match="dynamic_shapes has 3 entries for 2 positional inputs"):
            export_onnx(Masked(), (x, mask), tmp_path / "m.onnx", dynamic_shapes=shapes)
        return
    with pytest.raises(ValueError, match=match):
        export_onnx(Masked(), (x, mask), tmp_path / "m.onnx", dynamic_shapes=shapes)
    assert not list(tmp_path.iterdir())


def test_an_exporters_message_that_announces_its_detail_keeps_it(tmp_path) -> None:
    """torch's "Found the following conflicts ...:" names the axis on its next line."""
    with pytest.raises(ExportError, match=r"conflicts between user-specified ranges and inferred ranges from model "
                                          r"tracing: - Received .* inferred a static shape of 8 for dimension"):
        export_onnx(nn.Linear(8, 3), torch.randn(2, 8), tmp_path / "m.onnx", exporter="dynamo",
                    dynamic_shapes=({0: "batch", 1: "features"},))


class _FrameBranch(nn.Module):
    """A strided conv, then a branch on the frame count's parity (a Python int: the TorchScript
    tracer bakes in the sample's path); ``pad``: pad an odd count (the outputs' lengths stay even)."""

    def __init__(self, *, pad: bool, time_major: bool = False) -> None:
        super().__init__()
        self.pad, self.time_major = pad, time_major
        self.down, self.out = nn.Conv1d(4, 6, 2, stride=2), nn.Conv1d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(1, 2, 0) if self.time_major else x  # (T, B, C) -> (B, C, T)
        h = self.down(x)
        if h.shape[-1] % 2 == 1:
            h = F.pad(h, (0, 1)) if self.pad else h * 2
        y = self.out(h)
        return y.permute(2, 0, 1) if self.time_major else y


@pytest.mark.parametrize(("pad", "time_major"), [(True, False), (False, True)], ids=["pads odd counts", "time-major"])
def test_a_graph_that_baked_in_a_parity_branch_is_caught(tmp_path, pad: bool, time_major: bool) -> None:
    """Padding keeps every output length even, so no size flips its parity: each size the search
    ran is checked in the file.  A time-major input's dim 0 is a length, not the batch: it gets the
    same search."""
    torch.manual_seed(0)
    x = torch.randn(16, 2, 4) if time_major else torch.randn(2, 4, 16)
    shapes = ({0: "time", 1: "batch"},) if time_major else ({0: "batch", 2: "time"},)
    model = wn.apply_weight_norm(_FrameBranch(pad=pad, time_major=time_major), x)
    with pytest.raises(wn.ExportMismatchError, match=r"'time' grown, x\[[02]\]: 16 -> 22"):
        export_onnx(model, x, tmp_path / "m.onnx", exporter="torchscript", dynamic_shapes=shapes)
    assert not list(tmp_path.iterdir())


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(plain_hifigan(), mel_batch(1), tmp_path / "m.onnx", exporter="onnxscript")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(plain_hifigan(), mel_batch(1), tmp_path / "missing" / "m.onnx")
    with pytest.raises(TypeError, match="sample_batch"):
        export_onnx(plain_hifigan(), "not a batch", tmp_path / "m.onnx")


class Expm1Head(nn.Module):
    """``aten::expm1``: no symbolic in the TorchScript exporter (opset 20)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.expm1(self.fc(x))


def test_a_failed_torchscript_export_prints_nothing(tmp_path, capfd: pytest.CaptureFixture[str]) -> None:
    """The exporter's C++ log of its IR graph (hundreds of lines, written to file descriptor 1)
    is held back: the error sums the failure up."""
    with pytest.raises(ExportError, match="expm1"):
        export_onnx(Expm1Head(), torch.randn(2, 4), tmp_path / "m.onnx", exporter="torchscript")
    out, err = capfd.readouterr()
    assert "graph" not in out and "graph" not in err


def test_an_export_logs_no_noise_from_torchs_registry(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """torch builds its registry of ONNX functions on every dynamo export and logs, at WARNING,
    each torchvision op it skips (torchvision is not installed here): noise, held back."""
    with caplog.at_level(logging.DEBUG, logger=export_mod._REGISTRY_LOGGER):
        export_onnx(nn.Linear(4, 4), torch.randn(2, 4), tmp_path / "m.onnx", exporter="dynamo")
    assert [r.getMessage() for r in caplog.records if r.name == export_mod._REGISTRY_LOGGER] == []


def test_an_opset_below_the_dynamo_exporters_falls_back_without_the_converters_traceback(
        tmp_path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """The dynamo exporter writes opset 18 and more; asked for 13, torch warns and onnxscript's
    converter logs its failure with a traceback.  The export reports the opset it wrote (and "auto"
    takes the TorchScript exporter, which writes 13): those logs are noise, held back."""
    with caplog.at_level(logging.WARNING):
        report = export_onnx(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(2, 4), tmp_path / "m.onnx", opset=13)
    assert (report.exporter, report.opset) == ("torchscript", 13)
    assert [r.getMessage()[:80] for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "Traceback" not in capfd.readouterr().err


def test_a_bfloat16_model_that_onnxruntime_cannot_load_is_told_what_to_do(tmp_path) -> None:
    """onnxruntime's CPU provider has no bfloat16 Gemm (1.31): the error names the dtype and the way out.
    (Where a later onnxruntime runs the file, the export is verified as any other.)"""
    x = torch.randn(6, 8, dtype=torch.bfloat16)
    model = wn.apply_weight_norm(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16), x)
    try:
        report = export_onnx(model, x, tmp_path / "m.onnx")
    except ExportError as exc:
        assert "the model computes in bfloat16" in str(exc) and "model.float()" in str(exc)
        assert os.listdir(tmp_path) == []
    else:
        assert report.max_abs_diff


class BroadcastRow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        return self.fc(x + row)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_row_broadcast_against_the_batch_keeps_its_size_1_axis(tmp_path, exporter: str) -> None:
    """A ``[1, 8]`` input beside a batch of 5 is broadcast, not batched: declared with the batch,
    the file would contradict the sample it was checked on."""
    report = export_onnx(BroadcastRow(), (torch.randn(5, 8), torch.randn(1, 8)), tmp_path / "m.onnx", exporter=exporter)
    assert report.inputs == {"x": ["batch", 8], "row": [1, 8]}
    assert report.batch_sizes_checked == [5, 6]


class UnusedInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_an_input_the_graph_does_not_use_is_in_the_file_or_noted(tmp_path, exporter: str) -> None:
    report = export_onnx(UnusedInput(), (torch.randn(3, 4), torch.randn(3, 2)), tmp_path / "m.onnx", exporter=exporter)
    note = [n for n in report.notes if "'extra' not in the file" in n]
    assert ("extra" in report.inputs) == (not note), (report.inputs, report.notes)


# -- a trace that holds for the sample batch only (TorchScript) -------------------------------


class RoutedExperts(nn.Module):
    """A mixture of experts written as many are: a Python loop over the experts the batch routes
    its tokens to.  torch.export refuses the loop; the TorchScript tracer unrolls it for the
    sample's experts (and their token counts), so the graph holds for batches routed alike only.
    ``ids``: token ids in, routed by embedding + position (as a transformer routes hidden states)."""

    def __init__(self, ids: bool, experts: int = 8, vocab: int = 16, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width) if ids else None
        self.position = nn.Parameter(torch.randn(6, width)) if ids else None
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.embed is None else self.embed(x) + self.position[: x.shape[-1]]
        tokens = h.reshape(-1, h.shape[-1])
        route = self.routes(tokens)
        out = torch.zeros_like(tokens)
        for expert in torch.unique(route):
            rows = torch.where(route == expert)[0]
            out = out.index_add(0, rows, self.experts[int(expert)](tokens[rows]))
        return out.reshape(h.shape)

    def routes(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.router(tokens).argmax(-1)

    def hit(self, x: torch.Tensor) -> set[int]:
        """The experts a batch routes to (the oracle for the test's premise)."""
        with torch.no_grad():
            h = x if self.embed is None else self.embed(x) + self.position[: x.shape[-1]]
            return set(self.routes(h.reshape(-1, h.shape[-1])).tolist())


def routed_batch(ids: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 16, (2, 3), generator=generator) if ids else torch.randn(6, 8, generator=generator)


@pytest.mark.parametrize("ids", [False, True], ids=["hidden-states", "token-ids"])
def test_a_trace_that_baked_in_the_samples_routing_is_an_error(tmp_path, ids: bool) -> None:
    """The grown batch repeats the sample's rows, so it routes alike and the file agrees; on the
    sample's values permuted (token ids stay valid ids) it does not, and the error says why."""
    torch.manual_seed(0)
    model, x = RoutedExperts(ids).eval(), routed_batch(ids)
    other, varied = export_mod._other_values(x)
    assert varied and model.hit(other) != model.hit(x)  # premise: the other values take another path
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ExportMismatchError) as info:
        warnings.simplefilter("always")
        export_onnx(model, x, tmp_path / "moe.onnx")
    message = str(info.value)
    assert "depends on the values of the sample batch" in message and "dynamo exporter failed" in message
    assert "Iterating over a tensor" in message and "test_export.py:" in message  # the tracer's warnings, quoted
    assert "torch.export" in message  # what to do
    assert not [w for w in caught if issubclass(w.category, (torch.jit.TracerWarning, ExportWarning))]
    assert os.listdir(tmp_path) == []


def test_tracer_warnings_on_a_file_that_verifies_are_one_warning_and_a_note(tmp_path) -> None:
    """A branch on a value that goes the same way for every batch: the file holds, the tracer's
    warning comes back once, as the library's, and in the report."""
    model = DataDependent()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_onnx(model, torch.randn(3, 4), tmp_path / "dd.onnx")
    ours = [w for w in caught if issubclass(w.category, ExportWarning)]
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert len(ours) == 1 and str(ours[0].message).startswith(report.path)
    assert ours[0].filename == __file__  # points at the call to export_onnx
    assert report.other_values_checked and len(report.tracer_warnings) == 1
    assert report.tracer_warnings[0].startswith('"Converting a tensor to a Python boolean')
    assert report.tracer_warnings[0].endswith(f"test_export.py:{DataDependent.forward.__code__.co_firstlineno + 1}")
    assert report.notes == [str(ours[0].message).removeprefix(f"{report.path}: ")]
    assert report.notes[0] in str(report)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_close(run_onnx(report.path, {"x": x})["output"], model(x))


class RejectsUnsortedRows(nn.Module):
    """Takes rows sorted in increasing order only; permuted values are not."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool((x[:, 1:] >= x[:, :-1]).all()):
            msg = "rows must be sorted"
            raise ValueError(msg)
        return self.lin(x)


def test_a_model_that_rejects_other_values_skips_that_check_with_a_note(tmp_path) -> None:
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0)).sort(-1).values
    with pytest.warns(ExportWarning, match="was not checked on other values"):
        report = export_onnx(RejectsUnsortedRows(), x, tmp_path / "sorted.onnx", exporter="torchscript")
    assert not report.other_values_checked and report.batch_sizes_checked == [3, 4]
    assert any("not checked on other values" in n and "rows must be sorted" in n for n in report.notes)
    sizes_row = next(line for line in str(report).splitlines() if line.startswith("batch sizes"))
    assert "other values" not in sizes_row  # the report claims no such run


def test_other_values_keep_structure_shapes_dtypes_and_each_tensors_values() -> None:
    generator = torch.Generator().manual_seed(1)
    batch = {"mel": torch.randn(2, 4, 5, generator=generator), "ids": torch.randint(0, 50, (2, 7), generator=generator),
             "mask": torch.rand(2, 7, generator=generator) > 0.5, "pair": (torch.arange(6.0).reshape(2, 3), 3),
             "half": torch.randn(3, 4, generator=generator).half()}
    other, varied = export_mod._other_values(batch)
    again, _ = export_mod._other_values(batch)
    assert varied and other.keys() == batch.keys() and other["pair"][1] == 3
    for key in ("mel", "ids", "half"):
        assert other[key].shape == batch[key].shape and other[key].dtype == batch[key].dtype
        assert not torch.equal(other[key], batch[key])  # other values ...
        assert torch.equal(other[key].flatten().sort().values, batch[key].flatten().sort().values)  # ... the same ones
        assert torch.equal(other[key], again[key])  # the same batch every time
    assert torch.equal(other["mask"], batch["mask"])  # bool: unchanged
    assert torch.equal(other["pair"][0].flatten().sort().values, batch["pair"][0].flatten())
    assert export_mod._other_values(torch.ones(3, 4))[1] is False  # nothing to vary


# -- tolerances by dtype ---------------------------------------------------------------------


def build_half_convnet() -> nn.Module:
    """A weight-normalized float16 conv net (a CLI factory too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 10))
    return wn.apply_weight_norm(model, image_batch(4)).half()


def image_batch(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_a_float16_model_is_verified_with_float16_tolerances(tmp_path) -> None:
    """float16 rounding is far above float32's tolerance: the defaults follow the dtype."""
    model, x = build_half_convnet(), image_batch(4).half()
    with pytest.raises(ExportMismatchError, match="rtol=0.0001, atol=1e-05"):  # float32's: the bug
        export_onnx(model, x, tmp_path / "strict.onnx", rtol=1e-4, atol=1e-5)
    report = export_onnx(model, x, tmp_path / "fp16.onnx")
    rtol, atol = DEFAULT_TOLERANCES[torch.float16]
    assert (report.rtol, report.atol) == (rtol, atol) and f"rtol={rtol:g}, atol={atol:g}" in str(report)
    assert report.max_abs_diff["output"] > DEFAULT_TOLERANCES[torch.float32][1]  # fp16 rounding, really
    other = image_batch(6, seed=5).half()
    with torch.no_grad():
        want = wn.fold_weight_norm(model).eval()(other).float().numpy()
    got = run_onnx(report.path, {"input": other})["output"]
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=rtol, atol=atol)


def test_a_tolerance_given_wins_and_the_other_follows_the_dtype(tmp_path) -> None:
    report = export_onnx(build_half_convnet(), image_batch(4).half(), tmp_path / "fp16.onnx", rtol=0.5)
    assert (report.rtol, report.atol) == (0.5, DEFAULT_TOLERANCES[torch.float16][1])
    with pytest.raises(ValueError, match="rtol and atol must be >= 0"):
        export_onnx(build_half_convnet(), image_batch(4).half(), tmp_path / "bad.onnx", atol=-1.0)


# -- the CLI's --rtol/--atol (the other CLI tests live in tests/test_cli.py) ---------------------


def build_exports_something_else() -> nn.Module:
    """A CLI factory: a model whose exported graph is off by exactly 1."""
    torch.manual_seed(0)
    return ExportsSomethingElse()


def test_cli_tolerances_reach_the_check(tmp_path, capsys) -> None:
    out, sample = tmp_path / "m.onnx", tmp_path / "x.pt"
    torch.save(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), sample)
    args = ["export", "--model", "tests.test_export:build_exports_something_else", "--sample", str(sample)]
    assert main([*args, "-o", str(out)]) == 1
    assert "beyond rtol=0.001, atol=1e-05" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--rtol", "0", "--atol", "1.5", "-o", str(out)]) == 0
    assert "(tolerance: rtol=0, atol=1.5)" in capsys.readouterr().out
    with torch.no_grad():
        want = build_exports_something_else()(torch.load(sample))
    np.testing.assert_allclose(run_onnx(str(out), {"x": torch.load(sample)})["output"] - want.numpy(), 1.0, rtol=1e-5)


def test_cli_exports_a_float16_model_with_its_dtypes_tolerances(tmp_path, capsys) -> None:
    out, sample = tmp_path / "fp16.onnx", tmp_path / "x.pt"
    torch.save(image_batch(4).half(), sample)
    assert main(["export", "--model", "tests.test_export:build_half_convnet", "--sample", str(sample),
                 "-o", str(out)]) == 0
    rtol, atol = DEFAULT_TOLERANCES[torch.float16]
    assert f"(tolerance: rtol={rtol:g}, atol={atol:g})" in capsys.readouterr().out
    with torch.no_grad():
        want = wn.fold_weight_norm(build_half_convnet()).eval()(image_batch(4).half()).float().numpy()
    np.testing.assert_allclose(run_onnx(str(out), {"input": image_batch(4).half()})["output"].astype(np.float32),
                               want, rtol=rtol, atol=atol)


@pytest.mark.parametrize(("option", "value"), [("--rtol", "-1"), ("--atol", "nan"), ("--rtol", "tight")])
def test_cli_refuses_a_bad_tolerance(tmp_path, capsys, option: str, value: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", "--model", "tests.test_export:build_half_convnet", "--input-shape", "1,3,8,8", option, value,
              "-o", str(tmp_path / "m.onnx")])
    assert info.value.code == 2
    assert f"argument {option}: must be a finite number >= 0" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


class _EventGaps(nn.Module):
    """Sorted event times per row -> log of the gaps -> conv -> max-pool: right for every valid input;
    permuted times are unsorted, and the log of a negative gap is NaN in both runtimes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 1)

    def forward(self, times: torch.Tensor) -> torch.Tensor:
        gaps = torch.log(times[:, 1:] - times[:, :-1]).unsqueeze(1)
        return torch.nn.functional.max_pool1d(self.conv(gaps), 2)


class _RankedTopK(nn.Module):
    """Per-row ranks (no ties in a row) -> features and the top-3 indices; permuted values tie."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 12)

    def forward(self, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(ranks), ranks.topk(3, dim=-1).indices


@pytest.mark.parametrize("case", ["nan-outside-the-domain", "topk-ties"])
def test_the_other_values_check_ignores_what_permuting_values_alone_changes(case: str, tmp_path) -> None:
    """Permuted values can leave the model's domain (NaN, which torch's max-pool carries and
    onnxruntime's does not) or tie (top-k indices break ties their own ways): neither is a graph
    that baked in the sample's path, and the export passes on the sample and grown batches."""
    torch.manual_seed(0)
    if case == "nan-outside-the-domain":
        model, batch = _EventGaps(), torch.cumsum(torch.rand(4, 9) + 0.1, dim=1)
    else:
        model, batch = _RankedTopK(), torch.stack([torch.randperm(12) for _ in range(6)]).float()
    model = wn.apply_weight_norm(model, batch)
    report = export_onnx(model, batch, tmp_path / "m.onnx", exporter="torchscript")
    assert report.other_values_checked
    with torch.no_grad():
        expected = wn.fold_weight_norm(model)(batch)
    (input_name,) = [graph_input.name for graph_input in onnx.load(report.path).graph.input]
    got = run_onnx(report.path, {input_name: batch})
    assert_close(next(iter(got.values())), expected[0] if isinstance(expected, tuple) else expected)


class _Varargs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fc(inputs[0]) + self.fc(inputs[1])


def _held_device(wrapper: nn.DataParallel) -> torch.device:
    """Where ``wrapper`` keeps its module: on a machine with one GPU, DataParallel moves it there."""
    return next(wrapper.parameters()).device


def test_a_forward_taking_star_args_exports_with_the_dynamic_batch(tmp_path) -> None:
    """``forward(self, *inputs)``: torch.export takes one dynamic-shape entry for the ``*inputs``
    tuple; the dynamo export works, with its batch axis verified."""
    torch.manual_seed(0)
    report = export_onnx(_Varargs(), (torch.randn(2, 4), torch.randn(2, 4)), tmp_path / "m.onnx")
    assert report.exporter == "dynamo" and report.batch_sizes_checked == [2, 3]


@pytest.mark.parametrize("nested", [False, True], ids=["DataParallel", "DataParallel-of-compiled"])
def test_a_data_parallel_wrapper_exports_as_the_module_it_holds(nested: bool, tmp_path) -> None:
    """DataParallel scatters over the GPUs (neither exporter takes it there); the file holds the
    wrapped module's function, its initializers named as in that module (no ``module.``), through
    nested wrappers too."""
    torch.manual_seed(0)
    inner = wn.apply_weight_norm(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), init="preserve")
    wrapped = nn.DataParallel(torch.compile(inner) if nested else inner)
    report = export_onnx(wrapped, torch.randn(2, 4, device=_held_device(wrapped)), tmp_path / "m.onnx")
    names = {init.name for init in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert names == {"0.weight", "0.bias", "2.weight", "2.bias"}, names
    assert report.unnamed_parameters == [] and report.exporter == "dynamo" and report.batch_sizes_checked == [2, 3]


def test_overwriting_an_external_data_export_with_an_inline_one_leaves_no_stale_data_file(tmp_path) -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4)
    path = tmp_path / "m.onnx"
    first = export_onnx(model, x, path, external_data=True)
    assert first.external_data is not None and (tmp_path / "m.onnx.data").exists()
    second = export_onnx(model, x, path, external_data=False, overwrite=True)
    assert second.external_data is None and sorted(os.listdir(tmp_path)) == ["m.onnx"]


class _LanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.out = nn.Linear(32, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.emb(ids))[0])


def test_an_output_axis_the_exporter_declared_fixed_but_that_follows_a_dynamic_axis_is_declared_dynamic(tmp_path) -> None:
    """torch's dynamo exporter declares an LSTM's output time at the sample's size; the values follow
    the dynamic time axis (verified at other lengths), so the file is corrected to declare it
    dynamic, and says so; onnxruntime then runs other lengths against a matching declaration."""
    import onnxruntime

    torch.manual_seed(0)
    model, ids = _LanguageModel(), torch.randint(0, 20, (2, 12))
    report = export_onnx(model, ids, tmp_path / "lm.onnx", dynamic_shapes=({0: "batch", 1: "time"},))
    if report.exporter != "dynamo" and torch.__version__ < "2.13":  # (TorchVersion compares as a version; pinned: 2.13)
        pytest.skip(f"torch {torch.__version__}'s dynamo exporter refuses the LSTM's dynamic time: {report.fallback_reason}")
    assert report.exporter == "dynamo", report.fallback_reason
    assert any("declared axis 1 (was 12) of a fixed size" in note for note in report.notes)
    (output,) = onnx.load(tmp_path / "lm.onnx").graph.output
    dims = [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim]
    assert dims[1] == "output_dim1" and dims[2] == 50
    assert report.outputs == {output.name: dims}  # the report gives the shapes the file declares
    assert f"{output.name} [{dims[0]}, output_dim1, 50]" in str(report)
    session = onnxruntime.InferenceSession(str(tmp_path / "lm.onnx"), providers=["CPUExecutionProvider"])
    other = torch.randint(0, 20, (3, 17))
    (got,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(other).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["existing folder", "missing folder with a separator"])
def test_a_folder_given_as_the_output_is_named_as_one_and_nothing_is_written(kind: str, tmp_path) -> None:
    path = tmp_path if kind == "existing folder" else f"{tmp_path / 'exports'}/"
    with pytest.raises(IsADirectoryError, match="folder"):
        export_onnx(nn.Linear(4, 3), torch.randn(2, 4), path)
    assert os.listdir(tmp_path) == []


class _TimeFirstBLSTM(nn.Module):
    """Demucs v2's bidirectional LSTM over time, then a Linear: torch 2.13's dynamo exporter bakes
    the time steps of the sample into a Reshape, so its file fails at any other length."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=8, hidden_size=8, bidirectional=True)
        self.linear = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.lstm(x.permute(2, 0, 1))[0]).permute(1, 2, 0)


def test_auto_gives_up_a_dynamo_file_that_fails_its_checks_for_the_torchscript_exporters(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6)
    model = wn.apply_weight_norm(_TimeFirstBLSTM(), x).eval()
    path = tmp_path / "blstm.onnx"
    report = wn.export_onnx(model, x, path, dynamic_shapes=({2: "T"},))
    # the dynamo exporter either raises or writes a file fixed to T = 6 (torch 2.13 does both, by the state of its caches)
    assert report.exporter == "torchscript" and report.fallback_reason
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for steps in (7, 13):
        other = torch.randn(2, 8, steps)
        with torch.no_grad():
            expected = model(other).numpy()
        np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: other.numpy()})[0], expected,
                                   rtol=1e-4, atol=1e-5)


def test_auto_retries_with_torchscript_when_the_dynamo_file_fails_verification(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control flow of the retry, whatever torch's exporters do today: the dynamo file's first
    check fails, the TorchScript file is checked (and written); with ``exporter="dynamo"`` the
    failure is the error."""
    verified: list[str] = []
    real = export_mod._verify

    def verify(session, *args, **kwargs):
        verified.append("call")
        if len(verified) == 1:
            msg = "onnxruntime disagrees with PyTorch (made up by the test)"
            raise wn.ExportMismatchError(msg)
        return real(session, *args, **kwargs)

    monkeypatch.setattr(export_mod, "_verify", verify)
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4)
    report = wn.export_onnx(model, x, tmp_path / "a.onnx")
    assert report.exporter == "torchscript" and len(verified) == 2
    assert report.fallback_reason == "file failed its checks (ExportMismatchError: onnxruntime disagrees with PyTorch (made up by the test))"
    verified.clear()
    with pytest.raises(wn.ExportMismatchError, match=r"^onnxruntime disagrees with PyTorch \(made up by the test\)$"):
        wn.export_onnx(model, x, tmp_path / "b.onnx", exporter="dynamo")
    assert not (tmp_path / "b.onnx").exists()


class _PaddedCodec(nn.Module):
    """EnCodec-style padding computed in Python from the length (TorchScript bakes it), and a
    data-dependent branch (the dynamo exporter refuses it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.up = nn.Conv1d(1, 4, 8, stride=4), nn.ConvTranspose1d(4, 1, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        y = self.up(torch.relu(self.conv(F.pad(x, (2, 2 + math.ceil(length / 4) * 4 - length)))))
        if y.abs().max() > 100:
            y = y / 100
        return y[..., :length]


def test_a_torchscript_file_that_fails_after_the_fallback_says_why_dynamo_was_given_up(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 40)
    model = wn.apply_weight_norm(_PaddedCodec(), x)
    with pytest.raises(wn.ExportError, match=r"mark it static.*\[this is the TorchScript exporter's file: the dynamo "
                                             r"exporter's export failed \(.+\)\]$"):
        wn.export_onnx(model, x, tmp_path / "codec.onnx", dynamic_shapes=({2: "T"},))
    assert not os.listdir(tmp_path)


def test_an_upsampler_exported_with_external_data_keeps_its_resize_scales_inline(tmp_path) -> None:
    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(self.conv(x), scale_factor=2.0, mode="nearest")

    x = torch.randn(2, 3, 8, 8)
    model = wn.apply_weight_norm(Up(), x)
    report = export_onnx(model, x, tmp_path / "up.onnx", exporter="dynamo", external_data=True)
    assert report.exporter == "dynamo" and report.external_data_size == os.path.getsize(tmp_path / "up.onnx.data") > 0


def test_auto_says_why_dynamos_file_was_given_up_when_torchscript_fails_too(tmp_path) -> None:
    with pytest.raises(ExportError, match=r"^both exporters failed; dynamo: its file failed its checks \(ExportError: "
                                          r"opset 3 was asked for.*; the TorchScript exporter failed: .*3"):
        export_onnx(nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh()), torch.randn(2, 2, 8), tmp_path / "m.onnx", opset=3)


class _OneRowPath(nn.Module):
    """A batch of one takes another path (SeamlessM4T's code HiFi-GAN branches on it), through an
    op the TorchScript exporter cannot write at opset 20 (``expm1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.expm1(self.lin(x))
        return y.reshape(4) if x.shape[0] == 1 else y.sum(0)


def test_when_both_exporters_fail_the_dynamo_files_diagnosis_is_kept_whole(tmp_path) -> None:
    """exporter='auto': the dynamo file fails on the grown batch, the TorchScript exporter cannot
    export at all; the error keeps the library's advice (mark the axis static), which comes after
    onnxruntime's long message, not onnxruntime's text alone."""
    x = torch.randn(1, 4)
    model = wn.apply_weight_norm(_OneRowPath(), x, init="preserve")
    with pytest.raises(ExportError, match=r"^both exporters failed; dynamo: its file failed its checks \(ExportError: "
                                          r"onnxruntime failed to run the exported file on 'batch' grown.*axis 'batch' "
                                          r"is marked dynamic.*mark it static.*\); the TorchScript exporter failed: "
                                          r"UnsupportedOperatorError.*expm1"):
        export_onnx(model, x, tmp_path / "m.onnx")
    assert not os.listdir(tmp_path)


class _UnrunnableReshape(torch.autograd.Function):
    """The identity eagerly; in the TorchScript exporter's graph, a Reshape no input can take."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def symbolic(g, x):
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor([1, 4, 2])))


class _Unrunnable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch_weight_norm(nn.Conv1d(1, 4, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UnrunnableReshape.apply(self.conv(x))


def test_a_file_that_cannot_run_the_sample_itself_is_not_said_to_agree_on_it(tmp_path) -> None:
    """onnxruntime fails on the sample batch (snac 1.2.1's TorchScript file fails a Reshape on every
    input): the error says so; it is not blamed on a path the trace baked in, as a failure on the
    grown batches alone would be."""
    model = _Unrunnable()
    with pytest.raises(ExportError, match=r"^onnxruntime failed to run the exported file on the sample batch: .*Reshape") as info:
        export_onnx(model, torch.randn(1, 1, 64), tmp_path / "m.onnx", exporter="torchscript")
    assert info.value.on_sample and "agrees with PyTorch on the sample batch" not in str(info.value)
    assert not os.listdir(tmp_path)


class _Noisy(nn.Module):
    """SNAC's ``NoiseBlock``: noise drawn in the forward, in inference mode too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn(x.shape[0], 1, x.shape[2]) * self.conv(x)


def test_a_model_that_draws_noise_in_its_forward_is_named_as_random(tmp_path) -> None:
    """No file can agree with a random model: the error says PyTorch disagrees with itself and names
    the op, instead of blaming the exporter; the caller's random state is as it was."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(_Noisy(), init="preserve")
    x = torch.randn(2, 2, 16)
    reference = model(x)
    state = torch.random.get_rng_state()
    assert export_mod._random_ops(model, x, reference) == "torch.randn"
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ExportMismatchError, match=r"^PyTorch itself gives other outputs on another run of the same "
                                                  r"sample batch: the model draws random numbers in inference mode "
                                                  r"\(torch\.randn\)"):
        export_onnx(model, x, tmp_path / "m.onnx", exporter="torchscript")
    assert not os.listdir(tmp_path)
    with pytest.raises(ExportMismatchError, match=r"^onnxruntime disagrees"):  # a deterministic one that disagrees
        _export_off(tmp_path, "off", delta=1.0)
    counting = wn.apply_weight_norm(_Counting(), init="preserve")  # other outputs each run, drawing nothing
    with pytest.raises(ExportMismatchError, match=r"^PyTorch itself gives other outputs on another run of the same "
                                                  r"sample batch: its outputs change from run to run \(state kept"):
        export_onnx(counting, torch.randn(2, 4), tmp_path / "c.onnx", exporter="torchscript")


class _Counting(nn.Module):
    """State kept across calls (a call counter, as a streaming module's cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x) + self.calls


class _LogOfLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(x)
        return y.log(), y  # NaN where y < 0


def test_an_output_that_is_nan_in_pytorch_is_noted_and_warned_of(tmp_path) -> None:
    """NaN agrees with NaN position for position: the file passes, but the report and a warning say
    that PyTorch's own values are not finite there (a float16 model whose g overflowed)."""
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    model = wn.apply_weight_norm(_LogOfLinear(), init="preserve")
    nan = int(model(x)[0].isnan().sum())
    assert nan > 0
    with pytest.warns(ExportWarning, match=rf"output 'output_0': PyTorch's own output on the sample batch holds {nan} NaN of 48"):
        report = export_onnx(model, x, tmp_path / "m.onnx")
    notes = [n for n in report.notes if "PyTorch's own output" in n]
    assert len(notes) == 1 and notes[0].startswith("output 'output_0'")  # the finite output_1 has none


class _MaskedPool(nn.Module):
    """A length ``T`` that the input and its mask share; ``baked`` divides by the length as a Python
    number, which a TorchScript trace keeps as the sample's."""

    def __init__(self, baked: bool) -> None:
        super().__init__()
        self.conv, self.out, self.baked = nn.Conv1d(4, 8, 3, padding=1), nn.Linear(8, 2), baked

    def forward(self, x: torch.Tensor, mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = (self.conv(x) * mask[:, None, :]).sum(-1)
        return self.out(h / float(x.shape[-1]) if self.baked else h / mask.sum(-1, keepdim=True)) + z.mean(-1, keepdim=True)


@pytest.mark.parametrize("baked", [False, True])
def test_length_axes_named_apart_that_the_model_needs_equal_are_checked_together(tmp_path, baked: bool) -> None:
    """Axes named apart (``--dynamic x:2,mask:1`` names them x_dim2 and mask_dim1) that the model
    rejects grown alone are grown together: a file that baked the sample's length in is refused, not
    written with the length unchecked; a right one is written with a note that says so."""
    torch.manual_seed(0)
    batch = (torch.randn(2, 4, 16), torch.ones(2, 16), torch.randn(2, 16))  # z: a free length, 16 here too
    model = wn.apply_weight_norm(_MaskedPool(baked), batch, init="preserve")
    shapes = ({0: "batch", 2: "x_dim2"}, {0: "batch", 1: "mask_dim1"}, {0: "batch", 1: "z_dim1"})
    path = tmp_path / "m.onnx"
    if baked:
        with pytest.raises(ExportMismatchError, match=r"'x_dim2' and 'mask_dim1' grown, x\[2\]: 16 -> 20, mask\[1\]: 16 -> 20"):
            export_onnx(model, batch, path, dynamic_shapes=shapes, exporter="torchscript")
        assert not os.listdir(tmp_path)
        return
    report = export_onnx(model, batch, path, dynamic_shapes=shapes, exporter="torchscript")
    assert any("'x_dim2', 'mask_dim1' were checked grown together" in note for note in report.notes)
    assert not any("'z_dim1'" in note for note in report.notes)  # the free axis of one size: grown alone
    assert not any("was not checked" in note for note in report.notes)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, mask, z = torch.randn(3, 4, 40), torch.ones(3, 40), torch.randn(3, 9)
    (got,) = session.run(None, {"x": x.numpy(), "mask": mask.numpy(), "z": z.numpy()})
    np.testing.assert_allclose(got, model(x, mask, z).detach().numpy(), rtol=1e-4, atol=1e-5)


class _Detector(nn.Module):
    """A detector head's ``[boxes in pixels | class probabilities]`` along the last axis (YOLO's
    ``[B, N, 4 + C]``); the exported graph adds ``offset`` to the probabilities."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.head, self.offset = nn.Linear(8, 6), offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(x)
        boxes, probs = 320 * torch.sigmoid(y[..., :4]), torch.sigmoid(y[..., 4:])
        if torch.onnx.is_in_onnx_export():
            probs = probs + self.offset
        return torch.cat([boxes, probs], -1)


@pytest.mark.parametrize("offset", [0.0, 0.05])
def test_probabilities_beside_pixel_boxes_are_held_to_their_own_scale(tmp_path, offset: float) -> None:
    """The rtol floor is the output's typical magnitude; here the boxes' (about 160) would let every
    probability be off by 0.16.  Slices of different scales along an axis get floors of their own:
    probabilities off by 0.05 are refused (and not called rounding), a right file passes."""
    torch.manual_seed(0)
    x = torch.randn(2, 50, 8)
    model = wn.apply_weight_norm(_Detector(offset), init="preserve")
    path = tmp_path / "m.onnx"
    if not offset:
        export_onnx(model, x, path, exporter="torchscript", dynamic_batch=False)
        return
    with pytest.raises(ExportMismatchError, match=r"max abs diff 0\.05") as info:
        export_onnx(model, x, path, exporter="torchscript", dynamic_batch=False)
    assert "float rounding can make" not in str(info.value) and not os.listdir(tmp_path)


def test_an_output_of_one_scale_keeps_one_floor() -> None:
    """Per-slice floors only where slices' scales are 100 times apart; never stricter than a hundredth
    of the whole output's, nor looser than it."""
    rng = np.random.default_rng(0)
    even = rng.standard_normal((4, 32, 6))
    assert isinstance(export_mod._floor_magnitudes(even), float)
    mixed = np.concatenate([300 * rng.random((4, 32, 4)), 0.3 + 0.4 * rng.random((4, 32, 2))], -1)
    floors = export_mod._floor_magnitudes(mixed)
    whole = export_mod._floor_magnitude(mixed)
    assert floors.shape == (1, 1, 6) and whole > 30
    own = [np.median(np.abs(mixed[..., j])) for j in range(6)]
    np.testing.assert_allclose(floors[0, 0, 4:], np.maximum(own[4:], whole / 100))  # about 0.5, or whole / 100
    assert np.all(floors[0, 0, :4] == whole)  # their own (about 150) is above the whole output's
    assert isinstance(export_mod._floor_magnitudes(mixed.astype(np.float16), half=True), float)


class _Flagged(nn.Module):
    """A Hugging Face-style forward: named tensors, and a ``**kwargs`` that collects a flag."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> Any:
        h = self.lin(x) * mask[..., None]
        return (h, h.sum(-1)) if kwargs.get("output_sums") else h


class _WithFlag(nn.Module):
    """diffusers' ``return_dict``: a named flag beside the tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor, return_dict: bool = True) -> Any:
        out = self.a(x) + self.b(y)
        return {"out": out} if return_dict else (out,)


def test_a_flag_in_the_batch_keeps_the_batch_axis_named(tmp_path) -> None:
    """torch.export names the axes by the exporter's symbols (s17) when a flag sits among the inputs:
    the tensors go in flat, and the file's axes are named ``batch`` as without the flag."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(_WithFlag(), init="preserve")
    path = tmp_path / "m.onnx"
    report = export_onnx(model, {"x": torch.randn(2, 4), "y": torch.randn(2, 3), "return_dict": False}, path)
    assert report.exporter == "dynamo" and report.inputs == {"x": ["batch", 4], "y": ["batch", 3]}
    graph = onnx.load(str(path)).graph
    assert [i.type.tensor_type.shape.dim[0].dim_param for i in graph.input] == ["batch", "batch"]


class _NestedSameName(nn.Module):
    """A dict input with an entry named as a top-level input, and a flag."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, extras: dict, flag: bool = False) -> torch.Tensor:
        return self.lin(x).sum(0) + self.lin(extras["x"]).sum(0)


def test_a_dict_inputs_entry_named_like_a_top_level_input_keeps_its_own_axes(tmp_path) -> None:
    """``{"extras": {"x": ...}}``'s spec is that entry's, not the top-level ``x``'s (which took the
    other axis, and the entry came out fixed)."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(_NestedSameName(), init="preserve")
    batch = {"x": torch.randn(2, 4), "extras": {"x": torch.randn(3, 4)}, "flag": True}
    shapes = {"x": {0: "batch"}, "extras": {"x": {0: "n_extra"}}, "flag": None}
    report = export_onnx(model, batch, tmp_path / "m.onnx", dynamic_shapes=shapes)
    assert report.exporter == "dynamo"
    assert isinstance(report.inputs["x"][0], str) and isinstance(report.inputs["extras_x"][0], str)
    assert report.inputs["x"][0] != report.inputs["extras_x"][0]


class _AllKeywords(nn.Module):
    """peft's ``PeftModel.forward(*args, **kwargs)``: every input under ``**kwargs``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Flagged()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("model", [_Flagged, _AllKeywords])
def test_inputs_a_var_keyword_collects_export_with_dynamo_and_dynamic_axes(tmp_path, model: type) -> None:
    """torch.export takes no dynamic shapes for what ``**kwargs`` collects: the tensors go in flat
    and the flag stays a constant, so the dynamo exporter keeps the batch (and a named length)
    dynamic instead of falling back to TorchScript."""
    torch.manual_seed(0)
    batch = {"x": torch.randn(2, 5, 4), "mask": torch.ones(2, 5), "output_sums": True}
    normalized = wn.apply_weight_norm(model(), init="preserve")
    report = export_onnx(normalized, batch, tmp_path / "m.onnx")
    assert report.exporter == "dynamo" and report.fallback_reason is None and report.batch_sizes_checked == [2, 3]
    axes = {"x": {0: "batch", 1: "T"}, "mask": {0: "batch", 1: "T"}}  # keyed as torch.export binds the forward
    shapes = {**axes, "kwargs": None} if model is _Flagged else {"kwargs": axes}
    report = export_onnx(normalized, batch, tmp_path / "t.onnx", dynamic_shapes=shapes)
    assert report.exporter == "dynamo" and report.inputs["x"] == ["batch", "T", 4]
    session = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    x, mask = torch.randn(3, 7, 4), torch.ones(3, 7)
    got = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})
    for value, expected in zip(got, normalized(x=x, mask=mask, output_sums=True)):
        np.testing.assert_allclose(value, expected.detach().numpy(), rtol=1e-5, atol=1e-6)


class _ThreeLengths(nn.Module):
    """An input, its mask and its positions, one length the model needs equal in all three."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return (self.lin(x + positions[..., None]) * mask[..., None]).sum(1)


def test_three_axes_named_apart_that_the_model_needs_equal_are_grown_all_together(tmp_path) -> None:
    """No pair of the three can grow alone (the third refuses): all of them grow together."""
    torch.manual_seed(0)
    batch = (torch.randn(2, 8, 4), torch.ones(2, 8), torch.arange(8.0).expand(2, 8).contiguous())
    model = wn.apply_weight_norm(_ThreeLengths(), init="preserve")
    shapes = ({0: "batch", 1: "T1"}, {0: "batch", 1: "T2"}, {0: "batch", 1: "T3"})
    report = export_onnx(model, batch, tmp_path / "m.onnx", dynamic_shapes=shapes, exporter="torchscript")
    assert any("'T1', 'T2', 'T3' were checked grown together" in note for note in report.notes), report.notes
    assert not any("was not checked" in note for note in report.notes)


class _FlattenOnlyOutput(collections.OrderedDict):
    """diffusers' ``BaseOutput``: a dict-like output class registered as a pytree node with a flatten
    function alone (no key paths, on which ``tree_flatten_with_path`` raises)."""


torch.utils._pytree.register_pytree_node(_FlattenOnlyOutput, lambda out: (list(out.values()), list(out.keys())),
                                         lambda values, keys: _FlattenOnlyOutput(zip(keys, values)))


class _ReturnsFlattenOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> _FlattenOnlyOutput:
        y = self.conv(sample)
        return _FlattenOnlyOutput(denoised=y, energy=y.square().mean((1, 2, 3)))


def test_an_output_class_registered_without_key_paths_is_named_by_its_keys(tmp_path) -> None:
    """A diffusers model's default output (``UNet2DOutput``) made the export crash inside torch's
    pytree code; its tensors are named by their keys."""
    torch.manual_seed(0)
    model = wn.apply_weight_norm(_ReturnsFlattenOnly(), init="preserve")
    report = export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    assert list(report.max_abs_diff) == ["denoised", "energy"] and max(report.max_abs_diff.values()) < 1e-4


# -- tolerances relative to the output's scale, and near misses ---------------------------------


class _OffInTheGraph(nn.Module):
    """``lin(x)`` eagerly; the exported graph adds ``delta`` to every element, and ``slope`` times
    how far the input is from the sample batch (a buffer): off on other values only."""

    def __init__(self, sample: torch.Tensor, delta: float = 0.0, slope: float = 0.0) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 16)
        self.register_buffer("sample", sample.clone())
        self.delta, self.slope = delta, slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if torch.onnx.is_in_onnx_export():
            return y + self.delta + self.slope * (x - self.sample).abs().sum(-1, keepdim=True)
        return y


def _export_off(tmp_path, name: str, **off: float) -> wn.ExportReport:
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    model = _OffInTheGraph(x, **off)
    return export_onnx(model, x, tmp_path / f"{name}.onnx", exporter="torchscript", dynamic_batch=False)


def _eager_output() -> tuple[torch.Tensor, float]:
    """``_export_off``'s output in PyTorch, and the allowance of its elements near zero: rtol of
    its typical magnitude (no zeros, sentinels or outliers here: its median), plus atol."""
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    y = _OffInTheGraph(x).lin(x).detach()
    rtol, atol = DEFAULT_TOLERANCES[torch.float32]
    return y, atol + rtol * float(y.abs().median())


def test_the_tolerance_is_relative_to_the_outputs_scale_not_to_an_element_near_zero(tmp_path) -> None:
    """An offset of a quarter of the allowance of the output's typical magnitude reaches every
    element, one near zero too (elementwise, that element would be off by far more than rtol of
    itself): rounding of this kind agrees; an offset of the output's own scale does not, with no
    hint at rounding."""
    y, allowance = _eager_output()
    assert float(y.abs().min()) * DEFAULT_TOLERANCES[torch.float32][0] < 0.1 * allowance  # an element near zero
    report = _export_off(tmp_path, "rounding", delta=0.25 * allowance)  # (the permuted batch's quantile is another)
    assert report.max_abs_diff["output"] == pytest.approx(0.25 * allowance, rel=1e-2)
    assert report.max_rel_diff["output"] > 2 * DEFAULT_TOLERANCES[torch.float32][0]  # elementwise, it would fail
    with pytest.raises(ExportMismatchError) as info:
        _export_off(tmp_path, "wrong", delta=float(y.abs().median()))
    assert "float rounding can make" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["rounding.onnx"]  # the wrong file was not written


def test_a_near_miss_names_rounding_and_the_tolerance_options(tmp_path) -> None:
    """Off by a few times the allowance: the error says rounding can make that and how to allow it."""
    _, allowance = _eager_output()
    with pytest.raises(ExportMismatchError, match=r"beyond rtol=0.001, atol=1e-05: 'output' \(the sample batch\).*"
                                                  r"the worst difference is [0-9.]+ times the tolerance: float "
                                                  r"rounding can make that much.*--rtol/--atol"):
        _export_off(tmp_path, "near", delta=2 * allowance)


def test_other_values_off_by_a_near_miss_without_tracer_warnings_are_not_blamed_on_control_flow(tmp_path) -> None:
    """The TorchScript file agrees on the sample batch and is off by a near miss on permuted values:
    with no TracerWarning, the error names the rounding, not a baked path; off by the output's
    scale, it is blamed on the values the trace depended on."""
    _, allowance = _eager_output()
    with pytest.raises(ExportMismatchError) as info:  # about twice the allowance on the permuted batch
        _export_off(tmp_path, "near", slope=0.2 * allowance)
    message = str(info.value)
    assert message.startswith("on a batch of the sample's shapes with other values (each input's values permuted), "
                              "onnxruntime disagrees with PyTorch beyond rtol=0.001")
    assert "float rounding can make that much" in message and "data-dependent control flow" not in message
    with pytest.raises(ExportMismatchError, match=r"^the exported graph depends on the values of the sample batch"):
        _export_off(tmp_path, "far", slope=1.0)


class _MaskedLogits(nn.Module):
    """Logits with most classes masked by ``finfo.min`` (a sentinel, the majority of the output), or
    the argmax ids (``ids=True``); the exported graph adds 1 to the real logits, 5 to the ids."""

    def __init__(self, ids: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 16)
        self.register_buffer("allowed", torch.arange(16) < 4)
        self.ids = ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        off = torch.onnx.is_in_onnx_export()
        logits = torch.where(self.allowed, self.lin(x) + (1.0 if off else 0.0), torch.finfo(torch.float32).min)
        return logits.argmax(-1) * 10_000 + (5 if off else 0) if self.ids else logits


@pytest.mark.parametrize("ids", [False, True])
def test_a_sentinel_majority_or_large_integer_ids_do_not_loosen_the_check(ids: bool, tmp_path) -> None:
    """The output's typical magnitude leaves out a repeated sentinel (12 of 16 logits at
    ``finfo.min``): the real logits, off by 1, are a mismatch; integer outputs must be equal, so
    ids up to 30,000 off by 5 are one too."""
    x = torch.randn(8, 4)
    with pytest.raises(ExportMismatchError) as info:
        export_onnx(_MaskedLogits(ids), x, tmp_path / "m.onnx", exporter="torchscript", dynamic_batch=False)
    assert re.search(r"'output'[^;]*: max abs diff 5\b" if ids else r"'output'[^;]*: max abs diff 1\b", str(info.value))
    assert not os.listdir(tmp_path)


def test_the_check_judges_masked_logits_and_repeated_rows_at_the_scale_of_their_real_values() -> None:
    """The comparison itself: logits masked by adding -10000 (70 % of them, all distinct) leave the
    real logits judged at their own scale, so a file off by 5 there is caught while rounding at
    5e-5 of their scale passes (not elementwise: a logit near zero carries it too); a batch of one
    grown to two identical rows is judged as the row."""
    from wn_transform.export import _compare, _output_floors

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 64))
    masked = rng.random((4, 64)) < 0.7
    want = torch.from_numpy(np.where(masked, logits - 10000.0, logits).astype(np.float32))
    rounding = want.numpy() + (5e-5 * rng.standard_normal((4, 64))).astype(np.float32)
    rtol, atol = DEFAULT_TOLERANCES[torch.float32]
    assert _compare(rounding, want, rtol, atol)[2]
    assert not _compare(want.numpy() + np.where(masked, 0.0, 5.0).astype(np.float32), want, rtol, atol)[2]
    row = torch.from_numpy(logits[:1].astype(np.float32))
    off = row.numpy() + (3e-5 * rng.standard_normal((1, 64))).astype(np.float32)
    single = _compare(off, row, rtol, atol)
    grown = _compare(np.concatenate([off, off]), torch.cat([row, row]), rtol, atol, floor=_output_floors(row)[0])
    assert single[2] and grown[2] and grown[4] == single[4]


def test_a_batch_of_one_grown_to_repeated_rows_is_judged_with_the_samples_scale(tmp_path) -> None:
    """A vocoder's or a streaming model's sample is one example; the batch axis is checked on two
    copies of it, whose every value is held twice (the share of a sentinel in a small output):
    judged with the sample's typical magnitude, rounding that the sample passes passes there too."""
    torch.manual_seed(0)
    x = torch.randn(1, 4)
    model = _OffInTheGraph(x)
    y = model.lin(x).detach()
    rtol, atol = DEFAULT_TOLERANCES[torch.float32]
    model.delta = 0.5 * (atol + rtol * float(y.abs().median()))
    assert float(y.abs().min()) * rtol + atol < model.delta  # elementwise, the smallest element would fail
    report = export_onnx(model, x, tmp_path / "one.onnx", exporter="torchscript")
    assert report.batch_sizes_checked[:2] == [1, 2]


def test_a_sample_batch_that_repeats_a_row_is_judged_as_the_row() -> None:
    """The typical magnitude counts a repeated row once: a sample of two equal rows, each value held
    twice, is not taken for sentinels (which would leave nothing and make the check elementwise)."""
    from wn_transform.export import _floor_magnitude

    row = np.random.default_rng(0).standard_normal((1, 40))
    assert _floor_magnitude(np.concatenate([row, row])) == _floor_magnitude(row) == pytest.approx(np.median(np.abs(row)))
    assert _floor_magnitude(np.zeros((0, 4))) == _floor_magnitude(np.zeros((2, 0))) == 0.0  # empty outputs
    sentinel = np.where(np.arange(40) < 30, -1e9, row)  # 30 of 40 masked: left out, whatever their share
    assert _floor_magnitude(sentinel) == pytest.approx(np.median(np.abs(row[0, 30:])))


# -- dynamic shapes as given, outputs as returned, inputs as named ------------------------------


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(3, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_negative_axis_in_dynamic_shapes_is_the_axis_counted_from_the_end(tmp_path, exporter: str) -> None:
    """``{-1: "T"}`` is the last axis: torch 2.13's dynamo exporter ignores a negative axis (and the
    export blamed the model for fixing it), its TorchScript exporter aborts the process on one."""
    model, path = _Conv(), str(tmp_path / "m.onnx")
    report = export_onnx(model, torch.randn(2, 3, 16), path, dynamic_shapes=({0: "batch", -1: "T"},), exporter=exporter)
    assert report.exporter == exporter and report.inputs == {"x": ["batch", 3, "T"]}
    assert report.batch_sizes_checked[:2] == [2, 3] and len(report.batch_sizes_checked) > 2  # T grown too
    other = torch.randn(3, 3, 23)
    assert_close(run_onnx(path, {"x": other})["output"], model(other))


def test_an_axis_given_twice_from_both_ends_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"gives axis 2 of input 'x' twice, as 2 and as -1: give each axis once"):
        export_onnx(_Conv(), torch.randn(2, 3, 16), tmp_path / "m.onnx", dynamic_shapes=({2: "T", -1: "U"},))
    assert os.listdir(tmp_path) == []


class _TwoSequences(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x).mean(1), self.fc(y).mean(1)


@pytest.mark.parametrize("dim", ["T", torch.export.Dim("T")], ids=["name", "Dim"])
def test_one_axis_name_for_axes_of_different_sizes_is_refused(tmp_path, dim: Any) -> None:
    """The file would declare x[1] and y[1] one length (onnxruntime warns on the sample itself), and
    the verification could only grow them together."""
    shapes = ({0: "batch", 1: dim}, {0: "batch", 1: dim})
    with pytest.raises(ValueError, match=r"axis 1 of input 'x' \(8 in the sample batch\) and axis 1 of input 'y' "
                                         r"\(10\) both 'T'.*give them different names"):
        export_onnx(_TwoSequences(), (torch.randn(2, 8, 4), torch.randn(2, 10, 4)), tmp_path / "m.onnx",
                    dynamic_shapes=shapes)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["batch-size", "time.steps", "2T"])
def test_an_axis_name_that_is_not_an_identifier_is_refused(tmp_path, name: str) -> None:
    """The file's dims are read back as expressions of names (``2*T``): ``batch-size`` would be
    ``batch - size`` (neither axis verified), ``time.steps`` an attribute access."""
    with pytest.raises(ValueError, match=rf"axis 2 of input 'x' '{re.escape(name)}', which is not a Python identifier"):
        export_onnx(_Conv(), torch.randn(2, 3, 16), tmp_path / "m.onnx", dynamic_shapes=({0: "batch", 2: name},))
    assert os.listdir(tmp_path) == []


def test_a_dim_that_is_no_expression_of_its_names_is_one_symbol() -> None:
    """A file from elsewhere may name a dim anything: what sympy would read as something other than an
    expression of the names in it is one symbol, never an error."""
    from sympy import Symbol

    from wn_transform.dynamic_axes import _parse

    assert _parse("time.steps") == Symbol("time.steps")  # sympy: AttributeError ('steps' of a Symbol)
    assert _parse("lambda") == Symbol("lambda") and _parse("E") == Symbol("E")  # not sympy's constant e
    assert _parse("2*T") == 2 * Symbol("T") and _parse("s0 + 1") == Symbol("s0") + 1


class _IntegerHead(nn.Module):
    """A float output beside an integer one computed from an integer input."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.fc, self.kind = nn.Linear(4, 2), kind

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), ids.cumsum(1) if self.kind == "cumsum" else ids // 2


def test_an_output_of_another_dtype_than_pytorchs_is_a_mismatch(tmp_path) -> None:
    """The TorchScript exporter keeps an int32 cumsum int32, where PyTorch promotes it to int64: equal
    on the sample, the file wraps around on counts PyTorch holds."""
    counts = torch.randint(0, 5, (2, 4), dtype=torch.int32)
    with pytest.raises(ExportMismatchError, match=r"'output_1' \(the sample batch\): dtype int32 instead of "
                                                  r"PyTorch's int64"):
        export_onnx(_IntegerHead("cumsum"), (torch.randn(2, 4), counts), tmp_path / "m.onnx", exporter="torchscript")
    assert os.listdir(tmp_path) == []
    from wn_transform.export import _compare

    ones = torch.ones(3)
    assert not _compare(ones.double().numpy(), ones, 1e-3, 1e-5)[2]  # float64 where PyTorch gives float32
    assert _compare(ones.numpy(), ones, 1e-3, 1e-5)[2]


def test_integer_outputs_are_compared_exactly_beyond_float64s_integers(tmp_path) -> None:
    """int64 values near -2**60 that differ by 1 (the TorchScript exporter's floor division truncates)
    are one float64: compared as integers, they differ."""
    ids = torch.tensor([[-(2**60) - 1, -(2**60) - 3], [-(2**60) - 5, -(2**60) - 7]])
    with pytest.raises(ExportMismatchError, match=r"'output_1' \(the sample batch\): 4 of 4 elements differ, "
                                                  r"max abs diff 1,"):
        export_onnx(_IntegerHead("floordiv"), (torch.randn(2, 4), ids), tmp_path / "m.onnx", exporter="torchscript")
    assert os.listdir(tmp_path) == []
    from wn_transform.export import _compare

    big = torch.tensor([2**60, 2**60 + 2])
    assert not _compare(big.numpy() + 1, big, 1e-3, 1e-5)[2] and _compare(big.numpy(), big, 0.0, 0.0)[2]


class _RowFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 4)

    def forward(self, row: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + row)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_row_given_before_the_batch_keeps_its_size_1_axis(tmp_path, exporter: str) -> None:
    """The batch size is not the first input's dim 0 when that is a row broadcast against the batch:
    the row stays static, the batch is ``batch``, and the file takes other batch sizes."""
    model, path = _RowFirst(), str(tmp_path / "m.onnx")
    row = torch.randn(1, 8)
    report = export_onnx(model, (row, torch.randn(5, 8)), path, exporter=exporter)
    assert report.inputs == {"row": [1, 8], "x": ["batch", 8]}
    assert report.batch_sizes_checked == [5, 6]
    other = torch.randn(7, 8)
    assert_close(run_onnx(path, {"row": row, "x": other})["output"], model(row, other))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("form", ["one per input", "torch.export's"])
def test_dynamic_shapes_of_a_star_args_forward_in_either_tuple_form(tmp_path, exporter: str, form: str) -> None:
    """``forward(self, *inputs)``: a tuple with one spec per input, as for any forward, or
    torch.export's own (one entry for ``*inputs``, a tuple over them)."""
    torch.manual_seed(0)
    specs = ({0: "batch"}, {0: "batch"})
    shapes = specs if form == "one per input" else (specs,)
    report = export_onnx(_Varargs(), (torch.randn(2, 4), torch.randn(2, 4)), tmp_path / "m.onnx",
                         dynamic_shapes=shapes, exporter=exporter)
    assert report.exporter == exporter
    assert report.inputs == {"inputs_0": ["batch", 4], "inputs_1": ["batch", 4]}
    assert report.batch_sizes_checked == [2, 3]


class _WithLength(nn.Module):
    def __init__(self, constant: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.constant = nn.Conv1d(3, 4, 3, padding=1), constant

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self.conv(x), 3 if self.constant else x.shape[0]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_python_int_read_off_a_dynamic_axis_is_a_0d_output(tmp_path, exporter: str) -> None:
    """Both exporters write ``x.shape[0]`` as a 0-d int64 output; it is compared as one."""
    path = str(tmp_path / "m.onnx")
    report = export_onnx(_WithLength(), torch.randn(2, 3, 16), path, exporter=exporter)
    assert report.outputs["output_1"] == [] and report.max_abs_diff["output_1"] == 0.0
    got = run_onnx(path, {"x": torch.randn(5, 3, 16)})["output_1"]
    assert got.dtype == np.int64 and int(got) == 5


def test_a_constant_python_number_output_is_named_in_the_error(tmp_path) -> None:
    with pytest.raises(ExportError, match=r"the model returns Python numbers beside its tensors \('output_1' = 3\)"):
        export_onnx(_WithLength(constant=True), torch.randn(2, 3, 16), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


class _PairAndX0(nn.Module):
    """``x`` a pair, whose parts would be named ``x_0``, ``x_1``, beside an input named ``x_0``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: tuple[torch.Tensor, torch.Tensor], x_0: torch.Tensor) -> torch.Tensor:
        a, b = x
        return self.fc(a) + 2 * self.fc(b) + 3 * self.fc(x_0)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_nested_input_named_like_a_top_level_one_gets_a_name_of_its_own(tmp_path, exporter: str) -> None:
    model, path = _PairAndX0(), str(tmp_path / "m.onnx")
    a, b, c = torch.randn(3, 2, 4)
    report = export_onnx(model, ((a, b), c), path, exporter=exporter)
    assert list(report.inputs) == ["x_0_in", "x_1", "x_0"]
    a, b, c = torch.randn(3, 5, 4)
    assert_close(run_onnx(path, {"x_0_in": a, "x_1": b, "x_0": c})["output"], model((a, b), c))


class _Registered(nn.Module):
    """A base class that registers its subclasses by name (a model zoo's registry)."""

    registry: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _Registered.registry[cls.__name__] = cls


class _RegisteredNet(_Registered):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("batch", ["tensor", "with a flag"])
def test_the_export_does_not_subclass_the_models_class(tmp_path, batch: str) -> None:
    """The TorchScript exporter (and the dynamo one beside a flag) takes the tensors flat: the model's
    class gets no subclass, whose ``__init_subclass__`` would replace the registry's entry."""
    model = _RegisteredNet() if batch == "tensor" else _WithFlag()
    sample = torch.randn(2, 4) if batch == "tensor" else {"x": torch.randn(2, 4), "y": torch.randn(2, 3),
                                                           "return_dict": False}
    before = dict(_Registered.registry)
    export_onnx(model, sample, tmp_path / "m.onnx", exporter="torchscript" if batch == "tensor" else "auto")
    assert _Registered.registry == before and _Registered.registry["_RegisteredNet"] is _RegisteredNet
    assert type(model).__subclasses__() == []


def test_an_existing_weights_file_is_refused_before_the_work_when_the_size_decides(tmp_path, monkeypatch) -> None:
    """``external_data=None`` on a model above the threshold: ``<path>.data`` is refused before the
    model runs, not after the export and its verification."""
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", 10)
    path = tmp_path / "m.onnx"
    (tmp_path / "m.onnx.data").write_text("another export's weights")
    steps: list[str] = []
    with pytest.raises(FileExistsError, match=r"m\.onnx\.data already exists; pass overwrite=True"):
        export_onnx(_Conv(), torch.randn(2, 3, 16), path, progress=steps.append)
    assert steps == ["folding weight norm into plain weights (on a copy)"]
    assert os.listdir(tmp_path) == ["m.onnx.data"]
    assert (tmp_path / "m.onnx.data").read_text() == "another export's weights"


def test_a_dim_0_that_torch_export_finds_static_is_named_with_the_way_around_it(tmp_path) -> None:
    """A GNN's ``edge_index [2, E]``: the default dynamic batch makes every input's dim 0 dynamic,
    torch.export finds that one static, and TorchScript's file (``index_add_`` with repeated indices)
    disagrees; the error says how to export (and that way verifies)."""

    class MessagePassing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.message, self.out = nn.Linear(32, 16), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
            src, dst = edge_index
            messages = torch.relu(self.message(torch.cat([x[src], x[dst]], -1)))
            return self.out(torch.zeros_like(x).index_add_(0, dst, messages))

    generator = torch.Generator().manual_seed(3)
    batch = (torch.randn(10, 16, generator=generator), torch.randint(0, 10, (2, 30), generator=generator))
    torch.manual_seed(0)
    model = wn.apply_weight_norm(MessagePassing(), batch)
    with pytest.raises(wn.ExportError, match=r"axis 0 of input 'edge_index' static.*pass dynamic_batch=False"):
        wn.export_onnx(model, batch, tmp_path / "gnn.onnx")
    assert not (tmp_path / "gnn.onnx").exists()
    assert wn.export_onnx(model, batch, tmp_path / "gnn.onnx", dynamic_batch=False).exporter == "dynamo"


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_batch_of_one_beside_a_1d_table_keeps_its_batch_axis(tmp_path, exporter: str) -> None:
    """``forward(text [1, T], lengths [1], scales [3])`` (Piper/VITS): the batch size is that of the
    inputs of 2 or more dims, so the scales' 3 does not make the text's axis a broadcast row."""

    class Synth(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 4)
            self.proj = nn.Linear(4, 4)

        def forward(self, text: torch.Tensor, lengths: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
            h = self.proj(self.embed(text)) * scales[0]
            return h * (torch.arange(text.shape[1]) < lengths[:, None]).unsqueeze(-1)

    batch = (torch.randint(0, 20, (1, 7)), torch.tensor([5]), torch.tensor([0.667, 1.0, 0.8]))
    report = wn.export_onnx(wn.apply_weight_norm(Synth()), batch, tmp_path / "m.onnx", exporter=exporter)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["text"][0] == dims["lengths"][0] == "batch", dims
    assert report.batch_sizes_checked and max(report.batch_sizes_checked) > 1


def test_a_forward_set_on_the_instance_is_the_one_exported(tmp_path) -> None:
    """A forward patched onto the instance (accelerate's hooks, a user's ``m.forward = ...``) is what
    PyTorch runs; the TorchScript exporter's flat copy runs it too."""
    import types

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    model = wn.apply_weight_norm(Net())
    model.forward = types.MethodType(lambda self, x: 2 * Net.forward(self, x) + 1, model)
    x = torch.randn(2, 4)
    wn.export_onnx(model, x, tmp_path / "m.onnx", exporter="torchscript")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_lazy_layer_that_has_not_run_yet_exports(tmp_path) -> None:
    """Its weight has no size before the first forward: the size that decides external data is
    taken again after the sample batch ran."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LazyLinear(3))
    report = wn.export_onnx(model, torch.randn(2, 4), tmp_path / "m.onnx")
    assert report.initializer_count >= 4 and report.outputs["output"][-1] == 3


def test_an_image_of_one_beside_per_channel_vectors_keeps_its_batch_axis(tmp_path) -> None:
    """``forward(image [1, 3, H, W], mean [3], std [3])``: the inputs of 2 or more dims say the batch."""

    class Normalized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
            return self.conv((image - mean[:, None, None]) / std[:, None, None])

    batch = (torch.randn(1, 3, 8, 8), torch.rand(3), torch.rand(3) + 0.5)
    report = wn.export_onnx(wn.apply_weight_norm(Normalized()), batch, tmp_path / "m.onnx")
    assert report.inputs["image"] == ["batch", 3, 8, 8]


def test_one_tensor_given_twice_is_named_by_its_first_place_in_errors(tmp_path) -> None:
    class Pair(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="axis 0 of input 'a' 'bad-name', which is not a Python identifier"):
        wn.export_onnx(Pair(), (x, x), tmp_path / "m.onnx", dynamic_shapes=({0: "bad-name"}, None))


def test_a_row_beside_a_1d_batch_keeps_its_size_1_axis(tmp_path) -> None:
    """``forward(row [1, D], t [6])`` returns 6 rows: the 1-D input is the batch (an image of one beside
    per-channel vectors returns one: there the batch is 1; see the test above)."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, row: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.fc(row) * t[:, None]

    report = wn.export_onnx(wn.apply_weight_norm(Scale()), (torch.randn(1, 8), torch.randn(6)), tmp_path / "m.onnx")
    assert report.inputs == {"row": [1, 8], "t": ["batch"]}
