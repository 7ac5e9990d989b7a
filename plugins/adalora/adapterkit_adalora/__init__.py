"""AdaLoRA for adapterkit, through peft's AdaLoRA layers, trainable outside ``PeftModel``.

Config strings use the fields of peft's :class:`~peft.AdaLoraConfig`;
``total_step`` (the number of training steps) is required::

    adapters = adapterkit.attach(model)
    adapters.add('adalora[init_r=12, target_r=4, total_step=1000, tinit=100, tfinal=200, '
                 'target_modules=["q_proj", "v_proj"]]')

AdaLoRA is a training method: during training its rank allocator measures the
importance of each singular triplet and prunes the least important ones, down
to an average of ``target_r`` per layer. peft does this inside
``PeftModel``/``AdaLoraModel``. On a model with adapters from
:func:`adapterkit.attach`, the core's per-step API runs it for every method,
with no AdaLoRA-specific line (and ``adapterkit.trainer.Trainer`` calls both)::

    loss = model(**batch).loss + adapters.regularization()
    loss.backward(); optimizer.step()
    adapters.training_step(step)                      # before optimizer.zero_grad()

The plugin implements them through the ``adapterkit_regularization`` and
``adapterkit_training_step`` hooks. The two functions of this module do the same
for AdaLoRA alone, and can name one adapter::

    from adapterkit_adalora import orthogonal_regularization, update_and_allocate

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step, batch in enumerate(batches):           # step = 0, 1, ..., total_step - 1
        loss = model(**batch).loss + orthogonal_regularization(model)
        loss.backward()
        optimizer.step()
        update_and_allocate(model, step)             # needs the gradients: before zero_grad()
        optimizer.zero_grad()
    adapters.save("out")                             # pruned tensors + rank_pattern, as peft saves them

:func:`update_and_allocate` follows ``AdaLoraModel.update_and_allocate``: it
updates the importance scores until ``total_step - tfinal``, masks the least
important triplets every ``deltaT`` steps after ``tinit``, fixes the final
``rank_pattern`` at step ``total_step - tfinal`` and keeps masking with it
afterwards. The allocation is recorded in the adapter's config
(``adapters.config(name).rank_pattern``, keys ``<module>.lora_E``), and
:meth:`adapterkit.Adapters.save` writes what peft writes: the tensors cut down
to the kept triplets and the ``rank_pattern`` in ``adapter_config.json``.
Loading such a checkpoint (peft's or ours) resizes the layers by the rank
pattern first, as ``AdaLoraModel.resize_modules_by_rank_pattern`` does, on
transformers models and plain ``nn.Module`` models alike.

:func:`orthogonal_regularization` returns ``orth_reg_weight`` times the mean
Frobenius norm of ``AᵀA - I`` / ``BᵀB - I`` over the adapter's layers: the term
``AdaLoraModel.forward`` adds to ``outputs.loss``, which nothing adds outside
``PeftModel``.

Both act on the AdaLoRA adapters being trained (those whose parameters have
``requires_grad``: added or loaded with ``is_trainable=True``, active, and
enabled), or on the one named by ``name=``. Each adapter has its own allocator,
kept on the model (attribute ``_adapterkit_adalora``, not a submodule, so it
is in no ``state_dict``). Unlike ``AdaLoraModel``, several AdaLoRA adapters may
train at once.

Several active AdaLoRA adapters add their deltas, as in peft. Under
``adapters.per_sample(rows)`` each batch row gets only its own adapter (rows of
``"__base__"`` or other methods' adapters get the base layer); each AdaLoRA
layer then runs once per adapter named in ``rows``, on the whole batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from adapterkit import (
    AdapterStateError,
    CheckpointError,
    ConfigValueError,
    UnknownAdapterError,
    hookimpl,
)
from adapterkit.routing import check_rows, replaced_forwards
from adapterkit_peft import PeftMethod, check_rows_biases, empty_weights, routed_heads
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraModel
from peft.tuners.adalora.layer import RankAllocator
from torch import nn

__all__ = ["AdaLoraMethod", "plugin", "update_and_allocate", "orthogonal_regularization"]

STATE_ATTR = "_adapterkit_adalora"
_TRIPLET = ("lora_A", "lora_B", "lora_E")
_MISSING = object()


@dataclasses.dataclass
class _AdapterState:
    """What the plugin keeps per adapter: its config (the core's object) and its rank allocator."""

    config: AdaLoraConfig
    allocator: RankAllocator | None = None


def _states(model: nn.Module) -> dict[str, _AdapterState]:
    states = model.__dict__.get(STATE_ATTR)
    if states is None:
        # A plain attribute, not a submodule: it must stay out of state_dict() and named_modules().
        states = model.__dict__[STATE_ATTR] = {}
    return states


# -- rank patterns ------------------------------------------------------------------
def _pattern_prefix(key: Any) -> str:
    """The module path of a rank_pattern key: ``<module>.lora_E`` or peft's in-memory ``<module>.lora_E.<adapter>``."""
    parts = key.split(".") if isinstance(key, str) else []
    if len(parts) >= 2 and parts[-1] == "lora_E":
        return ".".join(parts[:-1])
    if len(parts) >= 3 and parts[-2] == "lora_E":
        return ".".join(parts[:-2])
    raise ConfigValueError(
        f"adalora config key 'rank_pattern' has the key {key!r}; keys name a layer's singular values, "
        "'<module path>.lora_E' (as peft saves them)"
    )


def _mask(key: str, value: Any) -> list[bool]:
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)) for v in value
    ):
        raise ConfigValueError(
            f"adalora config key 'rank_pattern'[{key!r}] must be a list of booleans (which singular triplets "
            f"are kept), got {value!r}"
        )
    return [bool(v) for v in value]


