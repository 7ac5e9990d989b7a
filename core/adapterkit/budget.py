"""The adapter memory budget: adapters registered without loading, loaded on use, the least recently used evicted.

A serving process may know thousands of adapters and hold a few dozen. :meth:`Adapters.register`
records an adapter from its config and the header of its weights file (names, dtypes, shapes:
its size), without reading the weights. :meth:`Adapters.limit` sets a budget: how many registered
adapters, and/or how many bytes of them, may be loaded at once. ``set_active``, ``per_sample``
and ``swap`` load the registered adapters they name (a miss) and evict the least recently used
ones that nothing needs (not pinned, not active, not named by an open ``per_sample`` block, not
merged) to stay within it. Adapters added or loaded directly are outside the budget: never
counted, never evicted.

The state lives in the model's record (:class:`Budget`); every function here runs under the
model's lock (its callers, methods of :class:`~adapterkit.Adapters`, hold it). Nothing here is
specific to a method: loading and evicting go through the same hooks as ``load`` and ``delete``.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from . import files
from .errors import (
    AdapterStateError,
    ArgumentValueError,
    BudgetError,
    CheckpointError,
    UnsafeCheckpointError,
)
from .registry import Method

if TYPE_CHECKING:
    from .model import Adapters

__all__ = ["Budget", "BudgetStats"]

F = TypeVar("F", bound=Any)

_MAX_HEADER = 100_000_000  # safetensors refuses larger headers too


@attrs.frozen
class BudgetStats:
    """Counters and sizes of a model's adapter budget (:meth:`Adapters.stats`)."""

    hits: int
    """Registered adapters an operation named that were loaded already (once per adapter per call)."""
    misses: int
    """Registered adapters an operation named that were not loaded, so it loaded them."""
    evictions: int
    """Registered adapters the budget unloaded to make room."""
    loads: int
    """Loads of registered adapters that succeeded (a miss whose load fails counts as a miss only)."""
    resident: int
    """Registered adapters loaded now."""
    bytes_resident: int
    """Bytes of the registered adapters loaded now (see :meth:`Adapters.register` for how they are counted)."""
    registered: int
    """Registered adapters, loaded or not."""
    max_adapters: int | None
    """The budget's count limit (``None``: none)."""
    max_bytes: int | None
    """The budget's byte limit (``None``: none)."""


@attrs.define
class _Entry:
    """A registered adapter: where its weights are and what they are, read once at registration."""

    folder: Path  # a local folder; for a Hub source, the one commit's snapshot in the cache
    method: Method
    config: Any  # the validated config; each load uses a fresh copy of it
    nbytes: int  # from the file's header; after a load, the size of the tensors loaded
    allow_nonfinite: bool
    autocast_adapter_dtype: bool


