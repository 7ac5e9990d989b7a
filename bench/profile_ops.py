"""Profile adapterkit's operations on the benchmark workload (pyinstrument), to find what bounds them.

    pip install pyinstrument
    python bench/profile_ops.py                       # every operation, medium model, LoRA
    python bench/profile_ops.py load load_nth --size small --method ia3
    python bench/profile_ops.py --system peft load    # the same operation in an anchor, for comparison

Writes one text profile per operation to bench/results/profiles/ and prints its
top frames. For a sampling profile of a whole run instead, use py-spy:
``py-spy record -o bench/results/run.svg -- python bench/run.py --quick``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPERATIONS = (
    "load",
    "load_nth",
    "set_active",
    "set_active_many",
    "set_active_many_training",
    "mixed",
    "forward",
    "merge",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("operations", nargs="*", help=f"from {', '.join(OPERATIONS)} (default: all)")
    parser.add_argument("--size", default="medium", choices=("small", "medium", "large"))
    parser.add_argument("--method", default="lora")
    parser.add_argument("--system", default="adapterkit", choices=("adapterkit", "peft", "transformers"))
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--show-all", action="store_true", help="keep library frames (peft, torch) in the profile")
    parser.add_argument("--lines", type=int, default=60, help="profile lines to print per operation")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "profiles")
    args = parser.parse_args()
    unknown = set(args.operations) - set(OPERATIONS)
    if unknown:
        parser.error(f"unknown operations {sorted(unknown)}; choose from {', '.join(OPERATIONS)}")
    args.operations = args.operations or list(OPERATIONS)

    import run as bench_run
    import torch
    from pyinstrument import Profiler
    from systems import DRIVERS
    from workload import SIZES, build_base, input_ids, make_workdir, write_adapters

    bench_run.quiet_transformers()
    torch.set_num_threads(1)
    size = SIZES[args.size]
    base = build_base(size)
    driver = DRIVERS[args.system](base)
    folders = write_adapters(base, args.method, count=8 if args.method == "lora" else 2, root=make_workdir())
    args.out.mkdir(parents=True, exist_ok=True)

    def profiled(name: str, op, repeat: int, setup=None, teardown=None) -> None:
        profiler = Profiler(interval=0.001)
        total = 0.0
        for _ in range(repeat):
            if setup:
                setup()
            profiler.start()
            start = time.perf_counter()
            op()
            total += time.perf_counter() - start
            profiler.stop()
            if teardown:
                teardown()
        text = profiler.output_text(unicode=False, color=False, show_all=args.show_all)
        path = args.out / f"{args.system}-{args.size}-{args.method}-{name}.txt"
        path.write_text(text, encoding="utf-8")
        print(f"=== {name}: {1e3 * total / repeat:.2f} ms per call ({repeat} calls) -> {path}")
        print("\n".join(text.splitlines()[: args.lines]))

    def load_many(count: int, trainable: bool = False) -> None:
        driver.reset()
        for i in range(count):
            driver.load(folders[i % len(folders)], f"a{i}", trainable)

    for operation in args.operations:
        if operation == "load":
            driver.reset()
            profiled("load", lambda: driver.load(folders[0], "probe"), args.repeat, teardown=driver.reset)
        elif operation == "load_nth":
            load_many(args.adapters)
            profiled(
                f"load_{args.adapters + 1}th",
                lambda: driver.load(folders[0], "probe"),
                args.repeat,
                teardown=lambda: driver.delete("probe"),
            )
        elif operation in ("set_active", "set_active_many", "set_active_many_training"):
            count = 2 if operation == "set_active" else args.adapters
            trainable = operation.endswith("training")
            load_many(count, trainable)
            state = {"i": 0}

            def switch(count: int = count, trainable: bool = trainable, state: dict = state) -> None:
                state["i"] ^= 1
                driver.set_active("a0" if state["i"] else f"a{count // 2}", trainable)

            profiled(f"{operation}_{count}", switch, args.repeat * 10)
        elif operation == "mixed":
            load_many(8)
            rows = [f"a{i}" for i in range(8)]
            ids = input_ids(size, 8, size.mixed_tokens)
            profiled("mixed_8", lambda rows=rows, ids=ids: driver.mixed(rows, ids), max(3, args.repeat // 2))
        elif operation in ("forward", "merge"):
            load_many(1)
            ids = input_ids(size, *size.forward_shape)
            if operation == "merge":
                profiled("merge_unmerge", lambda: (driver.merge(), driver.unmerge()), args.repeat)
            else:
                profiled("forward", lambda ids=ids: driver.forward(ids), max(3, args.repeat // 2))
    driver.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
