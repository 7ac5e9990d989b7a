"""Methods stacked on the same layers, in every order of two: outputs, saved keys, merges.

Each adapted layer carries a stack of wrappers, innermost first (``adapterkit.layers``): an
adapter added later wraps what is there, so it acts after everything added before it. The
oracle here is the analytic result of applying the adapters' own tensors in that order.
"""

from __future__ import annotations

import itertools

import adapterkit
import pytest
import torch
from adapterkit.layers import owner
from conftest import Fingerprint, make_mlp, mlp_input, run
from torch import nn

TARGETS = '["embed", "head"]'
SPECS = {
    "lora": f"lora[r=4, lora_alpha=8, target_modules={TARGETS}, init_lora_weights=False]",
    "ia3": f'ia3[target_modules={TARGETS}, feedforward_modules=["head"], init_ia3_weights=False]',
    "adalora": f"adalora[init_r=4, lora_alpha=8, total_step=10, target_modules={TARGETS}, init_lora_weights=False]",
}
PAIRS = list(itertools.permutations(SPECS, 2))


def add(adapters: adapterkit.Adapters, method: str, name: str, seed: int) -> None:
    torch.manual_seed(seed)
    adapters.add(SPECS[method], name)


def alone(method: str, seed: int) -> dict[str, torch.Tensor]:
    adapters = adapterkit.attach(make_mlp())
    add(adapters, method, "x", seed)
    return adapters.state_dict("x", prefix="")


def adapted(method: str, tensors: dict[str, torch.Tensor], path: str, inner, x: torch.Tensor) -> torch.Tensor:
    """What a layer of ``method`` computes over ``inner`` (the stack below it), from its adapter's tensors."""
    t = {key.removeprefix(f"{path}."): value for key, value in tensors.items() if key.startswith(f"{path}.")}
    if method == "lora":
        return inner(x) + x @ t["lora_A.weight"].T @ t["lora_B.weight"].T * (8 / 4)
    if method == "adalora":
        return inner(x) + x @ (t["lora_A"] * t["lora_E"]).T @ t["lora_B"].T * 8 / (4 + 1e-5)
    scale = t["ia3_l"].flatten()
    return inner(x * scale) if path == "head" else inner(x) * scale


class Stacked(nn.Module):
    """The oracle layer: ``base`` with each (method, tensors) applied over it, innermost first."""

    def __init__(self, base: nn.Linear, path: str, stack: list[tuple[str, dict[str, torch.Tensor]]]) -> None:
        super().__init__()
        self.base, self.path, self.stack = base, path, stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        function = self.base
        for method, tensors in self.stack:
            function = (lambda f, m, t: lambda v: adapted(m, t, self.path, f, v))(function, method, tensors)
        return function(x)


def oracle(stack: list[tuple[str, dict[str, torch.Tensor]]]) -> nn.Module:
    model = make_mlp()
    model.embed = Stacked(model.embed, "embed", stack)
    model.head = Stacked(model.head, "head", stack)
    return model


@pytest.mark.parametrize(("inner", "outer"), PAIRS)
def test_two_methods_on_the_same_layers_act_in_the_order_they_were_added(inner, outer):
    model, x = make_mlp(), mlp_input()
    adapters = adapterkit.attach(model)
    add(adapters, inner, "a", seed=1)
    add(adapters, outer, "b", seed=2)
    assert [layer.methods for layer in adapters.layers()] == [(inner, outer)] * 2
    assert [w.adapters for layer in adapters.layers() for w in layer.wrappers] == [("a",), ("b",)] * 2
    assert owner(model.head) == outer and owner(model.head.base_layer) == inner
    expected = run(oracle([(inner, alone(inner, 1)), (outer, alone(outer, 2))]), x)
    for order in (["a", "b"], ["b", "a"]):
        adapters.set_active(order)
        assert torch.allclose(run(model, x), expected, atol=1e-5), order
    for name, method, seed in (("a", inner, 1), ("b", outer, 2)):  # keys and values as the adapter has alone
        state, reference = adapters.state_dict(name, prefix=""), alone(method, seed)
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


