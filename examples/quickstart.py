"""adapterkit in two minutes: LoRA on a small Llama built from a config, end to end.

Adds a LoRA adapter by config string, trains it on a toy next-token task,
saves it in peft's format, reloads it with peft and with adapterkit into fresh
models and checks the outputs agree, switches adapters, and runs one batch
whose rows use different adapters.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

import adapterkit

CONFIG = LlamaConfig(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, vocab_size=256
)


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same "pretrained" base every time
    return LlamaForCausalLM(CONFIG).eval()


def task(shift: int, n: int = 64, length: int = 16) -> torch.Tensor:
    """Sequences where each token is the previous one plus ``shift`` (mod vocab): learnable, checkable."""
    start = torch.randint(0, CONFIG.vocab_size, (n, 1), generator=torch.Generator().manual_seed(shift))
    return (start + shift * torch.arange(length)) % CONFIG.vocab_size


def accuracy(model, data: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = model(data[:, :-1]).logits.argmax(-1)
    return (predicted == data[:, 1:]).float().mean().item()


def train(model, data: torch.Tensor, steps: int) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(steps):
        loss = model(data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == steps - 1:
            print(f"    step {step:3d}  loss {loss.item():.3f}", flush=True)
    model.eval()


def main() -> int:
    started = time.perf_counter()
    print(f"adapterkit {adapterkit.__version__}; methods installed: {', '.join(adapterkit.available_methods())}")
    model = base_model()
    adapters = adapterkit.attach(model)
    rows = []
    for name, shift in (("plus1", 1), ("plus3", 3)):
        data = task(shift)
        spec = 'lora[r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]]'
        adapters.add(spec, name)
        before = accuracy(model, data)
        print(f"training {name!r} ({spec})")
        train(model, data, steps=60)
        rows.append((name, before, accuracy(model, data)))

    ok = True
    with tempfile.TemporaryDirectory() as folder:
        adapters.save(folder)
        data = task(3)
        adapters.set_active("plus3")
        ours = model(data).logits
        peft_model = PeftModel.from_pretrained(base_model(), f"{folder}/plus3").eval()
        fresh = base_model()
        adapterkit.attach(fresh).load(folder, "plus3", subfolder="plus3")
        peft_diff = (peft_model(data).logits - ours).abs().max().item()
        reload_diff = (fresh(data).logits - ours).abs().max().item()
        print(f"reloaded 'plus3': max |diff| vs peft {peft_diff:.2e}, vs adapterkit {reload_diff:.2e}")
        ok &= peft_diff <= 1e-5 and reload_diff <= 1e-5

    mixed = torch.cat([task(1, n=2), task(3, n=2)])
    with torch.no_grad(), adapters.per_sample(["plus1", "plus1", "plus3", "plus3"]):
        predicted = model(mixed[:, :-1]).logits.argmax(-1)
    mixed_acc = (predicted == mixed[:, 1:]).float().mean().item()
    print(f"one batch, rows routed to different adapters: accuracy {mixed_acc:.2f}")

    print("\n| adapter | accuracy before | accuracy after |\n|---|---|---|")
    for name, before, after in rows:
        print(f"| {name} | {before:.2f} | {after:.2f} |")
        ok &= after > before + 0.3
    print(f"\n{'OK' if ok else 'FAILED'} in {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
