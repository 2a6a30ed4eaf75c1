"""A zoo of small, purpose-built models for the parametrized tests in ``test_zoo.py``.

Each :class:`ZooEntry` says how to build a model (seeded), how to build a sample batch for
it, and what ``apply_weight_norm`` must do with it: the weights it must reparameterize (with
their output-unit axis), the weights it must leave alone (and a word of the reason), and
how the pre-activation of every converted weight can be observed with a forward hook.

The expectations are written down from what each model computes, never copied from the
library's output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# -- building blocks ---------------------------------------------------------------------


class ZooModule(nn.Module):
    """Every zoo model carries a tag and a method of its own (apply must keep both)."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def describe(self) -> str:
        return f"zoo:{self.tag}"


class FunctionalLinear(nn.Module):
    """``F.linear`` on parameters of its own (not an ``nn.Linear``)."""

    def __init__(self, fan_in: int, fan_out: int, bias: bool = True) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(fan_out, fan_in) / fan_in**0.5)
        self.b = nn.Parameter(torch.randn(fan_out) * 0.1) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.w, self.b)


class FunctionalConv1d(nn.Module):
    """``F.conv1d`` on a kernel of its own (not an ``nn.Conv1d``)."""

    def __init__(self, in_ch: int, out_ch: int, k: int = 3) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(out_ch, in_ch, k) / (in_ch * k) ** 0.5)
        self.shift = nn.Parameter(torch.randn(out_ch) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.kernel, self.shift, padding=1)


