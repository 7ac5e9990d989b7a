"""LoRA through adapterkit against peft as the oracle: files, tensors, outputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Fingerprint, llama_input, make_llama, make_mlp, mlp_input, run
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import adapterkit

LLAMA_SPEC = 'lora[r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]]'
MLP_SPEC = "lora[r=2, lora_alpha=4, target_modules=['blocks.0.0', 'head']]"
CASES = {
    "llama": (make_llama, llama_input, LLAMA_SPEC),
    "mlp": (make_mlp, mlp_input, MLP_SPEC),
}


def train(model, x, steps=3):
    """A few real optimisation steps on whatever is trainable."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing is trainable"
    opt = torch.optim.AdamW(params, lr=0.05)
    for _ in range(steps):
        out = model(x)
        out = out.logits if hasattr(out, "logits") else out
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def peft_model_from(make, tmp_path, configs, seed=0):
    """A PeftModel with adapters of the given configs, trained so their weights are not trivial."""
    names = list(configs)
    model = get_peft_model(make(), configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("case", CASES)
def test_trained_adapter_loads_in_peft_with_equal_outputs(case, tmp_path):
    make, make_input, spec = CASES[case]
    model, x = make(), make_input()
    adapters = adapterkit.attach(model)
    adapters.add(spec)
    before = run(model, x)
    train(model, x)
    ours = run(model, x)
    assert (ours - before).abs().max() > 1e-4, "training changed nothing"
    adapters.save(tmp_path)

    theirs = PeftModel.from_pretrained(make(), tmp_path).eval()
    assert (run(theirs, x) - ours).abs().max() <= 1e-6
    expected = get_peft_model_state_dict(theirs)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == set(expected)
    for key, value in expected.items():
        assert torch.equal(saved[key], value)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["peft_version"] and config["inference_mode"] is True


@pytest.mark.parametrize("case", CASES)
def test_peft_saved_adapter_loads_with_equal_outputs(case, tmp_path):
    make, make_input, spec = CASES[case]
    x = make_input()
    theirs = peft_model_from(make, tmp_path, {"default": adapterkit.parse_config(spec)})
    theirs.save_pretrained(tmp_path)

    model = make()
    adapters = adapterkit.attach(model)
    assert adapters.load(tmp_path) == "default"
    assert (run(model, x) - run(theirs, x)).abs().max() <= 1e-6
    ours = adapters.state_dict()
    expected = get_peft_model_state_dict(theirs)
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key], value)


def test_several_adapters_files_like_peft(tmp_path):
    configs = {name: LoraConfig(r=r, target_modules=["q_proj", "v_proj"]) for name, r in (("default", 2), ("other", 4))}
    theirs = peft_model_from(make_llama, tmp_path, configs)
    theirs.save_pretrained(tmp_path / "peft")

    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.load(tmp_path / "peft", "default")
    adapters.load(tmp_path / "peft", "other", subfolder="other")
    adapters.save(tmp_path / "ours")
    for folder in ("", "other"):
        ours = load_file(tmp_path / "ours" / folder / "adapter_model.safetensors")
        peft = load_file(tmp_path / "peft" / folder / "adapter_model.safetensors")
        assert ours.keys() == peft.keys()
        assert all(torch.equal(ours[k], peft[k]) for k in ours)


@pytest.fixture
def pair(tmp_path):
    """The same two LoRA adapters in a PeftModel and in a plain model through adapterkit."""
    configs = {
        "one": LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
        "two": LoraConfig(r=4, lora_alpha=16, target_modules=["v_proj", "up_proj"]),
    }
    theirs = peft_model_from(make_llama, tmp_path, configs)
    theirs.save_pretrained(tmp_path, selected_adapters=["one", "two"])
    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.load(tmp_path / "one", "one")
    adapters.load(tmp_path / "two", "two")
    return theirs, model, adapters


def test_active_adapter_after_load_is_the_new_one(pair):
    theirs, model, adapters = pair
    x = llama_input()
    assert adapters.active == ["two"]
    theirs.set_adapter("two")
    assert (run(model, x) - run(theirs, x)).abs().max() <= 1e-6


@pytest.mark.parametrize("active", [["one"], ["two"], ["one", "two"]])
def test_set_active_matches_peft(pair, active):
    theirs, model, adapters = pair
    x = llama_input()
    adapters.set_active(active)
    theirs.base_model.set_adapter(active)
    assert adapters.active == active
    assert (run(model, x) - run(theirs, x)).abs().max() <= 1e-6


def test_no_active_adapter_is_the_base_model(pair):
    _, model, adapters = pair
    x = llama_input()
    adapters.set_active([])
    assert torch.equal(run(model, x), run(make_llama(), x))


def test_disable_and_enable_match_peft(pair):
    theirs, model, adapters = pair
    x = llama_input()
    adapters.set_active(["one", "two"])
    theirs.base_model.set_adapter(["one", "two"])
    with adapters.disabled():
        assert not adapters.enabled
        with theirs.disable_adapter():
            assert (run(model, x) - run(theirs, x)).abs().max() <= 1e-6
        assert torch.equal(run(model, x), run(make_llama(), x))
    assert adapters.enabled
    assert (run(model, x) - run(theirs, x)).abs().max() <= 1e-6


