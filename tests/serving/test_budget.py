"""The adapter memory budget: register without loading, load on use, evict the least recently used.

Adapters are real LoRA and IA3 adapters saved by adapterkit into tmp folders; the oracle is a
model with every adapter loaded directly (no budget), and peft's own ``PeftModel`` for reloads.
"""

from __future__ import annotations

import copy
import gc
import json
import pickle
import random
import struct
import sys
import threading
import weakref
from pathlib import Path

import adapterkit
import pytest
import torch
from adapterkit import (
    AdapterExistsError,
    AdapterNameError,
    AdapterStateError,
    ArgumentValueError,
    BudgetError,
    BudgetStats,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigValueError,
    UnknownAdapterError,
    UnknownMethodError,
    UnsafeCheckpointError,
)
from conftest import Fingerprint, llama_input, make_llama, run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LORA = 'lora[r={r}, lora_alpha={alpha}, target_modules=["q_proj", "v_proj"], init_lora_weights=False]'
IA3 = 'ia3[target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]]'
RANKS = [2, 4, 8]
LORAS = [f"l{i}" for i in range(12)]
IA3S = [f"i{i}" for i in range(3)]
NAMES = LORAS + IA3S


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one intra-op thread is fastest (spinning thread pools cost more than the work)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _save(folder: Path, specs: dict[str, str]) -> None:
    """Save adapters ``name -> config`` as adapterkit saves them, each with weights of its own."""
    source = adapterkit.attach(make_llama())
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(100 + i)
        source.add(spec, name)
        with torch.no_grad():  # IA3 starts at 1 (the identity): move every adapter off its initial values
            for tensor in source.state_dict(name).values():
                tensor.add_(torch.randn_like(tensor) * 0.1)
    source.save(folder, list(specs))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapters")
    specs = {name: LORA.format(r=RANKS[i % 3], alpha=2 * RANKS[i % 3] + i) for i, name in enumerate(LORAS)}
    specs |= {name: IA3 for name in IA3S}
    _save(folder, specs)
    return folder


@pytest.fixture(scope="module")
def reference(saved: Path) -> adapterkit.Adapters:
    """Every adapter loaded directly: what the budgeted model must compute."""
    adapters = adapterkit.attach(make_llama())
    for name in NAMES:
        adapters.load(saved / name, name, activate=False)
    return adapters


def expected(
    reference: adapterkit.Adapters, active: list[str] | None = None, rows: list[str] | None = None
) -> torch.Tensor:
    reference.set_active(active or [])
    x = llama_input() if rows is None else _rows_input(len(rows))
    if rows is None:
        return run(reference.model, x)
    with reference.per_sample(rows):
        return run(reference.model, x)


def _rows_input(n: int) -> torch.Tensor:
    return torch.randint(0, 64, (n, 7), generator=torch.Generator().manual_seed(n))


def outputs(adapters: adapterkit.Adapters, rows: list[str] | None = None) -> torch.Tensor:
    if rows is None:
        return run(adapters.model, llama_input())
    with adapters.per_sample(rows):
        return run(adapters.model, _rows_input(len(rows)))


def open_block(adapters: adapterkit.Adapters, rows: list[str]) -> None:
    with adapters.per_sample(rows):
        pass


def budgeted(saved: Path, names: list[str] = NAMES, **limits: int) -> adapterkit.Adapters:
    adapters = adapterkit.attach(make_llama())
    for name in names:
        adapters.register(saved / name, name)
    if limits:
        adapters.limit(**limits)
    return adapters


def file_bytes(saved: Path, name: str) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(saved / name / "adapter_model.safetensors").values())


def loaded_bytes(adapters: adapterkit.Adapters, names: list[str]) -> int:
    return sum(t.numel() * t.element_size() for n in names for t in adapters.state_dict(n).values())


