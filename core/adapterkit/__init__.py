"""adapterkit: parameter-efficient adapters for any PyTorch model, one plugin per method.

Start with :func:`attach`::

    import adapterkit
    adapters = adapterkit.attach(model)
    adapters.add('lora[r=8, target_modules=["q_proj", "v_proj"]]')
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .budget import BudgetStats
from .configs import config_to_dict, format_config, parse_config, parse_config_string
from .errors import (
    AdapterExistsError,
    AdapterkitError,
    AdapterNameError,
    AdapterStateError,
    ArgumentValueError,
    BudgetError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    ConfigSyntaxError,
    ConfigValueError,
    HubAccessError,
    NoAdaptersError,
    PerSampleError,
    PluginError,
    SaveError,
    StateDictMismatchError,
    TargetError,
    UnknownAdapterError,
    UnknownConfigKeyError,
    UnknownMethodError,
    UnsafeCheckpointError,
    UnsupportedOperationError,
)
from .hookspecs import hookimpl, hookspec
from .layers import AdaptedLayer, Wrapper
from .mixin import AdapterMixin
from .model import BASE, DEFAULT_NAME, Adapters, attach
from .registry import Method, MethodRegistry, available_methods, default_registry, make_plugin_manager

try:
    __version__ = version("adapterkit")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "AdaptedLayer",
    "AdapterExistsError",
    "AdapterMixin",
    "AdapterNameError",
    "AdapterStateError",
    "Adapters",
    "AdapterkitError",
    "ArgumentValueError",
    "BASE",
    "BudgetError",
    "BudgetStats",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ConfigError",
    "ConfigSyntaxError",
    "ConfigValueError",
    "DEFAULT_NAME",
    "HubAccessError",
    "Method",
    "MethodRegistry",
    "NoAdaptersError",
    "PerSampleError",
    "PluginError",
    "SaveError",
    "StateDictMismatchError",
    "TargetError",
    "UnknownAdapterError",
    "UnknownConfigKeyError",
    "UnknownMethodError",
    "UnsafeCheckpointError",
    "UnsupportedOperationError",
    "Wrapper",
    "__version__",
    "attach",
    "available_methods",
    "config_to_dict",
    "default_registry",
    "format_config",
    "hookimpl",
    "hookspec",
    "make_plugin_manager",
    "parse_config",
    "parse_config_string",
]
