"""Only the core and the LoRA plugin installed: the other methods are named by their distribution."""

from __future__ import annotations

import importlib.util

import pytest

import adapterkit
from adapterkit import UnknownMethodError, parse_config


def test_only_lora_is_installed():
    assert list(adapterkit.available_methods()) == ["lora"]
    assert importlib.util.find_spec("adapterkit_ia3") is None


def test_unknown_method_is_a_key_error_with_install_hint():
    with pytest.raises(UnknownMethodError) as info:
        parse_config("ia3[target_modules=['k']]")
    error = info.value
    assert isinstance(error, KeyError)
    assert "pip install adapterkit-ia3" in str(error)
    assert "installed methods: " in str(error) and "lora" in str(error)


def test_a_model_with_lora_reports_the_missing_method_and_stays_usable():
    from conftest import Fingerprint, make_mlp, mlp_input

    model, x = make_mlp(), mlp_input()
    adapters = adapterkit.attach(model)
    adapters.add("lora[target_modules=['head']]")
    before = Fingerprint(model, x)
    with pytest.raises(UnknownMethodError, match="pip install adapterkit-adalora"):
        adapters.add("adalora[total_step=10, target_modules=['head']]", "other")
    before.assert_same(model, x)


def test_device_map_without_the_dispatch_plugin_names_it(tmp_path):
    from conftest import Fingerprint, make_mlp, mlp_input

    source = make_mlp()
    adapterkit.attach(source).add("lora[target_modules=['head']]")
    adapterkit.attach(source).save(tmp_path)
    model, x = make_mlp(), mlp_input()
    before = Fingerprint(model, x)
    with pytest.raises(adapterkit.UnsupportedOperationError, match="pip install adapterkit-dispatch"):
        adapterkit.attach(model).load(tmp_path, device_map="auto")
    before.assert_same(model, x)
