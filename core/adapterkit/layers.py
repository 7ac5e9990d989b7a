"""The stacks of wrappers on adapted layers: who wraps whom, and which method owns each wrapper.

A method adapts a layer by *wrapping* it: it puts a module in the layer's place
that keeps the module it replaced as its child ``base_layer`` (peft's
convention, and the contract for every plugin). Several methods may wrap the
same layer, so each adapted layer carries a stack of wrappers, innermost first::

    model.q_proj = LoRA wrapper ──base_layer──▶ IA3 wrapper ──base_layer──▶ nn.Linear
                   (outermost, added last)                                  (the model's own layer)

Ownership is explicit and public: after every ``adapterkit_inject`` the core
records the method on each wrapper the injection put in place (an attribute
named :data:`OWNER_ATTR` on the wrapper; read it with :func:`owner`). A plugin
may :func:`claim` its wrappers itself while it injects, to find them again
before the hook returns. Plugins use the record to tell their own wrappers
from everyone else's, and the core uses it to merge innermost first.

The *logical path* of a module is its path with the ``base_layer`` hops of
wrappers left out: the path it has in the model without adapters, whatever
wraps it. Checkpoint keys are built from logical paths, so an adapter's keys do
not depend on the other methods present.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import attrs
from torch import nn

__all__ = [
    "OWNER_ATTR",
    "AdaptedLayer",
    "Wrapper",
    "adapted_layers",
    "claim",
    "innermost",
    "owner",
    "positions",
    "walk",
]

OWNER_ATTR = "adapterkit_owner"
"""The attribute on a wrapper module naming the adapter method that owns it."""


def owner(module: nn.Module) -> str | None:
    """The method that owns ``module`` as a wrapper, or ``None`` when it is not a wrapper."""
    return module.__dict__.get(OWNER_ATTR)


def claim(module: nn.Module, method: str) -> None:
    """Record ``method`` as the owner of wrapper ``module`` (a plain attribute: not in ``state_dict()``)."""
    module.__dict__[OWNER_ATTR] = method


def innermost(module: nn.Module) -> nn.Module:
    """The module at the bottom of the stack ``module`` tops: ``base_layer`` of wrappers, followed down."""
    while owner(module) is not None:
        base = module._modules.get("base_layer")
        if base is None:
            break  # an opaque wrapper: it hides what it wraps
        module = base
    return module


def walk(
    model: nn.Module, keep: Callable[[nn.Module], bool] | None = None
) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """``(logical path, parent, attr, module)`` for every module below ``model``, parents before children.

    ``getattr(parent, attr) is module``. A wrapper is followed into its ``base_layer``
    only (which keeps the wrapper's logical path); what it holds for its adapters is
    never entered, so the walk costs the same with 1 or 100 adapters loaded.

    :param keep: wrappers whose ``base_layer`` hop stays in the path. peft keys an
        adapter's layers by their path with that adapter alone on the model, hops of
        its own wrappers included: where one of its layers nests another of the same
        adapter inside its base (peft's ``MultiheadAttention`` layer and its ``out_proj``),
        the inner keys read ``mha.base_layer.out_proj.…``.
    """
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if owner(module) is not None:
            base = module._modules.get("base_layer")
            if keep is not None and keep(module):
                base_path = f"{path}.base_layer" if path else "base_layer"
            else:
                base_path = path
            children = [(base_path, "base_layer", base)] if base is not None else []
        else:
            children = [
                (f"{path}.{attr}" if path else attr, attr, child)
                for attr, child in module._modules.items()
                if child is not None
            ]
        for child_path, attr, child in children:
            yield child_path, module, attr, child
        stack.extend((child_path, child) for child_path, _, child in reversed(children))


def positions(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """What :func:`walk` yields, without the modules below a wrapper: one entry per logical path, its outermost module."""
    for path, parent, attr, module in walk(model):
        if attr != "base_layer" or owner(parent) is None:
            yield path, parent, attr, module


@attrs.frozen
class Wrapper:
    """One wrapper of an adapted layer."""

    module: nn.Module = attrs.field(repr=lambda m: type(m).__name__)
    method: str
    adapters: tuple[str, ...] | None
    """The adapters it holds, as its plugin reports them (``adapterkit_layer_adapters``); ``None`` when the plugin does not say."""


@attrs.frozen
class AdaptedLayer:
    """A layer of the model and the stack of wrappers adapting it."""

    path: str
    """The logical path: the layer's path in the model without adapters."""
    parent: nn.Module = attrs.field(repr=False)
    """The module holding the outermost wrapper: ``getattr(parent, attr) is wrappers[-1].module``."""
    attr: str
    wrappers: tuple[Wrapper, ...]
    """Innermost first: ``wrappers[i + 1].module.base_layer is wrappers[i].module``."""
    base: nn.Module = attrs.field(repr=lambda m: type(m).__name__)
    """The model's own module, at the bottom of the stack."""

    @property
    def methods(self) -> tuple[str, ...]:
        """The owners of the wrappers, innermost first."""
        return tuple(wrapper.method for wrapper in self.wrappers)


def adapted_layers(
    model: nn.Module, adapters_of: Callable[[nn.Module, str], Sequence[str] | None] | None = None
) -> list[AdaptedLayer]:
    """Every adapted layer of ``model`` with its stack, by logical path.

    :param adapters_of: ``(wrapper, method) -> adapter names`` (or ``None``), to fill
        :attr:`Wrapper.adapters`; without it every ``adapters`` is ``None``.
    """
    found = []
    for path, parent, attr, module in positions(model):
        chain = []
        node = module
        while owner(node) is not None:
            chain.append(node)
            base = node._modules.get("base_layer")
            if base is None:
                break
            node = base
        if not chain:
            continue
        wrappers = []
        for wrapper in reversed(chain):
            method = owner(wrapper)
            assert method is not None
            names = adapters_of(wrapper, method) if adapters_of is not None else None
            wrappers.append(Wrapper(wrapper, method, None if names is None else tuple(names)))
        found.append(AdaptedLayer(path, parent, attr, tuple(wrappers), node))
    return sorted(found, key=lambda layer: layer.path)
