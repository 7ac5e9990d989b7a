"""The conformance suite's partner method: a small native method for a plugin to live beside.

``contract_partner`` wraps ``nn.Linear`` layers (on top of whatever wraps them
already) and adds ``B(A(x)) + c`` per active adapter: a low-rank delta like
LoRA's, plus an output offset ``c``. It merges exactly (into the weight and bias
of the ``Linear`` at the bottom of the stack), routes per-sample rows, and
reports which adapters each wrapper holds. With ``A`` and ``B`` at zero it is a
pure offset on the layer's output, which gives the suite an oracle for any
plugin: applied after the plugin, it adds ``c`` to the plugin's output; applied
before it, it is the plugin on a ``Linear`` whose bias is ``c`` higher.

It uses the public contract only and imports no peft, so the suite runs it in
every environment, the core's alone included.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import nn

from ..errors import StateDictMismatchError, TargetError, UnsupportedOperationError
from ..hookspecs import hookimpl
from ..layers import claim, innermost, owner, positions, walk
from ..routing import check_rows, replaced_forwards

__all__ = ["NAME", "PartnerConfig", "PartnerLayer", "PartnerPlugin"]

NAME = "contract_partner"


@attrs.define
class PartnerConfig:
    """``target_modules``: a regular expression matched against whole logical paths, or a list of names
    matched against their ends (as peft matches them)."""

    target_modules: str | list[str] = ""
    r: int = 2


def _matches(path: str, targets: str | list[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith(f".{t}") for t in targets)


class PartnerLayer(nn.Module):
    """Wraps a module (``base_layer``) whose stack ends in an ``nn.Linear``; adds ``B(A(x)) + c`` per active adapter."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        self.offset = nn.ParameterDict()
        self.active: list[str] = []
        self.enabled = True
        self.merged: list[str] = []

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_a[name].T) @ self.lora_b[name].T + self.offset[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if not self.enabled or self.merged:
            return out
        for name in self.active:
            out = out + self.delta(name, x)
        return out

    def forward_rows(self, rows: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Row ``i`` through adapter ``rows[i]`` (the base output for rows naming no adapter of this layer)."""
        out = self.base_layer(x, *args, **kwargs)
        check_rows(rows, out.shape[0])
        if not self.enabled or not any(row in self.offset for row in rows):
            return out
        deltas = [self.delta(row, x[i : i + 1])[0] if row in self.offset else None for i, row in enumerate(rows)]
        return torch.stack([o if d is None else o + d for o, d in zip(out, deltas)])


class PartnerPlugin:
    """The ``contract_partner`` method (registered in-process by the suite, never through an entry point).

    ``name`` registers it under another method name (the suite's own tests run the
    contract on it that way, beside itself as the partner).
    """

    def __init__(self, name: str = NAME) -> None:
        self.name = name

    def _layers(self, model: nn.Module, name: str | None = None) -> list[tuple[str, nn.Module, str, PartnerLayer]]:
        return [
            (path, parent, attr, module)
            for path, parent, attr, module in walk(model)
            if owner(module) == self.name and (name is None or name in module.offset)
        ]

    @hookimpl
    def adapterkit_register_methods(self, register: Any) -> None:
        config_type = PartnerConfig if self.name == NAME else type(f"{self.name}Config", (PartnerConfig,), {})
        register(self.name, config_type, description="the conformance suite's partner method")

    @hookimpl
    def adapterkit_inject(self, model: nn.Module, method: str, name: str, config: PartnerConfig, empty: bool) -> None:
        for parent, attr, layer in self._targets(model, config):
            if layer is None:
                layer = PartnerLayer(getattr(parent, attr))
                claim(layer, self.name)
                setattr(parent, attr, layer)
            linear = innermost(layer)
            options = {"device": "meta" if empty else linear.weight.device, "dtype": linear.weight.dtype}
            make = torch.empty if empty else torch.zeros  # zeros: a new adapter changes nothing until trained
            layer.lora_a[name] = nn.Parameter(make(config.r, linear.in_features, **options))
            layer.lora_b[name] = nn.Parameter(make(linear.out_features, config.r, **options))
            layer.offset[name] = nn.Parameter(make(linear.out_features, **options))

    def _targets(self, model: nn.Module, config: PartnerConfig) -> list[tuple[nn.Module, str, PartnerLayer | None]]:
        """``(parent, attr, layer)`` per target: our outermost layer there to extend, or ``None`` to wrap ``parent.attr``."""
        found = [(p, parent, a, m) for p, parent, a, m in positions(model) if _matches(p, config.target_modules)]
        if not found:
            raise TargetError(f"{self.name}: {config.target_modules!r} matches no module")
        targets = []
        for _, parent, attr, module in found:
            if not isinstance(innermost(module), nn.Linear):
                raise TargetError(f"{self.name}: wraps nn.Linear layers only")
            targets.append((parent, attr, module if owner(module) == self.name else None))
        return targets

    @hookimpl
    def adapterkit_set_active(self, model: nn.Module, method: str, names: Sequence[str], trainable: Sequence[str]) -> None:
        for _, _, _, layer in self._layers(model):
            layer.active = [n for n in names if n in layer.offset]
            for store in (layer.lora_a, layer.lora_b, layer.offset):
                for key, param in store.items():
                    param.requires_grad_(key in trainable)

    @hookimpl
    def adapterkit_enable(self, model: nn.Module, method: str) -> None:
        for *_, layer in self._layers(model):
            layer.enabled = True

    @hookimpl
    def adapterkit_disable(self, model: nn.Module, method: str) -> None:
        for *_, layer in self._layers(model):
            layer.enabled = False

    def _expected(self, model: nn.Module, name: str) -> dict[str, tuple[PartnerLayer, nn.ParameterDict]]:
        """Checkpoint key -> (layer, the ParameterDict holding the tensor under the adapter's name)."""
        return {
            f"{path}.{part}": (layer, getattr(layer, part))
            for path, _, _, layer in self._layers(model, name)
            for part in ("lora_a", "lora_b", "offset")
        }

    @hookimpl
    def adapterkit_extract_state(self, model: nn.Module, method: str, name: str) -> dict[str, torch.Tensor]:
        return {key: store[name].detach() for key, (_, store) in self._expected(model, name).items()}

    @hookimpl
    def adapterkit_load_state(self, model: nn.Module, method: str, name: str, state_dict: dict[str, torch.Tensor]) -> None:
        expected = self._expected(model, name)
        if set(expected) != set(state_dict) or any(state_dict[k].shape != s[name].shape for k, (_, s) in expected.items()):
            raise StateDictMismatchError(
                f"{self.name} adapter {name!r}: the checkpoint's keys or shapes do not fit; expected {sorted(expected)}"
            )
        for key, (layer, store) in expected.items():
            weight = innermost(layer).weight
            store[name] = nn.Parameter(state_dict[key].to(weight.device, weight.dtype), requires_grad=False)

    @hookimpl
    def adapterkit_delete(self, model: nn.Module, method: str, name: str) -> None:
        for _, parent, attr, layer in self._layers(model, name):
            for store in (layer.lora_a, layer.lora_b, layer.offset):
                if name in store:
                    del store[name]
            layer.active = [n for n in layer.active if n != name]
            if not len(layer.offset):
                setattr(parent, attr, layer.base_layer)

    @hookimpl
    def adapterkit_merge(self, model: nn.Module, method: str, names: Sequence[str]) -> None:
        if any(innermost(layer).bias is None for *_, layer in self._layers(model)):
            raise UnsupportedOperationError(f"{self.name} merges into Linear layers with a bias only")
        with torch.no_grad():
            for *_, layer in self._layers(model):
                linear = innermost(layer)
                for name in names:
                    if name in layer.offset:
                        linear.weight += layer.lora_b[name] @ layer.lora_a[name]
                        linear.bias += layer.offset[name]
                        layer.merged.append(name)

    @hookimpl
    def adapterkit_unmerge(self, model: nn.Module, method: str, names: Sequence[str]) -> None:
        with torch.no_grad():
            for *_, layer in self._layers(model):
                linear = innermost(layer)
                for name in reversed(names):
                    if name in layer.merged:
                        linear.weight -= layer.lora_b[name] @ layer.lora_a[name]
                        linear.bias -= layer.offset[name]
                        layer.merged.remove(name)

    @hookimpl
    def adapterkit_layer_adapters(self, model: nn.Module, method: str, layer: PartnerLayer) -> list[str]:
        return list(layer.offset)

    @hookimpl
    def adapterkit_per_sample(self, model: nn.Module, method: str, rows: Sequence[str]) -> Any:
        # Routing in the thread that opened the block only (adapterkit.routing).
        layers = [layer for *_, layer in self._layers(model)]
        return replaced_forwards(layers, lambda layer: functools.partial(layer.forward_rows, list(rows)))
