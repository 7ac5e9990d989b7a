"""Loads beside live traffic: forwards in other threads while adapters are loaded, swapped, deleted and switched.

* A layer a load wraps for the first time is seated complete and starts with the method's
  current active adapters: a forward at the very moment of seating (run from the parent's
  ``__setattr__``) computes what it computed before -- direct loads, peft's tuner path,
  a method stacking on another's layer, and deletes that unwrap.
* 200 loads (``activate=False``), swaps and deletes of inactive adapters in one thread while
  another runs forwards with its active adapter on a tiny Llama: 0 wrong outputs; the same
  with a ``per_sample`` block open in the forward thread.
* ``set_active`` is atomic as seen from a concurrent forward: each output equals exactly one
  of the two sets' outputs (weighted sets too), never a mix. (Without the forward gate of
  ``adapterkit.concurrency`` this test fails: forwards see half of each set.)
* The gate: installed once, copies and pickles get their own, a forward that raises leaves it
  open, an operation run inside a forward (same thread) and re-entrant forwards do not
  deadlock, one that another thread's operation waits for raises instead of deadlocking, and torch.compile runs the model as one graph with the gate's hooks outside it.
"""

from __future__ import annotations

import copy
import pickle
import threading
from collections.abc import Callable

import adapterkit
import pytest
import torch
from adapterkit import AdapterStateError
from adapterkit.concurrency import ForwardGate, gate
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=96
)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TIMEOUT = 30  # seconds a thread may take before the test calls it a deadlock


def make_llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def tokens(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, LLAMA["vocab_size"], (batch, 6), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def lora_state(model: nn.Module, spec: str, seed: int, scale: float = 0.5) -> tuple[object, dict[str, torch.Tensor]]:
    """A LoRA adapter's config and strong random tensors, made on a scratch copy of the model."""
    scratch = copy.deepcopy(model)
    adapters = adapterkit.attach(scratch)
    adapters.add(spec, "scratch")
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=generator) * scale for k, v in adapters.state_dict("scratch").items()}
    return adapters.config("scratch"), state


