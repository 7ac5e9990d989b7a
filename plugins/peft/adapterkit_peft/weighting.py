"""Weighted active adapters (``set_active(names, weights=...)``) on peft layers, in eager mode.

* Layers that keep peft's per-adapter ``scaling`` floats (LoRA, with DoRA and rsLoRA, and
  AdaLoRA): the adapter's effective scaling is peft's scaling x weight. peft's own value is
  kept beside it while the weight is not 1, so weights never compound, and weight 1 puts
  peft's value back exactly.
* (IA)^3 vectors: weight ``w`` scales the vector's deviation from 1, ``v_eff = 1 + w (v - 1)``
  (``w = 1``: the adapter; ``w = 0``: no effect). peft's forward reads the parameter, so the
  effective vector is written into it, in place, while the weight is not 1; the original
  values are kept (a copy) and are what :func:`original` gives to ``state_dict``/``save``.
  A trainable (IA)^3 adapter refuses weights: the weighted vector is what would train.

A weight is a property of the adapter while it is active: a ``per_sample`` row naming a
weighted adapter uses the weight too, and ``merge`` folds in what the model computes (the
weighted adapter). Everything kept lives on the layer (``layer.__dict__``), so copies and
pickles of the model carry it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from adapterkit import UnsupportedOperationError
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .layers import container

__all__ = ["apply_weights", "check_weights", "forget", "original", "replace_original"]

# Layer attribute: {adapter name: (weight, peft's value: a float scaling or a copy of the vector)}.
_KEPT = "_adapterkit_weighted"


def _kind(layer: BaseTunerLayer) -> str | None:
    if isinstance(getattr(layer, "scaling", None), dict):
        return "scaling"
    if isinstance(container(layer, "ia3_l"), nn.ParameterDict):
        return "vector"
    return None


def _holds(layer: BaseTunerLayer, kind: str, name: str) -> bool:
    return name in (layer.scaling if kind == "scaling" else container(layer, "ia3_l"))


def check_weights(
    method: str, layers: Iterable[BaseTunerLayer], weights: Mapping[str, float], trainable: Sequence[str]
) -> None:
    """Raise :class:`UnsupportedOperationError` if some layer cannot weigh the adapters of ``weights`` (nothing written)."""
    if not weights:
        return
    for layer in layers:
        kind = _kind(layer)
        held = [name for name in weights if name in adapters_of(layer)]
        if held and kind is None:
            raise UnsupportedOperationError(
                f"set_active: {method} adapters {held} cannot be weighted on a peft {type(layer).__name__} layer "
                "(it keeps neither scalings nor scaling vectors); pass weights=None for them"
            )
        if kind == "vector":
            training = [name for name in held if name in trainable]
            if training:
                raise UnsupportedOperationError(
                    f"set_active: {method} adapters {training} are trainable; a weight would make the weighted "
                    "vector what trains. Weigh adapters loaded for inference (is_trainable=False), or pass weights=None"
                )


def adapters_of(layer: BaseTunerLayer) -> Any:
    kind = _kind(layer)
    if kind == "scaling":
        return layer.scaling
    if kind == "vector":
        return container(layer, "ia3_l")
    return {name for attr in layer.adapter_layer_names for name in container(layer, attr) or ()}


def apply_weights(layers: Iterable[BaseTunerLayer], weights: Mapping[str, float]) -> None:
    """Make the adapters' weights on ``layers`` exactly ``weights`` (names left out weigh 1)."""
    for layer in layers:
        kept = layer.__dict__.get(_KEPT)
        if not kept and not weights:
            continue
        kind = _kind(layer)
        if kind is None:
            continue
        for name in {*(kept or ()), *weights}:
            _set(layer, kind, name, float(weights.get(name, 1.0)))


def _set(layer: BaseTunerLayer, kind: str, name: str, weight: float) -> None:
    kept = layer.__dict__.setdefault(_KEPT, {})
    if not _holds(layer, kind, name):
        kept.pop(name, None)  # the adapter left the layer (deleted): nothing to put back
        return
    previous = kept.get(name)
    if previous is not None and previous[0] == weight:
        return
    if previous is not None:
        value = previous[1]
    elif kind == "scaling":
        value = layer.scaling[name]
    else:
        value = container(layer, "ia3_l")[name].detach().clone()
    _write(layer, kind, name, value, weight)
    if weight == 1.0:
        kept.pop(name, None)
    else:
        kept[name] = (weight, value)


def _write(layer: BaseTunerLayer, kind: str, name: str, value: Any, weight: float) -> None:
    if kind == "scaling":
        layer.scaling[name] = value * weight if weight != 1.0 else value
        return
    with torch.no_grad():
        target = container(layer, "ia3_l")[name]
        target.copy_(value if weight == 1.0 else 1 + weight * (value - 1))


def original(layer: BaseTunerLayer, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (adapter ``name``'s parameter in ``layer``), or the original values while a weight is written in it."""
    kept = layer.__dict__.get(_KEPT)
    if kept and name in kept and isinstance(kept[name][1], torch.Tensor) and _kind(layer) == "vector":
        return kept[name][1]
    return tensor


def replace_original(layer: BaseTunerLayer, name: str, value: Any) -> bool:
    """A swap put new values (a scaling float, or the vector values) under a weighted adapter: keep them, write the weighted ones.

    Returns False when the adapter is not weighted on this layer (the caller writes ``value`` itself).
    """
    kept = layer.__dict__.get(_KEPT)
    if not kept or name not in kept:
        return False
    weight = kept[name][0]
    kind = _kind(layer)
    value = value.detach().clone() if isinstance(value, torch.Tensor) else value
    kept[name] = (weight, value)
    _write(layer, kind, name, value, weight)
    return True


def forget(layer: BaseTunerLayer, name: str) -> None:
    """Adapter ``name`` leaves ``layer``: drop what was kept for its weight."""
    kept = layer.__dict__.get(_KEPT)
    if kept:
        kept.pop(name, None)
