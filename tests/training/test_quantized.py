"""bitsandbytes 4-bit (nf4, fp4) and 8-bit bases on CPU: adapterkit against peft, and an exact unmerge."""

from __future__ import annotations

from pathlib import Path

import adapterkit
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

# bitsandbytes' CPU kernels need rows of at least one quantization block (64): a hidden size of 128.
SMALL_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=64)  # fmt: skip
KINDS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA)).save_pretrained(folder)
    return folder


def quantized(folder: Path, kind: str) -> LlamaForCausalLM:
    config = BitsAndBytesConfig(**KINDS[kind])
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu").eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits


@pytest.mark.parametrize("kind", list(KINDS))
def test_quantized_base_matches_peft_and_unmerge_restores_the_exact_weights(kind: str, base_folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(2)
    peft_model = get_peft_model(quantized(base_folder, kind), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    start = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(peft_model).items()}

    model = quantized(base_folder, kind)  # add: same initial weights through config + state_dict, then load
    adapters = adapterkit.attach(model)
    adapters.load(None, "added", config={"method": "lora", "r": 4, "target_modules": TARGETS}, state_dict=start, is_trainable=True)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__name__
    expected = logits(peft_model)
    assert torch.equal(logits(model), expected)
    adapters.load(tmp_path / "peft", "loaded")
    assert torch.equal(logits(model), expected)
    adapters.save(tmp_path / "ours", ["loaded"])
    back = PeftModel.from_pretrained(quantized(base_folder, kind), tmp_path / "ours" / "loaded").eval()
    assert torch.equal(logits(back), expected)

    base_rows = logits(quantized(base_folder, kind))
    with adapters.per_sample(["loaded", "__base__", "added"]):
        rows = logits(model)
    torch.testing.assert_close(rows[[0, 2]], expected[[0, 2]], rtol=0, atol=1e-5)
    torch.testing.assert_close(rows[1], base_rows[1], rtol=0, atol=1e-5)

    adapters.set_active("loaded")
    weights = {n: (m.weight, m.weight.detach().clone()) for n, m in model.named_modules() if adapterkit_quantized(m)}
    adapters.merge()
    peft_model.merge_adapter()
    assert torch.equal(logits(model), logits(peft_model))  # the same requantized merge as peft
    adapters.unmerge()
    for name, (param, values) in weights.items():
        now = model.get_submodule(name).weight
        assert now is param and torch.equal(now.detach(), values), name  # bit-identical: peft's unmerge is not
    assert torch.equal(logits(model), expected)


def adapterkit_quantized(module: torch.nn.Module) -> bool:
    return type(getattr(module, "weight", None)).__module__.startswith("bitsandbytes")


def test_adapters_train_on_a_4bit_base(base_folder: Path) -> None:
    model = quantized(base_folder, "nf4")
    adapters = adapterkit.attach(model)
    adapters.add('lora[r=4, target_modules=["q_proj", "v_proj"]]')
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    x = tokens()
    for _ in range(2):
        model(x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


def test_qlora_with_the_mixin_class_under_trainer(base_folder: Path, tmp_path: Path) -> None:
    """Trainer trains a quantized model only when transformers sees adapters: the mixin's _hf_peft_config_loaded."""
    import os

    from adapterkit.trainer import Trainer
    from training_helpers import arguments, token_rows

    class MyLlama(adapterkit.AdapterMixin, LlamaForCausalLM):
        pass

    model = MyLlama.from_pretrained(base_folder, quantization_config=BitsAndBytesConfig(**KINDS["nf4"]), device_map="cpu")
    model.add_adapter('lora[r=4, target_modules=["q_proj", "v_proj"]]')
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=1, save_strategy="steps", save_steps=1), train_dataset=token_rows())
    trainer.train()
    assert set(os.listdir(tmp_path / "checkpoint-1")) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert "model.safetensors" not in os.listdir(tmp_path / "checkpoint-1")
