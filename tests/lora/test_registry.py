"""Plugins: discovery by entry point, routing of per-method hooks, restriction by environment."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_mlp, mlp_input, run
from toy_plugin import ScaleConfig, ScalePlugin

import adapterkit
from adapterkit import MethodRegistry, PluginError, UnsupportedOperationError, make_plugin_manager


def test_lora_is_found_through_its_entry_point():
    method = adapterkit.available_methods()["lora"]
    assert method.distribution == "adapterkit-lora" and method.version
    assert method.aliases == ("LORA",) and method.plugin_name == "lora"
    assert adapterkit.default_registry().get("LoRa") is method


@pytest.fixture
def registry():
    """Entry-point plugins plus an in-process native method, as a third party would add one."""
    pm = make_plugin_manager()
    toy = ScalePlugin()
    pm.register(toy, name="toy")
    registry = MethodRegistry(pm)
    registry.toy = toy
    return registry


def test_two_methods_on_one_model_each_hook_reaches_only_its_owner(registry, tmp_path):
    model, x = make_mlp(), mlp_input()
    adapters = adapterkit.attach(model, registry)
    adapters.add("scale[target_modules=['head'], init=2.0]", "s")
    adapters.add("lora[r=2, target_modules=['blocks.0.0'], init_lora_weights=False]", "l")
    assert registry.toy.calls and all(method == "scale" for _, method in registry.toy.calls)
    adapters.set_active(["s", "l"])
    both = run(model, x)
    adapters.set_active(["l"])
    assert torch.allclose(both, run(model, x) * 2.0, atol=1e-6)
    adapters.save(tmp_path)
    assert set(adapters.state_dict("s")) == {"base_model.model.head.scale"}
    calls = len(registry.toy.calls)
    adapters.delete("l")
    assert len(registry.toy.calls) == calls + 1  # the set_active that follows; never the delete of "l"
    assert registry.toy.calls[-1] == ("set_active", "scale")


def test_missing_optional_hook_is_an_unsupported_operation(registry):
    model = make_mlp()
    adapters = adapterkit.attach(model, registry)
    adapters.add(ScaleConfig(target_modules=["head"]), "s")
    with pytest.raises(UnsupportedOperationError, match="'scale'.*does not support 'merge'"):
        adapters.merge()
    assert adapters.merged == []


def test_saved_native_adapter_claims_its_method(registry, tmp_path):
    model, x = make_mlp(), mlp_input()
    adapters = adapterkit.attach(model, registry)
    adapters.add("scale[target_modules=['head'], init=3.0]", "s")
    adapters.save(tmp_path)
    other = make_mlp()
    loaded = adapterkit.attach(other, registry)
    loaded.load(tmp_path / "s", "s")
    assert loaded.method("s").name == "scale"
    assert torch.equal(run(other, x), run(model, x))


def test_name_collision_is_a_plugin_error():
    pm = make_plugin_manager()

    class Impostor:
        @adapterkit.hookimpl
        def adapterkit_register_methods(self, register):
            register("Lora", ScaleConfig)

    pm.register(Impostor(), name="impostor")
    with pytest.raises(PluginError, match="'Lora', already taken by method 'lora'"):
        MethodRegistry(pm)


def test_a_registry_is_not_built_at_import():
    code = "import adapterkit, adapterkit.registry as r; print(r.default_registry.cache_info().currsize)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


@pytest.mark.parametrize("variable", ["ADAPTERKIT_PLUGINS", "ADAPTERKIT_BLOCK_PLUGINS"])
def test_environment_restricts_plugins(variable):
    installed = [m.plugin_name for m in adapterkit.available_methods().values()]
    env = {variable: "" if variable == "ADAPTERKIT_PLUGINS" else ",".join([*installed, "not-installed"])}
    code = textwrap.dedent(
        """
        import adapterkit
        print(sorted(adapterkit.available_methods()))
        try:
            adapterkit.parse_config("lora[r=8]")
        except adapterkit.UnknownMethodError as error:
            print(error)
        """
    )
    import os

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, **env}
    )
    lines = out.stdout.splitlines()
    assert lines[0] == "[]"
    assert "unknown adapter method 'lora'; installed methods: none. Install it with: pip install adapterkit-lora" in lines[1]


def test_allowlist_keeps_named_plugins():
    import os

    out = subprocess.run(
        [sys.executable, "-c", "import adapterkit; print(sorted(adapterkit.available_methods()))"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "ADAPTERKIT_PLUGINS": "lora"},
    )
    assert "'lora'" in out.stdout
