"""adapterkit's conformance suite, run against the bottleneck method (installed through its entry point)."""

from __future__ import annotations

from adapterkit.testing import MethodContract


class TestBottleneckContract(MethodContract):
    config = 'bottleneck[bottleneck_dim=4, target_modules=["fc1", "fc2"]]'
    supports_merge = False  # nonlinear: merge() must raise UnsupportedOperationError
    supports_per_sample = True


class TestParallelBottleneckContract(MethodContract):
    """The other placement, another activation, a regex target and no biases."""

    config = "bottleneck[bottleneck_dim=3, placement='parallel', nonlinearity='tanh', bias=False, target_modules='fc[12]|head']"
    bad_targets_config = "bottleneck[bottleneck_dim=3, target_modules='nothing.*']"
    supports_merge = False
    supports_per_sample = True
