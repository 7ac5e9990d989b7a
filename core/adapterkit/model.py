"""The model-facing API: :func:`attach` and :class:`Adapters`.

:class:`Adapters` keeps the bookkeeping a model needs (which adapters exist,
their method and config, which are active, trainable, merged) and turns each
operation into per-method hook calls. Everything that touches layers lives in
the plugins; everything that must hold for every method (name rules, atomic
failure, what is active and trainable) lives here, once.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from . import files, training
from .concurrency import OpenBlocks, serialised
from .configs import checkpoint_method, config_to_dict, resolve_config
from .layers import AdaptedLayer, adapted_layers
from .merging import merge_order, runs
from .errors import (
    AdapterExistsError,
    AdapterNameError,
    AdapterStateError,
    CheckpointError,
    CheckpointExistsError,
    ConfigValueError,
    NoAdaptersError,
    UnknownAdapterError,
    UnsupportedOperationError,
)
from .registry import Method, MethodRegistry, default_registry
from .rollback import Snapshot

__all__ = ["Adapters", "attach", "attached", "BASE", "DEFAULT_NAME"]

BASE = "__base__"
"""The per-sample row name meaning "no adapter"."""

DEFAULT_NAME = "default"

_HANDLE_ATTR = "_adapterkit_adapters"


@attrs.define
class _Adapter:
    name: str
    method: Method
    config: Any
    trainable: bool


class _Record:
    """What a model carries for its adapters (on the model, as a plain attribute): the bookkeeping, and no
    reference back to the model, so a model with adapters is freed by reference counting alone.

    :class:`Adapters` is the handle over it; the record remembers the live handle weakly, so :func:`attach`
    returns the same one while anyone holds it.
    """

    def __init__(self, registry: MethodRegistry) -> None:
        self.registry = registry
        self.adapters: dict[str, _Adapter] = {}
        self.active: list[str] = []
        self.weights: dict[str, float] = {}  # set_active(weights=): active adapters whose weight is not 1
        self.merged: list[str] = []
        self.enabled = True
        self.method_list: list[Method] | None = None  # the methods in use (see Adapters._methods)
        self.handle: Callable[[], Adapters | None] = _no_handle
        # One lock per model, whatever handle is used (see adapterkit.concurrency).
        self.lock = threading.RLock()
        self.blocks = OpenBlocks()  # per_sample blocks open on the model, in any thread

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("registry")  # plugin managers do not pickle; the default one is rebuilt on load
        state.pop("handle")
        state.pop("lock")
        state.pop("blocks")
        state["method_list"] = None  # a cache
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.registry = default_registry()
        self.handle = _no_handle
        self.lock = threading.RLock()
        self.blocks = OpenBlocks()

    def __deepcopy__(self, memo: dict[int, Any]) -> _Record:
        new = _Record.__new__(_Record)
        memo[id(self)] = new
        with self.lock:
            for key, value in self.__dict__.items():
                if key == "handle":
                    new.handle = _no_handle
                elif key == "method_list":
                    new.method_list = None
                elif key == "lock":
                    new.lock = threading.RLock()
                elif key == "blocks":
                    new.blocks = OpenBlocks()
                else:
                    new.__dict__[key] = value if key == "registry" else copy.deepcopy(value, memo)
        return new


def _no_handle() -> None:
    return None


def _in_record(field: str) -> Any:
    """An :class:`Adapters` attribute that lives in the model's record."""
    return property(lambda self: getattr(self._record, field), lambda self, value: setattr(self._record, field, value))


MAX_NAME_BYTES = 128
"""The longest adapter name, in UTF-8 bytes: names become folder names (and temporary folder names) on save."""

# Attributes of the containers plugins keep per adapter (peft's ModuleDict/ParameterDict keyed by adapter
# name): a name equal to one of them ("keys", "update", "training", "forward", ...) cannot be a key there.
_TAKEN = frozenset(dir(nn.ModuleDict()) + dir(nn.ParameterDict()))


def check_name(name: Any) -> str:
    """Return ``name`` if it can name an adapter, else raise :class:`AdapterNameError`.

    Names become keys of the per-adapter ``ModuleDict``/``ParameterDict`` containers of
    every plugin, parts of state-dict keys, and folder names when saved, so the core
    refuses for every method what one of those cannot hold.
    """
    if not isinstance(name, str):
        raise AdapterNameError(f"adapter names are strings, got {name!r} ({type(name).__name__})")
    problem = None
    if not name.strip():
        problem = "is empty"
    elif name == BASE:
        problem = f"is reserved: {BASE!r} means 'no adapter' in per_sample()"
    elif any(ch in name for ch in "./\\"):
        problem = "contains '.', '/' or '\\' (names become module keys and folder names)"
    elif name != name.strip():
        problem = "has leading or trailing whitespace"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        problem = "contains a control character such as NUL or a newline (names become folder names)"
    elif not _utf8(name):
        problem = "is not valid UTF-8 text (it holds a lone surrogate); names become folder names"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes (names become folder names)"
    elif name in _TAKEN:
        problem = "is an attribute of torch's ModuleDict/ParameterDict, where adapters are kept by name"
    if problem:
        raise AdapterNameError(f"adapter name {name!r:.80} {problem}; use e.g. 'default' or 'task_a'")
    return name


def _utf8(name: str) -> bool:
    """Whether ``name`` is UTF-8 text (no lone surrogates): folder names are, safetensors' paths must be."""
    try:
        name.encode("utf-8")
    except UnicodeError:
        return False
    return True


