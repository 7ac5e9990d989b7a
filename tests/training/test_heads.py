"""Heads through modules_to_save: peft's wrapper per adapter, task_type presets, checkpoints both ways with peft."""

from __future__ import annotations

import json
import os
from pathlib import Path

import adapterkit
import pytest
import torch
from adapterkit.trainer import Trainer
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from training_helpers import arguments
from transformers import BertConfig, BertForSequenceClassification

LORA_SEQ_CLS = 'lora[r=4, target_modules=["query", "value"], task_type="SEQ_CLS"]'
TINY_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=32, num_labels=3)  # fmt: skip


def make_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**TINY_BERT)).eval()


def bert_input() -> torch.Tensor:
    return torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(2))


def bert_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits


def trained(model: torch.nn.Module, steps: int = 3) -> torch.nn.Module:
    """A few steps so that adapter and head differ from their initial values."""
    x, labels = bert_input(), torch.tensor([0, 1, 2, 1])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=x, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_seq_cls_preset_trains_a_copy_of_the_classifier_per_adapter() -> None:
    model = make_bert()
    original = model.classifier.weight.detach().clone()
    adapters = adapterkit.attach(model)
    adapters.add(LORA_SEQ_CLS, "a")
    assert adapters.config("a").modules_to_save == ["classifier", "score"]
    assert isinstance(model.classifier, ModulesToSaveWrapper)
    assert model.classifier.modules_to_save["a"].weight.requires_grad
    assert not model.classifier.original_module.weight.requires_grad
    x = bert_input()
    trained(model)
    assert not torch.equal(model.classifier.modules_to_save["a"].weight, original)
    assert torch.equal(model.classifier.original_module.weight, original)

    adapters.add(LORA_SEQ_CLS, "b")  # its own copy of the untrained classifier
    assert torch.equal(model.classifier.modules_to_save["b"].weight, original)
    only_b = bert_logits(model, x)
    adapters.set_active("a")
    only_a = bert_logits(model, x)
    assert not torch.equal(only_a, only_b)
    with adapters.disabled():  # the original module computes
        assert torch.equal(bert_logits(model, x), bert_logits(make_bert(), x))
    with adapters.per_sample(["a", "b", "__base__", "a"]):
        rows = bert_logits(model, x)
    torch.testing.assert_close(rows[[0, 3]], only_a[[0, 3]], rtol=0, atol=1e-6)
    torch.testing.assert_close(rows[1], only_b[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(rows[2], bert_logits(make_bert(), x)[2], rtol=0, atol=1e-6)
    adapters.set_active("a")
    with pytest.raises(adapterkit.AdapterStateError, match="classifier"):
        adapters.set_active(["a", "b"])
    assert adapters.active == ["a"]  # the refused set left nothing behind
    torch.testing.assert_close(bert_logits(model, x), only_a, rtol=0, atol=0)
    adapters.delete("a")
    adapters.delete("b")
    assert type(model.classifier) is torch.nn.Linear  # unwrapped back to the original module


def test_a_peft_trained_seq_cls_adapter_loads_with_equal_logits_and_ours_loads_in_peft(tmp_path: Path) -> None:
    torch.manual_seed(1)
    peft_model = trained(get_peft_model(make_bert(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")))
    peft_model.save_pretrained(tmp_path / "peft")
    x = bert_logits  # noqa: F841 (readability below)
    inputs = bert_input()
    expected = bert_logits(peft_model, inputs)

    ours = make_bert()
    adapterkit.attach(ours).load(tmp_path / "peft")
    assert torch.equal(bert_logits(ours, inputs), expected)

    adapterkit.attach(ours).save(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and set(saved["modules_to_save"]) >= {"classifier", "score"}
    back = PeftModel.from_pretrained(make_bert(), tmp_path / "ours")
    assert torch.equal(bert_logits(back, inputs), expected)


def test_explicit_modules_to_save_and_strict_checkpoints(tmp_path: Path) -> None:
    model = make_bert()
    adapters = adapterkit.attach(model)
    adapters.add('lora[r=2, target_modules=["query"], modules_to_save=["classifier"]]')
    state = adapters.state_dict()
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(state)
    adapters.save(tmp_path)
    truncated = {k: v for k, v in state.items() if "classifier.bias" not in k}
    other = make_bert()
    with pytest.raises(adapterkit.StateDictMismatchError, match="classifier.bias"):
        adapterkit.attach(other).load(None, config=adapters.config("default"), state_dict=truncated)
    assert type(other.classifier) is torch.nn.Linear  # the failed load left nothing behind


def test_bert_classifier_trains_its_head_under_trainer_and_checkpoints_hold_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": row, "labels": torch.tensor(i % 3)} for i, row in enumerate(ids)]
    model = make_bert()
    adapterkit.attach(model).add(LORA_SEQ_CLS)
    full = Trainer(model=model, args=arguments(tmp_path / "full", max_steps=4, save_strategy="steps", save_steps=2), train_dataset=data)
    full.train()
    folder = tmp_path / "full" / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder))
    assert "model.safetensors" not in os.listdir(folder)
    final = adapterkit.attach(model).state_dict()
    assert "base_model.model.classifier.weight" in final

    resumed = make_bert()
    adapterkit.attach(resumed).add(LORA_SEQ_CLS)
    Trainer(model=resumed, args=arguments(tmp_path / "again", max_steps=4), train_dataset=data).train(
        resume_from_checkpoint=str(folder)
    )
    again = adapterkit.attach(resumed).state_dict()
    assert all(torch.equal(again[k], final[k]) for k in final)
    inputs = bert_input()
    peft_loaded = PeftModel.from_pretrained(make_bert(), tmp_path / "full" / "checkpoint-4")
    assert torch.equal(bert_logits(peft_loaded, inputs), bert_logits(model, inputs))
    native = make_bert()
    native.load_adapter(str(tmp_path / "full" / "checkpoint-4"))
    torch.testing.assert_close(bert_logits(native, inputs), bert_logits(model, inputs), rtol=0, atol=1e-6)


def test_a_tied_module_copied_by_modules_to_save_is_said() -> None:
    from conftest import make_llama

    model = make_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.warns(UserWarning, match="tie is broken"):
        adapterkit.attach(model).add('lora[r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]]')
