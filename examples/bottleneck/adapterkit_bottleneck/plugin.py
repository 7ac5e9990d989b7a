"""The adapterkit hooks of the bottleneck method.

Everything here uses the public contract only: :data:`adapterkit.hookimpl`,
the hook names of :mod:`adapterkit.hookspecs`, and adapterkit's errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from adapterkit import ConfigValueError, StateDictMismatchError, TargetError, hookimpl
from adapterkit.layers import claim, innermost, owner, positions, walk
from adapterkit.routing import replaced_forwards
from torch import nn

from .config import INITS, NONLINEARITIES, PLACEMENTS, BottleneckConfig
from .layer import Bottleneck, BottleneckLayer

__all__ = ["BottleneckPlugin", "Site"]

# Keys of a saved adapter_config.json that are bookkeeping, not config fields.
_BOOKKEEPING = {"peft_type", "peft_version", "inference_mode", "task_type", "revision", "auto_mapping"}


@dataclasses.dataclass(frozen=True)
class Site:
    """A :class:`BottleneckLayer` in a model: where it hangs (``parent.attr``) and its logical path."""

    logical: str
    parent: nn.Module
    attr: str
    layer: BottleneckLayer


# --8<-- [start:walk]
def _matches(logical: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, logical) is not None
    return any(logical == t or logical.endswith(f".{t}") for t in targets)


# --8<-- [end:walk]


class BottleneckPlugin:
    """The ``bottleneck`` adapter method. One instance is the plugin (``adapterkit_bottleneck:plugin``)."""

    name = "bottleneck"

    # -- finding our layers ---------------------------------------------------------------
    # --8<-- [start:targets]
    def sites(self, model: nn.Module, name: str | None = None) -> list[Site]:
        """Our layers in ``model`` (those holding adapter ``name``, if given), by logical path."""
        found = [
            Site(logical, parent, attr, module)
            for logical, parent, attr, module in walk(model)
            if owner(module) == self.name and (name is None or name in module.bottleneck)
        ]
        return sorted(found, key=lambda site: site.logical)

    def _targets(
        self, model: nn.Module, method: str, name: str, config: BottleneckConfig
    ) -> list[tuple[nn.Module, str, nn.Module]]:
        """``(parent, attr, module)`` for each targeted layer: the outermost module there, ours to extend or to wrap."""
        matched = []
        for logical, parent, attr, module in positions(model):
            if not _matches(logical, config.target_modules):
                continue
            # Another method may wrap the layer already: we wrap its wrapper (and so act after it).
            if owner(module) != self.name and not isinstance(innermost(module), nn.Linear):
                raise TargetError(
                    f"{method} adapter {name!r}: target {logical!r} is a {type(innermost(module)).__name__}; "
                    "bottleneck adapters wrap nn.Linear layers only. Name the Linear layers inside it."
                )
            matched.append((parent, attr, module))
        if not matched:
            linears = sorted({logical for logical, _, _, m in positions(model) if isinstance(innermost(m), nn.Linear)})
            shown = ", ".join(linears[:8]) + (f" (+{len(linears) - 8} more)" if len(linears) > 8 else "")
            raise TargetError(
                f"{method} adapter {name!r}: target_modules={config.target_modules!r} match no module of "
                f"{type(model).__name__}; its Linear layers are: {shown or 'none'}"
            )
        return matched

    # --8<-- [end:targets]

    # -- registration and configs -----------------------------------------------------------
    # --8<-- [start:register]
    @hookimpl
    def adapterkit_register_methods(self, register: Callable[..., None]) -> None:
        register(
            self.name,
            BottleneckConfig,
            description="Bottleneck adapters: down-projection, nonlinearity, up-projection, residual (native)",
        )

    # --8<-- [end:register]

    # --8<-- [start:configs]
    @hookimpl
    def adapterkit_validate_config(self, method: str, config: BottleneckConfig) -> None:
        def bad(key: str, fix: str) -> ConfigValueError:
            return ConfigValueError(f"{method} config key {key!r}={getattr(config, key)!r}: {fix}")

        targets = config.target_modules
        if targets is None or (not isinstance(targets, str) and len(targets) == 0) or targets == "":
            raise bad(
                "target_modules", "name the Linear layers to adapt, e.g. target_modules=['fc1'] or ['q_proj', 'v_proj']"
            )
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as exc:
                raise bad("target_modules", f"not a valid regular expression ({exc})") from None
        if (
            not isinstance(config.bottleneck_dim, int)
            or isinstance(config.bottleneck_dim, bool)
            or config.bottleneck_dim <= 0
        ):
            raise bad("bottleneck_dim", "must be a positive integer")
        if config.nonlinearity not in NONLINEARITIES:
            raise bad("nonlinearity", f"must be one of {', '.join(NONLINEARITIES)}")
        if config.placement not in PLACEMENTS:
            raise bad("placement", f"must be one of {', '.join(PLACEMENTS)}")
        if config.init not in INITS:
            raise bad("init", f"must be one of {', '.join(INITS)}")
        if not 0.0 <= config.dropout < 1.0:
            raise bad("dropout", "must be at least 0 and below 1")

    @hookimpl
    def adapterkit_config_to_dict(self, method: str, config: BottleneckConfig) -> dict[str, Any]:
        data = dataclasses.asdict(config)
        if isinstance(data["target_modules"], (list, tuple)):
            data["target_modules"] = list(data["target_modules"])
        data["peft_type"] = "BOTTLENECK"  # peft's key naming the method; adapterkit resolves it case-insensitively
        return data

    @hookimpl
    def adapterkit_config_from_dict(self, method: str, data: dict[str, Any]) -> BottleneckConfig:
        fields = {f.name for f in dataclasses.fields(BottleneckConfig)}
        unknown = sorted(set(data) - fields - _BOOKKEEPING)
        if unknown:
            # Written by a newer version of this plugin: keep what we understand, say what we drop.
            warnings.warn(f"ignoring {method} config keys unknown to this version: {unknown}", stacklevel=2)
        return BottleneckConfig(**{key: value for key, value in data.items() if key in fields})

    # --8<-- [end:configs]

    # -- injection -----------------------------------------------------------------------------
    # --8<-- [start:inject]
    @hookimpl
    def adapterkit_inject(
        self, model: nn.Module, method: str, name: str, config: BottleneckConfig, empty: bool
    ) -> None:
        for parent, attr, module in self._targets(model, method, name, config):
            if owner(module) == self.name:
                layer = module  # our layer is outermost here: add the adapter to it
            else:
                layer = BottleneckLayer(module)
                claim(layer, method)  # ours, for sites() (the core would record it once inject returns)
                setattr(parent, attr, layer)
            linear = layer.linear
            dtype = linear.weight.dtype if linear.weight.dtype.is_floating_point else torch.float32
            features_in = linear.out_features if config.placement == "sequential" else linear.in_features
            # empty=True: weights are about to be loaded; create them on the meta device, uninitialised.
            adapter = Bottleneck(
                features_in, linear.out_features, config, device="meta" if empty else linear.weight.device, dtype=dtype
            )
            if not empty:
                adapter.initialise(config.init)
            layer.bottleneck[name] = adapter

    @hookimpl
    def adapterkit_layer_adapters(self, model: nn.Module, method: str, layer: BottleneckLayer) -> list[str]:
        return list(layer.bottleneck)  # lets the core order merges of other methods around ours

    # --8<-- [end:inject]

    # -- activity ----------------------------------------------------------------------------------
    # --8<-- [start:activity]
    @hookimpl
    def adapterkit_set_active(
        self, model: nn.Module, method: str, names: Sequence[str], trainable: Sequence[str]
    ) -> None:
        for site in self.sites(model):
            layer = site.layer
            layer.active = [n for n in names if n in layer.bottleneck]
            for key, adapter in layer.bottleneck.items():
                adapter.requires_grad_(key in trainable)

    @hookimpl
    def adapterkit_enable(self, model: nn.Module, method: str) -> None:
        for site in self.sites(model):
            site.layer.enabled = True

    @hookimpl
    def adapterkit_disable(self, model: nn.Module, method: str) -> None:
        for site in self.sites(model):
            site.layer.enabled = False

    # --8<-- [end:activity]

    # -- state ------------------------------------------------------------------------------------------
    # --8<-- [start:state]
    def _expected(self, model: nn.Module, name: str) -> dict[str, tuple[BottleneckLayer, nn.Module, str]]:
        """Checkpoint key -> (layer, module holding the parameter, parameter name), for adapter ``name``."""
        expected = {}
        for site in self.sites(model, name):
            for param_name, _ in site.layer.bottleneck[name].named_parameters():
                *path, leaf = param_name.split(".")
                holder = site.layer.bottleneck[name].get_submodule(".".join(path))
                expected[f"{site.logical}.bottleneck.{param_name}"] = (site.layer, holder, leaf)
        return expected

    @hookimpl
    def adapterkit_extract_state(self, model: nn.Module, method: str, name: str) -> dict[str, torch.Tensor]:
        return {key: getattr(holder, leaf).detach() for key, (_, holder, leaf) in self._expected(model, name).items()}

    @hookimpl
    def adapterkit_load_state(
        self, model: nn.Module, method: str, name: str, state_dict: dict[str, torch.Tensor]
    ) -> None:
        expected = self._expected(model, name)
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        wrong = [
            f"{key}: checkpoint {tuple(state_dict[key].shape)} vs adapter {tuple(getattr(holder, leaf).shape)}"
            for key, (_, holder, leaf) in expected.items()
            if key in state_dict and state_dict[key].shape != getattr(holder, leaf).shape
        ]
        if missing or unexpected or wrong:
            parts = [
                f"{label}: {', '.join(items[:5])}" + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
                for label, items in (
                    ("missing keys", missing),
                    ("unexpected keys", unexpected),
                    ("wrong shapes", wrong),
                )
                if items
            ]
            raise StateDictMismatchError(
                f"{method} adapter {name!r}: the checkpoint does not fit the config's layers; {'; '.join(parts)}"
            )
        for key, (layer, holder, leaf) in expected.items():
            weight = layer.linear.weight
            dtype = weight.dtype if weight.dtype.is_floating_point else state_dict[key].dtype
            # Replaces the meta tensor left by inject(empty=True), on the adapted layer's device and dtype.
            setattr(
                holder, leaf, nn.Parameter(state_dict[key].to(device=weight.device, dtype=dtype), requires_grad=False)
            )

    # --8<-- [end:state]

    # -- deleting -------------------------------------------------------------------------------------
    # --8<-- [start:delete]
    @hookimpl
    def adapterkit_delete(self, model: nn.Module, method: str, name: str) -> None:
        # Also undoes a half-done inject: it must work on whatever exists, and never raise.
        for site in self.sites(model, name):
            del site.layer.bottleneck[name]
            site.layer.active = [n for n in site.layer.active if n != name]
            if not len(site.layer.bottleneck):
                setattr(site.parent, site.attr, site.layer.base_layer)  # unwrap: put the Linear back

    # --8<-- [end:delete]

    # -- mixed batches ----------------------------------------------------------------------------------
    # --8<-- [start:per_sample]
    @hookimpl
    def adapterkit_per_sample(
        self, model: nn.Module, method: str, rows: Sequence[str]
    ) -> contextlib.AbstractContextManager[None]:
        # For the length of the block, our layers' forwards in this thread route rows;
        # other threads' forwards on the same model compute the active adapters as usual.
        layers = [site.layer for site in self.sites(model)]
        return replaced_forwards(layers, lambda layer: functools.partial(layer.forward_rows, list(rows)))

    # --8<-- [end:per_sample]

    # No adapterkit_merge / adapterkit_unmerge: a nonlinear adapter cannot be folded into a
    # Linear's weights, so the core answers merge() with UnsupportedOperationError for us.
