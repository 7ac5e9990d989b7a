"""The bottleneck method's own tests: on a small transformers Llama, on a plain model, and hook by hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import adapterkit
import pytest
import torch
from adapterkit import testing
from adapterkit_bottleneck import BottleneckConfig, BottleneckLayer, plugin
from safetensors import safe_open
from torch import nn

transformers = pytest.importorskip("transformers")

SPEC = 'bottleneck[bottleneck_dim=8, target_modules=["q_proj", "v_proj", "down_proj"]]'


def make_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)  # the same "pretrained" base every time
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
    )
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def tokens(batch: int = 3) -> torch.Tensor:
    return torch.randint(0, 64, (batch, 9), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def perturb(model: nn.Module, name: str, seed: int) -> None:
    """Move adapter ``name`` off its identity initialisation, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if f".bottleneck.{name}." in param_name:
                param.add_(torch.randn(param.shape, generator=generator).to(param) * 0.2)


def assert_same(after: tuple, before: tuple) -> None:
    """Compare two ``adapterkit.testing.model_fingerprint`` results: modules, parameters, outputs."""
    assert after[0] == before[0] and after[1] == before[1]
    assert [(n, g) for n, _, g in after[2]] == [(n, g) for n, _, g in before[2]]
    assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(after[2], before[2]))
    assert torch.equal(after[3], before[3])


def with_adapters(*names: str) -> tuple[nn.Module, adapterkit.Adapters]:
    model = make_llama()
    adapters = adapterkit.attach(model)
    for seed, name in enumerate(names):
        adapters.add(SPEC, name)
        perturb(model, name, seed)
    return model, adapters


# -- registration and configs --------------------------------------------------------------------------
def test_registered_through_the_entry_point() -> None:
    """adapterkit_register_methods, reached through the "adapterkit" entry-point group."""
    method = adapterkit.available_methods()["bottleneck"]
    assert method.config_type is BottleneckConfig
    assert method.distribution == "adapterkit-bottleneck" and method.version
    assert adapterkit.default_registry().get("BOTTLENECK") is method  # peft_type spelling, any case


def test_blocked_plugin_is_not_loaded() -> None:
    code = "import adapterkit; print('bottleneck' in adapterkit.available_methods())"
    env = {**os.environ, "ADAPTERKIT_BLOCK_PLUGINS": "bottleneck"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


def test_config_string() -> None:
    config = adapterkit.parse_config(
        "bottleneck[bottleneck_dim=16, target_modules=['fc1'], nonlinearity='gelu', scaling=0.5, placement='parallel']"
    )
    assert config == BottleneckConfig(
        target_modules=["fc1"], bottleneck_dim=16, nonlinearity="gelu", scaling=0.5, placement="parallel"
    )
    assert adapterkit.format_config(config) == (
        "bottleneck[target_modules=['fc1'], nonlinearity='gelu', scaling=0.5, placement='parallel']"
    )
    assert adapterkit.parse_config(adapterkit.format_config(config)) == config


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ("bottleneck_dim=0, target_modules=['fc1']", adapterkit.ConfigValueError, "bottleneck_dim.*positive"),
        ("bottleneck_dim='8', target_modules=['fc1']", adapterkit.ConfigValueError, "bottleneck_dim"),
        ("nonlinearity='swish', target_modules=['fc1']", adapterkit.ConfigValueError, "relu, gelu"),
        ("placement='after', target_modules=['fc1']", adapterkit.ConfigValueError, "sequential, parallel"),
        ("init='ones', target_modules=['fc1']", adapterkit.ConfigValueError, "zeros, random"),
        ("dropout=1.0, target_modules=['fc1']", adapterkit.ConfigValueError, "dropout"),
        ("target_modules=[]", adapterkit.ConfigValueError, "target_modules"),
        ("bottleneck_dim=8", adapterkit.ConfigValueError, "target_modules"),
        ("target_modules='fc('", adapterkit.ConfigValueError, "regular expression"),
        ("bottleneck_size=8, target_modules=['fc1']", adapterkit.UnknownConfigKeyError, "bottleneck_dim"),
    ],
)
def test_bad_values_are_config_errors(options: str, error: type, match: str) -> None:
    """adapterkit_validate_config (and the core's type checks before it)."""
    with pytest.raises(error, match=match):
        adapterkit.parse_config(f"bottleneck[{options}]")


def test_saved_config_round_trip() -> None:
    """adapterkit_config_to_dict writes peft's layout; adapterkit_config_from_dict reads it back."""
    config = adapterkit.parse_config("bottleneck[bottleneck_dim=4, target_modules=('fc1', 'fc2'), dropout=0.1]")
    data = adapterkit.config_to_dict(config)
    assert data["peft_type"] == "BOTTLENECK" and data["target_modules"] == ["fc1", "fc2"]
    assert json.loads(json.dumps(data)) == data
    saved = {**data, "inference_mode": True, "peft_version": "0.21.2"}
    back = adapterkit.parse_config(saved)
    assert back == BottleneckConfig(target_modules=["fc1", "fc2"], bottleneck_dim=4, dropout=0.1)
    with pytest.warns(UserWarning, match="future_option"):
        assert plugin.adapterkit_config_from_dict(method="bottleneck", data={**saved, "future_option": 1}) == back


