"""What a failed ``add``/``load`` puts back: every module's attributes, children, parameters, buffers and hooks.

:class:`Snapshot` is taken before a plugin injects an adapter; if the injection or the load
fails, the core calls the plugin's ``delete`` and then :meth:`Snapshot.restore`, so the model
ends exactly as it was, whatever the plugin did to it (wrapped layers, forward hooks, attributes
it set on modules, ``requires_grad``, train/eval mode).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from .layers import claim, owner

__all__ = ["Snapshot"]

_MISSING = object()
# The tables torch keeps in a module's __dict__ and changes in place (children, parameters, hooks, ...).
_TABLES = (
    "_modules", "_parameters", "_buffers", "_non_persistent_buffers_set",
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)  # fmt: skip


class Snapshot:
    """The parts of a model an injection may change, to put back after a failure.

    For every module: its attributes (``__dict__``: which exist and which object each holds) and
    the contents of torch's tables (children, parameters, buffers, every kind of hook); for every
    parameter, ``requires_grad``. The per-adapter containers of the adapters already attached (a
    ``ModuleDict`` or ``ParameterDict`` keyed by their names, such as peft's ``lora_A``) are not
    entered: the plugin's ``delete`` removes the failed adapter's entries from those, and adapterkit
    re-applies the other adapters' ``requires_grad``. So the cost does not grow with the adapters loaded.
    """

    def __init__(self, model: nn.Module, adapters: Iterable[str] = ()) -> None:
        names = frozenset(adapters)
        self.modules: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = []
        self.requires_grad: list[tuple[nn.Parameter, bool]] = []
        seen: set[int] = set()
        stack = [model]
        while stack:
            module = stack.pop()
            if id(module) in seen or (names and _adapter_container(module, names)):
                continue
            seen.add(id(module))
            attributes = module.__dict__.copy()
            # Only the tables that hold something (most hook tables are empty): a load takes this snapshot.
            filled = {key: table.copy() for key in _TABLES if (table := attributes.get(key))}
            self.modules.append((module, attributes, filled))
            self.requires_grad.extend((p, p.requires_grad) for p in module._parameters.values() if p is not None)
            stack.extend(child for child in module._modules.values() if child is not None)

    def claim_new_wrappers(self, method: str) -> None:
        """Record ``method`` as the owner of every wrapper an injection put in place of a recorded child.

        A wrapper keeps what it replaced as ``base_layer``; the chain from the new child down to the
        old one is the injection's (unless already claimed: another method's wrapper below, or the
        plugin's own :func:`~adapterkit.layers.claim`). A replacement that does not keep the old child
        as ``base_layer`` is recorded too, as an opaque wrapper.
        """
        for module, _, filled in self.modules:
            children = filled.get("_modules", {})
            for attr, child in module._modules.items():
                old = children.get(attr, child)
                node = child
                while node is not None and node is not old and owner(node) is None:
                    claim(node, method)
                    node = node._modules.get("base_layer")

    def restore(self) -> None:
        for module, attributes, filled in self.modules:
            current = module.__dict__
            for key in [key for key in current if key not in attributes]:
                del current[key]  # an attribute set during the failed operation
            for key, value in attributes.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
            for key in _TABLES:
                table = current.get(key)
                if table is not None:
                    table.clear()
                    table.update(filled.get(key, ()))
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)


def _adapter_container(module: nn.Module, names: frozenset[str]) -> bool:
    """Whether ``module`` holds per-adapter entries: a ModuleDict/ParameterDict whose first key names an adapter."""
    if not isinstance(module, (nn.ModuleDict, nn.ParameterDict)):
        return False
    entries = module._modules or module._parameters
    return bool(entries) and next(iter(entries)) in names
