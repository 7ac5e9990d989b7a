"""Device placement for adapterkit models, through accelerate.

Installing this plugin (distribution ``adapterkit-dispatch``, entry point
``dispatch``) implements the core's model-level hook ``adapterkit_dispatch``,
which backs :meth:`adapterkit.Adapters.dispatch`, ``Adapters.load(...,
device_map=...)`` and the mixin's ``load_adapter(device_map=...)``::

    adapters.load("out/", device_map="auto", max_memory={0: "20GiB", "cpu": "60GiB"},
                  offload_folder="offload/")

It lives outside the core so that the core never imports accelerate, and so it
can be blocked (``ADAPTERKIT_BLOCK_PLUGINS=dispatch``) or replaced by another
plugin implementing the same hook. See :mod:`adapterkit_dispatch.placement`.
"""

from __future__ import annotations

from typing import Any

from adapterkit import hookimpl
from torch import nn

from .placement import DEVICE_MAP_STRINGS, DispatchError, dispatch, resolve

__all__ = ["DEVICE_MAP_STRINGS", "DispatchError", "DispatchPlugin", "dispatch", "plugin", "resolve"]


class DispatchPlugin:
    """The adapterkit plugin object: one hook, ``adapterkit_dispatch``."""

    def __repr__(self) -> str:
        return "DispatchPlugin()"

    @hookimpl
    def adapterkit_dispatch(
        self,
        model: nn.Module,
        device_map: str | dict[str, Any],
        max_memory: dict[Any, Any] | None,
        offload_folder: str | None,
        offload_index: dict[str, Any] | None,
    ) -> bool:
        dispatch(model, device_map, max_memory=max_memory, offload_folder=offload_folder, offload_index=offload_index)
        return True


plugin = DispatchPlugin()