class FunctionalConvTranspose1d(nn.Module):
    """``F.conv_transpose1d`` with groups on a kernel of its own (weight ``[in, out/G, k]``)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, k: int = 2) -> None:
        super().__init__()
        self.groups = groups
        self.kernel = nn.Parameter(torch.randn(in_ch, out_ch // groups, k) / (in_ch // groups * k) ** 0.5)
        self.shift = nn.Parameter(torch.randn(out_ch) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv_transpose1d(x, self.kernel, self.shift, stride=2, groups=self.groups)


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D`` (Hugging Face transformers): a linear layer with the weight stored
    ``[in, out]``, so its output units are the *columns* of the weight."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


# -- the models --------------------------------------------------------------------------


class MLP(ZooModule):
    def __init__(self, dtype_tag: str = "mlp") -> None:
        super().__init__(dtype_tag)
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 12)
        self.fc3 = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class GroupedCNN(ZooModule):
    def __init__(self) -> None:
        super().__init__("grouped_cnn")
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.depthwise(x))
        return self.head(x.mean(dim=(2, 3)))


class ConvTranspose1dNet(ZooModule):
    def __init__(self) -> None:
        super().__init__("conv_transpose1d")
        self.up1 = nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1)
        self.up2 = nn.ConvTranspose1d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.up3 = nn.ConvTranspose1d(4, 6, 2, stride=1, groups=2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.up3(torch.relu(self.up2(torch.relu(self.up1(x)))))


class ConvTranspose2dNet(ZooModule):
    def __init__(self) -> None:
        super().__init__("conv_transpose2d")
        self.up1 = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)
        self.up2 = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.depthwise = nn.ConvTranspose2d(4, 4, 3, padding=1, groups=4)

    def forward(self, x: Tensor) -> Tensor:
        return self.depthwise(torch.relu(self.up2(torch.relu(self.up1(x)))))


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride) if (stride != 1 or in_ch != out_ch) else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + identity)


class ResNet(ZooModule):
    def __init__(self) -> None:
        super().__init__("resnet")
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block1 = BasicBlock(6, 6)
        self.block2 = BasicBlock(6, 8, stride=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(torch.relu(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


class FunctionalNet(ZooModule):
    def __init__(self) -> None:
        super().__init__("functional")
        self.conv = FunctionalConv1d(3, 6)
        self.up = FunctionalConvTranspose1d(6, 4, groups=2)
        self.proj = FunctionalLinear(4, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.up(torch.relu(self.conv(x)))).mean(dim=-1)
        return self.out(torch.relu(self.proj(h)))


class RootFunctional(ZooModule):
    """The root module itself owns the weight it feeds to ``F.linear``."""

    def __init__(self) -> None:
        super().__init__("root_functional")
        self.weight = nn.Parameter(torch.randn(4, 6) / 6**0.5)
        self.bias = nn.Parameter(torch.randn(4) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class GPT2MLP(ZooModule):
    def __init__(self) -> None:
        super().__init__("gpt2_conv1d")
        self.c_fc = Conv1D(16, 8)
        self.c_proj = Conv1D(8, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class TiedLM(ZooModule):
    def __init__(self) -> None:
        super().__init__("tied_embedding")
        self.emb = nn.Embedding(20, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.hidden(self.emb(tokens))))


class ReusedModule(ZooModule):
    def __init__(self) -> None:
        super().__init__("reused_module")
        self.inp = nn.Linear(5, 8)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        h = torch.relu(self.shared(h))
        h = torch.relu(self.shared(h))  # the same layer, a second time
        return self.head(h)


class AliasedModule(ZooModule):
    """One layer reachable under two paths (``self.head = self.blocks[-1]``): one module, no tie."""

    def __init__(self) -> None:
        super().__init__("aliased_module")
        self.blocks = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
        self.head = self.blocks[2]

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class TransformerEncoderNet(ZooModule):
    def __init__(self) -> None:
        super().__init__("transformer_encoder")
        self.embed = nn.Linear(5, 8)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True),
            num_layers=1, enable_nested_tensor=False,
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x)))


class CrossAttention(ZooModule):
    """``nn.MultiheadAttention`` with queries and keys/values from different tensors."""

    def __init__(self, kdim: int | None = None) -> None:
        super().__init__("cross_attention" if kdim is None else "cross_attention_kdim")
        self.q_in = nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        q = self.q_in(x)
        attended, _ = self.attn(q, memory, memory, need_weights=False)
        return self.head(attended)


class ShapeBranch(ZooModule):
    """``if x.dim() == 3``: symbolic_trace cannot branch on a Proxy; torch.export can."""

    def __init__(self) -> None:
        super().__init__("shape_branch")
        self.fc1 = nn.Linear(6, 8)
        self.proj = FunctionalLinear(8, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.flatten(0, 1)
        h = torch.relu(self.fc1(x))
        return self.fc2(torch.relu(self.proj(h)))


class ValueBranch(ZooModule):
    """``if`` on the *values* of a tensor: neither symbolic_trace nor torch.export can trace it."""

    def __init__(self) -> None:
        super().__init__("value_branch")
        self.fc1 = nn.Linear(6, 8)
        self.proj = FunctionalLinear(8, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))
        if x.sum() > 0:
            h = self.proj(h)
        else:
            h = -self.proj(h)
        return self.fc2(torch.relu(h))


class TransposedMatmul(nn.Module):
    """``x @ W.t()`` on a ``[out, in]`` weight: the op reads a view, not the parameter itself."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in) / fan_in**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.t()


class MatmulNet(ZooModule):
    def __init__(self) -> None:
        super().__init__("matmul_transposed")
        self.mm = TransposedMatmul(6, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.mm(x)))


class SharedWeight(ZooModule):
    """``fc2.weight`` is also read outside its linear op (a penalty term): it must be left alone."""

    def __init__(self) -> None:
        super().__init__("shared_weight")
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x))) + 1e-3 * self.fc2.weight.square().sum()


class AttentionBranch(ZooModule):
    """A transformer layer and a cross-attention layer behind Python control flow, so that
    discovery must go below symbolic_trace: ``mode="shape"`` (torch.export traces it) or
    ``mode="value"`` (an ``if`` on tensor values: only recording works)."""

    def __init__(self, mode: str) -> None:
        super().__init__(f"attention_{'export' if mode == 'shape' else 'recorded'}")
        self.mode = mode
        self.embed = nn.Linear(5, 8)
        self.layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.cross = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        if self.mode == "shape" and x.dim() == 4:
            x = x.flatten(0, 1)
        if self.mode == "value" and memory.abs().max() > 1e6:
            memory = memory / memory.abs().max()
        h = self.layer(self.embed(x))
        h, _ = self.cross(h, memory, memory, need_weights=False)
        return self.head(h)


