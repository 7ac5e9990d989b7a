"""Train one LoRA adapter with several processes (DDP through accelerate), save it once.

Runs on CPUs with the gloo backend, so it needs no GPU; on GPUs the same script
uses NCCL. Launch it with torchrun (accelerate's ``Accelerator`` reads the
environment torchrun sets up)::

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29512 \\
        examples/distributed_lora.py --out /tmp/lora-ddp

(``accelerate launch --cpu --num_processes 2`` starts a single process with
accelerate 1.15: without ``--multi_gpu``, which cannot be combined with
``--cpu``, multi-CPU runs expect MPI. torchrun is the simple route.)

What it shows:

* adapters are added to the plain model *before* it is wrapped: DDP sees the
  adapter parameters as its trainable parameters and averages their gradients,
  so every process ends with the same adapter;
* the adapters belong to the wrapped model, not the wrapper:
  ``adapterkit.attach(accelerator.unwrap_model(model))`` (for DDP that is
  ``model.module``) gives the handle the adapters were added through;
* only the main process writes files; every process then reloads the saved
  adapter into a fresh base model and checks it reproduces the trained outputs.

``--record DIR`` also writes what each process ended with (its adapter
tensors, outputs, first batch, whether it saved) for the test suite to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import adapterkit
import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=64,
)
SPEC = 'lora[r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]]'


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same "pretrained" base in every process
    return LlamaForCausalLM(CONFIG)


def task(n: int = 64, length: int = 12, shift: int = 3) -> torch.Tensor:
    """Sequences where each token is the previous one plus ``shift``: a pattern LoRA learns in a few steps."""
    start = torch.randint(0, CONFIG.vocab_size, (n, 1), generator=torch.Generator().manual_seed(1))
    return (start + shift * torch.arange(length)) % CONFIG.vocab_size


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(task(n=4, shift=5)).logits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the trained adapter (written by the main process)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--record", help="folder for per-process evidence (used by the tests)")
    args = parser.parse_args()
    started = time.perf_counter()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    model = base_model()
    adapters = adapterkit.attach(model)
    adapters.add(SPEC)  # before prepare(): DDP must see the adapter parameters
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = DataLoader(task(), batch_size=8, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.print(f"{world} processes, {accelerator.state.distributed_type}, backend {accelerator.state.backend}")

    first_batch = None
    model.train()
    step = 0
    while step < args.steps:
        for batch in loader:
            if first_batch is None:
                first_batch = batch.detach().clone()
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            if step % 4 == 0 or step == args.steps - 1:
                accelerator.print(f"  step {step:3d}  loss {loss.item():.3f}")
            step += 1
            if step == args.steps:
                break

    # The adapters live on the model inside the DDP wrapper.
    inner = accelerator.unwrap_model(model)
    assert adapterkit.attach(inner) is adapters
    trained = adapters.state_dict()
    logits = probe_logits(inner)

    # Every process must hold the same adapter: compare a fingerprint across processes.
    fingerprint = [float(sum(t.double().sum() for t in trained.values())), float(logits.double().sum())]
    everyone: list[list[float] | None] = [None] * world
    if world > 1:
        dist.all_gather_object(everyone, fingerprint)
    else:
        everyone = [fingerprint]
    if any(other != fingerprint for other in everyone):
        print(f"[rank {rank}] adapters differ across processes: {everyone}", file=sys.stderr)
        return 1

    wrote = False
    if accelerator.is_main_process:
        adapters.save(args.out)  # peft format: adapter_config.json + adapter_model.safetensors
        wrote = True
    accelerator.wait_for_everyone()

    # The saved adapter, loaded into a fresh base model, gives the trained outputs.
    fresh = base_model()
    adapterkit.attach(fresh).load(args.out)
    reloaded = probe_logits(fresh)
    if not torch.allclose(reloaded, logits, atol=1e-6, rtol=0):
        print(f"[rank {rank}] reloaded adapter differs: {(reloaded - logits).abs().max().item()}", file=sys.stderr)
        return 1

    if args.record:
        record = Path(args.record)
        record.mkdir(parents=True, exist_ok=True)
        tensors = {f"adapter.{k}": v.contiguous() for k, v in trained.items()}
        tensors.update(probe_logits=logits.contiguous(), first_batch=first_batch.contiguous())
        save_file(tensors, record / f"rank{rank}.safetensors")
        info = {
            "rank": rank,
            "world_size": world,
            "wrote": wrote,
            "wrapper": type(model).__name__,
            "backend": accelerator.state.backend,
            "pid": os.getpid(),
        }
        (record / f"rank{rank}.json").write_text(json.dumps(info), encoding="utf-8")
    accelerator.print(
        f"saved to {args.out}; reload reproduces the trained outputs ({time.perf_counter() - started:.1f}s)"
    )
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
