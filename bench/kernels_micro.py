"""Micro benchmark of the batched per-sample kernels (adapterkit_peft.kernels) against peft.

A standalone script (not a test, not part of ``run.py``). It builds a Llama-shaped
model with peft LoRA adapters, then times a whole-model forward of a mixed batch
(decode: one token per row; prefill: ``--seq`` tokens) for:

* ``peft one``: peft's LoRA forward with one adapter active for every row (the anchor);
* ``peft mixed``: peft's ``adapter_names=`` mixed batch (one adapter per row);
* ``base model``: every LoRA layer's forward replaced by its base layer: the floor of any LoRA path;
* ``kernels <algo>``: every peft LoRA layer's forward replaced by ``base(x) +
  lora_delta_rows(...)`` on banks filled from the layer's adapters: ``auto`` (a
  :class:`RowPlan` built once per forward, algorithm by shape), ``tensor`` (the
  compile-safe BGMV gather), and each algorithm forced.

Cases run interleaved (every case once per round, rotating order); each sample is
the forward's CPU time (``time.process_time``: the process's threads, all of them),
so time the process spends descheduled on a shared machine is not counted; wall
times are printed beside. Times are medians over rounds; ratios are medians of the
paired ratios within a round. Outputs of the kernels are checked against peft's
mixed batch. A per-layer table (``--layers``) times one projection's delta alone.

On a shared machine, run with ``OMP_WAIT_POLICY=PASSIVE`` for more than one thread:
OpenMP's spinning threads otherwise count as CPU time while they wait for a core.

    python bench/kernels_micro.py --workload medium --threads 1
    python bench/kernels_micro.py --workload small --threads 0   # 0: torch's default
    python bench/kernels_micro.py --workload medium --seq 128 --batch 32 --rounds 2 --distinct 32
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workload import Size, build_base  # noqa: E402

from adapterkit_peft.kernels import lora_delta_rows, plan_rows  # noqa: E402

WORKLOADS = {
    # The reference serving workload: r=16 on the 7 projections.
    "medium": (Size("medium", hidden=1024, intermediate=2816, layers=16, heads=16), 16, 7),
    # The first measurement: hidden 512, 4 layers, r=8 on q/k/v/o.
    "small": (Size("small", hidden=512, intermediate=1408, layers=4, heads=8), 8, 4),
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(workload: str, adapters: int):
    from peft import LoraConfig, get_peft_model

    size, rank, n_targets = WORKLOADS[workload]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=PROJECTIONS[:n_targets])
    model = get_peft_model(build_base(size), config, adapter_name="a0")
    for index in range(1, adapters):
        model.add_adapter(f"a{index}", config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    model.set_adapter("a0")
    return size, model.eval()


class Banked:
    """Each peft LoRA layer's adapters copied into slot banks; the layer forwards can be swapped for the kernels'."""

    def __init__(self, model, names: list[str]) -> None:
        from peft.tuners.lora import Linear as LoraLinear

        self.layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        self.names = names
        self.slots = None  # a RowPlan or a LongTensor, set per forward
        self.algorithm = None
        self.banks = {}
        rank = max(layer.r[n] for layer in self.layers for n in names)
        for layer in self.layers:
            a0 = layer.lora_A[names[0]].weight
            A = a0.new_zeros(len(names), rank, a0.shape[1])
            B = a0.new_zeros(len(names), layer.lora_B[names[0]].weight.shape[0], rank)
            scale = torch.zeros(len(names))
            for slot, name in enumerate(names):
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                A[slot, : a.shape[0]] = a.detach()
                B[slot, :, : b.shape[1]] = b.detach()
                scale[slot] = layer.scaling[name]
            self.banks[id(layer)] = (A, B, scale)

    def install(self) -> None:
        for layer in self.layers:
            layer.__dict__["forward"] = self._forward(layer)

    def install_base(self) -> None:
        """Every LoRA layer computes its base layer alone (the floor of any LoRA path)."""
        for layer in self.layers:
            layer.__dict__["forward"] = layer.base_layer

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)

    def _forward(self, layer):
        A, B, scale = self.banks[id(layer)]
        base = layer.base_layer

        def forward(x, *args, **kwargs):
            result = base(x, *args, **kwargs)
            result += lora_delta_rows(x, A, B, scale, self.slots, self.algorithm).to(result.dtype)
            return result

        return forward


def whole_model(args, threads: int) -> None:
    size, model = build(args.workload, max(args.distinct))
    names = [f"a{i}" for i in range(max(args.distinct))]
    banked = Banked(model, names)
    ids = torch.randint(0, size.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    torch.set_num_threads(threads) if threads else None
    print(f"\n## {args.workload}: {size.describe()}; LoRA r={WORKLOADS[args.workload][1]} on "
          f"{PROJECTIONS[:WORKLOADS[args.workload][2]]}; batch {args.batch} x seq {args.seq}; "
          f"threads {torch.get_num_threads()}")

    def peft_one():
        banked.remove()
        return model(input_ids=ids, use_cache=False).logits

    def base_only():
        banked.install_base()
        try:
            return model(input_ids=ids, use_cache=False).logits
        finally:
            banked.remove()

    def peft_mixed(rows):
        banked.remove()
        return model(input_ids=ids, adapter_names=rows, use_cache=False).logits

    def kernels(slots, algorithm=None, per_forward_plan=None):
        def op():
            banked.install()
            # The plan is built per forward (as per_sample would, once per block), inside the timing.
            banked.slots = plan_rows(per_forward_plan, len(names)) if per_forward_plan is not None else slots
            banked.algorithm = algorithm
            try:
                return model(input_ids=ids, use_cache=False).logits
            finally:
                banked.remove()

        return op

    algorithms = ["dense", "gather", "grouped", "window"] if args.all_algorithms else []
    rows_table = []
    with torch.inference_mode():
        for n in args.distinct:
            slot_of_row = [b % n for b in range(args.batch)]
            rows = [names[s] for s in slot_of_row]
            cases = {"peft one": peft_one, "peft mixed": lambda rows=rows: peft_mixed(rows), "base model": base_only}
            cases["kernels auto"] = kernels(None, per_forward_plan=slot_of_row)
            cases["kernels tensor"] = kernels(torch.tensor(slot_of_row))
            plan = plan_rows(slot_of_row, len(names))
            cases.update({f"kernels {a}": kernels(plan, a) for a in algorithms})
            if args.check:
                ref = peft_mixed(rows)
                for name, op in list(cases.items())[3:]:
                    diff = (op() - ref).abs().max().item()
                    assert diff < 1e-3, (name, diff)
            cpu, wall = rounds(cases, args.rounds)
            for name in cases:
                rows_table.append((n, name, statistics.median(cpu[name]) * 1e3, statistics.median(wall[name]) * 1e3,
                                   paired(cpu, name, "peft one"), paired(cpu, name, "peft mixed"),
                                   paired(wall, name, "peft one")))
            gc.collect()
    print("| distinct | system | CPU ms | wall ms | vs peft one | vs peft mixed | vs peft one (wall) |")
    print("|---|---|---|---|---|---|---|")
    for n, name, ms, wall_ms, one, mixed, one_wall in rows_table:
        print(f"| {n} | {name} | {ms:.1f} | {wall_ms:.1f} | {one:.2f}x | {mixed:.2f}x | {one_wall:.2f}x |")


def rounds(cases: dict, count: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Every case once per round, rotating order, after one warm-up round: CPU and wall seconds per sample."""
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    wall: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for index in range(count + 1):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            c0, w0 = time.process_time(), time.perf_counter()
            cases[name]()
            c1, w1 = time.process_time(), time.perf_counter()
            if index:
                cpu[name].append(c1 - c0)
                wall[name].append(w1 - w0)
    return cpu, wall


