"""LoRA for adapterkit, through peft's LoRA layers (``lora[r=8, target_modules=[...]]``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from adapterkit import ConfigValueError, UnsupportedOperationError, hookimpl
from adapterkit.peft_glue import PeftMethod, check_rows
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from torch import nn

__all__ = ["LoraMethod", "plugin"]


class LoraMethod(PeftMethod):
    """peft LoRA, plus per-sample routing through peft's mixed-batch forward."""

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
    def adapterkit_per_sample(self, model: nn.Module, method: str, rows: Sequence[str]) -> Any:
        return self._per_sample(model, list(rows))

    @contextlib.contextmanager
    def _per_sample(self, model: nn.Module, rows: list[str]) -> Iterator[None]:
        dora = sorted({row for layer in self.layers(model) for row in rows if layer.use_dora.get(row, False)})
        if dora:
            raise UnsupportedOperationError(f"per_sample does not support DoRA adapters ({dora}); peft cannot mix them")

        def route(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            check_rows(rows, len(args[0]) if args else len(next(iter(kwargs.values()))))
            return args, {**kwargs, "adapter_names": rows}

        handles = [layer.register_forward_pre_hook(route, with_kwargs=True) for layer in self.layers(model)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


plugin = LoraMethod(
    "lora",
    LoraConfig,
    LoraModel,
    aliases=("LORA",),
    description="Low-rank adaptation (peft LoRA layers; DoRA and rsLoRA options included)",
    direct_load=True,
)
