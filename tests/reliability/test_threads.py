"""Threads: loads change nothing another thread sees; one model used from several threads stays consistent.

* **Nothing process-wide.** While one thread loads adapters over and over, other
  threads draw seeded random numbers, initialise tensors, build fresh torch
  modules and fresh peft models: every result equals what it is without loads
  (thousands of them, 0 wrong). A watcher thread compares the identities of
  everything a load used to swap (``torch.randn``/``rand``/``empty``..., every
  ``torch.nn.init`` function, ``nn.Module``'s and peft's ``BaseTunerLayer``'s
  methods) throughout: they never change. Two models loading at the same time
  both load, every time, and leave nothing patched and no torch function mode
  behind.
* **One model, several threads.** Every operation of an ``Adapters`` runs under
  its re-entrant lock: operations from several threads on one model interleave
  only as whole operations. Random mixes of set_active / merge / unmerge / load /
  delete / save / state_dict / disable / enable from four threads raise only
  adapterkit's typed errors, and leave a model whose bookkeeping matches its
  layers and whose base weights and outputs are what they should be.
* **per_sample is per thread.** A ``per_sample`` block routes the forwards of the
  thread that opened it; other threads' forwards on the same model compute the
  active adapters, and two threads' blocks at once each get their own rows.
  Operations that would break an open block (merge, disable, delete of a routed
  adapter, add/load) are refused, from any thread.
* A forward never takes the lock: it runs while another thread holds it, and
  beside deletes of inactive adapters and saves it computes what it computed before.
"""

from __future__ import annotations

import contextlib
import copy
import random
import re
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import adapterkit
import peft
import pytest
import torch
from adapterkit import AdapterkitError, AdapterStateError, concurrency
from peft.tuners.tuners_utils import BaseTunerLayer
from shared_test_helpers import llama_input, make_llama, make_mlp, mlp_input, run
from torch import nn

INSTALLED = set(adapterkit.available_methods())
SPECS = {
    "a": "lora[r=4, target_modules=['q_proj', 'v_proj'], init_lora_weights=False]",
    "b": "lora[r=2, lora_alpha=8, target_modules=['q_proj', 'o_proj', 'up_proj'], init_lora_weights=False]",
    "c": "lora[r=3, target_modules=['k_proj', 'down_proj'], init_lora_weights=False]",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each adapter of SPECS saved from the seeded tiny Llama."""
    root = tmp_path_factory.mktemp("thread-adapters")
    for seed, (name, spec) in enumerate(SPECS.items()):
        model = make_llama()
        torch.manual_seed(100 + seed)
        adapterkit.attach(model).add(spec, name)
        adapterkit.attach(model).save(root, name)
    return {name: root / name for name in SPECS}


@contextlib.contextmanager
def fine_switching() -> Iterator[None]:
    """Threads take turns every 20 us instead of every 5 ms, so that they interleave inside loads."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(2e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def run_threads(*targets: Callable[[], None], timeout: float = 120) -> None:
    """Run each target in its own thread; re-raise the first exception one of them raised."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


# -- nothing process-wide ---------------------------------------------------------------------------
def swappable_identities() -> dict[str, int]:
    """The identity of everything a load might swap for the whole process."""
    found = {}
    for owner, names in (
        (torch, ("randn", "rand", "randint", "empty", "zeros", "ones", "full", "normal", "tensor")),
        (nn.init, [n for n, v in vars(nn.init).items() if callable(v) and not n.startswith("__")]),
    ):
        for name in names:
            found[f"{owner.__name__}.{name}"] = id(getattr(owner, name))
    for cls in (
        nn.Module,
        nn.Linear,
        nn.Embedding,
        BaseTunerLayer,
        peft.tuners.lora.LoraLayer,
        peft.tuners.lora.Linear,
    ):
        for name, value in vars(cls).items():
            found[f"{cls.__qualname__}.{name}"] = id(value)
    return found


class Tally:
    """Counts of checks done and wrong, per kind, from several threads."""

    def __init__(self) -> None:
        self.done: dict[str, int] = {}
        self.wrong: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def record(self, kind: str, problem: str | None) -> None:
        with self.lock:
            self.done[kind] = self.done.get(kind, 0) + 1
            if problem:
                self.wrong.setdefault(kind, []).append(problem)


def draw_checks(tally: Tally, rounds: int) -> None:
    """Seeded draws and initialisers, compared with values computed before any load ran."""
    expected = {
        seed: (
            torch.randn(16, generator=torch.Generator().manual_seed(seed)),
            torch.rand(16, generator=torch.Generator().manual_seed(seed)),
            nn.init.normal_(torch.empty(16), generator=torch.Generator().manual_seed(seed)),
            nn.init.kaiming_uniform_(torch.empty(4, 4), generator=torch.Generator().manual_seed(seed)),
        )
        for seed in range(32)
    }
    for i in range(rounds):
        seed = i % 32
        got = (
            torch.randn(16, generator=torch.Generator().manual_seed(seed)),
            torch.rand(16, generator=torch.Generator().manual_seed(seed)),
            nn.init.normal_(torch.empty(16), generator=torch.Generator().manual_seed(seed)),
            nn.init.kaiming_uniform_(torch.empty(4, 4), generator=torch.Generator().manual_seed(seed)),
        )
        same = all(g.device.type == "cpu" and torch.equal(g, e) for g, e in zip(got, expected[seed], strict=True))
        tally.record("seeded draws and initialisers", None if same else f"seed {seed}")


def build_checks(tally: Tally, rounds: int) -> None:
    """Fresh torch modules: real (not meta) tensors, initialised as torch initialises them."""
    for _ in range(rounds):
        linear, norm, embedding = nn.Linear(8, 8), nn.LayerNorm(8), nn.Embedding(4, 8)
        module = nn.Module()
        module.register_parameter("p", nn.Parameter(torch.ones(3)))
        tensors = [linear.weight, linear.bias, norm.weight, norm.bias, embedding.weight, module.p]
        problem = None
        if any(t.device.type != "cpu" for t in tensors):
            problem = f"devices {[t.device.type for t in tensors]}"
        elif not (linear.weight.abs().max() <= 8**-0.5 and linear.weight.std() > 0):
            problem = "nn.Linear left uninitialised"
        elif not (torch.equal(norm.weight, torch.ones(8)) and torch.equal(norm.bias, torch.zeros(8))):
            problem = "nn.LayerNorm left uninitialised"
        elif not (embedding.weight.std() > 0.5 and torch.isfinite(embedding.weight).all()):
            problem = "nn.Embedding left uninitialised"
        elif not torch.equal(module.p, torch.ones(3)):
            problem = "register_parameter changed the parameter"
        tally.record("fresh torch modules", problem)


def peft_checks(tally: Tally, rounds: int) -> None:
    """Fresh peft models (peft's own get_peft_model): real weights, B zero, outputs those of the base model."""
    base, x = make_mlp(), mlp_input()
    expected = run(base, x)
    for _ in range(rounds):
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["embed", "head"]))
        lora_a = model.base_model.model.embed.lora_A["default"].weight
        lora_b = model.base_model.model.head.lora_B["default"].weight
        problem = None
        if lora_a.is_meta or lora_b.is_meta:
            problem = "meta weights"
        elif not (torch.isfinite(lora_a).all() and lora_a.std() > 0 and torch.equal(lora_b, torch.zeros_like(lora_b))):
            problem = "LoRA weights not initialised as peft does"
        elif not torch.equal(run(model, x), expected):
            problem = "outputs differ from the base model"
        tally.record("fresh peft models", problem)


