""":class:`PeftMethod`: every adapterkit hook for a method built on a peft tuner."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from adapterkit import ConfigValueError, UnsupportedOperationError, hookimpl
from adapterkit.layers import claim, owner, positions, walk
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import banks
from ._peft import ExcludedModule, bare_tuner, convert_config_for_transformers
from .bias import (
    bias_option,
    biases_of,
    check_one_bias_adapter,
    forget_adapter_biases,
    new_adapter_biases,
)
from .creation import empty_weights, layer_passes_skipped
from .layers import (
    LayerSite,
    adapter_tensors,
    adapters_held,
    container,
    follow_training_mode,
    freeze_bookkeeping,
    has_adapter,
    is_empty,
    offloaded,
    place,
    upcast,
)
from .heads import (
    CACHE_KEY as HEADS_KEY,
    add_heads,
    delete_heads,
    enable_heads,
    head_state,
    load_head_state,
    prepare_heads,
    set_active_heads,
    warn_untied,
)
from .quantized import keep_quantized_weights, restore_quantized_weights
from .stacking import stack_aware
from .state import check_state_dict, without_saved_base_weights
from .swap import swap_in_place
from .weighting import apply_weights, check_weights, original
from .weighting import forget as forget_weight
from .validation import check_memory, merge_errors, peft_errors, validate_peft_config, warn_unmatched_patterns

__all__ = ["PeftMethod"]

# Model attribute: {method: [layers], (method, "trainable"): set of names, (method, "fresh"): names whose
# requires_grad set_active has not applied yet, (method, "params"): {name: [parameters]}}.
_CACHE = "_adapterkit_peft_layers"
_UNSET = object()


class _BaseTensors:
    """References (no copies) to the parameters of a layer's base modules, to undo a merge exactly.

    peft's safe merge never writes into the tensors it replaces: it assigns new ``.data`` (or,
    for MultiheadAttention, new tensors in place of the parameters), so the old ones still hold
    the values from before the merge.
    """

    def __init__(self, layer: BaseTunerLayer) -> None:
        self.saved = [
            (module, dict(module._parameters), {n: p.data for n, p in module._parameters.items() if p is not None})
            for module in layer.get_base_layer().modules()
        ]

    def restore(self) -> None:
        for module, params, data in self.saved:
            for attr in params:
                module.__dict__.pop(attr, None)  # a merged tensor set in place of the parameter
            module._parameters.clear()
            module._parameters.update(params)
            for attr, tensor in data.items():
                params[attr].data = tensor


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

    @property
    def _tuner_class(self) -> type:
        """The tuner, made to wrap other methods' layers instead of extending them (see :mod:`adapterkit_peft.stacking`)."""
        return stack_aware(self.tuner_type, self.name)

    # -- layer bookkeeping ----------------------------------------------------
    def sites(self, model: nn.Module, name: str | None = None) -> list[LayerSite]:
        """This method's layers in ``model`` (holding adapter ``name`` if given), with logical paths.

        The layers are the wrappers the core records as this method's (:func:`adapterkit.layers.owner`),
        at any depth of their stacks.
        """
        found = [
            LayerSite(path, parent, attr, module)
            for path, parent, attr, module in walk(model, None if name is None else self._holds(name))
            if owner(module) == self.name
            and isinstance(module, BaseTunerLayer)
            and (name is None or has_adapter(module, name))
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
        for key in (self.name, *((self.name, part) for part in ("trainable", "fresh", "params", "new sites", "expected"))):
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
        validate_peft_config(method, config)

    # -- injection ----------------------------------------------------------------
    @hookimpl
    def adapterkit_inject(
        self, model: nn.Module, method: str, name: str, config: Any, empty: bool, autocast_adapter_dtype: bool = True
    ) -> None:
        prepare_heads(config)
        heads = getattr(config, "modules_to_save", None)
        check_one_bias_adapter(model, method, name, config)
        if heads and bias_option(config) != "none":
            raise ConfigValueError(
                f"{method} adapter {name!r}: bias={bias_option(config)!r} together with modules_to_save={heads!r} "
                "(or a task_type's heads) is not supported by adapterkit yet: peft would also save the heads' "
                "original biases; use bias='none', or no heads"
            )
        if heads:
            config.modules_to_save = None  # adapterkit wraps the heads itself (heads.py), for both ways of injecting
        try:
            self._inject(model, method, name, config, empty, autocast_adapter_dtype)
        finally:
            if heads:
                config.modules_to_save = heads
        cache = model.__dict__.setdefault(_CACHE, {})
        cache.pop(HEADS_KEY, None)
        if heads:
            sites = add_heads(model, self.name, name, config)
            warn_untied(model, method, name, config, sites)
        if bias_option(config) != "none":
            new_adapter_biases(model, self.name, name, config, self.sites(model, name))
        banks.remember_config(model, self.name, name, config)
        if banks.prepared(model, self.name) is not None:
            # Prepared for compiled switching: the adapter must fit the banks (else the core rolls back).
            banks.check_fits(model, self.name, name, self.sites(model, name))
            if not empty:
                self._adopt(model, name)

    def _inject(
        self, model: nn.Module, method: str, name: str, config: Any, empty: bool, autocast_adapter_dtype: bool
    ) -> None:
        if empty and self.direct_load and self._inject_direct(model, method, name, config):
            self._upcast_on_load(model, name, autocast_adapter_dtype)
            return
        if not empty:
            check_memory(method, name, config, model)  # a load's weights are empty: only an add allocates them
        active = self.current_active(model)
        # peft's tuner retouches layers and the requires_grad of every method's adapters
        cache = model.__dict__.get(_CACHE, {})
        for key in [k for k in cache if isinstance(k, tuple)]:
            del cache[key]
        self.forget(model)
        # Hide an existing model.peft_config (e.g. transformers' mixin's): the tuner would find and extend it.
        previous = model.__dict__.pop("peft_config", _UNSET)
        try:
            # The tuner wraps the targets in place; we keep the layers, not the tuner. For a load, its
            # weights are empty (peft's own low_cpu_mem_usage would patch torch for the whole process).
            with peft_errors(method, name), empty_weights() if empty else contextlib.nullcontext():
                self._tuner_class(model, config, adapter_name=name, low_cpu_mem_usage=False, adapterkit_active=active)
        finally:
            # peft leaves model.peft_config behind; adapterkit keeps configs itself.
            model.__dict__.pop("peft_config", None)
            if previous is not _UNSET:
                model.__dict__["peft_config"] = previous
        for module in model.modules():
            # The tuner's new layers: claimed now, so that sites() finds them before the core records them.
            if isinstance(module, BaseTunerLayer) and owner(module) is None and has_adapter(module, name):
                claim(module, self.name)
        self.forget(model)
        sites = self.sites(model, name)
        follow_training_mode(sites, name)
        if empty:
            self._upcast_on_load(model, name, autocast_adapter_dtype)
        else:
            for site in sites:
                if autocast_adapter_dtype:
                    upcast(site.layer, name)
                freeze_bookkeeping(site.layer, name)

    def current_active(self, model: nn.Module) -> list[str]:
        """This method's active adapters as its layers hold them (what a newly wrapped layer must start with)."""
        known = model.__dict__.get(_CACHE, {}).get((self.name, "active"))
        if known is not None:
            return list(known)
        layers = self.layers(model)
        return list(layers[0].active_adapters) if layers else []

    def _upcast_on_load(self, model: nn.Module, name: str, flag: bool) -> None:
        # The load that follows places the file's tensors in the layer's dtype, then upcasts them (as peft does).
        model.__dict__.setdefault(_CACHE, {})[(self.name, "upcast", name)] = flag

    def _direct_load_fits(self, config: Any) -> bool:
        """Whether the config needs nothing of the tuner beyond its per-target code."""
        targets = getattr(config, "target_modules", None)
        return not (
            targets is None  # peft fills in the model type's defaults
            or targets == "all-linear"
            or getattr(config, "use_dora", False)  # DoRA's magnitude is computed from the base weight
            or getattr(config, "ensure_weight_tying", False)
            or getattr(config, "target_modules_to_tie", None)
            or getattr(config, "target_parameters", None)  # peft adapts parameters in a pass of its own
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
        tuner = bare_tuner(self._tuner_class, model, name, config)
        tuner.__dict__["_adapterkit_active"] = self.current_active(model)  # new layers start with these
        # The load places the adapter's weights itself (see place()): skip peft's device scan of each new layer.
        tuner.__dict__["_adapterkit_direct"] = True
        with peft_errors(method, name):
            if hasattr(getattr(model, "config", None), "model_type"):
                convert_config_for_transformers(config, model)
            tuner._check_new_adapter_config(config)
            tuner._check_tied_modules(model, config)
            config = tuner._prepare_adapter_config(config, tuner.get_model_config(model))
            tuner._prepare_model(config, model)
            walked = list(positions(model))
            targets = [
                site
                for site in walked
                if (found := tuner._check_target_module_exists(config, site[0]))
                and not isinstance(found, ExcludedModule)
            ]
            if not targets or not self._direct_load_fits(config):
                return False  # the tuner raises (or warns) in its own words
            cache = model.__dict__.setdefault(_CACHE, {})
            if self.name not in cache and not any(owner(site[3]) is not None for site in walked):
                cache[self.name] = []  # no adapter layer anywhere yet: nothing for layers() to walk for
            layers = self.layers(model)
            sites = []
            existing = [target for _, _, _, target in targets if owner(target) == self.name]
            with empty_weights(), layer_passes_skipped(existing):
                for key, parent, attr, target in targets:
                    tuner._check_target_module_compatiblity(config, model, attr)
                    tuner._create_and_replace(config, name, target, attr, parent, current_key=key)
                    layer = parent._modules[attr]
                    if layer is not target:
                        claim(layer, self.name)
                        layers.append(layer)
                    sites.append(LayerSite(key, parent, attr, layer))
                    # Layers the new one nests in its base (MultiheadAttention adapts its out_proj too); claimed
                    # as they are met, so that the walk then treats them as the wrappers they are.
                    for path, inner_parent, inner_attr, inner in walk(layer, self._holds(name)):
                        mine = owner(inner) in (None, self.name)
                        if isinstance(inner, BaseTunerLayer) and mine and has_adapter(inner, name):
                            if owner(inner) is None:
                                claim(inner, self.name)
                                layers.append(inner)
                            sites.append(LayerSite(f"{key}.{path}", inner_parent, inner_attr, inner))
        warn_unmatched_patterns(config, [site.logical for site in sites])
        follow_training_mode(sites, name)
        cache.setdefault((self.name, "fresh"), set()).add(name)
        # Handed to the load that follows (adapterkit_load_state), which would otherwise walk the model for them.
        cache[(self.name, "new sites")] = (name, sorted(sites, key=lambda site: site.logical))
        return True

    # -- activity -------------------------------------------------------------------
    @hookimpl
    def adapterkit_set_active(
        self,
        model: nn.Module,
        method: str,
        names: Sequence[str],
        trainable: Sequence[str],
        weights: Sequence[float] | None,
    ) -> None:
        names, wanted = list(names), set(trainable)
        cache = model.__dict__.setdefault(_CACHE, {})
        layers = self.layers(model)
        weighted = {n: float(w) for n, w in zip(names, weights or ()) if w != 1.0}
        check_weights(method, layers, weighted, trainable)  # before anything changes
        previous = cache.get((self.name, "trainable"))
        fresh = cache.pop((self.name, "fresh"), set())
        for layer in layers:
            # Straight into __dict__: nn.Module.__setattr__ checks three registries per call.
            layer.__dict__["_active_adapter"] = names
        # Prepared for compiled switching, the active slots and weights are tensors the layers read (banks.py);
        # peft's scalings and vectors stay each adapter's own.
        if banks.set_active(model, self.name, names, weights):
            pass
        elif weighted or cache.get((self.name, "weighted"), True):  # unknown (cache cleared): look
            apply_weights(layers, weighted)
            cache[(self.name, "weighted")] = bool(weighted)
        # Layers a later load wraps for the first time start with these (see stacking.stack_aware).
        cache[(self.name, "active")] = names
        # Only adapters whose trainability changes (or whose parameters are new) are touched:
        # switching among frozen adapters costs the same with 2 or 100 of them loaded.
        if previous is None:
            changed = {n for layer in layers for attr in layer.adapter_layer_names for n in container(layer, attr) or ()}
        else:
            changed = (previous ^ wanted) | fresh
        for name in changed:
            flag = name in wanted
            for param in self._parameters(model, name):
                param.requires_grad = flag
        cache[(self.name, "trainable")] = wanted
        set_active_heads(model, self.name, names, trainable, cache)
        for state in biases_of(model).values():
            if state.method == self.name:
                state.update(active=state.name in names, trainable=state.name in wanted)

    def _parameters(self, model: nn.Module, name: str) -> list[nn.Parameter]:
        """The parameters of adapter ``name`` in this method's layers (cached until they are replaced)."""
        known = model.__dict__.setdefault(_CACHE, {}).setdefault((self.name, "params"), {})
        found = known.get(name)
        if found is None:
            found = known[name] = [
                getattr(owner, leaf) for layer in self.layers(model) for _, owner, leaf in adapter_tensors(layer, name)
            ]
        return found

    @hookimpl
    def adapterkit_enable(self, model: nn.Module, method: str) -> None:
        for layer in self.layers(model):
            layer.enable_adapters(True)
        enable_heads(model, self.name, True, model.__dict__.setdefault(_CACHE, {}))
        model.__dict__.get(_CACHE, {}).pop((self.name, "trainable"), None)  # peft changed requires_grad
        self._enable_biases(model, True)

    @hookimpl
    def adapterkit_disable(self, model: nn.Module, method: str) -> None:
        for layer in self.layers(model):
            layer.enable_adapters(False)
        enable_heads(model, self.name, False, model.__dict__.setdefault(_CACHE, {}))
        model.__dict__.get(_CACHE, {}).pop((self.name, "trainable"), None)
        self._enable_biases(model, False)

    def _enable_biases(self, model: nn.Module, enabled: bool) -> None:
        for state in biases_of(model).values():
            if state.method == self.name:
                state.update(enabled=enabled)

    # -- state ------------------------------------------------------------------------
    def file_key(self, suffix: str) -> str:
        """The checkpoint key suffix peft uses for a parameter at ``suffix`` (override for renames)."""
        return suffix

    def _expected(self, model: nn.Module, name: str) -> dict[str, tuple[LayerSite, nn.Module, str]]:
        cache = model.__dict__.setdefault(_CACHE, {})
        handed = cache.pop((self.name, "new sites"), None)
        # Cached per adapter until this method's layers change (forget()): swaps and saves ask every time. What
        # is read from it (layers, logical paths, the modules holding each tensor) stays when another method
        # wraps a layer, and when a load or swap assigns new tensors to those modules.
        known = cache.setdefault((self.name, "expected"), {})
        if handed is None and name in known:
            return known[name]
        sites = handed[1] if handed is not None and handed[0] == name else self.sites(model, name)
        expected = {}
        for site in sites:
            for suffix, owner, leaf in adapter_tensors(site.layer, name):
                expected[f"{site.logical}.{self.file_key(suffix)}"] = (site, owner, leaf)
        known[name] = expected
        return expected

    @hookimpl
    def adapterkit_extract_state(self, model: nn.Module, method: str, name: str) -> dict[str, torch.Tensor]:
        # A weighted (IA)^3 vector holds the weighted values while active: the adapter's own are kept aside.
        state = {
            key: original(site.layer, name, getattr(owner, leaf)).detach()
            for key, (site, owner, leaf) in self._expected(model, name).items()
        }
        state.update(head_state(model, name))
        biases = biases_of(model).get(name)
        return state if biases is None else {**state, **biases.state()}

    @hookimpl
    def adapterkit_load_state(
        self, model: nn.Module, method: str, name: str, state_dict: dict[str, torch.Tensor]
    ) -> None:
        expected = self._expected(model, name)
        heads = head_state(model, name)  # the head copies' keys are the modules' own (classifier.weight)
        biases = biases_of(model).get(name)
        if biases is not None:
            biases.load(state_dict)
            state_dict = {key: value for key, value in state_dict.items() if key not in biases.entries}
        state_dict = without_saved_base_weights(expected, state_dict, method, name)
        check_state_dict({**expected, **{k: (None, v, "data") for k, v in heads.items()}}, state_dict, method, name)
        if heads:
            load_head_state(model, name, {k: state_dict[k] for k in heads})
            state_dict = {k: v for k, v in state_dict.items() if k not in heads}
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
        float32 = model.__dict__.get(_CACHE, {}).pop((self.name, "upcast", name), True)
        for layer in layers.values():
            # A base layer offloaded by accelerate has its weight on the meta device; moving the
            # adapter there would drop the file's tensors. Keep them on the CPU, in the layer's
            # dtype, for the dispatch plugin to offload with the layer.
            moved |= place(layer, name, device=torch.device("cpu") if offloaded(layer) else None, float32=float32)
            if float32:
                moved |= upcast(layer, name)  # what the file held in half precision, as peft casts it
            freeze_bookkeeping(layer, name)
        self._renewed(model, name, None if moved else params)
        if banks.prepared(model, self.name) is not None:
            banks.check_fits(model, self.name, name, [s for s in self.sites(model, name)])
            self._adopt(model, name)

    def _adopt(self, model: nn.Module, name: str) -> None:
        """Put adapter ``name`` into its slot of the banks; its parameters become views of it."""
        banks.adopt(model, self.name, name)
        self._renewed(model, name)

    def _prepare_compiled(
        self, model: nn.Module, max_rank: int | None, targets: Sequence[str] | None, max_adapters: int | None
    ) -> None:
        """``adapterkit_prepare_compiled`` for the methods with banks (LoRA, IA3: see :mod:`adapterkit_peft.banks`)."""
        sites = self.sites(model)
        names = list(dict.fromkeys(n for site in sites for n in adapters_held(site.layer)))
        # Eager weights (written into peft's scalings and IA3 vectors) move into the banks' routing.
        apply_weights(self.layers(model), {})
        model.__dict__.setdefault(_CACHE, {})[(self.name, "weighted")] = False
        banks.prepare(model, self.name, sites, names, max_rank=max_rank, targets=targets, max_adapters=max_adapters)
        self.forget(model)
        for name in names:
            self._renewed(model, name)

    def _renewed(self, model: nn.Module, name: str, params: list[nn.Parameter] | None = None) -> None:
        """Adapter ``name`` has new parameter objects (``params``, when known): set_active must set their requires_grad."""
        cache = model.__dict__.setdefault(_CACHE, {})
        cache.setdefault((self.name, "fresh"), set()).add(name)
        known = cache.setdefault((self.name, "params"), {})
        if params is None:
            known.pop(name, None)
        else:
            known[name] = params

    @hookimpl
    def adapterkit_swap(
        self, model: nn.Module, method: str, name: str, config: Any, state_dict: dict[str, torch.Tensor]
    ) -> None:
        # In place (see adapterkit_peft.swap): the adapter's parameters keep their identity.
        if banks.prepared(model, self.name) is not None:
            # Into its slot: other ranks and targets may fit. A rebuilt adapter's new parameters are handed to
            # set_active by the load inside; values copied in place keep theirs (nothing for set_active to redo).
            banks.swap(self, model, name, config, state_dict)
            return
        swap_in_place(self, model, name, config, state_dict)

    # -- merging and deleting ---------------------------------------------------------
    @hookimpl
    def adapterkit_merge(self, model: nn.Module, method: str, names: Sequence[str]) -> None:
        offloaded_layers = [site.logical for n in names for site in self.sites(model, n) if offloaded(site.layer)]
        if offloaded_layers:
            raise UnsupportedOperationError(
                "cannot merge into layers offloaded by accelerate (weights on the meta device): "
                f"{sorted(set(offloaded_layers))[:5]}; merge before dispatching, or dispatch the model to one device first"
            )
        layers = self.layers(model)
        merged_before = [(layer, list(layer.merged_adapters)) for layer in layers]
        done: list[tuple[BaseTunerLayer, bool, _BaseTensors]] = []
        try:
            for layer in layers:
                # Not those merged already: a layer merges the ones it nests (MultiheadAttention's out_proj).
                present = [n for n in names if has_adapter(layer, n) and n not in layer.merged_adapters]
                if present:
                    saved = _BaseTensors(layer)
                    # unmerge puts the quantized weights back: exact, where peft requantizes
                    done.append((layer, keep_quantized_weights(layer), saved))
                    with merge_errors(method, present, functools.partial(self._path, model, layer)):
                        # safe_merge: peft computes each merged tensor aside and checks it before it writes
                        layer.merge(safe_merge=True, adapter_names=present)
        except BaseException:
            # Put back the base tensors of the layers merged before the refusal: the model exactly as it was.
            for layer, quantized, saved in reversed(done):
                if not (quantized and restore_quantized_weights(layer)):
                    saved.restore()
            for layer, merged in merged_before:
                layer.merged_adapters = merged
            raise

    @hookimpl
    def adapterkit_unmerge(self, model: nn.Module, method: str, names: Sequence[str]) -> None:
        taken = set(names)
        for layer in self.layers(model):
            # (an outer layer unmerges the ones it nests, MultiheadAttention's out_proj: layers() lists it first)
            merged = list(layer.merged_adapters)
            if not taken.intersection(merged):
                continue
            # The core unmerges the last merged first: here a tail of what this layer merged.
            keep = [n for n in merged if n not in taken]
            if not keep and restore_quantized_weights(layer):
                continue  # the quantized weights from before the merge are back, bit for bit
            layer.merged_adapters = [n for n in merged if n in taken]
            try:
                layer.unmerge()
            finally:
                layer.merged_adapters = keep + layer.merged_adapters

    @hookimpl
    def adapterkit_layer_adapters(self, model: nn.Module, method: str, layer: nn.Module) -> list[str]:
        return adapters_held(layer)

    def _holds(self, name: str) -> Any:
        """``walk``'s ``keep``: this method's wrappers holding adapter ``name`` (their hops are in its keys)."""
        return lambda wrapper: owner(wrapper) == self.name and has_adapter(wrapper, name)

    def _path(self, model: nn.Module, layer: BaseTunerLayer) -> str:
        return next((site.logical for site in self.sites(model) if site.layer is layer), type(layer).__name__)

    @hookimpl
    def adapterkit_delete(self, model: nn.Module, method: str, name: str) -> None:
        banks.forget_slot(model, self.name, name)
        banks.remember_config(model, self.name, name, None)
        delete_heads(model, name)
        model.__dict__.get(_CACHE, {}).pop(HEADS_KEY, None)
        forget_adapter_biases(model, name)
        # Innermost first: a layer nested in another's base is unwrapped before its outer layer is.
        for site in reversed(self.sites(model, name)):
            forget_weight(site.layer, name)
            with warnings.catch_warnings():
                # peft picks a new active adapter and says so; the core re-applies its own active set.
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                site.layer.delete_adapter(name)
            if is_empty(site.layer) and not banks.keeps(model, site.layer):
                # Unwrap: put back the module this layer replaced (a prepared layer stays, with its banks).
                setattr(site.parent, site.attr, site.layer.base_layer)
        self.forget(model)
