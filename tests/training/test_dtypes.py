"""Adapters on a half-precision base: float32 by default (peft's autocast_adapter_dtype), the layer's dtype on request."""

from __future__ import annotations

from pathlib import Path

import adapterkit
import torch
from conftest import llama_input, make_llama
from peft import LoraConfig, PeftModel, get_peft_model

LORA = 'lora[r=8, target_modules=["q_proj", "v_proj"]]'


def bf16_llama() -> torch.nn.Module:
    return make_llama().to(torch.bfloat16)


def adapter_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def test_every_trainable_value_moves_in_five_adamw_steps_on_a_bf16_base() -> None:
    model = bf16_llama()
    adapters = adapterkit.attach(model)
    adapters.add(LORA)
    params = adapter_params(model)
    assert {p.dtype for p in params.values()} == {torch.float32}
    assert all(p.requires_grad for p in params.values())
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4)
    x = llama_input()
    model.train()
    for _ in range(5):
        model(x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    unmoved = sum(int((p.detach() == before[n]).sum()) for n, p in params.items())
    assert unmoved == 0


def test_autocast_adapter_dtype_false_keeps_the_layer_dtype() -> None:
    model = bf16_llama()
    adapterkit.attach(model).add(LORA, autocast_adapter_dtype=False)
    assert {p.dtype for p in adapter_params(model).values()} == {torch.bfloat16}


def test_loads_are_float32_as_in_peft_for_inference_and_training(tmp_path: Path) -> None:
    torch.manual_seed(0)
    peft_model = get_peft_model(bf16_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path)
    x = llama_input()
    for trainable in (False, True):
        reference = PeftModel.from_pretrained(bf16_llama(), tmp_path, is_trainable=trainable).eval()
        model = bf16_llama()
        adapterkit.attach(model).load(tmp_path, is_trainable=trainable)
        assert {p.dtype for p in adapter_params(model).values()} == {torch.float32}
        with torch.no_grad():
            assert torch.equal(model(x).logits, reference(x).logits)
    kept = bf16_llama()
    adapterkit.attach(kept).load(tmp_path, autocast_adapter_dtype=False)
    assert {p.dtype for p in adapter_params(kept).values()} == {torch.bfloat16}


def test_autocast_trains_float32_adapters_on_a_float32_base() -> None:
    model = make_llama()
    adapterkit.attach(model).add(LORA)
    x = llama_input()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, labels=x).loss
    loss.backward()
    grads = [p.grad for p in adapter_params(model).values()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)
