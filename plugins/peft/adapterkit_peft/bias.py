"""Base biases an adapter trains: peft's ``bias="all"`` and ``bias="<method>_only"`` (``"lora_only"``).

In peft these options make base biases trainable and save them with the
adapter, and the trained values simply stay in the base model: deleting or
disabling the adapter keeps them. adapterkit keeps peft's choice of biases,
its training and its files, and makes the biases part of the adapter:

* ``bias="all"`` takes every ``bias`` of the model, ``"<method>_only"`` the
  biases of the layers the adapter adapts (keys as peft writes them, e.g.
  ``proj.base_layer.bias`` and ``head.bias``);
* the adapter's values are in the model while it is active and adapters are
  enabled; otherwise the original biases are (``disable()`` and
  ``set_active([])`` compute the base model);
* ``per_sample`` refuses rows of such an adapter, and blocks of its method while
  it is active: the biases are shared by every row and thread;
* ``delete`` puts the original values (and ``requires_grad``) back: the base
  model comes back exactly;
* they train (``requires_grad``) exactly when the adapter's own weights do;
* as in peft, one adapter per model may train biases.

The parameters stay the model's own objects (values are copied in and out), so
an optimiser built over them keeps working across switches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from adapterkit import ConfigValueError, StateDictMismatchError, UnsupportedOperationError
from adapterkit.layers import owner, walk
from torch import nn

from .layers import LayerSite, has_adapter

__all__ = [
    "AdapterBiases",
    "bias_option",
    "bias_targets",
    "biases_of",
    "check_one_bias_adapter",
    "forget_adapter_biases",
    "new_adapter_biases",
    "check_rows_biases",
]

# Model attribute: {adapter name: AdapterBiases}, for every peft-based method.
_STATE = "_adapterkit_peft_biases"


def bias_option(config: Any) -> str:
    """The config's ``bias`` option (``"none"`` for configs without one)."""
    return getattr(config, "bias", "none") or "none"


def biases_of(model: nn.Module) -> dict[str, AdapterBiases]:
    """The adapters of ``model`` that train base biases, by name (read only; usually empty)."""
    return model.__dict__.get(_STATE) or {}


@dataclasses.dataclass
class _Bias:
    """One base bias: ``module.<leaf>`` (a parameter, or a persistent buffer, which ``bias="all"`` saves too)."""

    module: nn.Module
    leaf: str
    original: torch.Tensor
    requires_grad: bool
    value: torch.Tensor  # the adapter's value while it is not in the model

    @property
    def tensor(self) -> torch.Tensor:
        found = self.module._parameters.get(self.leaf)
        return found if found is not None else self.module._buffers[self.leaf]


class AdapterBiases:
    """The base biases one adapter trains, and whether its values or the originals are in the model."""

    def __init__(self, method: str, name: str, option: str, targets: dict[str, tuple[nn.Module, str]]) -> None:
        self.method, self.name, self.option = method, name, option
        self.applied = False
        self.enabled = True
        self.active = False
        self.entries: dict[str, _Bias] = {}
        seen: dict[int, _Bias] = {}
        for key, (module, leaf) in targets.items():
            tensor = module._parameters.get(leaf)
            tensor = tensor if tensor is not None else module._buffers[leaf]
            # A bias shared by two modules is saved under both keys (as peft does) but restored once.
            entry = seen.get(id(tensor))
            if entry is None:
                original = tensor.detach().clone()
                entry = seen[id(tensor)] = _Bias(module, leaf, original, tensor.requires_grad, original.clone())
            self.entries[key] = entry

    def _unique(self) -> list[_Bias]:
        return list({id(entry): entry for entry in self.entries.values()}.values())

    def state(self) -> dict[str, torch.Tensor]:
        """The adapter's biases under peft's keys."""
        return {key: (entry.tensor if self.applied else entry.value).detach() for key, entry in self.entries.items()}

    def load(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Take the adapter's biases from a checkpoint (only its keys; the caller removes them)."""
        missing = sorted(set(self.entries) - set(state_dict))
        wrong = [
            f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(entry.original.shape)}"
            for key, entry in self.entries.items()
            if key in state_dict and state_dict[key].shape != entry.original.shape
        ]
        if missing or wrong:
            problems = "; ".join(
                f"{label}: {', '.join(items[:5])}"
                for label, items in (("missing", missing), ("wrong shapes", wrong))
                if items
            )
            raise StateDictMismatchError(
                f"{self.method} adapter {self.name!r} has bias={self.option!r}, but the checkpoint's biases do not fit "
                f"the model ({problems}); check that it was saved from this base model with this config"
            )
        for key, entry in self.entries.items():
            # A copy: tensors read from a safetensors file may be backed by the file itself.
            entry.value = state_dict[key].to(entry.original.device, entry.original.dtype, copy=True)
        if self.applied:
            self.applied = False
            self.apply()

    # -- what is in the model ---------------------------------------------------
    def apply(self) -> None:
        if self.applied:
            return
        with torch.no_grad():
            for entry in self._unique():
                entry.tensor.copy_(entry.value)
        self.applied = True

    def remove(self) -> None:
        if not self.applied:
            return
        with torch.no_grad():
            for entry in self._unique():
                entry.value = entry.tensor.detach().clone()
                entry.tensor.copy_(entry.original)
        self.applied = False

    def update(self, *, active: bool | None = None, enabled: bool | None = None, trainable: bool | None = None) -> None:
        """Record activity / enablement and put the adapter's or the original values in the model accordingly."""
        if active is not None:
            self.active = active
        if enabled is not None:
            self.enabled = enabled
        if self.active and self.enabled:
            self.apply()
        else:
            self.remove()
        if trainable is not None:
            for entry in self._unique():
                if isinstance(entry.tensor, nn.Parameter):
                    entry.tensor.requires_grad_(trainable)

    def restore(self) -> None:
        """The model as before the adapter: original values and ``requires_grad``."""
        self.remove()
        for entry in self._unique():
            if isinstance(entry.tensor, nn.Parameter):
                entry.tensor.requires_grad_(entry.requires_grad)


