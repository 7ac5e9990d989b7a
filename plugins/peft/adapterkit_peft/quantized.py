"""Merging into quantized bases (bitsandbytes 4-bit and 8-bit) with an exact way back.

peft merges into a bitsandbytes layer by dequantizing its weight, adding the
adapter's delta and quantizing the sum again; its unmerge subtracts the delta
and quantizes once more. Each quantization rounds, so after merge + unmerge the
weights are not the ones the model had (on a small Llama in 4-bit the logits end
0.195 off). adapterkit keeps the quantized weight a merge replaces (the
parameter object itself, with its quantization state) and puts it back on
unmerge: the weights are bit-identical to before. The cost is memory: while
merged, each merged layer holds its original quantized weight as well as the
merged one, i.e. the quantized size of the merged layers once more.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

__all__ = ["is_quantized", "keep_quantized_weights", "restore_quantized_weights"]

_KEPT = "_adapterkit_quantized_weights"  # layer attribute while merged: (weight, bias values, 8-bit matmul state)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer (without importing bitsandbytes)."""
    return type(getattr(module, "weight", None)).__module__.startswith("bitsandbytes")


def keep_quantized_weights(layer: Any) -> bool:
    """Before a merge into ``layer``: remember its base layer's quantized weight (once, for the first merge).

    Returns whether it did so now (then :func:`restore_quantized_weights` undoes this merge exactly).
    """
    base = layer.get_base_layer()
    if not is_quantized(base) or _KEPT in layer.__dict__:
        return False
    bias = base.bias.detach().clone() if getattr(base, "bias", None) is not None else None
    # 8-bit layers keep the int8 weight and its scales in a matmul state that forwards and merges update in place.
    state = copy.copy(base.state) if getattr(base, "state", None) is not None else None
    layer.__dict__[_KEPT] = (base.weight, bias, state)
    return True


def restore_quantized_weights(layer: Any) -> bool:
    """After peft's merge: put the kept weights back and mark the layer unmerged; False if nothing was kept."""
    kept = layer.__dict__.pop(_KEPT, None)
    if kept is None:
        return False
    weight, bias, state = kept
    base = layer.get_base_layer()
    base.weight = weight
    if bias is not None:
        base.bias.data.copy_(bias)
    if state is not None:
        base.state = state
    layer.merged_adapters.clear()
    return True
