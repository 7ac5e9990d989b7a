"""swap(): an adapter's weights replaced in place (peft-based methods), or by delete + load (plugins without the hook).

* In place: every parameter keeps its identity; the values equal a fresh load of the same
  adapter bit for bit, and the outputs equal peft's; LoRA's alpha, rsLoRA, alpha_pattern and
  dropout come from the new config (the scaling follows); a weight set by set_active stays.
* What does not fit in place (other targets, rank, DoRA, bias option, heads, feedforward
  layers) is an UnsupportedOperationError naming it, and the model is exactly as before.
* The core's fallback for a plugin without ``adapterkit_swap`` (the toy method): a failed
  swap leaves the old adapter, its values, activity and outputs.
"""

from __future__ import annotations

import adapterkit
import peft
import pytest
import torch
from adapterkit import AdapterkitError, UnsupportedOperationError
from peft import LoraConfig
from conftest import make_sequential as make_model
from conftest import run, sequential_input as x_input
from torch import nn

TARGETS = "target_modules=['0', '2'], init_lora_weights=False"


def saved_adapter(tmp_path, spec: str, name: str, seed: int) -> str:
    """An adapter made from ``spec`` with seeded random weights, saved to its own folder."""
    model = make_model()
    torch.manual_seed(seed)
    adapters = adapterkit.attach(model)
    adapters.add(spec, name)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    folder = tmp_path / name
    adapters.save(folder, name) if name == "default" else adapters.save(tmp_path, name)
    return str(folder)


class Snapshot:
    """Parameters (values and identities), active set, outputs: "the model is exactly as it was"."""

    def __init__(self, model: nn.Module, adapters: adapterkit.Adapters, x: torch.Tensor) -> None:
        self.params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
        self.scalings = {n: dict(m.scaling) for n, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict)}
        self.active, self.output = adapters.active, run(model, x)

    def assert_same(self, model: nn.Module, adapters: adapterkit.Adapters, x: torch.Tensor) -> None:
        params = dict(model.named_parameters())
        assert list(params) == list(self.params)
        for n, (param, value) in self.params.items():
            assert params[n] is param and torch.equal(param.detach(), value), n
        assert self.scalings == {
            n: dict(m.scaling) for n, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict)
        }
        assert adapters.active == self.active
        assert torch.equal(run(model, x), self.output)


SWAPS = [
    pytest.param(f"lora[r=4, lora_alpha=8, {TARGETS}]", f"lora[r=4, lora_alpha=8, {TARGETS}]", id="lora-same-config"),
    pytest.param(
        f"lora[r=4, lora_alpha=8, {TARGETS}]",
        f"lora[r=4, lora_alpha=3, use_rslora=True, lora_dropout=0.1, alpha_pattern={{'2': 16}}, {TARGETS}]",
        id="lora-other-alpha-rslora-pattern",
    ),
    pytest.param(
        "ia3[target_modules=['0', '2'], feedforward_modules=['2']]",
        "ia3[target_modules=['0', '2'], feedforward_modules=['2']]",
        id="ia3",
    ),
    pytest.param(
        "adalora[target_modules=['0', '2'], init_r=4, lora_alpha=8, total_step=10]",
        "adalora[target_modules=['0', '2'], init_r=4, lora_alpha=3, total_step=10]",
        id="adalora",
    ),
]


@pytest.mark.parametrize(("first", "second"), SWAPS)
@pytest.mark.parametrize("active", [True, False])
def test_swap_in_place_equals_a_fresh_load(tmp_path, first, second, active):
    old = saved_adapter(tmp_path, first, "old", seed=1)
    new = saved_adapter(tmp_path, second, "new", seed=2)
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model)
    adapters.load(old, "x")
    adapters.load(old, "other", activate=False)
    if not active:
        adapters.set_active("other")
    params = {n: p for n, p in model.named_parameters()}
    adapters.swap(new, "x")
    assert {n: p for n, p in model.named_parameters()} == params  # every parameter kept its identity
    assert adapters.active == (["x"] if active else ["other"])

    fresh = make_model()
    reference = adapterkit.attach(fresh)
    reference.load(new, "x")
    reference.load(old, "other", activate=False)
    if not active:
        reference.set_active("other")
    assert sorted(adapters.state_dict("x")) == sorted(reference.state_dict("x"))
    for key, value in reference.state_dict("x").items():
        assert torch.equal(adapters.state_dict("x")[key], value), key
    for (name, mine), (_, theirs) in zip(model.named_modules(), fresh.named_modules()):
        for attr in ("scaling", "lora_alpha", "use_rslora"):
            assert getattr(mine, attr, None) == getattr(theirs, attr, None), (name, attr)
        if hasattr(mine, "lora_dropout"):
            assert [repr(m) for m in mine.lora_dropout.values()] == [repr(m) for m in theirs.lora_dropout.values()]
    adapters.set_active("x")
    reference.set_active("x")
    assert torch.equal(run(model, x), run(fresh, x))
    assert adapters.config("x").to_dict() == reference.config("x").to_dict()


