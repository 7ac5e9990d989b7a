"""Prototype (not adapterkit code): a batched per-sample LoRA forward, to size the mixed-batch fast path.

peft's ``LoraLayer._mixed_batch_forward`` loops over the distinct adapters of a batch:
per adapter and per layer it gathers the rows (``x[idx]``), runs ``lora_B(lora_A(.))``
and scatters the result back (``result[idx] += ...``): 2 small matmuls, a gather and
an index_put per adapter per layer. This prototype does one gather of the stacked
adapter weights per layer (``A[rows]``, ``B[rows]``) and two ``torch.bmm`` calls,
whatever the number of distinct adapters (same FLOPs). The stacks are built when the
context is entered, so the timed "batched" case pays for them on every call (about
47 ms per forward on the medium model; a real fast path caches them per adapter set).
It replaces each LoRA layer's forward (an instance attribute, removed on exit) on an
adapterkit model; outputs are checked against adapterkit's per_sample (peft's path).

    python bench/prototypes/mixed_bmm.py [--size medium] [--rounds 7]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextlib.contextmanager
def batched_lora(model, names: list[str], rows: list[str]):
    """Inside: every LoRA layer computes ``base(x) + scale[row] * (x @ A[row].T) @ B[row].T`` with two bmm calls."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    index = torch.tensor([names.index(r) for r in rows])
    handles = []
    for layer in model.modules():
        if not isinstance(layer, LoraLinear):
            continue
        # Built once per adapter set (a real fast path caches this on the layer and rebuilds on load/delete).
        a = torch.stack([layer.lora_A[n].weight for n in names])  # (n, r, in)
        b = torch.stack([layer.lora_B[n].weight for n in names])  # (n, out, r)
        scale = torch.tensor([layer.scaling[n] for n in names], dtype=a.dtype)

        def forward(module, args, kwargs, a=a, b=b, scale=scale):
            x = args[0]
            result = module.base_layer(x)
            a_rows, b_rows = a[index], b[index] * scale[index, None, None]  # (B, r, in), (B, out, r)
            low = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), a_rows.transpose(1, 2))
            return result + torch.bmm(low, b_rows.transpose(1, 2)).reshape(result.shape)

        # An instance attribute shadows the class's forward; deleting it puts the class's back.
        layer.forward = lambda *args, _layer=layer, _f=forward, **kwargs: _f(_layer, args, kwargs)
        handles.append(layer)
    try:
        yield
    finally:
        for layer in handles:
            del layer.forward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import run as bench_run
    import torch
    from systems import AdapterkitDriver
    from timing import Case, interleaved
    from workload import SIZES, build_base, input_ids, make_workdir, write_adapters

    bench_run.quiet_transformers()
    torch.set_num_threads(1)
    size = SIZES[args.size]
    base = build_base(size)
    ak = AdapterkitDriver(base)
    folders = write_adapters(base, "lora", count=8, root=make_workdir())
    names = [f"m{i}" for i in range(8)]
    for name, folder in zip(names, folders):
        ak.load(folder, name)
    ak.set_active("m0", trainable=False)
    print(f"{size.name}: {size.describe()}; LoRA r=16 on 7 projections; 8 adapters loaded; 1 torch thread")
    print(
        f"{'batch':<28} {'peft path':>10} {'batched':>10} {'one adapter':>12} {'batched/peft':>13} "
        f"{'LoRA cost: peft':>16} {'batched':>8} {'max diff':>9}"
    )
    for tokens in (size.mixed_tokens, 1):
        ids = input_ids(size, 8, tokens, seed=7)
        for k in (2, 4, 8):
            rows = [names[i % k] for i in range(8)]
            with torch.no_grad():
                ref = ak.mixed(rows, ids)
                with batched_lora(ak.model, names, rows):
                    fast = ak.model(input_ids=ids, use_cache=False).logits
            diff = float((ref - fast).abs().max())

            def batched(rows=rows, ids=ids):
                with torch.no_grad(), batched_lora(ak.model, names, rows):
                    return ak.model(input_ids=ids, use_cache=False).logits

            timings = interleaved(
                [
                    Case("peft", lambda rows=rows, ids=ids: ak.mixed(rows, ids)),
                    Case("batched", batched),
                    Case("one", lambda ids=ids: ak.forward(ids)),
                    Case("base", lambda ids=ids: base(input_ids=ids, use_cache=False)),
                ],
                args.rounds,
            )
            med = {k2: timings.median(k2) for k2 in ("peft", "batched", "one", "base")}
            lora_peft, lora_fast = med["peft"] - med["base"], med["batched"] - med["base"]
            print(
                f"{f'8x{tokens} tokens, {k} distinct':<28} {1e3 * med['peft']:>8.1f}ms {1e3 * med['batched']:>8.1f}ms "
                f"{1e3 * med['one']:>10.1f}ms {timings.ratio('batched', 'peft'):>12.2f}x "
                f"{1e3 * lora_peft:>14.1f}ms {1e3 * lora_fast:>6.1f}ms {diff:>9.1e}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
