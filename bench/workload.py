"""The benchmark workload: Llama-shaped models, adapter configs, saved adapter folders, inputs.

Every system (adapterkit, peft, transformers) gets its own model object, but
all of them are clones of one base model built once per size: the clones share
the base weight *storage* (their ``nn.Parameter`` objects are distinct, so
``requires_grad`` and module wrapping stay per system), which keeps memory at
one copy of the base weights however many systems are compared. Merging
changes base weights in place, so merged forwards are timed one system at a
time and unmerged right after.

Adapter folders are written once per (size, method) by peft's own
``save_pretrained``, with random (non-zero) adapter weights, so that outputs
differ from the base model and can be checked across systems. All systems load
the same folders.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path

import torch
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK = 16


@dataclasses.dataclass(frozen=True)
class Size:
    """One model size; ``LlamaConfig`` fields plus the inputs used for forwards."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = 32000
    forward_shape: tuple[int, int] = (1, 64)  # (batch, tokens) for forward timings
    mixed_tokens: int = 8  # tokens per row in the 8-row mixed batch (64 tokens, as the forward timings)

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            vocab_size=self.vocab,
            max_position_embeddings=2048,
        )

    def describe(self) -> str:
        return (
            f"hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, "
            f"{self.heads} heads, vocab {self.vocab}, float32"
        )


SIZES = {
    "small": Size("small", hidden=512, intermediate=1408, layers=8, heads=8),
    # The reference workload.
    "medium": Size("medium", hidden=1024, intermediate=2816, layers=16, heads=16),
    # 5x the medium's parameters: forwards use half the tokens.
    "large": Size("large", hidden=2048, intermediate=5632, layers=24, heads=16, forward_shape=(1, 32)),
}


def method_config(method: str):
    """The peft config of each benchmarked method: r=16 (LoRA, AdaLoRA's initial rank) on the 7 projections."""
    from peft import AdaLoraConfig, IA3Config, LoraConfig

    if method == "lora":
        return LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=TARGETS)
    if method == "ia3":
        return IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"])
    if method == "adalora":
        return AdaLoraConfig(
            init_r=LORA_RANK,
            target_r=LORA_RANK // 2,
            lora_alpha=2 * LORA_RANK,
            lora_dropout=0.0,
            total_step=1000,
            target_modules=TARGETS,
        )
    raise ValueError(f"unknown method {method!r}")


def build_base(size: Size, seed: int = 0) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` in eval mode (no pretrained weights are needed for timing)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(size.config())
    return model.eval()


def clone(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its own module and ``Parameter`` objects but the same weight storage."""
    memo = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def write_adapters(base: nn.Module, method: str, count: int, root: Path, seed: int = 1) -> list[Path]:
    """Save ``count`` distinct adapters of ``method`` with peft's ``save_pretrained``; return their folders."""
    from peft import get_peft_model

    folders = []
    model = clone(base)
    peft_model = get_peft_model(model, method_config(method), adapter_name="default")
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if not param.requires_grad:
                    continue
                noise = torch.randn(param.shape, generator=generator)
                if "ia3_l" in name:
                    param.copy_(1.0 + 0.1 * noise)  # scaling vectors around 1
                else:
                    param.copy_(0.02 * noise)
        folder = root / f"{method}_{index}"
        peft_model.save_pretrained(str(folder))
        folders.append(folder)
    peft_model.unload()
    del peft_model, model
    return folders


def make_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="adapterkit-bench-"))


def input_ids(size: Size, batch: int, tokens: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, size.vocab, (batch, tokens), generator=generator)
