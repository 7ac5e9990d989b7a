"""peft's private API that adapterkit_peft relies on (all of it named in adapterkit_peft/_peft.py).

A peft upgrade that renames or reshapes one of these fails here, by name, instead of deep in a load.
"""

from __future__ import annotations

import inspect
import threading

import pytest
import torch
from adapterkit_peft import _peft, empty_weights, layer_passes_skipped
from peft import AdaLoraConfig, IA3Config, LoraConfig
from peft.tuners.adalora import AdaLoraModel
from peft.tuners.ia3 import IA3Model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.integrations import _skip_init_on_device
from torch import nn

TUNERS = [(LoraModel, LoraConfig(target_modules=["0"])), (IA3Model, IA3Config(target_modules=["0"], feedforward_modules=[])),
          (AdaLoraModel, AdaLoraConfig(target_modules=["0"], total_step=10))]  # fmt: skip


@pytest.mark.parametrize(("tuner_type", "config"), TUNERS, ids=lambda v: getattr(v, "__name__", ""))
def test_the_tuner_steps_exist_with_the_arguments_we_pass(tuner_type, config):
    for step in _peft.TUNER_STEPS:
        assert callable(getattr(tuner_type, step, None)), f"{tuner_type.__name__}.{step} is gone"
    params = list(inspect.signature(tuner_type._create_and_replace).parameters)
    assert params[:7] == ["self", params[1], "adapter_name", "target", "target_name", "parent", "current_key"], params
    assert list(inspect.signature(tuner_type._replace_module).parameters)[1:5] == [
        "parent", "child_name", "new_module", "child",
    ]  # fmt: skip
    model = nn.Sequential(nn.Linear(4, 4))
    tuner = _peft.bare_tuner(tuner_type, model, "a", config)
    assert tuner.model is model and "model" not in tuner._modules
    assert tuner._check_target_module_exists(config, "0")
    assert not tuner._check_target_module_exists(config, "1")


def test_the_layer_passes_exist_and_can_be_shadowed_per_instance():
    for name in _peft.LAYER_PASSES:
        assert callable(getattr(BaseTunerLayer, name, None)), f"BaseTunerLayer.{name} is gone"
    layer = LoraLinear(nn.Linear(4, 4), "a", config=LoraConfig(), r=2, lora_alpha=2)
    other = LoraLinear(nn.Linear(4, 4), "a", config=LoraConfig(), r=2, lora_alpha=2)
    with layer_passes_skipped([layer]):
        layer.set_adapter(["missing"])  # would raise or change the active adapters if it ran
        assert layer.active_adapters == ["a"]
        other.set_adapter(["a"])  # other layers are untouched
    assert "set_adapter" not in layer.__dict__
    assert BaseTunerLayer.__dict__["set_adapter"] is inspect.getattr_static(type(layer), "set_adapter")


def test_base_device_and_dtype():
    layer = LoraLinear(nn.Linear(4, 4, dtype=torch.float64), "a", config=LoraConfig(), r=2, lora_alpha=2)
    assert _peft.base_device_and_dtype(layer, layer.get_base_layer()) == (torch.device("cpu"), torch.float64)


def test_peft_marks_real_tensors_with_skip_init_on_device():
    assert not _peft.peft_wants_real_tensors()
    with _skip_init_on_device():
        assert _peft.peft_wants_real_tensors()
        with empty_weights():
            assert torch.zeros(2).device.type == "cpu"
    assert not _peft.peft_wants_real_tensors()


def _draw() -> tuple[str, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(3, 3)
    return layer.weight.device.type, torch.cat([layer.weight.detach().flatten(), torch.randn(3)])


def test_empty_weights_act_on_this_thread_only():
    expected = _draw()
    seen: list[bool] = []
    gate = threading.Barrier(2)

    def other_thread() -> None:
        gate.wait()
        for _ in range(50):
            device, values = _draw()
            seen.append(device == expected[0] and torch.equal(values, expected[1]))

    thread = threading.Thread(target=other_thread)
    thread.start()
    with empty_weights():
        gate.wait()
        for _ in range(200):
            assert nn.Linear(3, 3).weight.is_meta and torch.randn(2).is_meta
    thread.join()
    assert seen == [True] * 50


def test_ia3_feedforward_check():
    config = IA3Config(target_modules=["0", "1"], feedforward_modules=["1"])
    assert _peft.feedforward_target(IA3Model, config, "1") is True
    assert _peft.feedforward_target(IA3Model, config, "0") is False
    assert _peft.feedforward_target(LoraModel, LoraConfig(), "0") is None
