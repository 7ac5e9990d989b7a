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
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule
from peft.utils.error import NoMatchingPeftModuleError
from peft.utils.integrations import init_empty_weights
from torch import nn

from .errors import ConfigValueError, PerSampleError, StateDictMismatchError, TargetError, UnsupportedOperationError
from .hookspecs import hookimpl

__all__ = ["PeftMethod", "LayerSite", "check_rows", "replaced_forwards"]

TAG = "_adapterkit_method"
# Model attribute: {method: [layers], (method, "trainable"): set of names, (method, "fresh"): names whose
# requires_grad set_active has not applied yet, (method, "params"): {name: [parameters]}}.
_CACHE = "_adapterkit_peft_layers"
_UNSET = object()
# What torch.nn.init offers; skipped while creating layers whose weights a load replaces.
_INITIALISERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip


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
        container = _container(layer, attr)
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


def _container(layer: BaseTunerLayer, attr: str) -> Any:
    """``getattr(layer, attr, None)``, straight from ``_modules`` when it is a module (no ``__getattr__`` detour)."""
    found = layer._modules.get(attr)
    return found if found is not None else getattr(layer, attr, None)


def _has(layer: BaseTunerLayer, name: str) -> bool:
    return any(name in (_container(layer, attr) or ()) for attr in layer.adapter_layer_names)


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


def _logical_modules(model: nn.Module, *, into_layers: bool) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """``(logical path, parent, attr, module)`` for the modules of ``model``, parents before children.

    What an adapter layer holds for its adapters is never entered, so the walk costs the
    same with 1 or 100 adapters loaded. With ``into_layers``, a layer's base layer is
    (under the layer's own path: the logical path drops ``base_layer`` hops); without, the
    walk stops at adapter layers, as peft's injection does.
    """
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if isinstance(module, BaseTunerLayer):
            base = module._modules.get("base_layer")
            children = [(path, "base_layer", base)] if into_layers and base is not None else []
        else:
            children = [
                (f"{path}.{attr}" if path else attr, attr, child)
                for attr, child in module._modules.items()
                if child is not None
            ]
        for child_path, attr, child in children:
            yield child_path, module, attr, child
        stack.extend((child_path, child) for child_path, _, child in reversed(children))


@contextlib.contextmanager
def _layer_creation() -> Iterator[None]:
    """Inside the block, peft creates adapter layers for a load: empty weights, no per-layer passes.

    * Weights go to the meta device (peft's ``init_empty_weights``, as in its
      ``low_cpu_mem_usage``, which keeps the few unsaved values, such as AdaLoRA's
      ``ranknum``, off it). Their initialisers (``torch.nn.init``, and ``torch.randn`` /
      ``torch.rand``, which peft's layers use as initialisers) leave the memory unfilled:
      the load replaces those values. (A ``torch.device("meta")`` context would be slower:
      random numbers on meta go through Python decompositions.)
    * ``BaseTunerLayer.set_adapter`` and ``_move_adapter_to_device_of_base_layer`` do nothing:
      peft's ``update_layer`` calls both, and they visit every adapter of the layer (so each
      load got slower than the last). adapterkit places the loaded weights (:func:`_place`)
      and sets activity and ``requires_grad`` (``adapterkit_set_active``) afterwards.

    Like transformers' ``no_init_weights``, the swaps are process-wide for the duration: do
    not build models in other threads meanwhile.
    """
    swapped = [(nn.init, name, _keep) for name in _INITIALISERS if hasattr(nn.init, name)]
    swapped += [(torch, "randn", _unfilled), (torch, "rand", _unfilled)]
    swapped += [
        (BaseTunerLayer, "set_adapter", _skip),
        (BaseTunerLayer, "_move_adapter_to_device_of_base_layer", _skip),
    ]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in swapped]
    try:
        for owner, name, stand_in in swapped:
            setattr(owner, name, stand_in)
        with init_empty_weights():
            yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


_empty = torch.empty


def _unfilled(*size: Any, generator: Any = None, **kwargs: Any) -> torch.Tensor:
    return _empty(*size, **kwargs)


def _skip(*args: Any, **kwargs: Any) -> None:
    return None


