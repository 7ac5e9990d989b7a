"""Per-step training work of every method, through one API: :meth:`Adapters.training_step` and
:meth:`Adapters.regularization`.

A training loop (or adapterkit's Trainer integration, :mod:`adapterkit.trainer`) calls these two
for whatever methods the model carries, so it never names a method: AdaLoRA's rank allocation and
orthogonal regularisation run through the ``adapterkit_training_step`` and
``adapterkit_regularization`` hooks, and a method without per-step work simply leaves them out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import ArgumentValueError

if TYPE_CHECKING:
    from .model import Adapters
    from .registry import Method

__all__ = ["in_training", "regularization", "training_step"]


def in_training(adapters: Adapters) -> dict[Method, list[str]]:
    """The adapters being trained (trainable, active, adapters enabled), grouped by method."""
    if not adapters.enabled:
        return {}
    names = [name for name in adapters.active if adapters.trainable(name)]
    return adapters._by_method(names)


def training_step(adapters: Adapters, global_step: int) -> None:
    """See :meth:`Adapters.training_step`."""
    if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
        raise ArgumentValueError(f"training_step: global_step must be an integer >= 0 (the step from 0), got {global_step!r}")
    for method, names in in_training(adapters).items():
        if adapters.registry.implements(method, "adapterkit_training_step"):
            adapters._call(method, "adapterkit_training_step", names=names, global_step=global_step)


def regularization(adapters: Adapters) -> torch.Tensor:
    """See :meth:`Adapters.regularization`."""
    total: torch.Tensor | None = None
    for method, names in in_training(adapters).items():
        if not adapters.registry.implements(method, "adapterkit_regularization"):
            continue
        term = adapters._call(method, "adapterkit_regularization", names=names)
        if term is not None:
            total = term if total is None else total + term
    if total is None:
        param = next(adapters.model.parameters(), None)
        total = torch.zeros((), device=param.device if param is not None else None)
    return total
