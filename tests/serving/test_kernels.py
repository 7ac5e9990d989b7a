"""The batched per-sample kernels (adapterkit_peft.kernels) against peft's own layers.

Oracles: peft's LoRA mixed-batch forward (``layer(x, adapter_names=rows)``, i.e.
``LoraLayer._mixed_batch_forward``) and active-adapter forward; for IA3 (peft has no
mixed batch) the layer's forward with each row's adapter active, row by row. Banks
are filled from the peft layers' own weights, zero-padded to the largest rank.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
from adapterkit.errors import ArgumentValueError
from adapterkit_peft.kernels import (
    BASE,
    choose,
    ia3_active,
    ia3_active_vector,
    ia3_rows,
    lora_delta_active,
    lora_delta_rows,
    plan_rows,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import IA3Config, LoraConfig, inject_adapter_in_model
from peft.tuners.ia3 import Conv2d as IA3Conv2d
from peft.tuners.ia3 import Linear as IA3Linear
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

# Different ranks and alphas, rsLoRA on two of them: the banks pad to rank 5.
LORA_ADAPTERS = {
    "a": dict(r=2, lora_alpha=4),
    "b": dict(r=5, lora_alpha=3, use_rslora=True),
    "c": dict(r=3, lora_alpha=8),
    "d": dict(r=1, lora_alpha=2, use_rslora=True),
}
RANK = 5
# Slot of each adapter; slot 0 and 5 stay empty (scale 0), capacity 7.
SLOT = {"a": 1, "b": 2, "c": 3, "d": 6}
CAPACITY = 7
# "tensor": a plain slot tensor (the compile-safe gather); "auto": a RowPlan, algorithm chosen by shape; others forced.
ALGORITHMS = ["tensor", "auto", "grouped", "window", "gather", "dense"]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 6, bias=False)
        self.conv = nn.Conv2d(3, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


@functools.cache  # read-only for the tests (each sets the active adapters it needs)
def lora_model(adapter_dtype: torch.dtype, base_dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = Tiny()
    for name, options in LORA_ADAPTERS.items():
        config = LoraConfig(target_modules=["up", "down"], init_lora_weights=False, **options)
        inject_adapter_in_model(config, model, adapter_name=name)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.copy_(torch.randn_like(param) * 0.3)
    for param_name, param in model.named_parameters():
        param.data = param.data.to(adapter_dtype if "lora_" in param_name else base_dtype)
    return model.eval()


def lora_banks(layer: LoraLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's adapters in slot banks (layout of adapterkit_peft.kernels), zero-padded to RANK."""
    dtype = layer.lora_A["a"].weight.dtype
    A = torch.zeros(CAPACITY, RANK, layer.in_features, dtype=dtype)
    B = torch.zeros(CAPACITY, layer.out_features, RANK, dtype=dtype)
    scale = torch.zeros(CAPACITY)
    for name, slot in SLOT.items():
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        A[slot, : a.shape[0]] = a.detach()
        B[slot, :, : b.shape[1]] = b.detach()
        scale[slot] = layer.scaling[name]
    return A, B, scale


