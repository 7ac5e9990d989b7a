"""A LoRA variant as a third party would ship it: its own LoraConfig subclass and layer class, on adapterkit_peft.

``GainLoraConfig`` adds one field, ``lora_gain``, which multiplies the LoRA delta; its peft
flow (``get_peft_model(model, GainLoraConfig(...))``) saves ``peft_type: LORA`` like plain LoRA.
The plugin is the config, the layer class, and a few lines: a :class:`~adapterkit_peft.PeftMethod`
that claims the saved adapters whose config carries ``lora_gain``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from adapterkit import hookimpl
from adapterkit_peft import PeftMethod
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraModel
from torch import nn


# --8<-- [start:plugin]
class GainLoraLinear(LoraLinear):
    """A LoRA linear layer whose delta is multiplied by the config's ``lora_gain``."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: Any, **kwargs: Any) -> None:
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        self.scaling[adapter_name] *= config.lora_gain


@dataclasses.dataclass
class GainLoraConfig(LoraConfig):
    lora_gain: float = dataclasses.field(default=2.0, metadata={"help": "factor on the LoRA delta"})

    def __post_init__(self) -> None:
        super().__post_init__()
        # peft's hook for LoRA layers of one's own: not a field, so it is set again on every construction.
        self._register_custom_module({nn.Linear: GainLoraLinear})


class GainLoraMethod(PeftMethod):
    @hookimpl
    def adapterkit_claim_checkpoint(self, config: dict[str, Any], metadata: dict[str, str], keys: list[str]) -> str | None:
        return self.name if config.get("peft_type") == "LORA" and "lora_gain" in config else None


plugin = GainLoraMethod("gain_lora", GainLoraConfig, LoraModel, description="LoRA with a gain", direct_load=True)
# --8<-- [end:plugin]
