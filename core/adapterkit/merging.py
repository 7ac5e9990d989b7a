"""The order in which adapters fold into the base weights, and when a merge cannot be exact.

A wrapper merges by folding its adapters into the weights of the model's own
layer at the bottom of its stack. That is exact only when every wrapper between
it and that layer computes nothing of its own any more: each active adapter
below is merged already (or earlier in the same merge). So adapters merge
innermost first, whatever the active order, and a merge that would leave an
active adapter unmerged below a merged one is refused before anything changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .errors import AdapterStateError, UnsupportedOperationError
from .layers import AdaptedLayer

__all__ = ["merge_order", "runs"]


def merge_order(
    layers: Sequence[AdaptedLayer],
    names: Sequence[str],
    *,
    active: Sequence[str],
    merged: Sequence[str],
    adapters_of_method: Callable[[str], Sequence[str]],
    can_merge: Callable[[str], bool],
) -> list[str]:
    """``names`` sorted innermost first; raise when merging them would change what the model computes.

    :param layers: the model's adapted layers (:func:`adapterkit.layers.adapted_layers`).
    :param names: the adapters to merge, in the caller's order (kept where the stacks allow).
    :param active: the active adapters; they and ``names`` take part in the forward pass.
    :param merged: the adapters merged already, in merge order.
    :param adapters_of_method: a method's adapters, for wrappers whose plugin does not list theirs.
    :param can_merge: whether a method's plugin implements merging.
    """
    order = {name: i for i, name in enumerate(names)}
    merged_after = set(merged) | set(names)
    taking_part = set(active) | set(names)
    after: dict[str, set[str]] = {name: set() for name in names}  # name -> names that must merge after it
    for layer in layers:
        inner: list[str] = []  # names to merge in the wrappers seen so far (inner ones)
        stay: list[tuple[str, str]] = []  # (adapter, method) taking part, unmerged, at or below this depth
        for depth, wrapper in enumerate(layer.wrappers):
            held = wrapper.adapters if wrapper.adapters is not None else adapters_of_method(wrapper.method)
            here = [n for n in held if n in order]
            stay += [(n, wrapper.method) for n in held if n in taking_part and n not in merged_after]
            if here and stay:
                _refuse(layer, here, stay, can_merge)
            if here:
                outer_merged = [
                    n
                    for w in layer.wrappers[depth + 1 :]
                    for n in (w.adapters if w.adapters is not None else adapters_of_method(w.method))
                    if n in merged
                ]
                if outer_merged:
                    raise AdapterStateError(
                        f"cannot merge {here} exactly: on layer {layer.path!r} they sit inside {outer_merged}, which "
                        "are merged already (a merge folds innermost first); unmerge() and merge them all at once"
                    )
            for first in inner:
                after[first].update(n for n in here if n != first)
            inner += here
    return _sorted(after, order)


def _refuse(layer: AdaptedLayer, here: list[str], stay: list[tuple[str, str]], can_merge: Callable[[str], bool]) -> None:
    names = sorted({n for n, _ in stay})
    fixed = [f"{n!r} ({m})" for n, m in stay if not can_merge(m)]
    where = f"on layer {layer.path!r} (wrapped by {', '.join(layer.methods)}, innermost first)"
    if fixed:
        raise UnsupportedOperationError(
            f"cannot merge {here} exactly {where}: active adapters {', '.join(fixed)} sit between them and the "
            "layer's weights and cannot be merged; set_active() without them, or keep the adapters unmerged"
        )
    raise AdapterStateError(
        f"cannot merge {here} exactly {where}: the active adapters {names} at or below them would stay unmerged "
        f"(a merged layer computes only its merged weights); merge them together, e.g. merge({sorted(set(names) | set(here))!r}), "
        "or set_active() without them first"
    )


def _sorted(after: dict[str, set[str]], order: dict[str, int]) -> list[str]:
    """Topological order of ``after`` (an edge ``a -> b``: ``a`` first), ties in ``order``."""
    waiting = {name: 0 for name in after}
    for successors in after.values():
        for name in successors:
            waiting[name] += 1
    ready = sorted((name for name, count in waiting.items() if count == 0), key=order.__getitem__)
    result = []
    while ready:
        name = ready.pop(0)
        result.append(name)
        for successor in after[name]:
            waiting[successor] -= 1
            if waiting[successor] == 0:
                ready.append(successor)
                ready.sort(key=order.__getitem__)
    if len(result) < len(after):
        tangled = sorted(set(after) - set(result), key=order.__getitem__)
        raise UnsupportedOperationError(
            f"cannot merge {tangled} exactly: they wrap each other in different orders on different layers, so no "
            "merge order is innermost first everywhere; merge fewer of them, or keep them unmerged"
        )
    return result


def runs(names: Sequence[str], method_of: Callable[[str], object]) -> list[list[str]]:
    """``names`` cut into runs of consecutive names of the same method (one hook call each)."""
    groups: list[list[str]] = []
    for name in names:
        if groups and method_of(groups[-1][-1]) == method_of(name):
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups
