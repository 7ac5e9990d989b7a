"""The dispatch plugin with real accelerate on CPU: explicit maps with CPU and disk offload, "auto" maps
under a memory cap, models that were dispatched before an adapter was loaded, the mixin, errors, and
blocking the plugin.

Every placement is checked against the same model and adapter without dispatch: outputs must agree
to 1e-6 (in practice they are identical), and adapter weights must sit with the layer they adapt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import adapterkit
import adapterkit_dispatch
import pytest
import torch
from accelerate import dispatch_model
from accelerate.hooks import AlignDevicesHook, SequentialHook
from adapterkit import AdapterMixin
from adapterkit_dispatch import DispatchError
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 64,
}
SPEC = "lora[r=2, target_modules=['q_proj', 'v_proj', 'lm_head'], init_lora_weights=False]"
DORA = "lora[r=2, target_modules=['q_proj', 'v_proj', 'lm_head'], use_dora=True, init_lora_weights=False]"
# Layer 1 and lm_head (both adapted) on disk, everything else on CPU.
CPU_AND_DISK = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}

# Disk for layers the adapter does not target (embeddings, layer 1's MLP, norms); the rest on CPU.
PARTLY_ON_DISK = {
    "model.embed_tokens": "disk",
    "model.layers.0": "cpu",
    "model.layers.1.self_attn": "cpu",
    "model.layers.1.mlp": "disk",
    "model.layers.1.input_layernorm": "cpu",
    "model.layers.1.post_attention_layernorm": "disk",
    "model.norm": "disk",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def make_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def llama_input() -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        out = model(llama_input() if x is None else x)
    return out.logits if hasattr(out, "logits") else out


def assert_outputs_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


@pytest.fixture(scope="module", params=[SPEC, DORA], ids=["lora", "dora"])
def saved(request, tmp_path_factory):
    """A saved adapter and the outputs of the undispatched model carrying it."""
    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.add(request.param)
    folder = tmp_path_factory.mktemp("adapter")
    adapters.save(folder)
    with adapters.disabled():
        base = run(model)
    return folder, run(model), base


def offload_hooks(module: nn.Module) -> list[AlignDevicesHook]:
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload]


def check_adapters_sit_with_their_layers(model: nn.Module, folder=None) -> tuple[int, int]:
    """Every adapter tensor is where its base layer is: same device, or offloaded together with it.

    Returns (layers with resident weights, offloaded layers), so callers can require both kinds.
    """
    resident = offloaded = 0
    index = json.loads((folder / "index.json").read_text()) if folder is not None else {}
    names = {id(m): n for n, m in model.named_modules()}
    for layer in model.modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        base_weight = layer.get_base_layer().weight
        adapter_params = [
            (f"{attr}.{n}", p) for attr in layer.adapter_layer_names for n, p in getattr(layer, attr).named_parameters()
        ]
        assert adapter_params
        if base_weight.is_meta:
            # Offloaded: the layer's own hook loads base and adapter weights together, from the offload.
            (hook,) = offload_hooks(layer)
            assert hook.place_submodules and str(hook.execution_device) == "cpu"
            for name, param in adapter_params:
                assert param.is_meta, name
                assert f"{names[id(layer)]}.{name}" in index, name
            offloaded += 1
        else:
            for name, param in adapter_params:
                assert param.device == base_weight.device and param.dtype == base_weight.dtype, name
            resident += 1
    return resident, offloaded


# -- explicit maps ------------------------------------------------------------------------------------
def test_cpu_and_disk_offload_gives_the_undispatched_outputs(saved, tmp_path):
    folder, expected, _ = saved
    model = make_llama()
    offload = tmp_path / "offload"
    adapterkit.attach(model).load(folder, device_map=CPU_AND_DISK, offload_folder=offload)
    assert model.hf_device_map == CPU_AND_DISK
    # Layer 0's q/v stay on the CPU; layer 1's q/v and lm_head go to disk.
    assert check_adapters_sit_with_their_layers(model, offload) == (2, 3)
    # The adapter weights of offloaded layers are in the offload folder, under their current names.
    stored = set(os.listdir(offload))
    assert {"lm_head.base_layer.weight.dat", "lm_head.lora_A.default.weight.dat",
            "model.layers.1.self_attn.q_proj.lora_B.default.weight.dat"} <= stored  # fmt: skip
    assert not any(name.startswith("model.layers.0.") for name in stored)
    assert_outputs_equal(run(model), expected)
    assert_outputs_equal(run(model), expected)  # offloaded weights go back to disk after a forward, and come back


def test_a_map_written_for_the_base_model_still_places_adapted_layers(saved, tmp_path):
    folder, expected, _ = saved
    model = make_llama()
    # Names from before the adapter existed: q_proj.weight is q_proj.base_layer.weight once wrapped.
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1.self_attn.q_proj.weight": "disk",
        "model.layers.1.self_attn.k_proj": "cpu",
        "model.layers.1.self_attn.v_proj": "cpu",
        "model.layers.1.self_attn.o_proj": "disk",
        "model.layers.1.mlp": "cpu",
        "model.layers.1.input_layernorm": "cpu",
        "model.layers.1.post_attention_layernorm": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    adapterkit.attach(model).load(folder, device_map=device_map, offload_folder=tmp_path)
    # The whole wrapped layer, adapter included, follows its weight to disk.
    assert model.hf_device_map["model.layers.1.self_attn.q_proj"] == "disk"
    assert not any(key.startswith("model.layers.1.self_attn.q_proj.") for key in model.hf_device_map)
    assert check_adapters_sit_with_their_layers(model, tmp_path) == (4, 1)
    assert_outputs_equal(run(model), expected)


@pytest.mark.parametrize("kind", ["auto", "balanced", "balanced_low_0", "sequential"])
def test_inferred_maps_under_a_cpu_memory_cap_offload_to_disk(saved, tmp_path, kind):
    folder, expected, _ = saved
    model = make_llama()
    adapters = adapterkit.attach(model)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    adapters.load(folder, device_map=kind, max_memory={"cpu": int(size * 0.95)}, offload_folder=tmp_path)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    _, offloaded = check_adapters_sit_with_their_layers(model, tmp_path)
    assert offloaded > 0
    assert_outputs_equal(run(model), expected)


def test_an_inferred_map_without_a_cap_keeps_everything_on_cpu(saved):
    folder, expected, _ = saved
    model = make_llama()
    adapterkit.attach(model).load(folder, device_map="auto")
    assert model.hf_device_map == {"": "cpu"}
    assert not any(p.is_meta for p in model.parameters())
    assert_outputs_equal(run(model), expected)


def test_mixin_load_adapter_passes_placement_through(saved, tmp_path):
    folder, expected, _ = saved

    class MixinLlama(AdapterMixin, LlamaForCausalLM):
        pass

    torch.manual_seed(0)
    model = MixinLlama(LlamaConfig(**CONFIG)).eval()
    model.load_adapter(str(folder), adapter_name="task", device_map=CPU_AND_DISK, offload_folder=str(tmp_path))
    assert model.active_adapters() == ["task"]
    assert model.hf_device_map == CPU_AND_DISK
    assert check_adapters_sit_with_their_layers(model, tmp_path)[1] == 3
    assert_outputs_equal(run(model), expected)


def test_per_sample_rows_on_a_dispatched_model():
    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.add(SPEC, "a")
    adapters.add("lora[r=3, target_modules=['v_proj', 'lm_head'], init_lora_weights=False]", "b")
    rows = ["a", "__base__", "b"]
    with adapters.per_sample(rows):
        expected = run(model)
    with tempfile.TemporaryDirectory() as offload:
        adapters.dispatch(CPU_AND_DISK, offload_folder=offload)
        with adapters.per_sample(rows):
            assert_outputs_equal(run(model), expected)


def test_dispatch_keeps_trainable_adapters_trainable(saved, tmp_path):
    folder, _, _ = saved
    model = make_llama()
    adapterkit.attach(model).load(folder, is_trainable=True, device_map={"": "cpu"})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert {n for n, p in model.named_parameters() if ".lora_" in n and "magnitude" not in n} <= trainable


# -- models dispatched before the adapter came ------------------------------------------------------------
def test_loading_into_a_model_transformers_dispatched(saved, tmp_path):
    folder, expected, base = saved
    checkpoint = tmp_path / "base"
    make_llama().save_pretrained(checkpoint)
    offload = tmp_path / "offload"
    # transformers offloads to disk by pointing at the checkpoint's safetensors file (nothing copied).
    # The layers the adapter targets stay on the CPU: see docs/devices.md on loading into offloaded layers.
    first_map = {**PARTLY_ON_DISK}
    model = LlamaForCausalLM.from_pretrained(checkpoint, device_map=first_map, offload_folder=offload).eval()
    assert model.hf_device_map == first_map
    assert model.model.layers[1].mlp.up_proj.weight.is_meta
    assert_outputs_equal(run(model), base)
    # Re-dispatch while loading: what was on disk comes back to the CPU, adapted layers go to disk.
    new_map = {"model.embed_tokens": "disk", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "cpu",
               "model.rotary_emb": "cpu", "lm_head": "disk"}  # fmt: skip
    adapters = adapterkit.attach(model)
    adapters.load(folder, device_map=new_map, offload_folder=offload)
    assert model.hf_device_map == new_map
    assert check_adapters_sit_with_their_layers(model, offload) == (2, 3)
    assert not model.model.layers[1].mlp.up_proj.weight.is_meta
    assert_outputs_equal(run(model), expected)
    index = json.loads((offload / "index.json").read_text())
    # embed_tokens stayed on disk: still read from the checkpoint, nothing copied.
    assert index["model.embed_tokens.weight"]["safetensors_file"].endswith("model.safetensors")
    assert not (offload / "model.embed_tokens.weight.dat").exists()
    # What moved from the CPU to disk was written, adapter weights included.
    assert (offload / "lm_head.lora_B.default.weight.dat").exists()
    with adapters.disabled():
        assert_outputs_equal(run(model), base)


def test_redispatching_a_dispatched_model_moves_offloaded_weights_back(saved, tmp_path):
    folder, expected, base = saved
    model = make_llama()
    first = tmp_path / "first"
    dispatch_model(model, PARTLY_ON_DISK, offload_dir=first)
    assert model.model.norm.weight.is_meta and model.model.embed_tokens.weight.is_meta
    adapters = adapterkit.attach(model)
    adapters.load(folder, device_map={"": "cpu"})  # everything back on the CPU, read from the first offload
    assert not any(p.is_meta for p in model.parameters())
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert "to" not in model.__dict__  # accelerate's "don't move me" wrapper went with the hooks
    assert_outputs_equal(run(model), expected)
    # And out again, into the same folder, which already holds older files of the same names.
    adapters.dispatch(CPU_AND_DISK, offload_folder=first)
    assert check_adapters_sit_with_their_layers(model, first) == (2, 3)
    assert_outputs_equal(run(model), expected)
    with adapters.disabled():
        assert_outputs_equal(run(model), base)


def test_deleting_an_adapter_of_an_offloaded_layer_keeps_the_base_layer_working(saved, tmp_path):
    folder, _, base = saved
    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.load(folder, device_map=CPU_AND_DISK, offload_folder=tmp_path)
    adapters.delete("default")  # unwraps the layers: lm_head is a plain Linear again, its weight on meta
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert model.lm_head.weight.is_meta
    assert_outputs_equal(run(model), base)
    adapters.dispatch(CPU_AND_DISK, offload_folder=tmp_path)
    assert model.hf_device_map == CPU_AND_DISK
    assert_outputs_equal(run(model), base)


def test_an_adapter_added_onto_an_offloaded_layer_is_refused(tmp_path):
    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.dispatch(CPU_AND_DISK, offload_folder=tmp_path)
    adapters.add("lora[r=2, target_modules=['lm_head']]")  # peft puts the new weights on lm_head's device: meta
    with pytest.raises(DispatchError, match=r"lm_head\.lora_A\.default\.weight.*add or load adapters before"):
        adapters.dispatch(CPU_AND_DISK, offload_folder=tmp_path)


# -- errors -----------------------------------------------------------------------------------------
class BiasMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(x)))


@pytest.mark.parametrize(
    ("device_map", "kwargs", "message"),
    [
        ({"embed": "cpu", "head": "disk"}, {}, r"\['head'\] to 'disk'; pass offload_folder="),
        ({"embed": "cpu", "nope": "cpu"}, {}, r"'nope' names no module or tensor"),
        ({"embed": "cpu"}, {}, r"does not cover the model"),
        ({"embed": "cpu", "head.weight": "cpu", "head.bias": "disk"}, {"offload_folder": "x"}, r"parts of the adapted layer 'head'"),
        ("everywhere", {}, r"'everywhere' is not one of auto, balanced"),
        ({}, {}, r"device_map is empty"),
    ],
)  # fmt: skip
def test_bad_placements_raise_before_changing_anything(device_map, kwargs, message):
    torch.manual_seed(0)
    model = BiasMLP().eval()
    adapters = adapterkit.attach(model)
    adapters.add("lora[r=2, target_modules=['head'], init_lora_weights=False]")
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    before = run(model, x)
    params = {n: p for n, p in model.named_parameters()}
    with pytest.raises(DispatchError, match=message) as info:
        adapters.dispatch(device_map, **kwargs)
    assert isinstance(info.value, (adapterkit.AdapterkitError, ValueError))
    assert not hasattr(model, "hf_device_map")
    assert {n: p for n, p in model.named_parameters()} == params
    assert torch.equal(run(model, x), before)


# -- the plugin as a plugin -------------------------------------------------------------------------------
def test_the_plugin_is_found_through_its_entry_point():
    pm = adapterkit.default_registry().plugin_manager
    assert pm.get_plugin("dispatch") is adapterkit_dispatch.plugin
    assert pm.distributions["dispatch"].metadata["Name"] == "adapterkit-dispatch"
    impls = pm.hook.adapterkit_dispatch.get_hookimpls()
    assert [impl.plugin_name for impl in impls] == ["dispatch"]


BLOCKED = """
import adapterkit, torch
from torch import nn
model = nn.Sequential(nn.Linear(4, 4))
adapters = adapterkit.attach(model)
adapters.add("lora[r=2, target_modules=['0']]")
for call in (lambda: adapters.dispatch({"": "cpu"}), lambda: adapters.load(None, config=adapters.config("default"),
             state_dict=adapters.state_dict(), name="again", device_map="auto")):
    try:
        call()
    except adapterkit.UnsupportedOperationError as exc:
        print("refused:", exc)
print("adapters:", adapters.names)
"""


def test_blocking_the_plugin_brings_back_the_core_error():
    env = {**os.environ, "ADAPTERKIT_BLOCK_PLUGINS": "dispatch"}
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED], check=False, capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    refused = [line for line in done.stdout.splitlines() if line.startswith("refused:")]
    assert len(refused) == 2
    assert all("pip install adapterkit-dispatch" in line for line in refused)
    assert "adapters: ['default']" in done.stdout  # load refused before attaching anything