def test_swapped_lora_computes_what_peft_computes(tmp_path):
    old = saved_adapter(tmp_path, f"lora[r=4, lora_alpha=8, {TARGETS}]", "old", seed=1)
    new = saved_adapter(tmp_path, f"lora[r=4, lora_alpha=5, use_rslora=True, {TARGETS}]", "new", seed=2)
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model)
    adapters.load(old, "x")
    adapters.swap(new, "x")
    theirs = peft.PeftModel.from_pretrained(make_model(), new).eval()
    torch.testing.assert_close(run(model, x), run(theirs, x), rtol=0, atol=0)


def test_swap_from_a_state_dict_keeps_the_config_and_never_writes_into_the_callers_tensors():
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model)
    spec = f"lora[r=4, lora_alpha=8, {TARGETS}]"
    adapters.add(spec, "a")
    adapters.add(spec, "b")
    first = {k: v.clone() for k, v in adapters.state_dict("a").items()}
    given = {k: v.clone() for k, v in first.items()}
    adapters.delete("a")
    adapters.load(None, "a", config=adapters.config("b"), state_dict=given)
    adapters.swap(adapters.state_dict("b"), "a")
    assert all(torch.equal(given[k], first[k]) for k in first)  # the load took a copy
    assert all(torch.equal(v, adapters.state_dict("b")[k]) for k, v in adapters.state_dict("a").items())


def test_a_weighted_adapter_keeps_its_weight_through_a_swap(tmp_path):
    ia3 = "ia3[target_modules=['0', '2'], feedforward_modules=['2']]"
    old, new = saved_adapter(tmp_path, ia3, "old", seed=1), saved_adapter(tmp_path, ia3, "new", seed=2)
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model)
    adapters.load(old, "x")
    adapters.set_active("x", weights=[0.5])
    adapters.swap(new, "x")
    reference = make_model()
    theirs = adapterkit.attach(reference)
    theirs.load(new, "x")
    assert all(torch.equal(v, theirs.state_dict("x")[k]) for k, v in adapters.state_dict("x").items())
    theirs.set_active("x", weights=[0.5])
    assert torch.equal(run(model, x), run(reference, x))
    adapters.set_active("x")
    theirs.set_active("x")
    assert torch.equal(run(model, x), run(reference, x))


REFUSED = [
    pytest.param("lora[r=4, target_modules=['0'], init_lora_weights=False]", "other targets", id="targets"),
    pytest.param("lora[r=2, target_modules=['0', '2'], init_lora_weights=False]", "rank 2 on layer '0'", id="rank"),
    pytest.param("lora[r=4, use_dora=True, target_modules=['0', '2'], init_lora_weights=False]", "lora_magnitude_vector", id="dora"),
    pytest.param("lora[r=4, bias='lora_only', target_modules=['0', '2'], init_lora_weights=False]", "bias='lora_only'", id="bias"),
    pytest.param("lora[r=4, lora_bias=True, target_modules=['0', '2'], init_lora_weights=False]", "lora_B", id="lora_bias"),
]


@pytest.mark.parametrize(("spec", "named"), REFUSED)
def test_what_does_not_fit_in_place_is_refused_and_nothing_changes(tmp_path, spec, named):
    old = saved_adapter(tmp_path, f"lora[r=4, {TARGETS}]", "old", seed=1)
    try:
        new = saved_adapter(tmp_path, spec, "new", seed=2)
    except AdapterkitError as error:  # a config adapterkit refuses to build at all
        pytest.skip(str(error))
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model)
    adapters.load(old, "x")
    adapters.set_active("x", weights=[0.7])
    before = Snapshot(model, adapters, x)
    with pytest.raises(UnsupportedOperationError, match="does not fit in place") as error:
        adapters.swap(new, "x")
    if named:
        assert named in str(error.value)
    before.assert_same(model, adapters, x)


@pytest.mark.parametrize("heads_first", [False, True])
def test_other_heads_are_refused(tmp_path, heads_first):
    plain, heads = "lora[r=4, target_modules=['0'], init_lora_weights=False]", "lora[r=4, target_modules=['0'], modules_to_save=['2'], init_lora_weights=False]"
    first, second = (heads, plain) if heads_first else (plain, heads)
    old, new = saved_adapter(tmp_path, first, "old", seed=1), saved_adapter(tmp_path, second, "new", seed=2)
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model)
    adapters.load(old, "x")
    before = Snapshot(model, adapters, x)
    with pytest.raises(UnsupportedOperationError, match="does not fit in place"):
        adapters.swap(new, "x")
    before.assert_same(model, adapters, x)


