"""Helpers for per-sample routing (:func:`adapterkit_per_sample` implementations of any method).

A plugin's per-sample context manager usually shadows the ``forward`` of its
layers for the length of the block (:func:`replaced_forwards`) and checks each
batch against the row names (:func:`check_rows`). Routing acts only in the thread
that opened the block: other threads' forwards on the same model compute the
active adapters as usual (hooks: :func:`this_thread_only`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn

from .errors import PerSampleError

__all__ = ["check_rows", "replaced_forwards", "this_thread_only"]

_UNSET = object()


def check_rows(rows: Sequence[str], batch: int) -> None:
    """Raise :class:`~adapterkit.PerSampleError` unless there is one row name per batch row."""
    if batch != len(rows):
        raise PerSampleError(
            f"per_sample was given {len(rows)} row names but the batch has {batch} rows; "
            "pass one adapter name (or '__base__') per row"
        )


@contextlib.contextmanager
def replaced_forwards(layers: Sequence[nn.Module], make_forward: Callable[[nn.Module], Any]) -> Iterator[None]:
    """Inside the block, forwards of each layer *in this thread* run ``make_forward(layer)`` (per-sample routing).

    Other threads' forwards of the same layers run as before, and blocks opened by several
    threads at once (or nested in one) each see their own routing. A layer hooked by
    accelerate keeps its own forward as ``_old_forward`` and calls it between the hook's pre-
    and post-forward (which load offloaded weights): that one is replaced, so the hook still
    runs. When the last block on a layer exits, whatever was there before is put back.
    """
    me = threading.get_ident()
    entered: list[tuple[nn.Module, str, _ThreadRouted]] = []
    try:
        for layer in layers:
            attr = "_old_forward" if "_old_forward" in layer.__dict__ else "forward"
            routed = layer.__dict__.get(attr, _UNSET)
            if not isinstance(routed, _ThreadRouted):
                # An instance attribute shadows the class's forward for this layer only, until restored below.
                routed = layer.__dict__[attr] = _ThreadRouted(layer, routed)
            routed.routes.setdefault(me, []).append(make_forward(layer))
            entered.append((layer, attr, routed))
        yield
    finally:
        for layer, attr, routed in reversed(entered):
            mine = routed.routes[me]
            mine.pop()
            if not mine:
                del routed.routes[me]
            if not routed.routes and layer.__dict__.get(attr) is routed:
                if routed.previous is _UNSET:
                    layer.__dict__.pop(attr, None)
                else:
                    layer.__dict__[attr] = routed.previous


class _ThreadRouted:
    """A layer's forward while per-sample blocks are open on it: each thread's own routing, or the usual forward."""

    def __init__(self, layer: nn.Module, previous: Any) -> None:
        self.layer = layer
        self.previous = previous  # the instance attribute it shadows, or _UNSET for the class's forward
        self.routes: dict[int, list[Callable[..., Any]]] = {}  # thread id -> routed forwards, innermost last

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        mine = self.routes.get(threading.get_ident())
        if mine:
            return mine[-1](*args, **kwargs)
        if self.previous is _UNSET:
            return type(self.layer).forward(self.layer, *args, **kwargs)
        return self.previous(*args, **kwargs)


def this_thread_only(hook: Callable[..., Any]) -> Callable[..., Any]:
    """A forward (pre-)hook that acts in the calling thread only, for routing installed as hooks.

    Register the returned function with ``register_forward_pre_hook``; in other threads it
    returns ``None`` (the hook changes nothing there).
    """
    owner = threading.get_ident()

    def guarded(*args: Any, **kwargs: Any) -> Any:
        return hook(*args, **kwargs) if threading.get_ident() == owner else None

    return guarded
