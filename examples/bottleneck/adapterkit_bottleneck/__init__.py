"""Bottleneck adapters for adapterkit: ``bottleneck[bottleneck_dim=16, target_modules=["fc1"]]``.

A third-party plugin written against adapterkit's public contract only. Each
targeted ``nn.Linear`` is wrapped in a :class:`BottleneckLayer`; each adapter
adds ``scaling * up(act(down(src)))`` to the layer's output, where ``src`` is
the layer's output (``placement="sequential"``) or its input (``"parallel"``).

adapterkit finds the plugin through the entry point declared in
``pyproject.toml``::

    [project.entry-points.adapterkit]
    bottleneck = "adapterkit_bottleneck:plugin"
"""

from __future__ import annotations

from .config import BottleneckConfig
from .layer import Bottleneck, BottleneckLayer
from .plugin import BottleneckPlugin

__all__ = ["Bottleneck", "BottleneckConfig", "BottleneckLayer", "BottleneckPlugin", "plugin"]

plugin = BottleneckPlugin()
"""The object the ``adapterkit`` entry point names; pluggy registers its ``@hookimpl`` methods."""
