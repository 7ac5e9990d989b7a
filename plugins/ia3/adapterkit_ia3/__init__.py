"""(IA)^3 for adapterkit, through peft's IA3 layers.

Config strings use the fields of peft's :class:`~peft.IA3Config`::

    adapters.add('ia3[target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]]')

``feedforward_modules`` works as in peft: the listed modules scale their
*input* (vector of size ``in_features``), every other target scales its
*output* (size ``out_features``). It must name a subset of ``target_modules``.
Left unset on a transformers model whose architecture peft knows (Llama, T5,
...), peft's defaults for that architecture fill in ``target_modules`` and
``feedforward_modules``; on any other model (a plain ``nn.Module``) an unset
``feedforward_modules`` is a :class:`~adapterkit.ConfigValueError` -- pass
``feedforward_modules=[]`` when no target is a feedforward layer.

Several active (IA)^3 adapters multiply their scaling vectors, as in peft.

.. warning::
   **Unmerging is approximate.** Merging multiplies the base weights (and, for
   non-feedforward layers, the base bias) by the scaling vector; unmerging
   divides by ``vector + 1e-8``, exactly as peft does. The restored weights
   differ from the originals by rounding error, and entries whose scale is 0
   (or very close to it) are not restored at all. peft warns "Unmerge result
   can be inaccurate for (IA)^3" on each unmerge. Keep a copy of the base
   weights if you need them bit-exact after ``merge()``/``unmerge()`` (or
   ``disable()``, which unmerges first).

Per-sample routing (``adapters.per_sample(rows)``) is supported: each batch row
is scaled by its own adapter's vector (rows of ``"__base__"`` or other
methods' adapters are left unscaled), which gives the same result as running
that row alone with only its adapter active.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from adapterkit import ConfigValueError, UnsupportedOperationError, hookimpl
from adapterkit.routing import check_rows, replaced_forwards
from adapterkit_peft import PeftMethod, banks, routed_heads
from peft import IA3Config
from peft.tuners.ia3 import IA3Model
from peft.tuners.ia3.layer import Linear as IA3Linear
from peft.tuners.ia3.layer import _ConvNd as IA3ConvNd
from torch import nn

from .combine import combine

__all__ = ["IA3Method", "plugin"]


def _as_set(value: Any) -> set[str] | None:
    if isinstance(value, (list, tuple, set, frozenset)):
        return set(value)
    return None


class IA3Method(PeftMethod):
    """peft (IA)^3. Unmerge is approximate (see the module docstring); per-sample routing included."""

    @hookimpl
    def adapterkit_validate_config(self, method: str, config: Any) -> None:
        super().adapterkit_validate_config(method, config)
        # peft checks this in IA3Config.__post_init__ only; a config object changed afterwards skips it.
        targets, feedforward = _as_set(config.target_modules), _as_set(config.feedforward_modules)
        if targets is not None and feedforward is not None and not feedforward <= targets:
            raise ConfigValueError(
                f"{method} config key 'feedforward_modules'={sorted(feedforward)!r} must be a subset of "
                f"'target_modules'={sorted(targets)!r}; {sorted(feedforward - targets)!r} are not targets"
            )

    @hookimpl
    def adapterkit_combine(
        self,
        model: nn.Module,
        method: str,
        names: Sequence[str],
        weights: Sequence[float],
        how: str,
        options: dict[str, Any],
    ) -> tuple[IA3Config, dict[str, torch.Tensor]]:
        return combine(self, model, names, weights, how, options)

    # -- per-sample routing ------------------------------------------------------
    @hookimpl
    def adapterkit_prepare_compiled(
        self, model: nn.Module, method: str, max_rank: int | None, targets: Sequence[str] | None, max_adapters: int | None
    ) -> None:
        self._prepare_compiled(model, max_rank, targets, max_adapters)

    @hookimpl
    def adapterkit_per_sample(self, model: nn.Module, method: str, rows: Sequence[str]) -> Any:
        if banks.prepared(model, self.name) is not None:
            return self._per_sample_banked(model, list(rows))
        return self._per_sample(model, list(rows))

    @contextlib.contextmanager
    def _per_sample_banked(self, model: nn.Module, rows: list[str]) -> Iterator[None]:
        # Prepared for compiled switching: every layer reads each row's vector from the banks (see banks.py).
        with banks.per_sample(model, self.name, rows), routed_heads(model, rows):
            yield

    @contextlib.contextmanager
    def _per_sample(self, model: nn.Module, rows: list[str]) -> Iterator[None]:
        layers = list(self.layers(model))
        supported = (IA3Linear, IA3ConvNd)
        unsupported = sorted({type(layer).__name__ for layer in layers if not isinstance(layer, supported)})
        if unsupported:
            raise UnsupportedOperationError(f"per_sample does not support (IA)^3 layers of type {unsupported}")
        with replaced_forwards(layers, lambda layer: _RoutedForward(layer, rows)), routed_heads(model, rows):
            yield


class _RoutedForward:
    """The forward of one (IA)^3 layer that scales batch row ``i`` by the vector of adapter ``rows[i]``."""

    def __init__(self, layer: IA3Linear | IA3ConvNd, rows: list[str]) -> None:
        self.layer = layer
        self.rows = rows

    def _scaling(self, batch: int, ndim: int) -> tuple[torch.Tensor | None, torch.dtype | None]:
        """Per-row scales shaped to broadcast against the (batch, ...) tensor they scale; None if no row is scaled."""
        layer, vectors = self.layer, self.layer.ia3_l
        check_rows(self.rows, batch)
        present = [row for row in dict.fromkeys(self.rows) if row in vectors]
        if not present:
            return None, None
        dtype = vectors[present[-1]].dtype
        if isinstance(layer, IA3Linear):
            # Linear vectors act on the last dimension: (batch, 1, ..., 1, features).
            flat = {name: vectors[name].flatten() for name in present}
            ones = torch.ones_like(next(iter(flat.values())))
            scales = torch.stack([flat.get(row, ones) for row in self.rows])
            return scales.reshape(batch, *([1] * (ndim - 2)), scales.shape[-1]), dtype
        # Conv vectors are (1, channels, 1, ...): one per row, concatenated along the batch dimension.
        ones = torch.ones_like(vectors[present[0]])
        return torch.cat([vectors[row] if row in vectors else ones for row in self.rows]), dtype

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        previous_dtype = x.dtype
        scaling, dtype = self._scaling(len(x), x.dim())
        if scaling is None:
            return layer.base_layer(x, *args, **kwargs)
        # The arithmetic (and dtype handling) of peft's IA3 forward with one active adapter, per row.
        if isinstance(layer, IA3Linear):
            if layer.is_feedforward:
                interm = (x.to(dtype) * scaling).to(previous_dtype)
                return layer.base_layer(interm, *args, **kwargs)
            result = layer.base_layer(x, *args, **kwargs)
            return (result * scaling).to(result.dtype)
        if layer.is_feedforward:
            interm = (x.to(dtype) * scaling).to(layer.get_base_layer().weight.dtype)
            result = layer.base_layer(interm, *args, **kwargs)
        else:
            result = layer.base_layer(x, *args, **kwargs).to(dtype) * scaling
        return result.to(previous_dtype)


plugin = IA3Method(
    "ia3",
    IA3Config,
    IA3Model,
    aliases=("IA3",),
    description="(IA)^3: learned scaling vectors on activations (peft IA3 layers; unmerge is approximate)",
    direct_load=True,
)