def normalize_rank_pattern(pattern: Mapping[str, Any] | None) -> dict[str, list[bool]] | None:
    """``pattern`` with keys ``<module>.lora_E`` (adapter names dropped) and boolean-list values."""
    if pattern is None:
        return None
    if not isinstance(pattern, Mapping):
        raise ConfigValueError(f"adalora config key 'rank_pattern' must be a dict or None, got {pattern!r}")
    return {f"{_pattern_prefix(key)}.lora_E": _mask(key, value) for key, value in pattern.items()}


def _strip_adapter(pattern: Mapping[str, Any], name: str) -> dict[str, list[bool]]:
    """Rank allocator output (``<module>.lora_E.<name>``: tensors or lists) -> the saved form."""
    suffix = f".{name}"
    return {key.removesuffix(suffix): _mask(key, value) for key, value in pattern.items()}


class _AdapterParameters:
    """What peft's RankAllocator reads of a model: ``named_parameters()``, here only one adapter's triplets.

    Names are peft's (``<module>.lora_A.<adapter>``), so the allocator's name tests match, and only this
    adapter's tensors: other adapters whose names contain this one's, or other methods' ``lora_*`` tensors,
    stay out of its budget.
    """

    def __init__(self, items: list[tuple[str, nn.Parameter]]) -> None:
        self.items = items

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self.items)