@pytest.mark.parametrize(("inner", "outer"), PAIRS)
@pytest.mark.parametrize("active_order", [("a", "b"), ("b", "a")])
def test_merge_folds_innermost_first_whatever_the_active_order(inner, outer, active_order):
    model, x = make_mlp(), mlp_input()
    adapters = adapterkit.attach(model)
    add(adapters, inner, "a", seed=1)
    add(adapters, outer, "b", seed=2)
    adapters.set_active(list(active_order))
    before = run(model, x)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    adapters.merge()
    assert adapters.merged == ["a", "b"]
    assert torch.allclose(run(model, x), before, atol=1e-5)
    adapters.unmerge()
    assert adapters.merged == []
    assert torch.allclose(run(model, x), before, atol=1e-5)
    for n, p in model.named_parameters():
        if n in base_weights:
            assert torch.allclose(p, base_weights[n], atol=1e-5), n


def test_a_merge_that_leaves_an_active_adapter_unmerged_inside_is_refused():
    model, x = make_mlp(), mlp_input()
    adapters = adapterkit.attach(model)
    add(adapters, "ia3", "inner", seed=1)
    add(adapters, "lora", "outer", seed=2)
    adapters.set_active(["inner", "outer"])
    before = Fingerprint(model, x)
    with pytest.raises(adapterkit.AdapterStateError, match=r"\['outer'\].*'inner'.*merge\(\['inner', 'outer'\]\)"):
        adapters.merge(["outer"])
    before.assert_same(model, x)
    assert adapters.merged == []
    adapters.merge(["inner"])  # the inner one alone is exact: the outer one computes on top of the merged weights
    assert torch.allclose(run(model, x), before.output, atol=1e-5)
    adapters.merge(["outer"])  # and then the outer one
    assert adapters.merged == ["inner", "outer"]
    assert torch.allclose(run(model, x), before.output, atol=1e-5)
    adapters.unmerge()
    assert torch.allclose(run(model, x), before.output, atol=1e-5)


def test_an_inner_merge_after_an_outer_one_is_refused():
    model, x = make_mlp(), mlp_input()
    adapters = adapterkit.attach(model)
    add(adapters, "lora", "inner", seed=1)
    add(adapters, "ia3", "outer", seed=2)
    adapters.set_active(["outer"])
    adapters.merge(["outer"])  # "inner" is not active: it computes nothing below
    with pytest.raises(adapterkit.AdapterStateError, match=r"sit inside \['outer'\], which are merged already"):
        adapters.merge(["inner"])
    assert adapters.merged == ["outer"]


def test_the_same_method_twice_around_another_gets_its_own_wrapper():
    model, x = make_mlp(), mlp_input()
    adapters = adapterkit.attach(model)
    add(adapters, "lora", "l1", seed=1)
    add(adapters, "ia3", "i", seed=2)
    add(adapters, "lora", "l2", seed=3)
    assert [layer.methods for layer in adapters.layers()] == [("lora", "ia3", "lora")] * 2
    stack = [("lora", alone("lora", 1)), ("ia3", alone("ia3", 2)), ("lora", alone("lora", 3))]
    adapters.set_active(["l2", "i", "l1"])
    before = run(model, x)
    assert torch.allclose(before, run(oracle(stack), x), atol=1e-5)
    adapters.merge()
    assert adapters.merged == ["l1", "i", "l2"]
    assert torch.allclose(run(model, x), before, atol=1e-5)
    adapters.unmerge()
    assert torch.allclose(run(model, x), before, atol=1e-5)
    for name in ("l1", "i", "l2"):
        adapters.delete(name)
    # IA3's unmerge divides by its vector (as peft's does): the base weights come back up to rounding.
    assert str(model) == str(make_mlp()) and torch.allclose(run(model, x), run(make_mlp(), x), atol=1e-6)


def test_deleting_the_middle_of_a_stack_keeps_the_rest_in_order():
    model, x = make_mlp(), mlp_input()
    adapters = adapterkit.attach(model)
    add(adapters, "ia3", "i", seed=1)
    add(adapters, "lora", "l", seed=2)
    add(adapters, "adalora", "ada", seed=3)
    adapters.delete("l")
    assert [layer.methods for layer in adapters.layers()] == [("ia3", "adalora")] * 2
    adapters.set_active(["i", "ada"])
    expected = oracle([("ia3", alone("ia3", 1)), ("adalora", alone("adalora", 3))])
    assert torch.allclose(run(model, x), run(expected, x), atol=1e-5)
