"""Weighted set_active (``set_active(names, weights=...)``) in eager mode, against peft and the analytic result.

* LoRA: the adapter's scaling times its weight. Weight ``w`` equals peft with
  ``lora_alpha * w`` (rsLoRA too); two adapters give ``base + w1 d1 + w2 d2`` exactly as the
  algebra says; repeated calls do not compound, and weights back to ``None`` put peft's
  scaling back bit for bit. AdaLoRA: the same, on its scaling.
* IA3: ``v_eff = 1 + w (v - 1)``; two adapters multiply their effective vectors; the
  saved/extracted tensors stay the adapter's own; merge folds in the weighted adapter;
  trainable IA3 adapters refuse weights (nothing changes).
* A method whose plugin takes no weights refuses them.
"""

from __future__ import annotations

import copy

import adapterkit
import peft
import pytest
import torch
from adapterkit import UnsupportedOperationError
from peft import IA3Config, LoraConfig
from conftest import make_sequential as make_model
from conftest import run, sequential_input as x_input
from torch import nn

LORA = "lora[r=4, lora_alpha=8, target_modules=['0', '2'], init_lora_weights=False{extra}]"


def peft_output(config: LoraConfig, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """What peft computes for this adapter on a fresh copy of the base model."""
    model = peft.get_peft_model(make_model(), config)
    result = peft.set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys
    model.eval()
    return run(model, x)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("weight", [0.5, 0.0, -1.5, 3.0])
def test_lora_weight_equals_peft_with_alpha_times_weight(weight, rslora):
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model)
    adapters.add(LORA.format(extra=f", use_rslora={rslora}"), "a")
    state = adapters.state_dict("a")
    adapters.set_active("a", weights=[weight])
    expected = peft_output(
        LoraConfig(r=4, lora_alpha=8 * weight, target_modules=["0", "2"], use_rslora=rslora), state, x
    )
    torch.testing.assert_close(run(model, x), expected, rtol=1e-6, atol=1e-6)
    # The weight changes the scaling only: the adapter's tensors (and its files) are its own.
    assert all(torch.equal(v, state[k]) for k, v in adapters.state_dict("a").items())


def test_two_lora_adapters_are_base_plus_weighted_deltas():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6)).eval()
    adapters = adapterkit.attach(model)
    for name, alpha in (("a", 8), ("b", 3)):
        adapters.add(f"lora[r=2, lora_alpha={alpha}, target_modules=['0'], init_lora_weights=False]", name)
    x = x_input()
    adapters.set_active(["a", "b"], weights={"a": 0.7, "b": -2.0})
    out = run(model, x)
    layer = model[0]
    base = layer.base_layer
    delta = {n: (layer.lora_B[n].weight @ layer.lora_A[n].weight) * s for n, s in (("a", 8 / 2), ("b", 3 / 2))}
    expected = x @ (base.weight + 0.7 * delta["a"] - 2.0 * delta["b"]).T + base.bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_weights_do_not_compound_and_none_restores_peft_scaling_exactly():
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model)
    adapters.add(LORA.format(extra=", use_rslora=True"), "a")
    adapters.add(LORA.format(extra=""), "b")
    scalings = {n: dict(model[n].scaling) for n in (0, 2)}
    adapters.set_active(["a", "b"])
    plain = run(model, x)
    adapters.set_active(["a", "b"], weights=[0.3, 2.0])
    once = run(model, x)
    for _ in range(3):
        adapters.set_active(["a", "b"], weights=[0.3, 2.0])
    assert torch.equal(run(model, x), once)
    assert model[0].scaling["a"] == scalings[0]["a"] * 0.3
    adapters.set_active(["b"], weights=[0.5])  # "a" leaves the active set: its weight goes
    assert model[0].scaling["a"] == scalings[0]["a"]
    adapters.set_active(["a", "b"])
    assert {n: dict(model[n].scaling) for n in (0, 2)} == scalings
    assert torch.equal(run(model, x), plain)


def test_weights_survive_copies_and_merge_folds_in_the_weighted_adapter():
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model)
    adapters.add(LORA.format(extra=""), "a")
    adapters.set_active("a", weights=[0.25])
    weighted = run(model, x)
    twin = copy.deepcopy(model)
    assert torch.equal(run(twin, x), weighted)
    adapters.merge()
    torch.testing.assert_close(run(model, x), weighted, rtol=1e-5, atol=1e-5)
    adapters.unmerge()  # (peft's unmerge subtracts: the base weights come back up to rounding)
    adapters.set_active("a")
    adapters.set_active("a", weights=[0.25])
    torch.testing.assert_close(run(model, x), weighted, rtol=1e-5, atol=1e-5)
    assert model[0].scaling["a"] == 0.25 * 2.0


