"""The plugin contract: pluggy hook specifications.

A plugin is any object or module with functions marked ``@adapterkit.hookimpl``
whose names match the specs below, registered through the ``adapterkit``
entry-point group. The core calls the hooks with keyword arguments only, so a
spec can gain arguments without breaking existing plugins.

Three kinds of hooks:

* :func:`adapterkit_register_methods` is called on every plugin once, when the
  registry is built. Through it a plugin declares the adapter methods it provides.
* :func:`adapterkit_dispatch` is a *model-level* hook: it places the whole
  model on devices, and the first plugin that returns non-``None`` wins.
* Every other hook is a *per-method* hook. The core calls it on exactly one
  plugin: the one that registered the adapter's method (``method`` argument), so
  a model may carry adapters of several methods side by side. A plugin that
  provides several methods tells them apart by ``method``. Per-method hooks are
  ``firstresult``: the owning plugin's return value is the result. A plugin that
  does not implement an optional hook makes the operation raise
  :class:`~adapterkit.UnsupportedOperationError` for its adapters.

Adapter names are unique across methods on one model; a plugin may use them as
keys (e.g. ``ModuleDict`` keys) without collision. The core validates names,
configs and state before a hook sees them, and rolls a failed add or load back,
so hooks may raise on error without cleaning up after themselves. An exception
from a hook that is not one of adapterkit's errors reaches the caller as a
:class:`~adapterkit.PluginError` naming the plugin, hook and method (the
original is its ``__cause__``); raise adapterkit's own errors (``TargetError``,
``ConfigValueError``, ...) for bad input, and they pass as they are. Hooks are
called with the model's lock held (one operation at a time per model); forwards
run without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import pluggy
import torch
from torch import nn

PROJECT = "adapterkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Declare the adapter methods this plugin provides.

    Call ``register(name, config_type, aliases=(), description="")`` once per
    method. ``name`` is what users write in config strings (``lora[r=8]``);
    ``aliases`` are further names that select it, case-insensitively, such as
    peft's ``peft_type`` (``"LORA"``), which is how saved peft checkpoints find
    their method. ``config_type`` is the class of the method's config; its
    fields are the keys a config string may use.

    :param register: the core's registration callback. Naming and collision
        policy is the core's: a name or alias claimed twice is a
        :class:`~adapterkit.PluginError`.
    """


@hookspec(firstresult=True)
def adapterkit_config_from_dict(method: str, data: dict[str, Any]) -> Any:
    """Build the config object of ``method`` from a plain dict.

    Called for config dicts and saved ``adapter_config.json`` contents. Optional:
    without it the core calls ``config_type(**data)`` after dropping the keys the
    type does not declare.

    :param method: the registered method name.
    :param data: the config's fields; may contain bookkeeping keys such as
        ``peft_type`` or ``peft_version``.
    :returns: the config object.
    """


@hookspec(firstresult=True)
def adapterkit_config_to_dict(method: str, config: Any) -> dict[str, Any]:
    """Turn a config of ``method`` into the JSON-able dict saved as ``adapter_config.json``.

    Optional: without it the core uses the dataclass/attrs fields, adding
    ``peft_type``.

    :param method: the registered method name.
    :param config: a config object of the method's config type.
    :returns: a dict that :func:`adapterkit_config_from_dict` turns back into an equal config.
    """


@hookspec(firstresult=True)
def adapterkit_validate_config(method: str, config: Any) -> None:
    """Check a config before anything touches a model; raise on a bad value.

    Optional. Raise :class:`~adapterkit.ConfigValueError` naming the key, the
    value and the fix (``r`` must be positive, a target list must not be
    empty, ...).

    :param method: the registered method name.
    :param config: the config object about to be used.
    """


@hookspec(firstresult=True)
def adapterkit_inject(
    model: nn.Module, method: str, name: str, config: Any, empty: bool, autocast_adapter_dtype: bool
) -> None:
    """Create adapter ``name`` in ``model``: wrap or extend the targeted layers.

    Required. The new adapter need not be made active; the core calls
    :func:`adapterkit_set_active` right after. Raise
    :class:`~adapterkit.TargetError` when the targets match nothing. On any
    exception the core undoes the injection (it calls :func:`adapterkit_delete`
    and restores the module tree), so the model ends exactly as it was.

    :param model: the model, modified in place.
    :param method: the registered method name.
    :param name: the adapter name, validated and not yet used on this model.
    :param config: the method's config object (the core's own copy; the plugin may normalise it).
    :param empty: ``True`` when weights are about to be loaded: create them on the
        meta device without initialising them; :func:`adapterkit_load_state`
        assigns real tensors.
    :param autocast_adapter_dtype: ``True`` (the default of ``add`` and ``load``): adapter
        weights on a half-precision (float16/bfloat16) layer are made float32, also
        after a load, as peft's ``autocast_adapter_dtype`` does, so small updates are not
        rounded away in training; ``False``: they take the layer's dtype. Methods that
        keep no floating weights ignore it.
    """


