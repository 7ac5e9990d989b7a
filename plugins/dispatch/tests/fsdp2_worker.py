"""One process of the FSDP2 test: LoRA on a model sharded with ``fully_shard`` on CPU (gloo).

Launched by ``test_distributed.py`` through torchrun with two processes. Adds
a LoRA adapter, shards every decoder layer and the root with FSDP2, trains on
data that differs per process, then gathers the adapter for saving by
unsharding (``FSDPModule.unshard``), saves from rank 0 only, and records what
each rank ended with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import adapterkit
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = LlamaConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=64,
)
SPEC = "lora[r=4, target_modules=['q_proj', 'v_proj', 'down_proj']]"


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG)


def probe() -> torch.Tensor:
    return torch.arange(24).reshape(3, 8) % CONFIG.vocab_size


def main() -> int:
    out, record = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = base_model()
    adapters = adapterkit.attach(model)
    torch.manual_seed(1)  # the same adapter initialisation on every rank (fully_shard keeps each rank's own shard)
    adapters.add(SPEC)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    same_handle = adapterkit.attach(model) is adapters  # fully_shard swaps the class, keeps the object
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)  # each rank trains on its own batches
    model.train()
    for _ in range(4):
        batch = torch.randint(0, CONFIG.vocab_size, (4, 8), generator=data)
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    sharded = adapters.state_dict()
    kinds = sorted({type(v).__name__ for v in sharded.values()})
    gathered = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in sharded.items()}  # collective

    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in fsdp_modules:
        module.unshard()  # collective: every rank now holds full parameters
    unsharded = {k: v.clone() for k, v in adapters.state_dict().items()}
    if rank == 0:
        adapters.save(out)
    for module in fsdp_modules:
        module.reshard()
    dist.barrier()

    model.eval()
    with torch.no_grad():
        logits = model(probe()).logits  # collective as well

    tensors = {f"adapter.{k}": v.contiguous() for k, v in unsharded.items()}
    tensors.update({f"gathered.{k}": v.contiguous() for k, v in gathered.items()}, probe_logits=logits.contiguous())
    record.mkdir(parents=True, exist_ok=True)
    save_file(tensors, record / f"rank{rank}.safetensors")
    info = {
        "rank": rank,
        "world_size": world,
        "sharded_types": kinds,
        "model_type": type(model).__name__,
        "same_handle": same_handle,
    }
    (record / f"rank{rank}.json").write_text(json.dumps(info), encoding="utf-8")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
