"""Adapter banks: switching adapters on a ``torch.compile``d model without recompiling (``prepare_compiled``).

After :func:`prepare`, every adapted layer of a method keeps preallocated tensors (buffers, not saved
with the model) that hold all its adapters, one *slot* each, zero-padded to the declared maximum rank:

* LoRA: ``adapterkit_A`` ``[slots + 1, max_rank, in]``, ``adapterkit_B`` ``[slots + 1, out, max_rank]``,
  ``adapterkit_scale`` ``[slots + 1]`` (peft's scaling, alpha/r or alpha/sqrt(r)).
* (IA)^3: ``adapterkit_in`` ``[slots + 1, in]`` and ``adapterkit_out`` ``[slots + 1, out]`` (ones where an
  adapter does not scale: a feedforward adapter scales the input, any other the output).

The last slot is the *null* slot (zeros for LoRA, ones for IA3): rows routed to no adapter of the method
and padding. peft's per-adapter parameters stay where peft keeps them, as views into their slot (same
storage), so saving, state dicts, merging and training read and write the banks.

An adapter has the same slot in every layer of its method; the slots in use travel to the layers as tensors
in one :class:`Routing` per method, shared by its layers: the active slots and their weights, or each
batch row's slot inside ``per_sample``. Switching (``set_active``, weights, ``per_sample``, ``swap``) writes
those tensors and the banks in place and never changes a Python value the compiled graph reads, so a
compiled model does not recompile; loads and deletes take and free slots; the module structure is fixed at
preparation (declared targets are wrapped then, with no adapter). In ``train()`` mode the layers compute
through peft's own forward (which reads the same storage).

Threads (``per_sample`` routes only the thread that opened the block): a compiled graph cannot ask which
thread runs it, so while ``per_sample`` blocks are open on a prepared model, a gate (forward hooks on the
root model, invisible to ``torch.compile``) sets the calling thread's routing before each forward and runs
forwards of the prepared model one at a time. With no block open the gate does nothing (and is no graph
break: it compiles to nothing).
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from adapterkit import ConfigValueError, PerSampleError, UnsupportedOperationError
from adapterkit.layers import claim, positions
from peft.tuners.ia3.layer import Linear as IA3Linear
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import kernels
from .creation import empty_weights
from .kernels import BASE as NO_SLOT
from .kernels import plan_rows

__all__ = [
    "Prepared",
    "Routing",
    "adopt",
    "base_scaling",
    "check_fits",
    "forget_slot",
    "keeps",
    "per_sample",
    "prepare",
    "prepared",
    "remember_config",
    "set_active",
    "swap",
]

KEY = "_adapterkit_banks"  # model attribute: {method name: Prepared, GATE: _Gate}
GATE = "gate"
BASE = "__base__"
_PLACEHOLDER = "adapterkit_placeholder"  # the adapter a declared target's empty layer is built with, then deleted
DEFAULT_SLOTS = 8


class Routing:
    """What a method's prepared layers read to pick adapters: tensors changed in place, one Python flag.

    ``slots``/``weights``: the active adapters' slots and weights (the null slot, weight 0, when none is
    active). ``rows``: each batch row's slot while ``per_sample`` routes the running forward. ``per_sample``
    and ``owner`` (the thread whose rows these are) are set by the gate only.
    """

    def __init__(self, null: int, device: torch.device | None) -> None:
        self.null = null
        self.device = device
        self.slots = torch.full((1,), null, dtype=torch.long, device=device)
        self.weights = torch.zeros(1, device=device)
        self.rows = torch.full((1,), null, dtype=torch.long, device=device)
        self.slot_weights = torch.ones(null + 1, device=device)  # per_sample: each slot's set_active weight
        self.plan: Any = None  # per_sample, eager: the rows grouped by slot (kernels.RowPlan)
        self.per_sample = False
        self.owner: int | None = None
        self.blocks: dict[int, list[_Block]] = {}  # thread id -> its open blocks, innermost last

    def activate(self, slots: Sequence[int], weights: Sequence[float]) -> None:
        if not slots:
            slots, weights = [self.null], [0.0]
        if len(slots) == 1 == len(self.slots):  # the usual switch: two fills, no new tensors
            self.slots.fill_(slots[0])
            self.weights.fill_(weights[0])
            return
        new_slots = torch.tensor(slots, dtype=torch.long)
        new_weights = torch.tensor(weights, dtype=self.weights.dtype)
        if len(slots) == len(self.slots):
            self.slots.copy_(new_slots)
            self.weights.copy_(new_weights)
        else:
            # Another number of active adapters: other shapes (a compiled model compiles once per count).
            self.slots, self.weights = new_slots.to(self.device), new_weights.to(self.device)


class _Block:
    """One open per_sample block of a method: each row's slot, each slot's weight, the eager grouping."""

    def __init__(self, rows: torch.Tensor, slot_weights: torch.Tensor, plan: Any) -> None:
        self.rows, self.slot_weights, self.plan = rows, slot_weights, plan


class Prepared:
    """One method's banks: limits, slots, and its layers by logical path."""

    def __init__(
        self, kind: str, max_rank: int, capacity: int, device: torch.device | None, dtype: torch.dtype
    ) -> None:
        self.kind = kind  # "lora" or "ia3"
        self.max_rank = max_rank
        self.capacity = capacity
        self.dtype = dtype
        self.slot_of: dict[str, int] = {}
        self.layers: dict[str, nn.Module] = {}
        self.routing = Routing(capacity, device)

    def free_slot(self) -> int | None:
        taken = set(self.slot_of.values())
        return next((slot for slot in range(self.capacity) if slot not in taken), None)


