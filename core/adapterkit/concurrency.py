"""One model, several threads: the per-model lock and the per_sample blocks open on a model.

The thread model (docs/guarantees.md, "Threads"):

* Every operation of one :class:`~adapterkit.Adapters` runs under that object's re-entrant
  lock (:attr:`Adapters.lock`): operations from several threads on one model run one after
  the other, each seeing the state the previous one left. Different models do not share a lock.
* A forward never takes the lock. It runs beside operations on the same model that leave
  what it computes alone (loading with ``activate=False``, swapping or deleting an inactive
  adapter, saving). Operations that change what the active adapters compute (``set_active``,
  ``enable``/``disable``, ``merge``/``unmerge``, activating loads, swaps and deletes of active
  adapters) pass the model's :class:`ForwardGate`: they wait for the forwards other threads
  have in flight and hold new ones back while they write, so a forward sees each of them
  whole or not at all.
* A ``per_sample`` block holds the lock only while it sets its routing up and while it takes it
  down; its routing acts only in the thread that opened it. While it is open, operations that
  would pull the ground from under its forwards (merging, disabling, deleting an adapter its
  rows name, adding or loading an adapter, which becomes active) raise
  :class:`~adapterkit.AdapterStateError`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import AdapterStateError

__all__ = ["ForwardGate", "OpenBlocks", "gate", "serialised"]

F = TypeVar("F", bound=Callable[..., Any])


def serialised(function: F) -> F:
    """Run a method of :class:`~adapterkit.Adapters` under the object's lock."""

    @functools.wraps(function)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        lock = self.lock
        if not lock.acquire(blocking=False):
            _wait_for(lock, self.model, function.__name__)
        try:
            return function(self, *args, **kwargs)
        finally:
            lock.release()

    return locked  # type: ignore[return-value]


def _wait_for(lock: Any, model: nn.Module, operation: str) -> None:
    """Acquire ``lock``, or raise if the thread holding it waits for a forward this thread is inside (a deadlock)."""
    found = model.__dict__.get(_GATE_ATTR)
    while not lock.acquire(timeout=0.05):
        if found is not None and found.waits_for(threading.get_ident()):
            raise AdapterStateError(
                f"cannot run {operation}() inside a forward of this model while another thread's operation waits "
                "for that forward to finish (each would wait for the other); call it outside the forward"
            )


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


# -- the forward gate ----------------------------------------------------------------

_GATE_ATTR = "_adapterkit_gate"


class ForwardGate:
    """Forwards in flight on one model, and a writer that waits for them (see :func:`gate`).

    A forward of the root model enters in its forward pre-hook and leaves in an ``always_call``
    forward hook (also when it raises). An operation that changes what forwards compute
    (:meth:`closed`) waits until no other thread has a forward in flight and holds new ones
    back while it writes: every forward sees the state before or after it, never half of each.
    Forwards of the writing thread itself (an operation run inside a forward hook) pass, and a
    thread's nested forwards of the same model count once. Copies and pickles get a new gate.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._running: dict[int, int] = {}  # thread id -> forwards of this model it is inside
        self._writer: int | None = None
        self._writes = 0  # the writer's nesting depth

    def __reduce__(self) -> Any:
        return ForwardGate, ()

    def __deepcopy__(self, memo: dict[int, Any]) -> ForwardGate:
        return ForwardGate()

    def enter(self) -> None:
        me = threading.get_ident()
        with self._condition:
            depth = self._running.get(me, 0)
            if depth == 0:
                while self._writer is not None and self._writer != me:
                    self._condition.wait()
            self._running[me] = depth + 1

    def leave(self) -> None:
        me = threading.get_ident()
        with self._condition:
            depth = self._running.get(me, 0)
            if depth <= 1:
                # (0: a forward that began before the gate's hooks were installed)
                self._running.pop(me, None)
                self._condition.notify_all()
            else:
                self._running[me] = depth - 1

    def waits_for(self, thread: int) -> bool:
        """Whether another thread holds the gate and waits for forwards ``thread`` is inside."""
        with self._condition:
            return self._writer not in (None, thread) and thread in self._running

    @contextlib.contextmanager
    def closed(self) -> Iterator[None]:
        """Inside the block no forward of another thread is in flight, and none starts."""
        me = threading.get_ident()
        with self._condition:
            if self._writer != me:
                while self._writer is not None:
                    self._condition.wait()
                self._writer = me  # from now on, new forwards of other threads wait
                while any(thread != me for thread in self._running):
                    self._condition.wait()
            self._writes += 1
        try:
            yield
        finally:
            with self._condition:
                self._writes -= 1
                if not self._writes:
                    self._writer = None
                    self._condition.notify_all()


# torch.compile must not trace into the gate (a graph break inside the compiled graph, or guards on
# its state): the hooks run outside any graph, before and after it.
@torch.compiler.disable
def _enter(module: nn.Module, args: Any) -> None:
    found = module.__dict__.get(_GATE_ATTR)
    if found is not None:
        found.enter()


@torch.compiler.disable
def _leave(module: nn.Module, args: Any, output: Any) -> None:
    found = module.__dict__.get(_GATE_ATTR)
    if found is not None:
        found.leave()


def gate(model: nn.Module) -> ForwardGate:
    """The forward gate of ``model``, installed on first use: a forward pre-hook and an ``always_call``
    forward hook on ``model`` itself (module-level functions that find the gate on the module they
    run for, so copies and pickles of the model keep working and count their own forwards)."""
    found = model.__dict__.get(_GATE_ATTR)
    if found is None:
        candidate = ForwardGate()
        found = model.__dict__.setdefault(_GATE_ATTR, candidate)
        if found is candidate:  # two threads attaching at once install the hooks once
            # First among the pre-hooks, so that it has entered whatever the others do.
            model.register_forward_pre_hook(_enter, prepend=True)
            model.register_forward_hook(_leave, always_call=True)
    return found