def check_one_bias_adapter(model: nn.Module, method: str, name: str, config: Any) -> None:
    """peft's rule: at most one adapter per model trains base biases."""
    option = bias_option(config)
    if option == "none":
        return
    for other in biases_of(model).values():
        raise ConfigValueError(
            f"{method} adapter {name!r} has bias={option!r}, but adapter {other.name!r} ({other.method}) already "
            f"trains the base biases (bias={other.option!r}); as in peft, one adapter per model may. Delete {other.name!r} "
            "first, or use bias='none'"
        )


def bias_targets(
    model: nn.Module, method: str, name: str, option: str, sites: Sequence[LayerSite]
) -> dict[str, tuple[nn.Module, str]]:
    """``{peft's key: (module, "bias")}`` of the biases adapter ``name`` (of ``method``) trains with ``bias=option``."""

    def own(wrapper: nn.Module) -> bool:
        return owner(wrapper) == method and has_adapter(wrapper, name)

    found: dict[str, tuple[nn.Module, str]] = {}
    if option == "all":
        # Every bias of the model, as peft selects them (state-dict keys ending in ".bias"), outside adapters;
        # keys as with this adapter alone (the hops of its own wrappers kept, other wrappers left out).
        for path, _, _, module in [("", None, "", model), *walk(model, own)]:
            if owner(module) is None and _bias_of(module) is not None:
                found[f"{path}.bias" if path else "bias"] = (module, "bias")
        return found
    # "<method>_only": the bias of each layer the adapter adapts (peft: the tuner layers' `bias`).
    for site in sites:
        base = site.layer._modules.get("base_layer")
        while base is not None and owner(base) is not None and not own(base):
            base = base._modules.get("base_layer")  # another adapter's wrapper around the base: not in the keys
        if base is not None and owner(base) is None and _bias_of(base) is not None:
            found[f"{site.logical}.base_layer.bias"] = (base, "bias")
    return found


def _bias_of(module: nn.Module) -> torch.Tensor | None:
    param = module._parameters.get("bias")
    if param is not None:
        return param
    if "bias" in module._buffers and "bias" not in module._non_persistent_buffers_set:
        return module._buffers["bias"]
    return None


def check_rows_biases(model: nn.Module, method: str, rows: Sequence[str]) -> None:
    """Before a per-sample block of ``method``: refuse where base biases an adapter trains would reach rows.

    Biases are the model's own parameters, shared by every row and every thread; a block routes
    rows in its own thread only, so it cannot take them out of some rows. Refused: rows of such an
    adapter, and any block while one is active (its biases are in the model then).
    """
    for state in biases_of(model).values():
        if state.method != method:
            continue
        if state.name in rows:
            raise UnsupportedOperationError(
                f"per_sample cannot route adapter {state.name!r}: it trains base biases (bias={state.option!r}), "
                "which every row of a batch shares; run its rows as a batch of their own with set_active"
            )
        if state.applied:
            raise UnsupportedOperationError(
                f"per_sample cannot run while adapter {state.name!r} is active: it trains base biases "
                f"(bias={state.option!r}), which are in the model for every row and thread while it is; "
                f"set_active() without {state.name!r} first"
            )


def new_adapter_biases(
    model: nn.Module, method: str, name: str, config: Any, sites: Sequence[LayerSite]
) -> AdapterBiases | None:
    """Record the biases adapter ``name`` trains (none for ``bias="none"``)."""
    option = bias_option(config)
    if option == "none":
        return None
    targets = bias_targets(model, method, name, option, sites)
    offloaded = [key for key, (module, _) in targets.items() if _bias_of(module).is_meta]
    if offloaded:
        raise UnsupportedOperationError(
            f"{method} adapter {name!r} has bias={option!r}, but biases it would train are offloaded by accelerate "
            f"(on the meta device: {offloaded[:3]}); attach it before dispatching the model, or use bias='none'"
        )
    state = AdapterBiases(method, name, option, targets)
    # A plain attribute, not a submodule: it stays out of state_dict() and named_modules().
    model.__dict__.setdefault(_STATE, {})[name] = state
    return state


def forget_adapter_biases(model: nn.Module, name: str) -> None:
    """Adapter ``name`` is deleted: its biases leave the model, the originals come back."""
    state = model.__dict__.get(_STATE, {}).pop(name, None)
    if state is not None:
        state.restore()

