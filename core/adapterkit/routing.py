"""Helpers for per-sample routing (:func:`adapterkit_per_sample` implementations of any method).

A plugin's per-sample context manager usually shadows the ``forward`` of its
layers for the length of the block (:func:`replaced_forwards`) and checks each
batch against the row names (:func:`check_rows`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn

from .errors import PerSampleError

__all__ = ["check_rows", "replaced_forwards"]

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
    """Shadow each layer's ``forward`` with ``make_forward(layer)`` inside the block (per-sample routing).

    A layer hooked by accelerate keeps its own forward as ``_old_forward`` and
    calls it between the hook's pre- and post-forward (which load offloaded
    weights): that one is replaced, so the hook still runs, and whatever was
    there before is put back on exit.
    """
    replaced: list[tuple[nn.Module, str, Any]] = []
    try:
        for layer in layers:
            attr = "_old_forward" if "_old_forward" in layer.__dict__ else "forward"
            replaced.append((layer, attr, layer.__dict__.get(attr, _UNSET)))
            # An instance attribute shadows the class's forward for this layer only, until restored below.
            layer.__dict__[attr] = make_forward(layer)
        yield
    finally:
        for layer, attr, previous in reversed(replaced):
            if previous is _UNSET:
                layer.__dict__.pop(attr, None)
            else:
                layer.__dict__[attr] = previous
