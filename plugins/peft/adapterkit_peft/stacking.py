"""peft's tuners, made to stack: wrap other methods' layers instead of extending them.

peft's tuners extend any layer of their own kind they meet (LoRA's tuner adds an
adapter to any ``LoraLayer``, a LoRA variant's included) and cannot wrap a
layer they do not know (a native plugin's wrapper). The tuner subclass built by
:func:`stack_aware` reads the core's record of who owns each wrapper
(:mod:`adapterkit.layers`) instead:

* the outermost module at a target is this method's own wrapper: extend it, as peft does;
* it is another method's wrapper: build a new layer for the module at the bottom of
  the stack (so peft picks the layer class from the real ``nn.Linear``, ``nn.Conv2d``,
  ...), then seat it on top of the stack: ``new.base_layer`` is the old outermost
  wrapper. The new adapter acts after everything below it, in the order adapters
  were added;
* modules inside other methods' wrappers (their adapters' own ``nn.Linear``\\ s) are never targets.

It also keeps loads invisible to forwards running in other threads: a new layer starts with
the method's current active adapters (``adapterkit_active``), not with the adapter being
added, is placed on a scratch parent and seated with one assignment, and the tuner's final
switch of every layer to the new adapter is skipped (the core switches, atomically).
"""

from __future__ import annotations

import functools
from typing import Any

from adapterkit.layers import innermost, owner, positions
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

__all__ = ["stack_aware"]


@functools.cache
def stack_aware(tuner_type: type, method: str) -> type:
    """A subclass of peft tuner ``tuner_type`` that stacks on other methods' wrappers (see the module docstring).

    One class per tuner and method name, made once; nothing of peft's is changed.
    """

    class StackAware(tuner_type):  # type: ignore[misc, valid-type]
        def _create_and_replace(
            self, config: Any, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module,
            current_key: str, **kwargs: Any,
        ) -> Any:  # fmt: skip
            held_by = owner(target)
            if held_by is not None and held_by != method:
                bottom = innermost(target)
                self.__dict__.setdefault("_adapterkit_reseat", {})[id(bottom)] = target
                target = bottom
            return super()._create_and_replace(config, adapter_name, target, target_name, parent, current_key, **kwargs)

        def __init__(self, *args: Any, adapterkit_active: list[str] | None = None, **kwargs: Any) -> None:
            # Read by _replace_module and set_adapter while peft's constructor injects.
            self.__dict__["_adapterkit_active"] = adapterkit_active
            super().__init__(*args, **kwargs)

        def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
            outer = self.__dict__.get("_adapterkit_reseat", {}).pop(id(child), None)
            active = self.__dict__.get("_adapterkit_active")
            if active is not None:
                # A forward in another thread may run through the new layer as soon as it is seated: it starts
                # with the method's current active adapters, not the one being added (empty weights until loaded).
                for module in new_module.modules():
                    if isinstance(module, BaseTunerLayer) and owner(module) is None:
                        module.__dict__["_active_adapter"] = list(active)
            quantized = getattr(getattr(child, "base_layer", child), "state", None) is not None
            if not (self.__dict__.get("_adapterkit_direct") and hasattr(new_module, "base_layer") and not quantized):
                # peft's own placement, on a scratch parent: the layer is seated complete, in one step, below.
                # (A direct load places the adapter's weights itself and skips peft's device scan.)
                scratch = nn.Module()
                super()._replace_module(scratch, "layer", new_module, child)
            if outer is not None:
                new_module.base_layer = outer
            setattr(parent, child_name, new_module)

        def set_adapter(self, adapter_name: Any, inference_mode: bool = False) -> None:
            # peft's inject ends by making the new adapter the only active one on every layer, one layer after
            # the other (a forward in another thread would see half of each); the core sets activity itself.
            if self.__dict__.get("_adapterkit_active") is None:
                super().set_adapter(adapter_name, inference_mode)

        def _check_target_module_exists(self, config: Any, key: str) -> Any:
            # peft walks model.named_modules(): keep it off the modules inside other methods' wrappers.
            allowed = self.__dict__.get("_adapterkit_positions")
            if allowed is None:
                allowed = self.__dict__["_adapterkit_positions"] = {path for path, *_ in positions(self.model)}
            if key not in allowed:
                return False
            return super()._check_target_module_exists(config, key)

    StackAware.__name__ = StackAware.__qualname__ = f"StackAware{tuner_type.__name__}"
    return StackAware
