"""Two real processes on CPU (gloo, 127.0.0.1): DDP through accelerate, and FSDP2 (``fully_shard``).

Each test launches torchrun with two processes. The DDP test runs the shipped
example, ``examples/distributed_lora.py``; the FSDP2 test runs
``fsdp2_worker.py``. Both record what every rank ended with, and the checks
happen here, in the test process: identical adapters on both ranks, one
writer, and the saved adapter reproducing the trained outputs in a fresh model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import adapterkit
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parents[2] / "examples" / "distributed_lora.py"
FSDP2_WORKER = HERE / "fsdp2_worker.py"
LIMIT_S = 240  # a hung rendezvous fails the test instead of hanging CI; a normal run takes ~25 s


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, whatever the host name resolves to
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script), *args,
    ]  # fmt: skip
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=LIMIT_S, env=env)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return done


def ranks(record: Path) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    found = []
    for rank in (0, 1):
        info = json.loads((record / f"rank{rank}.json").read_text(encoding="utf-8"))
        found.append((info, load_file(record / f"rank{rank}.safetensors")))
    return found


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_ddp_example_trains_one_adapter_on_two_processes(tmp_path):
    out, record = tmp_path / "adapter", tmp_path / "record"
    done = torchrun(EXAMPLE, "--out", str(out), "--record", str(record), "--steps", "8")
    assert "reload reproduces the trained outputs" in done.stdout
    (info0, r0), (info1, r1) = ranks(record)
    assert {info0["world_size"], info1["world_size"]} == {2}
    assert info0["wrapper"] == info1["wrapper"] == "DistributedDataParallel"
    assert info0["backend"] == "gloo"
    # The ranks trained on different data ...
    assert not torch.equal(r0["first_batch"], r1["first_batch"])
    # ... and end with the same adapter and the same outputs (DDP averaged the adapter gradients).
    adapter0, adapter1 = with_prefix(r0, "adapter."), with_prefix(r1, "adapter.")
    assert_same_tensors(adapter0, adapter1)
    assert torch.equal(r0["probe_logits"], r1["probe_logits"])
    # Training moved the adapter away from its initialisation (LoRA B starts at zero).
    assert all(v.abs().sum() > 0 for k, v in adapter0.items() if ".lora_B." in k)
    # Only the main process wrote; the folder holds one adapter, with the trained tensors.
    assert (info0["wrote"], info1["wrote"]) == (True, False)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert_same_tensors(load_file(out / "adapter_model.safetensors"), adapter0)
    # The saved adapter reproduces the trained outputs here too, in a process that took no part.
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import distributed_lora
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    fresh = distributed_lora.base_model()
    adapterkit.attach(fresh).load(out)
    torch.testing.assert_close(distributed_lora.probe_logits(fresh), r0["probe_logits"], atol=1e-6, rtol=0)


def test_state_dict_and_save_on_a_ddp_wrapped_model(tmp_path):
    # Single-process gloo group: enough to wrap a model in DDP in this process.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    adapters = adapterkit.attach(model)
    adapters.add("lora[r=2, target_modules=['q_proj', 'v_proj'], init_lora_weights=False]")
    expected = {k: v.clone() for k, v in adapters.state_dict().items()}
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        assert adapterkit.attach(ddp.module) is adapters
        assert_same_tensors(adapterkit.attach(ddp.module).state_dict(), expected)
        adapterkit.attach(ddp.module).save(tmp_path)
        x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            wrapped = ddp(x).logits
    finally:
        dist.destroy_process_group()
    assert_same_tensors(load_file(tmp_path / "adapter_model.safetensors"), expected)
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(config)
    adapterkit.attach(fresh).load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, wrapped, atol=1e-6, rtol=0)


def test_fsdp2_fully_shard_on_cpu_gloo(tmp_path):
    out, record = tmp_path / "adapter", tmp_path / "record"
    torchrun(FSDP2_WORKER, str(out), str(record))
    (info0, r0), (info1, r1) = ranks(record)
    assert info0["model_type"].startswith("FSDP")  # fully_shard swaps the class in place; no wrapper
    assert info0["same_handle"] and info1["same_handle"]
    # While sharded, the adapter's state dict holds DTensor shards; unsharding gives full tensors.
    assert info0["sharded_types"] == ["DTensor"]
    adapter0, adapter1 = with_prefix(r0, "adapter."), with_prefix(r1, "adapter.")
    assert_same_tensors(adapter0, adapter1)
    assert_same_tensors(with_prefix(r0, "gathered."), adapter0)  # DTensor.full_tensor() gathers the same values
    assert torch.equal(r0["probe_logits"], r1["probe_logits"])
    assert all(v.abs().sum() > 0 for k, v in adapter0.items() if ".lora_B." in k)
    assert_same_tensors(load_file(out / "adapter_model.safetensors"), adapter0)
    sys.path.insert(0, str(HERE))
    try:
        import fsdp2_worker
    finally:
        sys.path.remove(str(HERE))
    fresh = fsdp2_worker.base_model().eval()
    adapterkit.attach(fresh).load(out)
    with torch.no_grad():
        torch.testing.assert_close(fresh(fsdp2_worker.probe()).logits, r0["probe_logits"], atol=1e-5, rtol=0)


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    import torch.distributed as dist

    yield
    assert not dist.is_initialized()
