"""Plugins and the methods they provide.

:func:`make_plugin_manager` builds a pluggy manager (specs, then entry points of
the ``adapterkit`` group, then ``check_pending``); :class:`MethodRegistry` asks
every plugin to register its methods and routes per-method hook calls to the
one plugin that owns the method. Nothing happens at import time: the default
registry is built on first use.

Environment variables, read when a manager is built:

``ADAPTERKIT_PLUGINS``
    Comma-separated allowlist of entry-point names to load; when set (even
    empty), no other entry point is loaded.
``ADAPTERKIT_BLOCK_PLUGINS``
    Comma-separated entry-point names never to load.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from typing import Any

import attrs
import pluggy
import torch

from . import hookspecs
from .errors import AdapterkitError, PluginError, UnknownMethodError, UnsupportedOperationError

__all__ = ["Method", "MethodRegistry", "PluginManager", "make_plugin_manager", "default_registry", "available_methods"]

ENTRY_POINT_GROUP = "adapterkit"
ALLOW_ENV = "ADAPTERKIT_PLUGINS"
BLOCK_ENV = "ADAPTERKIT_BLOCK_PLUGINS"

# Distributions that provide the built-in methods, for the "pip install ..." hint.
KNOWN_DISTRIBUTIONS = {
    "lora": "adapterkit-lora",
    "ia3": "adapterkit-ia3",
    "adalora": "adapterkit-adalora",
}


@attrs.frozen
class Method:
    """An adapter method as a plugin registered it."""

    name: str
    config_type: type
    aliases: tuple[str, ...] = ()
    description: str = ""
    plugin_name: str = ""
    distribution: str | None = None
    version: str | None = None


def _env_names(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers which distribution each entry point came from."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.distributions: dict[str, metadata.Distribution] = {}


def make_plugin_manager(*, load_entry_points: bool = True) -> PluginManager:
    """Return a new plugin manager with the specs added and (by default) entry points loaded.

    Honours ``ADAPTERKIT_PLUGINS`` (allowlist) and ``ADAPTERKIT_BLOCK_PLUGINS``.
    Raises :class:`PluginError` when an entry point fails to load or a plugin
    implements a hook that has no spec.
    """
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        allowed = _env_names(ALLOW_ENV)
        blocked = _env_names(BLOCK_ENV) or set()
        for name in sorted(blocked):
            pm.set_blocked(name)
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked or (allowed is not None and ep.name not in allowed):
                continue
            if pm.get_plugin(ep.name) is not None:
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"adapterkit plugin {ep.name!r} ({ep.value}) failed to import: {exc!r}. "
                    f"Reinstall it, or block it with {BLOCK_ENV}={ep.name}."
                ) from exc
            pm.register(plugin, name=ep.name)
            if ep.dist is not None:
                pm.distributions[ep.name] = ep.dist
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"an adapterkit plugin implements an unknown hook: {exc}") from exc
    return pm


class MethodRegistry:
    """The methods of a plugin manager, and routing of per-method hooks to their owner."""

    def __init__(self, plugin_manager: pluggy.PluginManager) -> None:
        # Plugins are read once, here: register every plugin before building a registry.
        self.plugin_manager = plugin_manager
        self._methods: dict[str, Method] = {}
        self._lookup: dict[str, str] = {}  # lower-cased name or alias -> method name
        self._callers: dict[tuple[str, str], Any] = {}
        self._collect()

    # -- registration -------------------------------------------------
    def _collect(self) -> None:
        pm = self.plugin_manager
        for impl in pm.hook.adapterkit_register_methods.get_hookimpls():
            plugin_name = impl.plugin_name
            dist = getattr(pm, "distributions", {}).get(plugin_name)

            def register(
                name: str,
                config_type: type,
                aliases: Iterable[str] = (),
                description: str = "",
                _plugin_name: str = plugin_name,
                _dist: metadata.Distribution | None = dist,
            ) -> None:
                self._add(
                    Method(
                        name=name,
                        config_type=config_type,
                        aliases=tuple(aliases),
                        description=description,
                        plugin_name=_plugin_name,
                        distribution=_dist.metadata["Name"] if _dist is not None else None,
                        version=_dist.version if _dist is not None else None,
                    )
                )

            impl.function(register=register)

    def _add(self, method: Method) -> None:
        if not method.name or not method.name.replace("-", "_").replace(".", "_").isidentifier():
            raise PluginError(
                f"plugin {method.plugin_name!r} registered an invalid method name {method.name!r}; "
                "use letters, digits, '_', '-' or '.', starting with a letter"
            )
        if not isinstance(method.config_type, type):
            raise PluginError(f"plugin {method.plugin_name!r}: config_type of {method.name!r} must be a class")
        for key in (method.name, *method.aliases):
            owner = self._lookup.get(key.lower())
            if owner is not None:
                raise PluginError(
                    f"plugin {method.plugin_name!r} registers {key!r}, already taken by method {owner!r} "
                    f"of plugin {self._methods[owner].plugin_name!r}; block one with {BLOCK_ENV}"
                )
        self._methods[method.name] = method
        for key in (method.name, *method.aliases):
            self._lookup[key.lower()] = method.name

    # -- queries --------------------------------------------------------
    @property
    def methods(self) -> dict[str, Method]:
        """Registered methods by name, in registration order."""
        return dict(self._methods)

    def get(self, name: str) -> Method:
        """The method registered under ``name`` or an alias (case-insensitive)."""
        key = self._lookup.get(str(name).lower())
        if key is None:
            raise UnknownMethodError(self._unknown_message(str(name)))
        return self._methods[key]

    def _unknown_message(self, name: str) -> str:
        installed = ", ".join(sorted(self._methods)) or "none"
        msg = f"unknown adapter method {name!r}; installed methods: {installed}."
        dist = KNOWN_DISTRIBUTIONS.get(name.lower())
        if dist is not None:
            msg += f" Install it with: pip install {dist}"
        else:
            close = difflib.get_close_matches(name.lower(), list(self._lookup), n=3)
            if close:
                msg += f" Did you mean: {', '.join(close)}?"
        return msg

    def method_for_config(self, config: Any) -> Method:
        """The method whose config type is closest to ``type(config)`` in its MRO."""
        by_type = {m.config_type: m for m in self._methods.values()}
        for cls in type(config).__mro__:
            if cls in by_type:
                return by_type[cls]
        raise UnknownMethodError(
            f"no installed method takes a config of type {type(config).__qualname__}; "
            f"installed methods: {', '.join(sorted(self._methods)) or 'none'}"
        )

    def implements(self, method: Method, hook: str) -> bool:
        """Whether the plugin owning ``method`` implements ``hook``."""
        return bool(self._caller(method, hook).get_hookimpls())

    def accepts(self, method: Method, hook: str, argument: str) -> bool:
        """Whether the plugin owning ``method`` implements ``hook`` taking ``argument`` (an optional argument)."""
        return any(argument in impl.argnames for impl in self._caller(method, hook).get_hookimpls())

    def claims(self, config: Mapping[str, Any], metadata: Mapping[str, str], keys: Sequence[str]) -> list[Method]:
        """The methods whose plugins claim a saved adapter (``adapterkit_claim_checkpoint``), in plugin order."""
        found: list[Method] = []
        hook = self.plugin_manager.hook.adapterkit_claim_checkpoint
        for impl in hook.get_hookimpls():  # in registration order
            with self.faults(impl.plugin_name, "adapterkit_claim_checkpoint"):
                name = impl.function(config=dict(config), metadata=dict(metadata), keys=list(keys))
            if name is None:
                continue
            method = self._methods.get(name) if isinstance(name, str) else None
            if method is None or method.plugin_name != impl.plugin_name:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} claimed a checkpoint for {name!r}, which is not one of its methods "
                    f"({', '.join(m.name for m in self._methods.values() if m.plugin_name == impl.plugin_name) or 'none'}); "
                    "adapterkit_claim_checkpoint returns one of the plugin's own method names or None"
                )
            if method not in found:
                found.append(method)
        return found

    # -- routing ----------------------------------------------------------
    def _caller(self, method: Method, hook: str) -> Any:
        key = (method.plugin_name, hook)
        caller = self._callers.get(key)
        if caller is None:
            pm = self.plugin_manager
            others = [p for name, p in pm.list_name_plugin() if name != method.plugin_name]
            caller = pm.subset_hook_caller(hook, remove_plugins=others)
            self._callers[key] = caller
        return caller

    def call(self, method: Method, hook: str, **kwargs: Any) -> Any:
        """Call per-method ``hook`` on the plugin that owns ``method`` only.

        An exception from the plugin that is not one of adapterkit's own errors becomes a
        :class:`PluginError` naming the plugin, the hook and the method, with the original as
        its ``__cause__`` (see :meth:`faults`); a result of the wrong type is a :class:`PluginError` too.
        """
        caller = self._caller(method, hook)
        if not caller.get_hookimpls():
            raise UnsupportedOperationError(
                f"adapter method {method.name!r} (plugin {method.plugin_name!r}) does not support "
                f"{hook.removeprefix('adapterkit_')!r}"
            )
        with self.faults(method.plugin_name, hook, method.name):
            result = caller(method=method.name, **kwargs)
        check = _RESULT_CHECKS.get(hook)
        problem = check(result, method) if check is not None else None
        if problem:
            raise PluginError(
                f"plugin {method.plugin_name!r} broke the contract: {hook} for method {method.name!r} {problem}"
            )
        return result

    @staticmethod
    @contextlib.contextmanager
    def faults(plugin: str, hook: str, method: str | None = None) -> Iterator[None]:
        """Inside the block, an exception raised by plugin code becomes a :class:`PluginError` naming where it came from.

        adapterkit's own errors (a plugin's ``TargetError``, ``StateDictMismatchError``, ...) pass
        as they are, and so do ``MemoryError`` and torch's out-of-memory errors.
        """
        try:
            yield
        except (AdapterkitError, MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as exc:
            where = f"{hook} for method {method!r}" if method else hook
            raise PluginError(
                f"plugin {plugin!r} failed in {where}: {type(exc).__name__}: {exc}. This is a bug in the plugin "
                f"(the original error is chained below); report it to its authors, or block it with {BLOCK_ENV}={plugin}"
            ) from exc


def _tensor_dict(result: Any, method: Method) -> str | None:
    if not isinstance(result, Mapping):
        return f"returned {type(result).__name__}, not a dict of tensors"
    wrong = [f"{key!r}: {type(value).__name__}" for key, value in result.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    return f"returned non-tensor values or non-string keys ({', '.join(wrong[:3])})" if wrong else None


def _context_manager(result: Any, method: Method) -> str | None:
    if hasattr(result, "__enter__") and hasattr(result, "__exit__"):
        return None
    return f"returned {type(result).__name__}, not a context manager"


def _dict_or_none(result: Any, method: Method) -> str | None:
    return None if result is None or isinstance(result, dict) else f"returned {type(result).__name__}, not a dict"


def _config_or_none(result: Any, method: Method) -> str | None:
    if result is None or isinstance(result, method.config_type):
        return None
    return f"returned {type(result).__name__}, not a {method.config_type.__name__}"


def _combined(result: Any, method: Method) -> str | None:
    if not isinstance(result, tuple) or len(result) != 2:
        return f"returned {type(result).__name__}, not a (config, state_dict) pair"
    return _tensor_dict(result[1], method)


# What each per-method hook must return (hooks not named here return nothing the core uses).
_RESULT_CHECKS = {
    "adapterkit_extract_state": _tensor_dict,
    "adapterkit_per_sample": _context_manager,
    "adapterkit_config_to_dict": _dict_or_none,
    "adapterkit_config_from_dict": _config_or_none,
    "adapterkit_combine": _combined,
}


_default: list[MethodRegistry] = []
_default_lock = threading.Lock()


@functools.cache
def default_registry() -> MethodRegistry:
    """The process-wide registry over the installed plugins, built on first use (once, whatever the threads)."""
    with _default_lock:  # threads that miss the cache at once all get the one registry
        if not _default:
            _default.append(MethodRegistry(make_plugin_manager()))
        return _default[0]


def available_methods() -> dict[str, Method]:
    """The installed adapter methods, by name."""
    return default_registry().methods
