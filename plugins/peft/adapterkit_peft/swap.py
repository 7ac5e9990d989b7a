"""Hot-swap for peft-based methods (:meth:`adapterkit.Adapters.swap`): new values written into an adapter's tensors.

:func:`swap_in_place` checks that the new adapter fits the one in the model -- the same layers,
tensor shapes (ranks), DoRA, bias option, heads and layout -- and only then writes: each
tensor with ``copy_`` into the parameter already there (same object, same storage, so an
optimiser or a compiled graph holding it keeps working), and LoRA's per-layer ``lora_alpha``,
rsLoRA and scaling from the new config (peft's formula; a weight set by ``set_active`` stays
applied on top). Anything that does not fit raises :class:`~adapterkit.UnsupportedOperationError`
naming it, with the model unchanged. The values equal a fresh load of the same adapter bit for
bit (in the dtype the adapter's tensors already have).

The plan (:func:`plan_swap`) and the writing (:func:`write_swap`) are separate steps, so that
prepared (banked) models can write the same plan into their slots.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
from adapterkit import UnsupportedOperationError
from peft.utils.other import get_pattern_key
from torch import nn

from ._peft import feedforward_target
from .bias import bias_option, biases_of
from .heads import head_state, load_head_state
from .layers import LayerSite, offloaded
from .state import check_state_dict, without_saved_base_weights
from .weighting import replace_original

if TYPE_CHECKING:
    from .method import PeftMethod

__all__ = ["SwapPlan", "plan_swap", "swap_in_place", "write_swap"]


@dataclasses.dataclass
class SwapPlan:
    """What a swap writes: tensors into parameters, and per-layer LoRA settings."""

    name: str
    tensors: list[tuple[LayerSite, nn.Parameter, torch.Tensor]]
    settings: list[tuple[LayerSite, dict[str, Any]]]  # LoRA: lora_alpha, use_rslora, scaling, dropout p
    heads: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor]


def swap_in_place(method: PeftMethod, model: nn.Module, name: str, config: Any, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace adapter ``name``'s values with ``state_dict`` (and ``config``'s settings), in place, or raise naming why not."""
    write_swap(model, plan_swap(method, model, name, config, state_dict))


def plan_swap(
    method: PeftMethod, model: nn.Module, name: str, config: Any, state_dict: dict[str, torch.Tensor]
) -> SwapPlan:
    """Check that the new adapter fits adapter ``name`` in place; nothing is written."""
    where = f"swap: {method.name} adapter {name!r}"

    def refuse(what: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"{where}: the new adapter does not fit in place: {what}; delete({name!r}) and load() it instead"
        )

    expected = method._expected(model, name)
    biases = biases_of(model).get(name)
    old_bias, new_bias = (biases.option if biases is not None else "none"), bias_option(config)
    if old_bias != new_bias:
        raise refuse(f"bias={new_bias!r}, the adapter in the model has bias={old_bias!r}")
    bias_values = {}
    if biases is not None:
        bias_values = {k: v for k, v in state_dict.items() if k in biases.entries}
        state_dict = {k: v for k, v in state_dict.items() if k not in biases.entries}
        wrong = [k for k, entry in biases.entries.items() if k not in bias_values or bias_values[k].shape != entry.original.shape]
        if wrong:
            raise refuse(f"the biases it trains (bias={old_bias!r}) are missing or differ in shape: {wrong[:4]}")
    heads = head_state(model, name)
    if not set(heads) <= set(state_dict):
        raise refuse(f"other heads (modules_to_save): the model's adapter has {sorted(heads)[:4]}")
    state_dict = without_saved_base_weights(expected, state_dict, method.name, name)
    layer_keys = {k for k in state_dict if k not in heads}
    missing, extra = sorted(set(expected) - layer_keys), sorted(layer_keys - set(expected))
    if missing or extra:
        parts = [f"{label} {items[:4]}{' ...' if len(items) > 4 else ''}" for label, items in
                 (("tensors the model's adapter has and the new one lacks:", missing),
                  ("tensors only the new adapter has:", extra)) if items]  # fmt: skip
        raise refuse("other targets or options (" + "; ".join(parts) + ")")
    settings = []
    for site in {id(site.layer): site for site, _, _ in expected.values()}.values():
        settings.append((site, _layer_settings(method, site, name, config, refuse)))
    shapes = [
        f"{key}: {tuple(state_dict[key].shape)} vs {tuple(getattr(owner, leaf).shape)} in the model"
        for key, (_, owner, leaf) in expected.items()
        if state_dict[key].shape != getattr(owner, leaf).shape
    ]
    if shapes:
        raise refuse(f"other shapes (rank) {shapes[:3]}")
    check_state_dict({**expected, **{k: (None, v, "data") for k, v in heads.items()}}, state_dict, method.name, name)
    gone = sorted({site.logical for site, _, _ in expected.values() if offloaded(site.layer)})
    if gone:
        raise UnsupportedOperationError(f"{where}: layers {gone[:4]} are offloaded by accelerate; swap before dispatching")

    tensors = [(site, getattr(owner, leaf), state_dict[key]) for key, (site, owner, leaf) in expected.items()]
    return SwapPlan(name, tensors, settings, {k: state_dict[k] for k in heads}, bias_values)