def test_heads_swap_in_place(tmp_path):
    spec = "lora[r=4, target_modules=['0'], modules_to_save=['2'], init_lora_weights=False]"
    old, new = saved_adapter(tmp_path, spec, "old", seed=1), saved_adapter(tmp_path, spec, "new", seed=2)
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model)
    adapters.load(old, "x")
    adapters.swap(new, "x")
    fresh = make_model()
    adapterkit.attach(fresh).load(new, "x")
    assert torch.equal(run(model, x), run(fresh, x))


def test_ia3_feedforward_layers_must_match(tmp_path):
    # Square layers: the vectors have the same shape either way; the layer's kind differs.
    torch.manual_seed(0)
    spec = "ia3[target_modules=['0', '1'], feedforward_modules={ff}]"

    def square() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).eval()

    folders = {}
    for ff in ("['1']", "['0']"):
        model = square()
        adapters = adapterkit.attach(model)
        adapters.add(spec.format(ff=ff), "a")
        adapters.save(tmp_path / ff.strip("[]'"), "a")
        folders[ff] = tmp_path / ff.strip("[]'") / "a"
    model, x = square(), x_input()
    adapters = adapterkit.attach(model)
    adapters.load(folders["['1']"], "a")
    before = Snapshot(model, adapters, x)
    with pytest.raises(UnsupportedOperationError, match="feedforward"):
        adapters.swap(folders["['0']"], "a")
    before.assert_same(model, adapters, x)


def test_swap_refuses_another_method(tmp_path):
    lora = saved_adapter(tmp_path, f"lora[r=4, {TARGETS}]", "l", seed=1)
    ia3 = saved_adapter(tmp_path, "ia3[target_modules=['0', '2'], feedforward_modules=['2']]", "i", seed=1)
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model)
    adapters.load(lora, "x")
    before = Snapshot(model, adapters, x)
    with pytest.raises(adapterkit.ConfigValueError, match="same method"):
        adapters.swap(ia3, "x")
    before.assert_same(model, adapters, x)


# -- the core's fallback: delete + load, for a plugin without adapterkit_swap ---------------------


def toy_registry() -> adapterkit.MethodRegistry:
    from toy_plugin import ScalePlugin

    manager = adapterkit.make_plugin_manager()
    manager.register(ScalePlugin(), name="toy")
    return adapterkit.MethodRegistry(manager)


def test_fallback_swap_replaces_the_adapter_and_keeps_activity():
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model, toy_registry())
    config = {"method": "scale", "target_modules": ["0"]}
    adapters.add(config, "s")
    adapters.add(config, "t")
    adapters.set_active(["s", "t"])
    new = {"0.scale": torch.linspace(0.5, 2.0, 16)}
    adapters.swap(new, "s")
    assert adapters.active == ["s", "t"]
    assert torch.equal(adapters.state_dict("s", prefix="")["0.scale"], new["0.scale"])
    with torch.no_grad():
        expected = model[2](torch.tanh(model[0].base_layer(x) * new["0.scale"]))  # "t" scales by 1
    assert torch.equal(run(model, x), expected)


def test_fallback_swap_that_fails_leaves_the_old_adapter():
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model, toy_registry())
    adapters.add({"method": "scale", "target_modules": ["0"]}, "s")
    with torch.no_grad():
        model[0].scales["s"].mul_(1.5)
    old = {k: v.clone() for k, v in adapters.state_dict("s").items()}
    out = run(model, x)
    with pytest.raises(adapterkit.PluginError, match="KeyError"):
        adapters.swap({"2.scale": torch.ones(8)}, "s")  # the toy plugin finds no "0.scale": its load fails
    assert adapters.names == ["s"] and adapters.active == ["s"]
    assert all(torch.equal(v, old[k]) for k, v in adapters.state_dict("s").items())
    assert torch.equal(run(model, x), out)


def test_an_adapter_that_trains_biases_swaps_them_in_place_too(tmp_path):
    spec = "lora[r=4, bias='lora_only', target_modules=['0', '2'], init_lora_weights=False]"
    old, new = saved_adapter(tmp_path, spec, "old", seed=1), saved_adapter(tmp_path, spec, "new", seed=2)
    model, x = make_model(), x_input()
    adapters = adapterkit.attach(model)
    adapters.load(old, "x")
    biases = [model[0].base_layer.bias, model[2].base_layer.bias]
    adapters.swap(new, "x")
    fresh = make_model()
    theirs = adapterkit.attach(fresh)
    theirs.load(new, "x")
    assert model[0].base_layer.bias is biases[0] and model[2].base_layer.bias is biases[1]  # the same parameters
    assert torch.equal(run(model, x), run(fresh, x))
    adapters.set_active([])
    theirs.set_active([])
    assert torch.equal(run(model, x), run(fresh, x))  # the original biases are back when it is inactive