def paired(samples: dict[str, list[float]], name: str, anchor: str) -> float:
    return statistics.median(a / b for a, b in zip(samples[name], samples[anchor]))


def layer_table(args, threads: int) -> None:
    """One projection's delta alone (no base matmul), per algorithm, next to the base matmul and one adapter.

    CPU microseconds per call, the minimum over 7 samples (the least disturbed by other processes).
    """
    torch.set_num_threads(threads) if threads else None
    size, rank, _ = WORKLOADS[args.workload]
    shapes = {"q (h->h)": (size.hidden, size.hidden), "up (h->i)": (size.hidden, size.intermediate),
              "down (i->h)": (size.intermediate, size.hidden)}
    slots_n = max(args.distinct)
    print(f"\n## per layer, {args.workload}, batch {args.batch} x seq {args.seq}, r={rank}, "
          f"{slots_n} slots, threads {torch.get_num_threads()} (microseconds per call)")
    print("| shape | distinct | base linear | one adapter | " + " | ".join(
        ["tensor", "dense", "gather", "grouped", "window", "auto"]) + " |")
    print("|---|---|---|---|" + "---|" * 6)
    for label, (fan_in, fan_out) in shapes.items():
        A = torch.randn(slots_n, rank, fan_in) * 0.02
        B = torch.randn(slots_n, fan_out, rank) * 0.02
        scale = torch.rand(slots_n)
        W = torch.randn(fan_out, fan_in) * 0.02
        x = torch.randn(args.batch, args.seq, fan_in)
        a0, b0 = A[0].clone(), B[0].clone()
        base = _micro(lambda: torch.nn.functional.linear(x, W))
        one = _micro(lambda: torch.nn.functional.linear(torch.nn.functional.linear(x, a0), b0) * 2.0)
        for n in args.distinct:
            slot_of_row = [b % n for b in range(args.batch)]
            plan, tensor = plan_rows(slot_of_row, slots_n), torch.tensor(slot_of_row)
            cells = [_micro(lambda: lora_delta_rows(x, A, B, scale, tensor))]
            for algorithm in ("dense", "gather", "grouped", "window"):
                cells.append(_micro(lambda a=algorithm: lora_delta_rows(x, A, B, scale, plan, a)))
            cells.append(_micro(lambda: lora_delta_rows(x, A, B, scale, plan)))
            print(f"| {label} | {n} | {base:.0f} | {one:.0f} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")


def _micro(op, seconds: float = 0.3) -> float:
    with torch.inference_mode():
        op()
        start, calls = time.process_time(), 0
        while time.process_time() - start < seconds / 3:
            op()
            calls += 1
        samples = []
        for _ in range(7):
            t0 = time.process_time()
            for _ in range(max(1, calls // 3)):
                op()
            samples.append((time.process_time() - t0) / max(1, calls // 3))
    return min(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="medium")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="0: torch's default")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=1)
    parser.add_argument("--distinct", type=int, nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--all-algorithms", action="store_true", help="also time each algorithm forced")
    parser.add_argument("--layers", action="store_true", help="also print the per-layer table")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model table")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the output check against peft")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    for threads in args.threads:
        if args.layers:
            layer_table(args, threads)
        if not args.no_model:
            whole_model(args, threads)
        torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