def test_loads_change_nothing_other_threads_see(saved: dict[str, Path]) -> None:
    model = make_llama()
    adapters = adapterkit.attach(model)
    before = swappable_identities()
    tally, finished, loads = Tally(), threading.Event(), [0]
    changed: list[str] = []

    def loader() -> None:
        while not finished.is_set():
            for name in ("a", "b"):
                adapters.load(saved[name], name)
            adapters.delete("a")
            adapters.delete("b")
            loads[0] += 2

    def watcher() -> None:
        while not finished.is_set():
            now = swappable_identities()
            changed.extend(k for k in before if now.get(k) != before[k])

    def workers() -> None:
        try:
            run_threads(
                lambda: draw_checks(tally, 3000),
                lambda: build_checks(tally, 2000),
                lambda: peft_checks(tally, 60),
            )
        finally:
            finished.set()

    with fine_switching():
        run_threads(loader, watcher, workers)

    assert tally.done == {"seeded draws and initialisers": 3000, "fresh torch modules": 2000, "fresh peft models": 60}
    assert tally.wrong == {}, {kind: (len(w), w[:3]) for kind, w in tally.wrong.items()}
    assert not changed, f"swapped while loading: {sorted(set(changed))[:10]}"
    assert loads[0] >= 20, f"only {loads[0]} loads ran beside the checks: the test proved little"
    assert swappable_identities() == before


def test_two_models_load_at_the_same_time(saved: dict[str, Path]) -> None:
    x = llama_input()
    reference = {}
    for name in ("a", "c"):  # what each model computes after one load, loaded alone
        model = make_llama()
        adapterkit.attach(model).load(saved[name], name)
        reference[name] = run(model, x)
    before = swappable_identities()
    models = {name: make_llama() for name in ("a", "c")}
    failures: list[str] = []

    def load_many(name: str) -> Callable[[], None]:
        def act() -> None:
            adapters = adapterkit.attach(models[name])
            for i in range(40):
                try:
                    adapters.load(saved[name], name)
                    if i < 39:
                        adapters.delete(name)
                except Exception as exc:
                    failures.append(f"{name} round {i}: {type(exc).__name__}: {exc}")
                    return

        return act

    with fine_switching():
        run_threads(load_many("a"), load_many("c"))

    assert failures == []
    for name, model in models.items():
        assert torch.equal(run(model, x), reference[name]), f"model {name} computes another adapter"
    # Nothing left patched, and no torch function mode left on this (or any other) thread's stack.
    assert swappable_identities() == before
    assert torch._C._len_torch_function_stack() == 0
    assert torch.randn(3).device.type == "cpu" and nn.Linear(2, 2).weight.device.type == "cpu"
    assert torch.equal(
        torch.randn(4, generator=torch.Generator().manual_seed(0)),
        torch.randn(4, generator=torch.Generator().manual_seed(0)),
    )