def run_threads(*targets: Callable[[], None]) -> None:
    """Run each target in its own thread; re-raise the first error; fail on a deadlock."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def body() -> None:
            try:
                target()
            except BaseException as error:  # noqa: BLE001 - handed to the test thread
                errors.append(error)

        return body

    threads = [threading.Thread(target=guarded(t), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "a thread is stuck (deadlock?)"
    if errors:
        raise errors[0]


# -- layers seated complete --------------------------------------------------------------------------


class Spy(nn.Sequential):
    """A container that runs the whole model each time one of its children is replaced."""

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        watch = self.__dict__.get("watch")
        if watch is not None and isinstance(value, nn.Module):
            root, x, seen = watch
            seen.append(root(x).detach().clone())


def spy_model() -> tuple[nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    root = nn.Sequential()
    root.add_module("s1", Spy())
    root.s1.add_module("lin1", nn.Linear(8, 16))
    root.s1.add_module("act", nn.Tanh())
    root.add_module("s2", Spy())
    root.s2.add_module("lin2", nn.Linear(16, 8))
    root.eval()
    x, seen = torch.randn(3, 8), []
    for spy in (root.s1, root.s2):
        spy.__dict__["watch"] = (root, x, seen)
    return root, x, seen


SEATINGS = [
    pytest.param("lora[r=2, target_modules=['lin2'], init_lora_weights=False]", id="lora-direct"),
    pytest.param("lora[r=2, target_modules=['lin2'], use_dora=True, init_lora_weights=False]", id="lora-tuner-path"),
    pytest.param("ia3[target_modules=['lin1', 'lin2'], feedforward_modules=['lin2']]", id="ia3-stacked-on-lora"),
]


@pytest.mark.parametrize("spec", SEATINGS)
def test_a_forward_at_the_moment_a_layer_is_seated_computes_the_active_adapters(spec):
    root, x, seen = spy_model()
    adapters = adapterkit.attach(root)
    adapters.add("lora[r=2, target_modules=['lin1'], init_lora_weights=False]", "live")
    with torch.no_grad():
        root.s1.lin1.lora_B["live"].weight.normal_()
        expected = root(x)
        seen.clear()
        config, state = _fresh_state(spec)
        adapters.load(None, "new", config=config, state_dict=state, activate=False)
        assert seen, "the load seated no new layer: the test tests nothing"
        for output in seen:
            assert torch.equal(output, expected)
        assert torch.equal(root(x), expected)
        seen.clear()
        adapters.delete("new")  # unwrapping: one assignment per layer
        assert seen and all(torch.equal(output, expected) for output in seen)


def _fresh_state(spec: str) -> tuple[object, dict[str, torch.Tensor]]:
    root, _, _ = spy_model()
    adapters = adapterkit.attach(root)
    adapters.add(spec, "scratch")
    generator = torch.Generator().manual_seed(7)
    state = {k: 1 + torch.randn(v.shape, generator=generator) for k, v in adapters.state_dict("scratch").items()}
    return adapters.config("scratch"), state


def test_add_switches_to_the_new_adapter_only_after_it_is_complete():
    root, x, seen = spy_model()
    adapters = adapterkit.attach(root)
    adapters.add("lora[r=2, target_modules=['lin1'], init_lora_weights=False]", "live")
    with torch.no_grad():
        expected = root(x)
        seen.clear()
        adapters.add("lora[r=2, target_modules=['lin2'], init_lora_weights=False]", "next")  # becomes active
        assert seen and all(torch.equal(output, expected) for output in seen)


# -- loads, swaps and deletes beside forwards -------------------------------------------------------


@pytest.fixture(scope="module")
def traffic() -> dict[str, object]:
    """A tiny Llama with an active adapter "live", and the adapters a loader thread cycles through."""
    model = make_llama()
    live = lora_state(model, "lora[r=4, target_modules=['q_proj', 'v_proj'], init_lora_weights=False]", seed=1)
    others = [
        lora_state(model, "lora[r=4, target_modules=['q_proj', 'v_proj'], init_lora_weights=False]", seed=2),  # same layers
        lora_state(model, "lora[r=2, target_modules=['gate_proj', 'down_proj'], init_lora_weights=False]", seed=3),  # new
        lora_state(model, "lora[r=2, target_modules='all-linear', init_lora_weights=False]", seed=4),  # peft's tuner
    ]
    ia3 = copy.deepcopy(model)
    ia3_adapters = adapterkit.attach(ia3)
    ia3_adapters.add("ia3[target_modules=['k_proj', 'up_proj'], feedforward_modules=['up_proj']]", "scratch")
    ia3_state = {k: 1 + torch.randn_like(v) for k, v in ia3_adapters.state_dict("scratch").items()}
    others.append((ia3_adapters.config("scratch"), ia3_state))
    return {"live": live, "others": others}


def loader_ops(adapters: adapterkit.Adapters, others: list, count: int, keep: frozenset[str] = frozenset()) -> Callable[[], None]:
    """``count`` loads (activate=False), swaps and deletes of inactive adapters, cycling through ``others``."""

    def body() -> None:
        loaded: list[tuple[str, int]] = []
        for step in range(count):
            kind = step % 4
            if kind in (0, 1) or not loaded:
                index = step % len(others)
                config, state = others[index]
                name = f"n{step}"
                adapters.load(None, name, config=copy.deepcopy(config), state_dict=state, activate=False)
                loaded.append((name, index))
            elif kind == 2:
                name, index = loaded[-1]
                config, _ = others[index]
                adapters.swap({k: v * -1.0 if index != 3 else v for k, v in others[index][1].items()}, name)
            else:
                name, _ = loaded.pop(0)
                adapters.delete(name)
        for name, _ in loaded:
            adapters.delete(name)
        assert set(adapters.names) == {"live", *keep}

    return body


def test_loads_swaps_and_deletes_beside_forwards_change_no_output(traffic):
    """200 loads (activate=False), swaps (adapterkit_swap) and deletes of inactive adapters beside forwards: 0 wrong."""
    model, x = make_llama(), tokens()
    adapters = adapterkit.attach(model)
    config, state = traffic["live"]
    adapters.load(None, "live", config=config, state_dict=state)
    expected = logits(model, x)
    done = threading.Event()
    results = {"forwards": 0, "wrong": 0}

    def forwards() -> None:
        while not done.is_set() or results["forwards"] < 5:
            out = logits(model, x)
            results["forwards"] += 1
            results["wrong"] += not torch.equal(out, expected)

    load = loader_ops(adapters, traffic["others"], 200)

    def loader() -> None:
        try:
            load()
        finally:
            done.set()

    run_threads(forwards, loader)
    assert results["wrong"] == 0, f"{results['wrong']} of {results['forwards']} forwards were wrong"
    assert torch.equal(logits(model, x), expected)


def test_a_per_sample_block_keeps_its_rows_while_another_thread_loads(traffic):
    model, x = make_llama(), tokens(3)
    adapters = adapterkit.attach(model)
    config, state = traffic["live"]
    adapters.load(None, "live", config=config, state_dict=state)
    adapters.load(None, "other", config=copy.deepcopy(config), state_dict={k: -v for k, v in state.items()}, activate=False)
    rows = ["other", "__base__", "live"]
    with adapters.per_sample(rows):
        expected = logits(model, x)
    plain = logits(model, x)
    done = threading.Event()
    results = {"forwards": 0, "wrong": 0}

    def routed_forwards() -> None:
        with adapters.per_sample(rows):
            while not done.is_set() or results["forwards"] < 5:
                results["forwards"] += 1
                results["wrong"] += not torch.equal(logits(model, x), expected)

    load = loader_ops(adapters, traffic["others"], 60, keep=frozenset({"other"}))

    def loader() -> None:
        try:
            started = 0
            while results["forwards"] == 0 and started < 10_000:  # let the block open first
                started += 1
                threading.Event().wait(0.001)
            with pytest.raises(AdapterStateError, match="per_sample block is open"):
                adapters.swap({k: v * 2 for k, v in state.items()}, "other")  # its rows name it
            load()
        finally:
            done.set()

    run_threads(routed_forwards, loader)
    assert results["wrong"] == 0, f"{results['wrong']} of {results['forwards']} routed forwards were wrong"
    assert torch.equal(logits(model, x), plain)


# -- set_active is atomic ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_sets() -> tuple[nn.Module, adapterkit.Adapters]:
    """A tiny Llama with two strong adapters "a" and "b" on every projection."""
    model = make_llama()
    adapters = adapterkit.attach(model)
    for name, seed in (("a", 11), ("b", 12)):
        config, state = lora_state(model, f"lora[r=4, target_modules={ALL}, init_lora_weights=False]", seed, scale=1.0)
        adapters.load(None, name, config=config, state_dict=state, activate=False)
    return model, adapters


SETS = [
    pytest.param((["a"], None), (["b"], None), id="a-or-b"),
    pytest.param((["a", "b"], [1.0, 0.0]), (["a", "b"], [0.0, 1.0]), id="weighted"),
]


@pytest.mark.parametrize(("first", "second"), SETS)
def test_set_active_is_atomic_for_a_concurrent_forward(two_sets, first, second):
    model, adapters = two_sets
    x = tokens()
    expected = []
    for names, weights in (first, second):
        adapters.set_active(names, weights=weights)
        expected.append(logits(model, x))
    assert (expected[0] - expected[1]).abs().max() > 0.3  # a mix would show
    done = threading.Event()
    results = {"forwards": 0, "wrong": 0, "seen": [0, 0]}

    def forwards() -> None:
        while not done.is_set() or results["forwards"] < 5:
            out = logits(model, x)
            results["forwards"] += 1
            matches = [torch.equal(out, e) for e in expected]
            results["wrong"] += not any(matches)
            for index, match in enumerate(matches):
                results["seen"][index] += match

    def flipper() -> None:
        try:
            for step in range(200):
                names, weights = (first, second)[step % 2]
                adapters.set_active(names, weights=weights)
                threading.Event().wait(0.001)  # let forwards start under each set
        finally:
            done.set()

    run_threads(forwards, forwards, flipper)
    assert results["wrong"] == 0, f"{results['wrong']} of {results['forwards']} forwards mixed the two sets"
    assert all(results["seen"]), results


def test_an_operation_waits_for_forwards_in_flight_and_they_see_the_old_set(two_sets):
    model, adapters = two_sets
    x = tokens()
    adapters.set_active("a")
    old = logits(model, x)
    adapters.set_active("b")
    new = logits(model, x)
    adapters.set_active("a")
    inside, release, switched = threading.Event(), threading.Event(), threading.Event()
    outputs = []

    def hold(module: nn.Module, args: object) -> None:
        if threading.current_thread().name == "held":
            inside.set()
            release.wait(TIMEOUT)

    handle = model.model.layers[1].register_forward_pre_hook(hold)  # halfway through the model
    try:
        forward = threading.Thread(target=lambda: outputs.append(logits(model, x)), name="held")
        forward.start()
        assert inside.wait(TIMEOUT)
        switch = threading.Thread(target=lambda: (adapters.set_active("b"), switched.set()))
        switch.start()
        assert not switched.wait(0.3)  # it waits for the forward in flight
        release.set()
        forward.join(TIMEOUT)
        switch.join(TIMEOUT)
        assert switched.is_set()
    finally:
        handle.remove()
        release.set()
    assert torch.equal(outputs[0], old)
    assert torch.equal(logits(model, x), new)


# -- the gate ----------------------------------------------------------------------------------------


def small_model() -> tuple[nn.Module, adapterkit.Adapters]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).eval()
    adapters = adapterkit.attach(model)
    adapters.add("lora[r=2, target_modules=['0', '2'], init_lora_weights=False]", "a")
    adapters.add("lora[r=2, target_modules=['0'], init_lora_weights=False]", "b")
    return model, adapters


def gate_hooks(model: nn.Module) -> int:
    from adapterkit import concurrency

    return sum(hook is concurrency._enter for hook in model._forward_pre_hooks.values()) + sum(
        hook is concurrency._leave for hook in model._forward_hooks.values()
    )


def test_the_gate_is_installed_once_and_copies_get_their_own():
    model, adapters = small_model()
    adapterkit.attach(model)
    adapters.delete("b")
    adapters.add("lora[r=2, target_modules=['0'], init_lora_weights=False]", "b")
    assert gate_hooks(model) == 2
    x = torch.randn(2, 8)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), copy.deepcopy(adapters).model):
        assert gate_hooks(twin) == 2
        assert isinstance(gate(twin), ForwardGate) and gate(twin) is not gate(model)
        out = []
        with gate(model).closed():  # the original's gate is closed: the copy's forwards run
            run_threads(lambda twin=twin: out.append(logits_of(twin, x)))
        assert torch.equal(out[0], logits_of(model, x))


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_a_forward_that_raises_leaves_the_gate_open():
    model, adapters = small_model()
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5))  # wrong width
    run_threads(lambda: adapters.set_active("b"))
    assert adapters.active == ["b"]


def test_an_operation_inside_a_forward_of_the_same_thread_does_not_deadlock():
    model, adapters = small_model()
    x = torch.randn(2, 8)

    def switch(module: nn.Module, args: object) -> None:
        adapters.set_active("b")

    handle = model[1].register_forward_pre_hook(switch)
    try:
        run_threads(lambda: logits_of(model, x))
    finally:
        handle.remove()
    assert adapters.active == ["b"]


def test_an_operation_inside_a_forward_that_another_operation_waits_for_is_refused_not_deadlocked():
    model, adapters = small_model()
    x = torch.randn(2, 8)
    inside, caught = threading.Event(), []

    def call_inside(module: nn.Module, args: object) -> None:
        if threading.current_thread().name != "forward":
            return
        inside.set()
        for _ in range(TIMEOUT * 100):  # until the other thread's set_active holds the gate
            if gate(model)._writer is not None:
                break
            threading.Event().wait(0.01)
        try:
            adapters.state_dict("a")
        except AdapterStateError as error:
            caught.append(error)
            raise

    def forward() -> None:
        with pytest.raises(AdapterStateError, match="inside a forward"):
            logits_of(model, x)

    def switch() -> None:
        assert inside.wait(TIMEOUT)
        adapters.set_active("b")

    handle = model[1].register_forward_pre_hook(call_inside)
    try:
        threads = [threading.Thread(target=forward, name="forward"), threading.Thread(target=switch)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive()
    finally:
        handle.remove()
    assert caught and adapters.active == ["b"]


def test_reentrant_forwards_count_once_and_do_not_wait_for_a_waiting_writer():
    model, adapters = small_model()
    x = torch.randn(2, 8)
    state = {"nested": False}

    def nested(module: nn.Module, args: object) -> None:
        if state["nested"]:
            return
        state["nested"] = True
        writer = threading.Thread(target=lambda: adapters.set_active("b"))
        writer.start()
        for _ in range(TIMEOUT * 100):  # until the writer holds new forwards back
            if gate(model)._writer is not None:
                break
            threading.Event().wait(0.01)
        logits_of(model, x)  # this thread is inside a forward already: it passes
        state["writer"] = writer

    handle = model[1].register_forward_pre_hook(nested)
    try:
        run_threads(lambda: logits_of(model, x))
        state["writer"].join(TIMEOUT)
        assert not state["writer"].is_alive()
    finally:
        handle.remove()
    assert adapters.active == ["b"]
    run_threads(lambda: adapters.set_active("a"))  # nothing left counted


def test_torch_compile_sees_one_graph_and_the_gate_stays_outside_it():
    from torch._dynamo.utils import counters

    model, adapters = small_model()
    x = torch.randn(2, 8)
    expected = logits_of(model, x)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    for _ in range(3):
        assert torch.equal(logits_of(compiled, x), expected)
    assert counters["stats"]["unique_graphs"] == 1
    # The only break dynamo records is its skip of the gate's own (disabled) hook, at the model's entry.
    reasons = [reason for reason in counters["graph_break"] if "_enter" not in reason and "_leave" not in reason]
    assert not reasons, reasons
    assert gate(model)._running == {}  # the hooks ran, in and out