def prepared(model: nn.Module, method: str) -> Prepared | None:
    """The banks of ``method`` on ``model``, or ``None`` before :func:`prepare`."""
    return model.__dict__.get(KEY, {}).get(method)


def keeps(model: nn.Module, layer: nn.Module) -> bool:
    """Whether ``layer`` is a prepared layer, kept (not unwrapped) when its last adapter goes."""
    return "_adapterkit_routing" in layer.__dict__


# -- preparing --------------------------------------------------------------------------------------------
def prepare(
    model: nn.Module,
    method: str,
    sites: Sequence[Any],
    adapters: Sequence[str],
    *,
    max_rank: int | None,
    targets: Sequence[str] | None,
    max_adapters: int | None,
) -> Prepared:
    """Give every layer of ``method`` (and the ``targets``' modules) banks; the loaded ``adapters`` take slots.

    ``sites``: the method's layers (:class:`~adapterkit_peft.LayerSite`). Checks everything before it
    changes anything: on an error the model is as it was.
    """
    kind = _kind(sites, method)
    layers = {site.logical: site.layer for site in sites}
    for path, layer in layers.items():
        _check_layer(method, kind, path, layer, adapters)
    new = _declared(model, method, kind, targets, layers)
    ranks = {n: r for layer in layers.values() for n, r in _ranks(kind, layer).items()}
    largest = max(ranks.values(), default=1)
    if max_rank is None:
        max_rank = largest
    elif kind == "lora" and largest > max_rank:
        worst = max(ranks, key=ranks.__getitem__)
        raise UnsupportedOperationError(
            f"prepare_compiled: {method} adapter {worst!r} has rank {largest}, above max_rank={max_rank}; "
            f"pass max_rank={largest} or more"
        )
    loaded = list(dict.fromkeys(adapters))
    capacity = max_adapters if max_adapters is not None else max(DEFAULT_SLOTS, len(loaded))
    if len(loaded) > capacity:
        raise UnsupportedOperationError(
            f"prepare_compiled: {len(loaded)} {method} adapters are loaded, above max_adapters={capacity}; "
            f"pass max_adapters={len(loaded)} or more, or delete adapters first"
        )
    some = next(iter(layers.values()), None) or next(iter(new.values()))[2]
    weight = some.get_base_layer().weight
    device = weight.device
    dtype = _adapter_dtype(kind, layers.values(), loaded) or (
        torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    )
    state = Prepared(kind, max_rank, capacity, device, dtype)
    # Nothing has failed so far: from here on the model changes.
    for path, (parent, attr, layer) in new.items():
        claim(layer, method)
        setattr(parent, attr, layer)
        layers[path] = layer
    state.layers = dict(sorted(layers.items()))
    for layer in state.layers.values():
        _give_banks(kind, layer, state)
    model.__dict__.setdefault(KEY, {})[method] = state
    for name in loaded:
        adopt(model, method, name)
    names, weights = model.__dict__[KEY].get(("active", method), ([], None))
    set_active(
        model,
        method,
        [n for n in names if n in state.slot_of],
        None if weights is None else [w for n, w in zip(names, weights) if n in state.slot_of],
    )
    _gate(model).routings[method] = state.routing
    return state


def _kind(sites: Sequence[Any], method: str) -> str:
    kinds = {("ia3" if isinstance(site.layer, IA3Linear) else "lora") for site in sites}
    if len(kinds) > 1:
        raise UnsupportedOperationError(f"prepare_compiled: method {method!r} mixes LoRA and IA3 layers")
    return kinds.pop() if kinds else method_kind(method)


def method_kind(method: str) -> str:
    return "ia3" if "ia3" in method.lower() else "lora"


def _check_layer(method: str, kind: str, path: str, layer: nn.Module, adapters: Sequence[str]) -> None:
    expected = IA3Linear if kind == "ia3" else LoraLinear
    problem = None
    if type(layer) is not expected:
        problem = f"is a peft {type(layer).__name__}; only {expected.__name__} layers (on nn.Linear) have banks"
    elif not isinstance(layer.get_base_layer(), nn.Linear):
        problem = f"adapts a {type(layer.get_base_layer()).__name__}, not an nn.Linear"
    elif layer.merged:
        problem = f"has merged adapters {layer.merged_adapters}; unmerge() first"
    elif kind == "lora":
        variants = [n for n in layer.lora_A if n in layer.lora_variant or layer.use_dora.get(n, False)]
        biased = [n for n in layer.lora_A if layer.lora_B[n].bias is not None]
        if variants:
            problem = f"holds LoRA variants (DoRA, ...) {variants}, which banks do not cover"
        elif biased:
            problem = f"holds adapters with a LoRA bias (lora_bias=True) {biased}, which banks do not cover"
    if problem:
        raise UnsupportedOperationError(
            f"prepare_compiled: {method} layer {path!r} {problem}; use plain LoRA/IA3 adapters on linear layers"
        )


def _declared(
    model: nn.Module, method: str, kind: str, targets: Sequence[str] | None, layers: dict[str, nn.Module]
) -> dict[str, tuple[nn.Module, str, nn.Module]]:
    """New empty layers for the declared targets that no adapter adapts yet: {path: (parent, attr, layer)}."""
    if not targets:
        return {}
    found: dict[str, tuple[nn.Module, str, nn.Module]] = {}
    matched = set()
    # Modules inside adapter layers (their lora_A/lora_B/ia3_l entries) are no targets.
    inner = {
        id(m)
        for layer in model.modules()
        if isinstance(layer, BaseTunerLayer)
        for attr in layer.adapter_layer_names
        if isinstance(container := layer._modules.get(attr), nn.Module)
        for m in container.modules()
    }
    for path, parent, attr, module in positions(model):
        if id(module) in inner:
            continue
        hits = [t for t in targets if path == t or path.endswith("." + t)]
        if not hits:
            continue
        matched.update(hits)
        if path in layers:
            continue
        if not isinstance(module, nn.Linear):
            raise UnsupportedOperationError(
                f"prepare_compiled: target {hits[0]!r} matches {path!r}, a {type(module).__name__}; "
                "declared targets must be nn.Linear modules"
            )
        found[path] = (parent, attr, _empty_layer(kind, module))
    missing = [t for t in targets if t not in matched and t not in {p.rsplit(".", 1)[-1] for p in layers}]
    if missing:
        raise ConfigValueError(
            f"prepare_compiled: targets {missing} match no module of the model; name modules as in target_modules"
        )
    return found


def _empty_layer(kind: str, base: nn.Linear) -> nn.Module:
    """A peft layer around ``base`` holding no adapter (peft builds layers with one: built, then deleted)."""
    from peft import IA3Config, LoraConfig

    with empty_weights():
        if kind == "ia3":
            layer = IA3Linear(base, _PLACEHOLDER, config=IA3Config(target_modules=["x"], feedforward_modules=[]))
        else:
            layer = LoraLinear(base, _PLACEHOLDER, config=LoraConfig(target_modules=["x"]), r=1, lora_alpha=1)
    layer.delete_adapter(_PLACEHOLDER)
    layer.__dict__["_active_adapter"] = []
    layer.train(base.training)
    return layer


def _ranks(kind: str, layer: nn.Module) -> dict[str, int]:
    return {n: m.weight.shape[0] for n, m in layer.lora_A.items()} if kind == "lora" else {}


def _adapter_dtype(kind: str, layers: Any, names: Sequence[str]) -> torch.dtype | None:
    for layer in layers:
        for name in names:
            tensor = _tensors(kind, layer, name)
            if tensor:
                return tensor[0].dtype
    return None


def _tensors(kind: str, layer: nn.Module, name: str) -> list[torch.Tensor]:
    if kind == "lora":
        return [layer.lora_A[name].weight, layer.lora_B[name].weight] if name in layer.lora_A else []
    return [layer.ia3_l[name]] if name in layer.ia3_l else []


def _give_banks(kind: str, layer: nn.Module, state: Prepared) -> None:
    base = layer.get_base_layer()
    rows, device, dtype = state.capacity + 1, base.weight.device, state.dtype
    if kind == "lora":
        out_features, in_features = base.weight.shape
        banks = {
            "adapterkit_A": torch.zeros(rows, state.max_rank, in_features, device=device, dtype=dtype),
            "adapterkit_B": torch.zeros(rows, out_features, state.max_rank, device=device, dtype=dtype),
            "adapterkit_scale": torch.zeros(rows, device=device, dtype=dtype),
        }
        forward = _lora_forward
    else:
        out_features, in_features = base.weight.shape
        banks = {
            "adapterkit_in": torch.ones(rows, in_features, device=device, dtype=dtype),
            "adapterkit_out": torch.ones(rows, out_features, device=device, dtype=dtype),
        }
        forward = _ia3_forward
    for key, tensor in banks.items():
        layer.register_buffer(key, tensor, persistent=False)  # not in the model's state_dict
    layer.__dict__["_adapterkit_routing"] = state.routing
    layer.__dict__["forward"] = types.MethodType(forward, layer)


# -- slots ---------------------------------------------------------------------------------------------------
def check_fits(model: nn.Module, method: str, name: str, sites: Sequence[Any]) -> None:
    """Raise :class:`UnsupportedOperationError` unless new adapter ``name`` (injected at ``sites``) fits the banks."""
    state = prepared(model, method)
    if state is None:
        return
    outside = [site.logical for site in sites if site.logical not in state.layers]
    if outside:
        raise UnsupportedOperationError(
            f"adapter {name!r} targets {outside[:5]}, outside the targets prepared for compiled switching "
            f"({len(state.layers)} layers); declare them: prepare_compiled(targets=[...]) before compiling"
        )
    for site in sites:
        _check_layer(method, state.kind, site.logical, site.layer, [name])
        rank = _ranks(state.kind, site.layer).get(name, 0)
        if rank > state.max_rank:
            raise UnsupportedOperationError(
                f"adapter {name!r} has rank {rank} at {site.logical!r}, above the prepared max_rank={state.max_rank}; "
                f"prepare_compiled(max_rank={rank}) before compiling"
            )
        tensors = _tensors(state.kind, site.layer, name)
        if tensors and tensors[0].dtype != state.dtype and not tensors[0].is_meta:
            raise UnsupportedOperationError(
                f"adapter {name!r} is {tensors[0].dtype} at {site.logical!r}, the prepared banks {state.dtype}; "
                "load it with the dtype of the other adapters"
            )
    if name not in state.slot_of and state.free_slot() is None:
        raise UnsupportedOperationError(
            f"cannot add adapter {name!r}: all max_adapters={state.capacity} slots prepared for compiled switching "
            f"are taken ({sorted(state.slot_of)[:8]}); delete one, or prepare_compiled(max_adapters=...) with more"
        )


def adopt(model: nn.Module, method: str, name: str) -> None:
    """Copy adapter ``name``'s tensors into its slot (taking one) and make peft's parameters views of it."""
    state = prepared(model, method)
    assert state is not None
    slot = state.slot_of.get(name)
    if slot is None:
        slot = state.free_slot()
        assert slot is not None  # check_fits ran first
        state.slot_of[name] = slot
    for layer in state.layers.values():
        _write(state.kind, layer, name, slot)


def _write(kind: str, layer: nn.Module, name: str, slot: int) -> None:
    if kind == "lora":
        bank_a, bank_b, scale = layer.adapterkit_A, layer.adapterkit_B, layer.adapterkit_scale
        held = name in layer.lora_A
        # Copies first: the parameters may already be views of this slot.
        values_a = layer.lora_A[name].weight.detach().clone() if held else None
        values_b = layer.lora_B[name].weight.detach().clone() if held else None
        bank_a[slot].zero_()
        bank_b[slot].zero_()
        scale[slot] = 0.0
        if name not in layer.lora_A:
            return
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        rank = lora_a.weight.shape[0]
        with torch.no_grad():
            bank_a[slot, :rank].copy_(values_a)
            bank_b[slot, :, :rank].copy_(values_b)
        scale[slot] = base_scaling(layer, name)
        lora_a.weight = nn.Parameter(bank_a[slot, :rank], requires_grad=lora_a.weight.requires_grad)
        lora_b.weight = nn.Parameter(bank_b[slot, :, :rank], requires_grad=lora_b.weight.requires_grad)
        return
    vector = layer.ia3_l[name] if name in layer.ia3_l else None
    values = None if vector is None else vector.detach().clone()  # it may be a view of this slot already
    layer.adapterkit_in[slot].fill_(1.0)
    layer.adapterkit_out[slot].fill_(1.0)
    if vector is None:
        return
    bank = layer.adapterkit_in if vector.shape[0] == 1 else layer.adapterkit_out  # (1, in) feedforward, (out, 1)
    with torch.no_grad():
        bank[slot].copy_(values.flatten())
    view = bank[slot].view(1, -1) if vector.shape[0] == 1 else bank[slot].view(-1, 1)
    layer.ia3_l[name] = nn.Parameter(view, requires_grad=vector.requires_grad)


def base_scaling(layer: nn.Module, name: str) -> float:
    """peft's scaling of LoRA adapter ``name`` in ``layer``, without any set_active weight: alpha/r (rsLoRA: alpha/sqrt(r))."""
    rank, alpha = layer.r[name], layer.lora_alpha[name]
    return alpha / math.sqrt(rank) if layer.use_rslora.get(name, False) else alpha / rank


def forget_slot(model: nn.Module, method: str, name: str) -> None:
    """Adapter ``name`` is deleted: clear and free its slot."""
    state = prepared(model, method)
    if state is None or name not in state.slot_of:
        return
    slot = state.slot_of.pop(name)
    for layer in state.layers.values():
        if state.kind == "lora":
            layer.adapterkit_A[slot].zero_()
            layer.adapterkit_B[slot].zero_()
            layer.adapterkit_scale[slot] = 0.0
        else:
            layer.adapterkit_in[slot].fill_(1.0)
            layer.adapterkit_out[slot].fill_(1.0)


def set_active(model: nn.Module, method: str, names: Sequence[str], weights: Sequence[float] | None) -> bool:
    """Write the active adapters (and weights) of ``method`` into its routing tensors; False when not prepared.

    Remembered before preparation too (preparing starts from them).
    """
    model.__dict__.setdefault(KEY, {})[("active", method)] = (list(names), None if weights is None else list(weights))
    state = prepared(model, method)
    if state is None:
        return False
    weights = list(weights) if weights is not None else [1.0] * len(names)
    state.routing.activate([state.slot_of[n] for n in names], weights)
    return True


# -- swap ----------------------------------------------------------------------------------------------------------
def remember_config(model: nn.Module, method: str, name: str, config: Any) -> None:
    """Keep adapter ``name``'s config: a swap into its slot puts the old adapter back from it if the new one fails."""
    configs = model.__dict__.setdefault(KEY, {}).setdefault(("configs", method), {})
    if config is None:
        configs.pop(name, None)
    else:
        configs[name] = config


