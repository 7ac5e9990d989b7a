"""One model, several threads: the per-model lock and the per_sample blocks open on a model.

The thread model (docs/guarantees.md, "Threads"):

* Every operation of one :class:`~adapterkit.Adapters` runs under that object's re-entrant
  lock (:attr:`Adapters.lock`): operations from several threads on one model run one after
  the other, each seeing the state the previous one left. Different models do not share a lock.
* A forward never takes the lock. It runs beside operations on the same model.
* A ``per_sample`` block holds the lock only while it sets its routing up and while it takes it
  down; its routing acts only in the thread that opened it. While it is open, operations that
  would pull the ground from under its forwards (merging, disabling, deleting an adapter its
  rows name, adding or loading an adapter, which becomes active) raise
  :class:`~adapterkit.AdapterStateError`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from .errors import AdapterStateError

__all__ = ["OpenBlocks", "serialised"]

F = TypeVar("F", bound=Callable[..., Any])


def serialised(function: F) -> F:
    """Run a method of :class:`~adapterkit.Adapters` under the object's lock."""

    @functools.wraps(function)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return function(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


class OpenBlocks:
    """The ``per_sample`` blocks open on one model, in any thread (changed under the model's lock)."""

    def __init__(self) -> None:
        self._blocks: dict[object, tuple[str, list[str]]] = {}

    def __bool__(self) -> bool:
        return bool(self._blocks)

    def open(self, rows: Sequence[str]) -> object:
        token = object()
        self._blocks[token] = (threading.current_thread().name, list(rows))
        return token

    def close(self, token: object) -> None:
        self._blocks.pop(token, None)

    def named(self) -> set[str]:
        """The adapter names the open blocks' rows name."""
        return {row for _, rows in self._blocks.values() for row in rows}

    def refuse(self, operation: str, names: Iterable[str] | None = None) -> None:
        """Raise :class:`AdapterStateError` if a block is open (and, given ``names``, its rows name one of them)."""
        wanted = None if names is None else set(names)
        for thread, rows in self._blocks.values():
            if wanted is None or wanted & set(rows):
                raise AdapterStateError(
                    f"cannot {operation} while a per_sample block is open on this model (thread {thread!r}, "
                    f"rows {rows[:8]}{'...' if len(rows) > 8 else ''}); wait until the block exits"
                )
