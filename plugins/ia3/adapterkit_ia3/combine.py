"""IA3's ``combine``: ``how="linear"``, a new scaling vector per layer ``v = 1 + Σ w_i (v_i - 1)``.

Each adapter's weight scales its vector's deviation from 1, as a weight in ``set_active`` does,
so an adapter absent from a layer (``v_i = 1`` there) contributes nothing, and one adapter with
weight ``w`` gives ``1 + w (v - 1)``. peft's ``IA3Model.add_weighted_adapter`` computes
``Σ w_i v_i`` (an absent adapter counting as 0): the same where every adapter adapts the layer
and the weights sum to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from adapterkit import ConfigValueError, UnsupportedOperationError
from adapterkit.layers import positions
from adapterkit_peft import adapter_tensors
from adapterkit_peft.heads import head_state
from adapterkit_peft.targets import exact_modules
from peft import IA3Config
from torch import nn

__all__ = ["combine"]


def combine(
    plugin: Any, model: nn.Module, names: Sequence[str], weights: Sequence[float], how: str, options: dict[str, Any]
) -> tuple[IA3Config, dict[str, torch.Tensor]]:
    """The config and tensors of the weighted combination of IA3 adapters ``names`` (``adapterkit_combine``)."""
    if how != "linear":
        raise ConfigValueError(f"combine: how={how!r} is not an IA3 combination; IA3 offers ['linear']")
    given = sorted(key for key, value in options.items() if value is not None)
    if given:
        raise ConfigValueError(f"combine(how='linear') for IA3 takes no options, got {given}")
    for name in names:
        if head_state(model, name):
            raise UnsupportedOperationError(
                f"combine: IA3 adapter {name!r} has modules_to_save (whole copies of modules), which cannot be "
                "combined; combine adapters without modules_to_save"
            )
    state: dict[str, torch.Tensor] = {}
    layers: dict[str, nn.Module] = {}
    with torch.no_grad():
        for name, weight in zip(names, weights):
            for site in plugin.sites(model, name):
                tensors = {suffix: getattr(owner, leaf) for suffix, owner, leaf in adapter_tensors(site.layer, name)}
                vector = tensors["ia3_l"].detach()
                if vector.is_meta:
                    raise UnsupportedOperationError(
                        f"combine: IA3 adapter {name!r} on {site.logical!r} is offloaded (meta tensors); combine "
                        "before dispatching the model"
                    )
                key = f"{site.logical}.ia3_l"
                vector = vector.to(torch.promote_types(vector.dtype, torch.float32))
                state[key] = state.get(key, torch.ones_like(vector)) + weight * (vector - 1)
                layers[site.logical] = site.layer
    paths = sorted(layers)
    feedforward = [path for path in paths if layers[path].is_feedforward]
    config = IA3Config(
        target_modules=exact_modules(paths, (path for path, *_ in positions(model))),
        # peft tests only the targets against feedforward_modules, and as plain suffixes
        feedforward_modules=exact_modules(feedforward, paths, separator="") if feedforward else [],
        fan_in_fan_out=any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values()),
    )
    return config, state
