"""The toolkit for adapterkit plugins built on peft's tuner layers (distribution ``adapterkit-peft``).

The built-in LoRA, IA3 and AdaLoRA plugins are each a :class:`PeftMethod`
naming a peft config, tuner and layer family; every hook is implemented here
once. A plugin for another peft tuner, or for a LoRA variant with its own
config and layer classes, is a :class:`PeftMethod` (or a small subclass) too.

This distribution depends on peft; the core (``adapterkit``) never imports it.
"""

from __future__ import annotations

from . import banks
from .bias import AdapterBiases, biases_of, check_rows_biases
from .creation import empty_weights, layer_passes_skipped
from .heads import HEAD_PRESETS, routed_heads
from .layers import LayerSite, adapter_tensors, adapters_held, has_adapter, place
from .method import PeftMethod
from .stacking import stack_aware

__all__ = [
    "AdapterBiases",
    "HEAD_PRESETS",
    "LayerSite",
    "PeftMethod",
    "adapter_tensors",
    "banks",
    "adapters_held",
    "biases_of",
    "check_rows_biases",
    "empty_weights",
    "has_adapter",
    "layer_passes_skipped",
    "place",
    "routed_heads",
    "stack_aware",
]
