"""transformers' real Trainer on models whose adapters adapterkit attached (``adapterkit.trainer.Trainer``).

Checkpoints and ``save_model()`` folders hold peft-format adapter files and nothing of the base model;
resuming ends bit-identical to an uninterrupted run; the folders load in PeftModel, in transformers'
``load_adapter`` and in adapterkit with equal logits.
"""

from __future__ import annotations

import os
from pathlib import Path

import adapterkit
import pytest
import torch
from adapterkit.trainer import Trainer
from peft import PeftModel
from safetensors.torch import load_file

from conftest import llama_input, make_llama
from training_helpers import arguments, logits, token_rows

LORA = 'lora[r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False]'
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def lora_llama() -> torch.nn.Module:
    model = make_llama()
    torch.manual_seed(1)
    adapterkit.attach(model).add(LORA)
    return model


def test_checkpoints_hold_only_the_adapter_and_resume_ends_bit_identical(tmp_path: Path) -> None:
    data = token_rows()
    full = lora_llama()
    Trainer(model=full, args=arguments(tmp_path / "full", max_steps=6, save_strategy="steps", save_steps=3), train_dataset=data).train()
    for step in (3, 6):
        folder = tmp_path / "full" / f"checkpoint-{step}"
        assert set(os.listdir(folder)) == ADAPTER_FILES | TRAINER_FILES
    final = adapterkit.attach(full).state_dict()
    saved = load_file(tmp_path / "full" / "checkpoint-6" / "adapter_model.safetensors")
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in saved)

    resumed = lora_llama()  # a fresh model and adapter, as a new process would build them
    trainer = Trainer(model=resumed, args=arguments(tmp_path / "resumed", max_steps=6), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    again = adapterkit.attach(resumed).state_dict()
    assert all(torch.equal(again[k], final[k]) for k in final)
    assert [p for p in trainer.optimizer.param_groups[0]["params"]] == [p for p in resumed.parameters() if p.requires_grad]


def test_save_model_folder_loads_in_peft_transformers_and_adapterkit(tmp_path: Path) -> None:
    model = lora_llama()
    trainer = Trainer(model=model, args=arguments(tmp_path / "run", max_steps=2), train_dataset=token_rows())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert set(os.listdir(tmp_path / "final")) == ADAPTER_FILES | {"training_args.bin"}
    x = llama_input()
    expected = logits(model, x)

    peft_model = PeftModel.from_pretrained(make_llama(), tmp_path / "final")
    torch.testing.assert_close(logits(peft_model, x), expected, rtol=0, atol=1e-6)
    native = make_llama()
    native.load_adapter(str(tmp_path / "final"))  # transformers' own PeftAdapterMixin
    torch.testing.assert_close(logits(native, x), expected, rtol=0, atol=1e-6)
    ours = make_llama()
    adapterkit.attach(ours).load(tmp_path / "final")
    assert torch.equal(logits(ours, x), expected)


def test_a_model_without_adapters_trains_as_with_transformers(tmp_path: Path) -> None:
    model = make_llama()
    trainer = Trainer(model=model, args=arguments(tmp_path / "run", max_steps=1), train_dataset=token_rows())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert "model.safetensors" in os.listdir(tmp_path / "final")


def test_resume_refuses_an_optimizer_built_on_the_old_parameters(tmp_path: Path) -> None:
    model = lora_llama()
    Trainer(model=model, args=arguments(tmp_path / "run", max_steps=1, save_strategy="steps", save_steps=1), train_dataset=token_rows()).train()
    other = lora_llama()
    optimizer = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    trainer = Trainer(model=other, args=arguments(tmp_path / "again", max_steps=2), train_dataset=token_rows(), optimizers=(optimizer, None))
    with pytest.raises(adapterkit.AdapterStateError, match="optimizers="):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
