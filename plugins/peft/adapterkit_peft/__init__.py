"""The toolkit for adapterkit plugins built on peft's tuner layers (distribution ``adapterkit-peft``).

The built-in LoRA, IA3 and AdaLoRA plugins are each a :class:`PeftMethod`
naming a peft config, tuner and layer family; every hook is implemented here
once. A plugin for another peft tuner, or for a LoRA variant with its own
config and layer classes, is a :class:`PeftMethod` (or a small subclass) too.

This distribution depends on peft; the core (``adapterkit``) never imports it.
"""

from __future__ import annotations

from .creation import empty_weights, layer_passes_skipped
from .layers import LayerSite, adapter_tensors, logical_modules, place
from .method import TAG, PeftMethod

__all__ = [
    "LayerSite",
    "PeftMethod",
    "TAG",
    "adapter_tensors",
    "empty_weights",
    "layer_passes_skipped",
    "logical_modules",
    "place",
]
