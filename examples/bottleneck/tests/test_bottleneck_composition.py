"""The bottleneck method and LoRA on the same layers, in both orders: outputs, saves, merges.

An adapter added later wraps what is there (adapterkit.layers), so it acts after the ones
added before it; the oracle applies each adapter's own tensors in that order.
"""

from __future__ import annotations

import adapterkit
import pytest
import torch
from adapterkit.layers import owner
from adapterkit_bottleneck import BottleneckLayer
from torch import nn

pytest.importorskip("adapterkit_lora")

SPECS = {
    "bottleneck": 'bottleneck[bottleneck_dim=3, init="random", target_modules=["0", "2"]]',
    "lora": 'lora[r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False]',
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))


def add(adapters: adapterkit.Adapters, method: str, name: str, seed: int) -> None:
    torch.manual_seed(seed)
    adapters.add(SPECS[method], name)


def alone(method: str, seed: int) -> dict[str, torch.Tensor]:
    adapters = adapterkit.attach(make_model())
    add(adapters, method, "x", seed)
    return adapters.state_dict("x", prefix="")


def layer_fn(method: str, t: dict[str, torch.Tensor], path: str, inner):
    t = {k.removeprefix(f"{path}."): v for k, v in t.items() if k.startswith(f"{path}.")}
    if method == "lora":
        return lambda x: inner(x) + x @ t["lora_A.weight"].T @ t["lora_B.weight"].T * 2.0

    def bottleneck(x: torch.Tensor) -> torch.Tensor:
        out = inner(x)
        hidden = torch.relu(out @ t["bottleneck.down.weight"].T + t["bottleneck.down.bias"])
        return out + hidden @ t["bottleneck.up.weight"].T + t["bottleneck.up.bias"]

    return bottleneck


def oracle(stack: list[tuple[str, dict[str, torch.Tensor]]], x: torch.Tensor) -> torch.Tensor:
    base = make_model()
    first, second = base[0], base[2]
    for method, tensors in stack:
        first, second = layer_fn(method, tensors, "0", first), layer_fn(method, tensors, "2", second)
    with torch.no_grad():
        return second(torch.relu(first(x)))


@pytest.mark.parametrize("first", ["bottleneck", "lora"])
def test_both_orders_act_in_the_order_added_and_save_what_they_have_alone(first, tmp_path):
    second = "lora" if first == "bottleneck" else "bottleneck"
    model = make_model()
    adapters = adapterkit.attach(model)
    add(adapters, first, "a", seed=1)
    add(adapters, second, "b", seed=2)
    assert [layer.methods for layer in adapters.layers()] == [(first, second)] * 2
    assert owner(model[0]) == second and owner(model[0].base_layer) == first
    assert isinstance(model[0] if second == "bottleneck" else model[0].base_layer, BottleneckLayer)
    expected = oracle([(first, alone(first, 1)), (second, alone(second, 2))], X)
    for order in (["a", "b"], ["b", "a"]):
        adapters.set_active(order)
        assert torch.allclose(run(model, X), expected, atol=1e-5), order
    adapters.save(tmp_path)
    for name, method, seed in (("a", first, 1), ("b", second, 2)):
        state, reference = adapters.state_dict(name, prefix=""), alone(method, seed)
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
        fresh = make_model()
        adapterkit.attach(fresh).load(tmp_path / name, name)
        single = make_model()
        add(adapterkit.attach(single), method, "x", seed)
        assert torch.allclose(run(fresh, X), run(single, X), atol=1e-6)


def test_merging_lora_over_an_active_bottleneck_is_refused():
    """adapterkit_layer_adapters tells the core which adapter sits at which depth of each stack."""
    model = make_model()
    adapters = adapterkit.attach(model)
    add(adapters, "bottleneck", "neck", seed=1)
    add(adapters, "lora", "lora", seed=2)
    assert [w.adapters for w in adapters.layers()[0].wrappers] == [("neck",), ("lora",)]
    adapters.set_active(["lora", "neck"])
    before = run(model, X)
    weights = [p.detach().clone() for p in model.parameters()]
    for names in (None, ["lora"]):
        with pytest.raises(adapterkit.UnsupportedOperationError, match="bottleneck"):
            adapters.merge(names)
        assert adapters.merged == [] and all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
        assert torch.equal(run(model, X), before)
    adapters.set_active(["lora"])  # nothing computes between LoRA and the weights it folds into
    unmerged = run(model, X)
    adapters.merge()
    assert torch.allclose(run(model, X), unmerged, atol=1e-5)
    adapters.unmerge()


def test_merging_lora_under_an_active_bottleneck_is_exact():
    model = make_model()
    adapters = adapterkit.attach(model)
    add(adapters, "lora", "lora", seed=1)
    add(adapters, "bottleneck", "neck", seed=2)
    adapters.set_active(["neck", "lora"])
    before = run(model, X)
    adapters.merge(["lora"])
    assert adapters.merged == ["lora"]
    assert torch.allclose(run(model, X), before, atol=1e-5)
    adapters.unmerge()
    assert torch.allclose(run(model, X), before, atol=1e-5)
