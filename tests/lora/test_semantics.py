"""The model-facing API's rules: names, activity, trainability, errors on misuse, the mixin."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import MLP, Fingerprint, llama_input, make_llama, make_mlp, mlp_input, run
from torch import nn

import adapterkit
from adapterkit import (
    AdapterMixin,
    AdapterNameError,
    AdapterStateError,
    NoAdaptersError,
    PerSampleError,
    UnknownAdapterError,
)

SPEC = "lora[r=2, target_modules=['q_proj', 'v_proj'], init_lora_weights=False]"


def test_attach_returns_the_same_object_and_stays_out_of_state_dict(llama):
    adapters = adapterkit.attach(llama)
    assert adapterkit.attach(llama) is adapters
    assert adapterkit.attach(make_llama()) is not adapters
    adapters.add(SPEC)
    assert not any("adapterkit" in key for key in llama.state_dict())


def test_attach_refuses_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        adapterkit.attach(object())


@pytest.mark.parametrize("name", ["", "  ", "a.b", "a/b", "..", "__base__", " x", 3])
def test_bad_names_are_refused(llama, name):
    x = llama_input()
    before = Fingerprint(llama, x)
    with pytest.raises(AdapterNameError):
        adapterkit.attach(llama).add(SPEC, name)
    before.assert_same(llama, x)


def test_operations_without_adapters_are_clear_errors(llama, tmp_path):
    adapters = adapterkit.attach(llama)
    for call in (
        lambda: adapters.set_active("x"),
        adapters.disable,
        adapters.enable,
        adapters.merge,
        adapters.unmerge,
        lambda: adapters.delete("x"),
        adapters.state_dict,
        lambda: adapters.save(tmp_path),
        lambda: adapters.config("x"),
        lambda: adapters.per_sample(["x"]).__enter__(),
    ):
        with pytest.raises(NoAdaptersError, match="no adapters; add\\(\\) or load\\(\\) one first"):
            call()


def test_unknown_adapter_is_a_key_error_listing_names(llama):
    adapters = adapterkit.attach(llama)
    adapters.add(SPEC, "one")
    with pytest.raises(UnknownAdapterError, match="'two'.*attached adapters: one") as info:
        adapters.set_active("two")
    assert isinstance(info.value, KeyError)


def test_add_makes_the_new_adapter_the_only_active_and_trainable(llama):
    adapters = adapterkit.attach(llama)
    adapters.add(SPEC, "one")
    adapters.add(SPEC, "two")
    assert adapters.active == ["two"]
    grads = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert grads and all(".two." in n for n in grads)
    adapters.set_active(["one", "two"])
    grads = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert any(".one." in n for n in grads) and any(".two." in n for n in grads)
    with adapters.disabled():
        assert not any(p.requires_grad for p in llama.parameters())
    assert {n for n, p in llama.named_parameters() if p.requires_grad} == grads


def test_loaded_adapters_are_frozen_unless_trainable(llama, tmp_path):
    source = make_llama()
    adapterkit.attach(source).add(SPEC)
    adapterkit.attach(source).save(tmp_path)
    adapters = adapterkit.attach(llama)
    adapters.load(tmp_path, "frozen")
    assert adapters.active == ["frozen"]
    assert not any(p.requires_grad for p in llama.parameters())
    adapters.load(tmp_path, "trained", is_trainable=True)
    grads = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert grads and all(".trained." in n for n in grads)


def test_state_dict_needs_a_name_when_ambiguous(llama):
    adapters = adapterkit.attach(llama)
    adapters.add(SPEC, "one")
    adapters.add(SPEC, "two")
    adapters.set_active(["one", "two"])
    with pytest.raises(AdapterStateError, match="name an adapter"):
        adapters.state_dict()
    assert adapters.state_dict("one").keys() == adapters.state_dict("two").keys()
    relative = adapters.state_dict("one", prefix="")
    assert all(not k.startswith("base_model.") for k in relative)


def test_merge_rules(llama):
    adapters = adapterkit.attach(llama)
    adapters.add(SPEC, "one")
    with pytest.raises(AdapterStateError, match="nothing to unmerge"):
        adapters.unmerge()
    adapters.merge()
    with pytest.raises(AdapterStateError, match="already merged"):
        adapters.merge()
    with pytest.raises(AdapterStateError, match="unmerge\\(\\) before deleting"):
        adapters.delete("one")
    with pytest.raises(AdapterStateError, match="unmerge\\(\\) first"):
        adapters.set_active([])
    with pytest.raises(AdapterStateError, match="unmerge\\(\\) first"):
        adapters.add(SPEC, "two")
    adapters.unmerge()
    adapters.delete("one")


def test_disable_unmerges_first(llama):
    x = llama_input()
    adapters = adapterkit.attach(llama)
    adapters.add(SPEC)
    with_adapter = run(llama, x)
    adapters.merge()
    adapters.disable()
    assert adapters.merged == []
    assert (run(llama, x) - run(make_llama(), x)).abs().max() <= 1e-5
    adapters.enable()
    assert (run(llama, x) - with_adapter).abs().max() <= 1e-6


def test_per_sample_misuse(llama):
    x = llama_input()
    adapters = adapterkit.attach(llama)
    adapters.add(SPEC, "one")
    with pytest.raises(UnknownAdapterError):
        adapters.per_sample(["one", "nope", "one"]).__enter__()
    with pytest.raises(AdapterNameError):
        adapters.per_sample("one").__enter__()
    with pytest.raises(PerSampleError, match="2 row names but the batch has 3 rows"):
        with adapters.per_sample(["one", "one"]):
            run(llama, x)
    llama.train()
    with pytest.raises(AdapterStateError, match="model.eval"):
        adapters.per_sample(["one"] * 3).__enter__()
    llama.eval()
    # After all that, the plain forward is untouched.
    assert torch.equal(run(llama, x), run(llama, x))
    with adapters.per_sample(["one", "__base__", "one"]):
        mixed = run(llama, x)
    assert torch.equal(mixed[0], run(llama, x)[0])


def test_deepcopy_and_pickle_keep_adapters(llama):
    x = llama_input()
    adapters = adapterkit.attach(llama)
    adapters.add(SPEC, "one")
    clone = copy.deepcopy(llama)
    cloned = adapterkit.attach(clone)
    assert cloned is not adapters and cloned.model is clone and cloned.names == ["one"]
    cloned.delete("one")
    assert adapters.names == ["one"]
    restored = pickle.loads(pickle.dumps(llama))
    assert adapterkit.attach(restored).names == ["one"]
    assert torch.equal(run(restored, x), run(llama, x))


class MixinMLP(AdapterMixin, MLP):
    pass


def test_mixin_offers_the_transformers_names(tmp_path):
    x = mlp_input()
    torch.manual_seed(0)
    model = MixinMLP().eval()
    spec = "lora[r=2, target_modules=['head'], init_lora_weights=False]"
    model.add_adapter(spec)
    model.add_adapter(spec, adapter_name="other")
    assert model.active_adapters() == ["other"]
    with pytest.warns(FutureWarning):
        assert model.active_adapter() == "other"
    model.set_adapter("default")
    state = model.get_adapter_state_dict()
    assert set(state) == {"head.lora_A.weight", "head.lora_B.weight"}
    model.adapterkit.save(tmp_path)
    default_out = run(model, x)
    model.disable_adapters()
    assert torch.equal(run(model, x), run(make_mlp(), x))
    model.enable_adapters()
    model.delete_adapter(["default", "other"])
    assert model.adapterkit.names == []
    model.load_adapter(str(tmp_path), adapter_name="again")
    assert torch.equal(run(model, x), default_out)
    model.load_adapter(adapter_name="from_state", peft_config=spec, adapter_state_dict=state)
    assert torch.equal(run(model, x), default_out)
    assert isinstance(model, nn.Module)


def test_loading_creates_adapter_weights_on_meta_then_assigns_file_tensors(llama, tmp_path):
    source = make_llama()
    adapterkit.attach(source).add(SPEC)
    adapterkit.attach(source).save(tmp_path)
    registry = adapterkit.default_registry()
    method = registry.get("lora")
    # The injection load() uses: no initialisation, every adapter tensor on the meta device.
    registry.call(method, "adapterkit_inject", model=llama, name="probe", config=adapterkit.parse_config(SPEC), empty=True)
    probe = [p for n, p in llama.named_parameters() if ".probe." in n]
    assert probe and all(p.is_meta for p in probe)
    registry.call(method, "adapterkit_delete", model=llama, name="probe")
    assert str(llama) == str(make_llama())
    # load() assigns the file's tensors: nothing left on meta, values equal to the source's.
    adapters = adapterkit.attach(llama)
    adapters.load(tmp_path)
    assert not any(p.is_meta for p in llama.parameters())
    expected = adapterkit.attach(source).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in adapters.state_dict().items())


def test_save_refuses_to_overwrite_unless_asked(llama, tmp_path):
    adapters = adapterkit.attach(llama)
    adapters.add(SPEC, "default")
    adapters.add(SPEC, "other")
    adapters.save(tmp_path)
    first = (tmp_path / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        for name, param in llama.named_parameters():
            if ".default." in name:
                param.add_(1.0)
    with pytest.raises(adapterkit.CheckpointExistsError, match="overwrite=True") as info:
        adapters.save(tmp_path)
    assert isinstance(info.value, FileExistsError)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == first
    adapters.save(tmp_path, overwrite=True)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    fresh = make_llama()
    adapterkit.attach(fresh).load(tmp_path)
    adapters.set_active("default")
    assert torch.equal(run(fresh, llama_input()), run(llama, llama_input()))


def test_requires_grad_follows_the_rule_through_any_sequence(llama, tmp_path):
    """requires_grad == trainable and active and enabled, after every operation (set_active only touches changes)."""
    adapters = adapterkit.attach(llama)
    adapters.add(SPEC, "t1")
    adapters.save(tmp_path)
    adapters.add(SPEC, "t2")
    adapters.load(tmp_path / "t1", "f1")
    trainable = {"t1", "t2"}

    def check():
        for name, param in llama.named_parameters():
            owner = next((n for n in adapters.names if f".{n}." in name), None)
            expected = owner is not None and owner in trainable and owner in adapters.active and adapters.enabled
            assert param.requires_grad == expected, (name, adapters.active, adapters.enabled)

    for step in (["t1"], ["t1", "f1"], [], ["t2", "t1"], ["f1"], ["t1", "t2", "f1"]):
        adapters.set_active(step)
        check()
    adapters.disable()
    check()
    adapters.set_active(["t2"])
    check()
    adapters.enable()
    check()
    adapters.delete("t2")
    trainable.discard("t2")
    check()
    adapters.set_active(["t1", "f1"])
    check()