# -- one model, several threads -------------------------------------------------------------------------
def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's parameters by logical name (adapter wrappers' base_layer hops removed)."""
    return {
        name.replace(".base_layer", ""): p.detach().clone()
        for name, p in model.named_parameters()
        if "lora_" not in name and "ia3_" not in name
    }


def test_operations_from_several_threads_on_one_model_stay_consistent(saved: dict[str, Path], tmp_path: Path) -> None:
    model, x = make_llama(), llama_input()
    original = base_weights(model)
    adapters = adapterkit.attach(model)
    adapters.load(saved["a"], "a")
    adapters.load(saved["b"], "b")
    unexpected: list[str] = []
    typed = [0]

    def worker(seed: int) -> Callable[[], None]:
        rng = random.Random(seed)
        operations: list[Callable[[], Any]] = [
            lambda: adapters.set_active(rng.sample(["a", "b"], rng.randint(1, 2))),
            lambda: adapters.merge(),
            lambda: adapters.unmerge(),
            lambda: adapters.load(saved["c"], "c"),
            lambda: adapters.delete("c"),
            lambda: adapters.state_dict(rng.choice(["a", "b", "c"])),
            lambda: adapters.save(tmp_path / f"worker-{seed}", rng.choice(["a", "b"]), overwrite=True),
            lambda: adapters.disable(),
            lambda: adapters.enable(),
            lambda: run(model, x),
        ]

        def act() -> None:
            for _ in range(60):
                try:
                    rng.choice(operations)()
                except AdapterkitError:
                    typed[0] += 1  # another thread got there first: a typed refusal is the right answer
                except Exception as exc:
                    unexpected.append(f"{type(exc).__name__}: {exc}")

        return act

    with fine_switching():
        run_threads(*(worker(seed) for seed in range(4)))

    assert unexpected == [], unexpected[:5]
    assert typed[0] > 0, "no operation was ever refused: the threads did not contend"
    # The bookkeeping agrees with the layers: what is merged, and (after cleaning up) what is active.
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert {n for layer in layers for n in layer.merged_adapters} == set(adapters.merged)
    if adapters.merged:
        adapters.unmerge()
    assert not any(layer.merged for layer in layers)
    adapters.enable()
    if "c" in adapters:
        adapters.delete("c")
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert all(list(layer.active_adapters) == adapters.active and not layer.disable_adapters for layer in layers)
    # Base weights came back (merge/unmerge round trips in float32), and the outputs are those of a fresh model.
    for name, value in base_weights(model).items():
        assert torch.allclose(value, original[name], atol=1e-5), f"{name} drifted"
    fresh = make_llama()
    reference = adapterkit.attach(fresh)
    reference.load(saved["a"], "a")
    reference.load(saved["b"], "b")
    reference.set_active(adapters.active)
    assert torch.allclose(run(model, x), run(fresh, x), atol=1e-4)


def test_a_forward_runs_while_another_thread_holds_the_lock(saved: dict[str, Path]) -> None:
    model, x = make_llama(), llama_input()
    adapters = adapterkit.attach(model)
    adapters.load(saved["a"], "a")
    adapters.load(saved["b"], "b")
    adapters.set_active("a")
    expected = run(model, x)
    holding, release, switched = threading.Event(), threading.Event(), threading.Event()

    def holder() -> None:
        with adapters.lock:
            holding.set()
            release.wait(30)

    def switcher() -> None:
        holding.wait(30)
        adapters.set_active("b")
        switched.set()

    threads = [threading.Thread(target=t, daemon=True) for t in (holder, switcher)]
    for thread in threads:
        thread.start()
    holding.wait(30)
    assert torch.equal(run(model, x), expected), "a forward waited for the lock, or saw a half-made switch"
    assert not switched.wait(0.3), "set_active ran while another thread held the lock"
    assert adapters.active == ["a"]
    release.set()
    for thread in threads:
        thread.join(30)
    assert switched.is_set() and adapters.active == ["b"]


def test_forwards_beside_deletes_of_inactive_adapters_and_saves_stay_right(
    saved: dict[str, Path], tmp_path: Path
) -> None:
    """What leaves the active adapters alone does not change what a concurrent forward computes."""
    model, x = make_llama(), llama_input()
    adapters = adapterkit.attach(model)
    adapters.load(saved["a"], "a")
    spare = [f"spare{i}" for i in range(12)]
    for name in spare:  # inactive adapters on the active one's layers and on others
        adapters.load(saved["b" if len(name) % 2 else "c"], name)
    adapters.set_active("a")
    expected = run(model, x)
    done = threading.Event()
    wrong, forwards = [0], [0]

    def operations() -> None:
        try:
            for i, name in enumerate(spare):
                adapters.save(tmp_path / f"round-{i}", ["a", name])
                adapters.state_dict(name)
                adapters.delete(name)
        finally:
            done.set()

    def forwards_loop() -> None:
        while not done.is_set() or forwards[0] < 10:
            wrong[0] += not torch.equal(run(model, x), expected)
            forwards[0] += 1

    with fine_switching():
        run_threads(operations, forwards_loop)
    assert adapters.names == ["a"] and forwards[0] >= 10
    assert wrong[0] == 0, f"{wrong[0]} of {forwards[0]} forwards were wrong"


# -- per_sample is per thread ------------------------------------------------------------------------------
@pytest.fixture
def routed(saved: dict[str, Path]) -> types.SimpleNamespace:
    """A model with adapters a, b, c (a active), the batch, and the outputs each way of running it."""
    model, x = make_llama(), llama_input()
    adapters = adapterkit.attach(model)
    for name in ("a", "b", "c"):
        adapters.load(saved[name], name)
    if "ia3" in INSTALLED:  # a second method, which the rows below never name
        torch.manual_seed(7)
        adapters.add("ia3[target_modules=['k_proj'], feedforward_modules=[], init_ia3_weights=False]", "i")
    adapters.set_active(["a", "i"] if "ia3" in INSTALLED else ["a"])
    rows = {"ab": ["a", "b", "__base__"], "cb": ["c", "__base__", "b"]}
    outputs = {"plain": run(model, x)}
    for key, names in rows.items():
        with adapters.per_sample(names):
            outputs[key] = run(model, x)
    assert not torch.equal(outputs["ab"], outputs["plain"]) and not torch.equal(outputs["cb"], outputs["ab"])
    return types.SimpleNamespace(model=model, x=x, adapters=adapters, rows=rows, outputs=outputs)


def test_per_sample_routes_only_the_thread_that_opened_it(routed: types.SimpleNamespace) -> None:
    model, x, adapters, outputs = routed.model, routed.x, routed.adapters, routed.outputs
    wrong: dict[str, int] = {}
    counts: dict[str, int] = {}
    stop = threading.Event()

    def check(kind: str, got: torch.Tensor) -> None:
        counts[kind] = counts.get(kind, 0) + 1
        if not torch.equal(got, outputs[kind]):
            wrong[kind] = wrong.get(kind, 0) + 1

    def block_user(key: str) -> Callable[[], None]:
        def act() -> None:
            for _ in range(25):
                with adapters.per_sample(routed.rows[key]):
                    for _ in range(2):
                        check(key, run(model, x))
            stop.set()

        return act

    def plain_user() -> None:
        while not stop.is_set() or counts.get("plain", 0) < 20:
            check("plain", run(model, x))

    with fine_switching():
        run_threads(block_user("ab"), block_user("cb"), plain_user)

    assert counts["ab"] == counts["cb"] == 50 and counts["plain"] >= 20
    assert wrong == {}
    # Every block is closed: the model computes as before, with nothing left on its layers.
    assert torch.equal(run(model, x), outputs["plain"])
    assert not any("forward" in vars(m) or "_old_forward" in vars(m) for m in model.modules())
    # (the model's forward gate keeps its one pre-hook on the root: adapterkit.concurrency)
    assert not any(h is not concurrency._enter for m in model.modules() for h in m._forward_pre_hooks.values())


def test_operations_that_would_break_an_open_block_are_refused(routed: types.SimpleNamespace) -> None:
    model, x, adapters, outputs = routed.model, routed.x, routed.adapters, routed.outputs
    opened, done = threading.Event(), threading.Event()
    inside: list[torch.Tensor] = []

    def block() -> None:
        with adapters.per_sample(routed.rows["ab"]):
            opened.set()
            done.wait(30)
            inside.append(run(model, x))

    thread = threading.Thread(target=block, daemon=True)
    thread.start()
    assert opened.wait(30)
    try:
        for act, what in (
            (lambda: adapters.merge(), "merge"),
            (lambda: adapters.disable(), "disable"),
            (lambda: adapters.delete("b"), "delete adapter 'b'"),
            (lambda: adapters.add("lora[r=2, target_modules=['q_proj']]", "new"), "add or load"),
        ):
            with pytest.raises(
                AdapterStateError, match=rf"cannot {what}.*per_sample block is open.*{re.escape(thread.name)}"
            ):
                act()
        assert adapters.names[:3] == ["a", "b", "c"] and adapters.merged == [] and adapters.enabled
        # What leaves the block's rows alone goes ahead: deleting an adapter it does not route, switching.
        adapters.delete("c")
        adapters.set_active("b")
        switched = run(model, x)
        assert not torch.equal(switched, outputs["plain"])
    finally:
        done.set()
        thread.join(30)
    assert torch.equal(inside[0], outputs["ab"]), "the open block's routing changed under it"
    adapters.merge()  # allowed again once the block is closed
    adapters.unmerge()
