"""LoRA, IA3 and AdaLoRA adapters on one model, on the same layers."""

from __future__ import annotations

import pytest
import torch
from conftest import llama_input, make_llama, make_mlp, mlp_input, run
from peft import PeftModel
from safetensors.torch import load_file

import adapterkit

TARGETS = '["q_proj", "v_proj", "down_proj"]'
SPECS = {
    "lo": f"lora[r=2, target_modules={TARGETS}, init_lora_weights=False]",
    "ia": f"ia3[target_modules={TARGETS}, feedforward_modules=['down_proj'], init_ia3_weights=False]",
    "ada": f"adalora[init_r=4, target_r=2, total_step=10, target_modules={TARGETS}, init_lora_weights=False]",
}
SEEDS = {"lo": 1, "ia": 2, "ada": 3}
ORDERS = [["lo", "ia", "ada"], ["ada", "ia", "lo"], ["ia", "lo", "ada"]]


def add_alone(name):
    """The adapter alone on a fresh model, with the same (seeded) weights as on the shared one."""
    model = make_llama()
    torch.manual_seed(SEEDS[name])
    adapterkit.attach(model).add(SPECS[name], name)
    return model


def add_all(order):
    model = make_llama()
    adapters = adapterkit.attach(model)
    for name in order:
        torch.manual_seed(SEEDS[name])
        adapters.add(SPECS[name], name)
    return model, adapters


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_each_adapter_saves_the_keys_and_tensors_it_has_alone(order, tmp_path):
    model, adapters = add_all(order)
    adapters.save(tmp_path / "together")
    for name in order:
        alone = add_alone(name)
        adapterkit.attach(alone).save(tmp_path / f"alone-{name}")
        together = load_file(tmp_path / "together" / name / "adapter_model.safetensors")
        single = load_file(tmp_path / f"alone-{name}" / name / "adapter_model.safetensors")
        assert together.keys() == single.keys(), name
        assert all(torch.equal(together[k], single[k]) for k in single), name
        assert all(".base_layer." not in k for k in together), name


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_one_active_adapter_computes_as_it_does_alone(order):
    model, adapters = add_all(order)
    x = llama_input()
    for name in order:
        adapters.set_active(name)
        assert (run(model, x) - run(add_alone(name), x)).abs().max() <= 1e-5, name


def test_adapters_saved_together_load_in_peft(tmp_path):
    model, adapters = add_all(["lo", "ia", "ada"])
    adapters.save(tmp_path)
    x = llama_input()
    for name in ("lo", "ia", "ada"):
        adapters.set_active(name)
        theirs = PeftModel.from_pretrained(make_llama(), tmp_path / name).eval()
        assert (run(theirs, x) - run(model, x)).abs().max() <= 1e-5, name


def test_set_active_across_methods_and_disable():
    model, adapters = add_all(["lo", "ia", "ada"])
    x = llama_input()
    base = run(make_llama(), x)
    adapters.set_active(["lo", "ia", "ada"])
    everything = run(model, x)
    for name in ("lo", "ia", "ada"):
        adapters.set_active(name)
        assert not torch.allclose(run(model, x), everything)
    adapters.set_active(["lo", "ia", "ada"])
    with adapters.disabled():
        assert torch.allclose(run(model, x), base, atol=1e-6)
    assert torch.allclose(run(model, x), everything, atol=1e-6)
    grads = {part for n, p in model.named_parameters() if p.requires_grad for part in n.split(".") if part in SPECS}
    assert grads == {"lo", "ia", "ada"}


def test_merge_across_methods():
    model, adapters = add_all(["lo", "ia", "ada"])
    x = llama_input()
    adapters.set_active(["lo", "ada"])
    unmerged = run(model, x)
    adapters.merge()
    assert adapters.merged == ["lo", "ada"]
    assert torch.allclose(run(model, x), unmerged, rtol=1e-4, atol=1e-5)
    adapters.unmerge()
    assert torch.allclose(run(model, x), unmerged, rtol=1e-4, atol=1e-5)


def test_per_sample_rows_of_different_methods():
    model, adapters = add_all(["lo", "ia", "ada"])
    x = torch.cat([llama_input(), llama_input()[:1]])
    rows = ["ia", "lo", "__base__", "ada"]
    with adapters.per_sample(rows):
        mixed = run(model, x)
    for i, name in enumerate(rows):
        adapters.set_active([] if name == "__base__" else [name])
        assert torch.allclose(run(model, x[i : i + 1]), mixed[i : i + 1], rtol=1e-5, atol=1e-5), name


def test_delete_every_adapter_gives_back_the_original_model():
    model, adapters = add_all(["lo", "ia", "ada"])
    for name in ("ia", "lo", "ada"):
        adapters.delete(name)
    assert str(model) == str(make_llama())
    x = llama_input()
    assert torch.equal(run(model, x), run(make_llama(), x))


def test_lora_biases_stay_out_of_other_methods_rows_and_keys(tmp_path):
    """A LoRA adapter that trains base biases (bias='all') beside IA3 on the same layers: IA3's rows and
    checkpoint never see those biases; a bias key under another method's wrapper keeps its own path."""
    model = make_mlp()
    x = mlp_input()
    base = run(model, x)
    adapters = adapterkit.attach(model)
    torch.manual_seed(5)
    adapters.add("ia3[target_modules=['blocks.0.0', 'head'], feedforward_modules=[], init_ia3_weights=False]", "ia")
    adapters.add("lora[target_modules=['blocks.0.0'], bias='all', init_lora_weights=False]", "lo")
    with torch.no_grad():  # as if trained: the biases the LoRA adapter owns move
        for name, param in model.named_parameters():
            if name.endswith("bias") and param.requires_grad:
                param.add_(0.25)
    adapters.save(tmp_path)
    saved = load_file(tmp_path / "lo" / "adapter_model.safetensors")
    # blocks.0.0 is wrapped by LoRA (its key has LoRA's base_layer hop), head by IA3 only (no hop: as alone)
    assert {"base_model.model.blocks.0.0.base_layer.bias", "base_model.model.head.bias"} <= saved.keys()

    ia_alone = make_mlp()
    torch.manual_seed(5)
    adapterkit.attach(ia_alone).add(
        "ia3[target_modules=['blocks.0.0', 'head'], feedforward_modules=[], init_ia3_weights=False]", "ia"
    )
    adapters.set_active(["lo", "ia"])
    rows = ["ia", "__base__", "ia", "__base__", "ia"]
    with adapters.per_sample(rows):
        out = run(model, x)
    only_ia = run(ia_alone, x)
    for i, row in enumerate(rows):
        assert torch.equal(out[i], (only_ia if row == "ia" else base)[i])
    loaded = make_mlp()
    adapterkit.attach(loaded).load(tmp_path / "lo", "lo")
    adapters.set_active("lo")
    assert torch.equal(run(model, x), run(loaded, x))
