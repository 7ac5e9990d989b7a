"""transformers' adapter API (``PeftAdapterMixin`` names) for any ``nn.Module``.

``class MyModel(AdapterMixin, nn.Module)`` gains ``load_adapter``,
``add_adapter``, ``set_adapter``, ... as thin wrappers over :func:`attach`,
with transformers' argument names and return conventions.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from .model import DEFAULT_NAME, Adapters, attach

__all__ = ["AdapterMixin"]


class AdapterMixin:
    """Gives an ``nn.Module`` subclass transformers' adapter methods, backed by :class:`Adapters`."""

    @property
    def adapterkit(self) -> Adapters:
        """The model's :class:`Adapters` (same as ``adapterkit.attach(self)``)."""
        return attach(self)  # type: ignore[arg-type]

    def load_adapter(
        self,
        peft_model_id: str | None = None,
        adapter_name: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        device_map: Any = None,
        max_memory: Any = None,
        offload_folder: str | None = None,
        offload_index: dict[str, Any] | None = None,
        peft_config: Any = None,
        adapter_state_dict: Mapping[str, torch.Tensor] | None = None,
        is_trainable: bool = False,
        adapter_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Load an adapter like transformers' ``load_adapter``; see :meth:`Adapters.load`.

        ``adapter_kwargs`` may hold ``subfolder``, ``cache_dir``,
        ``local_files_only``, ``allow_pickle`` and ``allow_nonfinite``. Device placement arguments
        need the dispatch plugin (``adapterkit-dispatch``).
        """
        options = {**(adapter_kwargs or {}), **kwargs}
        unknown = set(options) - {"subfolder", "cache_dir", "local_files_only", "allow_pickle", "allow_nonfinite"}
        if unknown:
            raise TypeError(f"load_adapter() got unexpected arguments {sorted(unknown)}")
        self.adapterkit.load(
            peft_model_id,
            adapter_name,
            revision=revision,
            token=token,
            config=peft_config,
            state_dict=adapter_state_dict,
            is_trainable=is_trainable,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
            offload_index=offload_index,
            **options,
        )

    def add_adapter(self, adapter_config: Any, adapter_name: str | None = None) -> None:
        """Add a new trainable adapter and make it active; see :meth:`Adapters.add`."""
        self.adapterkit.add(adapter_config, DEFAULT_NAME if adapter_name is None else adapter_name)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` (one name or a list) the active adapters."""
        self.adapterkit.set_active(adapter_name)

    def disable_adapters(self) -> None:
        """Compute as the base model; adapters stay attached."""
        self.adapterkit.disable()

    def enable_adapters(self) -> None:
        """Undo :meth:`disable_adapters`."""
        self.adapterkit.enable()

    def active_adapters(self) -> list[str]:
        """The active adapters' names."""
        self.adapterkit._require_adapters("list active adapters")
        return self.adapterkit.active

    def active_adapter(self) -> str:
        """Deprecated in transformers: the first active adapter. Use :meth:`active_adapters`."""
        warnings.warn(
            "active_adapter() is deprecated, use active_adapters() instead", FutureWarning, stacklevel=2
        )
        return self.active_adapters()[0]

    def get_adapter_state_dict(
        self, adapter_name: str | None = None, state_dict: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed relative to the model (no ``base_model.model.`` prefix).

        ``adapter_name`` defaults to the first active adapter, as in transformers.
        """
        if state_dict is not None:
            raise TypeError("get_adapter_state_dict(state_dict=...) is not supported; the adapter's own tensors are used")
        adapters = self.adapterkit
        if adapter_name is None:
            adapter_name = self.active_adapters()[0] if adapters.active else None
        return adapters.state_dict(adapter_name, prefix="")

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        """Delete one adapter or several."""
        for name in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
            self.adapterkit.delete(name)
