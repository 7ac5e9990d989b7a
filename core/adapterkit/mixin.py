"""transformers' adapter API (``PeftAdapterMixin`` names) for any ``nn.Module``.

``class MyModel(AdapterMixin, nn.Module)`` gains ``load_adapter``,
``add_adapter``, ``set_adapter``, ... as thin wrappers over :func:`attach`,
with transformers' argument names and return conventions.

On a transformers model (``class MyLlama(AdapterMixin, LlamaForCausalLM)``) it
also takes over where transformers' own peft integration would act:
``MyLlama.from_pretrained(adapter_folder)`` loads the base model named in the
adapter's config and then the adapter through :meth:`AdapterMixin.load_adapter`;
``save_pretrained`` writes the active adapter in peft's format (and the
generation config), not the base model; and ``_hf_peft_config_loaded``, the
marker transformers reads (gradient checkpointing, quantized-model checks in
``Trainer``), is true while adapters are attached.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, NoAdaptersError, UnsupportedOperationError
from .model import DEFAULT_NAME, Adapters, attach, attached

__all__ = ["AdapterMixin"]

# What transformers' from_pretrained hands load_adapter in load_config.download_kwargs that also applies to the
# adapter (the revision there may already be the base model's, resolved from the adapter's base_model_name_or_path).
_DOWNLOAD_KEYS = ("cache_dir", "local_files_only", "token", "subfolder")


class AdapterMixin:
    """Gives an ``nn.Module`` subclass transformers' adapter methods, backed by :class:`Adapters`."""

    @property
    def adapterkit(self) -> Adapters:
        """The model's :class:`Adapters` (same as ``adapterkit.attach(self)``)."""
        return attach(self)  # type: ignore[arg-type]

    @property
    def _hf_peft_config_loaded(self) -> bool:
        """transformers' marker of a model carrying adapters: true while any adapter is attached."""
        return attached(self) is not None  # type: ignore[arg-type]

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
        load_config: Any = None,
        low_cpu_mem_usage: bool = False,
        hotswap: bool | str = "auto",
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> None:
        """Load an adapter like transformers' ``load_adapter``; see :meth:`Adapters.load`.

        ``adapter_kwargs`` may hold ``subfolder``, ``cache_dir``,
        ``local_files_only``, ``token``, ``revision``, ``allow_pickle`` and ``allow_nonfinite``.
        ``load_config`` is what transformers' ``from_pretrained`` passes when it is
        given an adapter folder: its download options (cache folder, local files
        only, token, subfolder) apply to the adapter too. ``low_cpu_mem_usage`` is
        accepted and has no effect (adapterkit always creates loaded weights
        empty). Device placement arguments need the dispatch plugin
        (``adapterkit-dispatch``).
        """
        if hotswap is True:
            raise UnsupportedOperationError(
                "load_adapter(hotswap=True) is not supported; delete() the adapter and load the new one, "
                "or use a second name and set_adapter()"
            )
        downloads = getattr(load_config, "download_kwargs", None) or {}
        options = {k: downloads[k] for k in _DOWNLOAD_KEYS if downloads.get(k)}
        options.update(adapter_kwargs or {})
        options.update(kwargs)
        if local_files_only:
            options["local_files_only"] = True
        if "revision" in options:
            revision = options.pop("revision") if revision is None else revision
        if "token" in options:
            token = options.pop("token") if token is None else token
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

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        """With adapters attached: save the active adapter in peft's format, as transformers does for peft adapters.

        ``save_directory`` gets ``adapter_config.json`` and ``adapter_model.safetensors``
        of the one active adapter (whatever its name), plus the generation config of a
        model that generates; no base weights and no ``config.json``. Several active
        adapters are refused, as in transformers: :meth:`Adapters.save` saves any set.
        ``is_main_process=False`` writes nothing; ``state_dict`` (a distributed trainer's
        gathered full state) is not needed, the adapter's tensors are read from the model;
        ``push_to_hub`` is not supported. Without adapters this is the base class's
        ``save_pretrained`` (a plain ``nn.Module`` has none: :class:`NoAdaptersError`).
        """
        handle = attached(self)  # type: ignore[arg-type]
        if handle is None:
            parent = getattr(super(), "save_pretrained", None)
            if parent is None:
                raise NoAdaptersError("save_pretrained: the model has no adapters to save; add() or load() one first")
            return parent(save_directory, *args, **kwargs)
        if kwargs.get("push_to_hub"):
            raise UnsupportedOperationError(
                "save_pretrained(push_to_hub=True) is not supported for adapters; save, then upload the folder "
                "with huggingface_hub's upload_folder"
            )
        if not kwargs.get("is_main_process", True):
            return None
        name = handle._single(None, "save_pretrained (transformers saves the one active adapter)")
        save_adapter_folder(handle, name, save_directory)
        if getattr(self, "can_generate", None) is not None and self.can_generate():
            self.generation_config.save_pretrained(save_directory)
        return None


def save_adapter_folder(adapters: Adapters, name: str, directory: Any) -> None:
    """Write adapter ``name`` in peft's format into ``directory`` itself, replacing what is there."""
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot save adapter {name!r} to {str(folder)!r}: it is a file, not a folder")
    adapters._write(name, folder)