class BatchNormNet(ZooModule):
    def __init__(self) -> None:
        super().__init__("batchnorm")
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)
        self.bn3 = nn.BatchNorm1d(4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(x.mean(dim=(2, 3))))


class BiasFree(ZooModule):
    def __init__(self) -> None:
        super().__init__("bias_free")
        self.conv = nn.Conv1d(3, 6, 3, padding=1, bias=False)
        self.up = nn.ConvTranspose1d(6, 4, 2, stride=2, bias=False)
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.up(torch.relu(self.conv(x))))
        return self.fc(x.mean(dim=-1))


class HalfNet(ZooModule):
    """Ops that run in float16/bfloat16 on a CPU: linear and a 1-d conv."""

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x)).mean(dim=-1)
        return self.fc2(torch.relu(self.fc1(h)))


class DictInputs(ZooModule):
    def __init__(self) -> None:
        super().__init__("dict_inputs")
        self.image_conv = nn.Conv2d(1, 4, 3, padding=1)
        self.feat_fc = nn.Linear(5, 4)
        self.head = nn.Linear(8, 2)

    def forward(self, *, image: Tensor, features: Tensor, scale: float = 1.0) -> Tensor:
        a = torch.relu(self.image_conv(image)).mean(dim=(2, 3))
        b = torch.relu(self.feat_fc(features))
        return self.head(torch.cat([a, b], dim=-1)) * scale


# -- the zoo -----------------------------------------------------------------------------