@hookspec(firstresult=True)
def adapterkit_set_active(
    model: nn.Module, method: str, names: Sequence[str], trainable: Sequence[str], weights: Sequence[float] | None
) -> None:
    """Make exactly ``names`` the active adapters of ``method``; others of the method go inactive.

    Required. Called after every change that may affect the active set, with the
    complete set for this method (possibly empty).

    :param model: the model.
    :param method: the registered method name.
    :param names: this method's adapters that take part in the forward pass, in order.
    :param trainable: the subset of ``names`` whose parameters get ``requires_grad=True``;
        every other parameter of this method's adapters gets ``requires_grad=False``.
    :param weights: one scale per name (``set_active(names, weights=...)``: each adapter's
        contribution multiplied by its weight, as diffusers' ``set_adapters``), or ``None``
        for weight 1 everywhere. Optional argument: a plugin whose implementation does not
        take ``weights`` makes weighted ``set_active`` raise
        :class:`~adapterkit.UnsupportedOperationError` for its adapters.
    """


@hookspec(firstresult=True)
def adapterkit_enable(model: nn.Module, method: str) -> None:
    """Let this method's adapters act again after :func:`adapterkit_disable`.

    Required. The core re-applies :func:`adapterkit_set_active` afterwards.

    :param model: the model.
    :param method: the registered method name.
    """


@hookspec(firstresult=True)
def adapterkit_disable(model: nn.Module, method: str) -> None:
    """Make this method's adapters act as if absent: forward equals the base model's.

    Required. Adapters stay attached and keep their weights.

    :param model: the model.
    :param method: the registered method name.
    """


@hookspec(firstresult=True)
def adapterkit_extract_state(model: nn.Module, method: str, name: str) -> dict[str, torch.Tensor]:
    """Return adapter ``name``'s tensors, keyed as in a peft checkpoint of this adapter alone.

    Required. Keys are relative to ``model`` and carry no adapter name
    (``layers.0.q_proj.lora_A.weight``); the core adds peft's
    ``base_model.model.`` prefix when writing files. Keys must not depend on
    other adapters present on the same layers.

    :param model: the model.
    :param method: the registered method name.
    :param name: an adapter of this method.
    :returns: name -> tensor (detached; may share storage with the parameters, and with
        each other: ``save`` gives each key its own copy, as peft does). Anything else
        (``None``, non-tensor values) is a :class:`~adapterkit.PluginError`.
    """


@hookspec(firstresult=True)
def adapterkit_load_state(
    model: nn.Module, method: str, name: str, state_dict: dict[str, torch.Tensor]
) -> None:
    """Assign ``state_dict`` (keys as from :func:`adapterkit_extract_state`) to adapter ``name``.

    Required. Strict: raise :class:`~adapterkit.StateDictMismatchError` naming
    the missing, unexpected or wrong-shaped keys. After an injection with
    ``empty=True`` this replaces the meta tensors, placing each on the device
    and dtype of the layer it adapts.

    :param model: the model.
    :param method: the registered method name.
    :param name: an adapter of this method.
    :param state_dict: the tensors to assign, keys without prefix or adapter name.
    """


@hookspec(firstresult=True)
def adapterkit_merge(model: nn.Module, method: str, names: Sequence[str]) -> None:
    """Fold adapters ``names`` into the base weights.

    Optional (raises :class:`~adapterkit.UnsupportedOperationError` for this
    method's adapters when missing). The core never asks to merge an adapter
    that is already merged.

    :param model: the model.
    :param method: the registered method name.
    :param names: this method's adapters to merge, in order.
    """


@hookspec(firstresult=True)
def adapterkit_unmerge(model: nn.Module, method: str, names: Sequence[str]) -> None:
    """Take merged adapters ``names`` back out of the base weights.

    Optional, paired with :func:`adapterkit_merge`.

    :param model: the model.
    :param method: the registered method name.
    :param names: this method's merged adapters, in the order they were merged.
    """