def _layer_settings(method: PeftMethod, site: LayerSite, name: str, config: Any, refuse: Any) -> dict[str, Any]:
    """The new per-layer settings of a LoRA(-like) layer, after checking what must not change; {} for others."""
    layer, key = site.layer, site.logical
    feedforward = feedforward_target(method.tuner_type, config, key)
    if feedforward is not None and hasattr(layer, "is_feedforward") and bool(layer.is_feedforward) != feedforward:
        raise refuse(f"layer {key!r} is {'not ' if not layer.is_feedforward else ''}a feedforward layer in the model")
    if not isinstance(getattr(layer, "scaling", None), dict) or name not in layer.scaling:
        return {}
    for option, current in (("use_dora", layer.use_dora.get(name, False) if hasattr(layer, "use_dora") else None),
                            ("fan_in_fan_out", getattr(layer, "fan_in_fan_out", None))):  # fmt: skip
        new = getattr(config, option, None)
        if current is not None and new is not None and bool(new) != bool(current):
            raise refuse(f"{option}={new!r} on layer {key!r}, where the model's adapter has {option}={current!r}")
    rank_pattern = getattr(config, "rank_pattern", None) or {}
    alpha_pattern = getattr(config, "alpha_pattern", None) or {}
    rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), key), getattr(config, "r", None))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), key), config.lora_alpha)
    if "ranknum" in getattr(layer, "other_param_names", ()):
        # AdaLoRA: scaling is lora_alpha (or the rank when it is 0); the rank lives in its tensors' shapes.
        return {"lora_alpha": alpha, "scaling": alpha if alpha > 0 else float(layer.r[name])}
    if rank != layer.r[name]:
        raise refuse(f"rank {rank} on layer {key!r}, where the model's adapter has rank {layer.r[name]}")
    rslora = bool(getattr(config, "use_rslora", False))
    settings = {"lora_alpha": alpha, "use_rslora": rslora, "scaling": alpha / math.sqrt(rank) if rslora else alpha / rank}
    dropout = getattr(config, "lora_dropout", None)
    if dropout is not None and name in getattr(layer, "lora_dropout", {}):
        settings["dropout"] = float(dropout)
    return settings


def write_swap(model: nn.Module, plan: SwapPlan) -> None:
    """Write a checked plan (see :func:`plan_swap`): values copied into the parameters already there."""
    name = plan.name
    with torch.no_grad():
        for site, param, value in plan.tensors:
            value = value.to(param.device, param.dtype)
            # A weighted (IA)^3 vector: the new values are the originals, their weighted form goes in the parameter.
            if not replace_original(site.layer, name, value):
                param.copy_(value)
    for site, settings in plan.settings:
        layer = site.layer
        if not settings:
            continue
        layer.lora_alpha[name] = settings["lora_alpha"]
        if "use_rslora" in settings:
            layer.use_rslora[name] = settings["use_rslora"]
        if not replace_original(layer, name, settings["scaling"]):  # a weight set by set_active stays on top
            layer.scaling[name] = settings["scaling"]
        if "dropout" in settings:
            _set_dropout(layer, name, settings["dropout"])
    if plan.heads:
        load_head_state(model, name, plan.heads)
    biases = biases_of(model).get(name)
    if biases is not None and plan.biases:
        biases.load(plan.biases)


def _set_dropout(layer: nn.Module, name: str, p: float) -> None:
    """peft's dropout module for probability ``p`` (as ``update_layer`` builds it), kept when it already fits."""
    current = layer.lora_dropout[name]
    if isinstance(current, nn.Dropout) and p > 0:
        current.p = p
        return
    if isinstance(current, nn.Identity) and p == 0:
        return
    new = nn.Dropout(p=p) if p > 0 else nn.Identity()
    new.train(current.training)
    layer.lora_dropout[name] = new
