"""An adapter's tensors in checkpoint form: which keys a config's layers expect, and checking a state dict."""

from __future__ import annotations

from typing import Any

import torch
from adapterkit import StateDictMismatchError

from .layers import LayerSite

__all__ = ["check_state_dict", "without_saved_base_weights"]

Expected = dict[str, tuple[LayerSite, Any, str]]


def without_saved_base_weights(
    expected: Expected, state_dict: dict[str, torch.Tensor], method: str, name: str
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


def check_state_dict(expected: Expected, state_dict: dict[str, torch.Tensor], method: str, name: str) -> None:
    """Raise :class:`~adapterkit.StateDictMismatchError` naming missing, unexpected, wrong-shaped or integer keys."""
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
    if not (missing or unexpected or wrong or dtypes):
        return
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