@hookspec(firstresult=True)
def adapterkit_delete(model: nn.Module, method: str, name: str) -> None:
    """Remove adapter ``name`` and its parameters from the model.

    Required. A layer left with no adapter should be unwrapped back to the
    module it replaced. The core also calls this to undo a failed add or load,
    when the adapter may be only partly injected; it must not raise then.

    :param model: the model.
    :param method: the registered method name.
    :param name: an adapter of this method (never a merged one).
    """


@hookspec(firstresult=True)
def adapterkit_per_sample(
    model: nn.Module, method: str, rows: Sequence[str]
) -> AbstractContextManager[None]:
    """Return a context manager under which forwards route batch row ``i`` through adapter ``rows[i]``.

    Optional. ``rows`` holds one entry per batch row: an adapter of this method,
    another method's adapter, or ``"__base__"``; this method's layers act only on
    rows naming its own adapters and leave the others as the base model
    computes them (the core also calls it when no row names this method's
    adapters). Raise on a forward whose batch size differs from ``len(rows)``.
    The routing must act only on forwards in the thread that enters the context
    manager: other threads keep computing the active adapters, and blocks open
    in several threads at once each route their own rows
    (:func:`adapterkit.routing.replaced_forwards` and
    :func:`~adapterkit.routing.this_thread_only` do that).

    :param model: the model.
    :param method: the registered method name.
    :param rows: adapter name per batch row.
    :returns: a context manager that installs the routing on enter and removes it on exit.
    """


@hookspec(firstresult=True)
def adapterkit_dispatch(
    model: nn.Module,
    device_map: str | dict[str, Any],
    max_memory: dict[Any, Any] | None,
    offload_folder: str | None,
    offload_index: dict[str, Any] | None,
) -> bool | None:
    """Place ``model``, adapters included, on devices (a *model-level* hook, not per method).

    Called by :meth:`Adapters.dispatch` and by ``load(..., device_map=...)``
    after the adapter is attached. The first plugin that returns non-``None``
    wins; with no plugin implementing it the core raises
    :class:`~adapterkit.UnsupportedOperationError` naming ``adapterkit-dispatch``.
    Adapter weights must end on the device of the layer they adapt, also for
    layers offloaded to CPU or disk.

    :param model: the model, already carrying its adapters.
    :param device_map: ``"auto"``, ``"balanced"``, ``"balanced_low_0"``,
        ``"sequential"`` or an explicit ``{module name: device}`` dict
        (devices: an index, ``"cpu"``, ``"disk"``).
    :param max_memory: per-device memory limits, as accelerate takes them.
    :param offload_folder: folder for weights offloaded to disk.
    :param offload_index: an existing offload index to reuse.
    :returns: ``True`` once the model is placed.
    """


# -- composition: stacks of wrappers and checkpoints (issue 12) -------------------------------------------
@hookspec(firstresult=True)
def adapterkit_layer_adapters(model: nn.Module, method: str, layer: nn.Module) -> Sequence[str]:
    """Name the adapters that wrapper ``layer`` of this method holds.

    Optional. The core reads the stacks of wrappers on each adapted layer (see
    :mod:`adapterkit.layers`) to merge innermost first and to refuse a merge that
    would not be exact; this hook tells it which adapters sit at which depth.
    Without it, every wrapper of the method counts as holding all of the
    method's adapters, which is exact but refuses merges it need not.

    :param model: the model.
    :param method: the registered method name.
    :param layer: a wrapper module owned by this method (``adapterkit.layers.owner(layer) == method``).
    :returns: the names of the adapters it holds.
    """


@hookspec
def adapterkit_claim_checkpoint(
    config: dict[str, Any], metadata: dict[str, str], keys: Sequence[str]
) -> str | None:
    """Claim a saved adapter for one of this plugin's methods, before the core falls back to ``peft_type``.

    Optional, called on every plugin when ``load()`` reads a checkpoint that does
    not record the method that wrote it (files adapterkit saved record it in
    their metadata, and that wins). Return the name of one of the plugin's
    methods when the files are that method's (e.g. a LoRA variant recognising
    the keys its config class adds, or its tensor names), else ``None``. Two
    plugins claiming the same files is an error naming both; the caller then
    picks with ``load(..., method=...)`` or ``config=``.

    :param config: the saved ``adapter_config.json``, as read.
    :param metadata: the safetensors header's metadata (empty for pickles).
    :param keys: the tensor names in the weights file, with peft's ``base_model.model.`` prefix removed.
    :returns: a method name this plugin registered, or ``None``.
    """


