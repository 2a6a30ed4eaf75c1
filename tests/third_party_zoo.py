"""A zoo of third-party models (Hugging Face ``transformers``) for ``test_third_party.py``.

Every model is built from a tiny ``XxxConfig(...)`` with random weights: nothing is
downloaded, ``from_pretrained`` is never called.  Each :class:`ThirdPartyEntry` says how to
build the model (seeded), how to build a sample batch, and what ``apply_weight_norm`` must
do with it, written down from the model's source code (``transformers`` 5.23.0), never
copied from the library's output:

* ``kept``: weights the model itself puts under ``torch.nn.utils.parametrizations.weight_norm``
  (in ``__init__``, or through its own ``apply_weight_norm()`` method, which the vocoders and
  codecs call for training) with the ``dim`` torch was given;
* ``unit_dims``: weights whose output units are not on dim 0 (GPT-2's ``Conv1D`` stores
  ``[in, out]``; ``ConvTranspose`` stores ``[in, out/G, k]``);
* ``onnx_error``: where torch's exporters cannot export the model, a pattern that the
  :class:`~wn_transform.ExportError` must match: the operator or construct that stopped them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; make sure of it

import torch
from torch import Tensor, nn

import transformers
from transformers.pytorch_utils import Conv1D

transformers.logging.set_verbosity_error()  # tiny configs draw warnings (token ids, sizes)

__all__ = ["THIRD_PARTY", "ThirdPartyEntry", "TRANSFORMERS_VERSION"]

TRANSFORMERS_VERSION = transformers.__version__


@dataclass(frozen=True)
class ThirdPartyEntry:
    """One third-party model and what weight norm must do with it.

    build: makes the model (random weights, torch's seed fixed by :meth:`model`).
    batch: ``batch(generator)`` -> the sample batch (a tensor, a tuple or a dict).
    found_by: the discovery step that must find the weights with the batch.
    kept: ``fnmatch`` patterns of the weights that already carry torch's weight norm -> the
        ``dim`` they were given (``existing="keep"`` must leave and report them;
        ``existing="convert"`` must replace them).  :meth:`kept_weights` expands them.
    skipped: weights that reach a linear/conv op but must be left alone, and other matrices that act on the data
        (einsum, bmm, a matmul with the data) -> a word of the reason.
    unreached: patterns of weights the forward never reads (training-only branches); the init
        must report them, and no statistics are checked for them.  ``unreached_when_converted``:
        kept weights that are unreached too (they show up once ``existing="convert"`` converts them).
    constant: weights whose input is constant on the batch (their units' sigma is 0): the init
        must report them, and no statistics are checked for them.
    no_grad: prefixes of the weights that get no gradient from a loss on the outputs (behind
        a ``ceil`` or a codebook lookup without a straight-through estimator).
    onnx_error: ``None``: ``export_onnx`` must work and agree with onnxruntime; otherwise a
        regex the raised ``ExportError`` must match (the operator or construct that stopped it).
    onnx_exporter: the exporter that must succeed; ``onnx_fallback``: a regex for why the
        dynamo exporter was given up, when it was.
    """

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Any]
    found_by: str
    kept: Mapping[str, int] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)
    unreached: tuple[str, ...] = ()
    unreached_when_converted: tuple[str, ...] = ()
    constant: tuple[str, ...] = ()
    no_grad: tuple[str, ...] = ()
    onnx_error: str | None = None
    onnx_exporter: str = "dynamo"
    onnx_fallback: str | None = None
    onnx_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        model = self.build()
        model.eval()
        return model

    def sample(self) -> Any:
        return self.batch(torch.Generator().manual_seed(1))

    def kept_weights(self, model: nn.Module) -> dict[str, int]:
        """The weights matched by ``kept`` -> their weight-norm ``dim``."""
        return {name: dim for name in _layer_weights(model) for pattern, dim in self.kept.items()
                if fnmatchcase(name, pattern)}

    def unreached_weights(self, model: nn.Module, *, converted: bool = False) -> frozenset[str]:
        patterns = self.unreached + (self.unreached_when_converted if converted else ())
        return frozenset(name for name in _layer_weights(model) if any(fnmatchcase(name, p) for p in patterns))


def _layer_weights(model: nn.Module) -> list[str]:
    """``<module>.weight`` of every linear/conv layer (parametrized or not)."""
    return [f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, Conv1D))]


def _ids(g: torch.Generator, vocab: int, batch: int = 4, length: int = 8) -> Tensor:
    return torch.randint(0, vocab, (batch, length), generator=g)


def _mask(batch: int = 4, length: int = 8) -> Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -3:] = 0  # one padded sequence
    return mask


def _randn(*shape: int, g: torch.Generator, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=g) * scale


# -- the models ---------------------------------------------------------------------------


def _bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, type_vocab_size=2)
    return transformers.BertModel(config)


def _gpt2(**overrides: Any) -> nn.Module:
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0, **({"use_cache": False} | overrides))
    return transformers.GPT2Model(config)


def _gpt2_use_cache() -> nn.Module:
    """GPT-2 as configured by default: its output holds a ``DynamicCache`` (not a pytree)."""
    return _gpt2(use_cache=True)


def _t5() -> nn.Module:
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                                   num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                   use_cache=False)
    return transformers.T5Model(config)


def _vit() -> nn.Module:
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32)
    return transformers.ViTModel(config)


def _resnet() -> nn.Module:
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="basic")
    return transformers.ResNetModel(config)


def _convnext() -> nn.Module:
    config = transformers.ConvNextConfig(num_channels=3, patch_size=2, hidden_sizes=[8, 16], depths=[1, 1],
                                         num_stages=2, image_size=16)
    return transformers.ConvNextModel(config)


def _whisper_encoder() -> nn.Module:
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = transformers.WhisperConfig(vocab_size=64, num_mel_bins=8, encoder_layers=2, encoder_attention_heads=2,
                                        decoder_layers=1, decoder_attention_heads=2, d_model=16, encoder_ffn_dim=32,
                                        decoder_ffn_dim=32, max_source_positions=16, max_target_positions=16,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return WhisperEncoder(config)


def _hifigan() -> nn.Module:
    config = transformers.SpeechT5HifiGanConfig(model_in_dim=8, upsample_initial_channel=16, upsample_rates=[2, 2],
                                                upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3],
                                                resblock_dilation_sizes=[[1, 3]], normalize_before=False)
    model = transformers.SpeechT5HifiGan(config)
    model.apply_weight_norm()  # as for training: torch's parametrizations.weight_norm, dim=0 everywhere
    return model


def _vits() -> nn.Module:
    config = transformers.VitsConfig(
        vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, flow_size=8,
        spectrogram_bins=9, upsample_initial_channel=16, upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], duration_predictor_filter_channels=16,
        duration_predictor_num_flows=2, duration_predictor_flow_bins=4, prior_encoder_num_flows=1,
        prior_encoder_num_wavenet_layers=1, posterior_encoder_num_wavenet_layers=1, depth_separable_num_layers=1,
        layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        duration_predictor_dropout=0.0, noise_scale=0.0, noise_scale_duration=0.0,
    )
    return transformers.VitsModel(config)


def _encodec() -> nn.Module:
    config = transformers.EncodecConfig(target_bandwidths=[1.5], sampling_rate=800, audio_channels=1, hidden_size=8,
                                        num_filters=4, num_residual_layers=1, upsampling_ratios=[2, 2],
                                        num_lstm_layers=1, codebook_size=16, codebook_dim=8, kernel_size=3,
                                        last_kernel_size=3, residual_kernel_size=3)
    model = transformers.EncodecModel(config)
    # A fresh codebook is all zeros, so the decoder would see one constant input.  Encodec
    # initializes its codebooks from encoder outputs (k-means on the first batch): pick codes
    # among the encoder's frames on a random signal.
    with torch.no_grad():
        frames = model.encoder(torch.randn(8, 1, 64)).transpose(1, 2).flatten(0, 1)
        for layer in model.quantizer.layers:
            codes = frames[torch.randperm(len(frames))[: config.codebook_size]]
            layer.codebook.embed.copy_(codes)
            layer.codebook.embed_avg.copy_(codes)
            frames = frames - codes[torch.cdist(frames, codes).argmin(dim=1)]
    return model


def _wav2vec2_config(cls):
    return cls(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
               conv_stride=(4, 2), conv_kernel=(8, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
               feat_extract_norm="group", do_stable_layer_norm=False, mask_time_prob=0.0, mask_feature_prob=0.0,
               layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
               feat_proj_dropout=0.0, vocab_size=16)


def _wav2vec2() -> nn.Module:
    return transformers.Wav2Vec2Model(_wav2vec2_config(transformers.Wav2Vec2Config))


def _hubert() -> nn.Module:
    return transformers.HubertModel(_wav2vec2_config(transformers.HubertConfig))


def _univnet() -> nn.Module:
    config = transformers.UnivNetConfig(model_in_channels=8, model_hidden_channels=8, num_mel_bins=8,
                                        resblock_kernel_sizes=[3], resblock_stride_sizes=[2],
                                        resblock_dilation_sizes=[[1, 3]], kernel_predictor_num_blocks=1,
                                        kernel_predictor_hidden_channels=8, kernel_predictor_conv_size=3)
    model = transformers.UnivNetModel(config)
    model.apply_weight_norm()
    return model


def _dac() -> nn.Module:
    config = transformers.DacConfig(encoder_hidden_size=4, downsampling_ratios=[2, 2], decoder_hidden_size=16,
                                    n_codebooks=2, codebook_size=16, codebook_dim=4, hidden_size=8,
                                    upsampling_ratios=[2, 2], quantizer_dropout=0.0)
    model = transformers.DacModel(config)
    model.apply_weight_norm()
    return model


def _mimi() -> nn.Module:
    from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiConvTranspose1d

    config = transformers.MimiConfig(
        sampling_rate=800, hidden_size=16, num_filters=4, num_residual_layers=1, upsampling_ratios=[2, 2],
        codebook_size=16, codebook_dim=8, num_quantizers=2, num_semantic_quantizers=1,
        vector_quantization_hidden_dimension=8, upsample_groups=16, num_hidden_layers=1, intermediate_size=32,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, sliding_window=16,
    )
    model = transformers.MimiModel(config)
    with torch.no_grad():  # a fresh codebook is all zeros (embed = embed_sum / cluster_usage)
        for name, buffer in model.named_buffers():
            if name.endswith("codebook.embed_sum"):
                buffer.normal_()
    for module in model.modules():
        if isinstance(module, (MimiConv1d, MimiConvTranspose1d)):
            module.apply_weight_norm()
    return model


_ALL = {"*": 0}  # the model's own apply_weight_norm() covers every conv, with torch's default dim=0
_VITS_NO_GRAD = ("duration_predictor.", "posterior_encoder.")  # durations are ceil'd; posterior: training only
_MIMI_NO_GRAD = ("encoder.", "quantizer.semantic_residual_vector_quantizer.input_proj",
                 "quantizer.acoustic_residual_vector_quantizer.input_proj")  # no straight-through estimator

THIRD_PARTY: list[ThirdPartyEntry] = [
    ThirdPartyEntry("bert", _bert, lambda g: {"input_ids": _ids(g, 64), "attention_mask": _mask()},
                    found_by="torch.export"),
    ThirdPartyEntry("gpt2", _gpt2, lambda g: {"input_ids": _ids(g, 64), "attention_mask": _mask()},
                    found_by="torch.export"),
    ThirdPartyEntry("gpt2_use_cache", _gpt2_use_cache,
                    lambda g: {"input_ids": _ids(g, 64), "attention_mask": _mask()}, found_by="recorded",
                    onnx_error=r"DynamicCache.*DynamicCache.*\[the model returns a transformers cache \(DynamicCache\), "
                               r"which the exporters cannot write as an output: pass use_cache=False in the batch"),
    ThirdPartyEntry("t5", _t5, lambda g: {"input_ids": _ids(g, 64), "decoder_input_ids": _ids(g, 64, length=5)},
                    found_by="torch.export"),
    ThirdPartyEntry("vit", _vit, lambda g: _randn(4, 3, 16, 16, g=g), found_by="torch.export"),
    ThirdPartyEntry("resnet", _resnet, lambda g: _randn(4, 3, 16, 16, g=g), found_by="torch.export"),
    ThirdPartyEntry("convnext", _convnext, lambda g: _randn(4, 3, 16, 16, g=g), found_by="torch.export"),
    ThirdPartyEntry("whisper_encoder", _whisper_encoder, lambda g: _randn(4, 8, 32, g=g), found_by="torch.export"),
    ThirdPartyEntry("speecht5_hifigan", _hifigan, lambda g: _randn(4, 6, 8, g=g), found_by="torch.export",
                    kept=_ALL),
    ThirdPartyEntry(
        "vits", _vits, lambda g: {"input_ids": _ids(g, 16, length=6)}, found_by="torch.export",
        kept={"*wavenet.in_layers.*": 0, "*wavenet.res_skip_layers.*": 0},
        # inference drops the duration predictor's first conv flow; post_* and the posterior
        # encoder are for training only
        unreached=("duration_predictor.flows.1.*", "duration_predictor.post_*", "posterior_encoder.conv_*"),
        unreached_when_converted=("posterior_encoder.wavenet.*",),
        # with noise_scale_duration=0 the reversed flow's noise input is all zeros
        constant=("duration_predictor.flows.2.conv_pre.weight",),
        # relative position embeddings: matmuls with the queries and attention weights
        skipped={"text_encoder.encoder.layers.0.attention.emb_rel_k": "acts on the data through matmul",
                 "text_encoder.encoder.layers.0.attention.emb_rel_v": "acts on the data through matmul"},
        no_grad=_VITS_NO_GRAD,
        # the spline flow's range checks (torch.all) become aten._is_all_true, which the dynamo
        # exporter cannot translate
        onnx_exporter="torchscript", onnx_fallback=r"aten\._is_all_true",
    ),
    ThirdPartyEntry("encodec", _encodec, lambda g: _randn(4, 1, 64, g=g), found_by="recorded",
                    kept={"*.conv.weight": 0}, no_grad=("encoder.",),
                    onnx_exporter="torchscript", onnx_fallback="GuardOnDataDependentSymNode"),
    ThirdPartyEntry("wav2vec2", _wav2vec2, lambda g: _randn(4, 200, g=g), found_by="torch.export",
                    kept={"encoder.pos_conv_embed.conv.weight": 2}),
    ThirdPartyEntry("hubert", _hubert, lambda g: _randn(4, 200, g=g), found_by="torch.export",
                    kept={"encoder.pos_conv_embed.conv.weight": 2}),
    ThirdPartyEntry("univnet", _univnet, lambda g: {"input_features": _randn(4, 6, 8, g=g),
                                                    "noise_sequence": _randn(4, 6, 8, g=g)},
                    found_by="torch.export", kept=_ALL),
    ThirdPartyEntry("dac", _dac, lambda g: _randn(4, 1, 64, g=g), found_by="torch.export", kept=_ALL,
                    # the codebooks: distances to the encodings are a matmul
                    skipped={f"quantizer.quantizers.{i}.codebook.weight": "acts on the data through matmul" for i in (0, 1)}),
    ThirdPartyEntry("mimi", _mimi, lambda g: _randn(4, 1, 64, g=g), found_by="recorded",
                    kept={"*_seanet.*": 0, "encoder.downsample.*": 0, "decoder.upsample.*": 0},
                    no_grad=_MIMI_NO_GRAD,
                    onnx_error=r"GuardOnDataDependentSymNode.*aten::diff"),
]
