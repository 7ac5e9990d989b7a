"""The IA3 plugin passes the conformance suite every method plugin runs."""

from adapterkit.testing import MethodContract


class TestIA3Contract(MethodContract):
    config = "ia3[target_modules=['fc1', 'fc2'], feedforward_modules=['fc2'], init_ia3_weights=False]"
    supports_merge = True
    supports_per_sample = True
