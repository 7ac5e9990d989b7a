"""A model with adapters is freed when its last reference goes, without a garbage-collector pass."""

from __future__ import annotations

import gc
import weakref

import adapterkit
import torch
from conftest import llama_input, make_llama


def test_twenty_models_with_adapters_leave_none_alive_with_the_collector_off() -> None:
    x = llama_input()
    refs = []
    gc.collect()
    gc.disable()
    try:
        for seed in range(20):
            model = make_llama(seed)
            adapters = adapterkit.attach(model)
            adapters.add('lora[r=2, target_modules=["q_proj"]]', "lora")
            adapters.add('adalora[init_r=4, target_r=2, total_step=4, tinit=1, tfinal=1, target_modules=["v_proj"]]', "ada")
            adapters.set_active(["lora", "ada"])
            model.train()
            loss = model(x, labels=x).loss + adapters.regularization()
            loss.backward()
            adapters.training_step(0)  # AdaLoRA keeps a rank allocator per adapter
            with torch.no_grad():
                model.eval()
                with adapters.per_sample(["lora", "ada", "__base__"]):
                    model(x)
            refs.append(weakref.ref(model))
            del model, adapters, loss
        alive = sum(ref() is not None for ref in refs)
    finally:
        gc.enable()
    assert alive == 0


def test_the_adapters_handle_keeps_its_model_and_attach_finds_the_record_again() -> None:
    adapters = adapterkit.attach(make_llama())  # the handle holds the model: no need to keep both
    adapters.add('lora[r=2, target_modules=["q_proj"]]')
    model = weakref.ref(adapters.model)
    assert adapters.state_dict()
    assert adapterkit.attach(adapters.model) is adapters  # the same handle while it is held
    del adapters
    gc.collect()
    assert model() is None  # nothing else held it
    kept = make_llama()
    handle = adapterkit.attach(kept)
    handle.add('lora[r=2, target_modules=["q_proj"]]', "a")
    del handle  # only the model is left: its record of the adapters stays on it
    assert adapterkit.attach(kept).names == ["a"]
