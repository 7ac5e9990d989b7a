"""Building peft layers whose weights a load replaces: empty, uninitialised, and nothing process-wide changed.

peft builds an adapter's weights with ``nn.Linear`` & co. and fills them with
``torch.nn.init`` or ``torch.randn``; a load overwrites every value. peft's own
``low_cpu_mem_usage`` swaps ``nn.Module.register_parameter`` for the whole
process meanwhile, which another thread sees. Here a
:class:`~torch.overrides.TorchFunctionMode` does the job instead: modes are
per thread, so other threads (and other models loading at the same time) are
untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._peft import LAYER_PASSES, peft_wants_real_tensors

__all__ = ["empty_weights", "layer_passes_skipped"]

_META = torch.device("meta")
# Tensor factories peft's layers call without a device; they go to the meta device.
_FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.randn, torch.rand})
# Random fills: on the meta device an empty tensor is the same thing, without the random decompositions.
_RANDOM = frozenset({torch.randn, torch.rand})
# What torch.nn.init offers: a no-op on tensors whose values the load replaces.
_INITIALISERS = frozenset(
    getattr(nn.init, name)
    for name in (
        "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
        "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
    )  # fmt: skip
    if hasattr(nn.init, name)
)


class _EmptyWeights(TorchFunctionMode):
    """Within this thread: factories without a device make meta tensors; initialisers do nothing."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _INITIALISERS:
            tensor = args[0] if args else kwargs["tensor"]
            if tensor.is_meta or not peft_wants_real_tensors():
                return tensor  # its values are the load's to set
            return func(*args, **kwargs)
        if peft_wants_real_tensors():  # a value peft never saves (AdaLoRA's ranknum): build it for real
            return func(*args, **kwargs)
        if func in _FACTORIES and kwargs.get("device") is None:
            if func in _RANDOM:
                func = torch.empty
                kwargs.pop("generator", None)
            kwargs["device"] = _META
        return func(*args, **kwargs)


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Inside the block, on this thread only, new adapter weights are empty tensors on the meta device."""
    with _EmptyWeights():
        yield


def _skip(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def layer_passes_skipped(layers: Iterable[nn.Module]) -> Iterator[None]:
    """Inside the block, the given layers' ``set_adapter`` and ``_move_adapter_to_device_of_base_layer`` do nothing.

    peft's ``update_layer`` calls both, and both visit every adapter the layer holds, so each
    load into a layer got slower than the last; adapterkit places the new adapter
    (:func:`~adapterkit_peft.layers.place`) and sets activity itself afterwards. Instance
    attributes, on these layers only, removed on exit.
    """
    touched: list[nn.Module] = []
    try:
        for layer in layers:
            for name in LAYER_PASSES:
                layer.__dict__[name] = _skip
            touched.append(layer)
        yield
    finally:
        for layer in touched:
            for name in LAYER_PASSES:
                layer.__dict__.pop(name, None)
