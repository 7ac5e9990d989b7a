"""Peak memory of loading a LoRA adapter into a large model: adapterkit vs peft.

Loading should never materialise weights it is about to overwrite: adapterkit
injects the adapter on the meta device and assigns the file's tensors. The
target is a peak of at most *base model + 1.5 x the adapter file*.

Default model: Llama, hidden 1024, intermediate 2816, 16 layers, vocab 32000
(271M parameters, 1.08 GB in float32); LoRA r=16 on all 7 projections
(5.0M parameters, 20 MB file). Each loader runs in a fresh process that builds
the same base model, then measures the process's peak resident memory (VmHWM,
reset through /proc/self/clear_refs just before loading; a 1 ms sampler where
that is not available) minus its resident memory before loading. Freed heap
is returned to the OS (malloc_trim) before the baseline, so reused free memory
cannot hide an allocation.

    python bench/peak_memory_load.py               # about a minute on 2 idle cores
    python bench/peak_memory_load.py --layers 4    # quicker, smaller
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LOADERS = {
    "adapterkit": "adapterkit.attach(model).load(folder)",
    "peft": "PeftModel.from_pretrained(model, folder)",
    "peft-low-cpu-mem": "PeftModel.from_pretrained(model, folder, low_cpu_mem_usage=True)",
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        vocab_size=args.vocab,
    )


def base_model(args: argparse.Namespace):
    """The base model with every weight written (resident), but without slow random initialisation."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = LlamaForCausalLM(model_config(args)).eval()
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            param.fill_(0.01 * (1 + i % 7))  # touches every page, as loaded weights would
    return model


# -- memory readings ---------------------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _rss() -> int:
    try:
        return _status("VmRSS")
    except (OSError, KeyError):
        import psutil

        return psutil.Process().memory_info().rss


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMeter:
    """Peak RSS over a block: the kernel's high-water mark when it can be reset, else a 1 ms sampler."""

    def __enter__(self):  # returns self
        _trim()
        self.start = _rss()
        self.method = "VmHWM"
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # resets VmHWM to the current RSS
            if _status("VmHWM") > self.start + (8 << 20):
                raise OSError("VmHWM was not reset")
        except (OSError, KeyError):
            self.method = "sampled"
            self._peak, self._stop = self.start, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.method == "VmHWM":
            self.peak = _status("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._peak, _rss())
        self.delta = self.peak - self.start


# -- the processes -----------------------------------------------------------------------------------------
def prepare(args: argparse.Namespace, folder: Path) -> dict:
    import adapterkit
    import torch

    torch.manual_seed(0)
    model = base_model(args)
    adapters = adapterkit.attach(model)
    adapters.add(
        f"lora[r={args.rank}, lora_alpha={2 * args.rank}, target_modules={TARGETS!r}, init_lora_weights=False]"
    )
    adapters.save(folder)
    return {
        "base_bytes": sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" not in n),
        "base_params": sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n),
        "adapter_params": sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n),
        "adapter_file_bytes": (folder / "adapter_model.safetensors").stat().st_size,
    }


def measure(args: argparse.Namespace, loader: str, folder: Path) -> dict:
    import adapterkit  # imported before measuring, like peft
    import torch
    from peft import PeftModel

    torch.set_num_threads(1)
    model = base_model(args)
    started = time.perf_counter()
    with PeakMeter() as meter:
        loaded = eval(
            LOADERS[loader], {"adapterkit": adapterkit, "PeftModel": PeftModel, "model": model, "folder": str(folder)}
        )
    seconds = time.perf_counter() - started
    del loaded  # adapterkit returns the name, peft a wrapper; both changed `model` in place
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    return {
        "loader": loader,
        "peak_delta_bytes": meter.delta,
        "method": meter.method,
        "seconds": seconds,
        "adapter_params": lora,
    }


def worker(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    result = prepare(args, folder) if args.worker == "prepare" else measure(args, args.worker, folder)
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(args: argparse.Namespace, what: str, folder: Path) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", what, "--folder", str(folder)]
    for key in ("hidden", "intermediate", "layers", "vocab", "rank"):
        command += [f"--{key}", str(getattr(args, key))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> int:
    parser = argparse.ArgumentParser(description="peak memory of loading a LoRA adapter: adapterkit vs peft")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--loaders", default=",".join(LOADERS), help=f"comma-separated, from {', '.join(LOADERS)}")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="adapterkit-bench-") as tmp:
        folder = Path(tmp) / "adapter"
        info = run_worker(args, "prepare", folder)
        base, adapter = info["base_bytes"], info["adapter_file_bytes"]
        mb = 1 / 2**20
        print(
            f"base model: {info['base_params'] / 1e6:.0f}M params, {base * mb:.0f} MiB float32; "
            f"LoRA r={args.rank} on {len(TARGETS)} projections x {args.layers} layers: "
            f"{info['adapter_params'] / 1e6:.2f}M params, file {adapter * mb:.1f} MiB"
        )
        print(f"target: peak <= base model + 1.5 x adapter file = {base * mb:.0f} + {1.5 * adapter * mb:.1f} MiB\n")
        print(
            f"{'loader':<18} {'peak - base (MiB)':>18} {'x adapter file':>15} {'peak / target':>14} {'time (s)':>9}  within target"
        )
        results = []
        for loader in args.loaders.split(","):
            result = run_worker(args, loader, folder)
            assert result["adapter_params"] == info["adapter_params"], result
            delta = result["peak_delta_bytes"]
            result.update(
                base_bytes=base,
                adapter_file_bytes=adapter,
                ratio_to_adapter_file=delta / adapter,
                ratio_to_target=(base + delta) / (base + 1.5 * adapter),
                within_target=delta <= 1.5 * adapter,
            )
            results.append(result)
            print(
                f"{loader:<18} {delta * mb:>18.1f} {result['ratio_to_adapter_file']:>15.2f} "
                f"{result['ratio_to_target']:>14.4f} {result['seconds']:>9.2f}  "
                f"{'yes' if result['within_target'] else 'NO'} ({result['method']})"
            )
    print(
        f"\n(peak - base: the loading process's peak resident memory minus its resident memory before loading; "
        f"total {time.perf_counter() - started:.0f}s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"model": info, "results": results}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