class AdaLoraMethod(PeftMethod):
    """peft AdaLoRA with rank patterns handled on save and load and a per-model rank allocator."""

    # -- configs ----------------------------------------------------------------------
    @hookimpl
    def adapterkit_validate_config(self, method: str, config: Any) -> None:
        super().adapterkit_validate_config(method, config)
        total = config.total_step
        if total is None or isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            raise ConfigValueError(
                f"{method} config key 'total_step' is required: set it to the number of training steps "
                f"(AdaLoRA's rank budget schedule runs over them), e.g. {method}[total_step=1000, ...]; got {total!r}"
            )

        def integer(key: str, minimum: int) -> int:
            value = getattr(config, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigValueError(f"{method} config key {key!r} must be an integer >= {minimum}, got {value!r}")
            return value

        integer("init_r", 1)
        integer("target_r", 0)
        integer("deltaT", 1)
        tinit, tfinal = integer("tinit", 0), integer("tfinal", 0)
        if tinit >= total - tfinal:
            raise ConfigValueError(
                f"{method} config: tinit={tinit} and tfinal={tfinal} leave no budgeting phase within "
                f"total_step={total}; need tinit < total_step - tfinal"
            )
        for key in ("beta1", "beta2"):
            value = getattr(config, key)
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ConfigValueError(f"{method} config key {key!r} must lie strictly between 0 and 1, got {value!r}")
        weight = config.orth_reg_weight
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigValueError(f"{method} config key 'orth_reg_weight' must be >= 0, got {weight!r}")
        normalize_rank_pattern(config.rank_pattern)

    # -- injection, state and deletion ------------------------------------------------------
    @hookimpl
    def adapterkit_inject(
        self, model: nn.Module, method: str, name: str, config: Any, empty: bool, autocast_adapter_dtype: bool = True
    ) -> None:
        pattern = normalize_rank_pattern(config.rank_pattern)
        previous = model.__dict__.pop("peft_config", _MISSING)
        # AdaLoraModel injects every target at init_r and ignores rank_pattern, except to warn that its
        # "<module>.lora_E" keys match no module; hide it from the tuner.
        config.rank_pattern = None
        try:
            super().adapterkit_inject(model, method, name, config, empty, autocast_adapter_dtype)
        finally:
            config.rank_pattern = pattern
            if previous is not _MISSING:
                model.__dict__["peft_config"] = previous
        _states(model)[name] = _AdapterState(config)
        if pattern:
            # A load (empty=True) is refused as a checkpoint problem, an add as a config problem.
            error = CheckpointError if empty else ConfigValueError
            self._resize_modules(model, name, config, pattern, resize=empty, error=error)

    def _resize_modules(
        self,
        model: nn.Module,
        name: str,
        config: AdaLoraConfig,
        pattern: dict[str, list[bool]],
        *,
        resize: bool,
        error: type[Exception],
    ) -> None:
        """Check ``pattern`` against the adapter's layers and, if ``resize``, shrink each layer to the rank
        its pattern keeps, as ``AdaLoraModel.resize_modules_by_rank_pattern`` does before loading.

        A checkpoint with a rank pattern holds only the kept triplets; the layers' scaling keeps dividing by
        the initial rank (``ranknum`` is copied over), as in peft.
        """
        sites = {site.logical: site for site in self.sites(model, name)}
        for key, mask in pattern.items():
            prefix = key.removesuffix(".lora_E")
            site = sites.get(prefix)
            if site is None:
                raise error(
                    f"adalora adapter {name!r}: rank_pattern names {key!r}, but the adapter has no layer "
                    f"{prefix!r} (its layers: {', '.join(sites) or 'none'}); the config does not fit this model"
                )
            if len(mask) != site.layer.r[name]:
                raise error(
                    f"adalora adapter {name!r}: rank_pattern[{key!r}] has {len(mask)} entries but the layer has "
                    f"init_r={site.layer.r[name]}; the config's rank_pattern and init_r do not fit together"
                )
        if not resize:
            return
        for key, mask in pattern.items():
            layer = sites[key.removesuffix(".lora_E")].layer
            rank = sum(mask)
            ranknum = layer.ranknum[name].detach().clone()
            with empty_weights():
                layer.update_layer(name, rank, config.lora_alpha, config=config)
            if rank > 0:
                with torch.no_grad():
                    layer.ranknum[name].copy_(ranknum.to(layer.ranknum[name].device))

    @hookimpl
    def adapterkit_extract_state(self, model: nn.Module, method: str, name: str) -> dict[str, torch.Tensor]:
        state = super().adapterkit_extract_state(model, method, name)
        adapter = _states(model).get(name)
        pattern = adapter.config.rank_pattern if adapter is not None else None
        return self._resize_state(state, normalize_rank_pattern(pattern), name) if pattern else state

    @staticmethod
    def _resize_state(
        state: dict[str, torch.Tensor], pattern: dict[str, list[bool]], name: str
    ) -> dict[str, torch.Tensor]:
        """Keep the triplets the pattern keeps, as ``AdaLoraModel.resize_state_dict_by_rank_pattern``."""
        state = dict(state)
        for key, mask in pattern.items():
            prefix = key.removesuffix(".lora_E")
            rank = sum(mask)
            for part in _TRIPLET:
                tensor_key = f"{prefix}.{part}"
                if tensor_key not in state:
                    raise AdapterStateError(
                        f"adalora adapter {name!r}: its rank_pattern names {key!r}, which is not one of its layers"
                    )
                tensor = state[tensor_key]
                dim = 1 if part == "lora_B" else 0
                if tensor.shape[dim] == rank:
                    continue  # already cut down (e.g. loaded from a pruned checkpoint)
                if tensor.shape[dim] != len(mask):
                    raise AdapterStateError(
                        f"adalora adapter {name!r}: rank_pattern[{key!r}] has {len(mask)} entries, keeping {rank}, "
                        f"but {tensor_key} has rank {tensor.shape[dim]}"
                    )
                index = torch.tensor(mask, dtype=torch.bool, device=tensor.device)
                state[tensor_key] = tensor[index] if dim == 0 else tensor[:, index]
        return state

    @hookimpl
    def adapterkit_delete(self, model: nn.Module, method: str, name: str) -> None:
        super().adapterkit_delete(model, method, name)
        _states(model).pop(name, None)

    # -- per-sample routing -----------------------------------------------------------------
    @hookimpl
    def adapterkit_per_sample(self, model: nn.Module, method: str, rows: Sequence[str]) -> Any:
        return self._per_sample(model, list(rows))

    @contextlib.contextmanager
    def _per_sample(self, model: nn.Module, rows: list[str]) -> Iterator[None]:
        layers = list(self.layers(model))
        check_rows_biases(model, self.name, rows)
        with replaced_forwards(layers, lambda layer: _RoutedForward(layer, rows)), routed_heads(model, rows):
            yield

    # -- training helpers -------------------------------------------------------------------
    def _triplets(self, model: nn.Module, name: str) -> list[tuple[str, str, nn.Parameter]]:
        """``(logical path, "lora_A"|"lora_B"|"lora_E", parameter)`` of adapter ``name``, in module order."""
        logical = {id(site.layer): site.logical for site in self.sites(model, name)}
        found = []
        for module in model.modules():
            path = logical.get(id(module))
            if path is None:
                continue
            for attr in module._modules:  # the layer's own order, as named_parameters() walks it
                if attr in _TRIPLET:
                    found.append((path, attr, getattr(module, attr)[name]))
        return found

    def _adapters_in_training(self, model: nn.Module, name: str | None, operation: str) -> list[str]:
        states = _states(model)
        if name is not None:
            if name not in states:
                raise UnknownAdapterError(
                    f"{operation}: the model has no AdaLoRA adapter named {name!r}; "
                    f"its AdaLoRA adapters: {', '.join(states) or 'none'}"
                )
            return [name]
        training = [n for n in states if any(p.requires_grad for _, _, p in self._triplets(model, n))]
        if not training:
            raise AdapterStateError(
                f"{operation}: no AdaLoRA adapter of this model is being trained (none has parameters with "
                f"requires_grad; AdaLoRA adapters: {', '.join(states) or 'none'}). add() one, or load() it with "
                "is_trainable=True, keep it active and adapters enabled, or pass name="
            )
        return training

    # -- per-step hooks: the core's training_step() and regularization() -------------------------
    @hookimpl
    def adapterkit_training_step(self, model: nn.Module, method: str, names: Sequence[str], global_step: int) -> None:
        for name in names:
            self._allocate(model, name, global_step)

    @hookimpl
    def adapterkit_regularization(self, model: nn.Module, method: str, names: Sequence[str]) -> torch.Tensor | None:
        return self._regularization(model, list(names))

    def update_and_allocate(self, model: nn.Module, global_step: int, name: str | None = None) -> None:
        """See :func:`adapterkit_adalora.update_and_allocate`."""
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"update_and_allocate: global_step must be an integer >= 0, got {global_step!r}")
        for adapter in self._adapters_in_training(model, name, "update_and_allocate"):
            self._allocate(model, adapter, global_step)

    def _allocate(self, model: nn.Module, name: str, global_step: int) -> None:
        state = _states(model)[name]
        config = state.config
        triplets = self._triplets(model, name)
        view = _AdapterParameters([(f"{path}.{attr}.{name}", param) for path, attr, param in triplets])
        final_step = config.total_step - config.tfinal
        if global_step > final_step:
            # Final fine-tuning: keep the pruned singular values at zero (peft's mask_using_rank_pattern).
            # Layers already cut down to the pattern (a pruned checkpoint loaded to fine-tune) need nothing.
            pattern = normalize_rank_pattern(config.rank_pattern) or {}
            with torch.no_grad():
                for path, attr, param in triplets:
                    mask = pattern.get(f"{path}.lora_E") if attr == "lora_E" else None
                    if mask is not None and len(mask) == param.shape[0]:
                        keep = torch.tensor(mask, dtype=torch.bool, device=param.device).unsqueeze(-1)
                        param.masked_fill_(~keep, 0.0)
            return
        if global_step < final_step:
            missing = [f"{path}.{attr}" for path, attr, param in triplets if param.grad is None]
            if missing:
                raise AdapterStateError(
                    f"update_and_allocate: adapter {name!r} has no gradients ({missing[0]}"
                    f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); call it after "
                    "loss.backward() and before optimizer.zero_grad(), while the adapter trains"
                )
        if state.allocator is None:
            allocator = RankAllocator(view, config, name)
            if allocator.target_bgt >= allocator.init_bgt:
                raise ConfigValueError(
                    f"adalora adapter {name!r}: target_r={config.target_r} leaves nothing to prune: its "
                    f"{len(triplets) // 3} layers hold {allocator.init_bgt} ranks in all, and the target budget is "
                    f"target_r x layers = {allocator.target_bgt}; use target_r < init_r"
                )
            state.allocator = allocator
        allocator = state.allocator
        if global_step < final_step:
            _, pattern = allocator.update_and_allocate(view, global_step)
            if pattern:
                config.rank_pattern = _strip_adapter(pattern, name)
        else:
            if not allocator.exp_avg_ipt:
                raise AdapterStateError(
                    f"update_and_allocate: adapter {name!r} has no importance scores at the final allocation "
                    f"(step {global_step}); call update_and_allocate after every training step from the first"
                )
            _, pattern = allocator.update_and_allocate(view, global_step, force_mask=True)
            config.rank_pattern = _strip_adapter(pattern, name)
            allocator.reset_ipt()

    def orthogonal_regularization(self, model: nn.Module, name: str | None = None) -> torch.Tensor:
        """See :func:`adapterkit_adalora.orthogonal_regularization`."""
        return self._regularization(model, self._adapters_in_training(model, name, "orthogonal_regularization"))

    def _regularization(self, model: nn.Module, names: list[str]) -> torch.Tensor:
        total: torch.Tensor | None = None
        for adapter in names:
            kinds = {id(param): attr for _, attr, param in self._triplets(model, adapter) if attr != "lora_E"}
            regu: Any = 0
            count = 0
            # Walk the parameters in model order and sum as AdaLoraModel.forward does, so results match bitwise.
            for param in model.parameters():
                kind = kinds.get(id(param))
                if kind is None:
                    continue
                cov = param @ param.T if kind == "lora_A" else param.T @ param
                eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
                eye.requires_grad = False
                count += 1
                regu += torch.norm(cov - eye, p="fro")
            regu = regu / count if count > 0 else 0
            term = _states(model)[adapter].config.orth_reg_weight * regu
            if not isinstance(term, torch.Tensor):
                term = torch.zeros((), device=_device(model))
            total = term if total is None else total + term
        assert total is not None
        return total