# -- on a Llama ---------------------------------------------------------------------------------------------
def test_new_adapter_leaves_outputs_unchanged_then_trains() -> None:
    model, x = make_llama(), tokens()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = logits(model, x)
    adapters = adapterkit.attach(model)
    adapters.add(SPEC, "task")
    assert torch.equal(logits(model, x), before), "init='zeros' must start as the identity"
    assert sum(isinstance(m, BottleneckLayer) for m in model.modules()) == 3 * 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".bottleneck.task." in n for n in trainable)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if ".bottleneck." not in name:
            assert torch.equal(param, base[name.replace(".base_layer", "")]), f"{name} changed"


def test_save_and_load(tmp_path) -> None:
    model, adapters = with_adapters("task")
    x = tokens()
    adapters.save(tmp_path)  # "default" would go in tmp_path itself; every other name in a subfolder
    folder = tmp_path / "task"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["inference_mode"] is True
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["adapterkit_method"] == "bottleneck"
    assert "base_model.model.model.layers.0.self_attn.q_proj.bottleneck.down.weight" in keys
    assert len(keys) == 2 * 3 * 4  # layers x targets x (down, up) x (weight, bias)

    fresh = make_llama()
    loaded = adapterkit.attach(fresh)
    loaded.load(folder, "task")
    assert loaded.method("task").name == "bottleneck" and loaded.config("task") == adapters.config("task")
    assert torch.allclose(logits(fresh, x), logits(model, x), atol=1e-6)
    assert not any(p.requires_grad for p in fresh.parameters()), "loaded adapters are frozen by default"
    loaded.load(tmp_path, "again", subfolder="task", is_trainable=True)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n in dict(fresh.named_parameters()) if ".bottleneck.again." in n
    }


def test_load_injects_on_meta_then_assigns_tensors_on_the_layers_dtype() -> None:
    """adapterkit_inject(empty=True) makes meta tensors; adapterkit_load_state replaces them."""
    _, adapters = with_adapters("task")
    state = {k: v.float() for k, v in adapters.state_dict("task", prefix="").items()}
    model = make_llama(torch.bfloat16)
    config = adapterkit.parse_config(SPEC)
    plugin.adapterkit_inject(model=model, method="bottleneck", name="task", config=config, empty=True)
    params = {n: p for n, p in model.named_parameters() if ".bottleneck." in n}
    assert params and all(p.is_meta for p in params.values())
    plugin.adapterkit_load_state(model=model, method="bottleneck", name="task", state_dict=state)
    params = {n: p for n, p in model.named_parameters() if ".bottleneck." in n}
    assert all(not p.is_meta and p.dtype == torch.bfloat16 for p in params.values())
    extracted = plugin.adapterkit_extract_state(model=model, method="bottleneck", name="task")
    assert extracted.keys() == state.keys()


def test_load_state_is_strict() -> None:
    """adapterkit_load_state raises StateDictMismatchError naming the keys; the core rolls back."""
    _, adapters = with_adapters("task")
    state = adapters.state_dict("task")
    key = "base_model.model.model.layers.1.mlp.down_proj.bottleneck.up.weight"
    model, x = make_llama(), tokens()
    before = testing.model_fingerprint(model, x)
    target = adapterkit.attach(model)
    config = adapters.config("task")
    cases = [
        (
            {k: v for k, v in state.items() if k != key},
            "missing keys: model.layers.1.mlp.down_proj.bottleneck.up.weight",
        ),
        ({**state, "model.norm.bottleneck.up.weight": state[key]}, "unexpected keys: model.norm.bottleneck"),
        ({**state, key: torch.zeros(3, 3)}, r"wrong shapes: .*down_proj.bottleneck.up.weight: checkpoint \(3, 3\)"),
    ]
    for broken, match in cases:
        with pytest.raises(adapterkit.StateDictMismatchError, match=match):
            target.load(None, "task", config=config, state_dict=broken)
        assert_same(testing.model_fingerprint(model, x), before)
    assert target.names == []


def test_several_active_adapters_add_their_deltas() -> None:
    """adapterkit_set_active with two names: out = base + delta_a + delta_b on a layer."""
    model, x = testing.ContractModel().eval(), torch.randn(4, 8)
    adapters = adapterkit.attach(model)
    base = logits_plain(model, x)
    for seed, name in enumerate(("a", "b")):
        adapters.add("bottleneck[bottleneck_dim=3, nonlinearity='gelu', target_modules=['head']]", name)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if f".bottleneck.{name}." in param_name:
                    param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)))
    deltas = {}
    for name in ("a", "b"):
        adapters.set_active(name)
        deltas[name] = logits_plain(model, x) - base
    adapters.set_active(["a", "b"])
    assert torch.allclose(logits_plain(model, x), base + deltas["a"] + deltas["b"], atol=1e-6)
    assert adapters.active == ["a", "b"]


