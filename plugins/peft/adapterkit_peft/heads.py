"""Heads and other fully trained modules: peft's ``modules_to_save`` and the heads its task types add.

A module named in ``modules_to_save`` (a classifier, say) gets wrapped in peft's
``ModulesToSaveWrapper``: each adapter has its own trainable copy, the active
adapter's copy computes, and with no adapter active, or adapters disabled, the
original module does. The copies are saved with peft's keys (the module's path
and its own state keys, ``classifier.weight``), so SEQ_CLS adapters move between
peft and adapterkit both ways.

``task_type`` adds what peft's task models add: ``SEQ_CLS`` and ``TOKEN_CLS``
the modules named ``classifier`` and ``score``, ``QUESTION_ANS`` ``qa_outputs``
(those the model has). As in peft, the config then lists them in
``modules_to_save``, so the saved ``adapter_config.json`` does too.

One wrapper may hold copies for adapters of several peft methods (names are
unique across methods); only one copy computes at a time, so two active adapters
with a copy of the same module are refused, as peft refuses them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from adapterkit import AdapterStateError
from adapterkit.layers import claim
from adapterkit.routing import this_thread_only
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

__all__ = ["HEAD_PRESETS", "HeadSite", "add_heads", "delete_heads", "head_sites", "head_state", "load_head_state",
           "enable_heads", "prepare_heads", "routed_heads", "set_active_heads", "warn_untied"]  # fmt: skip

# What peft's PeftModelFor<Task> classes add to modules_to_save.
HEAD_PRESETS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
OWNERS = "_adapterkit_heads"  # wrapper attribute: {adapter name: method name}
# The owner recorded for head wrappers (adapterkit.layers): shared by the peft methods, part of no merge stack.
HEADS_OWNER = "modules_to_save"


class HeadSite:
    """A ``ModulesToSaveWrapper`` in a model: its path (peft's key prefix), where it sits, the wrapper."""

    __slots__ = ("path", "parent", "attr", "wrapper")

    def __init__(self, path: str, parent: nn.Module, attr: str, wrapper: ModulesToSaveWrapper) -> None:
        self.path, self.parent, self.attr, self.wrapper = path, parent, attr, wrapper


def _task(config: Any) -> str | None:
    task = getattr(config, "task_type", None)
    return getattr(task, "value", task)


def prepare_heads(config: Any) -> None:
    """Add the task type's heads to ``config.modules_to_save``, as peft's task models do (in place)."""
    preset = HEAD_PRESETS.get(_task(config) or "")
    if not preset or not hasattr(config, "modules_to_save"):
        return
    current = list(config.modules_to_save or [])
    config.modules_to_save = current + [name for name in preset if name not in current]


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """``(path, parent, attr, module)`` of the modules outside adapter layers and head wrappers (which are yielded)."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            continue
        children = [(f"{path}.{a}" if path else a, a, c) for a, c in module._modules.items() if c is not None]
        for child_path, attr, child in children:
            yield child_path, module, attr, child
        stack.extend((p, c) for p, _, c in reversed(children))


CACHE_KEY = "heads"  # in the model's glue cache (adapterkit_peft.method): the head sites, until a method adds or deletes


def head_sites(model: nn.Module, cache: dict[Any, Any] | None = None) -> list[HeadSite]:
    """Every ``ModulesToSaveWrapper`` of the model, in module order (remembered in ``cache`` when given)."""
    found = cache.get(CACHE_KEY) if cache is not None else None
    if found is None:
        found = [HeadSite(p, parent, a, m) for p, parent, a, m in _walk(model) if isinstance(m, ModulesToSaveWrapper)]
        if cache is not None:
            cache[CACHE_KEY] = found
    return found


def add_heads(model: nn.Module, method: str, name: str, config: Any) -> list[HeadSite]:
    """Give adapter ``name`` its copy of every module ``config.modules_to_save`` names (peft's suffix match).

    Wraps modules not wrapped yet; a wrapper another adapter made gets one more copy. The copies
    start inactive; :func:`set_active_heads` activates them.
    """
    wanted = list(getattr(config, "modules_to_save", None) or [])
    if not wanted:
        return []
    sites = []
    for path, parent, attr, module in list(_walk(model)):
        if not any(path.endswith(key) for key in wanted):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.update(name)
            wrapper = module
        else:
            wrapper = ModulesToSaveWrapper(module, name)
            wrapper.set_adapter([])
            claim(wrapper, HEADS_OWNER)
            setattr(parent, attr, wrapper)
        owners = wrapper.__dict__.setdefault(OWNERS, {})
        owners[name] = method
        copy = wrapper.modules_to_save[name]
        copy.requires_grad_(False)
        for child in copy.modules():  # the copy trains and evaluates with the module it copies
            child.__dict__["training"] = wrapper.original_module.training
        sites.append(HeadSite(path, parent, attr, wrapper))
    return sites


def warn_untied(model: nn.Module, method: str, name: str, config: Any, sites: Sequence[HeadSite]) -> None:
    """Say so when a head copy breaks a weight tie (peft unties silently unless ``ensure_weight_tying``)."""
    counts: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                counts[id(param)] = counts.get(id(param), 0) + 1
    for site in sites:
        shared = [n for n, p in site.wrapper.original_module.named_parameters() if counts.get(id(p), 0) > 1]
        if shared:
            warnings.warn(
                f"{method} adapter {name!r}: modules_to_save copies {site.path!r}, whose {shared} is tied to another "
                "module (tied input embeddings and lm_head, say). The copy trains alone, so while this adapter is "
                "active the tie is broken: the other module keeps the original weights (peft does the same without "
                "saying so). adapterkit cannot keep such a tie yet; to train both sides, name both modules.",
                UserWarning,
                stacklevel=5,
            )


def set_active_heads(
    model: nn.Module, method: str, names: Sequence[str], trainable: Sequence[str], cache: dict[Any, Any]
) -> None:
    """Make the copies of ``method``'s active adapters compute; only ``trainable`` ones get gradients."""
    wanted = set(trainable)
    for site in head_sites(model, cache):
        wrapper = site.wrapper
        owners = wrapper.__dict__.get(OWNERS, {})
        mine = [n for n, owner in owners.items() if owner == method]
        if not mine:
            continue
        active = [n for n in names if n in mine]
        if len(active) > 1:
            raise AdapterStateError(
                f"adapters {active} each have their own copy of {site.path!r} (modules_to_save); only one copy can "
                "compute at a time, so activate one of them (peft refuses the same)"
            )
        current = wrapper.active_adapters
        if active:
            wrapper.__dict__["_active_adapter"] = active[0]
        elif current and current[0] in mine:
            wrapper.__dict__["_active_adapter"] = []
        for n in mine:
            wrapper.modules_to_save[n].requires_grad_(n in wanted and n in active and not wrapper.disable_adapters)


def enable_heads(model: nn.Module, method: str, enabled: bool, cache: dict[Any, Any]) -> None:
    """peft's ``enable_adapters`` on the wrappers holding copies of ``method``'s adapters."""
    for site in head_sites(model, cache):
        if method in site.wrapper.__dict__.get(OWNERS, {}).values():
            site.wrapper.enable_adapters(enabled)


def head_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s copies with peft's keys (``<module path>.<key>``), detached."""
    return {
        f"{site.path}.{key}": value.detach()
        for site in head_sites(model)
        if name in site.wrapper.modules_to_save
        for key, value in site.wrapper.modules_to_save[name].state_dict().items()
    }


def load_head_state(model: nn.Module, name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy the head tensors of ``state_dict`` (keys as :func:`head_state` makes them) into adapter ``name``'s copies."""
    for site in head_sites(model):
        if name not in site.wrapper.modules_to_save:
            continue
        copy = site.wrapper.modules_to_save[name]
        prefix = f"{site.path}."
        copy.load_state_dict({k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)})


def delete_heads(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``'s copies; a wrapper left with none is replaced by the module it wrapped."""
    for site in head_sites(model):
        wrapper = site.wrapper
        if name not in wrapper.modules_to_save:
            continue
        if name in wrapper.active_adapters:
            wrapper.__dict__["_active_adapter"] = []
        del wrapper.modules_to_save[name]
        wrapper._adapters.discard(name)
        wrapper.__dict__.get(OWNERS, {}).pop(name, None)
        if not len(wrapper.modules_to_save):
            setattr(site.parent, site.attr, wrapper.original_module)


@contextlib.contextmanager
def routed_heads(model: nn.Module, rows: Sequence[str]) -> Iterator[None]:
    """Inside the block, each head wrapper computes row ``i`` with adapter ``rows[i]``'s copy (others: the original)."""
    handles = []
    for site in head_sites(model):
        copies = site.wrapper.modules_to_save
        routed = [row if row in copies else "__base__" for row in rows]

        def route(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], routed: list[str] = routed) -> Any:
            return args, {**kwargs, "adapter_names": routed}

        # Only in the thread that opened the block: other threads' forwards keep the active heads.
        handles.append(site.wrapper.register_forward_pre_hook(this_thread_only(route), with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