def swap(method: Any, model: nn.Module, name: str, config: Any, state_dict: dict[str, torch.Tensor]) -> None:
    """``adapterkit_swap`` on a prepared model: the new adapter goes into ``name``'s slot.

    The same targets and ranks: the values are copied into the parameters (views of the slot), as the
    eager swap does. Other ranks (up to ``max_rank``) or other targets (among the prepared layers): the
    adapter is rebuilt in its slot; if that fails, the old one is put back.
    """
    from .swap import plan_swap, write_swap

    state = prepared(model, method.name)
    assert state is not None
    try:
        plan = plan_swap(method, model, name, config, state_dict)
    except UnsupportedOperationError:
        plan = None
    if plan is not None:
        write_swap(model, plan)  # into the parameters, views of the slot
        if state.kind == "lora":
            slot = state.slot_of[name]
            for layer in state.layers.values():
                if name in layer.lora_A:
                    layer.adapterkit_scale[slot] = base_scaling(layer, name)  # the new alpha
        return
    _check_swap_fits(state, method.name, name, state_dict)
    old_config = model.__dict__.get(KEY, {}).get(("configs", method.name), {}).get(name)
    if old_config is None:
        raise UnsupportedOperationError(
            f"swap: {method.name} adapter {name!r} was attached before this process could keep its config; "
            f"delete({name!r}) and load() the new adapter instead"
        )
    old_state = {
        key: value.detach().clone() for key, value in method.adapterkit_extract_state(model, method.name, name).items()
    }
    slot = state.slot_of[name]

    def rebuild(new_config: Any, tensors: dict[str, torch.Tensor]) -> None:
        method.adapterkit_delete(model, method.name, name)
        state.slot_of[name] = slot  # the adapter keeps its slot (the routing tensors point at it)
        method.adapterkit_inject(model, method.name, name, new_config, True)
        method.adapterkit_load_state(model, method.name, name, tensors)

    try:
        rebuild(config, state_dict)
    except BaseException:
        rebuild(old_config, old_state)
        raise
    finally:
        names, weights = model.__dict__[KEY].get(("active", method.name), ([], None))
        trainable = model.__dict__.get("_adapterkit_peft_layers", {}).get((method.name, "trainable"), set())
        method.adapterkit_set_active(model, method.name, names, [n for n in names if n in trainable], weights)