def logits_plain(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_per_sample_rows() -> None:
    """adapterkit_per_sample: each row through its own adapter, "__base__" through none."""
    model, adapters = with_adapters("a", "b")
    x = tokens(4)
    rows = ["a", "__base__", "b", "a"]
    with adapters.per_sample(rows):
        mixed = logits(model, x)
    for i, row in enumerate(rows):
        adapters.set_active([] if row == "__base__" else [row])
        assert torch.allclose(mixed[i : i + 1], logits(model, x[i : i + 1]), atol=1e-5), f"row {i} ({row})"
    with (
        pytest.raises(adapterkit.PerSampleError, match="2 row names but the batch has 4 rows"),
        adapters.per_sample(["a", "b"]),
    ):
        logits(model, x)
    # The routing is gone after the block, also after a forward that raised inside it.
    assert all("forward" not in layer.__dict__ for layer in model.modules() if isinstance(layer, BottleneckLayer))


def test_disable_and_enable() -> None:
    """adapterkit_disable / adapterkit_enable: the base model's outputs while disabled."""
    model, adapters = with_adapters("a")
    x = tokens()
    with_adapter = logits(model, x)
    adapters.set_active([])
    base = logits(model, x)
    adapters.set_active("a")
    adapters.disable()
    assert torch.equal(logits(model, x), base)
    adapters.enable()
    assert torch.equal(logits(model, x), with_adapter)


def test_merge_is_unsupported() -> None:
    """No adapterkit_merge / adapterkit_unmerge: the core refuses for us."""
    _, adapters = with_adapters("a")
    with pytest.raises(adapterkit.UnsupportedOperationError, match="'bottleneck'.*does not support 'merge'"):
        adapters.merge()
    assert adapters.merged == []


def test_targets_must_match_linear_layers() -> None:
    model, x = make_llama(), tokens()
    before = testing.model_fingerprint(model, x)
    adapters = adapterkit.attach(model)
    with pytest.raises(
        adapterkit.TargetError, match=r"match no module of LlamaForCausalLM; its Linear layers are: lm_head"
    ):
        adapters.add("bottleneck[target_modules=['qproj']]")
    with pytest.raises(adapterkit.TargetError, match="'model.layers.0.mlp' is a LlamaMLP"):
        adapters.add("bottleneck[target_modules=['mlp']]")
    assert_same(testing.model_fingerprint(model, x), before)


def test_delete_unwraps_back_to_the_original_layers() -> None:
    """adapterkit_delete: the last adapter of a layer puts the original Linear back."""
    model = make_llama()
    original = dict(model.named_modules())
    adapters = adapterkit.attach(model)
    adapters.add(SPEC, "a")
    adapters.add('bottleneck[target_modules=["q_proj"]]', "b")
    adapters.delete("a")
    assert isinstance(model.model.layers[0].self_attn.q_proj, BottleneckLayer)
    assert model.model.layers[0].self_attn.v_proj is original["model.layers.0.self_attn.v_proj"]
    adapters.delete("b")
    assert dict(model.named_modules()) == original


def test_beside_lora_on_the_same_layers() -> None:
    """Wrapping a layer another method already wraps (on top of its wrapper): keys stay those the adapter has alone."""
    pytest.importorskip("adapterkit_lora")
    alone, alone_adapters = with_adapters("neck")
    model = make_llama()
    original = dict(model.named_modules())
    adapters = adapterkit.attach(model)
    adapters.add("lora[r=2, target_modules=['q_proj'], init_lora_weights=False]", "lora")
    state = alone_adapters.state_dict("neck")
    adapters.load(None, "neck", config=SPEC, state_dict=state)  # into the layers LoRA already wraps
    x = tokens()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, BottleneckLayer) and adapterkit.layers.owner(q_proj.base_layer) == "lora"
    again = adapters.state_dict("neck")
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    assert torch.allclose(logits(model, x), logits(alone, x), atol=1e-5)  # only "neck" is active
    adapters.set_active(["lora", "neck"])
    both = logits(model, x)
    adapters.set_active("neck")
    assert not torch.allclose(both, logits(model, x))
    adapters.delete("lora")
    adapters.delete("neck")
    assert dict(model.named_modules()) == original


def test_loads_onto_a_dispatched_model_with_disk_offload(tmp_path) -> None:
    """With a dispatch plugin installed (adapterkit_dispatch), adapters follow the layers they adapt."""
    pytest.importorskip("adapterkit_dispatch")
    model, adapters = with_adapters("task")
    x = tokens()
    expected = logits(model, x)
    adapters.save(tmp_path / "saved")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "disk",
    }
    fresh = make_llama()
    adapterkit.attach(fresh).load(
        tmp_path / "saved", "task", subfolder="task", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    assert fresh.hf_device_map == device_map
    assert torch.allclose(logits(fresh, x), expected, atol=1e-6)
