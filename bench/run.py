"""adapterkit vs peft (PeftModel) vs transformers (PeftAdapterMixin), side by side in one run.

    python bench/run.py            # full run (small, medium, large models; about 13 min on 2 cores)
    python bench/run.py --quick    # smoke run: small model, 6 adapters, 2 rounds (< 2 min)

Prints a table and writes bench/results/<timestamp>.json. See docs/benchmarks.md.
The serving benchmarks (many adapters per batch, torch.compile, budget, live traffic) are a
separate run: python bench/serving.py (tox -e bench-serving).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every adapter is a local folder; never wait on the network
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PINS = {"torch": "2.13.0", "peft": "0.21.2", "transformers": "5.22.2"}
PLUGINS = {"lora": "adapterkit-lora", "ia3": "adapterkit-ia3", "adalora": "adapterkit-adalora"}
QUICK_PEAK = ["--hidden", "512", "--intermediate", "1408", "--layers", "8"]  # the small model
MEASURES = ("load", "activity", "forward", "mixed", "peak")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def check_environment() -> dict[str, str]:
    versions = {}
    missing = []
    for dist in ("adapterkit", *PLUGINS.values(), "torch", "peft", "transformers", "safetensors"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            missing.append(dist)
    needed = [
        d for d in missing if d in ("adapterkit", "adapterkit-lora", "torch", "peft", "transformers", "safetensors")
    ]
    if needed:
        sys.exit(
            f"bench: missing {needed}. From the repository root:\n"
            "  pip install -c constraints.txt -e . -e plugins/peft -e plugins/lora transformers\n"
            "(and -e plugins/ia3 -e plugins/adalora for those methods)"
        )
    for dist, pin in PINS.items():
        if not versions[dist].startswith(pin):
            warnings.warn(f"{dist} {versions[dist]} is not the pinned {pin}; figures are not comparable", stacklevel=1)
    return versions


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory": memory,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def quiet_transformers() -> None:
    """transformers prints a load report table and a progress bar on every load_adapter; keep the output readable.

    (This can only make transformers faster, so it never flatters adapterkit's ratios.)
    """
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", message=".*adapter.*")


def peak_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Measure 6 lives in bench/peak_memory_load.py (owned by another change): run it and read its JSON."""
    script = HERE / "peak_memory_load.py"
    if not script.exists():
        return {"skipped": "bench/peak_memory_load.py is not present; no peak-memory figures"}
    with tempfile.TemporaryDirectory(prefix="adapterkit-bench-") as tmp:
        out = Path(tmp) / "peak.json"
        command = [sys.executable, str(script), "--json", str(out), *(QUICK_PEAK if args.quick else [])]
        log("peak memory: " + " ".join(command[1:]))
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            return {"skipped": "bench/peak_memory_load.py timed out"}
        if done.returncode != 0 or not out.exists():
            return {"skipped": f"bench/peak_memory_load.py failed ({done.returncode}): {done.stderr.strip()[-400:]}"}
        data = json.loads(out.read_text(encoding="utf-8"))
    return {
        "command": " ".join(["python bench/peak_memory_load.py", *(QUICK_PEAK if args.quick else [])]),
        "printed": done.stdout,
        **data,
    }


def peak_memory_rows(peak: dict[str, Any]) -> list[dict[str, Any]]:
    """The peak-memory figures as result rows (target: peak <= base model + 1.5x the adapter file)."""
    rows = []
    for result in peak.get("results", []):
        ratio = result.get("ratio_to_adapter_file")
        rows.append(
            {
                "measure": "peak memory",
                "size": "small" if "--layers" in peak.get("command", "") else "medium",
                "method": "lora",
                "variant": f"load: {result['loader']}",
                "seconds": {},
                "errors": {},
                "ratios": {},
                "ratio_iqr": {},
                "samples": {},
                "note": "peak RSS during load minus RSS before, in adapter-file sizes",
                "peak_delta_mib": result.get("peak_delta_bytes", 0) / 2**20,
                "targets": [
                    {
                        "label": "peak memory while loading <= base + 1.5x adapter file (peak-base in file sizes)",
                        "value": ratio,
                        "limit": 1.5,
                        "met": None if ratio is None else ratio <= 1.5,
                        "detail": f"{result.get('peak_delta_bytes', 0) / 2**20:.1f} MiB over the base model",
                    }
                ]
                if result["loader"] == "adapterkit"
                else [],
            }
        )
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    import adapterkit
    import measures
    from systems import DRIVERS
    from workload import SIZES, build_base, make_workdir, param_count, write_adapters

    installed = set(adapterkit.available_methods())
    methods, skipped = [], {}
    for method in args.methods:
        if method in installed:
            methods.append(method)
        else:
            skipped[method] = f"plugin {PLUGINS.get(method, method)} is not installed; {method} skipped"
            log(skipped[method])
    rows: list[dict[str, Any]] = []
    sections: list[dict[str, Any]] = []
    workdir = make_workdir()
    try:
        for size_name in args.sizes:
            size = SIZES[size_name]
            start = time.perf_counter()
            base = build_base(size)
            log(
                f"{size_name}: {size.describe()} ({param_count(base) / 1e6:.0f}M parameters), built in "
                f"{time.perf_counter() - start:.1f} s"
            )
            drivers = {key: cls(base) for key, cls in DRIVERS.items()}
            gc.collect()
            gc.freeze()  # the base models' objects belong to no system: keep them out of every later collection
            for method in methods:
                plan = _plan(args, size_name, method)
                if not plan:
                    continue
                folders = write_adapters(base, method, count=8 if method == "lora" else 2, root=workdir / size_name)
                ctx = measures.Context(size, method, base, drivers, folders, rounds=args.rounds, n_many=args.adapters)
                for measure, options in plan.items():
                    start = time.perf_counter()
                    try:
                        produced = getattr(measures, f"measure_{measure}")(ctx, **options)
                    except Exception as exc:  # noqa: BLE001 (reported; the other measures still run)
                        log(f"{size_name} {method} {measure} failed: {type(exc).__name__}: {exc}")
                        sections.append({"size": size_name, "method": method, "measure": measure, "error": repr(exc)})
                        ctx.reset()
                        continue
                    elapsed = time.perf_counter() - start
                    sections.append({"size": size_name, "method": method, "measure": measure, "seconds": elapsed})
                    log(f"{size_name} {method} {measure}: {elapsed:.0f} s")
                    rows.extend(produced)
                for folder in folders:
                    shutil.rmtree(folder, ignore_errors=True)
            gc.unfreeze()
            del drivers, base
            gc.collect()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"rows": rows, "skipped_methods": skipped, "sections": sections}


