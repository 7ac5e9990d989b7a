"""The three systems under comparison, behind one small driver interface.

* ``adapterkit``: ``adapterkit.attach(model)`` on its own clone of the base model.
* ``peft``: ``PeftModel.from_pretrained`` for the first adapter, ``load_adapter``
  for the others (peft's documented way to hold several), ``set_adapter``,
  ``merge_adapter``, ``forward(..., adapter_names=rows)``.
* ``transformers``: the ``PeftAdapterMixin`` methods that ``LlamaForCausalLM``
  carries (``load_adapter``, ``set_adapter``, ``delete_adapter``).

Each driver can ``reset()`` to the ready base model (no adapter, original module
tree), outside any timing, so every "first load" starts from the same state.
An operation a system does not offer raises :class:`NotOffered`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from workload import clone

SYSTEMS = ("adapterkit", "peft", "transformers")


class NotOffered(Exception):
    """The system has no API for this operation."""


def _snapshot_children(model: nn.Module) -> list[tuple[nn.Module, dict[str, nn.Module]]]:
    return [(module, dict(module._modules)) for module in model.modules()]


def _restore_children(snapshot: list[tuple[nn.Module, dict[str, nn.Module]]]) -> None:
    for module, children in snapshot:
        module._modules.clear()
        module._modules.update(children)


class Driver:
    key = ""

    def __init__(self, base: nn.Module) -> None:
        self.model = clone(base)
        self.names: list[str] = []
        self.tree = _snapshot_children(self.model)

    # The interface -------------------------------------------------------
    def load(self, folder: Path, name: str, trainable: bool = False) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def set_active(self, name: str, trainable: bool) -> None:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.model(input_ids=ids, use_cache=False).logits

    def merge(self) -> None:
        raise NotOffered("merge")

    def unmerge(self) -> None:
        raise NotOffered("unmerge")

    def mixed(self, rows: list[str], ids: torch.Tensor) -> Any:
        raise NotOffered("per-sample mixed batch")

    def tuner_layers(self) -> list[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]


class AdapterkitDriver(Driver):
    key = "adapterkit"

    def __init__(self, base: nn.Module) -> None:
        import adapterkit

        super().__init__(base)
        self.adapters = adapterkit.attach(self.model)

    def load(self, folder: Path, name: str, trainable: bool = False) -> None:
        self.adapters.load(str(folder), name, is_trainable=trainable)
        self.names.append(name)

    def delete(self, name: str) -> None:
        self.adapters.delete(name)
        self.names.remove(name)

    def reset(self) -> None:
        if self.adapters.merged:
            self.adapters.unmerge()
        for name in list(self.adapters.names):
            self.adapters.delete(name)  # the last delete unwraps every layer
        self.names = []

    def set_active(self, name: str, trainable: bool) -> None:
        self.adapters.set_active(name)  # trainable or not was fixed at load (is_trainable=)

    def merge(self) -> None:
        self.adapters.merge()

    def unmerge(self) -> None:
        self.adapters.unmerge()

    def mixed(self, rows: list[str], ids: torch.Tensor) -> Any:
        with torch.no_grad(), self.adapters.per_sample(rows):
            return self.model(input_ids=ids, use_cache=False).logits


class PeftDriver(Driver):
    key = "peft"

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.peft_model = None
        self.low_cpu_mem_usage = False

    @property
    def runner(self) -> nn.Module:
        return self.peft_model if self.peft_model is not None else self.model

    def load(self, folder: Path, name: str, trainable: bool = False) -> None:
        from peft import PeftModel

        if self.peft_model is None:
            self.peft_model = PeftModel.from_pretrained(
                self.model,
                str(folder),
                adapter_name=name,
                is_trainable=trainable,
                low_cpu_mem_usage=self.low_cpu_mem_usage,
            )
        else:
            # Does not activate the new adapter (peft's semantics); set_adapter does.
            self.peft_model.load_adapter(
                str(folder), adapter_name=name, is_trainable=trainable, low_cpu_mem_usage=self.low_cpu_mem_usage
            )
        self.names.append(name)

    def delete(self, name: str) -> None:
        if len(self.names) == 1:
            self.reset()
            return
        self.peft_model.delete_adapter(name)
        self.names.remove(name)

    def reset(self) -> None:
        if self.peft_model is not None:
            try:
                self.peft_model.unload()  # removes every adapter layer, gives back the base model's module tree
            finally:
                self.peft_model = None
                self.model.__dict__.pop("peft_config", None)
                _restore_children(self.tree)
        self.names = []

    def set_active(self, name: str, trainable: bool) -> None:
        self.peft_model.set_adapter(name, inference_mode=not trainable)

    def forward(self, ids: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.runner(input_ids=ids, use_cache=False).logits

    def merge(self) -> None:
        self.peft_model.merge_adapter()

    def unmerge(self) -> None:
        self.peft_model.unmerge_adapter()

    def mixed(self, rows: list[str], ids: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.peft_model(input_ids=ids, adapter_names=rows, use_cache=False).logits


class TransformersDriver(Driver):
    key = "transformers"

    def load(self, folder: Path, name: str, trainable: bool = False) -> None:
        self.model.load_adapter(str(folder), adapter_name=name, is_trainable=trainable)
        self.names.append(name)

    def delete(self, name: str) -> None:
        self.model.delete_adapter(name)
        self.names.remove(name)
        if not self.names:
            self.reset()

    def reset(self) -> None:
        try:
            if self.names:
                self.model.delete_adapter(list(self.names))
        finally:
            # delete_adapter leaves empty peft wrappers: put the original modules back. A failed load_adapter
            # leaves its config behind (transformers does not roll back): drop every trace of adapters.
            _restore_children(self.tree)
            self.model.__dict__.pop("peft_config", None)
            self.model._hf_peft_config_loaded = False
            self.names = []

    def set_active(self, name: str, trainable: bool) -> None:
        self.model.set_adapter(name)  # trainable or not was fixed at load (is_trainable=)


DRIVERS = {"adapterkit": AdapterkitDriver, "peft": PeftDriver, "transformers": TransformersDriver}
