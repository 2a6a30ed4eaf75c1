"""wn_transform on PEFT adapters (``peft``: LoRA on tiny ``transformers`` models, random weights).

A LoRA layer is ``base_layer(x) + B(A(x))·scale`` with the base frozen.  peft merges a trained
adapter by writing into the base layer's weight (``merge_and_unload``), and wraps trained copies
of whole layers (``modules_to_save``) in a module whose ``__getattr__`` forwards to the layer.
Weight norm must leave both working: the base layer keeps its plain weight (named in the
report), the adapter's ``A`` and ``B`` are normalized, and copies keep the wrapper.
"""

from __future__ import annotations

import copy

import pytest
import torch

import wn_transform as wn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.third_party


def _lora_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)


def test_a_trained_lora_adapter_merges_into_the_base_model() -> None:
    """The base layers are left plain (peft's in-place merge would write into a computed weight and
    lose the training); ``A`` is standardized, ``B`` (zero-initialized) gets ``g = 0``."""
    model = _lora_llama()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "use_cache": False}
    model = wn.apply_weight_norm(model, batch, generator=torch.Generator().manual_seed(2))
    report = wn.weight_norm_report(model)
    bases = {s.qualname: s.reason for s in report.skipped if ".base_layer." in s.qualname}
    assert len(bases) == 2 and all("base layer of a peft adapter" in why for why in bases.values())
    converted = sorted(t.qualname.split(".")[-3] for t in report.converted if ".lora_" in t.qualname)
    assert converted == ["lora_A", "lora_A", "lora_B", "lora_B"]
    assert sorted(report.zero_units) == sorted(t.qualname for t in report.converted if ".lora_B." in t.qualname)
    assert report.notes.constant_units == {}  # B's units are zero units, not constant ones

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model(**batch).logits.detach()
    for _ in range(5):
        loss = model(**batch, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
        assert float((trained - before).abs().max()) > 1e-2  # the adapter learned something
        merged = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, trained, rtol=1e-5, atol=1e-5)
        folded = wn.fold_weight_norm(model).merge_and_unload()
        torch.testing.assert_close(folded(**batch).logits, trained, rtol=1e-5, atol=1e-5)
    assert not wn.find_weight_norms(folded)


def test_a_classifier_under_modules_to_save_copies_with_its_wrapper() -> None:
    """``ModulesToSaveWrapper`` forwards unknown attributes (``__deepcopy__`` too) to the layer it
    holds: a copy of the weight-normalized model keeps the wrapper, and fold works on a copy."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3)
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], lora_dropout=0.0)
    model = peft.get_peft_model(transformers.BertForSequenceClassification(config), lora).eval()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    wrapper = type(model.base_model.model.classifier)
    model = wn.apply_weight_norm(model, {"input_ids": ids}, init="preserve")
    expected = model(input_ids=ids).logits

    replica = copy.deepcopy(model)
    assert type(replica.base_model.model.classifier) is wrapper
    assert list(replica.state_dict()) == list(model.state_dict())
    folded = wn.fold_weight_norm(model)
    assert type(folded.base_model.model.classifier) is wrapper and not wn.find_weight_norms(folded)
    torch.testing.assert_close(folded(input_ids=ids).logits, expected)


def test_dora_calibrates_its_adapter_on_the_data_not_on_its_identity_probe() -> None:
    """DoRA runs ``lora_B(lora_A(torch.eye(n)))`` for its norm before ``lora_B(lora_A(x))``: ``A``
    is standardized on the data (``B``, all zero, makes the pass run twice: the second pass passes
    over the probe too)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0, use_dora=True)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
    batch = {"input_ids": torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1)), "use_cache": False}
    model = wn.apply_weight_norm(model, batch)
    a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    outputs = []
    handle = a.register_forward_hook(lambda module, args, out: outputs.append(out.detach().reshape(-1, 4)))
    model.eval()
    with torch.no_grad():
        model(**batch)
    handle.remove()
    assert [len(o) for o in outputs] == [32, 64]  # the probe's 32 rows, then the batch's 4 x 16
    torch.testing.assert_close(outputs[1].std(0, correction=0), torch.ones(4), atol=1e-4, rtol=0)
    assert any(".lora_A." in name for name in wn.weight_norm_report(model).notes.passed_over)