def _check_swap_fits(state: Prepared, method: str, name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """The new adapter's tensors must sit on prepared layers, within ``max_rank`` (checked before anything changes)."""
    outside, ranks = set(), {}
    for key, value in state_dict.items():
        path = key.split(".lora_")[0] if state.kind == "lora" else key.rsplit(".ia3_l", 1)[0]
        if path not in state.layers:
            outside.add(path)
        elif state.kind == "lora" and ".lora_A." in key:
            ranks[path] = value.shape[0]
    if outside:
        raise UnsupportedOperationError(
            f"swap: the new {method} adapter for {name!r} targets {sorted(outside)[:5]}, outside the targets prepared "
            "for compiled switching; declare them: prepare_compiled(targets=[...]) before compiling"
        )
    too_big = {path: rank for path, rank in ranks.items() if rank > state.max_rank}
    if too_big:
        path, rank = max(too_big.items(), key=lambda item: item[1])
        raise UnsupportedOperationError(
            f"swap: the new {method} adapter for {name!r} has rank {rank} at {path!r}, above the prepared "
            f"max_rank={state.max_rank}; prepare_compiled(max_rank={rank}) before compiling"
        )


# -- per-sample and the gate ---------------------------------------------------------------------------------
@contextlib.contextmanager
def per_sample(model: nn.Module, method: str, rows: Sequence[str]) -> Iterator[None]:
    """Route batch row ``i`` through ``rows[i]`` in this thread's forwards of the prepared model."""
    state = prepared(model, method)
    assert state is not None
    gate = _gate(model)
    slots = torch.tensor([state.slot_of.get(row, state.capacity) for row in rows], dtype=torch.long)
    # A row computes its adapter at the weight set_active gave it (1 when not active), as in eager mode.
    names, weights = model.__dict__[KEY].get(("active", method), ([], None))
    slot_weights = torch.ones(state.capacity + 1)
    for n, w in zip(names, weights or ()):
        slot_weights[state.slot_of[n]] = w
    device = state.routing.device
    plan = plan_rows(torch.where(slots == state.capacity, NO_SLOT, slots), state.capacity + 1, device)
    block = _Block(slots.to(device), slot_weights.to(device), plan)
    me = threading.get_ident()
    with gate.lock:  # no gated forward runs while the blocks change
        state.routing.blocks.setdefault(me, []).append(block)
        gate.open += 1
        gate.gated = True
    try:
        yield
    finally:
        with gate.lock:
            mine = state.routing.blocks[me]
            mine.pop()
            if not mine:
                del state.routing.blocks[me]
            gate.open -= 1
            if not gate.open:
                gate.gated = False
                for routing in gate.routings.values():
                    routing.per_sample, routing.owner = False, None


class _Gate:
    """The model's forward gate for per-thread routing (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.open = 0
        self.gated = False  # read by the hooks: a compiled model guards on it (one graph each way)
        self.routings: dict[str, Routing] = {}
        self.depth: dict[int, int] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> _Gate:
        # A copy of the model: the copy's routings (shared with its layers through the memo), no open block.
        new = memo[id(self)] = _Gate()
        new.routings = copy.deepcopy(self.routings, memo)
        for routing in new.routings.values():
            routing.blocks, routing.per_sample, routing.owner = {}, False, None
        return new


def _gate(model: nn.Module) -> _Gate:
    banks = model.__dict__.setdefault(KEY, {})
    gate = banks.get(GATE)
    if gate is None:
        gate = banks[GATE] = _Gate()
        # Module-level functions that find the gate on the module they run for: copies of the model keep theirs.
        model.register_forward_pre_hook(_before)
        model.register_forward_hook(_after, always_call=True)
    return gate


def _before(module: nn.Module, args: Any) -> None:
    gate = module.__dict__.get(KEY, {}).get(GATE)
    if gate is not None and gate.gated:  # a compiled model guards on the flag: no block open, nothing here
        _enter(gate)


def _after(module: nn.Module, args: Any, output: Any) -> None:
    gate = module.__dict__.get(KEY, {}).get(GATE)
    if gate is not None and (gate.gated or gate.depth):
        _leave(gate)


@torch.compiler.disable
def _enter(gate: _Gate) -> None:
    me = threading.get_ident()
    gate.lock.acquire()  # released by _leave: prepared forwards run one at a time while blocks are open
    gate.depth[me] = gate.depth.get(me, 0) + 1
    for routing in gate.routings.values():
        mine = routing.blocks.get(me)
        if mine:
            block = mine[-1]
            routing.rows, routing.slot_weights, routing.plan = block.rows, block.slot_weights, block.plan
            routing.per_sample, routing.owner = True, me
        else:
            routing.per_sample, routing.owner = False, None


@torch.compiler.disable
def _leave(gate: _Gate) -> None:
    me = threading.get_ident()
    depth = gate.depth.get(me, 0)
    if not depth:
        return
    if depth == 1:
        del gate.depth[me]
    else:
        gate.depth[me] = depth - 1
    gate.lock.release()


def _routed_rows(routing: Routing, batch: int) -> bool:
    """Whether the running forward is routed per row (eager forwards also check the thread)."""
    if not routing.per_sample:
        return False
    if not torch.compiler.is_compiling() and routing.owner != threading.get_ident():
        return False  # an ungated eager forward of another thread, already running when the block opened
    if routing.rows.shape[0] != batch:
        raise PerSampleError(
            f"per_sample was given {routing.rows.shape[0]} row names but the batch has {batch} rows; "
            "pass one adapter name (or '__base__') per row"
        )
    return True


# -- the prepared layers' forwards ---------------------------------------------------------------------------
def _lora_forward(self: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if self.training or self._disable_adapters or self.merged_adapters or kwargs.get("adapter_names") is not None:
        return type(self).forward(self, x, *args, **kwargs)  # peft's own (it reads the banks' views)
    routing: Routing = self.__dict__["_adapterkit_routing"]
    result = self.base_layer(x, *args, **kwargs)
    bank_a, bank_b, scale = self.adapterkit_A, self.adapterkit_B, self.adapterkit_scale
    if _routed_rows(routing, x.shape[0]):
        # Compiled: each row's weights gathered (BGMV); eager: one matmul pair per distinct adapter.
        rows = routing.rows if torch.compiler.is_compiling() else routing.plan
        delta = kernels.lora_delta_rows(x, bank_a, bank_b, scale * routing.slot_weights, rows)
        return result + delta.to(result.dtype)
    delta = kernels.lora_delta_active(x, bank_a, bank_b, scale, routing.slots, routing.weights)
    return (result + delta).to(result.dtype)


def _ia3_forward(self: IA3Linear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if self.training or self._disable_adapters or self.merged_adapters:
        return type(self).forward(self, x, *args, **kwargs)
    routing: Routing = self.__dict__["_adapterkit_routing"]
    bank_in, bank_out = self.adapterkit_in, self.adapterkit_out
    # peft's dtype handling: the input scaled in the adapter's dtype (feedforward), the output by promotion.
    if _routed_rows(routing, x.shape[0]):
        rows, weights = routing.rows, routing.slot_weights
        interm = kernels.ia3_rows(x, bank_in, rows, slot_weights=weights)
        result = self.base_layer(interm, *args, **kwargs)
        return kernels.ia3_rows(result, bank_out, rows, slot_weights=weights, cast=False)
    interm = kernels.ia3_active(x, bank_in, routing.slots, routing.weights)
    result = self.base_layer(interm, *args, **kwargs)
    return kernels.ia3_active(result, bank_out, routing.slots, routing.weights, cast=False)