LAST = -1  # the output-unit axis of a linear op's output (features last)
CHANNEL = 1  # the output-unit axis of a batched conv op's output


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model and what weight norm must do with it.

    converted: weight name -> its output-unit layout ``(dim, groups)`` in the weight.
    skipped: alias names of a weight -> a word the skip reason must contain.
    preact: converted weight -> the output-unit axis of its owning module's output, for
        weights whose owning module returns exactly the op's output (plus its bias).
    attention: converted weights read inside ``nn.MultiheadAttention``.
    has_bias: converted weights whose op adds a bias parameter (mean must go to 0).
    found_by: the discovery step that must succeed with a batch (None: any real trace).
    walk_converted: when the model cannot be traced without a batch, what the module walk
        must still convert (None: the model traces without a batch).
    """

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[], Any]
    converted: Mapping[str, tuple[int, int]]
    skipped: Mapping[tuple[str, ...], str] = field(default_factory=dict)
    preact: Mapping[str, int] = field(default_factory=dict)
    attention: tuple[str, ...] = ()
    has_bias: frozenset[str] = frozenset()
    found_by: str | None = None
    walk_converted: frozenset[str] | None = None
    dtype: torch.dtype = torch.float32

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build()

    def sample(self) -> Any:
        generator = torch.Generator().manual_seed(1)
        return self.batch(generator)


def _randn(*shape: int, g: torch.Generator, dtype: torch.dtype = torch.float32, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    return (torch.randn(*shape, generator=g) * scale + shift).to(dtype)


def _dense(*names: str) -> dict[str, tuple[int, int]]:
    return {n: (0, 1) for n in names}


def _batchnorm_model() -> nn.Module:
    model = BatchNormNet()
    with torch.no_grad():  # non-default running statistics
        for _ in range(3):
            model(torch.randn(8, 3, 6, 6) * 2 + 0.5)
    model.train()
    return model


def _half_model(dtype: torch.dtype, tag: str) -> Callable[[], nn.Module]:
    return lambda: HalfNet(tag).to(dtype)


def _mixed_modes_mlp() -> nn.Module:
    model = MLP()
    model.fc2.eval()  # one submodule in eval mode, the rest training: apply must keep both
    return model


_ATTENTION_BRANCH = _dense("embed.weight", "layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight",
                           "layer.linear1.weight", "layer.linear2.weight", "cross.in_proj_weight",
                           "cross.out_proj.weight", "head.weight")

ZOO: list[ZooEntry] = [
    ZooEntry(
        "mlp", _mixed_modes_mlp, lambda g: _randn(32, 6, g=g, scale=2.0, shift=0.5),
        converted=_dense("fc1.weight", "fc2.weight", "fc3.weight"),
        preact={"fc1.weight": LAST, "fc2.weight": LAST, "fc3.weight": LAST},
        has_bias=frozenset({"fc1.weight", "fc2.weight", "fc3.weight"}),
        found_by="symbolic_trace",
    ),
    ZooEntry(
        "grouped_cnn", GroupedCNN, lambda g: _randn(4, 3, 8, 8, g=g),
        converted=_dense("stem.weight", "grouped.weight", "depthwise.weight", "head.weight"),
        preact={"stem.weight": CHANNEL, "grouped.weight": CHANNEL, "depthwise.weight": CHANNEL, "head.weight": LAST},
        has_bias=frozenset({"stem.weight", "grouped.weight", "head.weight"}),
        found_by="symbolic_trace",
    ),
    ZooEntry(
        "conv_transpose1d", ConvTranspose1dNet, lambda g: _randn(8, 4, 5, g=g),
        converted={"up1.weight": (1, 1), "up2.weight": (1, 2), "up3.weight": (1, 2)},
        preact={"up1.weight": CHANNEL, "up2.weight": CHANNEL, "up3.weight": CHANNEL},
        has_bias=frozenset({"up1.weight", "up2.weight"}),
        found_by="symbolic_trace",
    ),
    ZooEntry(
        "conv_transpose2d", ConvTranspose2dNet, lambda g: _randn(4, 4, 3, 3, g=g),
        converted={"up1.weight": (1, 1), "up2.weight": (1, 2), "depthwise.weight": (1, 4)},
        preact={"up1.weight": CHANNEL, "up2.weight": CHANNEL, "depthwise.weight": CHANNEL},
        has_bias=frozenset({"up1.weight", "up2.weight", "depthwise.weight"}),
        found_by="symbolic_trace",
    ),
    ZooEntry(
        "resnet", ResNet, lambda g: _randn(4, 3, 8, 8, g=g),
        converted=_dense("stem.weight", "block1.conv1.weight", "block1.conv2.weight", "block2.conv1.weight",
                         "block2.conv2.weight", "block2.shortcut.weight", "fc.weight"),
        preact={"stem.weight": CHANNEL, "block1.conv1.weight": CHANNEL, "block1.conv2.weight": CHANNEL,
                "block2.conv1.weight": CHANNEL, "block2.conv2.weight": CHANNEL,
                "block2.shortcut.weight": CHANNEL, "fc.weight": LAST},
        has_bias=frozenset({"stem.weight", "block1.conv1.weight", "block1.conv2.weight", "block2.conv1.weight",
                            "block2.conv2.weight", "block2.shortcut.weight", "fc.weight"}),
        found_by="symbolic_trace",
    ),
    ZooEntry(
        "functional", FunctionalNet, lambda g: _randn(16, 3, 7, g=g),
        converted={"conv.kernel": (0, 1), "up.kernel": (1, 2), "proj.w": (0, 1), "out.weight": (0, 1)},
        preact={"conv.kernel": CHANNEL, "up.kernel": CHANNEL, "proj.w": LAST, "out.weight": LAST},
        has_bias=frozenset({"conv.kernel", "up.kernel", "proj.w", "out.weight"}),
        found_by="symbolic_trace",
    ),
    ZooEntry(
        "root_functional", RootFunctional, lambda g: _randn(16, 6, g=g, scale=1.5),
        converted=_dense("weight"),
        preact={"weight": LAST},
        has_bias=frozenset({"weight"}),
        found_by="symbolic_trace",
    ),
    ZooEntry(
        "gpt2_conv1d", GPT2MLP, lambda g: _randn(4, 5, 8, g=g),
        converted={"c_fc.weight": (1, 1), "c_proj.weight": (1, 1)},
        preact={"c_fc.weight": LAST, "c_proj.weight": LAST},
        has_bias=frozenset({"c_fc.weight", "c_proj.weight"}),
    ),
    ZooEntry(
        "tied_embedding", TiedLM, lambda g: torch.randint(0, 20, (6, 5), generator=g),
        converted=_dense("hidden.weight"),
        skipped={("emb.weight", "head.weight"): "tied"},
        preact={"hidden.weight": LAST},
        has_bias=frozenset({"hidden.weight"}),
    ),
    ZooEntry(
        "reused_module", ReusedModule, lambda g: _randn(24, 5, g=g),
        converted=_dense("inp.weight", "shared.weight", "head.weight"),
        preact={"inp.weight": LAST, "shared.weight": LAST, "head.weight": LAST},
        has_bias=frozenset({"inp.weight", "shared.weight", "head.weight"}),
    ),
    ZooEntry(
        "aliased_module", AliasedModule, lambda g: _randn(24, 5, g=g),
        converted=_dense("blocks.0.weight", "blocks.2.weight"),
        preact={"blocks.0.weight": LAST, "blocks.2.weight": LAST},
        has_bias=frozenset({"blocks.0.weight", "blocks.2.weight"}),
        found_by="symbolic_trace",
    ),
    ZooEntry(
        "transformer_encoder", TransformerEncoderNet, lambda g: _randn(4, 6, 5, g=g),
        converted=_dense("embed.weight", "encoder.layers.0.self_attn.in_proj_weight",
                         "encoder.layers.0.self_attn.out_proj.weight", "encoder.layers.0.linear1.weight",
                         "encoder.layers.0.linear2.weight", "head.weight"),
        preact={"embed.weight": LAST, "encoder.layers.0.linear1.weight": LAST,
                "encoder.layers.0.linear2.weight": LAST, "head.weight": LAST},
        attention=("encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.0.self_attn.out_proj.weight"),
        has_bias=frozenset({"embed.weight", "encoder.layers.0.linear1.weight", "encoder.layers.0.linear2.weight",
                            "head.weight"}),
    ),
    ZooEntry(
        "cross_attention", CrossAttention, lambda g: (_randn(4, 3, 5, g=g), _randn(4, 7, 8, g=g, shift=0.5)),
        converted=_dense("q_in.weight", "attn.in_proj_weight", "attn.out_proj.weight", "head.weight"),
        preact={"q_in.weight": LAST, "head.weight": LAST},
        attention=("attn.in_proj_weight", "attn.out_proj.weight"),
        has_bias=frozenset({"q_in.weight", "head.weight"}),
    ),
    ZooEntry(
        "cross_attention_kdim", lambda: CrossAttention(kdim=6), lambda g: (_randn(4, 3, 5, g=g), _randn(4, 7, 6, g=g, shift=0.5)),
        converted=_dense("q_in.weight", "attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight",
                         "attn.out_proj.weight", "head.weight"),
        preact={"q_in.weight": LAST, "head.weight": LAST},
        attention=("attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj.weight"),
        has_bias=frozenset({"q_in.weight", "head.weight"}),
    ),
    ZooEntry(
        "shape_branch", ShapeBranch, lambda g: _randn(4, 5, 6, g=g),
        converted=_dense("fc1.weight", "proj.w", "fc2.weight"),
        preact={"fc1.weight": LAST, "proj.w": LAST, "fc2.weight": LAST},
        has_bias=frozenset({"fc1.weight", "proj.w", "fc2.weight"}),
        found_by="torch.export",
        walk_converted=frozenset({"fc1.weight", "fc2.weight"}),
    ),
    ZooEntry(
        "value_branch", ValueBranch, lambda g: _randn(24, 6, g=g, shift=0.3),
        converted=_dense("fc1.weight", "proj.w", "fc2.weight"),
        preact={"fc1.weight": LAST, "proj.w": LAST, "fc2.weight": LAST},
        has_bias=frozenset({"fc1.weight", "proj.w", "fc2.weight"}),
        found_by="recorded",
        walk_converted=frozenset({"fc1.weight", "fc2.weight"}),
    ),
    ZooEntry(
        "attention_export", lambda: AttentionBranch("shape"),
        lambda g: (_randn(4, 6, 5, g=g), _randn(4, 7, 8, g=g, shift=0.5)),
        converted=_ATTENTION_BRANCH,
        preact={"embed.weight": LAST, "layer.linear1.weight": LAST, "layer.linear2.weight": LAST, "head.weight": LAST},
        attention=("layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight", "cross.in_proj_weight",
                   "cross.out_proj.weight"),
        has_bias=frozenset({"embed.weight", "layer.linear1.weight", "layer.linear2.weight", "head.weight"}),
        found_by="torch.export",
        walk_converted=frozenset(_ATTENTION_BRANCH),
    ),
    ZooEntry(
        "attention_recorded", lambda: AttentionBranch("value"),
        lambda g: (_randn(4, 6, 5, g=g), _randn(4, 7, 8, g=g, shift=0.5)),
        converted=_ATTENTION_BRANCH,
        preact={"embed.weight": LAST, "layer.linear1.weight": LAST, "layer.linear2.weight": LAST, "head.weight": LAST},
        attention=("layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight", "cross.in_proj_weight",
                   "cross.out_proj.weight"),
        has_bias=frozenset({"embed.weight", "layer.linear1.weight", "layer.linear2.weight", "head.weight"}),
        found_by="recorded",
        walk_converted=frozenset(_ATTENTION_BRANCH),
    ),
    ZooEntry(
        "matmul_transposed", MatmulNet, lambda g: _randn(24, 6, g=g, shift=0.5),
        converted=_dense("mm.weight", "fc.weight"),
        preact={"mm.weight": LAST, "fc.weight": LAST},
        has_bias=frozenset({"fc.weight"}),
        found_by="symbolic_trace",
    ),
    ZooEntry(
        "shared_weight", SharedWeight, lambda g: _randn(24, 6, g=g),
        converted=_dense("fc1.weight"),
        skipped={("fc2.weight",): "shared"},
        preact={"fc1.weight": LAST},
        has_bias=frozenset({"fc1.weight"}),
        found_by="symbolic_trace",
    ),
    ZooEntry(
        "batchnorm", _batchnorm_model, lambda g: _randn(8, 3, 6, 6, g=g, scale=2.0, shift=0.5),
        converted=_dense("conv1.weight", "conv2.weight", "fc.weight"),
        preact={"conv1.weight": CHANNEL, "conv2.weight": CHANNEL, "fc.weight": LAST},
        has_bias=frozenset({"conv2.weight", "fc.weight"}),
        found_by="symbolic_trace",
    ),
    ZooEntry(
        "bias_free", BiasFree, lambda g: _randn(16, 3, 6, g=g, shift=1.0),
        converted={"conv.weight": (0, 1), "up.weight": (1, 1), "fc.weight": (0, 1)},
        preact={"conv.weight": CHANNEL, "up.weight": CHANNEL, "fc.weight": LAST},
        found_by="symbolic_trace",
    ),
    ZooEntry(
        "float16", _half_model(torch.float16, "float16"), lambda g: _randn(32, 3, 6, g=g, dtype=torch.float16),
        converted=_dense("conv.weight", "fc1.weight", "fc2.weight"),
        preact={"conv.weight": CHANNEL, "fc1.weight": LAST, "fc2.weight": LAST},
        has_bias=frozenset({"conv.weight", "fc1.weight"}),
        found_by="symbolic_trace",
        dtype=torch.float16,
    ),
    ZooEntry(
        "bfloat16", _half_model(torch.bfloat16, "bfloat16"), lambda g: _randn(32, 3, 6, g=g, dtype=torch.bfloat16),
        converted=_dense("conv.weight", "fc1.weight", "fc2.weight"),
        preact={"conv.weight": CHANNEL, "fc1.weight": LAST, "fc2.weight": LAST},
        has_bias=frozenset({"conv.weight", "fc1.weight"}),
        found_by="symbolic_trace",
        dtype=torch.bfloat16,
    ),
    ZooEntry(
        "dict_inputs", DictInputs,
        lambda g: {"image": _randn(6, 1, 5, 5, g=g), "features": _randn(6, 5, g=g), "scale": 2.0},
        converted=_dense("image_conv.weight", "feat_fc.weight", "head.weight"),
        preact={"image_conv.weight": CHANNEL, "feat_fc.weight": LAST, "head.weight": LAST},
        has_bias=frozenset({"image_conv.weight", "feat_fc.weight", "head.weight"}),
    ),
]
