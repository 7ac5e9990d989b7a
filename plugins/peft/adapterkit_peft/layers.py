"""peft adapter layers in a model: where they sit, what they hold, where their tensors go."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ._peft import BufferDict, base_device_and_dtype

__all__ = [
    "LayerSite",
    "adapter_tensors",
    "adapters_held",
    "container",
    "follow_training_mode",
    "has_adapter",
    "is_empty",
    "offloaded",
    "place",
    "freeze_bookkeeping",
    "upcast",
]

# peft's autocast_adapter_dtype: adapters of these dtypes become float32 (training in half precision loses updates).
_UPCAST = frozenset(
    dtype
    for dtype in (torch.float16, torch.bfloat16, *(getattr(torch, n, None) for n in (
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"
    )))  # fmt: skip
    if dtype is not None
)


@dataclasses.dataclass(frozen=True)
class LayerSite:
    """An adapter layer, where it sits (``getattr(parent, attr) is layer``), and its logical path.

    The logical path is the module path with the ``base_layer`` hops of wrappers
    removed (see :mod:`adapterkit.layers`): the same whatever other adapters wrap
    the layer, and the path peft uses for the layer's keys when it is alone.
    """

    logical: str
    parent: nn.Module
    attr: str
    layer: BaseTunerLayer


def container(layer: BaseTunerLayer, attr: str) -> Any:
    """``getattr(layer, attr, None)``, straight from ``_modules`` when it is a module (no ``__getattr__`` detour)."""
    found = layer._modules.get(attr)
    return found if found is not None else getattr(layer, attr, None)


def adapter_tensors(layer: BaseTunerLayer, name: str) -> Iterator[tuple[str, nn.Module | nn.ParameterDict, str]]:
    """Yield ``(suffix, owner, leaf)`` for each parameter of adapter ``name`` in ``layer``.

    ``suffix`` is the key below the layer without the adapter name
    (``lora_A.weight``); ``getattr(owner, leaf)`` is the parameter.
    """
    for attr in layer.adapter_layer_names:
        found = container(layer, attr)
        if found is None or name not in found:
            continue
        item = found[name]
        if isinstance(item, nn.Parameter):
            yield attr, found, name
        else:
            for param_name, _ in item.named_parameters():
                *path, leaf = param_name.split(".")
                owner = item.get_submodule(".".join(path)) if path else item
                yield f"{attr}.{param_name}", owner, leaf


def has_adapter(layer: BaseTunerLayer, name: str) -> bool:
    return any(name in (container(layer, attr) or ()) for attr in layer.adapter_layer_names)


def is_empty(layer: BaseTunerLayer) -> bool:
    return not any(len(getattr(layer, attr, ())) for attr in layer.adapter_layer_names)


def offloaded(layer: BaseTunerLayer) -> bool:
    """Whether the layer's base weight is on the meta device (offloaded to CPU or disk by accelerate)."""
    weight = getattr(layer.get_base_layer(), "weight", None)
    return isinstance(weight, torch.Tensor) and weight.is_meta


def adapters_held(layer: BaseTunerLayer) -> list[str]:
    """The adapters ``layer`` holds, in the order it added them."""
    return list(dict.fromkeys(n for attr in layer.adapter_layer_names for n in container(layer, attr) or ()))


def place(layer: BaseTunerLayer, name: str, device: torch.device | None = None, *, float32: bool = False) -> bool:
    """Move adapter ``name`` of ``layer`` to its base layer's device and floating dtype (or to ``device``).

    peft's ``_move_adapter_to_device_of_base_layer`` for one adapter, without its scan of
    every other adapter's parameters (which made each load slower than the last). Returns
    whether anything moved (into new parameter objects).
    """
    base = layer.get_base_layer()
    if isinstance(base, nn.MultiheadAttention):
        base = base.out_proj
    base_device, base_dtype = base_device_and_dtype(layer, base)
    device = device or base_device
    if device is None:
        return False
    moved = False
    dtype = base_dtype if base_dtype is not None and (base_dtype.is_floating_point or base_dtype.is_complex) else None
    if float32 and dtype in _UPCAST:
        dtype = torch.float32  # autocast_adapter_dtype: never round the file's values through the half dtype
    for attr in (*layer.adapter_layer_names, *layer.other_param_names):
        found = container(layer, attr)
        if not isinstance(found, (nn.ModuleDict, nn.ParameterDict, BufferDict)) or name not in found:
            continue
        item = found[name]
        if isinstance(item, nn.Module):
            tensors = [
                t for m in item.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None
            ]
        else:
            tensors = [item]
        if all(
            t.device == device and (dtype is None or not t.is_floating_point() or t.dtype == dtype) for t in tensors
        ):
            continue
        # Integer tensors (index buffers) keep their dtype; modules cast only their floating tensors anyway.
        cast = isinstance(item, nn.Module) or item.is_floating_point() or item.is_complex()
        found[name] = item.to(device, dtype=dtype) if dtype is not None and cast else item.to(device)
        moved = True
    return moved


def follow_training_mode(sites: Sequence[LayerSite], name: str) -> None:
    """Put adapter ``name``'s new modules in the training mode of the layers they adapt.

    peft creates them in training mode, so an adapter loaded into a model in eval mode would
    run its dropout at inference (``PeftModel.from_pretrained`` calls ``eval()`` on the whole
    model instead). Only the layer, its containers and this adapter's modules are touched.
    """
    for site in sites:
        layer = site.layer
        mode = layer.get_base_layer().training
        # Straight into __dict__ (what Module.train does, without its __setattr__ checks per module).
        layer.__dict__["training"] = mode
        for attr, child in layer._modules.items():
            if attr != "base_layer":
                child.__dict__["training"] = mode
                item = child._modules.get(name)
                if item is not None:
                    for module in item.modules():
                        module.__dict__["training"] = mode


def freeze_bookkeeping(layer: BaseTunerLayer, name: str) -> None:
    """Parameters a layer keeps per adapter beside its weights (AdaLoRA's ``ranknum``) never train.

    peft's dtype cast turns them into new parameters that do (so an optimizer over
    ``requires_grad`` parameters would change AdaLoRA's rank count on a half-precision base).
    """
    for attr in layer.other_param_names:
        found = container(layer, attr)
        if isinstance(found, nn.ParameterDict) and name in found:
            found[name].requires_grad_(False)


def upcast(layer: BaseTunerLayer, name: str) -> bool:
    """Make adapter ``name``'s half-precision (and float8) tensors in ``layer`` float32, as peft's ``autocast_adapter_dtype``.

    peft's ``cast_adapter_dtype`` for one layer and one adapter (peft's walks the whole model).
    New parameter objects keep their ``requires_grad``. Returns whether anything changed.
    """
    changed = False
    for attr in (*layer.adapter_layer_names, *layer.other_param_names):
        found = container(layer, attr)
        if not isinstance(found, (nn.ModuleDict, nn.ParameterDict, BufferDict)) or name not in found:
            continue
        item = found[name]
        if isinstance(item, torch.Tensor):
            if item.dtype in _UPCAST:
                wider = item.detach().to(torch.float32)
                # A ParameterDict makes a plain tensor a parameter that trains: keep the flag (AdaLoRA's ranknum never trains).
                found[name] = nn.Parameter(wider, requires_grad=item.requires_grad) if isinstance(item, nn.Parameter) else wider
                changed = True
            continue
        for owner in item.modules():
            for leaf, param in list(owner._parameters.items()):
                if param is not None and param.dtype in _UPCAST:
                    setattr(owner, leaf, nn.Parameter(param.data.to(torch.float32), requires_grad=param.requires_grad))
                    changed = True
    return changed