def lora_layers(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def slots_of(rows: list[str]) -> list[int]:
    return [BASE if row == "__base__" else SLOT[row] for row in rows]


def rows_input(layer: nn.Module, rows: int, tokens: int | None, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (rows, layer.in_features) if tokens is None else (rows, tokens, layer.in_features)
    return torch.randn(shape, generator=generator).to(dtype)


def routed(layer: LoraLinear, x: torch.Tensor, rows: list[str], algorithm: str) -> torch.Tensor:
    A, B, scale = lora_banks(layer)
    if algorithm == "tensor":
        slots, algorithm = torch.tensor(slots_of(rows)), None
    else:
        slots, algorithm = plan_rows(slots_of(rows), CAPACITY), None if algorithm == "auto" else algorithm
    result = layer.base_layer(x)
    return result + lora_delta_rows(x, A, B, scale, slots, algorithm).to(result.dtype)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.dtype == torch.float32:
        assert (actual - expected).abs().max().item() <= 1e-5
    else:  # half precision: a few roundings apart (the scale is applied in rank space)
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2)


# (adapter dtype, base dtype): float32; bfloat16 throughout; float32 adapters on a bfloat16 base
# (peft's autocast_adapter_dtype: x is cast to the adapter's dtype and the delta back to the result's).
DTYPES = [
    pytest.param(torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.float32, torch.bfloat16, id="fp32-on-bf16"),
]


@pytest.mark.parametrize("adapter_dtype, base_dtype", DTYPES)
@pytest.mark.parametrize("tokens", [None, 4], ids=["2d", "3d"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_lora_rows_equal_peft_mixed_batch(adapter_dtype, base_dtype, tokens, algorithm):
    model = lora_model(adapter_dtype, base_dtype)
    rng = random.Random(1)
    names = [*LORA_ADAPTERS, "__base__"]
    batches = [
        [rng.choice(names) for _ in range(9)],  # interleaved, with base rows
        ["b", "b", "a", "a", "a", "c"],  # contiguous groups, no base row: the grouped path copies nothing
        ["__base__", "__base__"],
        ["d"] * 3,
        list(names),
    ]
    with torch.no_grad():
        for layer in lora_layers(model):
            for index, rows in enumerate(batches):
                x = rows_input(layer, len(rows), tokens, base_dtype, seed=index)
                close(routed(layer, x, rows, algorithm), layer(x, adapter_names=rows))


@settings(max_examples=20, deadline=None)
@given(
    rows=st.lists(st.sampled_from([*LORA_ADAPTERS, "__base__"]), min_size=1, max_size=12),
    algorithm=st.sampled_from(ALGORITHMS),
    tokens=st.sampled_from([None, 1, 3, 8]),  # 8 tokens > rank 5: "auto" gathers
)
def test_lora_rows_equal_peft_for_any_assignment(rows, algorithm, tokens):
    model = _FP32_MODEL
    with torch.no_grad():
        for layer in lora_layers(model):
            x = rows_input(layer, len(rows), tokens, torch.float32)
            close(routed(layer, x, rows, algorithm), layer(x, adapter_names=rows))


_FP32_MODEL = lora_model(torch.float32, torch.float32)


def test_base_rows_and_empty_slots_compute_the_base_layer_exactly():
    layer = lora_layers(_FP32_MODEL)[0]
    A, B, scale = lora_banks(layer)
    x = rows_input(layer, 4, 3, torch.float32)
    for slots in ([BASE] * 4, [0, 5, 0, BASE]):  # BASE rows, and rows on empty slots (scale 0, zero weights)
        for where in (torch.tensor(slots), plan_rows(slots, CAPACITY)):
            delta = lora_delta_rows(x, A, B, scale, where)
            assert torch.equal(delta, torch.zeros_like(delta))
    assert choose(plan_rows([BASE, BASE])) == "none"


def test_choice_follows_rows_and_shape():
    interleaved = plan_rows([b % 4 for b in range(16)])
    assert choose(interleaved, tokens_per_row=1, rank=16) == "window"  # slots 0..3, 4 rows each: no padding
    assert choose(interleaved, tokens_per_row=128, rank=16) == "gather"  # prefill: copying rows would cost more
    assert choose(plan_rows([0] * 8 + [1] * 8), tokens_per_row=128, rank=16) == "grouped"  # rows already in order
    assert choose(plan_rows([0, 30, 0, 30, 15, 15]), tokens_per_row=1, rank=16) == "grouped"  # a sparse window
    assert choose(plan_rows([b * 10 for b in range(12)]), tokens_per_row=1, rank=16) == "gather"


@pytest.mark.parametrize("adapter_dtype, base_dtype", DTYPES)
def test_lora_active_set_equals_peft_active_adapters(adapter_dtype, base_dtype):
    model = lora_model(adapter_dtype, base_dtype)
    with torch.no_grad():
        for layer in lora_layers(model):
            A, B, scale = lora_banks(layer)
            x = rows_input(layer, 5, 2, base_dtype)
            for names in (["a"], ["b", "c"], ["a", "b", "d"], ["d", "c", "b", "a"]):
                layer.set_adapter(names)
                result = layer.base_layer(x)
                delta = lora_delta_active(x, A, B, scale, torch.tensor([SLOT[n] for n in names]))
                # As peft's active forward: added in the promoted dtype, then cast to the result's.
                close((result + delta).to(result.dtype), layer(x))


def test_lora_active_weights_scale_each_delta_and_zero_weights_pad():
    layer = lora_layers(_FP32_MODEL)[1]
    A, B, scale = lora_banks(layer)
    x = rows_input(layer, 3, 2, torch.float32)
    with torch.no_grad():
        single = {}
        for name in ("a", "b", "c"):
            layer.set_adapter([name])
            single[name] = layer(x) - layer.base_layer(x)
        # Weighted sum of the peft deltas; the fourth entry (slot 0, weight 0) pads the set to K=4.
        expected = 0.5 * single["a"] - 2.0 * single["b"] + single["c"]
        slots_k = torch.tensor([SLOT["a"], SLOT["b"], SLOT["c"], 0])
        delta = lora_delta_active(x, A, B, scale, slots_k, torch.tensor([0.5, -2.0, 1.0, 0.0]))
        assert (delta - expected).abs().max().item() <= 1e-5


# -- IA3 ---------------------------------------------------------------------------------

IA3_NAMES = ["p", "q", "r"]
IA3_SLOT = {"p": 1, "q": 3, "r": 4}


@functools.cache
def ia3_model(vector_dtype: torch.dtype, base_dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = Tiny()
    for name in IA3_NAMES:
        config = IA3Config(target_modules=["up", "down", "conv"], feedforward_modules=["down", "conv"])
        inject_adapter_in_model(config, model, adapter_name=name)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "ia3_l" in param_name:
                param.copy_(1.0 + 0.5 * torch.randn_like(param))
    for param_name, param in model.named_parameters():
        param.data = param.data.to(vector_dtype if "ia3_l" in param_name else base_dtype)
    return model.eval()


def ia3_bank(layer: nn.Module) -> torch.Tensor:
    first = layer.ia3_l[IA3_NAMES[0]]
    bank = torch.ones(6, first.numel(), dtype=first.dtype)  # empty slots hold ones
    for name, slot in IA3_SLOT.items():
        bank[slot] = layer.ia3_l[name].detach().flatten()
    return bank


def ia3_forward(layer: nn.Module, x: torch.Tensor, scaled) -> torch.Tensor:
    """The layer's forward with ``scaled(t, **dtype_options)`` in place of peft's scaling, per peft's dtype rules."""
    conv = isinstance(layer, IA3Conv2d)
    if layer.is_feedforward:
        out_dtype = layer.get_base_layer().weight.dtype if conv else None
        return layer.base_layer(scaled(x, dim=1 if conv else -1, out_dtype=out_dtype))
    result = layer.base_layer(x)
    return scaled(result, dim=1 if conv else -1, cast=conv)


def ia3_input(layer: nn.Module, rows: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    shape = (rows, 3, 6, 6) if isinstance(layer, IA3Conv2d) else (rows, 2, layer.in_features)
    return torch.randn(shape, generator=generator).to(dtype)


def per_row_oracle(layer: nn.Module, x: torch.Tensor, rows: list[str]) -> torch.Tensor:
    outputs = []
    for index, name in enumerate(rows):
        if name == "__base__":
            outputs.append(layer.base_layer(x[index : index + 1]))
        else:
            layer.set_adapter([name])
            outputs.append(layer(x[index : index + 1]))
    return torch.cat(outputs)


IA3_DTYPES = [
    pytest.param(torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.float32, torch.bfloat16, id="fp32-on-bf16"),
]


@pytest.mark.parametrize("vector_dtype, base_dtype", IA3_DTYPES)
@pytest.mark.parametrize("as_plan", [False, True], ids=["tensor", "plan"])
def test_ia3_rows_equal_peft_row_by_row(vector_dtype, base_dtype, as_plan):
    model = ia3_model(vector_dtype, base_dtype)
    layers = [m for m in model.modules() if isinstance(m, (IA3Linear, IA3Conv2d))]
    assert {type(m) for m in layers} == {IA3Linear, IA3Conv2d} and {m.is_feedforward for m in layers} == {True, False}
    rows = ["q", "__base__", "p", "r", "q", "__base__"]
    slots = [BASE if r == "__base__" else IA3_SLOT[r] for r in rows]
    where = plan_rows(slots, 6) if as_plan else torch.tensor(slots)
    with torch.no_grad():
        for layer in layers:
            bank = ia3_bank(layer)
            x = ia3_input(layer, len(rows), base_dtype)
            actual = ia3_forward(layer, x, lambda t, **kw: ia3_rows(t, bank, where, **kw))
            close(actual, per_row_oracle(layer, x, rows))


@pytest.mark.parametrize("vector_dtype, base_dtype", IA3_DTYPES)
def test_ia3_active_set_equals_peft_active_adapters(vector_dtype, base_dtype):
    model = ia3_model(vector_dtype, base_dtype)
    layers = [m for m in model.modules() if isinstance(m, (IA3Linear, IA3Conv2d))]
    with torch.no_grad():
        for layer in layers:
            bank = ia3_bank(layer)
            x = ia3_input(layer, 3, base_dtype)
            for names in (["p"], ["q", "r"], ["r", "p", "q"]):
                layer.set_adapter(names)
                slots_k = torch.tensor([IA3_SLOT[n] for n in names])
                actual = ia3_forward(layer, x, lambda t, **kw: ia3_active(t, bank, slots_k, **kw))
                close(actual, layer(x))


def test_ia3_active_weights_move_each_vector_from_one():
    bank = 1.0 + torch.randn(4, 7)
    slots_k = torch.tensor([1, 3, 2])
    weights = torch.tensor([0.25, 1.0, 0.0])  # 0: a padding entry (identity)
    expected = (1 + 0.25 * (bank[1] - 1)) * bank[3]
    assert torch.allclose(ia3_active_vector(bank, slots_k, weights), expected, rtol=0, atol=1e-6)
    # Weight 1 is the adapter exactly, weight 0 exactly the identity.
    assert torch.equal(ia3_active_vector(bank, torch.tensor([2]), torch.tensor([1.0])), bank[2])
    assert torch.equal(ia3_active_vector(bank, torch.tensor([2]), torch.tensor([0.0])), torch.ones(7))


# -- plans and errors ----------------------------------------------------------------------


def test_plan_groups_rows_by_slot_once():
    plan = plan_rows([3, BASE, 1, 3, 1], capacity=4)
    assert plan.distinct == (3, 1) and plan.has_base and not plan.identity
    assert [plan.order[g].tolist() for _, g in plan.groups] == [[0, 3], [2, 4]]
    assert plan.onehot.tolist() == [[1, 0], [0, 0], [0, 1], [1, 0], [0, 1]]
    assert plan.window == (1, 4) and plan.depth == 2
    # Cells (slot - 1) * 2 + i of the rows 0, 2, 3, 4 that have an adapter.
    assert plan.adapted.tolist() == [0, 2, 3, 4] and plan.cell.tolist() == [4, 0, 5, 1]
    assert plan_rows([2, 2, 0]).identity


@pytest.mark.parametrize("bad", [7, -2, 1.5, True, "a"])
def test_plan_refuses_a_slot_that_is_not_a_slot_number(bad):
    with pytest.raises(ArgumentValueError, match=repr(bad).replace("(", r"\(").replace(".", r"\.")):
        plan_rows([0, bad], capacity=7)


def test_a_plan_for_another_batch_size_is_refused():
    layer = lora_layers(_FP32_MODEL)[0]
    A, B, scale = lora_banks(layer)
    plan = plan_rows([1, 2, 3], CAPACITY)
    x = rows_input(layer, 2, None, torch.float32)
    with pytest.raises(ArgumentValueError, match="3 rows but the batch has 2"):
        lora_delta_rows(x, A, B, scale, plan)
    with pytest.raises(ArgumentValueError, match="3 rows but the batch has 2"):
        ia3_rows(x, torch.ones(4, 12), plan)


# -- torch.compile ---------------------------------------------------------------------------


class BankedLayer(nn.Module):
    """A LoRA linear layer and an IA3 scaling on banks; row slots and the active set are buffers written in place."""

    def __init__(self, layer: LoraLinear) -> None:
        super().__init__()
        self.base = layer.base_layer
        A, B, scale = lora_banks(layer)
        self.register_buffer("A", A)
        self.register_buffer("B", B)
        self.register_buffer("scale", scale)
        self.register_buffer("vectors", 1.0 + 0.1 * torch.randn(CAPACITY, layer.out_features))
        self.register_buffer("active", torch.tensor([SLOT["a"], 0]))
        self.register_buffer("weights", torch.tensor([1.0, 0.0]))

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        result = result + lora_delta_rows(x, self.A, self.B, self.scale, slots).to(result.dtype)
        result = result + lora_delta_active(x, self.A, self.B, self.scale, self.active, self.weights)
        return ia3_rows(result, self.vectors, slots, cast=False)


def test_compiled_kernels_do_not_recompile_when_slots_change():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    module = BankedLayer(lora_layers(_FP32_MODEL)[0]).eval()
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    x = rows_input(module.base, 6, 2, torch.float32)
    rng = random.Random(0)
    with torch.no_grad():
        for step in range(6):
            slots = torch.tensor([rng.choice([BASE, *SLOT.values()]) for _ in range(6)])
            module.active.copy_(torch.tensor([rng.choice(list(SLOT.values())), rng.choice(list(SLOT.values()))]))
            module.weights.copy_(torch.tensor([rng.random(), float(step % 2)]))
            assert torch.allclose(compiled(x, slots), module(x, slots), rtol=0, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