def _place(layer: BaseTunerLayer, name: str, device: torch.device | None = None) -> bool:
    """Move adapter ``name`` of ``layer`` to its base layer's device and floating dtype (or to ``device``).

    peft's ``_move_adapter_to_device_of_base_layer`` for one adapter, without its scan of
    every other adapter's parameters (which made each load slower than the last). Returns
    whether anything moved (into new parameter objects).
    """
    base = layer.get_base_layer()
    if isinstance(base, nn.MultiheadAttention):
        base = base.out_proj
    base_device, base_dtype = layer._get_base_layer_device_and_dtype(base)
    device = device or base_device
    if device is None:
        return False
    moved = False
    dtype = base_dtype if base_dtype is not None and (base_dtype.is_floating_point or base_dtype.is_complex) else None
    for attr in (*layer.adapter_layer_names, *layer.other_param_names):
        container = _container(layer, attr)
        if not isinstance(container, (nn.ModuleDict, nn.ParameterDict, BufferDict)) or name not in container:
            continue
        item = container[name]
        if isinstance(item, nn.Module):
            tensors = [
                t for m in item.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None
            ]
        else:
            tensors = [item]
        if all(
            t.device == device and (dtype is None or not t.is_floating_point() or t.dtype == dtype) for t in tensors
        ):
            continue
        # Integer tensors (index buffers) keep their dtype; modules cast only their floating tensors anyway.
        cast = isinstance(item, nn.Module) or item.is_floating_point() or item.is_complex()
        container[name] = item.to(device, dtype=dtype) if dtype is not None and cast else item.to(device)
        moved = True
    return moved


def _follow_training_mode(sites: Sequence[LayerSite], name: str) -> None:
    """Put adapter ``name``'s new modules in the training mode of the layers they adapt.

    peft creates them in training mode, so an adapter loaded into a model in eval mode would
    run its dropout at inference (``PeftModel.from_pretrained`` calls ``eval()`` on the whole
    model instead). Only the layer, its containers and this adapter's modules are touched.
    """
    for site in sites:
        layer = site.layer
        mode = layer.get_base_layer().training
        # Straight into __dict__ (what Module.train does, without its __setattr__ checks per module).
        layer.__dict__["training"] = mode
        for attr, child in layer._modules.items():
            if attr != "base_layer":
                child.__dict__["training"] = mode
                item = child._modules.get(name)
                if item is not None:
                    for module in item.modules():
                        module.__dict__["training"] = mode


@contextlib.contextmanager
def _peft_errors(method: str, name: str) -> Iterator[None]:
    """Turn what peft raises for a config that does not fit the model into adapterkit's errors."""
    try:
        yield
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


def _without_saved_base_weights(
    expected: dict[str, tuple[LayerSite, Any, str]], state_dict: dict[str, torch.Tensor], method: str, name: str
) -> dict[str, torch.Tensor]:
    """``state_dict`` without the base weights of adapted layers, which must equal the model's.

    peft also saves the weights of a targeted embedding layer (``save_embedding_layers``,
    on by default then), as ``<layer>.base_layer.weight``. adapterkit never changes base
    weights: identical ones are dropped, different ones (a resized vocabulary) refused.
    """
    sites = {site.logical: site for site, _, _ in expected.values()}
    kept = state_dict
    for key, tensor in state_dict.items():
        path, found, leaf = key.rpartition(".base_layer.")
        if not found or path not in sites or "." in leaf:
            continue
        current = getattr(sites[path].layer.get_base_layer(), leaf, None)
        same = (
            isinstance(current, torch.Tensor)
            and not current.is_meta
            and current.shape == tensor.shape
            and torch.equal(current.detach(), tensor.to(current.device, current.dtype))
        )
        if not same:
            raise StateDictMismatchError(
                f"{method} adapter {name!r}: the checkpoint holds base weights {key!r} (peft saves a targeted "
                "embedding's weights with save_embedding_layers) that differ from the model's, or cannot be compared "
                "(offloaded); adapterkit never changes base weights. Load into the base model the adapter was "
                "trained on (e.g. with its resized embeddings), before dispatching it."
            )
        if kept is state_dict:
            kept = dict(state_dict)
        del kept[key]
    return kept


