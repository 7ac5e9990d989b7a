"""The modules: one :class:`Bottleneck` per adapter, inside a :class:`BottleneckLayer` wrapping a ``Linear``."""

from __future__ import annotations

import torch
from adapterkit.layers import innermost
from adapterkit.routing import check_rows
from torch import nn

from .config import BottleneckConfig

__all__ = ["Bottleneck", "BottleneckLayer", "make_activation"]


def make_activation(name: str) -> nn.Module:
    """The activation module for a config's ``nonlinearity``."""
    return {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}[name]()


class Bottleneck(nn.Module):
    """One adapter: ``scaling * up(act(down(dropout(src))))``.

    Its parameters are ``down.weight``, ``down.bias``, ``up.weight`` and
    ``up.bias``; these names, after the layer's path and ``bottleneck.``, are
    the checkpoint keys.
    """

    def __init__(
        self,
        features_in: int,
        features_out: int,
        config: BottleneckConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.placement = config.placement
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.down = nn.Linear(features_in, config.bottleneck_dim, bias=config.bias, device=device, dtype=dtype)
        self.act = make_activation(config.nonlinearity)
        self.up = nn.Linear(config.bottleneck_dim, features_out, bias=config.bias, device=device, dtype=dtype)

    def initialise(self, init: str) -> None:
        """Apply the config's ``init``; ``nn.Linear`` has already initialised both projections randomly."""
        if init == "zeros":
            nn.init.zeros_(self.up.weight)
            if self.up.bias is not None:
                nn.init.zeros_(self.up.bias)

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        return self.up(self.act(self.down(self.dropout(src.to(dtype))))) * self.scaling


class BottleneckLayer(nn.Module):
    """Wraps a ``Linear`` (``base_layer``) and adds the deltas of its active adapters to its output.

    Several active adapters add up: each delta is computed from the base layer's
    output (or input, for ``placement="parallel"``), never from another
    adapter's result. The attribute is called ``base_layer``, as adapterkit's
    contract (and peft) want it: ``base_layer`` may also be another method's
    wrapper around the ``Linear``, when that method adapted the layer first.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bottleneck = nn.ModuleDict()  # adapter name -> Bottleneck
        self.active: list[str] = []
        self.enabled = True

    @property
    def linear(self) -> nn.Linear:
        """The model's own ``Linear`` at the bottom of the stack (``base_layer`` itself, unless another method wraps it)."""
        return innermost(self.base_layer)

    # The wrapped layer's attributes, for code that reads them through the wrapper.
    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def _source(self, adapter: Bottleneck, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out if adapter.placement == "sequential" else x

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if not self.enabled:
            return out
        result = out
        for name in self.active:
            adapter = self.bottleneck[name]
            result = result + adapter(self._source(adapter, x, out)).to(out.dtype)
        return result

    def forward_rows(self, rows: list[str], x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """The forward under ``Adapters.per_sample(rows)``: row ``i`` gets adapter ``rows[i]`` only."""
        out = self.base_layer(x, *args, **kwargs)
        if not self.enabled:
            return out
        check_rows(rows, out.shape[0])
        result = out
        for name in dict.fromkeys(rows):
            if name not in self.bottleneck:
                continue  # "__base__", another method's adapter, or one of ours that does not adapt this layer
            adapter = self.bottleneck[name]
            index = torch.tensor([i for i, row in enumerate(rows) if row == name], device=out.device)
            delta = adapter(self._source(adapter, x, out).index_select(0, index)).to(out.dtype)
            result = result.index_add(0, index, delta)
        return result

    def extra_repr(self) -> str:
        return f"active={self.active}, enabled={self.enabled}"
