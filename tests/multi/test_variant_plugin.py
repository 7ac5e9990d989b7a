"""A LoRA variant plugin (tests/multi/gain_lora.py) beside adapterkit-lora on the same layers, and its own files."""

from __future__ import annotations

import dataclasses
import functools
import json

import adapterkit
import pytest
import torch
from adapterkit.layers import owner
from conftest import make_mlp, mlp_input, run
from gain_lora import GainLoraConfig, GainLoraLinear
from gain_lora import plugin as gain_plugin
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear

LORA = 'lora[r=4, lora_alpha=8, target_modules=["embed", "head"], init_lora_weights=False]'
GAIN = 'gain_lora[r=4, lora_alpha=8, lora_gain=3.0, target_modules=["embed", "head"], init_lora_weights=False]'


@functools.cache
def registry() -> adapterkit.MethodRegistry:
    pm = adapterkit.make_plugin_manager()  # the installed plugins, LoRA among them
    pm.register(gain_plugin, name="gain_lora")
    return adapterkit.MethodRegistry(pm)


def adapters_of(model) -> adapterkit.Adapters:
    return adapterkit.attach(model, registry())


def delta(state: dict[str, torch.Tensor], path: str, x: torch.Tensor, scale: float) -> torch.Tensor:
    return x @ state[f"{path}.lora_A.weight"].T @ state[f"{path}.lora_B.weight"].T * scale


def alone(spec: str, seed: int) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    model = make_mlp()
    torch.manual_seed(seed)
    adapters = adapters_of(model)
    adapters.add(spec, "x")
    return adapters.state_dict("x", prefix=""), model


@pytest.mark.parametrize("first", ["lora", "gain_lora"])
def test_the_variant_and_lora_stack_in_either_order(first):
    specs = {"lora": LORA, "gain_lora": GAIN}
    second = "gain_lora" if first == "lora" else "lora"
    model, x = make_mlp(), mlp_input()
    adapters = adapters_of(model)
    torch.manual_seed(1)
    adapters.add(specs[first], "a")
    torch.manual_seed(2)
    adapters.add(specs[second], "b")
    # Two wrappers per layer, each of its own method and class: neither extended the other's layer.
    assert [layer.methods for layer in adapters.layers()] == [(first, second)] * 2
    classes = {"lora": LoraLinear, "gain_lora": GainLoraLinear}
    assert type(model.head) is classes[second] and type(model.head.base_layer) is classes[first]
    assert owner(model.head) == second and owner(model.head.base_layer) == first
    # Each adapter's tensors are what it has alone, under the same keys.
    state_a, _ = alone(specs[first], 1)
    state_b, _ = alone(specs[second], 2)
    for name, reference in (("a", state_a), ("b", state_b)):
        state = adapters.state_dict(name, prefix="")
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    # Outputs: both deltas, each with its own method's scaling (the gain for the variant only).
    scales = {"lora": 8 / 4, "gain_lora": 8 / 4 * 3.0}
    adapters.set_active(["a", "b"])
    base = make_mlp()
    h = base.embed(x) + delta(state_a, "embed", x, scales[first]) + delta(state_b, "embed", x, scales[second])
    h = base.blocks(h)
    expected = base.head(h) + delta(state_a, "head", h, scales[first]) + delta(state_b, "head", h, scales[second])
    assert torch.allclose(run(model, x), expected, atol=1e-5)
    before = run(model, x)
    adapters.merge()
    assert torch.allclose(run(model, x), before, atol=1e-5)
    adapters.unmerge()
    adapters.delete("a")
    adapters.delete("b")
    assert str(model) == str(make_mlp())


def test_a_folder_written_by_the_variants_own_peft_flow_loads_as_the_variant(tmp_path):
    torch.manual_seed(3)
    config = GainLoraConfig(r=4, lora_alpha=8, lora_gain=3.0, target_modules=["embed", "head"], init_lora_weights=False)
    peft_model = get_peft_model(make_mlp(), config)
    peft_model.save_pretrained(tmp_path)
    assert '"peft_type": "LORA"' in (tmp_path / "adapter_config.json").read_text()
    x = mlp_input()
    model = make_mlp()
    adapters = adapters_of(model)
    adapters.load(tmp_path, "v")  # not told which method: the variant plugin claims the files
    assert adapters.method("v").name == "gain_lora"
    assert isinstance(adapters.config("v"), GainLoraConfig) and adapters.config("v").lora_gain == 3.0
    assert type(model.head) is GainLoraLinear
    assert torch.allclose(run(model, x), run(peft_model.eval(), x), atol=1e-6)
    # adapterkit's save of it loads back in the variant's peft flow (which builds its own config class:
    # peft's PeftConfig.from_pretrained would build a plain LoraConfig from peft_type LORA).
    adapters.save(tmp_path / "ours", "v")
    saved = tmp_path / "ours" / "v"
    data = json.loads((saved / "adapter_config.json").read_text())
    config = GainLoraConfig(**{f.name: data[f.name] for f in dataclasses.fields(GainLoraConfig) if f.name in data})
    again = PeftModel.from_pretrained(make_mlp(), saved, config=config).eval()
    assert type(again.base_model.model.head) is GainLoraLinear
    assert torch.allclose(run(again, x), run(model, x), atol=1e-6)


def test_plain_lora_files_stay_lora_with_the_variant_installed(tmp_path):
    torch.manual_seed(4)
    peft_model = get_peft_model(make_mlp(), LoraConfig(r=4, target_modules=["head"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path)
    adapters = adapters_of(make_mlp())
    adapters.load(tmp_path)
    assert adapters.method("default").name == "lora"


def test_two_plugins_claiming_the_same_files_is_an_error_naming_both(tmp_path):
    class Greedy(type(gain_plugin)):
        @adapterkit.hookimpl
        def adapterkit_claim_checkpoint(self, config, metadata, keys):
            return self.name

    pm = adapterkit.make_plugin_manager()
    pm.register(gain_plugin, name="gain_lora")
    pm.register(Greedy("greedy", GainLoraConfig.__mro__[1], gain_plugin.tuner_type), name="greedy")
    registry = adapterkit.MethodRegistry(pm)
    torch.manual_seed(3)
    get_peft_model(make_mlp(), GainLoraConfig(target_modules=["head"])).save_pretrained(tmp_path)
    model, x = make_mlp(), mlp_input()
    adapters = adapterkit.attach(model, registry)
    with pytest.raises(adapterkit.CheckpointError, match=r"'gain_lora' \(plugin 'gain_lora'\), 'greedy' \(plugin 'greedy'\).*method="):
        adapters.load(tmp_path)
    assert adapters.names == [] and str(model) == str(make_mlp())
    adapters.load(tmp_path, method="gain_lora")
    assert adapters.method("default").name == "gain_lora"