class _RoutedForward:
    """The forward of one AdaLoRA layer under per_sample: row ``i`` gets adapter ``rows[i]`` only.

    For each adapter named in ``rows`` the layer's own forward runs on the whole batch with just that
    adapter active, and that adapter's rows are taken from it; other rows get the base layer's output.
    Each row thus computes exactly what it computes with only its adapter active, and layers nested
    inside (another method's per-sample routing) always see the full batch.
    """

    def __init__(self, layer: nn.Module, rows: list[str]) -> None:
        self.layer = layer
        self.rows = rows

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer, rows = self.layer, self.rows
        check_rows(rows, len(x))
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            if row in layer.lora_A:
                groups.setdefault(row, []).append(i)
        result = layer.base_layer(x, *args, **kwargs)
        active = layer._active_adapter
        try:
            for adapter, indices in groups.items():
                layer._active_adapter = [adapter]
                index = torch.tensor(indices, device=x.device)
                adapted = type(layer).forward(layer, x, *args, **kwargs)
                result = result.index_copy(0, index, adapted.index_select(0, index).to(result.dtype))
        finally:
            layer._active_adapter = active
        return result


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


plugin = AdaLoraMethod(
    "adalora",
    AdaLoraConfig,
    AdaLoraModel,
    aliases=("ADALORA",),
    description="AdaLoRA: SVD-form LoRA with adaptive rank allocation (peft AdaLoRA layers)",
    direct_load=True,
)


