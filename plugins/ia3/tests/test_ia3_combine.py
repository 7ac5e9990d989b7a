"""``combine`` for IA3 (``adapterkit_combine``): v = 1 + Σ w_i (v_i - 1) per layer, against peft and analytically."""

from __future__ import annotations

import adapterkit
import pytest
import torch
from adapterkit import ConfigValueError
from peft import PeftModel
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA_A = 'ia3[target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]]'
LLAMA_B = 'ia3[target_modules=["v_proj", "up_proj"], feedforward_modules=["up_proj"]]'


def llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=64,
    )
    return LlamaForCausalLM(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()).logits


def with_adapters(*specs):
    model = llama()
    adapters = adapterkit.attach(model)
    for index, spec in enumerate(specs):
        adapters.add(spec, "ab"[index])
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if "ia3_l" in name:  # vectors away from 1, so that every adapter changes the outputs
            param.data = 1 + 0.3 * torch.randn_like(param)
    return model, adapters


def vectors(adapters, name):
    return {key.removesuffix(".ia3_l"): value for key, value in adapters.state_dict(name, prefix="").items()}


def test_each_layer_gets_one_plus_the_weighted_deviations_and_an_absent_adapter_adds_nothing(tmp_path):
    model, adapters = with_adapters(LLAMA_A, LLAMA_B)
    a, b = vectors(adapters, "a"), vectors(adapters, "b")
    adapters.combine(["a", "b"], [0.7, -0.4], "c")  # how="linear"
    c = vectors(adapters, "c")
    assert sorted(c) == sorted(set(a) | set(b))
    for path, vector in c.items():
        expected = 1 + 0.7 * (a.get(path, 1) - 1) - 0.4 * (b.get(path, 1) - 1)
        assert torch.allclose(vector, expected, atol=1e-6), path
    adapters.combine(["a"], [0.5], "weaker")
    assert all(torch.allclose(vectors(adapters, "weaker")[p], 1 + 0.5 * (v - 1)) for p, v in a.items())
    # the result saves and reloads, in adapterkit and in peft, with the feedforward layers it had
    adapters.set_active("c")
    ours = logits(model)
    adapters.save(tmp_path, ["c"])
    fresh = llama()
    adapterkit.attach(fresh).load(tmp_path / "c")
    assert torch.equal(logits(fresh), ours)
    theirs = PeftModel.from_pretrained(llama(), tmp_path / "c").eval()
    assert torch.allclose(logits(theirs), ours, atol=1e-6)
    feedforward = {p for p, m in theirs.named_modules() if getattr(m, "is_feedforward", False)}
    assert {p.removeprefix("base_model.model.") for p in feedforward} == {
        p for p in c if p.endswith(("down_proj", "up_proj"))
    }


def test_equals_peft_add_weighted_adapter_where_every_adapter_adapts_the_layer_and_weights_sum_to_one(tmp_path):
    model, adapters = with_adapters(LLAMA_A, LLAMA_A)
    adapters.save(tmp_path, ["a", "b"])
    theirs = PeftModel.from_pretrained(llama(), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.add_weighted_adapter(["a", "b"], [0.3, 0.7], "c")
    theirs.set_adapter("c")
    adapters.combine(["a", "b"], [0.3, 0.7], "c")
    adapters.set_active("c")
    assert torch.allclose(logits(model), logits(theirs.eval()), atol=1e-6)


@pytest.mark.parametrize(("how", "options", "match"), [
    ("cat", {}, r"how='cat' is not an IA3 combination; IA3 offers \['linear'\]"),
    ("linear", {"density": 0.5}, r"takes no options, got \['density'\]"),
])
def test_other_combinations_and_options_are_config_errors_and_change_nothing(how, options, match):
    model, adapters = with_adapters(LLAMA_A, LLAMA_B)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigValueError, match=match):
        adapters.combine(["a", "b"], [0.5, 0.5], "c", how=how, **options)
    assert adapters.names == ["a", "b"]
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
