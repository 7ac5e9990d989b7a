"""Shared glue for adapter methods built on peft's tuner layers.

The built-in LoRA, IA3 and AdaLoRA plugins are each a :class:`PeftMethod`
instance (or a small subclass) naming the peft config, tuner and layer
classes; every hook lives here once. Third parties building on peft (a LoRA
variant, say) can do the same. This module imports peft, so only plugins that
depend on peft import it; the core itself never does.

Layers created by a method are tagged with the method's name, so several peft
methods can share one model without one method's calls touching another's
layers (peft's own helpers act on every ``BaseTunerLayer``). State-dict keys
are built from each layer's *logical* path, the path with the ``base_layer``
hops of other adapters' wrappers removed, so a checkpoint's keys do not depend
on which other adapters sit on the same layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from .errors import ConfigValueError, PerSampleError, StateDictMismatchError, TargetError, UnsupportedOperationError
from .hookspecs import hookimpl

__all__ = ["PeftMethod", "LayerSite", "check_rows", "replaced_forwards"]

TAG = "_adapterkit_method"
_CACHE = "_adapterkit_peft_layers"  # model attribute: {method: [layers]}, {(method, "trainable"): set}
_UNSET = object()


@dataclasses.dataclass(frozen=True)
class LayerSite:
    """An adapter layer, where it sits, and its logical path."""

    logical: str
    parent: nn.Module
    attr: str
    layer: BaseTunerLayer


def _adapter_tensors(layer: BaseTunerLayer, name: str) -> Iterator[tuple[str, nn.Module | nn.ParameterDict, str]]:
    """Yield ``(suffix, owner, leaf)`` for each parameter of adapter ``name`` in ``layer``.

    ``suffix`` is the key below the layer without the adapter name
    (``lora_A.weight``); ``getattr(owner, leaf)`` is the parameter.
    """
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if container is None or name not in container:
            continue
        item = container[name]
        if isinstance(item, nn.Parameter):
            yield attr, container, name
        else:
            for param_name, _ in item.named_parameters():
                *path, leaf = param_name.split(".")
                owner = item.get_submodule(".".join(path)) if path else item
                yield f"{attr}.{param_name}", owner, leaf


def _has(layer: BaseTunerLayer, name: str) -> bool:
    return any(name in getattr(layer, attr, ()) for attr in layer.adapter_layer_names)


def _is_empty(layer: BaseTunerLayer) -> bool:
    return not any(len(getattr(layer, attr, ())) for attr in layer.adapter_layer_names)


def _offloaded(layer: BaseTunerLayer) -> bool:
    """Whether the layer's base weight is on the meta device (offloaded to CPU or disk by accelerate)."""
    weight = getattr(layer.get_base_layer(), "weight", None)
    return isinstance(weight, torch.Tensor) and weight.is_meta


def check_rows(rows: Sequence[str], batch: int) -> None:
    """Raise :class:`PerSampleError` unless there is one row name per batch row."""
    if batch != len(rows):
        raise PerSampleError(
            f"per_sample was given {len(rows)} row names but the batch has {batch} rows; "
            "pass one adapter name (or '__base__') per row"
        )


@contextlib.contextmanager
def replaced_forwards(layers: Sequence[nn.Module], make_forward: Any) -> Iterator[None]:
    """Shadow each layer's ``forward`` with ``make_forward(layer)`` inside the block (per-sample routing).

    A layer hooked by accelerate keeps its own forward as ``_old_forward`` and
    calls it between the hook's pre- and post-forward (which load offloaded
    weights): that one is replaced, so the hook still runs, and whatever was
    there before is put back on exit.
    """
    replaced: list[tuple[nn.Module, str, Any]] = []
    try:
        for layer in layers:
            attr = "_old_forward" if "_old_forward" in layer.__dict__ else "forward"
            replaced.append((layer, attr, layer.__dict__.get(attr, _UNSET)))
            # An instance attribute shadows the class's forward for this layer only, until restored below.
            layer.__dict__[attr] = make_forward(layer)
        yield
    finally:
        for layer, attr, previous in reversed(replaced):
            if previous is _UNSET:
                layer.__dict__.pop(attr, None)
            else:
                layer.__dict__[attr] = previous


