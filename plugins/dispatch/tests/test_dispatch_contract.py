"""The conformance suite with adapterkit-dispatch installed: it adds CPU and disk offload to every method's contract."""

from adapterkit.testing import MethodContract


class TestLoraContractWithDispatch(MethodContract):
    config = "lora[r=2, lora_alpha=4, target_modules=['fc1', 'fc2'], init_lora_weights=False]"
    supports_merge = True
    supports_per_sample = True


class TestIA3ContractWithDispatch(MethodContract):
    config = "ia3[target_modules=['fc1', 'fc2'], feedforward_modules=['fc2'], init_ia3_weights=False]"
    supports_merge = True
    supports_per_sample = True
