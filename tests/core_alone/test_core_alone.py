"""The core installed with no method plugin: it imports, lists nothing, and points to the plugins."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_mlp, mlp_input, run
from toy_plugin import ScalePlugin

import adapterkit


def test_no_plugin_is_installed_and_the_core_needs_no_peft():
    assert adapterkit.available_methods() == {}
    assert importlib.util.find_spec("adapterkit_lora") is None
    assert importlib.util.find_spec("adapterkit_peft") is None
    requires = [r for r in importlib.metadata.requires("adapterkit") or [] if "extra ==" not in r]
    assert not [r for r in requires if r.lower().startswith(("peft", "transformers"))], requires


def test_the_whole_core_api_never_imports_peft(tmp_path):
    """peft is installed in this env (tox.ini) only so that this can fail: the core must never import it."""
    assert importlib.util.find_spec("peft") is not None, "install peft beside the core for this test to mean anything"
    tests = Path(__file__).parents[1]
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tests)!r})
        import torch
        import adapterkit, adapterkit.cli, adapterkit.files, adapterkit.routing, adapterkit.testing
        from conftest import make_mlp, mlp_input
        from toy_plugin import ScalePlugin

        pm = adapterkit.make_plugin_manager()
        pm.register(ScalePlugin(), name="toy")
        registry = adapterkit.MethodRegistry(pm)
        model, x = make_mlp(), mlp_input()
        adapters = adapterkit.attach(model, registry)
        adapters.add("scale[target_modules=['head'], init=0.5]", "a")
        adapters.add({{"method": "scale", "target_modules": ["head"], "init": 2.0}}, "b")
        adapters.set_active(["a", "b"])
        with adapters.disabled():
            model(x)
        with adapters.per_sample(["a", "__base__", "b", "a", "b"]):
            model(x)
        adapters.save({str(tmp_path)!r})
        other = adapterkit.attach(make_mlp(), registry)
        other.load({str(tmp_path)!r}, "a", subfolder="a")
        other.state_dict("a")
        for bad in (lambda: adapters.merge(), lambda: adapters.dispatch("auto")):
            try:
                bad()
            except adapterkit.UnsupportedOperationError:
                pass
        adapterkit.format_config(adapters.config("a"), registry)
        adapterkit.available_methods()
        adapters.delete("b")
        leaked = sorted(m for m in sys.modules if m == "peft" or m.startswith(("peft.", "adapterkit_peft")))
        assert not leaked, leaked
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


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
