"""Placing a model that carries adapters on devices, with accelerate.

:func:`dispatch` is what the ``adapterkit_dispatch`` hook runs. It differs from
calling ``accelerate.dispatch_model`` directly in four ways, all because
adapters change a model after it may already have been placed:

* **Names move.** peft-style wrappers keep the layer they adapt as
  ``base_layer``: ``q_proj.weight`` becomes ``q_proj.base_layer.weight``. An
  explicit device map written for the base model (or a model's old
  ``hf_device_map``) is translated by following those ``base_layer`` hops.
* **Wrappers stay whole.** A wrapper and the layer it wraps always get one
  device, so adapter weights land where the base layer is. Wrapper classes are
  added to the no-split classes of ``"auto"`` maps and to accelerate's
  ``preload_module_classes``, so an offloaded wrapper loads its base weights and
  its adapter weights together before its forward (DoRA and IA3 read weights
  without calling the submodule that owns them).
* **Already dispatched models.** accelerate's hooks are removed before
  re-dispatching. Tensors those hooks had offloaded (on the meta device in the
  model) are read back from the hooks' own weight maps, found by module
  identity, so renamed ones are found too. Nothing is restored under the old
  names (accelerate's own hook removal would try, and fail for wrapped layers).
* **Disk offload includes the adapters.** Every tensor of a module mapped to
  ``"disk"``, adapter weights included, is written to ``offload_folder`` under
  its current name (weights already stored there, or in a safetensors file,
  under the same name are reused, not copied), and accelerate's hooks load them
  at forward time on the execution device.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.hooks import AlignDevicesHook, SequentialHook, add_hook_to_module, remove_hook_from_submodules
from accelerate.utils import (
    OffloadedWeightsLoader,
    PrefixedDataset,
    check_device_map,
    get_balanced_memory,
    get_max_memory,
    named_module_tensors,
    offload_weight,
    save_offload_index,
)
from adapterkit import AdapterkitError
from torch import nn

__all__ = ["DEVICE_MAP_STRINGS", "DispatchError", "dispatch", "resolve"]

DEVICE_MAP_STRINGS = ("auto", "balanced", "balanced_low_0", "sequential")
WRAPPED = "base_layer"
"""The attribute under which an adapter wrapper keeps the layer it adapts (peft's convention)."""


class DispatchError(AdapterkitError, ValueError):
    """A device map, memory limit or offload setting that cannot place this model."""


# -- the model's tensors ---------------------------------------------------------------------------
@dataclass
class _Tensor:
    """One tensor object and every place it is registered (tied weights have several)."""

    value: torch.Tensor
    is_param: bool
    names: list[str] = field(default_factory=list)
    slots: list[tuple[nn.Module, str]] = field(default_factory=list)

    def replace(self, value: torch.Tensor) -> None:
        """Register ``value`` in every slot of this tensor (one new object, so ties survive)."""
        new: torch.Tensor = nn.Parameter(value, requires_grad=self.value.requires_grad) if self.is_param else value
        for module, leaf in self.slots:
            (module._parameters if self.is_param else module._buffers)[leaf] = new
        self.value = new


def _tensors(model: nn.Module) -> dict[int, _Tensor]:
    found: dict[int, _Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for is_param, table in ((True, module._parameters), (False, module._buffers)):
            for leaf, tensor in table.items():
                if tensor is None:
                    continue
                entry = found.setdefault(id(tensor), _Tensor(tensor, is_param))
                name = f"{module_name}.{leaf}" if module_name else leaf
                if name not in entry.names:
                    entry.names.append(name)
                    entry.slots.append((module, leaf))
    return found


def resolve(root: nn.Module, path: str) -> tuple[nn.Module, str | None, str]:
    """Follow ``path`` from ``root``, stepping into ``base_layer`` where a name is not found.

    So a name written for the model before adapters were added
    (``model.layers.0.self_attn.q_proj.weight``) finds the same tensor after
    (``...q_proj.base_layer.weight``), and a ``base_layer`` hop whose wrapper
    was removed since is skipped. Returns ``(module, tensor name or None,
    current path)``; raises ``KeyError`` when the path leads nowhere.
    """
    module, current = root, []
    parts = path.split(".") if path else []
    i = 0
    while i < len(parts):
        part = parts[i]
        child = module._modules.get(part)
        if child is not None:
            module, i = child, i + 1
            current.append(part)
        elif i == len(parts) - 1 and (
            module._parameters.get(part) is not None or module._buffers.get(part) is not None
        ):
            return module, part, ".".join([*current, part])
        elif module._modules.get(WRAPPED) is not None:
            module = module._modules[WRAPPED]
            current.append(WRAPPED)
        elif part == WRAPPED:
            i += 1  # the wrapper is gone (its adapters were deleted): the name now means the layer itself
        else:
            raise KeyError(path)
    return module, None, ".".join(current)


def _tensor_at(module: nn.Module, leaf: str) -> torch.Tensor | None:
    tensor = module._parameters.get(leaf)
    return module._buffers.get(leaf) if tensor is None else tensor


# -- where offloaded tensors can be read back from -------------------------------------------------
@dataclass
class _Source:
    """A tensor's value in a (lazy) weights mapping: an old hook's weights map or a user's offload index."""

    mapping: Mapping[str, torch.Tensor]
    key: str

    def load(self) -> torch.Tensor:
        return self.mapping[self.key]

    def stored(self) -> tuple[str | None, str, dict[str, Any]] | None:
        """``(folder, key, index entry)`` when the value is a file on disk, else ``None``."""
        mapping, key = self.mapping, self.key
        if isinstance(mapping, PrefixedDataset):
            mapping, key = mapping.dataset, mapping.prefix + key
        if isinstance(mapping, OffloadedWeightsLoader) and key not in mapping.state_dict and key in mapping.index:
            folder = None if mapping.save_folder is None else os.fspath(mapping.save_folder)
            return folder, key, mapping.index[key]
        return None

    def dat_path(self) -> str | None:
        stored = self.stored()
        if stored is None or stored[2].get("safetensors_file") is not None or stored[0] is None:
            return None
        return os.path.realpath(os.path.join(stored[0], f"{stored[1]}.dat"))


def _align_hooks(module: nn.Module) -> list[AlignDevicesHook]:
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def _sources(
    model: nn.Module, offload_folder: str | None, offload_index: Mapping[str, Any] | None
) -> dict[int, _Source]:
    """For every tensor on the meta device, where its value is: accelerate's hooks first, then ``offload_index``."""
    sources: dict[int, _Source] = {}

    def claim(owner: nn.Module, leaf: str | None, source: _Source) -> None:
        tensor = None if leaf is None else _tensor_at(owner, leaf)
        if tensor is not None and tensor.is_meta:
            sources.setdefault(id(tensor), source)

    for module in model.modules():
        for hook in _align_hooks(module):
            if not hook.offload or hook.weights_map is None:
                continue
            # original_devices holds the names the hook offloaded, relative to its module, as they
            # were when it was attached; resolve() finds them again if a wrapper moved them.
            for rel in getattr(hook, "original_devices", {}):
                try:
                    owner, leaf, _ = resolve(module, rel)
                except KeyError:
                    continue
                # (membership in a PrefixedDataset would read the tensor: don't ask it)
                if isinstance(hook.weights_map, PrefixedDataset) or rel in hook.weights_map:
                    claim(owner, leaf, _Source(hook.weights_map, rel))
    indexes: list[OffloadedWeightsLoader] = []
    if offload_index:
        indexes.append(OffloadedWeightsLoader(save_folder=offload_folder, index=dict(offload_index)))
    if offload_folder is not None and os.path.isfile(os.path.join(offload_folder, "index.json")):
        # Last resort: what an earlier dispatch wrote to this folder. Needed when the module whose hook
        # knew a tensor left the model (delete() unwraps a layer, and the wrapper took its hook along).
        indexes.append(OffloadedWeightsLoader(save_folder=offload_folder))
    for loader in indexes:
        for key, info in loader.index.items():
            try:
                owner, leaf, _ = resolve(model, key)
            except KeyError:
                continue
            tensor = None if leaf is None else _tensor_at(owner, leaf)
            if tensor is not None and "shape" in info and tuple(info["shape"]) != tuple(tensor.shape):
                continue
            claim(owner, leaf, _Source(loader, key))
    return sources


def _remove_hooks(model: nn.Module) -> None:
    for module in model.modules():
        for hook in _align_hooks(module):
            if hook.offload:
                # detach_hook would set tensors back under the names they had when the hook was
                # attached; a wrapper added since makes those names invalid. We restore them ourselves.
                hook.original_devices = {}
    remove_hook_from_submodules(model)


# -- device maps -------------------------------------------------------------------------------------
def _wrappers(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost adapter wrappers (modules holding a ``base_layer``), by name."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if module._modules.get(WRAPPED) is None:
            continue
        parts = name.split(".")
        if not any(".".join(parts[:i]) in found for i in range(1, len(parts))):
            found[name] = module
    return found


def _device_of(name: str, device_map: Mapping[str, Any]) -> Any:
    """The device ``device_map`` gives tensor or module ``name`` (longest matching prefix); ``None`` if none."""
    while True:
        if name in device_map:
            return device_map[name]
        if not name:
            return None
        name = name.rpartition(".")[0]


def _translate(model: nn.Module, device_map: Mapping[str, Any]) -> dict[str, Any]:
    translated: dict[str, Any] = {}
    for key, device in device_map.items():
        if not isinstance(key, str):
            raise DispatchError(f"device_map keys are module names (str), got {key!r}")
        try:
            _, _, current = resolve(model, key)
        except KeyError:
            raise DispatchError(
                f"device_map key {key!r} names no module or tensor of the model; "
                "use module names as in model.named_modules() (names from before adapters were added work too)"
            ) from None
        translated[current] = str(device) if isinstance(device, torch.device) else device
    return translated


def _keep_wrappers_whole(
    device_map: dict[str, Any], wrappers: Mapping[str, nn.Module], names: list[str]
) -> dict[str, Any]:
    """Give each wrapper the one device of the layer it wraps, whatever the map says about its parts."""
    for wrapper in wrappers:
        inner = [key for key in device_map if key.startswith(wrapper + ".")]
        if not inner:
            continue  # the wrapper is placed as a whole by itself or an ancestor
        base = f"{wrapper}.{WRAPPED}."
        devices = {_device_of(name, device_map) for name in names if name.startswith(base)}
        if len(devices) != 1 or None in devices:
            raise DispatchError(
                f"device_map places parts of the adapted layer {wrapper!r} on different devices "
                f"({sorted(map(str, devices))}); map {wrapper!r} as a whole so its adapters sit with it"
            )
        (device,) = devices
        rebuilt: dict[str, Any] = {}
        for key, value in device_map.items():
            if key in inner or key == wrapper:
                if wrapper not in rebuilt:
                    rebuilt[wrapper] = device
            else:
                rebuilt[key] = value
        device_map = rebuilt
    return device_map


def _infer(model: nn.Module, kind: str, max_memory: dict[Any, Any] | None, no_split: list[str]) -> dict[str, Any]:
    if kind == "sequential":
        max_memory = get_max_memory(max_memory)
    else:
        # "auto" is "balanced", as in transformers.
        max_memory = get_balanced_memory(
            model, max_memory=max_memory, no_split_module_classes=no_split, low_zero=kind == "balanced_low_0"
        )
    return dict(infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split))


# -- the dispatch ------------------------------------------------------------------------------------
def dispatch(
    model: nn.Module,
    device_map: str | Mapping[str, Any] = "auto",
    *,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    offload_index: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Place ``model``, adapters included, with accelerate; return the device map used.

    ``device_map`` is ``"auto"``/``"balanced"`` (spread evenly over the GPUs,
    then CPU, then disk), ``"balanced_low_0"`` (keep GPU 0 light),
    ``"sequential"`` (fill GPU 0, then 1, ..., then CPU, then disk), or an
    explicit ``{module name: device}`` dict (devices: an index or ``"cuda:1"``,
    ``"cpu"``, ``"disk"``). ``max_memory`` caps what each device may hold
    (``{0: "10GiB", "cpu": "30GiB"}``). ``offload_folder`` is needed when
    anything goes to ``"disk"``; ``offload_index`` describes tensors already
    stored on disk (as accelerate or transformers write it) for tensors that
    are on the meta device in ``model``.

    Works on a model that is already dispatched (hooks attached,
    ``hf_device_map`` set): the old placement is undone first. Raises
    :class:`DispatchError` before changing anything when the map is invalid
    or a tensor on the meta device has no stored value to load.
    """
    # 1. Check everything and work out the map; nothing is changed until the map is known to work.
    wrappers = _wrappers(model)
    wrapper_classes = sorted({type(module).__name__ for module in wrappers.values()})
    no_split = sorted(set(getattr(model, "_no_split_modules", None) or ()) | set(wrapper_classes))
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRINGS:
            raise DispatchError(f"device_map={device_map!r} is not one of {', '.join(DEVICE_MAP_STRINGS)} or a dict")
        try:
            device_map = _infer(model, device_map, max_memory, no_split)
        except ValueError as exc:
            raise DispatchError(f"cannot build a device map: {exc}") from exc
    elif isinstance(device_map, Mapping):
        if not device_map:
            raise DispatchError("device_map is empty; map at least '' (the whole model) to a device")
        device_map = _translate(model, device_map)
    else:
        raise DispatchError(f"device_map must be one of {', '.join(DEVICE_MAP_STRINGS)} or a dict, got {device_map!r}")
    tensors = _tensors(model)
    all_names = [name for entry in tensors.values() for name in entry.names]
    device_map = _keep_wrappers_whole(device_map, wrappers, all_names)
    try:
        check_device_map(model, device_map)
    except ValueError as exc:
        raise DispatchError(f"device_map does not cover the model: {exc}") from None
    to_disk = "disk" in set(device_map.values())
    if to_disk and offload_folder is None:
        disk = [key for key, value in device_map.items() if value == "disk"]
        raise DispatchError(f"device_map sends {disk} to 'disk'; pass offload_folder= (a folder for their weights)")
    folder = None if offload_folder is None else os.fspath(offload_folder)
    sources = _sources(model, folder, offload_index)
    lost = [entry.names[0] for key, entry in tensors.items() if entry.value.is_meta and key not in sources]
    if lost:
        more = f" (+{len(lost) - 5} more)" if len(lost) > 5 else ""
        raise DispatchError(
            f"{len(lost)} tensors are on the meta device with no stored copy to load them from: "
            f"{', '.join(lost[:5])}{more}. An adapter created on a layer that was already offloaded to disk has no "
            "weights; add or load adapters before dispatching an offloaded model, or pass the offload_index "
            "and offload_folder that hold these tensors"
        )

    # 2. Undo the old placement and lay the tensors out for the new one.
    _remove_hooks(model)
    index: dict[str, Any] = {}
    if to_disk:
        assert folder is not None
        os.makedirs(folder, exist_ok=True)
    cache: dict[int, torch.Tensor] = {}
    writes: list[tuple[int, str]] = []
    for key, entry in tensors.items():
        disk_names = [name for name in entry.names if _device_of(name, device_map) == "disk"]
        source = sources.get(key) if entry.value.is_meta else None
        stored = None if source is None else source.stored()
        for name in disk_names:
            if not entry.is_param:
                continue  # accelerate keeps buffers on the execution device unless offload_buffers
            if stored is not None and stored[2].get("safetensors_file") is not None:
                index[name] = {**stored[2], "weight_name": stored[2].get("weight_name", stored[1])}
            elif stored is not None and stored[0] is not None and stored[1] == name and _same_dir(stored[0], folder):
                index[name] = dict(stored[2])
            else:
                writes.append((key, name))
    # A write may replace a file that still holds another tensor's value: read those first.
    read_from = {path: key for key, src in sources.items() if (path := src.dat_path()) is not None}
    for key, name in writes:
        other = read_from.get(os.path.realpath(os.path.join(folder or "", f"{name}.dat")))
        if other is not None and other != key and other not in cache:
            cache[other] = sources[other].load().to("cpu")
    for key, name in writes:
        entry = tensors[key]
        value = entry.value if not entry.value.is_meta else cache.get(key)
        if value is None:
            value = sources[key].load()
        offload_weight(value.detach().to(entry.value.dtype), name, folder, index=index)
    for key, entry in tensors.items():
        if not entry.value.is_meta:
            continue
        on_disk = all(_device_of(name, device_map) == "disk" for name in entry.names) and entry.is_param
        if not on_disk:
            value = cache.pop(key, None)
            value = sources[key].load() if value is None else value
            entry.replace(value.detach().to("cpu", entry.value.dtype))
    if index:
        save_offload_index(index, folder)

    # 3. Let accelerate attach its hooks.
    main_device = next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")
    dispatch_model(
        model,
        device_map=device_map,
        main_device=main_device,
        offload_dir=folder if to_disk else None,
        offload_index=index if to_disk else None,
        skip_keys=getattr(model, "_skip_keys_device_placement", None),
        preload_module_classes=wrapper_classes or None,
    )
    _guard_unwrapping(model, wrappers)
    return device_map


class _OffloadedOnceUnwrapped(AlignDevicesHook):
    """The offload hook of a wrapped layer; it sleeps while the wrapper is in the model.

    An offloaded wrapper loads its whole subtree, base layer included, before
    its forward (``preload_module_classes``), so the base layer gets no hook
    of its own. When the core deletes the wrapper's last adapter it puts the
    base layer back in the wrapper's place, and that layer would then compute
    with weights on the meta device. This hook wakes up then and loads them.
    """

    def __init__(self, parent: nn.Module, attr: str, wrapper: nn.Module, **kwargs: Any) -> None:
        super().__init__(offload=True, place_submodules=True, **kwargs)
        self._parent, self._attr, self._wrapper = weakref.ref(parent), attr, weakref.ref(wrapper)

    def _awake(self) -> bool:
        parent = self._parent()
        return parent is None or parent._modules.get(self._attr) is not self._wrapper()

    def init_hook(self, module: nn.Module) -> nn.Module:
        # The wrapper's hook has offloaded these tensors already; only record them (all on meta).
        self.original_devices = {name: torch.device("meta") for name, _ in named_module_tensors(module, recurse=True)}
        return module

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return super().pre_forward(module, *args, **kwargs) if self._awake() else (args, kwargs)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        return super().post_forward(module, output) if self._awake() else output


def _guard_unwrapping(model: nn.Module, wrappers: Mapping[str, nn.Module]) -> None:
    modules = dict(model.named_modules())
    for name, wrapper in wrappers.items():
        hooks = [h for h in _align_hooks(wrapper) if h.offload and h.place_submodules and h.weights_map is not None]
        if not hooks or not isinstance(hooks[0].weights_map, PrefixedDataset):
            continue
        hook = hooks[0]
        parent_name, _, attr = name.rpartition(".")
        add_hook_to_module(
            wrapper._modules[WRAPPED],
            _OffloadedOnceUnwrapped(
                modules[parent_name],
                attr,
                wrapper,
                execution_device=hook.execution_device,
                weights_map=PrefixedDataset(hook.weights_map.dataset, f"{name}.{WRAPPED}."),
                offload_buffers=hook.offload_buffers,
                skip_keys=hook.skip_keys,
            ),
        )


def _same_dir(a: str, b: str | None) -> bool:
    return b is not None and os.path.realpath(a) == os.path.realpath(b)