class PeftMethod:
    """An adapterkit plugin for one peft tuner method.

    :param name: the method name users write (``"lora"``).
    :param config_type: peft config class (``LoraConfig``).
    :param tuner_type: peft tuner class that injects layers (``LoraModel``).
    :param aliases: further names, typically peft's ``peft_type`` (``"LORA"``).
    :param description: one line for ``adapterkit methods``.
    """

    def __init__(
        self,
        name: str,
        config_type: type,
        tuner_type: type,
        *,
        aliases: Sequence[str] = (),
        description: str = "",
    ) -> None:
        self.name = name
        self.config_type = config_type
        self.tuner_type = tuner_type
        self.aliases = tuple(aliases)
        self.description = description

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # -- layer bookkeeping ----------------------------------------------------
    def sites(self, model: nn.Module, name: str | None = None) -> list[LayerSite]:
        """This method's layers in ``model`` (holding adapter ``name`` if given), with logical paths."""
        found: list[LayerSite] = []
        stack: list[tuple[nn.Module, str]] = [(model, "")]
        while stack:
            module, logical = stack.pop()
            wrapper = isinstance(module, BaseTunerLayer)
            for attr, child in module._modules.items():
                if child is None:
                    continue
                if wrapper and attr in module.adapter_layer_names:
                    continue  # adapter internals hold no further layers
                path = logical if (wrapper and attr == "base_layer") else (f"{logical}.{attr}" if logical else attr)
                if getattr(child, TAG, None) == self.name and (name is None or _has(child, name)):
                    found.append(LayerSite(path, module, attr, child))
                stack.append((child, path))
        found.sort(key=lambda site: site.logical)
        return found

    def layers(self, model: nn.Module) -> list[BaseTunerLayer]:
        """This method's layers in ``model`` (cached on the model; inject and delete refresh it)."""
        cache = model.__dict__.setdefault(_CACHE, {})
        found = cache.get(self.name)
        if found is None:
            found = cache[self.name] = [m for m in model.modules() if getattr(m, TAG, None) == self.name]
        return found

    def forget(self, model: nn.Module) -> None:
        """Drop what :meth:`layers` and :meth:`adapterkit_set_active` remember: the layers changed."""
        cache = model.__dict__.get(_CACHE, {})
        cache.pop(self.name, None)
        cache.pop((self.name, "trainable"), None)

    # -- registration and configs -----------------------------------------------
    @hookimpl
    def adapterkit_register_methods(self, register: Any) -> None:
        register(self.name, self.config_type, aliases=self.aliases, description=self.description)

    @hookimpl
    def adapterkit_config_from_dict(self, method: str, data: dict[str, Any]) -> Any:
        fields = {f.name for f in dataclasses.fields(self.config_type) if f.init}
        unknown = sorted(set(data) - fields)
        if unknown:
            # peft does the same for configs written by newer versions.
            warnings.warn(f"ignoring {method} config keys unknown to this peft version: {unknown}", stacklevel=2)
        return self.config_type(**{k: v for k, v in data.items() if k in fields})

    @hookimpl
    def adapterkit_config_to_dict(self, method: str, config: Any) -> dict[str, Any]:
        # What peft's PeftConfig.save_pretrained writes: the dataclass fields, sets as lists.
        return json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))

    @hookimpl
    def adapterkit_validate_config(self, method: str, config: Any) -> None:
        r = getattr(config, "r", None)
        if r is not None and (not isinstance(r, int) or r <= 0):
            raise ConfigValueError(f"{method} config key 'r' must be a positive integer, got {r!r}")
        targets = getattr(config, "target_modules", None)
        for key in ("target_modules", "exclude_modules"):
            pattern = getattr(config, key, None)
            if isinstance(pattern, str):  # peft matches a string with re.fullmatch
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigValueError(
                        f"{method} config key {key!r}={pattern!r} is not a valid regular expression ({exc}); "
                        "fix the pattern or pass a list of module names"
                    ) from None
        if targets is not None and not isinstance(targets, str) and len(targets) == 0:
            raise ConfigValueError(
                f"{method} config key 'target_modules' is empty; name modules, e.g. target_modules=['q_proj', 'v_proj']"
            )
        for key, default in (("modules_to_save", None), ("trainable_token_indices", None), ("layer_replication", None)):
            value = getattr(config, key, default)
            if value not in (default, [], ()):
                raise ConfigValueError(f"{method} config key {key!r}={value!r} is not supported by adapterkit yet; leave it unset")
        if getattr(config, "target_parameters", None):
            raise ConfigValueError(f"{method} config key 'target_parameters' is not supported by adapterkit yet; use target_modules")
        bias = getattr(config, "bias", "none")
        if bias != "none":
            raise ConfigValueError(f"{method} config key 'bias'={bias!r} is not supported (base biases would be saved); use 'none'")

    # -- injection ----------------------------------------------------------------
    @hookimpl
    def adapterkit_inject(self, model: nn.Module, method: str, name: str, config: Any, empty: bool) -> None:
        # peft's tuner retouches layers and the requires_grad of every method's adapters
        cache = model.__dict__.get(_CACHE, {})
        for key in [k for k in cache if isinstance(k, tuple)]:
            del cache[key]
        self.forget(model)
        # Hide an existing model.peft_config (e.g. transformers' mixin's): the tuner would find and extend it.
        previous = model.__dict__.pop("peft_config", _UNSET)
        try:
            # The tuner wraps the targets in place; we keep the layers, not the tuner.
            self.tuner_type(model, config, adapter_name=name, low_cpu_mem_usage=empty)
        except NoMatchingPeftModuleError as exc:
            raise TargetError(f"{method} adapter {name!r}: {exc}") from None
        except ValueError as exc:
            if "not supported" in str(exc) or "Target module" in str(exc):
                raise TargetError(f"{method} adapter {name!r}: {exc}") from None
            raise ConfigValueError(f"{method} adapter {name!r}: {exc}") from None
        except (TypeError, AttributeError, KeyError, re.error) as exc:
            # peft trips over a config value of the wrong type (e.g. rank_pattern={'q_proj': 'x'}).
            raise ConfigValueError(
                f"{method} adapter {name!r}: the config does not fit peft ({type(exc).__name__}: {exc}); "
                "check the types of its values"
            ) from None
        finally:
            # peft leaves model.peft_config behind; adapterkit keeps configs itself.
            model.__dict__.pop("peft_config", None)
            if previous is not _UNSET:
                model.__dict__["peft_config"] = previous
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and not hasattr(module, TAG) and _has(module, name):
                setattr(module, TAG, self.name)
        self.forget(model)

    # -- activity -------------------------------------------------------------------
    @hookimpl
    def adapterkit_set_active(self, model: nn.Module, method: str, names: Sequence[str], trainable: Sequence[str]) -> None:
        names, wanted = list(names), set(trainable)
        cache = model.__dict__.setdefault(_CACHE, {})
        previous = cache.get((self.name, "trainable"))
        # Only adapters whose trainability changes are touched: switching among
        # frozen adapters costs the same with 2 or 100 of them loaded.
        changed = None if previous is None else previous ^ wanted
        layers = self.layers(model)
        for layer in layers:
            # Straight into __dict__: nn.Module.__setattr__ checks three registries per call.
            layer.__dict__["_active_adapter"] = names
        if changed is None or changed:
            for layer in layers:
                for attr in layer.adapter_layer_names:
                    container = getattr(layer, attr, None)
                    if not container:
                        continue
                    keys = container.keys() if changed is None else [k for k in changed if k in container]
                    for key in keys:
                        container[key].requires_grad_(key in wanted)
        cache[(self.name, "trainable")] = wanted

    @hookimpl
    def adapterkit_enable(self, model: nn.Module, method: str) -> None:
        for layer in self.layers(model):
            layer.enable_adapters(True)
        model.__dict__.get(_CACHE, {}).pop((self.name, "trainable"), None)  # peft changed requires_grad

    @hookimpl
    def adapterkit_disable(self, model: nn.Module, method: str) -> None:
        for layer in self.layers(model):
            layer.enable_adapters(False)
        model.__dict__.get(_CACHE, {}).pop((self.name, "trainable"), None)

    # -- state ------------------------------------------------------------------------
    def file_key(self, suffix: str) -> str:
        """The checkpoint key suffix peft uses for a parameter at ``suffix`` (override for renames)."""
        return suffix

    def _expected(self, model: nn.Module, name: str) -> dict[str, tuple[LayerSite, nn.Module, str]]:
        expected = {}
        for site in self.sites(model, name):
            for suffix, owner, leaf in _adapter_tensors(site.layer, name):
                expected[f"{site.logical}.{self.file_key(suffix)}"] = (site, owner, leaf)
        return expected

    @hookimpl
    def adapterkit_extract_state(self, model: nn.Module, method: str, name: str) -> dict[str, torch.Tensor]:
        return {key: getattr(owner, leaf).detach() for key, (_, owner, leaf) in self._expected(model, name).items()}

    @hookimpl
    def adapterkit_load_state(self, model: nn.Module, method: str, name: str, state_dict: dict[str, torch.Tensor]) -> None:
        expected = self._expected(model, name)
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        wrong = [
            f"{key}: checkpoint {tuple(state_dict[key].shape)} vs adapter {tuple(getattr(owner, leaf).shape)}"
            for key, (_, owner, leaf) in expected.items()
            if key in state_dict and state_dict[key].shape != getattr(owner, leaf).shape
        ]
        # Integer tensors would load and silently truncate activations (peft casts the input to the weight's dtype).
        dtypes = [
            f"{key}: {state_dict[key].dtype}"
            for key in expected
            if key in state_dict and not (state_dict[key].is_floating_point() or state_dict[key].is_complex())
        ]
        if missing or unexpected or wrong or dtypes:
            parts = []
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("wrong shapes", wrong),
                ("not floating-point", dtypes),
            ):
                if items:
                    more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                    parts.append(f"{label}: {', '.join(items[:5])}{more}")
            raise StateDictMismatchError(
                f"{method} adapter {name!r}: the checkpoint does not fit the config's layers; {'; '.join(parts)}. "
                "Check that the checkpoint was saved from this base model and matches its adapter_config.json."
            )
        layers = {}
        for key, (site, owner, leaf) in expected.items():
            param = nn.Parameter(state_dict[key], requires_grad=False)
            if isinstance(owner, nn.ParameterDict):
                owner[leaf] = param
            else:
                setattr(owner, leaf, param)
            layers[id(site.layer)] = site.layer
        for layer in layers.values():
            # A base layer offloaded by accelerate has its weight on the meta device; moving the
            # adapter there would drop the file's tensors. Keep them on the CPU, in the layer's
            # dtype, for the dispatch plugin to offload with the layer.
            layer._move_adapter_to_device_of_base_layer(name, device=torch.device("cpu") if _offloaded(layer) else None)
        model.__dict__.get(_CACHE, {}).pop((self.name, "trainable"), None)  # new parameter objects

    # -- merging and deleting ---------------------------------------------------------
    @hookimpl
    def adapterkit_merge(self, model: nn.Module, method: str, names: Sequence[str]) -> None:
        offloaded = [site.logical for n in names for site in self.sites(model, n) if _offloaded(site.layer)]
        if offloaded:
            raise UnsupportedOperationError(
                f"cannot merge into layers offloaded by accelerate (weights on the meta device): {sorted(set(offloaded))[:5]}; "
                "merge before dispatching, or dispatch the model to one device first"
            )
        for layer in self.layers(model):
            present = [n for n in names if _has(layer, n)]
            if present:
                layer.merge(adapter_names=present)

    @hookimpl
    def adapterkit_unmerge(self, model: nn.Module, method: str, names: Sequence[str]) -> None:
        # The core unmerges all of a method's merged adapters at once, which is what layer.unmerge() does.
        for layer in self.layers(model):
            if layer.merged:
                layer.unmerge()

    @hookimpl
    def adapterkit_delete(self, model: nn.Module, method: str, name: str) -> None:
        for site in self.sites(model, name):
            with warnings.catch_warnings():
                # peft picks a new active adapter and says so; the core re-applies its own active set.
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                site.layer.delete_adapter(name)
            if _is_empty(site.layer):
                # Unwrap: put back the module this layer replaced.
                setattr(site.parent, site.attr, site.layer.base_layer)
        self.forget(model)
