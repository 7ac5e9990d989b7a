"""Core behaviour that matters once models are dispatched: offloaded layers, failed dispatch, DDP wrappers."""
import json

import adapterkit
import pytest
import torch
from adapterkit_dispatch import DispatchError
from test_dispatch import (  # noqa: F401
    CPU_AND_DISK,
    DORA,
    SPEC,
    assert_outputs_equal,
    check_adapters_sit_with_their_layers,
    make_llama,
    run,
)
from test_dispatch import saved  # noqa: F401  (the saved-adapter fixture; no conftest: tests/conftest.py owns that name)
from transformers import LlamaForCausalLM


def test_loading_into_layers_that_are_already_on_disk(saved, tmp_path):  # noqa: F811
    folder, expected, base = saved
    checkpoint = tmp_path / "base"
    make_llama().save_pretrained(checkpoint)
    offload = tmp_path / "offload"
    model = LlamaForCausalLM.from_pretrained(checkpoint, device_map=CPU_AND_DISK, offload_folder=offload).eval()
    assert model.lm_head.weight.is_meta
    adapters = adapterkit.attach(model)
    adapters.load(folder, device_map=CPU_AND_DISK, offload_folder=offload)
    assert check_adapters_sit_with_their_layers(model, offload) == (2, 3)
    assert_outputs_equal(run(model), expected)
    index = json.loads((offload / "index.json").read_text())
    assert index["lm_head.base_layer.weight"]["weight_name"] == "lm_head.weight"  # renamed, read from the checkpoint
    with adapters.disabled():
        assert_outputs_equal(run(model), base)


def test_a_failed_dispatch_in_load_leaves_no_adapter(saved):  # noqa: F811
    folder, _, _ = saved
    model = make_llama()
    adapters = adapterkit.attach(model)
    with pytest.raises(DispatchError):
        adapters.load(folder, device_map={"": "cpu", "nope": "cpu"})
    assert adapters.names == []


def test_merge_into_offloaded_layers_is_refused(saved, tmp_path):  # noqa: F811
    folder, expected, _ = saved
    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.load(folder, device_map=CPU_AND_DISK, offload_folder=tmp_path)
    with pytest.raises(adapterkit.UnsupportedOperationError, match="offloaded"):
        adapters.merge()
    assert adapters.merged == []
    assert_outputs_equal(run(model), expected)


def test_ia3_per_sample_on_a_dispatched_model(tmp_path):
    model = make_llama()
    adapters = adapterkit.attach(model)
    spec = 'ia3[target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False]'
    adapters.add(spec, "a"); adapters.add(spec, "b")
    rows = ["a", "__base__", "b"]
    with adapters.per_sample(rows):
        expected = run(model)
    adapters.set_active("a"); only_a = run(model)
    adapters.dispatch(CPU_AND_DISK, offload_folder=tmp_path)
    with adapters.per_sample(rows):
        assert_outputs_equal(run(model), expected)
    assert_outputs_equal(run(model), only_a)  # accelerate's hooks survived the block


def test_attach_sees_through_ddp():
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.add(SPEC)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    dist.init_process_group("gloo", store=dist.TCPStore("127.0.0.1", port, 1, is_master=True), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        assert adapterkit.attach(ddp) is adapters
        assert adapterkit.attach(torch.nn.DataParallel(model)) is adapters
    finally:
        dist.destroy_process_group()
