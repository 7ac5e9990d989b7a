"""The core's side of the serving API, for every method: load(activate=False), set_active(weights=), swap's
fallback (delete + load) for a plugin without ``adapterkit_swap``, and the typed refusals of combine and
prepare_compiled. Real LoRA adapters, and the toy scale method (tests/toy_plugin.py), which implements none
of the optional serving hooks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Fingerprint, make_mlp, mlp_input, run
from toy_plugin import ScalePlugin

import adapterkit
from adapterkit import (
    AdapterExistsError,
    AdapterNameError,
    AdapterStateError,
    ConfigValueError,
    MethodRegistry,
    UnsupportedOperationError,
    make_plugin_manager,
)

LORA = 'lora[r=2, target_modules=["0"], init_lora_weights=False]'
SCALE = {"method": "scale", "target_modules": ["head"], "init": 2.0}


def with_toy() -> adapterkit.Adapters:
    pm = make_plugin_manager()
    pm.register(ScalePlugin(), name="toy-scale")
    return adapterkit.attach(make_mlp(), MethodRegistry(pm))


def lora_model() -> tuple[adapterkit.Adapters, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).eval()
    adapters = adapterkit.attach(model)
    adapters.add(LORA, "a")
    adapters.add(LORA, "b")
    return adapters, torch.randn(4, 6)


# -- load(activate=False) ----------------------------------------------------------------------------------------
def test_load_without_activating_keeps_the_active_set_and_the_outputs(tmp_path):
    adapters, x = lora_model()
    adapters.save(tmp_path, ["b"])
    adapters.set_active(["a"])
    before = run(adapters.model, x)
    adapters.load(tmp_path / "b", "b2", activate=False)
    assert adapters.active == ["a"]
    assert torch.equal(run(adapters.model, x), before)
    assert not any(p.requires_grad for n, p in adapters.model.named_parameters() if ".b2." in n)
    adapters.set_active("b2")
    adapters.set_active("b")
    expected = run(adapters.model, x)
    adapters.set_active("b2")
    assert torch.equal(run(adapters.model, x), expected)


def test_load_without_activating_runs_beside_an_open_per_sample_block(tmp_path):
    adapters, x = lora_model()
    adapters.save(tmp_path, ["a"])
    with adapters.per_sample(["a", "b", "__base__", "a"]):
        mixed = run(adapters.model, x)
        with pytest.raises(AdapterStateError, match="activate=False"):
            adapters.load(tmp_path / "a", "refused")
        adapters.load(tmp_path / "a", "a2", activate=False)
        assert torch.equal(run(adapters.model, x), mixed)
    assert "a2" in adapters and "refused" not in adapters


# -- set_active(weights=) ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "weights, error, words",
    [
        ([1.0], ConfigValueError, "one weight per name"),
        ([1.0, "x"], ConfigValueError, "finite numbers"),
        ([1.0, math.nan], ConfigValueError, "finite numbers"),
        ([True, 1.0], ConfigValueError, "finite numbers"),
        ("11", ConfigValueError, "list of numbers"),
        ({"c": 2.0}, AdapterNameError, "not among the names"),
    ],
)
def test_bad_weights_are_typed_errors_and_change_nothing(weights, error, words):
    adapters, x = lora_model()
    adapters.set_active(["a"])
    fingerprint = Fingerprint(adapters.model, x)
    with pytest.raises(error, match=words):
        adapters.set_active(["a", "b"], weights=weights)
    assert adapters.active == ["a"]
    fingerprint.assert_same(adapters.model, x)


def test_a_method_without_weights_refuses_them_and_keeps_the_old_set():
    adapters = with_toy()
    adapters.add(SCALE, "s")
    adapters.add({**SCALE, "init": 3.0}, "t")
    x = mlp_input()
    before = run(adapters.model, x)
    with pytest.raises(UnsupportedOperationError, match="'scale'.*does not support weights"):
        adapters.set_active(["s", "t"], weights=[0.5, 1.0])
    assert adapters.active == ["t"]
    assert torch.equal(run(adapters.model, x), before)
    adapters.set_active(["s", "t"], weights={"s": 1.0})  # weight 1 is no weight: every method takes it
    assert adapters.active == ["s", "t"]


# -- swap ----------------------------------------------------------------------------------------------------------
def test_swap_without_the_plugins_help_replaces_the_weights_and_keeps_activity_and_trainability():
    adapters = with_toy()
    adapters.add(SCALE, "s")
    adapters.add({**SCALE, "init": 5.0}, "t")
    adapters.set_active(["s", "t"])
    x = mlp_input()
    new = {key: torch.full_like(value, 7.0) for key, value in adapters.state_dict("s", prefix="").items()}
    adapters.swap(new, "s")
    assert adapters.active == ["s", "t"] and adapters.trainable("s")
    assert torch.equal(adapters.state_dict("s", prefix="")["head.scale"], new["head.scale"])
    assert all(p.requires_grad for n, p in adapters.model.named_parameters() if "scales.s" in n)
    with adapters.disabled():
        base = run(adapters.model, x)
    assert torch.allclose(run(adapters.model, x), base * 7.0 * 5.0)


def test_a_failed_swap_keeps_the_old_adapter():
    adapters = with_toy()
    adapters.add(SCALE, "s")
    x = mlp_input()
    before = run(adapters.model, x)
    with pytest.raises(adapterkit.AdapterkitError):  # the toy plugin's load fails (a PluginError)
        adapters.swap({"elsewhere.scale": torch.ones(4)}, "s")
    assert adapters.names == ["s"] and adapters.active == ["s"]
    assert torch.equal(run(adapters.model, x), before)


def test_swap_refuses_what_it_cannot_do(tmp_path):
    adapters, _ = lora_model()
    with pytest.raises(TypeError, match="is_trainable"):
        adapters.swap(tmp_path, "a", is_trainable=True)
    with pytest.raises(adapterkit.UnknownAdapterError):
        adapters.swap(adapters.state_dict("a"), "nope")
    ia3 = 'ia3[target_modules=["0"], feedforward_modules=[]]'
    with pytest.raises(ConfigValueError, match="same method"):
        adapters.swap({"0.ia3_l": torch.ones(6, 1)}, "a", config=ia3)
    adapters.set_active("a")
    adapters.merge()
    with pytest.raises(AdapterStateError, match="unmerge"):
        adapters.swap(adapters.state_dict("b"), "a")


# -- combine and prepare_compiled ----------------------------------------------------------------------------------
def test_combine_and_prepare_compiled_refuse_methods_without_them():
    adapters = with_toy()
    adapters.add(SCALE, "s")
    adapters.add(SCALE, "t")
    with pytest.raises(UnsupportedOperationError, match="'scale'.*combining"):
        adapters.combine(["s", "t"], [0.5, 0.5], "st")
    with pytest.raises(UnsupportedOperationError, match="compiled switching"):
        adapters.prepare_compiled()
    assert adapters.names == ["s", "t"]


def test_combine_checks_its_arguments():
    adapters, _ = lora_model()
    with pytest.raises(ConfigValueError, match="one weight per adapter"):
        adapters.combine(["a", "b"], [1.0], "ab")
    with pytest.raises(ConfigValueError, match="finite"):
        adapters.combine(["a", "b"], [1.0, math.inf], "ab")
    with pytest.raises(AdapterExistsError):
        adapters.combine(["a", "b"], [1.0, 1.0], "a")
    adapters.add('ia3[target_modules=["0"], feedforward_modules=[]]', "i")
    with pytest.raises(ConfigValueError, match="several methods"):
        adapters.combine(["a", "i"], [1.0, 1.0], "ai")
    assert adapters.names == ["a", "b", "i"]


def test_prepare_compiled_checks_its_arguments():
    adapters, _ = lora_model()
    for kwargs in ({"max_rank": 0}, {"max_adapters": True}, {"targets": "0"}):
        with pytest.raises(ConfigValueError, match="prepare_compiled"):
            adapters.prepare_compiled(**kwargs)