class Adapters:
    """The adapters attached to one model. Get it with :func:`attach`.

    Semantics, for every method:

    * ``add`` and ``load`` make the new adapter the only active one.
    * The first adapter freezes every parameter the model had; an adapter's
      parameters train (``requires_grad``) when it was added (or loaded with
      ``is_trainable=True``), is active, and adapters are enabled.
    * Names are unique across methods; reusing one is an :class:`AdapterExistsError`.
    * A failed ``add`` or ``load`` leaves the model exactly as it was.
    * Operations from several threads run one after the other (see :attr:`lock`);
      forwards never wait for them.
    """

    def __init__(self, model: nn.Module, registry: MethodRegistry | None = None, *, _record: _Record | None = None) -> None:
        # The handle holds the model; the model holds only the record (no reference back), so dropping the
        # last reference to a model with adapters frees it without a garbage-collector pass.
        self.model = model
        self._record = _record if _record is not None else _Record(registry or default_registry())
        self._record.handle = weakref.ref(self)

    registry = _in_record("registry")
    _adapters = _in_record("adapters")
    _active = _in_record("active")
    _weights = _in_record("weights")
    _merged = _in_record("merged")
    _enabled = _in_record("enabled")
    _method_list = _in_record("method_list")
    _blocks = _in_record("blocks")

    @property
    def lock(self) -> threading.RLock:
        """The model's re-entrant lock: every operation holds it; hold it yourself to make several one step."""
        return self._record.lock

    # -- state ---------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """All attached adapters, in the order they were added."""
        return list(self._adapters)

    @property
    def active(self) -> list[str]:
        """The active adapters, in order (a copy)."""
        return list(self._active)

    @property
    def merged(self) -> list[str]:
        """The adapters currently merged into the base weights, in merge order."""
        return list(self._merged)

    @property
    def enabled(self) -> bool:
        """False between :meth:`disable` and :meth:`enable`."""
        return self._enabled

    def method(self, name: str) -> Method:
        """The method of adapter ``name``."""
        return self._get(name).method

    def trainable(self, name: str) -> bool:
        """Whether adapter ``name`` was added, or loaded with ``is_trainable=True`` (it trains while active and enabled)."""
        return self._get(name).trainable

    def config(self, name: str) -> Any:
        """The config of adapter ``name`` (the object in use; copy it before changing it)."""
        return self._get(name).config

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def __repr__(self) -> str:
        parts = [f"{a.name}:{a.method.name}" for a in self._adapters.values()]
        return (
            f"Adapters({type(self.model).__name__}, adapters=[{', '.join(parts)}], active={self._active}, "
            f"merged={self._merged}, enabled={self._enabled})"
        )

    def _get(self, name: str) -> _Adapter:
        try:
            return self._adapters[name]
        except (KeyError, TypeError):
            pass
        if not self._adapters:
            raise NoAdaptersError(f"no adapter named {name!r}: the model has no adapters; add() or load() one first")
        raise UnknownAdapterError(f"no adapter named {name!r}; attached adapters: {', '.join(self._adapters)}")

    def _require_adapters(self, operation: str) -> None:
        if not self._adapters:
            raise NoAdaptersError(f"cannot {operation}: the model has no adapters; add() or load() one first")

    def _names_list(self, names: str | Sequence[str], operation: str) -> list[str]:
        self._require_adapters(operation)
        if isinstance(names, str):
            items = [names]
        elif isinstance(names, Sequence) or isinstance(names, (set, frozenset)):
            items = list(names)
        else:
            raise AdapterNameError(
                f"{operation} takes an adapter name or a list of names, got {names!r} ({type(names).__name__})"
            )
        for name in items:
            self._get(name)
        if len(set(items)) != len(items):
            raise AdapterNameError(f"{operation}: adapter names repeat in {items!r}; name each adapter once")
        return items

    def _by_method(self, names: Sequence[str]) -> dict[Method, list[str]]:
        groups: dict[Method, list[str]] = {}
        for name in names:
            groups.setdefault(self._adapters[name].method, []).append(name)
        return groups

    def _methods(self) -> list[Method]:
        # Cached: every set_active asks, and a walk over 100 adapters would be most of its cost.
        if self._method_list is None:
            self._method_list = list(dict.fromkeys(a.method for a in self._adapters.values()))
        return self._method_list

    def _call(self, method: Method, hook: str, **kwargs: Any) -> Any:
        return self.registry.call(method, hook, model=self.model, **kwargs)

    def _apply_active(self) -> None:
        for method in self._methods():
            names = [n for n in self._active if self._adapters[n].method == method]
            trainable = [n for n in names if self._adapters[n].trainable] if self._enabled else []
            weights = [self._weights.get(n, 1.0) for n in names] if any(n in self._weights for n in names) else None
            self._call(method, "adapterkit_set_active", names=names, trainable=trainable, weights=weights)

    def _check_weights(self, names: list[str], weights: Sequence[float] | Mapping[str, float] | None) -> dict[str, float]:
        """``set_active``'s weights as {name: weight} for those not 1; typed errors for the rest."""
        if weights is None:
            return {}
        if isinstance(weights, Mapping):
            unknown = [n for n in weights if n not in names]
            if unknown:
                raise AdapterNameError(f"set_active: weights name {unknown}, which are not among the names {names}")
            values = [weights.get(n, 1.0) for n in names]
        elif isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise ConfigValueError(
                f"set_active: weights must be a list of numbers (one per name) or a dict name -> weight, got {weights!r}"
            )
        else:
            values = list(weights)
            if len(values) != len(names):
                raise ConfigValueError(
                    f"set_active: {len(values)} weights for {len(names)} adapters {names}; pass one weight per name"
                )
        found = {}
        for name, value in zip(names, values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigValueError(f"set_active: the weight of {name!r} is {value!r}; weights are finite numbers")
            if value != 1.0:
                found[name] = float(value)
        for method in {self._adapters[n].method for n in found}:
            if not self.registry.accepts(method, "adapterkit_set_active", "weights"):
                raise UnsupportedOperationError(
                    f"set_active: method {method.name!r} (plugin {method.plugin_name!r}) does not support weights; "
                    f"weigh only adapters of methods that do, or pass weights=None"
                )
        return found

    # -- adding --------------------------------------------------------------
    @serialised
    def add(self, config: Any, name: str = DEFAULT_NAME, *, autocast_adapter_dtype: bool = True) -> str:
        """Add a new, freshly initialised, trainable adapter and make it the only active one.

        :param config: a config string (``"lora[r=8]"``), a dict with a ``method``
            key, a saved ``adapter_config.json`` dict, or a method's config object.
        :param name: the adapter's name; must not be in use.
        :param autocast_adapter_dtype: on a float16/bfloat16 model, create the adapter's
            weights in float32 (the default, as peft does: half-precision weights lose most
            small updates); ``False`` keeps the dtype of the layers they adapt.
        :returns: the name.
        """
        self._check_new_name(name)
        method, config = resolve_config(config, self.registry)
        self._attach(name, method, config, state_dict=None, trainable=True, autocast_adapter_dtype=autocast_adapter_dtype)
        return name

    @serialised
    def load(
        self,
        source: str | PathLike[str] | None,
        name: str | None = None,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        subfolder: str | None = None,
        cache_dir: str | PathLike[str] | None = None,
        local_files_only: bool = False,
        is_trainable: bool = False,
        config: Any = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        method: str | None = None,
        allow_pickle: bool = False,
        allow_nonfinite: bool = False,
        device_map: str | dict[str, Any] | None = None,
        max_memory: dict[Any, Any] | None = None,
        offload_folder: str | PathLike[str] | None = None,
        offload_index: dict[str, Any] | None = None,
        autocast_adapter_dtype: bool = True,
        activate: bool = True,
    ) -> str:
        """Load a saved adapter (peft format) from a local folder or a Hub repo and make it the only active one.

        :param source: a folder holding ``adapter_config.json`` and
            ``adapter_model.safetensors``, or a Hub repo id. May be ``None`` when
            both ``config`` and ``state_dict`` are given.
        :param name: the adapter's name (default ``"default"``); must not be in use.
        :param revision: Hub branch, tag or commit; config and weights come from
            the same resolved commit.
        :param token: Hub token (never logged or shown in errors).
        :param subfolder: folder inside ``source`` that holds the adapter.
        :param cache_dir: Hub cache folder.
        :param local_files_only: use only the Hub cache, never the network.
        :param is_trainable: load the adapter trainable (default: frozen, for inference).
        :param config: use this config instead of the saved ``adapter_config.json``.
        :param method: the method whose adapter this is, when the files do not say it unambiguously (a saved
            config's ``peft_type`` names a method that several installed plugins build on, e.g. a LoRA
            variant). By default: the method recorded in the files by adapterkit, else the one a plugin
            claims (``adapterkit_claim_checkpoint``), else ``peft_type``.
        :param state_dict: use these tensors instead of the saved weights file;
            keys with or without peft's ``base_model.model.`` prefix.
        :param allow_pickle: allow reading ``adapter_model.bin`` (pickle) when no
            safetensors file exists. Only for sources you trust.
        :param allow_nonfinite: load weights that hold NaN or infinite values (refused by
            default with a :class:`CheckpointError`: such an adapter makes every output NaN).
        :param device_map: after loading, re-dispatch the model with this device
            map (needs the dispatch plugin, see :meth:`dispatch`); ``max_memory``,
            ``offload_folder`` and ``offload_index`` go with it.
        :param autocast_adapter_dtype: on a float16/bfloat16 model, keep the adapter's
            weights in float32 (the default, as peft's ``from_pretrained`` does, for
            inference loads too); ``False`` casts them to the dtype of the layers they adapt.
        :param activate: ``False`` loads the adapter without changing the active set (it
            stays inactive; a server loads the next adapter beside live traffic this way).
            Such a load may run while ``per_sample`` blocks are open.
        :returns: the name.
        """
        placement = {"max_memory": max_memory, "offload_folder": offload_folder, "offload_index": offload_index}
        if device_map is None and any(v is not None for v in placement.values()):
            raise ConfigValueError(f"{[k for k, v in placement.items() if v is not None]} take effect only with device_map=")
        if device_map is not None:
            self._dispatcher()  # fail before loading when no dispatch plugin is installed
        name = DEFAULT_NAME if name is None else name
        self._check_new_name(name)
        method_found, config, tensors = self._read(
            source,
            name,
            subfolder=subfolder,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_pickle=allow_pickle,
            config=config,
            state_dict=state_dict,
            method=method,
            allow_nonfinite=allow_nonfinite,
        )
        self._attach(
            name,
            method_found,
            config,
            state_dict=tensors,
            trainable=is_trainable,
            autocast_adapter_dtype=autocast_adapter_dtype,
            activate=activate,
        )
        if device_map is not None:
            try:
                self.dispatch(device_map, **placement)
            except BaseException:
                # The dispatch plugin checks before it changes anything: drop the adapter, as a failed load does.
                with contextlib.suppress(Exception):
                    self.delete(name)
                raise
        return name

    def _read(
        self,
        source: str | PathLike[str] | None,
        name: str,
        *,
        config: Any = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        method: str | None = None,
        allow_nonfinite: bool = False,
        operation: str = "load",
        **where: Any,
    ) -> tuple[Method, Any, dict[str, torch.Tensor]]:
        """An adapter's method, validated config and tensors (keys without peft's prefix), from files or given.

        ``where``: :func:`adapterkit.files.resolve`'s arguments (``subfolder``, ``revision``, ...).
        """
        metadata: dict[str, str] = {}
        if config is None or state_dict is None:
            if source is None:
                raise CheckpointError(f"{operation}() needs a source unless both config= and state_dict= are given")
            found = files.resolve(source, **where, need_config=config is None, need_weights=state_dict is None)
            if state_dict is None:
                state_dict, metadata = files.read_weights(found.weights)
            if config is None:
                config = files.read_config(found.config)
        if not allow_nonfinite:
            bad = files.nonfinite(state_dict)
            if bad:
                raise CheckpointError(
                    f"adapter {name!r}: {len(bad)} weight tensor(s) hold NaN or infinite values ({', '.join(bad[:3])}"
                    f"{', ...' if len(bad) > 3 else ''}), which would make the model's outputs NaN; "
                    "pass allow_nonfinite=True to load them anyway"
                )
        tensors = files.strip_prefix(state_dict)
        if method is None and isinstance(config, Mapping) and "method" not in config:
            method = checkpoint_method(
                self.registry,
                config,
                metadata,
                list(tensors),
                recorded_key=files.METHOD_KEY,
                where=repr(str(source)) if source is not None else "the given config and state_dict",
            )
        method_found, config = resolve_config(config, self.registry, method_name=method)
        if method is not None and method_found is not self.registry.get(method):
            raise ConfigValueError(
                f"{operation}(method={method!r}) contradicts the config, which is a {method_found.name!r} config; "
                "pass one of them"
            )
        return method_found, config, tensors

    @serialised
    def swap(
        self, source_or_state_dict: str | PathLike[str] | Mapping[str, torch.Tensor], name: str, **load_kwargs: Any
    ) -> None:
        """Replace adapter ``name``'s weights with those of another saved adapter (hot-swap), in place.

        The adapter keeps its name, activity, weight and trainability; with the method's
        support (LoRA, IA3), its tensors keep their identity, so a ``torch.compile``d model
        runs on without recompiling (see :meth:`prepare_compiled` for ranks and targets
        that differ). Without it, the adapter is deleted and the new one loaded under
        the same name.

        :param source_or_state_dict: a folder or Hub repo id (as for :meth:`load`), or a
            state dict (keys as :meth:`state_dict` returns them, with or without peft's
            prefix); a state dict alone keeps the adapter's config unless ``config=`` is given.
        :param name: an attached adapter, not merged.
        :param load_kwargs: :meth:`load`'s ``revision``, ``token``, ``subfolder``,
            ``cache_dir``, ``local_files_only``, ``config``, ``method``, ``allow_pickle``,
            ``allow_nonfinite``.
        :raises UnsupportedOperationError: the new adapter does not fit in place (other
            targets, a rank above the prepared maximum), naming what differs; nothing changes.
        """
        allowed = {"revision", "token", "subfolder", "cache_dir", "local_files_only", "config", "method", "allow_pickle", "allow_nonfinite"}
        unknown = sorted(set(load_kwargs) - allowed)
        if unknown:
            raise TypeError(f"swap() got unexpected arguments {unknown}; it takes {sorted(allowed)}")
        adapter = self._get(name)
        if name in self._merged:
            raise AdapterStateError(f"cannot swap adapter {name!r} while it is merged; unmerge() first")
        self._blocks.refuse(f"swap adapter {name!r}", [name])
        if isinstance(source_or_state_dict, Mapping):
            source, state_dict = None, source_or_state_dict
            if load_kwargs.get("config") is None:
                load_kwargs["config"] = copy.deepcopy(adapter.config)
        else:
            source, state_dict = source_or_state_dict, None
        method, config, tensors = self._read(source, name, state_dict=state_dict, operation="swap", **load_kwargs)
        if method is not adapter.method:
            raise ConfigValueError(
                f"cannot swap adapter {name!r} ({adapter.method.name}) for a {method.name!r} adapter; "
                "swap replaces weights of the same method: delete() and load() instead"
            )
        if self.registry.implements(method, "adapterkit_swap"):
            self._call(method, "adapterkit_swap", name=name, config=config, state_dict=tensors)
            adapter.config = config
            return
        self._replace(name, config, tensors)

    def _replace(self, name: str, config: Any, tensors: dict[str, torch.Tensor]) -> None:
        """Swap without the plugin's help: delete, then load under the same name; the old adapter back on failure."""
        adapter = self._adapters[name]
        old = {key: value.clone() for key, value in self._call(adapter.method, "adapterkit_extract_state", name=name).items()}
        active, weights = list(self._active), dict(self._weights)
        self.delete(name)
        try:
            self._attach(name, adapter.method, config, state_dict=tensors, trainable=adapter.trainable, activate=False)
        except BaseException:
            self._attach(name, adapter.method, adapter.config, state_dict=old, trainable=adapter.trainable, activate=False)
            raise
        finally:
            # The adapter's place in the names' order is its new one; activity and weight are as before.
            self._active, self._weights = active, weights
            self._apply_active()

    @serialised
    def prepare_compiled(
        self, *, max_rank: int | None = None, targets: Sequence[str] | None = None, max_adapters: int | None = None
    ) -> None:
        """Make switching adapters free of recompilation on a ``torch.compile``d model; call it before compiling.

        Afterwards ``set_active`` (weights included), :meth:`swap` and ``per_sample`` among
        adapters within the declared limits change only tensor values the compiled graph
        reads: one compile serves any number of adapters. Adapters loaded later join as
        long as they fit; one that does not raises :class:`UnsupportedOperationError`
        naming the limit.

        :param max_rank: the largest rank of any adapter to come (LoRA); smaller ranks are
            padded with zeros. Default: the largest rank loaded so far.
        :param targets: module names (as in ``target_modules``) the adapters to come may
            target, their union; ``None``: the layers adapted so far.
        :param max_adapters: how many adapters may be resident at once; default: the
            budget's ``max_adapters`` (see :meth:`limit`), else the number loaded now (at least 8).
        """
        for key, value in (("max_rank", max_rank), ("max_adapters", max_adapters)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigValueError(f"prepare_compiled: {key}={value!r}; pass a positive integer or None")
        if targets is not None and (isinstance(targets, str) or not all(isinstance(t, str) for t in targets)):
            raise ConfigValueError(f"prepare_compiled: targets={targets!r}; pass a list of module names")
        methods = [m for m in self._methods() if self.registry.implements(m, "adapterkit_prepare_compiled")]
        if not methods:
            raise UnsupportedOperationError(
                "prepare_compiled: no method in use on this model supports compiled switching "
                f"(in use: {[m.name for m in self._methods()] or 'none'}; add or load a LoRA or IA3 adapter first)"
            )
        for method in methods:
            self._call(
                method,
                "adapterkit_prepare_compiled",
                max_rank=max_rank,
                targets=None if targets is None else list(targets),
                max_adapters=max_adapters,
            )

    @serialised
    def combine(
        self, names: Sequence[str], weights: Sequence[float], name: str, how: str = "linear", **options: Any
    ) -> str:
        """Add a new adapter ``name`` built from a weighted combination of ``names`` (peft's ``add_weighted_adapter``).

        The new adapter is inactive (``set_active(name)`` to use it) and trainable, as an
        added one is; it saves and loads as any other.

        :param names: adapters of one method.
        :param weights: one weight per name.
        :param how: ``"linear"``, ``"cat"``, ``"svd"``, ``"ties"``, ``"ties_svd"``,
            ``"dare_linear"``, ``"dare_ties"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``,
            ``"magnitude_prune"``, ``"magnitude_prune_svd"`` (LoRA; see the method's docs).
        :param options: the combination's settings: ``svd_rank``, ``svd_clamp``,
            ``svd_full_matrices``, ``density``, ``majority_sign_method``.
        :returns: the name.
        """
        items = self._names_list(names, "combine")
        self._check_new_name(name)
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(items):
            raise ConfigValueError(f"combine: pass one weight per adapter ({len(items)} names), got weights={weights!r}")
        for adapter_name, value in zip(items, weights):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigValueError(f"combine: the weight of {adapter_name!r} is {value!r}; weights are finite numbers")
        methods = {self._adapters[n].method for n in items}
        if len(methods) != 1:
            raise ConfigValueError(
                f"combine: {items} are adapters of several methods ({sorted(m.name for m in methods)}); combine one method's"
            )
        method = methods.pop()
        if not self.registry.implements(method, "adapterkit_combine"):
            raise UnsupportedOperationError(
                f"combine: method {method.name!r} (plugin {method.plugin_name!r}) does not support combining adapters"
            )
        config, tensors = self._call(
            method, "adapterkit_combine", names=items, weights=[float(w) for w in weights], how=how, options=dict(options)
        )
        method_found, config = resolve_config(config, self.registry, method_name=method.name)
        self._attach(name, method_found, config, state_dict=dict(tensors), trainable=True, activate=False)
        return name

    def _dispatcher(self) -> Any:
        hook = self.registry.plugin_manager.hook.adapterkit_dispatch
        if not hook.get_hookimpls():
            raise UnsupportedOperationError(
                "device_map/max_memory/offload_folder/offload_index need a dispatch plugin; "
                "install it with: pip install adapterkit-dispatch"
            )
        return hook

    @serialised
    def dispatch(
        self,
        device_map: str | dict[str, Any] = "auto",
        *,
        max_memory: dict[Any, Any] | None = None,
        offload_folder: str | PathLike[str] | None = None,
        offload_index: dict[str, Any] | None = None,
    ) -> None:
        """Place the model and its adapters on devices through the dispatch plugin (accelerate).

        ``device_map`` is ``"auto"``, ``"balanced"``, ``"balanced_low_0"``,
        ``"sequential"`` or an explicit ``{module name: device}`` dict.
        """
        hook = self._dispatcher()
        with self.registry.faults(hook.get_hookimpls()[-1].plugin_name, "adapterkit_dispatch"):
            hook(
                model=self.model,
                device_map=device_map,
                max_memory=max_memory,
                offload_folder=None if offload_folder is None else str(offload_folder),
                offload_index=offload_index,
            )

    def _check_new_name(self, name: str) -> None:
        check_name(name)
        if name in self._adapters:
            raise AdapterExistsError(
                f"an adapter named {name!r} is already attached ({self._adapters[name].method.name}); "
                f"pick another name or delete({name!r}) it first"
            )

    def _attach(
        self,
        name: str,
        method: Method,
        config: Any,
        *,
        state_dict: dict[str, torch.Tensor] | None,
        trainable: bool,
        autocast_adapter_dtype: bool = True,
        activate: bool = True,
    ) -> None:
        if self._merged:
            raise AdapterStateError(f"cannot attach {name!r} while {self._merged} are merged; unmerge() first")
        if activate:
            self._blocks.refuse(f"add or load adapter {name!r} (it would become active; load(..., activate=False) would not)")
        snapshot = Snapshot(self.model, self._adapters)
        previous_active, previous_weights = self._active, self._weights
        if not self._adapters:
            for param in self.model.parameters():
                param.requires_grad_(False)
        try:
            self._call(
                method,
                "adapterkit_inject",
                name=name,
                config=config,
                empty=state_dict is not None,
                autocast_adapter_dtype=autocast_adapter_dtype,
            )
            snapshot.claim_new_wrappers(method.name)
            if state_dict is not None:
                self._call(method, "adapterkit_load_state", name=name, state_dict=state_dict)
            self._adapters[name] = _Adapter(name, method, config, trainable)
            self._method_list = None
            if activate:
                self._active, self._weights = [name], {}
            if not self._enabled:
                # New layers start enabled: while adapters are disabled, the new adapter is too.
                self._call(method, "adapterkit_disable")
            self._apply_active()
        except BaseException:
            self._adapters.pop(name, None)
            self._method_list = None
            self._active, self._weights = previous_active, previous_weights
            self._rollback(method, name, snapshot)
            raise

    def _rollback(self, method: Method, name: str, snapshot: Snapshot) -> None:
        with contextlib.suppress(Exception):
            self._call(method, "adapterkit_delete", name=name)
        snapshot.restore()
        with contextlib.suppress(Exception):
            self._apply_active()
        snapshot.restore()  # set_active may touch requires_grad; the snapshot has the last word

    # -- activity ------------------------------------------------------------
    @serialised
    def set_active(
        self, names: str | Sequence[str], weights: Sequence[float] | Mapping[str, float] | None = None
    ) -> None:
        """Make exactly ``names`` active (across methods; ``[]`` deactivates all).

        :param weights: one scale per name (a list, or a dict name -> weight; names left
            out weigh 1): each adapter's contribution is multiplied by its weight, as with
            diffusers' ``set_adapters``. For LoRA the weight multiplies the adapter's
            scaling. ``None`` (the default) weighs every adapter 1. Methods whose plugin
            does not support weights raise :class:`UnsupportedOperationError`.
        """
        items = self._names_list(names, "set_active") if names != [] else []
        if self._merged:
            raise AdapterStateError(f"cannot change the active adapters while {self._merged} are merged; unmerge() first")
        found = self._check_weights(items, weights)
        previous, previous_weights = self._active, self._weights
        self._active, self._weights = items, found
        try:
            self._apply_active()
        except BaseException:
            # A plugin refused the new set (e.g. two active adapters with their own copy of one head):
            # the old set is the state, on every method's layers too.
            self._active, self._weights = previous, previous_weights
            with contextlib.suppress(Exception):
                self._apply_active()
            raise

    @serialised
    def disable(self) -> None:
        """Make the model compute as without adapters (adapters stay attached). Unmerges merged adapters first."""
        self._require_adapters("disable adapters")
        self._blocks.refuse("disable adapters")
        if self._merged:
            self.unmerge()
        for method in self._methods():
            self._call(method, "adapterkit_disable")
        self._enabled = False
        self._apply_active()

    @serialised
    def enable(self) -> None:
        """Undo :meth:`disable`."""
        self._require_adapters("enable adapters")
        for method in self._methods():
            self._call(method, "adapterkit_enable")
        self._enabled = True
        self._apply_active()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Context manager: adapters disabled inside, restored on exit."""
        was_enabled = self._enabled
        self.disable()
        try:
            yield
        finally:
            if was_enabled:
                self.enable()

    # -- state dicts and files ----------------------------------------------
    def _single(self, name: str | None, operation: str) -> str:
        self._require_adapters(operation)
        if name is not None:
            self._get(name)
            return name
        if len(self._active) != 1:
            raise AdapterStateError(
                f"{operation}: name an adapter; with {len(self._active)} active ({self._active}) it is ambiguous"
            )
        return self._active[0]

    @serialised
    def state_dict(self, name: str | None = None, *, prefix: str = files.PEFT_PREFIX) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors with peft's file keys (``base_model.model.<module>.lora_A.weight``).

        ``name`` defaults to the only active adapter. Pass ``prefix=""`` for keys
        relative to the model, as transformers' ``get_adapter_state_dict`` returns them.
        """
        name = self._single(name, "get a state dict")
        adapter = self._adapters[name]
        tensors = self._call(adapter.method, "adapterkit_extract_state", name=name)
        return {prefix + key: value for key, value in tensors.items()}

    @serialised
    def save(
        self, directory: str | PathLike[str], names: str | Sequence[str] | None = None, *, overwrite: bool = False
    ) -> None:
        """Save adapters in peft's format: ``default`` in ``directory``, each other one in ``directory/<name>``.

        Each adapter folder is written crash-safely (see :func:`adapterkit.files.write_adapter`).
        A folder that already holds an adapter is replaced only with ``overwrite=True``;
        otherwise :class:`CheckpointExistsError` is raised before anything is written.
        A folder that cannot be written (disk full, read-only, no permission) is a
        :class:`SaveError` (also an ``OSError``) naming it.
        """
        items = self._names_list(self.names if names is None else names, "save")
        for name in items:
            folder = files.adapter_folder(directory, name)
            with files.saving(folder):  # a path the file system refuses (too long, no permission): a SaveError
                blocked = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
            if blocked is not None:
                raise CheckpointError(
                    f"cannot save adapter {name!r} to {str(folder)!r}: {str(blocked)!r} is a file, not a folder; "
                    "pass a folder path"
                )
        if not overwrite:
            with files.saving(Path(directory)):
                taken = [str(f) for n in items if files.holds_adapter(f := files.adapter_folder(directory, n))]
            if taken:
                raise CheckpointExistsError(f"{taken} already hold an adapter; pass overwrite=True to replace them")
        for name in items:
            self._write(name, files.adapter_folder(directory, name))

    def _write(self, name: str, folder: PathLike[str] | str) -> None:
        """Write adapter ``name``'s files into ``folder`` (crash-safe, replacing what is there)."""
        adapter = self._adapters[name]
        data = config_to_dict(adapter.config, self.registry)
        data["inference_mode"] = True
        if data.get("base_model_name_or_path") is None and "base_model_name_or_path" in data:
            data["base_model_name_or_path"] = getattr(self.model, "name_or_path", None) or None
        files.write_adapter(Path(folder), config=data, tensors=self.state_dict(name), method=adapter.method)

    # -- merging and deleting ------------------------------------------------
    @serialised
    def merge(self, names: str | Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights, innermost first.

        Where several methods wrap the same layer, each adapter folds in after the
        ones it wraps, whatever the order of ``names`` or of the active list, so the
        outputs stay what they were. A merge that cannot be exact (an active
        adapter left unmerged below a merged one, or one whose method cannot merge)
        raises before anything changes: :class:`UnsupportedOperationError` or
        :class:`AdapterStateError`, naming the layer and the fix.
        """
        self._require_adapters("merge")
        items = self._names_list(self._active if names is None else names, "merge")
        if not self._enabled:
            raise AdapterStateError("cannot merge while adapters are disabled; enable() first")
        already = [n for n in items if n in self._merged]
        if already:
            raise AdapterStateError(f"adapters {already} are already merged; unmerge() first")
        if not items:
            raise AdapterStateError("nothing to merge: no adapter is active; name the adapters to merge")
        self._blocks.refuse("merge")
        unable = [n for n in items if not self.registry.implements(self._adapters[n].method, "adapterkit_merge")]
        if unable:
            method = self._adapters[unable[0]].method
            raise UnsupportedOperationError(
                f"adapters {unable} cannot be merged: method {method.name!r} (plugin {method.plugin_name!r}) "
                "does not support 'merge'"
            )
        order = merge_order(
            self.layers(),
            items,
            active=self._active,
            merged=self._merged,
            adapters_of_method=lambda method: [a.name for a in self._adapters.values() if a.method.name == method],
            can_merge=lambda method: self.registry.implements(self.registry.get(method), "adapterkit_merge"),
        )
        done: list[tuple[Method, list[str]]] = []
        try:
            for group in runs(order, self.method):
                method = self._adapters[group[0]].method
                self._call(method, "adapterkit_merge", names=group)
                done.append((method, group))
                self._merged.extend(group)
        except BaseException:
            for method, group in reversed(done):
                with contextlib.suppress(Exception):
                    self._call(method, "adapterkit_unmerge", names=group)
                self._merged = [n for n in self._merged if n not in group]
            raise

    @serialised
    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weights, the last merged first."""
        self._require_adapters("unmerge")
        if not self._merged:
            raise AdapterStateError("nothing to unmerge: no adapter is merged (adapters.merged is empty); merge() first")
        for group in reversed(runs(self._merged, self.method)):
            self._call(self._adapters[group[0]].method, "adapterkit_unmerge", names=group)
            self._merged = self._merged[: -len(group)]

    @serialised
    def layers(self) -> list[AdaptedLayer]:
        """The model's adapted layers, each with its stack of wrappers (innermost first) and the adapters they hold.

        See :mod:`adapterkit.layers`. A wrapper's ``adapters`` is ``None`` when its plugin
        does not implement ``adapterkit_layer_adapters``.
        """
        by_name = {method.name: method for method in self._methods()}

        def adapters_of(wrapper: nn.Module, method_name: str) -> Sequence[str] | None:
            method = by_name.get(method_name)
            if method is None or not self.registry.implements(method, "adapterkit_layer_adapters"):
                return None
            return self._call(method, "adapterkit_layer_adapters", layer=wrapper)

        return adapted_layers(self.model, adapters_of)

    @serialised
    def delete(self, name: str) -> None:
        """Remove adapter ``name`` and its parameters; it leaves the active list."""
        adapter = self._get(name)
        if name in self._merged:
            raise AdapterStateError(f"adapter {name!r} is merged; unmerge() before deleting it")
        self._blocks.refuse(f"delete adapter {name!r}", [name])
        self._call(adapter.method, "adapterkit_delete", name=name)
        del self._adapters[name]
        self._method_list = None
        self._active = [n for n in self._active if n != name]
        self._weights.pop(name, None)
        self._apply_active()

    # -- training --------------------------------------------------------------
    @serialised
    def training_step(self, global_step: int) -> None:
        """Run every method's per-step work for the adapters being trained (AdaLoRA: rank allocation).

        Call it once per optimizer step, after ``optimizer.step()`` and before
        ``optimizer.zero_grad()`` (methods may read the gradients), with the step
        counting from 0. Methods without per-step work are skipped, so a training
        loop calls it whatever the methods are. See :mod:`adapterkit.training`.
        """
        training.training_step(self, global_step)

    @serialised
    def regularization(self) -> torch.Tensor:
        """The sum of every method's loss term for the adapters being trained (AdaLoRA: orthogonal regularisation).

        Add it to the loss: ``loss = model(**batch).loss + adapters.regularization()``.
        A scalar zero when no method adds a term.
        """
        return training.regularization(self)

    # -- mixed batches -------------------------------------------------------
    @contextlib.contextmanager
    def per_sample(self, rows: Sequence[str]) -> Iterator[None]:
        """Context manager: forward passes inside route batch row ``i`` through adapter ``rows[i]``.

        ``"__base__"`` means no adapter for that row. Inference only: the model
        must be in eval mode, enabled, with nothing merged. Adapters of methods
        not named in ``rows`` act on no row inside the block.

        The routing applies to forwards in the thread that opened the block; other
        threads' forwards on the same model compute the active adapters as usual.
        (A method that implements no per-sample routing, when not named in ``rows``,
        is disabled for the block instead, model-wide.) While the block is open, no
        thread may merge, disable, add or load adapters on the model or delete one
        that ``rows`` names: those raise :class:`AdapterStateError`.
        """
        with self.lock:
            stack, token = self._open_per_sample(rows)
        try:
            yield
        finally:
            with self.lock:
                self._blocks.close(token)
                stack.close()

    def _open_per_sample(self, rows: Sequence[str]) -> tuple[contextlib.ExitStack, object]:
        self._require_adapters("run per_sample")
        if isinstance(rows, str) or not isinstance(rows, Sequence) or not rows:
            raise AdapterNameError(f"per_sample takes a non-empty list of adapter names, one per batch row; got {rows!r}")
        for row in rows:
            if row != BASE:
                self._get(row)
        if self.model.training:
            raise AdapterStateError("per_sample is for inference; call model.eval() first")
        if self._merged:
            raise AdapterStateError(f"per_sample cannot run while {self._merged} are merged; unmerge() first")
        if not self._enabled:
            raise AdapterStateError("per_sample cannot run while adapters are disabled; enable() first")
        rows = list(rows)
        named = self._by_method([r for r in dict.fromkeys(rows) if r != BASE])
        disabled: list[Method] = []
        with contextlib.ExitStack() as stack:
            # Registered first, so it runs last: re-enabling a method (peft's enable_adapters) makes
            # its active adapters trainable, frozen ones included; put requires_grad back as it was.
            stack.callback(lambda: disabled and self._apply_active())
            for method in self._methods():
                if method in named or self.registry.implements(method, "adapterkit_per_sample"):
                    try:
                        # A method no row names routes every row to the base model, in this thread only.
                        with self.registry.faults(method.plugin_name, "adapterkit_per_sample", method.name):
                            stack.enter_context(self._call(method, "adapterkit_per_sample", rows=rows))
                        continue
                    except UnsupportedOperationError:
                        if method in named:
                            raise
                self._call(method, "adapterkit_disable")
                disabled.append(method)
                stack.callback(self._call, method, "adapterkit_enable")
            token = self._blocks.open(rows)
            return stack.pop_all(), token

    # -- copying ---------------------------------------------------------------
    def __deepcopy__(self, memo: dict[int, Any]) -> Adapters:
        """A copy of the model with its adapters, and that copy's handle."""
        return attach(copy.deepcopy(self.model, memo))

    def __reduce__(self) -> Any:
        return attach, (self.model,)


def attach(model: nn.Module, registry: MethodRegistry | None = None) -> Adapters:
    """Return the :class:`Adapters` of ``model``, creating it on first use; the same object while it is held."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach() takes a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module  # the adapters belong to the wrapped model, not to the wrapper
    record = model.__dict__.get(_HANDLE_ATTR)
    if record is None:
        handle = Adapters(model, registry)
        # Plain attribute, not a submodule: the record must not appear in model.state_dict().
        # setdefault: two threads attaching at once share one record (and its lock).
        record = model.__dict__.setdefault(_HANDLE_ATTR, handle._record)
        if record is handle._record:
            return handle
    if registry is not None and registry is not record.registry:
        raise AdapterStateError("this model is already attached with another registry")
    handle = record.handle()
    return handle if handle is not None else Adapters(model, _record=record)


def attached(model: nn.Module) -> Adapters | None:
    """The :class:`Adapters` of ``model`` if it carries at least one adapter, else ``None`` (nothing is created)."""
    record = model.__dict__.get(_HANDLE_ATTR)
    return attach(model) if record is not None and record.adapters else None