def test_merge_and_unmerge_match_peft(pair):
    theirs, model, adapters = pair
    x = llama_input()
    adapters.set_active(["one", "two"])
    theirs.base_model.set_adapter(["one", "two"])
    unmerged = run(model, x)
    adapters.merge()
    theirs.merge_adapter(["one", "two"])
    assert adapters.merged == ["one", "two"]
    assert (run(model, x) - run(theirs, x)).abs().max() <= 1e-6
    assert (run(model, x) - unmerged).abs().max() <= 1e-5
    base_weight = model.model.layers[0].self_attn.v_proj.base_layer.weight
    assert not torch.equal(base_weight, make_llama().model.layers[0].self_attn.v_proj.weight)
    adapters.unmerge()
    assert adapters.merged == []
    assert torch.allclose(base_weight, make_llama().model.layers[0].self_attn.v_proj.weight, atol=1e-6)
    assert (run(model, x) - unmerged).abs().max() <= 1e-5


def test_delete_matches_peft_and_unwraps_layers(pair):
    theirs, model, adapters = pair
    x = llama_input()
    adapters.set_active(["one", "two"])
    adapters.delete("two")
    theirs.delete_adapter("two")
    theirs.base_model.set_adapter(["one"])
    assert adapters.names == ["one"] and adapters.active == ["one"]
    assert (run(model, x) - run(theirs, x)).abs().max() <= 1e-6
    # up_proj only had "two": it is a plain Linear again.
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    adapters.delete("one")
    assert adapters.names == []
    assert str(model) == str(make_llama())
    assert torch.equal(run(model, x), run(make_llama(), x))


def test_per_sample_rows_match_peft_mixed_batch(pair):
    theirs, model, adapters = pair
    x = torch.cat([llama_input(), llama_input()[:1]])
    rows = ["one", "__base__", "two", "one"]
    with adapters.per_sample(rows):
        ours = run(model, x)
    with torch.no_grad():
        expected = theirs(x, adapter_names=rows).logits
    assert (ours - expected).abs().max() <= 1e-6
    # Row by row it is the single adapter (or the base model).
    for i, name in enumerate(rows):
        adapters.set_active([] if name == "__base__" else [name])
        assert (run(model, x[i : i + 1]) - ours[i : i + 1]).abs().max() <= 1e-5
    # Outside the block the routing is gone.
    adapters.set_active(["two"])
    theirs.set_adapter("two")
    assert (run(model, x) - run(theirs, x)).abs().max() <= 1e-6


@pytest.mark.parametrize(
    "rows",
    [["one", "one", "two", "two"], ["two", "one", "two", "__base__"], ["__base__"] * 4],
    ids=["contiguous", "interleaved", "base-only"],
)
def test_per_sample_with_embedding_and_linear_layers_matches_peft(rows, tmp_path):
    # Linear layers take the grouped forward, the embedding peft's own mixed-batch path.
    configs = {
        "one": LoraConfig(r=2, target_modules=["embed_tokens", "q_proj", "down_proj"]),
        "two": LoraConfig(r=3, lora_alpha=5, target_modules=["embed_tokens", "v_proj"]),
    }
    theirs = peft_model_from(make_llama, tmp_path, configs)
    theirs.save_pretrained(tmp_path, selected_adapters=["one", "two"], save_embedding_layers=False)
    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.load(tmp_path / "one", "one")
    adapters.load(tmp_path / "two", "two")
    x = torch.cat([llama_input(), llama_input()[:1]])
    with adapters.per_sample(rows):
        ours = run(model, x)
    with torch.no_grad():
        expected = theirs(x, adapter_names=rows).logits
    assert (ours - expected).abs().max() <= 1e-6
    if "one" in rows:
        assert (ours - run(make_llama(), x)).abs().max() > 1e-3


def test_peft_checkpoint_with_saved_embedding_weights_loads(tmp_path):
    # peft saves a targeted embedding's base weights too (save_embedding_layers, on by default then).
    theirs = peft_model_from(make_llama, tmp_path, {"one": LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"])})
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        theirs.save_pretrained(tmp_path)
    folder = tmp_path / "one"  # peft saves a non-default adapter in a folder of its name
    saved = load_file(folder / "adapter_model.safetensors")
    base_key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert base_key in saved
    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.load(folder, "one")
    x = llama_input()
    assert (run(model, x) - run(theirs, x)).abs().max() <= 1e-6
    assert not any("base_layer" in key for key in adapters.state_dict("one"))

    # Different base weights (a resized or retrained vocabulary) are refused, and the model is left as it was.
    saved[base_key] = saved[base_key] + 1
    save_file(saved, folder / "adapter_model.safetensors")
    fresh = make_llama()
    before = Fingerprint(fresh, x)
    with pytest.raises(adapterkit.StateDictMismatchError, match=r"embed_tokens\.base_layer\.weight.*never changes base"):
        adapterkit.attach(fresh).load(folder, "one")
    before.assert_same(fresh, x)


def test_per_sample_on_a_plain_model(tmp_path):
    x = mlp_input()[:3]
    configs = {"one": adapterkit.parse_config(MLP_SPEC), "two": adapterkit.parse_config(MLP_SPEC)}
    theirs = peft_model_from(make_mlp, tmp_path, configs)
    theirs.save_pretrained(tmp_path, selected_adapters=["one", "two"])
    model = make_mlp()
    adapters = adapterkit.attach(model)
    adapters.load(tmp_path / "one", "one")
    adapters.load(tmp_path / "two", "two")
    rows = ["two", "one", "__base__"]
    with adapters.per_sample(rows):
        ours = run(model, x)
    with torch.no_grad():
        expected = theirs(x, adapter_names=rows)
    assert (ours - expected).abs().max() <= 1e-6


def test_adapters_get_gradients_and_base_does_not(llama):
    adapters = adapterkit.attach(llama)
    adapters.add(LLAMA_SPEC, "one")
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and ".one." in n for n in trainable)
    theirs = get_peft_model(make_llama(), adapterkit.parse_config(LLAMA_SPEC), adapter_name="one")
    expected = {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}
    assert trainable == expected