class Budget:
    """A model's budget state, kept in its record: registrations, recency, pins, limits, counters."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        self.recency: collections.OrderedDict[str, None] = collections.OrderedDict()  # loaded ones, LRU first
        self.pinned: set[str] = set()
        self.max_adapters: int | None = None
        self.max_bytes: int | None = None
        self.hits = self.misses = self.evictions = self.loads = 0

    def bytes_of(self, names: Iterable[str]) -> int:
        return sum(self.entries[n].nbytes for n in names)

    def fits(self, names: Sequence[str]) -> bool:
        return (self.max_adapters is None or len(names) <= self.max_adapters) and (
            self.max_bytes is None or self.bytes_of(names) <= self.max_bytes
        )

    def describe(self) -> str:
        limits = [f"max_adapters={self.max_adapters}"] if self.max_adapters is not None else []
        limits += [f"max_bytes={self.max_bytes}"] if self.max_bytes is not None else []
        return f"the budget ({', '.join(limits)})"


# -- registering -------------------------------------------------------------
def register(
    adapters: Adapters,
    source: str | PathLike[str],
    name: str,
    *,
    where: dict[str, Any],
    config: Any,
    method: str | None,
    allow_nonfinite: bool,
    autocast_adapter_dtype: bool,
) -> None:
    adapters._check_new_name(name)
    entry = _read_entry(adapters, source, name, where=where, config=config, method=method, operation="register")
    entry.allow_nonfinite, entry.autocast_adapter_dtype = bool(allow_nonfinite), bool(autocast_adapter_dtype)
    adapters._record.budget.entries[name] = entry


def _read_entry(
    adapters: Adapters,
    source: str | PathLike[str],
    name: str,
    *,
    where: dict[str, Any],
    config: Any,
    method: str | None,
    operation: str,
) -> _Entry:
    """Resolve ``source``, read and validate its config, size its weights from the header; load nothing."""
    if not isinstance(source, (str, PathLike)):
        raise ArgumentValueError(
            f"{operation}() takes a local folder or a Hub repo id, got {type(source).__name__}; "
            "to use tensors in memory, load(..., state_dict=...) them instead"
        )
    try:
        found = files.resolve(source, **where, need_config=config is None, need_weights=True)
    except UnsafeCheckpointError:
        raise UnsafeCheckpointError(
            f"{str(source)!r} has only adapter_model.bin (a pickle); {operation}() sizes adapters from the "
            "safetensors header without reading the weights: convert it to adapter_model.safetensors, "
            "or load() it with allow_pickle=True if you trust it"
        ) from None
    assert found.weights is not None
    sizes, metadata = read_header(found.weights.path)
    if config is None:
        config = files.read_config(found.config)
    keys = [key.removeprefix(files.PEFT_PREFIX) for key in sizes]
    found_method, config = adapters._method_and_config(
        source, config, metadata, keys, method=method, operation=operation
    )
    return _Entry(found.weights.path.parent, found_method, config, sum(sizes.values()), False, True)


_ITEMSIZE = {name: dtype.itemsize for name, dtype in files._DTYPES.items()}


def read_header(path: Path) -> tuple[dict[str, int], dict[str, str]]:
    """The byte size of each tensor of a safetensors file, and its metadata, from the header alone."""
    problem = None
    try:
        with open(path, "rb") as f:
            start = f.read(8)
            (size,) = struct.unpack("<Q", start) if len(start) == 8 else (None,)
            data_size = os.fstat(f.fileno()).st_size - 8 - (size or 0)
            if size is None or data_size < 0 or size > _MAX_HEADER:
                raise ValueError("its header length is missing or runs past the end of the file")
            header = json.loads(f.read(size))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        header, problem = {}, "its header is not a JSON object"
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        problem = "its __metadata__ is not a mapping of strings"
    sizes = {}
    for key, info in header.items():
        try:
            shape, (begin, end) = [int(n) for n in info["shape"]], info["data_offsets"]
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
                raise ValueError
            itemsize = _ITEMSIZE.get(info["dtype"])
            if min(shape, default=0) < 0 or (itemsize is not None and math.prod(shape) * itemsize != end - begin):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            problem = f"tensor {key!r}: its dtype, shape and byte range do not agree"
            break
        sizes[key] = end - begin
    if not sizes and problem is None:
        problem = "it holds no tensors"
    if problem:
        raise CheckpointError(f"{str(path)!r} is not a usable adapter weights file: {problem}")
    return sizes, metadata


# -- limits and pins ---------------------------------------------------------
def limit(adapters: Adapters, max_adapters: int | None, max_bytes: int | None) -> None:
    for key, value in (("max_adapters", max_adapters), ("max_bytes", max_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ArgumentValueError(f"limit: {key}={value!r}; pass a positive integer, or None for no limit")
    budget = adapters._record.budget
    old = budget.max_adapters, budget.max_bytes
    budget.max_adapters, budget.max_bytes = max_adapters, max_bytes
    kept = [n for n in budget.recency if n in _protected(adapters)]
    if not budget.fits(kept):
        budget.max_adapters, budget.max_bytes = old
        raise BudgetError(
            f"limit(max_adapters={max_adapters}, max_bytes={max_bytes}): the loaded adapters that cannot be evicted "
            f"(active, pinned, merged or in an open per_sample block) are {kept}, "
            f"{budget.bytes_of(kept)} bytes; unpin or deactivate some first, or set a larger budget"
        )
    trim(adapters)


def pin(adapters: Adapters, name: str, pinned: bool) -> None:
    budget = adapters._record.budget
    if name in budget.entries:
        if pinned:
            budget.pinned.add(name)
        else:
            budget.pinned.discard(name)
    elif name not in adapters._adapters:
        adapters._get(name)  # the usual error for a name that is neither registered nor attached
    # else: an adapter added or loaded directly is outside the budget and never evicted anyway


# -- using -------------------------------------------------------------------
def use(adapters: Adapters, names: Any, *, replaces_active: bool = False) -> None:
    """Make the registered adapters among ``names`` resident: count hits, load misses, evict to make room.

    ``replaces_active``: the operation makes exactly ``names`` active (set_active), so the adapters
    active now need no room after it; :func:`trim` evicts them afterwards if the budget needs it.
    Names that are neither registered nor attached leave everything to the operation's own error.
    """
    from .model import BASE  # (model.py imports this module)

    budget = adapters._record.budget
    if not budget.entries:
        return
    if isinstance(names, str):
        if not replaces_active:
            return  # per_sample refuses a string (rows are a list); set_active takes one name as a string
        names = [names]
    elif not isinstance(names, (Sequence, set, frozenset)):
        return
    wanted = list(dict.fromkeys(n for n in names if isinstance(n, str) and n in budget.entries))
    if not wanted:
        return
    for name in names:
        if not isinstance(name, str) or (
            name not in budget.entries and name not in adapters._adapters and name != BASE
        ):
            adapters._get(name)  # the usual error for an unknown name, before anything loads
    misses = [n for n in wanted if n not in adapters._adapters]
    stay = [n for n in budget.recency if n not in wanted and n in _protected(adapters, active=not replaces_active)]
    if not budget.fits(stay + wanted):
        raise BudgetError(
            f"{budget.describe()} cannot hold the adapters this call needs: {wanted} "
            f"({budget.bytes_of(wanted)} bytes) beside {stay or 'none'}, which cannot be evicted (active, pinned, "
            "merged or named by an open per_sample block); use fewer adapters at once, or raise the budget with limit()"
        )
    if misses and adapters._merged:
        raise AdapterStateError(
            f"cannot load the registered adapters {misses} while {adapters._merged} are merged; unmerge() first"
        )
    for name in wanted:  # in the order named: the last named is the most recently used
        if name in budget.recency:
            budget.hits += 1
            budget.recency.move_to_end(name)
            continue
        entry = budget.entries[name]
        _make_room(adapters, entry.nbytes, keep=wanted)
        budget.misses += 1
        _load(adapters, name, entry)
        budget.loads += 1
        budget.recency[name] = None
    trim(adapters, keep=wanted)
    if not budget.fits(stay + wanted):  # loaded larger than their files said (another dtype): take them back out
        for name in misses:
            adapters._unload(name)
            del budget.recency[name]
        raise BudgetError(
            f"{budget.describe()} cannot hold {wanted}: loaded, they take {budget.bytes_of(wanted)} bytes "
            f"beside {stay or 'none'} ({budget.bytes_of(stay)} bytes), which cannot be evicted; raise max_bytes"
        )


def _load(adapters: Adapters, name: str, entry: _Entry) -> None:
    method, config, tensors = adapters._read(
        entry.folder, name, config=entry.config, method=entry.method.name, allow_nonfinite=entry.allow_nonfinite
    )
    adapters._attach(
        name,
        method,
        config,
        state_dict=tensors,
        trainable=False,
        autocast_adapter_dtype=entry.autocast_adapter_dtype,
        activate=False,
    )
    entry.nbytes = _loaded_bytes(adapters, name)


def _loaded_bytes(adapters: Adapters, name: str) -> int:
    """What adapter ``name`` holds in memory now (its tensors may differ in dtype from the file's)."""
    tensors = adapters._call(adapters._adapters[name].method, "adapterkit_extract_state", name=name)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _make_room(adapters: Adapters, nbytes: int, keep: Sequence[str]) -> None:
    """Evict until one more adapter of ``nbytes`` fits, as far as evictable adapters allow."""
    budget = adapters._record.budget

    def room() -> bool:
        return (budget.max_adapters is None or len(budget.recency) + 1 <= budget.max_adapters) and (
            budget.max_bytes is None or budget.bytes_of(budget.recency) + nbytes <= budget.max_bytes
        )

    _evict_until(adapters, room, keep)


def trims(function: F) -> F:
    """Decorate an operation of :class:`Adapters` that may leave loaded adapters evictable (set_active
    deactivates some): afterwards, also after a failure, evict what the budget no longer holds."""

    @functools.wraps(function)
    def trimmed(self: Adapters, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(self, *args, **kwargs)
        finally:
            trim(self)

    return trimmed  # type: ignore[return-value]


def trim(adapters: Adapters, keep: Sequence[str] = ()) -> None:
    """Evict the least recently used evictable adapters until the budget holds (as far as they allow)."""
    budget = adapters._record.budget
    _evict_until(adapters, lambda: budget.fits(list(budget.recency)), keep)


def _evict_until(adapters: Adapters, done: Any, keep: Sequence[str]) -> None:
    budget = adapters._record.budget
    if done():
        return
    protected = _protected(adapters) | set(keep)
    for name in [n for n in budget.recency if n not in protected]:
        adapters._unload(name)
        del budget.recency[name]
        budget.evictions += 1
        if done():
            return


def _protected(adapters: Adapters, *, active: bool = True) -> set[str]:
    """Loaded adapters that are never evicted: pinned, active, merged, or named by an open per_sample block."""
    budget = adapters._record.budget
    return budget.pinned | set(adapters._active if active else ()) | set(adapters._merged) | adapters._blocks.named()


# -- swapping, forgetting ----------------------------------------------------
def before_swap(adapters: Adapters, name: str, source_or_state_dict: Any, load_kwargs: dict[str, Any]) -> _Entry | None:
    """Before ``swap``: for a registered adapter, read the new source as :func:`register` would (its typed
    errors come before anything changes) and load the adapter if it is not loaded. Returns the new entry."""
    budget = adapters._record.budget
    old = budget.entries.get(name)
    entry = None
    if old is not None:
        if isinstance(source_or_state_dict, Mapping):
            raise AdapterStateError(
                f"adapter {name!r} is registered: the budget reloads it from its files after an eviction, so it "
                "swaps only from a folder or Hub repo; save the state dict and swap from that folder, or delete() and load()"
            )
        kwargs = dict(load_kwargs)
        config, method = kwargs.pop("config", None), kwargs.pop("method", None)
        allow_nonfinite = kwargs.pop("allow_nonfinite", old.allow_nonfinite)
        kwargs.pop("allow_pickle", None)
        entry = _read_entry(
            adapters, source_or_state_dict, name, where=kwargs, config=config, method=method, operation="swap"
        )
        entry.allow_nonfinite, entry.autocast_adapter_dtype = bool(allow_nonfinite), old.autocast_adapter_dtype
    use(adapters, [name])
    return entry


def after_swap(adapters: Adapters, name: str, entry: _Entry | None) -> None:
    """After ``swap`` of a registered adapter: it reloads from the new source from now on."""
    if entry is None:
        return
    entry.nbytes = _loaded_bytes(adapters, name)
    adapters._record.budget.entries[name] = entry
    trim(adapters, keep=[name])


def forget(adapters: Adapters, name: Any) -> bool:
    """Drop the registration of ``name`` unless it is loaded; True when it was registered and not loaded."""
    budget = adapters._record.budget
    if not isinstance(name, str) or name not in budget.entries or name in adapters._adapters:
        return False
    del budget.entries[name]
    budget.pinned.discard(name)
    budget.recency.pop(name, None)
    return True


def refuse_registered(adapters: Adapters, name: str) -> None:
    """For operations that need a loaded adapter: a registered one that is not loaded gets its own error."""
    if name in adapters._record.budget.entries and name not in adapters._adapters:
        raise AdapterStateError(
            f"adapter {name!r} is registered but not loaded now (not used yet, or evicted); set_active, per_sample "
            "and swap load it, other operations need it loaded"
        )


def stats(adapters: Adapters) -> BudgetStats:
    budget = adapters._record.budget
    return BudgetStats(
        hits=budget.hits,
        misses=budget.misses,
        evictions=budget.evictions,
        loads=budget.loads,
        resident=len(budget.recency),
        bytes_resident=budget.bytes_of(budget.recency),
        registered=len(budget.entries),
        max_adapters=budget.max_adapters,
        max_bytes=budget.max_bytes,
    )
