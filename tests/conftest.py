"""Shared fixtures: small real models (built from configs, no downloads) and model fingerprints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:  # the core-only environment has no transformers
    LlamaConfig = LlamaForCausalLM = None

TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=64,
)


class MLP(nn.Module):
    """A plain model: no transformers, no config attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
            nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)))


def make_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP().eval()


def make_sequential(seed: int = 0) -> nn.Module:
    """Two Linear layers ("0", "2") around a Tanh: the smallest model with two targets."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)).eval()


def sequential_input() -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(3))


def llama_input() -> torch.Tensor:
    return torch.randint(0, TINY_LLAMA["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(1))


def mlp_input() -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


class Fingerprint:
    """Everything "the model is exactly as it was" means: modules, parameters, outputs."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.structure = str(model)
        self.modules = [(name, id(m)) for name, m in model.named_modules()]
        self.params = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
        self.output = run(model, x)

    def assert_same(self, model: nn.Module, x: torch.Tensor) -> None:
        assert str(model) == self.structure
        assert [(name, id(m)) for name, m in model.named_modules()] == self.modules
        params = dict(model.named_parameters())
        assert list(params) == list(self.params)
        for name, (value, requires_grad) in self.params.items():
            assert torch.equal(params[name].detach(), value), name
            assert params[name].requires_grad == requires_grad, name
        assert torch.equal(run(model, x), self.output)


@pytest.fixture
def llama() -> nn.Module:
    return make_llama()


@pytest.fixture
def mlp() -> nn.Module:
    return make_mlp()
