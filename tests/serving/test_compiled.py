"""Compiled switching (``prepare_compiled``): one compile for any number of adapters, outputs equal eager.

Compiles are counted with a backend that counts its calls (``backend="eager"`` semantics: the graph runs
as traced), ``fullgraph=True`` where no per_sample block is open (any graph break raises). The references
are unprepared models holding the same adapters (eager peft layers) and peft's own ``adapter_names``.
"""

from __future__ import annotations

import threading

import adapterkit
import pytest
import torch
from adapterkit import UnsupportedOperationError
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from torch import nn
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = [2, 4, 8, 16]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Dynamo caches compiled frames per code object (LlamaForCausalLM.forward is one for every model):
    # each test starts from none, so that the recompile limit counts this test's compiles only.
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def make_llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    return LlamaForCausalLM(config).eval()


class Counter:
    """A torch.compile backend that counts the graphs it is given and runs them as traced."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def compiled(model: nn.Module, fullgraph: bool = True) -> tuple[nn.Module, Counter]:
    counter = Counter()
    return torch.compile(model, backend=counter, fullgraph=fullgraph), counter


def breaks_inside_the_model() -> list[str]:
    """Graph breaks dynamo recorded, but for its skips of the forward gates' hooks at the model's entry and exit.

    (torch.compile of a transformers model calls the root's hooks outside dynamo; of an nn.Sequential it
    traces them, and skips the gates' disabled functions: a break before the model's graph and one after.)
    """
    gate = ("_enter", "_leave")
    return [reason for reason in counters["graph_break"] if not any(f"function {g} at" in reason for g in gate)]


def ids(batch: int = 2, seq: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=x, use_cache=False) if x.dtype == torch.long else model(x)
    return out.logits if hasattr(out, "logits") else out


def lora_spec(i: int, targets: list[str]) -> str:
    r = RANKS[i % len(RANKS)]
    rs = ", use_rslora=True" if i % 5 == 3 else ""
    return f"lora[r={r}, lora_alpha={r + i % 7}, target_modules={targets!r}, init_lora_weights=False{rs}]"


def lora_targets(i: int) -> list[str]:
    return [["q_proj", "v_proj"], ["q_proj", "k_proj", "o_proj"], ["v_proj", "down_proj", "up_proj"]][i % 3]


def ia3_spec(i: int) -> str:
    targets = [["k_proj", "v_proj", "down_proj"], ["q_proj", "up_proj"], ["v_proj", "down_proj"]][i % 3]
    feedforward = [t for t in targets if t in ("down_proj", "up_proj") and i % 2 == 0]
    return f"ia3[target_modules={targets!r}, feedforward_modules={feedforward!r}]"


def source(make, specs: dict[str, str], seed: int = 0) -> adapterkit.Adapters:
    """An unprepared model holding adapters ``specs`` with non-trivial weights: the eager reference."""
    reference = adapterkit.attach(make())
    for name, spec in specs.items():
        reference.add(spec, name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for key, param in reference.model.named_parameters():
            if ".ia3_l." in key:
                param.normal_(1.0, 0.3)
            elif ".lora_" in key:
                param.normal_(0.0, 0.2)
    reference.model.eval()
    return reference


def copy_into(reference: adapterkit.Adapters, target: adapterkit.Adapters, names: list[str]) -> None:
    for name in names:
        target.load(None, name, config=reference.config(name), state_dict=reference.state_dict(name), activate=False)


def expected(reference: adapterkit.Adapters, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    reference.set_active(names)
    return logits(reference.model, x)


def layer_types(model: nn.Module) -> dict[str, type]:
    """The model's modules outside the adapters' own containers, by path."""
    return {name: type(m) for name, m in model.named_modules() if ".lora_" not in name and ".ia3_" not in name}


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


# -- many adapters, one compile -----------------------------------------------------------------------------
def test_lora_32_adapters_mixed_ranks_cycle_without_recompiles():
    names = [f"a{i}" for i in range(32)]
    reference = source(make_llama, {n: lora_spec(i, lora_targets(i)) for i, n in enumerate(names)})
    model = make_llama()
    adapters = adapterkit.attach(model)
    copy_into(reference, adapters, names[:4])
    adapters.prepare_compiled(max_rank=16, targets=ALL, max_adapters=32)
    copy_into(reference, adapters, names[4:])  # loaded after preparing: they take free slots
    x = ids()
    truth = {n: expected(reference, x, [n]) for n in names}
    fast, counter = compiled(model)
    adapters.set_active(names[0])
    assert close(logits(fast, x), truth[names[0]])
    warm = counter.graphs
    assert warm == 1
    for cycle in range(3):
        for n in names:
            adapters.set_active(n)
            assert close(logits(fast, x), truth[n]), n
    assert counter.graphs == warm
    # The compiled model equals the same model run eagerly, bit for bit (the eager backend runs the same ops).
    assert torch.equal(logits(fast, x), logits(model, x))


def test_hundred_cycles_through_32_adapters_on_a_sequential_model():
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()

    names = [f"a{i}" for i in range(32)]
    specs = {n: lora_spec(i, [["0", "2"], ["2", "4"], ["0", "4"]][i % 3]) for i, n in enumerate(names)}
    reference = source(make, specs)
    model = make()
    adapters = adapterkit.attach(model)
    copy_into(reference, adapters, names)
    adapters.prepare_compiled(max_rank=16, max_adapters=32)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    truth = {n: expected(reference, x, [n]) for n in names}
    fast, counter = compiled(model, fullgraph=False)
    adapters.set_active(names[0])
    logits(fast, x)
    warm = counter.graphs
    for cycle in range(100):
        for n in names:
            adapters.set_active(n)
            out = logits(fast, x)
            assert close(out, truth[n]), (cycle, n)
    assert counter.graphs == warm == 1
    assert breaks_inside_the_model() == []


def test_ia3_32_adapters_cycle_without_recompiles():
    names = [f"v{i}" for i in range(32)]
    reference = source(make_llama, {n: ia3_spec(i) for i, n in enumerate(names)})
    model = make_llama()
    adapters = adapterkit.attach(model)
    copy_into(reference, adapters, names[:3])
    adapters.prepare_compiled(targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], max_adapters=32)
    copy_into(reference, adapters, names[3:])
    x = ids()
    fast, counter = compiled(model)
    adapters.set_active(names[0])
    logits(fast, x)
    warm = counter.graphs
    for cycle in range(2):
        for n in names:
            adapters.set_active(n)
            assert close(logits(fast, x), expected(reference, x, [n])), n
    assert counter.graphs == warm == 1


def test_several_active_and_none_active():
    names = ["a", "b", "c"]
    reference = source(make_llama, {n: lora_spec(i, lora_targets(i)) for i, n in enumerate(names)})
    model = make_llama()
    adapters = adapterkit.attach(model)
    copy_into(reference, adapters, names)
    adapters.prepare_compiled(max_rank=16)
    x = ids()
    fast, counter = compiled(model)
    for active in (["a"], ["a", "b"], ["b", "c"], ["c", "a", "b"], ["b"], [], ["a", "c"]):
        adapters.set_active(active)
        assert close(logits(fast, x), expected(reference, x, active)), active
    # One graph for one active adapter, one for any other number (dynamic in the count).
    assert counter.graphs <= 3
    graphs = counter.graphs
    for active in (["c"], ["a", "b"], ["a", "b", "c"], [], ["b"]):
        adapters.set_active(active)
        assert close(logits(fast, x), expected(reference, x, active)), active
    assert counter.graphs == graphs


# -- weights ---------------------------------------------------------------------------------------------------
def _weighted_copy(reference: adapterkit.Adapters, name: str, weight: float, new: str) -> None:
    """Adapter ``new`` = ``name`` at ``weight``: LoRA's B times the weight; IA3's vector 1 + w (v - 1)."""
    state = reference.state_dict(name, prefix="")
    if reference.method(name).name == "lora":
        state = {k: v * weight if ".lora_B." in k else v for k, v in state.items()}
    else:
        state = {k: 1 + weight * (v - 1) for k, v in state.items()}
    reference.load(None, new, config=reference.config(name), state_dict=state, activate=False)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_weights_switch_without_recompiles_and_match_scaled_adapters(kind):
    spec = (lambda i: lora_spec(i, lora_targets(i))) if kind == "lora" else ia3_spec
    names = [f"w{i}" for i in range(4)]
    reference = source(make_llama, {n: spec(i) for i, n in enumerate(names)})
    model = make_llama()
    adapters = adapterkit.attach(model)
    copy_into(reference, adapters, names)
    adapters.prepare_compiled(max_rank=16, targets=ALL)
    x = ids()
    fast, counter = compiled(model)
    cases = [
        (["w0", "w1"], [0.5, 2.0]),
        (["w2", "w3"], [-1.0, 0.25]),
        (["w1", "w2"], [1.0, 0.0]),
        (["w3", "w0"], [3.0, 1.5]),
    ]
    for round_ in range(2):
        for active, weights in cases:
            adapters.set_active(active, weights=weights)
            scaled = []
            for n, w in zip(active, weights):
                scaled_name = f"{n}_at_{w}".replace(".", "_").replace("-", "minus")
                if scaled_name not in reference:
                    _weighted_copy(reference, n, w, scaled_name)
                scaled.append(scaled_name)
            assert close(logits(fast, x), expected(reference, x, scaled)), (active, weights)
        if round_ == 0:
            graphs = counter.graphs
    assert counter.graphs == graphs == 1
    # Weight 1 is the adapter itself.
    adapters.set_active(["w0", "w1"], weights={"w0": 1.0})
    assert close(logits(fast, x), expected(reference, x, ["w0", "w1"]))


# -- swap, declared targets, loads and deletes ---------------------------------------------------------------
def test_swap_from_folder_and_state_dict_other_rank_alpha_and_targets(tmp_path):
    specs = {
        "a": lora_spec(0, ["q_proj", "v_proj"]),
        "b": lora_spec(1, ["q_proj"]),
        "new1": lora_spec(7, ["q_proj", "v_proj"]),  # rank 16, another alpha, same targets
        "new2": lora_spec(6, ["k_proj", "down_proj"]),  # other targets (declared up front)
    }
    reference = source(make_llama, specs)
    reference.save(tmp_path, ["new1"])
    model = make_llama()
    adapters = adapterkit.attach(model)
    copy_into(reference, adapters, ["a", "b"])
    adapters.prepare_compiled(max_rank=16, targets=ALL)
    x = ids()
    fast, counter = compiled(model)
    adapters.set_active(["a"])
    assert close(logits(fast, x), expected(reference, x, ["a"]))
    graphs = counter.graphs
    adapters.swap(tmp_path / "new1", "a")
    assert adapters.active == ["a"]
    assert close(logits(fast, x), expected(reference, x, ["new1"]))
    adapters.swap(reference.state_dict("new2"), "a", config=reference.config("new2"))
    assert close(logits(fast, x), expected(reference, x, ["new2"]))
    adapters.set_active("b")
    assert close(logits(fast, x), expected(reference, x, ["b"]))
    assert counter.graphs == graphs
    # The swapped adapter saves as the new one.
    assert {k: v.shape for k, v in adapters.state_dict("a").items()} == {
        k: v.shape for k, v in reference.state_dict("new2").items()
    }


def test_targets_union_declared_up_front_and_refused_when_not():
    specs = {"attn": lora_spec(0, ["q_proj"]), "mlp": lora_spec(1, ["up_proj", "down_proj"])}
    reference = source(make_llama, specs)
    x = ids()
    for declared in (["q_proj", "up_proj", "down_proj"], None):
        model = make_llama()
        adapters = adapterkit.attach(model)
        copy_into(reference, adapters, ["attn"])
        adapters.prepare_compiled(max_rank=16, targets=declared)
        fast, counter = compiled(model)
        adapters.set_active("attn")
        assert close(logits(fast, x), expected(reference, x, ["attn"]))
        if declared is None:
            structure, before = str(model), logits(model, x)
            with pytest.raises(UnsupportedOperationError, match="outside the targets prepared"):
                copy_into(reference, adapters, ["mlp"])
            assert str(model) == structure and adapters.names == ["attn"]
            assert torch.equal(logits(model, x), before)
            continue
        # Declared targets no adapter had are wrapped at preparation: the load wraps no module.
        structure = layer_types(model)
        copy_into(reference, adapters, ["mlp"])
        assert layer_types(model) == structure
        adapters.set_active("mlp")
        assert close(logits(fast, x), expected(reference, x, ["mlp"]))
        adapters.set_active(["attn", "mlp"])
        assert close(logits(fast, x), expected(reference, x, ["attn", "mlp"]))
        adapters.set_active("attn")
        assert close(logits(fast, x), expected(reference, x, ["attn"]))
        assert counter.graphs <= 2  # one active adapter, two active adapters


def test_limits_raise_typed_errors_and_leave_the_model_unchanged():
    specs = {f"a{i}": lora_spec(i, ["q_proj", "v_proj"]) for i in range(3)}
    specs["big"] = lora_spec(3, ["q_proj"])  # rank 16
    reference = source(make_llama, specs)
    model = make_llama()
    adapters = adapterkit.attach(model)
    copy_into(reference, adapters, ["a0"])
    with pytest.raises(UnsupportedOperationError, match="max_rank=1"):
        adapters.prepare_compiled(max_rank=1)
    with pytest.raises(adapterkit.ConfigValueError, match="nope"):
        adapters.prepare_compiled(targets=["q_proj", "nope"])
    assert "adapterkit_A" not in dict(model.named_buffers(remove_duplicate=False)).__repr__()
    adapters.prepare_compiled(max_rank=8, max_adapters=2)
    copy_into(reference, adapters, ["a1"])
    x = ids()
    adapters.set_active("a1")
    structure, before, state = str(model), logits(model, x), adapters.state_dict("a1")
    for name, limit in (("a2", "max_adapters=2"), ("big", "max_rank=8")):
        with pytest.raises(UnsupportedOperationError, match=limit):
            copy_into(reference, adapters, [name])
        assert adapters.names == ["a0", "a1"] and adapters.active == ["a1"]
        assert str(model) == structure
        assert torch.equal(logits(model, x), before)
        assert all(torch.equal(v, state[k]) for k, v in adapters.state_dict("a1").items())
    # A freed slot takes the next adapter.
    adapters.delete("a0")
    copy_into(reference, adapters, ["a2"])
    adapters.set_active("a2")
    assert close(logits(model, x), expected(reference, x, ["a2"]))


def test_delete_and_load_after_prepare_reuse_slots_without_recompiles():
    names = [f"a{i}" for i in range(6)]
    reference = source(make_llama, {n: lora_spec(i, lora_targets(i)) for i, n in enumerate(names)})
    model = make_llama()
    adapters = adapterkit.attach(model)
    copy_into(reference, adapters, names[:4])
    adapters.prepare_compiled(max_rank=16, targets=ALL, max_adapters=4)
    x = ids()
    fast, counter = compiled(model)
    adapters.set_active("a0")
    logits(fast, x)
    graphs = counter.graphs
    for old, new in (("a1", "a4"), ("a2", "a5"), ("a4", "a1")):
        adapters.delete(old)
        copy_into(reference, adapters, [new])
        for n in adapters.names:
            adapters.set_active(n)
            assert close(logits(fast, x), expected(reference, x, [n])), n
    assert counter.graphs == graphs
    # Deleting every adapter keeps the prepared layers; the base model computes as without adapters.
    for n in adapters.names:
        adapters.delete(n)
    assert torch.allclose(logits(model, x), logits(make_llama(), x), atol=1e-6)


def test_save_after_prepare_equals_peft_files(tmp_path):
    reference = source(
        make_llama, {"one": lora_spec(1, ["q_proj", "k_proj", "o_proj"]), "two": lora_spec(2, ["v_proj"])}
    )
    reference.save(tmp_path / "src")
    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.load(tmp_path / "src" / "one", "one")
    adapters.load(tmp_path / "src" / "two", "two")
    adapters.prepare_compiled(max_rank=16, targets=ALL)
    adapters.save(tmp_path / "ours")
    theirs = PeftModel.from_pretrained(make_llama(), tmp_path / "src" / "one", adapter_name="one")
    theirs.load_adapter(tmp_path / "src" / "two", "two")
    theirs.save_pretrained(tmp_path / "peft")
    for sub in ("one", "two"):
        ours, peft_files = (
            load_file(tmp_path / "ours" / sub / "adapter_model.safetensors"),
            load_file(tmp_path / "peft" / sub / "adapter_model.safetensors"),
        )
        assert ours.keys() == peft_files.keys()
        assert all(torch.equal(ours[k], peft_files[k]) for k in ours)
    # The parameters are views of the banks: training writes them (and a merge reads them).
    layer = model.model.layers[0].self_attn.q_proj
    weight = layer.lora_B["one"].weight
    assert weight.untyped_storage().data_ptr() == layer.adapterkit_B.untyped_storage().data_ptr()


# -- per_sample under compile ----------------------------------------------------------------------------------
def test_per_sample_under_compile_equals_eager_and_peft_adapter_names(tmp_path):
    configs = {
        "one": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
        "two": LoraConfig(r=8, lora_alpha=3, target_modules=["v_proj", "q_proj"], init_lora_weights=False),
        "three": LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["o_proj"], init_lora_weights=False),
    }
    reference = source(make_llama, {n: c for n, c in configs.items()})
    reference.save(tmp_path)
    theirs = PeftModel.from_pretrained(make_llama(), tmp_path / "one", adapter_name="one").eval()
    for n in ("two", "three"):
        theirs.load_adapter(tmp_path / n, n)
    model = make_llama()
    adapters = adapterkit.attach(model)
    for n in configs:
        adapters.load(tmp_path / n, n, activate=False)
    adapters.prepare_compiled(max_rank=8, targets=ALL)
    fast, counter = compiled(model, fullgraph=False)
    x = ids(batch=4)
    adapters.set_active("two")
    logits(fast, x)
    for rows in (["one", "__base__", "two", "one"], ["three", "two", "one", "__base__"], ["two"] * 4):
        with adapters.per_sample(rows):
            ours = logits(fast, x)
            eager_prepared = logits(model, x)
        with reference.per_sample(rows):
            eager = logits(reference.model, x)
        with torch.no_grad():
            peft_out = theirs(input_ids=x, adapter_names=rows).logits
        assert close(ours, eager) and close(ours, peft_out) and close(eager_prepared, eager), rows
        if rows == ["three", "two", "one", "__base__"]:
            graphs = counter.graphs
    # After the warm-up (one graph per mode), switching rows and active adapters compiles nothing.
    adapters.set_active("one")
    assert close(logits(fast, x), expected(reference, x, ["one"]))
    with adapters.per_sample(["one", "two", "three", "one"]):
        logits(fast, x)
    assert counter.graphs == graphs
    # The model's graph itself has no break: the gates run before and after it, outside any graph.
    assert breaks_inside_the_model() == []
    explanation = torch._dynamo.explain(model)(input_ids=x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_ia3_per_sample_under_compile_equals_eager():
    names = ["v0", "v1", "v2"]
    reference = source(make_llama, {n: ia3_spec(i) for i, n in enumerate(names)})
    model = make_llama()
    adapters = adapterkit.attach(model)
    copy_into(reference, adapters, names)
    adapters.prepare_compiled(targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    fast, counter = compiled(model, fullgraph=False)
    x = ids(batch=4)
    for rows in (["v0", "v1", "__base__", "v2"], ["v2", "v2", "v0", "v1"]):
        with adapters.per_sample(rows):
            ours = logits(fast, x)
        with reference.per_sample(rows):
            eager = logits(reference.model, x)
        assert close(ours, eager), rows


def test_per_sample_routes_only_the_opening_thread_under_compile():
    names = ["a", "b"]
    reference = source(make_llama, {n: lora_spec(i, lora_targets(i)) for i, n in enumerate(names)})
    model = make_llama()
    adapters = adapterkit.attach(model)
    copy_into(reference, adapters, names)
    adapters.prepare_compiled(max_rank=16, targets=ALL)
    fast, _ = compiled(model, fullgraph=False)
    x = ids(batch=2)
    adapters.set_active("a")
    plain = expected(reference, x, ["a"])
    with reference.per_sample(["b", "__base__"]):
        routed = logits(reference.model, x)
    adapters.set_active("a")
    logits(fast, x)
    wrong, done, opened = [], threading.Event(), threading.Event()

    def other_thread() -> None:
        opened.wait()
        for _ in range(20):
            if not close(logits(fast, x), plain):
                wrong.append("other")
        done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with adapters.per_sample(["b", "__base__"]):
        opened.set()
        while not done.is_set():
            if not close(logits(fast, x), routed):
                wrong.append("opener")
    worker.join()
    assert wrong == []
    assert close(logits(fast, x), plain)


# -- a real compile ---------------------------------------------------------------------------------------------
def test_inductor_compile_switches_without_recompiles():
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()

    names = ["a", "b", "c"]
    reference = source(make, {n: lora_spec(i, ["0", "2"]) for i, n in enumerate(names)})
    model = make()
    adapters = adapterkit.attach(model)
    copy_into(reference, adapters, names)
    adapters.prepare_compiled(max_rank=8)
    fast = torch.compile(model)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    adapters.set_active("a")
    logits(fast, x)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n in names * 2:
        adapters.set_active(n)
        assert close(logits(fast, x), expected(reference, x, [n])), n
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before
    assert breaks_inside_the_model() == []


# -- refusals, weights in rows, the other operations on a prepared model --------------------------------------
def test_swap_refusals_leave_the_adapter_and_the_graph_as_they_were(tmp_path):
    specs = {"a": lora_spec(1, ["q_proj", "v_proj"]), "big": lora_spec(3, ["q_proj"]), "far": lora_spec(2, ["up_proj"])}
    specs["same"] = lora_spec(5, ["q_proj", "v_proj"])  # rank 4 as "a", another alpha: swapped in place
    reference = source(make_llama, specs)
    model = make_llama()
    adapters = adapterkit.attach(model)
    copy_into(reference, adapters, ["a"])
    adapters.prepare_compiled(max_rank=8, targets=["q_proj", "v_proj"])
    fast, counter = compiled(model)
    x = ids()
    adapters.set_active("a")
    assert close(logits(fast, x), expected(reference, x, ["a"]))
    graphs, state = counter.graphs, adapters.state_dict("a")
    for name, limit in (("big", "max_rank=8"), ("far", "outside the targets prepared")):
        with pytest.raises(UnsupportedOperationError, match=limit):
            adapters.swap(reference.state_dict(name), "a", config=reference.config(name))
        assert all(torch.equal(v, state[k]) for k, v in adapters.state_dict("a").items())
        assert close(logits(fast, x), expected(reference, x, ["a"]))
    params = [p for n, p in model.named_parameters() if ".lora_A.a." in n]
    adapters.swap(reference.state_dict("same"), "a", config=reference.config("same"))
    assert all(p is q for p, q in zip(params, [p for n, p in model.named_parameters() if ".lora_A.a." in n]))
    assert close(logits(fast, x), expected(reference, x, ["same"]))
    assert counter.graphs == graphs


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_per_sample_rows_use_their_adapters_weights_under_compile(kind):
    spec = (lambda i: lora_spec(i, lora_targets(i))) if kind == "lora" else ia3_spec
    names = ["p0", "p1", "p2"]
    reference = source(make_llama, {n: spec(i) for i, n in enumerate(names)})
    model = make_llama()
    adapters = adapterkit.attach(model)
    copy_into(reference, adapters, names)
    adapters.prepare_compiled(max_rank=16, targets=ALL)
    fast, _ = compiled(model, fullgraph=False)
    x = ids(batch=3)
    rows = ["p1", "p0", "__base__"]
    eager = adapterkit.attach(make_llama())  # unprepared, loaded for inference (IA3 weighs those only)
    copy_into(reference, eager, names)
    for each in (adapters, eager):
        each.set_active(["p0", "p2"], weights=[0.5, 3.0])
    with adapters.per_sample(rows):
        ours = logits(fast, x)
    with eager.per_sample(rows):
        theirs = logits(eager.model, x)
    assert not close(ours, logits(fast, x))
    assert close(ours, theirs)


def test_disable_merge_and_unmerge_on_a_prepared_compiled_model():
    reference = source(make_llama, {"a": lora_spec(1, ["q_proj", "v_proj"]), "b": lora_spec(2, ["o_proj"])})
    model = make_llama()
    adapters = adapterkit.attach(model)
    copy_into(reference, adapters, ["a", "b"])
    adapters.prepare_compiled(max_rank=8, targets=ALL)
    fast, _ = compiled(model)
    x = ids()
    adapters.set_active("a")
    with_a = logits(fast, x)
    assert close(with_a, expected(reference, x, ["a"]))
    with adapters.disabled():
        assert close(logits(fast, x), logits(make_llama(), x))
    adapters.merge()
    assert close(logits(fast, x), with_a)
    adapters.unmerge()
    adapters.set_active("b")
    assert close(logits(fast, x), expected(reference, x, ["b"]))


def test_prepare_refuses_layers_banks_do_not_cover_and_changes_nothing():
    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.add("lora[r=4, target_modules=['q_proj'], use_dora=True]", "dora")
    structure, buffers = layer_types(model), dict(model.named_buffers())
    with pytest.raises(UnsupportedOperationError, match="DoRA"):
        adapters.prepare_compiled(targets=["q_proj", "v_proj"])
    assert layer_types(model) == structure and dict(model.named_buffers()).keys() == buffers.keys()


def test_a_copy_of_a_prepared_model_switches_and_routes_on_its_own():
    import copy

    reference = source(make_llama, {"a": lora_spec(1, ["q_proj", "v_proj"]), "b": lora_spec(2, ["o_proj"])})
    model = make_llama()
    adapters = adapterkit.attach(model)
    copy_into(reference, adapters, ["a", "b"])
    adapters.prepare_compiled(max_rank=8, targets=ALL)
    adapters.set_active("a")
    twin = copy.deepcopy(adapters)
    twin.set_active("b")
    x = ids(batch=2)
    assert close(logits(model, x), expected(reference, x, ["a"]))
    assert close(logits(twin.model, x), expected(reference, x, ["b"]))
    with reference.per_sample(["b", "a"]):
        routed = logits(reference.model, x)
    fast, _ = compiled(twin.model, fullgraph=False)
    with twin.per_sample(["b", "a"]):
        assert close(logits(fast, x), routed)
        assert close(logits(model, x), expected(reference, x, ["a"]))  # the original is not routed