def test_deleted_weighted_adapter_leaves_nothing_behind():
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model)
    adapters.add(LORA.format(extra=""), "a")
    state, config = adapters.state_dict("a"), adapters.config("a")
    adapters.add(LORA.format(extra=""), "b")
    adapters.set_active(["a", "b"], weights=[0.5, 0.5])
    adapters.delete("a")
    adapters.load(None, "a", config=config, state_dict=state)  # a new "a": weight 1
    alone = make_model()
    adapterkit.attach(alone).load(None, "a", config=config, state_dict=state)
    assert torch.equal(run(model, x), run(alone, x))


def test_adalora_weight_scales_its_delta():
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model)
    adapters.add("adalora[target_modules=['0'], init_r=4, lora_alpha=4, total_step=10]", "a")
    with torch.no_grad():  # peft initialises B and E at zero: give the adapter an effect
        model[0].lora_B["a"].normal_()
        model[0].lora_E["a"].normal_()
    adapters.set_active([])
    base = run(model, x)
    adapters.set_active("a")
    full = run(model, x)
    adapters.set_active("a", weights=[-0.5])
    # One adapted layer, its output linear in the delta: base + w (full - base) before the Tanh.
    pre = lambda m: m[0](x)  # noqa: E731
    with torch.no_grad():
        weighted_pre = pre(model)
        adapters.set_active([])
        base_pre = pre(model)
        adapters.set_active("a")
        full_pre = pre(model)
    torch.testing.assert_close(weighted_pre, base_pre - 0.5 * (full_pre - base_pre), rtol=1e-5, atol=1e-5)
    assert not torch.equal(full, base)


# -- IA3 --------------------------------------------------------------------------------

IA3 = "ia3[target_modules=['0', '2'], feedforward_modules=['2']]"


def ia3_model(names=("a", "b")) -> tuple[nn.Module, adapterkit.Adapters, dict[str, dict[str, torch.Tensor]]]:
    """IA3 adapters with random vectors, loaded for inference (not trainable)."""
    model = make_model()
    adapters = adapterkit.attach(model)
    states = {}
    for index, name in enumerate(names):
        generator = torch.Generator().manual_seed(10 + index)
        states[name] = {
            "0.ia3_l": 1 + torch.randn(16, 1, generator=generator) * 0.5,
            "2.ia3_l": 1 + torch.randn(1, 16, generator=generator) * 0.5,
        }
        adapters.load(None, name, config=IA3, state_dict=states[name])
    return model, adapters, states


