"""The core installed with no method plugin: it imports, lists nothing, and points to the plugins."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import make_mlp, mlp_input, run
from toy_plugin import ScalePlugin

import adapterkit


def test_no_plugin_and_no_peft_is_installed():
    assert adapterkit.available_methods() == {}
    assert importlib.util.find_spec("peft") is None
    assert importlib.util.find_spec("adapterkit_lora") is None


@pytest.mark.parametrize(("method", "dist"), [("lora", "adapterkit-lora"), ("ia3", "adapterkit-ia3"), ("AdaLoRA", "adapterkit-adalora")])
def test_every_method_request_names_its_distribution(method, dist):
    with pytest.raises(adapterkit.UnknownMethodError) as info:
        adapterkit.parse_config(f"{method}[r=8]")
    assert f"installed methods: none. Install it with: pip install {dist}" in str(info.value)
    model = make_mlp()
    with pytest.raises(KeyError, match=dist):
        adapterkit.attach(model).add({"method": method})


def test_a_native_plugin_works_with_the_core_alone(tmp_path):
    pm = adapterkit.make_plugin_manager()
    pm.register(ScalePlugin(), name="toy")
    registry = adapterkit.MethodRegistry(pm)
    model, x = make_mlp(), mlp_input()
    base = run(model, x)
    adapters = adapterkit.attach(model, registry)
    adapters.add("scale[target_modules=['head'], init=0.5]")
    assert torch.allclose(run(model, x), base * 0.5)
    adapters.save(tmp_path)
    other = make_mlp()
    adapterkit.attach(other, registry).load(tmp_path)
    assert torch.equal(run(other, x), run(model, x))
    adapters.delete("default")
    assert torch.equal(run(model, x), base)