def _plan(args: argparse.Namespace, size: str, method: str) -> dict[str, dict[str, Any]]:
    """Which measures run for a (size, method), with their options.

    The reference workload (medium) gets everything for LoRA and IA3. The small and large models show how
    costs grow, with LoRA only and without the 100-adapter measures (loading 100 adapters is O(N^2) in peft
    and transformers; on the medium model it is most of the run), as does AdaLoRA; ``--many-everywhere`` adds
    them (about 20 more minutes). ``--quick`` runs everything on the small model, every method, with few
    adapters and rounds. AdaLoRA: peft and transformers refuse a 2nd trainable AdaLoRA adapter, so its
    training mode has no anchor beyond 1 adapter.
    """
    if not args.quick and size != "medium" and method != "lora":
        return {}
    plan: dict[str, dict[str, Any]] = {"load": {}, "activity": {}, "forward": {}, "mixed": {}}
    if method != "lora":
        plan.pop("mixed")  # peft mixes adapters per sample for LoRA only
    if method == "adalora":
        # 100 AdaLoRA adapters take minutes to load into peft and transformers: only with --many-everywhere.
        plan["activity"] = {"many_modes": ("inference",) if args.many_everywhere or args.quick else ()}
    if size != "medium" and not args.quick:
        plan["activity"] = {"many_modes": ("inference", "training") if args.many_everywhere else ()}
    if size == "large":
        plan.pop("mixed", None)
        plan["forward"] = {"rounds": max(3, args.rounds - 3)}
    return {k: v for k, v in plan.items() if k in args.measures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small model, 6 adapters, 2 rounds")
    parser.add_argument("--sizes", nargs="+", choices=("small", "medium", "large"))
    parser.add_argument("--methods", nargs="+", default=["lora", "ia3", "adalora"])
    parser.add_argument("--measures", nargs="+", choices=MEASURES, default=list(MEASURES))
    parser.add_argument(
        "--many-everywhere",
        action="store_true",
        help="also the 100-adapter measures for AdaLoRA and the small and large models (about 20 more minutes)",
    )
    parser.add_argument("--rounds", type=int, help="timed rounds per measure (after one warm-up round)")
    parser.add_argument("--adapters", type=int, help="adapters loaded for the 'many adapters' measures (default 100)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine a 2-thread forward has 10x outliers; 0 = torch's choice)",
    )
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/<timestamp>.json)")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or (["small"] if args.quick else ["small", "medium", "large"])
    args.rounds = args.rounds or (2 if args.quick else 7)
    args.adapters = args.adapters or (6 if args.quick else 100)

    versions = check_environment()
    quiet_transformers()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import report

    info = machine_info()
    started = time.perf_counter()
    log(f"versions: {versions}")
    log(f"machine: {info['cpu']}, {info['usable_cores']} usable cores, torch threads {info['torch_threads']}")
    result = run(args)
    result["peak_memory"] = peak_memory(args) if "peak" in args.measures else {"skipped": "not requested"}
    result["rows"].extend(peak_memory_rows(result["peak_memory"]))
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    total = time.perf_counter() - started
    data = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else " ".join(argv),
        "settings": {
            "quick": args.quick,
            "many_everywhere": args.many_everywhere,
            "threads": args.threads,
            "sizes": args.sizes,
            "methods": args.methods,
            "rounds": args.rounds,
            "adapters": args.adapters,
        },
        "versions": versions,
        "machine": info,
        "total_seconds": total,
        **result,
    }
    out = args.out or HERE / "results" / f"{datetime.datetime.now():%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")

    print()
    print(
        f"adapterkit {versions['adapterkit']} vs peft {versions['peft']} (PeftModel) vs transformers "
        f"{versions['transformers']} (PeftAdapterMixin); torch {versions['torch']}"
    )
    print(
        f"machine: {info['cpu']}; {info['usable_cores']} cores; torch threads {info['torch_threads']}; "
        f"load average {info['load_average_start']} -> {info['load_average_end']}"
    )
    print("times: medians over rounds; ratios: medians of per-round paired ratios (same round, interleaved)")
    print()
    report.mark_noise(result["rows"])
    print(report.rows_table(result["rows"], markdown=False))
    print()
    print("Targets")
    print(report.targets_table(result["rows"], markdown=False))
    for reason in result["skipped_methods"].values():
        print(f"skipped: {reason}")
    pm = result["peak_memory"]
    print("peak memory while loading (" + (pm.get("command") or "bench/peak_memory_load.py") + "):")
    print(pm.get("skipped") or pm.get("printed", "").rstrip())
    errors = report.errors_text(result["rows"])
    if errors:
        print("errors (recorded, not fatal):\n" + errors)
    print(f"\nwrote {out} ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
