"""LoRA for adapterkit, through peft's LoRA layers (``lora[r=8, target_modules=[...]]``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from adapterkit import ConfigValueError, UnsupportedOperationError, hookimpl
from adapterkit.routing import check_rows, replaced_forwards, this_thread_only
from adapterkit_peft import PeftMethod, banks, check_rows_biases, has_adapter, routed_heads
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention
from peft.tuners.lora.layer import ParamWrapper
from torch import nn
from torch.nn import functional as F

from .combine import combine

__all__ = ["LoraMethod", "plugin"]


class LoraMethod(PeftMethod):
    """peft LoRA, plus per-sample routing: a grouped forward for plain LoRA linear layers, peft's otherwise."""

    def file_key(self, suffix: str) -> str:
        # peft saves DoRA's magnitude without the ".weight" its module now has.
        return suffix.removesuffix(".weight") if suffix.startswith("lora_magnitude_vector.") else suffix

    @hookimpl
    def adapterkit_validate_config(self, method: str, config: Any) -> None:
        super().adapterkit_validate_config(method, config)
        for key, kind, check in (
            ("rank_pattern", "a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
            ("alpha_pattern", "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
        ):
            for pattern, value in (getattr(config, key, None) or {}).items():
                if not check(value):
                    raise ConfigValueError(
                        f"{method} config key {key!r} maps {pattern!r} to {value!r}; each value must be {kind}, "
                        f"e.g. {key}={{{pattern!r}: 8}}"
                    )

    @hookimpl
    def adapterkit_inject(
        self, model: nn.Module, method: str, name: str, config: Any, empty: bool, autocast_adapter_dtype: bool = True
    ) -> None:
        super().adapterkit_inject(model, method, name, config, empty, autocast_adapter_dtype)
        for layer in self.layers(model):
            if isinstance(layer, LoraMultiheadAttention) and "forward" not in layer.__dict__:
                layer.__dict__["forward"] = _ExactBaseForward(layer)

    @hookimpl
    def adapterkit_combine(
        self,
        model: nn.Module,
        method: str,
        names: Sequence[str],
        weights: Sequence[float],
        how: str,
        options: dict[str, Any],
    ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        return combine(self, model, names, weights, how, options)

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
        # Prepared for compiled switching: every layer reads each row's slot from the banks (see banks.py).
        check_rows_biases(model, self.name, rows)
        with banks.per_sample(model, self.name, rows), routed_heads(model, rows):
            yield

    @contextlib.contextmanager
    def _per_sample(self, model: nn.Module, rows: list[str]) -> Iterator[None]:
        named = [row for row in dict.fromkeys(rows) if row != "__base__"]
        layers, idle = [], []
        for layer in self.layers(model):
            (layers if any(has_adapter(layer, row) for row in named) else idle).append(layer)
        dora = sorted({row for layer in layers for row in rows if layer.use_dora.get(row, False)})
        if dora:
            raise UnsupportedOperationError(f"per_sample does not support DoRA adapters ({dora}); peft cannot mix them")
        for kind, why in (
            (LoraMultiheadAttention, "it merges the adapter into the attention weights for each call"),
            (ParamWrapper, "an adapted nn.Parameter (target_parameters) is one weight for the whole batch"),
        ):
            found = [layer for layer in layers if isinstance(layer, kind)]
            if found:
                held = sorted({row for layer in found for row in named if has_adapter(layer, row)})
                raise UnsupportedOperationError(
                    f"per_sample cannot route LoRA adapters {held} on a peft {kind.__name__} layer: {why}; "
                    "run their rows as batches of their own with set_active"
                )
        check_rows_biases(model, self.name, rows)
        with (
            # Layers that hold none of the rows' adapters compute the base layer for every row.
            replaced_forwards(idle, lambda layer: layer.base_layer),
            self._routed(layers, rows),
            routed_heads(model, rows),
        ):
            yield

    @contextlib.contextmanager
    def _routed(self, layers: list[nn.Module], rows: list[str]) -> Iterator[None]:
        groups = _row_groups(rows)
        grouped = [layer for layer in layers if _GroupedForward.fits(layer, groups)]
        chosen = set(map(id, grouped))

        def route(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            check_rows(rows, len(args[0]) if args else len(next(iter(kwargs.values()))))
            return args, {**kwargs, "adapter_names": rows}

        # Other layers (embeddings, convolutions, LoRA variants, training-mode dropout) take peft's mixed-batch path.
        hook = this_thread_only(route)  # other threads' forwards keep the active adapters
        handles = [
            layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers if id(layer) not in chosen
        ]
        try:
            with replaced_forwards(grouped, lambda layer: _GroupedForward(layer, rows, groups)):
                yield
        finally:
            for handle in handles:
                handle.remove()


class _ExactBaseForward:
    """peft's MultiheadAttention LoRA forward, with the base weights put back exactly afterwards.

    peft's layer merges its adapters into the attention weights for each call and subtracts them
    again after, registering the result as new parameters: the base weights move by float rounding
    on the first call. The layer's original parameter objects (never written by that merge) are
    put back instead, so disable(), delete() and the base rows compute the base model exactly.
    """

    def __init__(self, layer: LoraMultiheadAttention) -> None:
        self.layer = layer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        layer = self.layer
        if layer.merged:  # merged by adapterkit's merge(): peft's forward leaves the weights alone
            return type(layer).forward(layer, *args, **kwargs)
        attention = layer.get_base_layer()
        owners = [(attention, "in_proj_weight"), (attention.out_proj.get_base_layer(), "weight")]
        kept = [(owner, attr, owner._parameters.get(attr)) for owner, attr in owners]
        try:
            return type(layer).forward(layer, *args, **kwargs)
        finally:
            if not layer.merged:
                for owner, attr, param in kept:
                    if param is not None and attr in owner._parameters:
                        owner._parameters[attr] = param


def _row_groups(rows: Sequence[str]) -> list[tuple[str, slice | torch.Tensor]]:
    """Each adapter named in ``rows`` (``__base__`` aside) with its rows: a slice when they are contiguous."""
    positions: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        if row != "__base__":
            positions.setdefault(row, []).append(index)
    return [
        (name, slice(found[0], found[-1] + 1) if found[-1] - found[0] + 1 == len(found) else torch.tensor(found))
        for name, found in positions.items()
    ]


class _GroupedForward:
    """A plain LoRA linear layer's per-sample forward: one pass per adapter over its rows.

    The arithmetic of peft's ``Linear._mixed_batch_forward`` (``base(x)``, then for each
    adapter ``result[rows] += B(A(x[rows])) * scaling``), with the row groups and the
    adapters' modules looked up once per ``per_sample`` block instead of in every layer
    call, rows that sit together taken as views, and no module calls for the two matmuls.
    """

    def __init__(self, layer: LoraLinear, rows: list[str], groups: list[tuple[str, slice | torch.Tensor]]) -> None:
        self.layer, self.rows = layer, rows
        # Modules, not weights: accelerate swaps the weights of offloaded layers in for each call.
        self.parts = [
            (index, layer.lora_A[name], layer.lora_B[name], layer.scaling[name])
            for name, index in groups
            if name in layer.lora_A
        ]

    @staticmethod
    def fits(layer: nn.Module, groups: list[tuple[str, slice | torch.Tensor]]) -> bool:
        """Whether the grouped forward computes what peft's mixed-batch forward would for this layer."""
        if type(layer) is not LoraLinear or layer.disable_adapters or layer.merged:
            return False
        for name, _ in groups:
            if name not in layer.lora_A:
                continue
            dropout = layer.lora_dropout[name]
            if (
                name in layer.lora_variant
                or layer.lora_A[name].bias is not None
                or layer.lora_B[name].bias is not None
                or (dropout.training and not isinstance(dropout, nn.Identity))
            ):
                return False
        return True

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        check_rows(self.rows, len(x))
        result = self.layer.base_layer(x, *args, **kwargs)
        for index, lora_a, lora_b, scaling in self.parts:
            a = lora_a.weight
            low_rank = F.linear(F.linear(x[index].to(a.dtype), a), lora_b.weight) * scaling
            result[index] += low_rank.to(result.dtype)
        return result


plugin = LoraMethod(
    "lora",
    LoraConfig,
    LoraModel,
    aliases=("LORA",),
    description="Low-rank adaptation (peft LoRA layers; DoRA and rsLoRA options included)",
    direct_load=True,
)
