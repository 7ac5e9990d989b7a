"""Prototype (not adapterkit code): how fast can a saved LoRA adapter be loaded, on peft's layer classes?

adapterkit's load goes through peft's tuner (``LoraModel(model, config, low_cpu_mem_usage=True)``):
target matching over every module, ``nn.Linear`` construction whose ``reset_parameters``
runs kaiming init on meta tensors through Python decompositions, then
``_mark_only_adapters_as_trainable`` / ``set_adapter`` / prefix scans that walk every
module and parameter of the model (which grow with every adapter loaded). This
prototype builds the same layers directly:

* targets are found once per model by walking the base modules only (adapter
  internals skipped) and cached;
* a target that is not wrapped yet gets ``peft.tuners.lora.Linear(base, name, config, ...)``
  built under ``torch.device("meta")`` and transformers' ``no_init_weights()``;
* a target that already holds LoRA adapters gets the new adapter's entries
  (``lora_A``/``lora_B`` Linear modules built around the file's tensors, ``r``,
  ``lora_alpha``, ``scaling``, dropout) without ``update_layer`` (which toggles
  requires_grad and device-checks every adapter of the layer);
* the file's tensors are assigned (no copy), frozen; the new adapter is made active.

It then times, interleaved: this direct load vs ``adapterkit.load`` vs
``PeftModel.from_pretrained`` for the 1st adapter, and the 2nd vs the (N+1)th load,
and checks that outputs equal adapterkit's.

    python bench/prototypes/fast_load.py [--size medium] [--adapters 100] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_TARGETS = "_proto_lora_targets"


def _targets(model, suffixes: set[str]) -> dict[str, tuple]:
    """{path: (parent, attr)} of the modules whose name ends in one of ``suffixes``; adapter internals skipped."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    cache = model.__dict__.setdefault(_TARGETS, {})
    key = frozenset(suffixes)
    if key not in cache:
        found, stack = {}, [(model, "")]
        while stack:
            module, path = stack.pop()
            for attr, child in module._modules.items():
                if child is None:
                    continue
                if isinstance(module, BaseTunerLayer) and attr != "base_layer":
                    continue
                child_path = path if attr == "base_layer" else (f"{path}.{attr}" if path else attr)
                if attr in suffixes and attr != "base_layer":
                    found[child_path] = (module, attr)
                stack.append((child, child_path))
        cache[key] = found
    return cache[key]


def _linear(weight):
    from torch import nn

    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = weight.shape[1], weight.shape[0]
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.register_parameter("bias", None)
    return layer


def direct_load(model, folder: Path, name: str) -> None:
    import torch
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear
    from safetensors.torch import load_file
    from torch import nn
    from transformers.initialization import no_init_weights

    config = LoraConfig(
        **{
            k: v
            for k, v in json.loads((folder / "adapter_config.json").read_text()).items()
            if k in LoraConfig.__dataclass_fields__
        }
    )
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    prefix = "base_model.model."
    suffixes = set(config.target_modules)
    r, alpha = config.r, config.lora_alpha
    scaling = alpha / (r**0.5 if config.use_rslora else r)
    layers = []
    for path, (parent, attr) in _targets(model, suffixes).items():
        a = tensors[f"{prefix}{path}.lora_A.weight"]
        b = tensors[f"{prefix}{path}.lora_B.weight"]
        current = parent._modules[attr]
        if isinstance(current, LoraLinear):
            current.r[name], current.lora_alpha[name], current.scaling[name] = r, alpha, scaling
            current.lora_dropout[name] = nn.Identity()
            current.lora_A[name], current.lora_B[name] = _linear(a), _linear(b)
            current.use_dora[name] = False
            current.lora_bias[name] = False
            layer = current
        else:
            with torch.device("meta"), no_init_weights():
                layer = LoraLinear(current, name, config, r=r, lora_alpha=alpha)
            layer.lora_A[name], layer.lora_B[name] = _linear(a), _linear(b)
            parent._modules[attr] = layer
        layers.append(layer)
    active = [name]
    for layer in layers:
        layer.__dict__["_active_adapter"] = active


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium")
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import run as bench_run
    import torch
    from peft.tuners.lora import Linear as LoraLinear
    from systems import AdapterkitDriver, PeftDriver, _restore_children, _snapshot_children
    from timing import Case, interleaved
    from workload import SIZES, build_base, clone, input_ids, make_workdir, write_adapters

    bench_run.quiet_transformers()
    torch.set_num_threads(1)
    size = SIZES[args.size]
    base = build_base(size)
    folders = write_adapters(base, "lora", count=2, root=make_workdir())
    ak, peft = AdapterkitDriver(base), PeftDriver(base)
    proto = clone(base)
    for p in proto.parameters():
        p.requires_grad_(False)
    tree = _snapshot_children(proto)

    def proto_reset() -> None:
        _restore_children(tree)

    # Correctness: same outputs as adapterkit's load.
    ids = input_ids(size, 1, 16)
    ak.load(folders[0], "x")
    direct_load(proto, folders[0], "x")
    with torch.no_grad():
        diff = float((ak.forward(ids) - proto(input_ids=ids, use_cache=False).logits).abs().max())
    ak.reset()
    proto_reset()
    print(f"{size.name}: {size.describe()}; max |direct - adapterkit| = {diff:.1e}")

    first = interleaved(
        [
            Case("direct", lambda: direct_load(proto, folders[0], "x"), teardown=proto_reset),
            Case("adapterkit", lambda: ak.load(folders[0], "x"), teardown=ak.reset),
            Case("peft", lambda: peft.load(folders[0], "x"), teardown=peft.reset),
        ],
        args.rounds,
    )

    def probe(count: int):
        return interleaved(
            [
                Case(
                    "direct",
                    lambda: direct_load(proto, folders[1], "probe"),
                    teardown=lambda: [m.lora_A.pop("probe") for m in proto.modules() if isinstance(m, LoraLinear)],
                ),
                Case("adapterkit", lambda: ak.load(folders[1], "probe"), teardown=lambda: ak.delete("probe")),
            ],
            args.rounds,
        )

    direct_load(proto, folders[0], "a0")
    ak.load(folders[0], "a0")
    second = probe(1)
    for i in range(1, args.adapters):
        direct_load(proto, folders[i % 2], f"a{i}")
        ak.load(folders[i % 2], f"a{i}")
    nth = probe(args.adapters)
    ms = lambda t, k: f"{1e3 * t.median(k):.1f} ms"
    print(
        f"1st load: direct {ms(first, 'direct')}, adapterkit {ms(first, 'adapterkit')}, peft from_pretrained "
        f"{ms(first, 'peft')}; direct/peft {first.ratio('direct', 'peft'):.2f}x, "
        f"direct/adapterkit {first.ratio('direct', 'adapterkit'):.2f}x"
    )
    print(f"2nd load: direct {ms(second, 'direct')}, adapterkit {ms(second, 'adapterkit')}")
    print(
        f"{args.adapters + 1}th load: direct {ms(nth, 'direct')}, adapterkit {ms(nth, 'adapterkit')}; growth "
        f"direct {nth.median('direct') / second.median('direct'):.2f}x, "
        f"adapterkit {nth.median('adapterkit') / second.median('adapterkit'):.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