def _warn_unmatched_patterns(config: Any, targeted: Sequence[str]) -> None:
    """peft's warning for ``rank_pattern``/``alpha_pattern`` keys that match no targeted module."""
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, attr, None)
        if not patterns:
            continue
        unmatched = sorted(p for p in patterns if not any(re.match(rf"(.*\.)?({p})$", key) for key in targeted))
        if unmatched:
            warnings.warn(
                f"The following {attr} keys did not match any targeted module and were ignored: {unmatched}.",
                RuntimeWarning,
                stacklevel=4,
            )


class PeftMethod:
    """An adapterkit plugin for one peft tuner method.

    :param name: the method name users write (``"lora"``).
    :param config_type: peft config class (``LoraConfig``).
    :param tuner_type: peft tuner class that injects layers (``LoraModel``).
    :param aliases: further names, typically peft's ``peft_type`` (``"LORA"``).
    :param description: one line for ``adapterkit methods``.
    :param direct_load: when loading, wrap the targets with the tuner's own per-target code
        (``_create_and_replace``) instead of constructing the tuner, whose whole-model passes
        make every load slower than the last. Tested for peft's LoRA, IA3 and AdaLoRA tuners;
        leave it off for other tuners unless the conformance suite passes with it.
    """

    def __init__(
        self,
        name: str,
        config_type: type,
        tuner_type: type,
        *,
        aliases: Sequence[str] = (),
        description: str = "",
        direct_load: bool = False,
    ) -> None:
        self.name = name
        self.config_type = config_type
        self.tuner_type = tuner_type
        self.aliases = tuple(aliases)
        self.description = description
        self.direct_load = direct_load

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # -- layer bookkeeping ----------------------------------------------------
    def sites(self, model: nn.Module, name: str | None = None) -> list[LayerSite]:
        """This method's layers in ``model`` (holding adapter ``name`` if given), with logical paths."""
        found = [
            LayerSite(path, parent, attr, module)
            for path, parent, attr, module in _logical_modules(model, into_layers=True)
            if module.__dict__.get(TAG) == self.name and (name is None or _has(module, name))
        ]
        found.sort(key=lambda site: site.logical)
        return found

    def layers(self, model: nn.Module) -> list[BaseTunerLayer]:
        """This method's layers in ``model`` (cached on the model; inject and delete refresh it)."""
        cache = model.__dict__.setdefault(_CACHE, {})
        found = cache.get(self.name)
        if found is None:
            # dict.fromkeys: a module shared by two parents is one layer
            found = cache[self.name] = list(dict.fromkeys(site.layer for site in self.sites(model)))
        return found

    def forget(self, model: nn.Module) -> None:
        """Drop what :meth:`layers` and :meth:`adapterkit_set_active` remember: the layers changed."""
        cache = model.__dict__.get(_CACHE, {})
        for key in (self.name, *((self.name, part) for part in ("trainable", "fresh", "params", "new sites"))):
            cache.pop(key, None)

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
        return json.loads(
            json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v))
        )

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
                raise ConfigValueError(
                    f"{method} config key {key!r}={value!r} is not supported by adapterkit yet; leave it unset"
                )
        if getattr(config, "target_parameters", None):
            raise ConfigValueError(
                f"{method} config key 'target_parameters' is not supported by adapterkit yet; use target_modules"
            )
        dropout = getattr(config, "lora_dropout", 0.0)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            # peft replaces a dropout <= 0 by no dropout: a negative one would pass silently.
            raise ConfigValueError(
                f"{method} config key 'lora_dropout' must be a probability between 0 and 1, got {dropout!r}; "
                "e.g. lora_dropout=0.05"
            )
        bias = getattr(config, "bias", "none")
        if bias != "none":
            raise ConfigValueError(
                f"{method} config key 'bias'={bias!r} is not supported (base biases would be saved); use 'none'"
            )

    # -- injection ----------------------------------------------------------------
    @hookimpl
    def adapterkit_inject(self, model: nn.Module, method: str, name: str, config: Any, empty: bool) -> None:
        if empty and self.direct_load and self._inject_direct(model, method, name, config):
            return
        # peft's tuner retouches layers and the requires_grad of every method's adapters
        cache = model.__dict__.get(_CACHE, {})
        for key in [k for k in cache if isinstance(k, tuple)]:
            del cache[key]
        self.forget(model)
        # Hide an existing model.peft_config (e.g. transformers' mixin's): the tuner would find and extend it.
        previous = model.__dict__.pop("peft_config", _UNSET)
        try:
            # The tuner wraps the targets in place; we keep the layers, not the tuner.
            with _peft_errors(method, name):
                self.tuner_type(model, config, adapter_name=name, low_cpu_mem_usage=empty)
        finally:
            # peft leaves model.peft_config behind; adapterkit keeps configs itself.
            model.__dict__.pop("peft_config", None)
            if previous is not _UNSET:
                model.__dict__["peft_config"] = previous
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and not hasattr(module, TAG) and _has(module, name):
                setattr(module, TAG, self.name)
        self.forget(model)
        _follow_training_mode(self.sites(model, name), name)

    def _direct_load_fits(self, config: Any) -> bool:
        """Whether the config needs nothing of the tuner beyond its per-target code."""
        targets = getattr(config, "target_modules", None)
        return not (
            targets is None  # peft fills in the model type's defaults
            or targets == "all-linear"
            or getattr(config, "use_dora", False)  # DoRA's magnitude is computed from the base weight
            or getattr(config, "ensure_weight_tying", False)
            or getattr(config, "target_modules_to_tie", None)
        )

    def _inject_direct(self, model: nn.Module, method: str, name: str, config: Any) -> bool:
        """Add adapter ``name``, with empty weights, to the targets of ``config``; False to use the tuner instead.

        It runs the checks and config preparation of peft's ``inject_adapter`` and its
        per-target ``_create_and_replace``, and skips its passes over the whole model
        (every module and parameter, including the adapters already loaded): matching walks
        the base modules only, existing layers do not revisit their other adapters, and
        ``requires_grad`` is left to :meth:`adapterkit_set_active`. Cost per load: the
        targets, whatever is loaded already.
        """
        if not self._direct_load_fits(config):
            return False
        # The tuner's per-target methods, without its constructor (which injects into the whole model).
        tuner = self.tuner_type.__new__(self.tuner_type)
        nn.Module.__init__(tuner)
        tuner.__dict__["model"] = model  # not a registered child: the tuner is thrown away
        tuner.peft_config = {name: config}
        tuner.active_adapter = name
        tuner.targeted_module_names = []
        tuner.targeted_parameter_names = []
        replace = tuner._replace_module

        def _replace_module(parent: nn.Module, attr: str, new: nn.Module, old: nn.Module) -> None:
            # peft's version also moves the new layer's adapter to the base layer's device, scanning
            # every submodule; the load places the adapter's weights itself (see _place).
            if hasattr(new, "base_layer") and getattr(getattr(old, "base_layer", old), "state", None) is None:
                setattr(parent, attr, new)
            else:
                replace(parent, attr, new, old)

        tuner._replace_module = _replace_module
        with _peft_errors(method, name):
            if hasattr(getattr(model, "config", None), "model_type"):
                from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

                convert_peft_config_for_transformers(config, model=model, conversions=None)
            tuner._check_new_adapter_config(config)
            tuner._check_tied_modules(model, config)
            config = tuner._prepare_adapter_config(config, tuner.get_model_config(model))
            tuner._prepare_model(config, model)
            walked = list(_logical_modules(model, into_layers=False))
            targets = [
                site
                for site in walked
                if (found := tuner._check_target_module_exists(config, site[0]))
                and not isinstance(found, _ExcludedModule)
            ]
            if not targets or not self._direct_load_fits(config):
                return False  # the tuner raises (or warns) in its own words
            cache = model.__dict__.setdefault(_CACHE, {})
            if self.name not in cache and not any(isinstance(site[3], BaseTunerLayer) for site in walked):
                cache[self.name] = []  # no adapter layer anywhere yet: nothing for layers() to walk for
            layers = self.layers(model)
            sites = []
            with _layer_creation():
                for key, parent, attr, target in targets:
                    tuner._check_target_module_compatiblity(config, model, attr)
                    tuner._create_and_replace(config, name, target, attr, parent, current_key=key)
                    layer = parent._modules[attr]
                    if layer is not target:
                        setattr(layer, TAG, self.name)
                        layers.append(layer)
                    sites.append(LayerSite(key, parent, attr, layer))
        _warn_unmatched_patterns(config, [site.logical for site in sites])
        _follow_training_mode(sites, name)
        cache.setdefault((self.name, "fresh"), set()).add(name)
        # Handed to the load that follows (adapterkit_load_state), which would otherwise walk the model for them.
        cache[(self.name, "new sites")] = (name, sorted(sites, key=lambda site: site.logical))
        return True

    # -- activity -------------------------------------------------------------------
    @hookimpl
    def adapterkit_set_active(
        self, model: nn.Module, method: str, names: Sequence[str], trainable: Sequence[str]
    ) -> None:
        names, wanted = list(names), set(trainable)
        cache = model.__dict__.setdefault(_CACHE, {})
        previous = cache.get((self.name, "trainable"))
        fresh = cache.pop((self.name, "fresh"), set())
        layers = self.layers(model)
        for layer in layers:
            # Straight into __dict__: nn.Module.__setattr__ checks three registries per call.
            layer.__dict__["_active_adapter"] = names
        # Only adapters whose trainability changes (or whose parameters are new) are touched:
        # switching among frozen adapters costs the same with 2 or 100 of them loaded.
        if previous is None:
            changed = {
                n for layer in layers for attr in layer.adapter_layer_names for n in _container(layer, attr) or ()
            }
        else:
            changed = (previous ^ wanted) | fresh
        for name in changed:
            flag = name in wanted
            for param in self._parameters(model, name):
                param.requires_grad = flag
        cache[(self.name, "trainable")] = wanted

    def _parameters(self, model: nn.Module, name: str) -> list[nn.Parameter]:
        """The parameters of adapter ``name`` in this method's layers (cached until they are replaced)."""
        known = model.__dict__.setdefault(_CACHE, {}).setdefault((self.name, "params"), {})
        found = known.get(name)
        if found is None:
            found = known[name] = [
                getattr(owner, leaf) for layer in self.layers(model) for _, owner, leaf in _adapter_tensors(layer, name)
            ]
        return found

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
        handed = model.__dict__.get(_CACHE, {}).pop((self.name, "new sites"), None)
        sites = handed[1] if handed is not None and handed[0] == name else self.sites(model, name)
        expected = {}
        for site in sites:
            for suffix, owner, leaf in _adapter_tensors(site.layer, name):
                expected[f"{site.logical}.{self.file_key(suffix)}"] = (site, owner, leaf)
        return expected

    @hookimpl
    def adapterkit_extract_state(self, model: nn.Module, method: str, name: str) -> dict[str, torch.Tensor]:
        return {key: getattr(owner, leaf).detach() for key, (_, owner, leaf) in self._expected(model, name).items()}

    @hookimpl
    def adapterkit_load_state(
        self, model: nn.Module, method: str, name: str, state_dict: dict[str, torch.Tensor]
    ) -> None:
        expected = self._expected(model, name)
        state_dict = _without_saved_base_weights(expected, state_dict, method, name)
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
        layers, params = {}, []
        for key, (site, owner, leaf) in expected.items():
            param = nn.Parameter(state_dict[key], requires_grad=False)
            if isinstance(owner, nn.ParameterDict):
                owner[leaf] = param
            else:
                setattr(owner, leaf, param)
            layers[id(site.layer)] = site.layer
            params.append(param)
        moved = False
        for layer in layers.values():
            # A base layer offloaded by accelerate has its weight on the meta device; moving the
            # adapter there would drop the file's tensors. Keep them on the CPU, in the layer's
            # dtype, for the dispatch plugin to offload with the layer.
            moved |= _place(layer, name, device=torch.device("cpu") if _offloaded(layer) else None)
        self._renewed(model, name, None if moved else params)

    def _renewed(self, model: nn.Module, name: str, params: list[nn.Parameter] | None = None) -> None:
        """Adapter ``name`` has new parameter objects (``params``, when known): set_active must set their requires_grad."""
        cache = model.__dict__.setdefault(_CACHE, {})
        cache.setdefault((self.name, "fresh"), set()).add(name)
        known = cache.setdefault((self.name, "params"), {})
        if params is None:
            known.pop(name, None)
        else:
            known[name] = params

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
