"""The LoRA plugin passes the conformance suite every method plugin runs."""

from adapterkit.testing import MethodContract


class TestLoraContract(MethodContract):
    config = "lora[r=2, lora_alpha=4, target_modules=['fc1', 'fc2'], init_lora_weights=False]"
    supports_merge = True
    supports_per_sample = True
