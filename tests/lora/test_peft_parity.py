"""What the peft matrix (test_peft_matrix.py) does not show on its own: nn.MultiheadAttention as the issue
reported it, base biases an adapter trains (bias='all' / 'lora_only'), and target_parameters on a real
transformers mixture-of-experts model."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft_matrix import make_input, make_model, run
from safetensors.torch import load_file
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

import adapterkit
from adapterkit import ConfigValueError, UnsupportedOperationError


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    torch.manual_seed(0)
    out = model(x)
    (out.logits if hasattr(out, "logits") else out).square().mean().backward()
    with torch.no_grad():
        for param in params:
            param -= 0.2 * param.grad
            param.grad = None
    model.eval()


# -- nn.MultiheadAttention ------------------------------------------------------------------------
class Attention(nn.Module):
    """The model of the issue: nn.MultiheadAttention(10, 2), sequence first, unbatched input."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x)[0]


def attention() -> nn.Module:
    torch.manual_seed(0)
    return Attention().eval()


@pytest.mark.parametrize("init", [True, False], ids=["peft-default-init", "random-init"])
def test_issue_repro_mha_checkpoint_loads_with_peft_outputs(init, tmp_path):
    x = torch.randn(7, 10, generator=torch.Generator().manual_seed(1))
    theirs = get_peft_model(attention(), LoraConfig(target_modules=["mha"], init_lora_weights=init)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.mha.base_layer.out_proj.lora_A.weight" in saved

    model = attention()
    adapters = adapterkit.attach(model)
    adapters.load(tmp_path / "peft")
    assert torch.equal(run(model, x), run(theirs, x))
    assert adapters.state_dict().keys() == saved.keys()
    assert all(torch.equal(adapters.state_dict()[key], value) for key, value in saved.items())

    # both directions: adapterkit's save loads in peft, and in adapterkit
    adapters.save(tmp_path / "ours")
    again = PeftModel.from_pretrained(attention(), tmp_path / "ours").eval()
    assert torch.equal(run(again, x), run(theirs, x))
    ours_again = attention()
    adapterkit.attach(ours_again).load(tmp_path / "ours")
    assert torch.equal(run(ours_again, x), run(theirs, x))


def test_mha_base_weights_stay_exact_across_forwards():
    """peft's layer merges and unmerges around each call, which rounds its base weights; adapterkit's do not move."""
    x = torch.randn(7, 10, generator=torch.Generator().manual_seed(1))
    model = attention()
    base = run(model, x)
    originals = [model.mha.in_proj_weight.detach().clone(), model.mha.out_proj.weight.detach().clone()]
    theirs = get_peft_model(attention(), LoraConfig(target_modules=["mha"], init_lora_weights=False)).eval()
    run(theirs, x)
    drifted = theirs.base_model.model.mha.base_layer.in_proj_weight
    assert not torch.equal(drifted, originals[0])  # why adapterkit puts the weights back (see _ExactBaseForward)

    adapters = adapterkit.attach(model)
    adapters.add("lora[target_modules=['mha'], init_lora_weights=False]")
    train_step(model, x)
    adapted = run(model, x)
    assert torch.equal(run(model, x), adapted)
    layer = model.mha
    assert isinstance(layer.base_layer.out_proj, BaseTunerLayer)  # peft adapts out_proj inside the layer
    assert torch.equal(layer.base_layer.in_proj_weight, originals[0])
    assert torch.equal(layer.base_layer.out_proj.base_layer.weight, originals[1])
    with adapters.disabled():
        assert torch.equal(run(model, x), base)
    adapters.delete("default")
    assert type(model.mha) is nn.MultiheadAttention and not isinstance(model.mha.out_proj, BaseTunerLayer)
    assert torch.equal(model.mha.in_proj_weight, originals[0]) and torch.equal(model.mha.out_proj.weight, originals[1])
    assert torch.equal(run(model, x), base)


# -- base biases -------------------------------------------------------------------------------------
def biased(tmp_path, option="all"):
    """``a``: a bias adapter trained one step; ``b``: a plain adapter on proj_out. Saved by adapterkit, both."""
    x = make_input("dense")
    model = make_model("dense")
    adapters = adapterkit.attach(model)
    torch.manual_seed(3)
    adapters.add(f"lora[target_modules=['proj_in'], bias='{option}', init_lora_weights=False]", "a")
    train_step(model, x)
    adapters.add("lora[target_modules=['proj_out'], init_lora_weights=False]", "b")
    adapters.save(tmp_path)
    return model, adapters, x


@pytest.mark.parametrize("option", ["all", "lora_only"])
def test_biases_are_the_adapters_while_it_is_active(option, tmp_path):
    model, adapters, x = biased(tmp_path, option)
    original = make_model("dense")
    bias_in, bias_out = model.proj_in.base_layer.bias, model.proj_out.base_layer.bias
    # b is active (the last added): the base biases are the original ones
    assert torch.equal(bias_in, original.proj_in.bias) and torch.equal(bias_out, original.proj_out.bias)
    adapters.set_active("a")
    assert not torch.equal(bias_in, original.proj_in.bias)
    assert torch.equal(bias_out, original.proj_out.bias) is (option == "lora_only")
    assert model.proj_in.base_layer.bias is bias_in  # the same parameter objects: optimisers keep working

    # both active: as peft computes them (there the trained biases simply stay in the base model)
    adapters.set_active(["a", "b"])
    theirs = PeftModel.from_pretrained(make_model("dense"), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.base_model.set_adapter(["a", "b"])
    assert torch.equal(run(model, x), run(theirs.eval(), x))


def test_bias_adapter_saved_while_inactive_keeps_its_biases(tmp_path):
    model, adapters, _ = biased(tmp_path / "first")
    adapters.save(tmp_path / "second", "a")
    adapters.set_active("a")
    adapters.save(tmp_path / "third", "a")
    for folder in ("first/a", "second/a"):
        saved = load_file(tmp_path / folder / "adapter_model.safetensors")
        expected = load_file(tmp_path / "third/a/adapter_model.safetensors")
        assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    assert "base_model.model.proj_out.bias" in saved and "base_model.model.proj_in.base_layer.bias" in saved


@pytest.mark.parametrize("trainable", [False, True])
def test_biases_train_with_the_adapter(trainable, tmp_path):
    biased(tmp_path)
    model = make_model("dense")
    adapters = adapterkit.attach(model)
    adapters.load(tmp_path / "a", "a", is_trainable=trainable)
    biases = [model.proj_in.base_layer.bias, model.proj_out.bias]
    assert all(p.requires_grad is trainable for p in biases)
    with adapters.disabled():
        assert not any(p.requires_grad for p in biases)
    adapters.delete("a")
    assert not any(p.requires_grad for p in biases)  # as the first adapter left the base: frozen


def test_delete_gives_back_the_original_biases(tmp_path):
    model, adapters, x = biased(tmp_path)
    adapters.set_active("a")
    adapters.delete("b")
    adapters.delete("a")
    original = make_model("dense")
    for name, param in original.named_parameters():
        assert torch.equal(model.get_parameter(name), param), name
    assert torch.equal(run(model, x), run(original, x))


def test_per_sample_rows_of_other_adapters_do_not_see_the_biases(tmp_path):
    model, adapters, x = biased(tmp_path)
    rows = ["b", "__base__", "b", "__base__", "b", "b"]
    adapters.set_active("a")  # active: its biases are in the model, for every row and every thread
    before = run(model, x)
    with pytest.raises(UnsupportedOperationError, match="set_active\\(\\) without 'a' first"):
        with adapters.per_sample(rows):
            model(x)
    assert torch.equal(run(model, x), before)
    adapters.set_active("b")
    with adapters.per_sample(rows):
        out = run(model, x)
    only_b = make_model("dense")
    adapterkit.attach(only_b).load(tmp_path / "b", "b")
    expected = run(only_b, x)
    base = run(make_model("dense"), x)
    for i, row in enumerate(rows):
        assert torch.equal(out[i], (expected if row == "b" else base)[i])
    with pytest.raises(UnsupportedOperationError, match="trains base biases"):
        with adapters.per_sample(["a", "b", "a", "b", "a", "b"]):
            model(x)


# -- target_parameters: mixture-of-experts weights --------------------------------------------------------
def mixtral() -> nn.Module:
    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=32, num_local_experts=3, num_experts_per_tok=2,
    )  # fmt: skip
    return MixtralForCausalLM(config).eval()


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


MOE = dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"], r=4)


def test_expert_weights_both_directions_like_peft(tmp_path):
    x = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(1))
    theirs = get_peft_model(mixtral(), LoraConfig(**MOE, init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    model = mixtral()
    adapters = adapterkit.attach(model)
    adapters.load(tmp_path / "peft")
    assert torch.equal(logits(model, x), logits(theirs, x))
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in saved  # the nested wrapper
    assert adapters.state_dict().keys() == saved.keys()

    fresh = mixtral()
    ours = adapterkit.attach(fresh)
    torch.manual_seed(4)
    ours.add(LoraConfig(**MOE, init_lora_weights=False))
    train_step(fresh, x[:, :4])
    ours.save(tmp_path / "ours")
    back = PeftModel.from_pretrained(mixtral(), tmp_path / "ours").eval()
    assert torch.equal(logits(back, x), logits(fresh, x))
    expected = get_peft_model_state_dict(back)
    assert ours.state_dict().keys() == expected.keys()
    assert all(torch.equal(ours.state_dict()[key], value) for key, value in expected.items())


def test_expert_weights_merge_like_peft_and_refuse_rows(tmp_path):
    x = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(1))
    get_peft_model(mixtral(), LoraConfig(**MOE, init_lora_weights=False)).save_pretrained(tmp_path)
    theirs = PeftModel.from_pretrained(mixtral(), tmp_path).eval()
    model = mixtral()
    adapters = adapterkit.attach(model)
    adapters.load(tmp_path)
    with pytest.raises(UnsupportedOperationError, match="ParamWrapper"):
        with adapters.per_sample(["default", "__base__", "default"]):
            model(x)
    adapters.merge()
    theirs.merge_adapter()
    assert torch.equal(logits(model, x), logits(theirs, x))
    adapters.unmerge()
    theirs.unmerge_adapter()
    assert torch.equal(logits(model, x), logits(theirs, x))
    ours_experts = model.model.layers[0].mlp.experts.get_base_layer()
    their_experts = theirs.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    assert torch.equal(ours_experts.gate_up_proj, their_experts.gate_up_proj)


def test_expert_weights_delete_gives_back_the_model():
    x = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(1))
    model = mixtral()
    base = logits(model, x)
    structure = str(model)
    adapters = adapterkit.attach(model)
    adapters.add(LoraConfig(**MOE, init_lora_weights=False))
    assert not torch.equal(logits(model, x), base)
    adapters.delete("default")
    assert str(model) == structure
    assert torch.equal(logits(model, x), base)


def test_bias_with_heads_is_refused_and_changes_nothing():
    """peft would also save the heads' original biases (modules_to_save): not supported together yet."""
    x = make_input("dense")
    model = make_model("dense")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    adapters = adapterkit.attach(model)
    with pytest.raises(ConfigValueError, match=r"bias='all' together with modules_to_save=\['proj_out'\]"):
        adapters.add("lora[target_modules=['proj_in'], bias='all', modules_to_save=['proj_out']]")
    assert adapters.names == [] and str(model) == str(make_model("dense"))
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert torch.equal(run(model, x), run(make_model("dense"), x))
