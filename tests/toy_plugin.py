"""A native (non-peft) adapter method used by the core's tests: a learned scale on Linear outputs."""

from __future__ import annotations

import contextlib

import attrs
import torch
from torch import nn

import adapterkit


@attrs.define
class ScaleConfig:
    target_modules: list[str] = attrs.field(factory=list)
    init: float = 1.0


class Scaled(nn.Module):
    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scales = nn.ParameterDict()
        self.active: list[str] = []
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.enabled:
            for name in self.active:
                out = out * self.scales[name]
        return out


class ScalePlugin:
    """Implements only the required hooks; records every call it receives."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def _sites(self, model):
        return [(n, m) for n, m in model.named_modules() if isinstance(m, Scaled)]

    @adapterkit.hookimpl
    def adapterkit_register_methods(self, register):
        register("scale", ScaleConfig, aliases=("SCALE",), description="toy scale")

    @adapterkit.hookimpl
    def adapterkit_inject(self, model, method, name, config, empty):
        self.calls.append(("inject", method))
        targets = [n for n, m in model.named_modules() if n.split(".")[-1] in config.target_modules]
        if not targets:
            raise adapterkit.TargetError(f"scale: {config.target_modules} match nothing")
        for target in targets:
            module = model.get_submodule(target)
            if not isinstance(module, Scaled):
                parent_name, _, child = target.rpartition(".")
                module = Scaled(module)
                setattr(model.get_submodule(parent_name), child, module)
            device = "meta" if empty else None
            module.scales[name] = nn.Parameter(torch.full((module.base_layer.out_features,), config.init, device=device))

    @adapterkit.hookimpl
    def adapterkit_set_active(self, model, method, names, trainable):
        self.calls.append(("set_active", method))
        for _, module in self._sites(model):
            module.active = [n for n in names if n in module.scales]
            for key, param in module.scales.items():
                param.requires_grad_(key in trainable)

    @adapterkit.hookimpl
    def adapterkit_enable(self, model, method):
        for _, module in self._sites(model):
            module.enabled = True

    @adapterkit.hookimpl
    def adapterkit_disable(self, model, method):
        for _, module in self._sites(model):
            module.enabled = False

    @adapterkit.hookimpl
    def adapterkit_extract_state(self, model, method, name):
        self.calls.append(("extract_state", method))
        return {f"{n}.scale": m.scales[name].detach() for n, m in self._sites(model) if name in m.scales}

    @adapterkit.hookimpl
    def adapterkit_load_state(self, model, method, name, state_dict):
        for n, m in self._sites(model):
            if name in m.scales:
                m.scales[name] = nn.Parameter(state_dict[f"{n}.scale"], requires_grad=False)

    @adapterkit.hookimpl
    def adapterkit_delete(self, model, method, name):
        self.calls.append(("delete", method))
        for n, m in self._sites(model):
            if name in m.scales:
                del m.scales[name]
            if not len(m.scales):
                parent_name, _, child = n.rpartition(".")
                setattr(model.get_submodule(parent_name), child, m.base_layer)

    @adapterkit.hookimpl
    def adapterkit_per_sample(self, model, method, rows):
        return contextlib.nullcontext()
