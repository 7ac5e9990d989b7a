"""``class MyLlama(adapterkit.AdapterMixin, LlamaForCausalLM)``: save_pretrained / from_pretrained of an adapter
folder behave as transformers' own peft integration does, and the folders are interchangeable with it."""

from __future__ import annotations

import os
from pathlib import Path

import adapterkit
import pytest
import torch
from adapterkit.trainer import Trainer
from conftest import llama_input, make_llama
from peft import LoraConfig, PeftModel
from training_helpers import arguments, logits, token_rows
from transformers import LlamaForCausalLM


class MyLlama(adapterkit.AdapterMixin, LlamaForCausalLM):
    pass


@pytest.fixture
def base_folder(tmp_path: Path) -> Path:
    make_llama().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_mixin_round_trip_through_save_pretrained_and_from_pretrained(tmp_path: Path, base_folder: Path) -> None:
    model = MyLlama.from_pretrained(base_folder)
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert model._hf_peft_config_loaded
    x = llama_input()
    expected = logits(model, x)
    model.save_pretrained(tmp_path / "adapter")
    # transformers' layout for an adapter: its two files and the generation config, no config.json, no base weights
    assert set(os.listdir(tmp_path / "adapter")) == {"adapter_config.json", "adapter_model.safetensors", "generation_config.json"}

    loaded = MyLlama.from_pretrained(tmp_path / "adapter")  # the base comes from base_model_name_or_path
    assert loaded.active_adapters() == ["default"]
    assert torch.equal(logits(loaded, x), expected)
    native = LlamaForCausalLM.from_pretrained(tmp_path / "adapter")  # transformers' own integration, same folder
    torch.testing.assert_close(logits(native, x), expected, rtol=0, atol=1e-6)
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_folder), tmp_path / "adapter")
    torch.testing.assert_close(logits(peft_model, x), expected, rtol=0, atol=1e-6)


def test_mixin_loads_what_transformers_saved(tmp_path: Path, base_folder: Path) -> None:
    native = LlamaForCausalLM.from_pretrained(base_folder)
    torch.manual_seed(0)
    native.add_adapter(LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), adapter_name="task")
    native.set_adapter("task")
    native.save_pretrained(tmp_path / "native")
    ours = MyLlama.from_pretrained(tmp_path / "native", adapter_name="task")
    assert ours.active_adapters() == ["task"]
    x = llama_input()
    torch.testing.assert_close(logits(ours, x), logits(native, x), rtol=0, atol=1e-6)


def test_save_pretrained_refuses_several_active_adapters_and_without_adapters_saves_the_model(
    tmp_path: Path, base_folder: Path
) -> None:
    model = MyLlama.from_pretrained(base_folder)
    assert not model._hf_peft_config_loaded
    model.save_pretrained(tmp_path / "plain")
    assert "model.safetensors" in os.listdir(tmp_path / "plain")
    model.add_adapter('lora[r=2, target_modules=["q_proj"]]', "a")
    model.add_adapter('lora[r=2, target_modules=["v_proj"]]', "b")
    model.set_adapter(["a", "b"])
    with pytest.raises(adapterkit.AdapterStateError, match="2 active"):
        model.save_pretrained(tmp_path / "two")
    assert not (tmp_path / "two").exists()


def test_mixin_model_under_trainer_checkpoints_adapters_only(tmp_path: Path, base_folder: Path) -> None:
    model = MyLlama.from_pretrained(base_folder)
    model.add_adapter('lora[r=4, target_modules=["q_proj", "v_proj"]]')
    trainer = Trainer(model=model, args=arguments(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2), train_dataset=token_rows())
    trainer.train()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "run" / "checkpoint-2"))
    assert not {"model.safetensors", "config.json"} & set(os.listdir(tmp_path / "run" / "checkpoint-2"))
    reloaded = MyLlama.from_pretrained(tmp_path / "run" / "checkpoint-2")
    assert torch.equal(logits(reloaded, llama_input()), logits(model, llama_input()))
