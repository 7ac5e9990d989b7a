"""The small models of the matrix: one per kind of layer peft adapts, each with its input.

They follow the ground peft's own custom-model tests cover (plain and bias-free
linear layers, transformers' GPT-2 ``Conv1D`` behind an embedding, 1-, 2- and
3-d convolutions with and without groups, ``nn.MultiheadAttention``, layers
that use bare ``nn.Parameter``s, expert weights as one 3-d parameter, a stack
of blocks for ``layers_to_transform``), written for this suite. Every model
computes each batch row from that row alone, so per-sample routing can be
checked row by row on all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

BATCH = 6


class Dense(nn.Module):
    """Two linear layers around a ReLU and a dropout."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.proj_in = nn.Linear(10, 16, bias=bias)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.2)
        self.proj_out = nn.Linear(16, 3, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.drop(self.act(self.proj_in(x))))


class TokensConv1D(nn.Module):
    """Token ids -> embedding -> transformers' ``Conv1D`` (GPT-2's linear layer, weight stored transposed)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.conv1d = Conv1D(6, 8)
        self.head = nn.Linear(4 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv1d(self.emb(x))).flatten(1))


class Convolution(nn.Module):
    """One convolution of 1, 2 or 3 dimensions (grouped or not, any kernel size) and a linear head."""

    def __init__(self, dims: int, groups: int = 1, kernel: int = 3) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv = conv(4, 8, kernel, groups=groups)
        self.head = nn.Linear(8 * (_side(dims) - kernel + 1) ** dims, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention, batch first) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mha(x, x, x, need_weights=False)[0])


class Affine(nn.Module):
    """``x @ weight + bias`` with bare parameters: only ``target_parameters`` can adapt it."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_in, fan_out) / fan_in**0.5)
        self.bias = nn.Parameter(torch.randn(fan_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class AffineDense(nn.Module):
    """:class:`Dense` built of :class:`Affine` layers."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = Affine(10, 16)
        self.proj_out = Affine(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(torch.relu(self.proj_in(x)))


class Experts(nn.Module):
    """Expert weights stacked in 3-d parameters, as in transformers' mixture-of-experts blocks."""

    def __init__(self, experts: int = 3, hidden: int = 8, inner: int = 6) -> None:
        super().__init__()
        self.inner = inner
        self.gate_up_proj = nn.Parameter(torch.randn(experts, hidden, 2 * inner) / hidden**0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, inner, hidden) / inner**0.5)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gate, up = torch.einsum("bi,eio->ebo", x, self.gate_up_proj).split(self.inner, dim=-1)
        out = torch.einsum("ebh,eho->ebo", F.silu(gate) * up, self.down_proj)
        return torch.einsum("ebo,be->bo", out, weights)


class MixtureOfExperts(nn.Module):
    """A router and :class:`Experts` (every token to every expert, weighted), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(8, 3)
        self.experts = Experts()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.experts(x, torch.softmax(self.router(x), dim=-1)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class Stack(nn.Module):
    """Three blocks in ``layers`` (a ModuleList), for ``layers_to_transform`` / ``layers_pattern``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return self.head(x)


def _floats(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(BATCH, *shape, generator=torch.Generator().manual_seed(1))


def _tokens() -> torch.Tensor:
    return torch.randint(0, 30, (BATCH, 4), generator=torch.Generator().manual_seed(1))


def _convolution(
    dims: int, groups: int = 1, kernel: int = 3
) -> tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]:
    return (lambda: Convolution(dims, groups, kernel)), _floats(4, *[_side(dims)] * dims)


def _side(dims: int) -> int:
    """The input's side length per spatial dimension (smaller in 3-d, to keep the models tiny)."""
    return 4 if dims == 3 else 5


# name -> (model factory, input factory)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "dense": (Dense, _floats(10)),
    "dense_nobias": (lambda: Dense(bias=False), _floats(10)),
    "tokens_conv1D": (TokensConv1D, _tokens),
    "conv1d": _convolution(1),
    "conv1d_groups": _convolution(1, groups=2),
    "conv2d": _convolution(2),
    "conv2d_groups": _convolution(2, groups=2),
    "conv2d_1x1": _convolution(2, kernel=1),
    "conv3d": _convolution(3),
    "conv3d_1x1": _convolution(3, kernel=1),
    "mha": (Attention, _floats(4, 8)),
    "affine": (AffineDense, _floats(10)),
    "experts": (MixtureOfExperts, _floats(8)),
    "stack": (Stack, _floats(8)),
}


def make_model(name: str) -> nn.Module:
    """A fresh model ``name``: the same weights every call, in eval mode."""
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


def make_input(name: str) -> torch.Tensor:
    return MODELS[name][1]()
