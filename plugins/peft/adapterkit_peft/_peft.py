"""Every use of peft's private API, in one place.

peft offers no public way to build one target's adapter layer, to skip its
whole-model passes, or to read the containers a layer keeps per adapter; the
glue needs all three. Each private name it relies on is imported or read here
and nowhere else, and ``plugins/peft/tests/test_peft_private.py`` checks that
each still exists with the expected signature, so a peft upgrade that moves
one fails loudly there instead of somewhere deep in a load.
"""

from __future__ import annotations

from typing import Any

from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule
from peft.utils import integrations as _integrations
from torch import nn

__all__ = [
    "BufferDict",
    "ExcludedModule",
    "TUNER_STEPS",
    "LAYER_PASSES",
    "bare_tuner",
    "base_device_and_dtype",
    "convert_config_for_transformers",
    "feedforward_target",
    "peft_wants_real_tensors",
]

ExcludedModule = _ExcludedModule

# The tuner's per-target methods the direct load calls, in the order peft's inject_adapter calls them.
TUNER_STEPS = (
    "_check_new_adapter_config",
    "_check_tied_modules",
    "get_model_config",
    "_prepare_adapter_config",
    "_prepare_model",
    "_check_target_module_exists",
    "_check_target_module_compatiblity",
    "_create_and_replace",
    "_replace_module",
)

# BaseTunerLayer methods that update_layer calls and that visit every adapter of the layer.
LAYER_PASSES = ("set_adapter", "_move_adapter_to_device_of_base_layer")


def bare_tuner(tuner_type: type, model: nn.Module, name: str, config: Any) -> Any:
    """A tuner object that was never constructed (its constructor injects into the whole model).

    Its per-target methods (:data:`TUNER_STEPS`) need only what is set here.
    """
    tuner = tuner_type.__new__(tuner_type)
    nn.Module.__init__(tuner)
    tuner.__dict__["model"] = model  # not a registered child: the tuner is thrown away
    tuner.peft_config = {name: config}
    tuner.active_adapter = name
    tuner.targeted_module_names = []
    tuner.targeted_parameter_names = []
    return tuner


def base_device_and_dtype(layer: BaseTunerLayer, base: nn.Module) -> tuple[Any, Any]:
    """The device and dtype peft places a layer's adapters on."""
    return layer._get_base_layer_device_and_dtype(base)


def convert_config_for_transformers(config: Any, model: nn.Module) -> None:
    """peft's rewrite of a config for transformers v5 model layouts (the first step of its inject_adapter)."""
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    convert_peft_config_for_transformers(config, model=model, conversions=None)


def peft_wants_real_tensors() -> bool:
    """Whether peft code on this thread's stack asked for real tensors inside an empty-weights block.

    peft marks the few values it never saves (AdaLoRA's ``ranknum``, MultiheadAttention's
    restored weights) with ``_skip_init_on_device``; the glue's empty-weights mode honours it.
    """
    return getattr(_integrations._init_on_device, "_skip", False) is True


def feedforward_target(tuner_type: type, config: Any, key: str) -> bool | None:
    """Whether (IA)^3's tuner makes the layer at ``key`` a feedforward one under ``config`` (None: not an IA3 tuner)."""
    check = getattr(tuner_type, "_check_target_module_feedforward", None)
    if check is None or getattr(config, "feedforward_modules", None) is None:
        return None
    return bool(check(config, key))