# -- issue 11: per-step training work --------------------------------------------------------------------------
@hookspec(firstresult=True)
def adapterkit_training_step(model: nn.Module, method: str, names: Sequence[str], global_step: int) -> None:
    """Do this method's work for one finished optimizer step (AdaLoRA: rank allocation).

    Optional: a method without per-step work leaves it out, and
    :meth:`Adapters.training_step` skips it. Called once per optimizer step, after
    ``optimizer.step()`` and before ``optimizer.zero_grad()``, so gradients are still
    there; adapterkit's Trainer integration (:mod:`adapterkit.trainer`) calls it
    for every method, so no training script names a method.

    :param model: the model.
    :param method: the registered method name.
    :param names: this method's adapters being trained (trainable, active, adapters
        enabled), in order; never empty.
    :param global_step: the optimizer step that just finished, counting from 0.
    """


@hookspec(firstresult=True)
def adapterkit_regularization(model: nn.Module, method: str, names: Sequence[str]) -> torch.Tensor | None:
    """Return this method's term to add to the training loss (AdaLoRA: orthogonal regularisation).

    Optional: without it the method adds nothing. :meth:`Adapters.regularization`
    sums the terms of every method; adapterkit's Trainer integration adds that sum
    to the model's loss in every training forward.

    :param model: the model.
    :param method: the registered method name.
    :param names: this method's adapters being trained (trainable, active, adapters
        enabled), in order; never empty.
    :returns: a scalar tensor that carries gradients to the adapters, or ``None`` for no term.
    """


@hookspec(firstresult=True)
def adapterkit_swap(model: nn.Module, method: str, name: str, config: Any, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace adapter ``name``'s weights (and config) with ``state_dict`` in place (hot-swap).

    Optional. Called by :meth:`~adapterkit.Adapters.swap`. Write the new values into the
    tensors the adapter already has (keeping their identity, so a ``torch.compile``d model
    does not recompile), or raise :class:`~adapterkit.UnsupportedOperationError` naming
    what differs when that cannot be done (e.g. other targets, a larger rank than prepared).
    The adapter keeps its name, activity and trainability. Without this hook, the core swaps
    by deleting the adapter and loading the new one under the same name.

    :param model: the model.
    :param method: the registered method name.
    :param name: an adapter of this method, not merged.
    :param config: the new adapter's config (validated).
    :param state_dict: its tensors, keys as from :func:`adapterkit_extract_state`.
    """


@hookspec(firstresult=True)
def adapterkit_prepare_compiled(
    model: nn.Module, method: str, max_rank: int | None, targets: Sequence[str] | None, max_adapters: int | None
) -> None:
    """Make switching among this method's adapters free of recompilation under ``torch.compile``.

    Optional. Called by :meth:`~adapterkit.Adapters.prepare_compiled` for every method that
    implements it, before or after adapters are loaded. Afterwards ``set_active`` (with or
    without weights), ``swap`` and ``per_sample`` must change only tensor *values* the
    forward reads, never Python attributes, module structure or tensor shapes, for adapters
    within the declared limits; an adapter beyond them raises
    :class:`~adapterkit.UnsupportedOperationError` naming the limit.

    :param model: the model.
    :param method: the registered method name.
    :param max_rank: the largest rank any adapter will have (smaller ones are padded).
    :param targets: module names every adapter will target at most (their union), or
        ``None`` for the targets of the adapters loaded so far.
    :param max_adapters: how many adapters of this method can be resident at once.
    """


@hookspec(firstresult=True)
def adapterkit_combine(
    model: nn.Module, method: str, names: Sequence[str], weights: Sequence[float], how: str, options: dict[str, Any]
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Build a new adapter from a weighted combination of adapters ``names`` (peft's ``add_weighted_adapter``).

    Optional. Called by :meth:`~adapterkit.Adapters.combine`; the core then loads the result
    as a new adapter. Raise :class:`~adapterkit.ConfigValueError` for a ``how`` or option
    the method does not offer, naming the ones it does.

    :param model: the model.
    :param method: the registered method name.
    :param names: adapters of this method, two or more.
    :param weights: one weight per name.
    :param how: the combination (``"linear"``, ``"cat"``, ``"svd"``, ``"ties"``, ...).
    :param options: further keyword arguments of ``combine`` (e.g. ``density``, ``svd_rank``).
    :returns: the new adapter's config and its tensors, keys as from
        :func:`adapterkit_extract_state`.
    """