def update_and_allocate(model: nn.Module, global_step: int, *, name: str | None = None) -> None:
    """Run one step of AdaLoRA's rank allocation on ``model`` (peft's ``AdaLoraModel.update_and_allocate``).

    Call it once per training step, after ``loss.backward()`` (it reads the
    gradients) and before ``optimizer.zero_grad()``, typically right after
    ``optimizer.step()``, with ``global_step`` counting from 0. Until
    ``total_step - tfinal`` it updates the importance scores and, after
    ``tinit``, every ``deltaT`` steps zeroes the least important singular
    values down to the scheduled budget; at step ``total_step - tfinal`` it
    fixes the final rank pattern; later steps keep the pruned values at zero.
    The current allocation is in ``adapters.config(name).rank_pattern`` and is
    what :meth:`adapterkit.Adapters.save` cuts the saved tensors to.

    :param model: a model whose AdaLoRA adapters were added through :func:`adapterkit.attach`.
    :param global_step: the training step, from 0.
    :param name: the adapter to allocate for; default every AdaLoRA adapter being trained
        (parameters with ``requires_grad``).
    :raises adapterkit.AdapterStateError: no AdaLoRA adapter is being trained, or gradients are missing.
    :raises adapterkit.UnknownAdapterError: ``name`` is not an AdaLoRA adapter of ``model``.
    """
    plugin.update_and_allocate(model, global_step, name)


def orthogonal_regularization(model: nn.Module, *, name: str | None = None) -> torch.Tensor:
    """AdaLoRA's orthogonal regularisation term, to add to the training loss.

    Returns ``orth_reg_weight * mean(‖AAᵀ - I‖_F, ‖BᵀB - I‖_F over the adapter's layers)``,
    exactly what ``AdaLoraModel.forward`` adds to ``outputs.loss`` inside
    ``PeftModel`` (summed over adapters when several train)::

        loss = model(**batch).loss + orthogonal_regularization(model)

    :param model: a model whose AdaLoRA adapters were added through :func:`adapterkit.attach`.
    :param name: the adapter; default every AdaLoRA adapter being trained.
    :returns: a scalar tensor that carries gradients to the adapter's ``lora_A``/``lora_B``.
    """
    return plugin.orthogonal_regularization(model, name)