# -- registering -----------------------------------------------------------------
def test_register_records_without_loading(saved: Path) -> None:
    model = make_llama()
    before = Fingerprint(model, llama_input())
    adapters = adapterkit.attach(model)
    assert adapters.register(saved / "l0", "a") == "a"
    adapters.register(str(saved / "i0"), "b")
    before.assert_same(model, llama_input())  # nothing injected
    assert adapters.registered == ["a", "b"]
    assert adapters.resident == [] and adapters.names == [] and "a" not in adapters and len(adapters) == 0
    assert adapters.stats() == BudgetStats(
        hits=0,
        misses=0,
        evictions=0,
        loads=0,
        resident=0,
        bytes_resident=0,
        registered=2,
        max_adapters=None,
        max_bytes=None,
    )


def test_register_reads_only_the_header(saved: Path, tmp_path: Path, reference: adapterkit.Adapters) -> None:
    # The weights are NaN: a load refuses them, register (which never reads them) does not notice.
    folder = tmp_path / "nan"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((saved / "l0" / "adapter_config.json").read_bytes())
    tensors = load_file(saved / "l0" / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    adapters = budgeted(saved, ["l1"])
    adapters.register(folder, "nan")
    with pytest.raises(CheckpointError, match="NaN"):
        adapters.set_active("nan")
    assert adapters.resident == [] and adapters.names == []
    adapters.set_active("l1")  # the failed load left the model as it was
    assert torch.equal(outputs(adapters), expected(reference, ["l1"]))


def test_a_registered_name_is_taken(saved: Path) -> None:
    adapters = budgeted(saved, ["l0"])
    adapters.load(saved / "l1", "direct")
    for call in (
        lambda: adapters.register(saved / "l2", "l0"),
        lambda: adapters.register(saved / "l2", "direct"),
        lambda: adapters.load(saved / "l2", "l0"),
        lambda: adapters.add(LORA.format(r=2, alpha=2), "l0"),
    ):
        with pytest.raises(AdapterExistsError, match="'(l0|direct)'"):
            call()
    with pytest.raises(AdapterStateError, match="registered but not loaded"):
        adapters.save(saved / "never", "l0")
    adapters.delete("l0")  # forgets it: the name is free again
    assert adapters.registered == [] and adapters.names == ["direct"]
    adapters.load(saved / "l2", "l0")
    assert adapters.names == ["direct", "l0"]


def test_deleting_a_resident_registered_adapter_forgets_it(saved: Path) -> None:
    adapters = budgeted(saved, ["l0", "l1"])
    adapters.set_active("l0")
    adapters.delete("l0")
    assert adapters.registered == ["l1"] and adapters.resident == [] and adapters.names == []
    with pytest.raises(adapterkit.NoAdaptersError):  # nothing is loaded (l1 is only registered)
        adapters.set_active("l0")


def _copy_adapter(saved: Path, folder: Path, name: str = "l0") -> Path:
    folder.mkdir()
    for file in (saved / name).iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _no_metadata(folder: Path) -> None:
    """Drop the method adapterkit records in the weights file: the config's peft_type decides alone."""
    path = folder / "adapter_model.safetensors"
    save_file(load_file(path), path)


def _header(folder: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)


BAD_SOURCES = {
    "missing folder": (lambda f: f / "nowhere", CheckpointNotFoundError),
    "no config": (lambda f: (f.mkdir(), f)[1], CheckpointNotFoundError),
    "bad rank": (lambda f: (_edit_config(f, r=0), f)[1], ConfigValueError),
    "unknown key type": (lambda f: (_edit_config(f, lora_dropout="lots"), f)[1], ConfigValueError),
    "unknown method": (lambda f: (_edit_config(f, peft_type="NOPE"), _no_metadata(f), f)[2], UnknownMethodError),
    "not json": (lambda f: ((f / "adapter_config.json").write_text("{"), f)[1], CheckpointError),
    "truncated header": (lambda f: ((f / "adapter_model.safetensors").write_bytes(b"\x10\x00"), f)[1], CheckpointError),
    "header past the end": (
        lambda f: ((f / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}"), f)[1],
        CheckpointError,
    ),
    "shape disagrees": (
        lambda f: (
            _header(f, {"x.lora_A.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}, b"0" * 8),
            f,
        )[1],
        CheckpointError,
    ),
    "no tensors": (lambda f: (_header(f, {"__metadata__": {"format": "pt"}}), f)[1], CheckpointError),
    "pickle only": (
        lambda f: ((f / "adapter_model.safetensors").rename(f / "adapter_model.bin"), f)[1],
        UnsafeCheckpointError,
    ),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_register_of_a_bad_source_is_a_typed_error_and_records_nothing(saved: Path, tmp_path: Path, case: str) -> None:
    make, error = BAD_SOURCES[case]
    folder = make(
        _copy_adapter(saved, tmp_path / "copy") if case not in ("missing folder", "no config") else tmp_path / "bad"
    )
    adapters = budgeted(saved, ["l1"])
    model = adapters.model
    before = Fingerprint(model, llama_input())
    with pytest.raises(error):
        adapters.register(folder, "bad")
    assert adapters.registered == ["l1"] and adapters.stats().registered == 1
    before.assert_same(model, llama_input())
    adapters.register(saved / "l0", "bad")  # the name was not taken


def test_register_refuses_bad_arguments(saved: Path) -> None:
    adapters = budgeted(saved, [])
    with pytest.raises(ArgumentValueError, match="dict"):
        adapters.register({"x": torch.zeros(1)}, "a")  # type: ignore[arg-type]
    with pytest.raises(AdapterNameError):
        adapters.register(saved / "l0", "a.b")
    with pytest.raises(TypeError):
        adapters.register(saved / "l0", "a", is_trainable=True)  # type: ignore[call-arg]  # reloads come from files
    assert adapters.registered == []


# -- loading on use, LRU, pins ---------------------------------------------------------
def test_set_active_and_per_sample_load_what_they_name(saved: Path, reference: adapterkit.Adapters) -> None:
    adapters = budgeted(saved)
    adapters.set_active("l3")
    assert adapters.resident == ["l3"] and adapters.names == ["l3"] and adapters.active == ["l3"]
    assert not adapters.trainable("l3")
    assert torch.equal(outputs(adapters), expected(reference, ["l3"]))
    rows = ["l5", "__base__", "i1", "l3", "l5"]
    adapters.set_active([])
    assert torch.equal(outputs(adapters, rows), expected(reference, rows=rows))
    assert adapters.resident == ["l5", "i1", "l3"]  # l3 was used again last
    adapters.set_active(["l5", "i2"], weights=None)
    assert torch.equal(outputs(adapters), expected(reference, ["l5", "i2"]))


def test_a_bad_name_beside_registered_ones_loads_nothing(saved: Path) -> None:
    adapters = budgeted(saved, ["l0", "l1"])
    adapters.load(saved / "l2", "direct", activate=False)
    with pytest.raises(UnknownAdapterError, match="'nobody'"):
        adapters.set_active(["l0", "nobody"])
    with pytest.raises(AdapterNameError, match="list"):
        open_block(adapters, "l0")  # type: ignore[arg-type]
    with pytest.raises(UnknownAdapterError, match="'nobody'"):
        open_block(adapters, ["l1", "nobody"])
    assert adapters.resident == [] and adapters.stats().misses == 0


def test_the_least_recently_used_is_evicted(saved: Path) -> None:
    adapters = budgeted(saved, max_adapters=3)
    for name in ["l0", "l1", "l2"]:
        adapters.set_active(name)
    assert adapters.resident == ["l0", "l1", "l2"]
    adapters.set_active("l0")  # a hit: l0 becomes the most recent
    assert adapters.resident == ["l1", "l2", "l0"]
    adapters.set_active("l3")
    assert adapters.resident == ["l2", "l0", "l3"]
    with adapters.per_sample(["l1", "l2"]):  # l0 is the least recent that nothing needs
        assert adapters.resident == ["l3", "l1", "l2"]  # l3 stays: it is active
    assert adapters.stats().evictions == 2


def test_pinned_adapters_stay(saved: Path, reference: adapterkit.Adapters) -> None:
    adapters = budgeted(saved, max_adapters=2)
    adapters.pin("l0")  # not loaded: pinning does not load it
    assert adapters.resident == []
    adapters.set_active("l0")
    adapters.set_active("l1")
    adapters.set_active("l2")  # l0 is the least recent, but pinned
    assert adapters.resident == ["l0", "l2"]
    assert torch.equal(outputs(adapters), expected(reference, ["l2"]))
    adapters.unpin("l0")
    adapters.set_active("l3")
    assert adapters.resident == ["l2", "l3"]
    adapters.load(saved / "l4", "direct", activate=False)
    adapters.pin("direct")  # outside the budget: never evicted anyway
    with pytest.raises(UnknownAdapterError):
        adapters.pin("nobody")


def test_active_adapters_and_open_blocks_are_never_evicted(saved: Path) -> None:
    adapters = budgeted(saved, max_adapters=2)
    adapters.set_active("l0")
    with adapters.per_sample(["l1"]):
        pass
    with adapters.per_sample(["l2"]):  # l0 is the least recent, but active
        assert adapters.resident == ["l0", "l2"]
    with adapters.per_sample(["l2"]):
        adapters.set_active("l3")  # l2 is named by the open block; l0 goes, having been deactivated
        assert adapters.resident == ["l2", "l3"]
    before = adapters.stats(), adapters.resident, adapters.names
    with pytest.raises(BudgetError, match=r"max_adapters=2.*\['l4', 'l5'\].*\['l3'\]"):
        open_block(adapters, ["l4", "l5"])
    assert (adapters.stats(), adapters.resident, adapters.names) == before


def test_a_failed_set_active_leaves_the_budget_holding(saved: Path, reference: adapterkit.Adapters) -> None:
    adapters = budgeted(saved, max_adapters=1)
    adapters.set_active("l0")
    with pytest.raises(ConfigValueError, match="weight"):
        adapters.set_active("l1", weights=[float("nan")])  # l1 is loaded before the weights are checked
    assert adapters.active == ["l0"] and adapters.resident == ["l0"]
    assert torch.equal(outputs(adapters), expected(reference, ["l0"]))


def test_a_block_in_another_thread_keeps_its_adapters(saved: Path) -> None:
    adapters = budgeted(saved, max_adapters=2)
    opened, release = threading.Event(), threading.Event()

    def serve() -> None:
        with adapters.per_sample(["l0", "l1"]):
            opened.set()
            release.wait(10)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        assert opened.wait(10)
        with pytest.raises(BudgetError, match="l2"):
            adapters.set_active("l2")
        assert adapters.resident == ["l0", "l1"]
    finally:
        release.set()
        thread.join()
    adapters.set_active("l2")
    assert adapters.resident == ["l1", "l2"]


def test_limit_evicts_at_once_and_checks_its_arguments(saved: Path) -> None:
    adapters = budgeted(saved)
    for name in ["l0", "l1", "l2", "l3"]:
        adapters.set_active(name)
    adapters.limit(max_adapters=2)
    assert adapters.resident == ["l2", "l3"]
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ArgumentValueError, match="max_adapters"):
            adapters.limit(max_adapters=bad)  # type: ignore[arg-type]
        with pytest.raises(ArgumentValueError, match="max_bytes"):
            adapters.limit(max_bytes=bad)  # type: ignore[arg-type]
    adapters.pin("l2")
    with pytest.raises(BudgetError, match=r"\['l2', 'l3'\]"):
        adapters.limit(max_adapters=1)  # l2 is pinned, l3 active
    assert adapters.stats().max_adapters == 2 and adapters.resident == ["l2", "l3"]
    adapters.limit()  # no limits
    assert adapters.stats().max_adapters is None


def test_stats_count_exactly(saved: Path) -> None:
    adapters = budgeted(saved, max_adapters=2)
    adapters.set_active("l0")  # miss
    adapters.set_active("l1")  # miss
    adapters.set_active("l0")  # hit
    adapters.set_active("l2")  # miss, evicts l1
    adapters.set_active("l2")  # hit
    with adapters.per_sample(["l2", "l2", "l0", "__base__"]):  # two hits: once per adapter
        pass
    adapters.set_active([])
    adapters.set_active("l1")  # miss, evicts l2
    stats = adapters.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.loads) == (4, 4, 2, 4)
    assert (stats.resident, stats.registered) == (2, len(NAMES))
    assert adapters.resident == ["l0", "l1"]
    assert (
        stats.bytes_resident
        == file_bytes(saved, "l0") + file_bytes(saved, "l1")
        == loaded_bytes(adapters, ["l0", "l1"])
    )


def test_a_byte_budget_holds_after_every_call(saved: Path) -> None:
    sizes = {name: file_bytes(saved, name) for name in NAMES}
    max_bytes = sizes["l2"] + sizes["l1"] + 1  # an r=8 and an r=4 adapter fit, not two r=8 ones
    adapters = budgeted(saved, max_bytes=max_bytes)
    adapters.set_active("l2")
    adapters.set_active("l1")
    assert adapters.resident == ["l2", "l1"]
    adapters.set_active("l5")  # r=8: evicts l2 (least recent); l1 + l5 fit
    assert adapters.resident == ["l1", "l5"]
    with pytest.raises(BudgetError, match=f"max_bytes={max_bytes}"):
        open_block(adapters, ["l2", "l8"])  # two r=8 adapters (and l5 stays active)
    assert adapters.stats().bytes_resident == loaded_bytes(adapters, adapters.resident) <= max_bytes


def test_adapters_that_load_larger_than_their_files_are_counted_as_loaded(saved: Path, tmp_path: Path) -> None:
    folder = _copy_adapter(saved, tmp_path / "half", "l1")
    path = folder / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    save_file({k: v.half() for k, v in load_file(path).items()}, path, metadata=metadata)  # float32 once loaded
    adapters = budgeted(saved, [])
    adapters.register(folder, "a")
    adapters.register(folder, "b")
    half = file_bytes(tmp_path, "half")
    adapters.limit(max_bytes=2 * half)  # by the files, both fit
    with pytest.raises(BudgetError, match=r"\['a', 'b'\]: loaded, they take"):
        open_block(adapters, ["a", "b"])
    assert adapters.resident == [] and adapters.names == []  # taken back out
    adapters.set_active("a")
    assert adapters.stats().bytes_resident == loaded_bytes(adapters, ["a"]) == 2 * half
    adapters.set_active("b")  # evicts a, now known to be twice its file
    assert adapters.resident == ["b"]


def test_a_zipf_stream_stays_within_the_budget_and_computes_what_all_loaded_would(
    saved: Path, reference: adapterkit.Adapters
) -> None:
    max_adapters = 5
    sizes = {name: file_bytes(saved, name) for name in NAMES}
    max_bytes = sum(sorted(sizes.values())[-4:])  # binds sometimes, as the count does
    adapters = budgeted(saved, max_adapters=max_adapters, max_bytes=max_bytes)
    pick = random.Random(13)
    order = NAMES[:]
    pick.shuffle(order)
    weights = [1 / (k + 1) ** 1.1 for k in range(len(order))]
    refused = 0
    for step in range(60):
        switch = step % 5 == 0  # every fifth request switches the active adapter, the others are mixed batches
        rows = pick.choices(order, weights) if switch else pick.choices(order + ["__base__"], weights + [0.2], k=4)
        needed = set(rows) - {"__base__"} | (set() if switch else set(adapters.active))
        if len(needed) <= max_adapters and sum(sizes[n] for n in needed) <= max_bytes:
            if switch:
                adapters.set_active(rows)
                assert torch.equal(outputs(adapters), expected(reference, rows)), step
            else:
                assert torch.equal(outputs(adapters, rows), expected(reference, adapters.active, rows)), step
        else:
            refused += 1
            before = adapters.resident
            with pytest.raises(BudgetError):
                adapters.set_active(rows) if switch else outputs(adapters, rows)
            assert adapters.resident == before
        stats = adapters.stats()
        assert stats.resident == len(adapters.resident) <= max_adapters
        assert stats.bytes_resident == loaded_bytes(adapters, adapters.resident) <= max_bytes
    stats = adapters.stats()
    assert stats.evictions > 5 and stats.hits > stats.misses > 5  # the stream exercised the budget
    assert refused < 30


# -- eviction frees memory and reloads bit-identical ----------------------------------------
def test_evicted_adapters_are_freed(saved: Path) -> None:
    adapters = budgeted(saved, max_adapters=1)
    adapters.set_active("l0")
    params = [weakref.ref(p) for n, p in adapters.model.named_parameters() if ".l0." in n]
    assert len(params) == 8  # lora_A and lora_B on q_proj and v_proj of both layers
    adapters.set_active("l1")
    gc.collect()
    assert [p() for p in params] == [None] * len(params)
    assert not any(".l0." in n for n, _ in adapters.model.named_parameters())


def test_an_evicted_adapter_reloads_bit_identical_to_the_file_and_to_peft(saved: Path) -> None:
    from peft import PeftModel

    file = {
        k.removeprefix("base_model.model."): v for k, v in load_file(saved / "l4" / "adapter_model.safetensors").items()
    }
    peft_model = PeftModel.from_pretrained(make_llama(), saved / "l4").eval()
    with torch.no_grad():
        peft_out = peft_model(llama_input()).logits
    adapters = budgeted(saved, max_adapters=1)
    for _ in range(2):
        adapters.set_active("l4")
        state = adapters.state_dict("l4", prefix="")
        assert state.keys() == file.keys()
        assert all(torch.equal(state[k], file[k]) and state[k].dtype == file[k].dtype for k in file)
        assert torch.equal(outputs(adapters), peft_out)
        adapters.set_active("l5")  # evicts l4
        assert "l4" not in adapters
    assert adapters.stats().loads == 4


# -- swap, copies, the Hub, other methods -------------------------------------------------
def test_swap_loads_a_registered_adapter_and_its_reloads_follow_the_swap(
    saved: Path, reference: adapterkit.Adapters
) -> None:
    adapters = budgeted(saved, ["l0", "l1", "l2"], max_adapters=2)
    with pytest.raises(CheckpointNotFoundError):
        adapters.swap(saved / "nowhere", "l1")
    assert adapters.resident == [] and adapters.stats().misses == 0  # refused before loading anything
    adapters.set_active("l0")
    adapters.swap(saved / "l4", "l1")  # not loaded: loaded, then swapped (same rank: in place)
    assert adapters.resident == ["l0", "l1"]
    adapters.set_active("l1")
    assert torch.equal(outputs(adapters), expected(reference, ["l4"]))
    adapters.set_active("l2")  # evicts l0
    adapters.set_active("l0")  # evicts l1
    assert adapters.resident == ["l2", "l0"]
    adapters.set_active("l1")  # reloads from l4's folder, where the swap took it
    assert torch.equal(outputs(adapters), expected(reference, ["l4"]))
    with pytest.raises(AdapterStateError, match="registered"):
        adapters.swap(adapters.state_dict("l1"), "l1")
    assert torch.equal(outputs(adapters), expected(reference, ["l4"]))


def test_copies_and_pickles_keep_the_budget(saved: Path, reference: adapterkit.Adapters) -> None:
    adapters = budgeted(saved, ["l0", "l1", "l2"], max_adapters=2)
    adapters.set_active("l0")
    adapters.pin("l0")
    for model in (copy.deepcopy(adapters.model), pickle.loads(pickle.dumps(adapters.model))):
        other = adapterkit.attach(model)
        assert other.registered == ["l0", "l1", "l2"] and other.resident == ["l0"]
        other.set_active("l1")
        other.set_active("l2")
        assert other.resident == ["l0", "l2"]  # l0 pinned in the copy too
        assert torch.equal(run(model, llama_input()), expected(reference, ["l2"]))
    assert adapters.resident == ["l0"] and adapters.stats().misses == 1


def test_a_hub_source_reloads_from_the_cache_without_the_network(
    saved: Path, reference: adapterkit.Adapters, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lora = str(Path(__file__).resolve().parents[1] / "lora")
    if lora not in sys.path:
        sys.path.insert(0, lora)
    from hub_server import serving_as_the_hub

    token = "hf_TestTokenThatGrantsAccess0123456789"
    with serving_as_the_hub(monkeypatch, tmp_path) as hub:
        hub.create_repo("user/adapters", private=True, token=token)
        hub.upload_folder("user/adapters", saved)  # every adapter, each in its own folder
        adapters = budgeted(saved, ["l0"], max_adapters=1)
        adapters.register("user/adapters", "hub", subfolder="l6", token=token, cache_dir=tmp_path / "cache")
        hub.clear_requests()
        for _ in range(2):
            adapters.set_active("hub")
            assert torch.equal(outputs(adapters), expected(reference, ["l6"]))
            adapters.set_active("l0")  # evicts hub
        assert hub.requests == []
    assert token.encode() not in pickle.dumps(adapters.model)  # the token is not kept


def test_a_method_outside_peft(tmp_path: Path) -> None:
    pytest.importorskip("adapterkit_bottleneck")
    spec = 'bottleneck[bottleneck_dim=4, target_modules=["o_proj"], init="random"]'
    _save(tmp_path, {f"b{i}": spec for i in range(3)})
    plain = adapterkit.attach(make_llama())
    adapters = adapterkit.attach(make_llama())
    for i in range(3):
        plain.load(tmp_path / f"b{i}", f"b{i}", activate=False)
        adapters.register(tmp_path / f"b{i}", f"b{i}")
    adapters.limit(max_adapters=1)
    for name in ["b0", "b1", "b2", "b0"]:
        adapters.set_active(name)
        plain.set_active(name)
        assert torch.equal(outputs(adapters), run(plain.model, llama_input()))
        assert adapters.resident == [name]
    adapters.set_active([])
    plain.set_active([])
    with adapters.per_sample(["b1"]), plain.per_sample(["b1"]):
        x = _rows_input(1)
        assert torch.equal(run(adapters.model, x), run(plain.model, x))
    assert adapters.stats().evictions == 4


def test_a_native_method_of_the_core_alone(tmp_path: Path) -> None:
    """The toy scale method (tests/toy_plugin.py): no peft anywhere in its path."""
    from conftest import make_mlp, mlp_input
    from toy_plugin import ScalePlugin

    def attach() -> adapterkit.Adapters:
        pm = adapterkit.make_plugin_manager()
        pm.register(ScalePlugin(), name="toy-scale")
        return adapterkit.attach(make_mlp(), adapterkit.MethodRegistry(pm))

    source, plain, adapters = attach(), attach(), attach()
    for i in range(3):
        source.add({"method": "scale", "target_modules": ["head"], "init": 1.5 + i}, f"s{i}")
    source.save(tmp_path)
    for i in range(3):
        plain.load(tmp_path / f"s{i}", f"s{i}", activate=False)
        adapters.register(tmp_path / f"s{i}", f"s{i}")
    adapters.limit(max_bytes=4 * 4)  # one scale vector: the head's 4 outputs in float32
    for name in ["s0", "s1", "s2", "s1", "s0"]:
        adapters.set_active(name)
        plain.set_active(name)
        assert torch.equal(run(adapters.model, mlp_input()), run(plain.model, mlp_input()))
        assert adapters.resident == [name]
    assert (adapters.stats().misses, adapters.stats().evictions) == (5, 4)


def test_threads_serving_their_own_adapters_stay_within_the_budget(saved: Path, reference: adapterkit.Adapters) -> None:
    groups = [["l0", "l1", "l2", "l3"], ["l4", "l5", "l6", "i0"]]
    plans = [[random.Random(t * 10 + i).sample(group, 2) for i in range(12)] for t, group in enumerate(groups)]
    wanted = {tuple(rows): expected(reference, rows=rows) for plan in plans for rows in plan}
    adapters = budgeted(saved, max_adapters=4)
    adapters.load(saved / "l7", "keeper", activate=False)  # keeps the layers wrapped while adapters come and go
    adapters.load(saved / "i2", "keeper_ia3", activate=False)
    failures: list[str] = []

    def serve(plan: list[list[str]]) -> None:
        try:
            for rows in plan:
                if not torch.equal(outputs(adapters, rows), wanted[tuple(rows)]):
                    failures.append(f"wrong output for {rows}")
                if len(adapters.resident) > 4:
                    failures.append(f"over budget: {adapters.resident}")
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(repr(exc))

    threads = [threading.Thread(target=serve, args=(plan,)) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
