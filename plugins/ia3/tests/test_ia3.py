"""The ia3 plugin against peft as the oracle: checkpoints both ways, model API, atomic failures."""

from __future__ import annotations

import json

import adapterkit
import pytest
import torch
from adapterkit_ia3 import IA3Method
from peft import IA3Config, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

SPEC = 'ia3[target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]]'
PREFIX = "base_model.model."


# -- models ---------------------------------------------------------------------------------
def llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=64,
    )
    return LlamaForCausalLM(config).eval()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(torch.relu(self.inp(x)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


_gen = torch.Generator().manual_seed(123)
IDS = torch.randint(0, 64, (3, 6), generator=_gen)
X = torch.randn(4, 8, generator=_gen)
IMG = torch.randn(3, 3, 6, 6, generator=_gen)

# name -> (factory, input, adapterkit spec, equivalent peft config kwargs)
CASES = {
    "llama": (
        llama, IDS, SPEC, dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    "mlp": (
        mlp, X, 'ia3[target_modules=["inp", "block.2"], feedforward_modules=["block.2"]]',
        dict(target_modules=["inp", "block.2"], feedforward_modules=["block.2"]),
    ),
    "conv": (
        convnet, IMG, 'ia3[target_modules=["conv1", "conv2"], feedforward_modules=["conv2"]]',
        dict(target_modules=["conv1", "conv2"], feedforward_modules=["conv2"]),
    ),
}


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = model(x)
    return y.logits if hasattr(y, "logits") else y


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.long:
        return model(x, labels=x).loss
    return model(x).pow(2).mean()


def train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    optimizer = torch.optim.Adam(params, lr=0.05)
    model.train()
    for _ in range(steps):
        loss_of(model, x).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def scramble(model: nn.Module, seed: int) -> None:
    """Give every (IA)^3 vector distinct values (fresh ones are all ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".ia3_l." in name:
                param.copy_(torch.rand(param.shape, generator=g) + 0.5)


def snapshot(model: nn.Module) -> tuple[str, dict[str, torch.Tensor], dict[str, bool]]:
    return (
        str(model),
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_same(before: tuple, after: tuple) -> None:
    assert before[0] == after[0]
    assert list(before[1]) == list(after[1])
    for key, value in before[1].items():
        assert torch.equal(value, after[1][key]), key
    assert before[2] == after[2]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def files(folder) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    return tensors, config


# -- registration and configs ---------------------------------------------------------------
def test_registered_through_entry_point() -> None:
    method = adapterkit.available_methods()["ia3"]
    assert method.distribution == "adapterkit-ia3"
    assert method.config_type is IA3Config
    assert isinstance(adapterkit.default_registry().plugin_manager.get_plugin("ia3"), IA3Method)
    config = adapterkit.parse_config('IA3[target_modules=["q"], feedforward_modules=[]]')
    assert isinstance(config, IA3Config) and config.target_modules == {"q"}
    saved = adapterkit.parse_config({"peft_type": "IA3", "target_modules": ["a"], "feedforward_modules": ["a"]})
    assert isinstance(saved, IA3Config) and saved.feedforward_modules == {"a"}


def test_feedforward_must_be_subset_of_targets() -> None:
    with pytest.raises(adapterkit.ConfigValueError, match="feedforward_modules"):
        adapterkit.parse_config('ia3[target_modules=["k_proj"], feedforward_modules=["down_proj"]]')
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    config.target_modules = {"k_proj"}  # changed after peft's own check
    model = llama()
    before = snapshot(model)
    with pytest.raises(adapterkit.ConfigValueError, match=r"'feedforward_modules'.*subset"):
        adapterkit.attach(model).add(config)
    assert_same(before, snapshot(model))


# -- checkpoints against peft ----------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_trained_adapter_saves_in_peft_format(case: str, tmp_path) -> None:
    factory, x, spec, _ = CASES[case]
    model = factory()
    adapters = adapterkit.attach(model)
    adapters.add(spec)
    train(model, x)
    vectors = {n: p for n, p in model.named_parameters() if "ia3_l" in n}
    assert vectors and all(not torch.equal(p, torch.ones_like(p)) for p in vectors.values()), "training changed nothing"
    adapters.save(tmp_path)
    ours = output(model, x)

    peft_model = PeftModel.from_pretrained(factory(), tmp_path).eval()
    assert max_diff(output(peft_model, x), ours) <= 1e-6
    assert max_diff(ours, output(factory(), x)) > 1e-3  # the adapter does something
    tensors, config = files(tmp_path)
    expected = get_peft_model_state_dict(peft_model)
    assert sorted(tensors) == sorted(expected) == sorted(adapters.state_dict())
    for key, value in expected.items():
        assert torch.equal(tensors[key], value), key
    assert config["peft_type"] == "IA3" and config["inference_mode"] is True


def test_feedforward_layers_scale_inputs_and_others_outputs() -> None:
    model = llama()
    adapterkit.attach(model).add(SPEC)
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.is_feedforward and layer.mlp.down_proj.ia3_l["default"].shape == (1, 64)
    assert not layer.self_attn.k_proj.is_feedforward and layer.self_attn.k_proj.ia3_l["default"].shape == (32, 1)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_adapter_loads(case: str, tmp_path) -> None:
    factory, x, _, peft_kwargs = CASES[case]
    peft_model = get_peft_model(factory(), IA3Config(**peft_kwargs)).eval()
    scramble(peft_model, 1)
    peft_model.save_pretrained(tmp_path)
    expected = output(peft_model, x)

    model = factory()
    adapters = adapterkit.attach(model)
    assert adapters.load(tmp_path) == "default"
    assert max_diff(output(model, x), expected) <= 1e-6
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference by default
    state = adapters.state_dict()
    peft_state = get_peft_model_state_dict(peft_model)
    assert sorted(state) == sorted(peft_state)
    for key, value in peft_state.items():
        assert torch.equal(state[key], value), key

    # and trainable on request
    other = factory()
    adapterkit.attach(other).load(tmp_path, "tuned", is_trainable=True)
    assert all(p.requires_grad for n, p in other.named_parameters() if "ia3_l" in n)
    before = output(other, x)
    train(other, x, steps=1)
    assert max_diff(output(other, x), before) > 0


def test_defaults_filled_in_as_peft_does(tmp_path) -> None:
    # No feedforward_modules on a known architecture: peft's Llama defaults apply and get saved.
    model = llama()
    adapters = adapterkit.attach(model)
    adapters.add('ia3[target_modules=["k_proj", "v_proj", "down_proj"]]')
    assert model.model.layers[1].mlp.down_proj.is_feedforward
    assert adapters.config("default").feedforward_modules == {"down_proj"}
    adapters.add("ia3", "bare")  # nothing given: targets and feedforward from peft's mapping
    peft_model = get_peft_model(llama(), IA3Config())
    assert adapters.config("bare").target_modules == peft_model.peft_config["default"].target_modules
    assert adapters.config("bare").feedforward_modules == peft_model.peft_config["default"].feedforward_modules
    adapters.save(tmp_path, "bare")
    _, config = files(tmp_path / "bare")
    assert sorted(config["feedforward_modules"]) == ["down_proj"]
    assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "v_proj"]


def test_plain_model_needs_feedforward_modules() -> None:
    model = mlp()
    before = snapshot(model)
    with pytest.raises(adapterkit.ConfigValueError, match="feedforward_modules"):
        adapterkit.attach(model).add('ia3[target_modules=["inp"]]')
    assert_same(before, snapshot(model))
    adapterkit.attach(model).add('ia3[target_modules=["inp"], feedforward_modules=[]]')
    assert not model.inp.is_feedforward


# -- the model API -----------------------------------------------------------------------------
def two_adapters(tmp_path):
    """A llama with scrambled adapters 'a' and 'b', saved; and a peft model holding the same two."""
    model = llama()
    adapters = adapterkit.attach(model)
    adapters.add(SPEC, "a")
    scramble(model, 1)
    adapters.add('ia3[target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]]', "b")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("ia3_l.b"):
                param.copy_(torch.rand(param.shape, generator=g) + 0.5)
    adapters.save(tmp_path)
    peft_model = PeftModel.from_pretrained(llama(), tmp_path / "a", adapter_name="a").eval()
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    return model, adapters, peft_model


def test_several_adapters_and_set_active_match_peft(tmp_path) -> None:
    model, adapters, peft_model = two_adapters(tmp_path)
    base = output(llama(), IDS)
    assert adapters.active == ["b"]
    peft_model.base_model.set_adapter("b")
    assert max_diff(output(model, IDS), output(peft_model, IDS)) <= 1e-6

    adapters.set_active(["a", "b"])  # (IA)^3 vectors multiply
    peft_model.base_model.set_adapter(["a", "b"])
    both = output(model, IDS)
    assert max_diff(both, output(peft_model, IDS)) <= 1e-6
    adapters.set_active("a")
    peft_model.base_model.set_adapter("a")
    only_a = output(model, IDS)
    assert max_diff(only_a, output(peft_model, IDS)) <= 1e-6
    assert max_diff(only_a, both) > 1e-4
    # only active, trainable adapters train
    assert all(p.requires_grad == n.endswith(".a") for n, p in model.named_parameters() if "ia3_l" in n)
    adapters.set_active([])
    assert max_diff(output(model, IDS), base) == 0


def test_enable_disable(tmp_path) -> None:
    model = llama()
    adapters = adapterkit.attach(model)
    adapters.add(SPEC)
    scramble(model, 3)
    with_adapter = output(model, IDS)
    adapters.disable()
    assert torch.equal(output(model, IDS), output(llama(), IDS))
    assert not any(p.requires_grad for p in model.parameters())
    adapters.enable()
    assert torch.equal(output(model, IDS), with_adapter)
    assert all(p.requires_grad for n, p in model.named_parameters() if "ia3_l" in n)


def test_merge_matches_peft_and_unmerge_is_approximate(tmp_path) -> None:
    model = llama()
    adapters = adapterkit.attach(model)
    adapters.add(SPEC)
    scramble(model, 4)
    unmerged = output(model, IDS)
    original = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    adapters.save(tmp_path)

    adapters.merge()
    assert adapters.merged == ["default"]
    merged = output(model, IDS)
    assert max_diff(merged, unmerged) <= 1e-5
    assert any(not torch.equal(p, original[n]) for n, p in model.named_parameters() if n in original)
    peft_model = PeftModel.from_pretrained(llama(), tmp_path).eval()
    peft_model.merge_adapter()
    assert max_diff(merged, output(peft_model, IDS)) <= 1e-6

    with pytest.warns(UserWarning, match="inaccurate"):
        adapters.unmerge()
    assert adapters.merged == []
    for name, param in model.named_parameters():
        if name in original:  # approximate: division by the vector + 1e-8
            torch.testing.assert_close(param, original[name], rtol=1e-5, atol=1e-6)
    assert max_diff(output(model, IDS), unmerged) <= 1e-5


def test_delete_restores_the_model(tmp_path) -> None:
    model = llama()
    before = snapshot(model)
    base = output(model, IDS)
    model, adapters, _ = two_adapters(tmp_path)
    adapters.set_active("a")
    only_a = output(model, IDS)
    adapters.delete("b")
    assert adapters.names == ["a"]
    assert torch.equal(output(model, IDS), only_a)
    assert not any("ia3_l.b" in n for n, _ in model.named_parameters())
    adapters.delete("a")
    after = snapshot(model)
    assert after[0] == before[0] and list(after[1]) == list(before[1])
    assert torch.equal(output(model, IDS), base)


def test_failed_add_or_load_leaves_the_model_unchanged(tmp_path) -> None:
    model = llama()
    adapters = adapterkit.attach(model)
    adapters.add(SPEC, "a")
    train(model, IDS, steps=1)
    adapters.save(tmp_path)
    good = load_file(tmp_path / "a" / "adapter_model.safetensors")
    before, out = snapshot(model), output(model, IDS)

    def unchanged() -> None:
        assert_same(before, snapshot(model))
        assert torch.equal(output(model, IDS), out)
        assert adapters.names == ["a"] and adapters.active == ["a"]

    with pytest.raises(adapterkit.TargetError):
        adapters.add('ia3[target_modules=["nope"], feedforward_modules=[]]', "b")
    unchanged()
    wrong = dict(good)
    key = next(k for k in wrong if "down_proj" in k)
    wrong[key] = torch.ones(1, 32)
    with pytest.raises(adapterkit.StateDictMismatchError, match="wrong shapes"):
        adapters.load(tmp_path / "a", "b", state_dict=wrong)
    unchanged()
    missing = {k: v for k, v in good.items() if "layers.1" not in k}
    with pytest.raises(adapterkit.StateDictMismatchError, match="missing keys"):
        adapters.load(tmp_path / "a", "b", state_dict=missing)
    unchanged()
    with pytest.raises(adapterkit.AdapterExistsError):
        adapters.load(tmp_path / "a", "a")
    unchanged()
    # a good load still works afterwards and equals the original adapter
    adapters.load(tmp_path / "a", "b")
    assert torch.equal(output(model, IDS), out)


def test_state_dict_keys() -> None:
    model = llama()
    adapters = adapterkit.attach(model)
    adapters.add(SPEC)
    keys = sorted(adapters.state_dict(prefix=""))
    assert keys == sorted(
        f"model.layers.{i}.{m}.ia3_l"
        for i in range(2)
        for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    assert all(k.startswith(PREFIX) for k in adapters.state_dict())


@pytest.mark.parametrize("case", ["llama", "conv"])
def test_per_sample_routes_rows(case: str) -> None:
    factory, x, spec, _ = CASES[case]
    model = factory()
    adapters = adapterkit.attach(model)
    adapters.add(spec, "a")
    adapters.add(spec, "b")
    scramble(model, 5)
    expected = {}
    for name in ("a", "b"):
        adapters.set_active(name)
        expected[name] = output(model, x)
    expected["__base__"] = output(factory(), x)
    rows = ["b", "__base__", "a"]
    with adapters.per_sample(rows):
        mixed = output(model, x)
    for i, row in enumerate(rows):
        assert max_diff(mixed[i], expected[row][i]) <= 1e-6, row
    assert max_diff(expected["a"], expected["b"]) > 1e-4
    # routing is gone after the block
    assert torch.equal(output(model, x), expected["b"])
    with pytest.raises(adapterkit.PerSampleError), adapters.per_sample(["a", "b"]):
        output(model, x)
