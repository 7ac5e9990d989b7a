"""Compiled switching (``prepare_compiled``): compile counts, switch time, swap time.

A standalone script (not a test, not part of ``run.py``), for the serving benchmark. On a
Llama-shaped model with ``--adapters`` LoRA adapters (ranks 4/8/16, alphas differing, on the 7
projections) it reports:

* compiles while cycling ``--cycles`` times through all adapters on a ``torch.compile``d model,
  after the first compile: prepared (expected 0) and, for reference, unprepared (each new active
  adapter compiles until torch's recompile limit, then the frame runs uncompiled);
* time per switch: ``set_active`` on the prepared model vs ``set_active`` on the same model
  unprepared (eager), medians;
* ``swap`` from a folder on the prepared model vs reading the file (safetensors) and copying
  its tensors into tensors of the same shapes.

    python bench/compiled_switch.py                       # backend eager, hidden 512, 4 layers
    python bench/compiled_switch.py --backend inductor --cycles 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import adapterkit
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Counter:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def build(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1024,
    )
    return LlamaForCausalLM(config).eval()


def median_ms(op, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        op()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--backend", default="eager", help="eager (counts compiles fast) or inductor")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--skip-unprepared", action="store_true", help="skip the unprepared compile count")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [f"a{i}" for i in range(args.adapters)]
    folder = Path(tempfile.mkdtemp(prefix="compiled_switch_"))
    source = adapterkit.attach(build(args))
    for i, name in enumerate(names):
        r = (4, 8, 16)[i % 3]
        source.add(
            f"lora[r={r}, lora_alpha={2 * r + i % 5}, target_modules={TARGETS!r}, init_lora_weights=False]", name
        )
    source.save(folder, names)
    results: dict[str, object] = {"workload": vars(args)}

    def loaded(prepare: bool) -> adapterkit.Adapters:
        adapters = adapterkit.attach(build(args))
        for name in names:
            adapters.load(folder / name, name, activate=False)
        if prepare:
            adapters.prepare_compiled(max_rank=16, targets=TARGETS, max_adapters=args.adapters)
        return adapters

    x = torch.randint(0, 1024, (1, 8))
    with torch.no_grad():
        for prepare in (True, False):
            if not prepare and args.skip_unprepared:
                continue
            torch._dynamo.reset()
            adapters = loaded(prepare)
            counter = Counter()
            backend = counter if args.backend == "eager" else args.backend
            fast = torch.compile(adapters.model, backend=backend)
            adapters.set_active(names[0])
            fast(input_ids=x, use_cache=False)
            before = counter.graphs, torch._dynamo.utils.counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            cycles = args.cycles if prepare else 1
            for _ in range(cycles):
                for name in names:
                    adapters.set_active(name)
                    fast(input_ids=x, use_cache=False)
            elapsed = time.perf_counter() - start
            after = counter.graphs, torch._dynamo.utils.counters["stats"]["unique_graphs"]
            key = "prepared" if prepare else "unprepared"
            results[f"{key}_compiles_after_first"] = (
                (after[1] - before[1]) if args.backend != "eager" else after[0] - before[0]
            )
            results[f"{key}_cycles"] = cycles
            results[f"{key}_ms_per_switch_and_forward"] = elapsed / (cycles * len(names)) * 1e3

        # Switch time: prepared vs the same adapters unprepared (eager set_active).
        prepared, eager = loaded(True), loaded(False)
        order = iter(names * (args.repeats + 2))
        results["set_active_prepared_ms"] = median_ms(lambda: prepared.set_active(next(order)), args.repeats)
        order = iter(names * (args.repeats + 2))
        results["set_active_eager_ms"] = median_ms(lambda: eager.set_active(next(order)), args.repeats)
        results["set_active_ratio"] = results["set_active_prepared_ms"] / results["set_active_eager_ms"]

        # Swap from a folder vs reading the file and copying the tensors.
        target = prepared.state_dict(names[0])
        files = [folder / names[(i % (len(names) - 1)) + 1] for i in range(len(names))]
        same_rank = [
            f
            for f in files
            if load_file(f / "adapter_model.safetensors")[next(iter(target))].shape == target[next(iter(target))].shape
        ]
        picks = iter(same_rank * (args.repeats + 2))

        def read_and_copy() -> None:
            tensors = load_file(next(picks) / "adapter_model.safetensors")
            for key, value in tensors.items():
                target[key].copy_(value)

        results["swap_same_rank_ms"] = median_ms(lambda: prepared.swap(next(picks), names[0]), args.repeats // 4)
        results["read_and_copy_ms"] = median_ms(read_and_copy, args.repeats // 4)
        results["swap_ratio"] = results["swap_same_rank_ms"] / results["read_and_copy_ms"]
        other = next(f for f in files if f not in same_rank)
        results["swap_other_rank_ms"] = median_ms(lambda: prepared.swap(other, names[0]), 5)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