def ia3_expected(x: torch.Tensor, vectors: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The analytic IA3 output: the first layer's output scaled, the last layer's input scaled."""
    base = make_model()
    out_scale, in_scale = torch.ones(16), torch.ones(16)
    for v in vectors:
        out_scale = out_scale * v["0.ia3_l"].flatten()
        in_scale = in_scale * v["2.ia3_l"].flatten()
    with torch.no_grad():
        hidden = torch.tanh(base[0](x) * out_scale)
        return base[2](hidden * in_scale)


def effective(state: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    return {k: 1 + weight * (v - 1) for k, v in state.items()}


@pytest.mark.parametrize("weights", [(0.5, 1.0), (0.0, 2.0), (-1.0, 0.3)])
def test_ia3_weights_scale_the_deviation_from_one(weights):
    model, adapters, states = ia3_model()
    x = x_input()
    adapters.set_active(["a", "b"], weights=list(weights))
    expected = ia3_expected(x, [effective(states["a"], weights[0]), effective(states["b"], weights[1])])
    torch.testing.assert_close(run(model, x), expected, rtol=1e-5, atol=1e-6)
    # What is saved is the adapter itself, not its weighted form.
    for name in ("a", "b"):
        saved = adapters.state_dict(name, prefix="")
        assert all(torch.equal(saved[k], states[name][k]) for k in states[name])


def test_ia3_weight_one_and_none_give_the_adapter_back_bit_for_bit():
    model, adapters, states = ia3_model(("a",))
    x = x_input()
    plain = run(model, x)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters.set_active("a", weights=[0.2])
    adapters.set_active("a", weights=[-3.0])
    assert not torch.equal(run(model, x), plain)
    adapters.set_active("a")
    assert torch.equal(run(model, x), plain)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def test_ia3_weighted_save_reloads_as_the_adapter(tmp_path):
    model, adapters, states = ia3_model(("a",))
    adapters.set_active("a", weights=[0.5])
    adapters.save(tmp_path)
    other = make_model()
    loaded = adapterkit.attach(other)
    loaded.load(tmp_path / "a", "a")
    x = x_input()
    torch.testing.assert_close(run(other, x), ia3_expected(x, [states["a"]]), rtol=1e-5, atol=1e-6)


def test_ia3_merge_folds_in_the_weighted_vectors():
    model, adapters, states = ia3_model(("a",))
    x = x_input()
    adapters.set_active("a", weights=[0.5])
    weighted = run(model, x)
    adapters.merge()
    torch.testing.assert_close(run(model, x), weighted, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, states["a"][k]) for k, v in adapters.state_dict("a", prefix="").items())


def test_trainable_ia3_refuses_weights_and_nothing_changes():
    model = make_model()
    adapters = adapterkit.attach(model)
    adapters.add(IA3, "a")  # added: trainable
    x = x_input()
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    out = run(model, x)
    with pytest.raises(UnsupportedOperationError, match=r"\['a'\] are trainable"):
        adapters.set_active("a", weights=[0.5])
    assert adapters.active == ["a"]
    assert all(torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] for n, p in model.named_parameters())
    assert torch.equal(run(model, x), out)


def test_enable_refuses_a_weighted_ia3_adapter_that_would_train_and_stays_disabled():
    model = make_model()
    adapters = adapterkit.attach(model)
    adapters.add(IA3, "a")  # trainable
    x = x_input()
    adapters.disable()
    base = run(model, x)
    adapters.set_active("a", weights=[0.5])  # nothing trains while disabled
    with pytest.raises(UnsupportedOperationError, match="trainable"):
        adapters.enable()
    assert not adapters.enabled
    assert torch.equal(run(model, x), base)
    assert not any(p.requires_grad for p in model.parameters())
    adapters.set_active("a")
    adapters.enable()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.ia3_l.a", "2.ia3_l.a"]


def test_ia3_and_lora_weighted_together_match_peft_layers():
    """Weights across two methods on one model: each method weighs its own adapters."""
    model = make_model()
    adapters = adapterkit.attach(model)
    adapters.add(LORA.format(extra=""), "l")
    generator = torch.Generator().manual_seed(5)
    state = {"0.ia3_l": 1 + torch.randn(16, 1, generator=generator), "2.ia3_l": 1 + torch.randn(1, 16, generator=generator)}
    adapters.load(None, "i", config=IA3, state_dict=state, activate=False)
    adapters.set_active(["l", "i"], weights={"l": 0.5, "i": 0.5})
    assert model[0].base_layer.scaling["l"] == 0.5 * 2.0  # LoRA wraps the Linear, IA3 wraps LoRA
    torch.testing.assert_close(model[0].ia3_l["i"].detach(), effective(state, 0.5)["0.ia3_l"])
    adapters.set_active(["l", "i"])
    assert model[0].base_layer.scaling["l"] == 2.0
    assert torch.equal(model[0].ia3_l["i"].detach(), state["0.ia3_l"])


def test_method_without_weights_refuses_them():
    from toy_plugin import ScalePlugin

    manager = adapterkit.make_plugin_manager()
    manager.register(ScalePlugin(), name="toy")
    model = make_model()
    adapters = adapterkit.attach(model, adapterkit.MethodRegistry(manager))
    adapters.add({"method": "scale", "target_modules": ["0"]}, "s")
    with pytest.raises(UnsupportedOperationError, match="does not support weights"):
        adapters.set_active("s", weights=[0.5])
    adapters.set_active("s", weights=[1.0])  # weight 1 is no weight


def test_per_sample_rows_use_the_weight_and_it_cannot_change_under_an_open_block():
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model)
    adapters.add(LORA.format(extra=""), "a")
    adapters.add(LORA.format(extra=""), "b")
    adapters.set_active("a", weights=[0.5])
    weighted = run(model, x)
    rows = ["a"] * len(x)
    with adapters.per_sample(rows):
        assert torch.equal(run(model, x), weighted)
        with pytest.raises(adapterkit.AdapterStateError, match=r"change the weights of \['a'\]"):
            adapters.set_active("a")
        with pytest.raises(adapterkit.AdapterStateError, match="per_sample block is open"):
            adapters.set_active("b")  # "a" would go back to weight 1
        adapters.set_active(["a", "b"], weights=[0.5, 2.0])  # "b" is no row's adapter
        assert torch.equal(run(model, x), weighted)
    assert adapters.active == ["a", "b"]
