"""The AdaLoRA plugin passes the conformance suite every method plugin runs."""

from adapterkit.testing import MethodContract


class TestAdaLoraContract(MethodContract):
    config = "adalora[init_r=4, target_r=2, total_step=10, target_modules=['fc1', 'fc2'], init_lora_weights=False]"
    supports_merge = True
    supports_per_sample = True
