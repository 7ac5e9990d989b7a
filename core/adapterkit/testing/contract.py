"""The single-method contract: :class:`MethodContract` (see :mod:`adapterkit.testing`)."""


from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from .. import (
    Adapters,
    AdapterkitError,
    CheckpointError,
    MethodRegistry,
    TargetError,
    UnsupportedOperationError,
    attach,
    default_registry,
    format_config,
)
from ..configs import resolve_config
from .composition import CompositionContract

__all__ = ["ContractModel", "MethodContract", "model_fingerprint"]


class ContractModel(nn.Module):
    """A small plain model: Linear ``embed`` (8->16), ``fc1`` (16->32), ``fc2`` (32->16), ``head`` (16->4)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.act(self.fc1(self.embed(x)))))


def model_fingerprint(model: nn.Module, x: torch.Tensor) -> tuple[Any, ...]:
    """What "the model is exactly as it was" compares: structure, module identities, parameters, output."""
    with torch.no_grad():
        out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    params = tuple((n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters())
    return str(model), tuple((n, id(m)) for n, m in model.named_modules()), params, out


def _assert_same(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    assert a[0] == b[0], "module structure changed"
    assert a[1] == b[1], "module objects changed"
    assert [(n, g) for n, _, g in a[2]] == [(n, g) for n, _, g in b[2]], "parameters or requires_grad changed"
    for (name, x, _), (_, y, _) in zip(a[2], b[2]):
        assert torch.equal(x, y), f"parameter {name} changed"
    assert torch.equal(a[3], b[3]), "outputs changed"


class MethodContract(CompositionContract):
    """Contract tests for one adapter method; subclass and set :attr:`config`.

    The tests defined here exercise the method alone; those of
    :class:`~adapterkit.testing.composition.CompositionContract` (inherited) run it
    beside partner methods on the same layers.
    """

    config: ClassVar[Any] = None
    """The method's config: a config string, dict or config object targeting layers of :meth:`make_model`."""

    bad_targets_config: ClassVar[Any] = None
    """A config of the method whose targets match nothing (default: derived by replacing target_modules)."""

    supports_merge: ClassVar[bool] = True
    supports_per_sample: ClassVar[bool] = False
    atol: ClassVar[float] = 1e-6
    rtol: ClassVar[float] = 1e-5
    """Tolerances of output comparisons that should agree up to float rounding."""
    registry: ClassVar[Callable[[], MethodRegistry]] = staticmethod(default_registry)

    # -- hooks for subclasses ------------------------------------------------------
    def make_model(self) -> nn.Module:
        torch.manual_seed(0)
        return ContractModel().eval()

    def make_input(self) -> torch.Tensor:
        return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    # -- helpers -----------------------------------------------------------------------
    def _registry(self) -> MethodRegistry:
        return type(self).registry()

    def parse(self, spec: Any) -> Any:
        """``spec`` (a config string, dict or object) as a config object of a method of :attr:`registry`."""
        return resolve_config(spec, self._registry())[1]

    def attach(self, model: nn.Module) -> Adapters:
        return attach(model, self._registry())

    def run(self, model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            out = model(self.make_input() if x is None else x)
        return out.logits if hasattr(out, "logits") else out

    def add(self, model: nn.Module, name: str = "default", seed: int = 0) -> Adapters:
        """Add the adapter and move its weights off their (often identity) initialisation.

        Every parameter the add created that trains (``requires_grad``) gets noise, as training
        would; values that do not train (AdaLoRA's ``ranknum``, say) stay as the plugin made them.
        """
        before = {id(p) for p in model.parameters()}
        adapters = self.attach(model)
        adapters.add(self.config, name)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                if id(param) not in before and param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=generator).to(param) * 0.3)
        return adapters

    def _close(self, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> bool:
        return torch.allclose(a, b, rtol=self.rtol * scale, atol=self.atol * scale)

    # -- the contract ------------------------------------------------------------------
    def test_config_string_resolves_to_the_method(self) -> None:
        method = self._registry().method_for_config(self.parse(self.config))
        assert method.name in self._registry().methods
        config = self.parse(self.config)
        assert self.parse(format_config(config, self._registry())) == config

    def test_inject_changes_only_the_targets(self) -> None:
        model, x = self.make_model(), self.make_input()
        leaves = {n: m for n, m in model.named_modules() if n and not list(m.children())}
        base_params = {n: p.detach().clone() for n, p in model.named_parameters()}
        base_out = self.run(model, x)
        self.add(model)
        assert not self._close(self.run(model, x), base_out), "the adapter does not change the output"
        present = {id(m) for m in model.modules()}
        assert all(id(m) in present for m in leaves.values()), "a module was replaced instead of wrapped"
        current = dict(model.named_modules())
        assert any(current.get(n) is not m for n, m in leaves.items()), "no module was adapted"
        for module in leaves.values():
            for name, param in module.named_parameters():
                owner = next(n for n, m in leaves.items() if m is module)
                assert torch.equal(param.detach(), base_params[f"{owner}.{name}"]), f"{owner}.{name} was modified"
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable, "a new adapter must be trainable"
        frozen = [p for m in leaves.values() for p in m.parameters()]
        assert not any(p.requires_grad for p in frozen), "base parameters left trainable"

    def test_gradients_reach_the_adapter(self) -> None:
        model, x = self.make_model(), self.make_input()
        self.add(model)
        model.train()
        out = model(x)
        (out.logits if hasattr(out, "logits") else out).pow(2).mean().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)

    def test_set_active_and_none(self) -> None:
        model, x = self.make_model(), self.make_input()
        base_out = self.run(model, x)
        adapters = self.add(model, "one")
        with_one = self.run(model, x)
        adapters.set_active([])
        assert self._close(self.run(model, x), base_out)
        adapters.set_active("one")
        assert self._close(self.run(model, x), with_one)

    def test_enable_disable(self) -> None:
        model, x = self.make_model(), self.make_input()
        base_out = self.run(model, x)
        adapters = self.add(model)
        with_adapter = self.run(model, x)
        with adapters.disabled():
            assert self._close(self.run(model, x), base_out)
            assert not any(p.requires_grad for p in model.parameters())
        assert self._close(self.run(model, x), with_adapter)

    def test_extract_and_load_state_round_trip(self) -> None:
        model, x = self.make_model(), self.make_input()
        adapters = self.add(model)
        state = adapters.state_dict()
        assert state and all(k.startswith("base_model.model.") for k in state)
        other = self.make_model()
        loaded = self.attach(other)
        loaded.load(None, config=adapters.config("default"), state_dict=state)
        assert self._close(self.run(other, x), self.run(model, x))
        again = loaded.state_dict()
        assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)

    def test_save_and_load_files(self, tmp_path: Path) -> None:
        model, x = self.make_model(), self.make_input()
        adapters = self.add(model, "default")
        self.add(model, "second", seed=1)
        adapters.save(tmp_path)
        assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "second" / "adapter_model.safetensors").is_file()
        other = self.make_model()
        loaded = self.attach(other)
        loaded.load(tmp_path, "second", subfolder="second")
        adapters.set_active("second")
        assert self._close(self.run(other, x), self.run(model, x))
        assert not any(p.requires_grad for p in other.parameters()), "a loaded adapter is frozen by default"

    def test_two_adapters_keep_their_own_state(self) -> None:
        alone = self.make_model()
        state_alone = self.add(alone, "one").state_dict()
        model = self.make_model()
        adapters = self.add(model, "one")
        self.add(model, "two", seed=1)
        state = adapters.state_dict("one")
        assert state.keys() == state_alone.keys()
        assert all(torch.equal(state[k], state_alone[k]) for k in state)
        assert adapters.active == ["two"]

    def test_merge_and_unmerge(self) -> None:
        model, x = self.make_model(), self.make_input()
        adapters = self.add(model)
        unmerged = self.run(model, x)
        if not self.supports_merge:
            with pytest.raises(UnsupportedOperationError):
                adapters.merge()
            assert adapters.merged == []
            return
        adapters.merge()
        assert adapters.merged == ["default"]
        # Merging reorders float operations: allow ten times the usual rounding.
        assert self._close(self.run(model, x), unmerged, scale=10)
        adapters.unmerge()
        assert adapters.merged == []
        assert self._close(self.run(model, x), unmerged, scale=10)

    def test_per_sample(self) -> None:
        model, x = self.make_model(), self.make_input()[:3]
        adapters = self.add(model, "one")
        self.add(model, "two", seed=1)
        rows = ["two", "__base__", "one"]
        if not self.supports_per_sample:
            with pytest.raises(UnsupportedOperationError), adapters.per_sample(rows):
                self.run(model, x)
            return
        with adapters.per_sample(rows):
            mixed = self.run(model, x)
        for i, row in enumerate(rows):
            adapters.set_active([] if row == "__base__" else [row])
            assert self._close(self.run(model, x[i : i + 1]), mixed[i : i + 1]), f"row {i} ({row})"

    def test_per_sample_routes_only_the_thread_that_opened_it(self) -> None:
        if not self.supports_per_sample:
            return  # test_per_sample checks the refusal
        model, x = self.make_model(), self.make_input()[:3]
        adapters = self.add(model, "one")
        self.add(model, "two", seed=1)
        adapters.set_active("one")
        usual = self.run(model, x)
        seen: list[torch.Tensor] = []
        inside = threading.Event()
        with adapters.per_sample(["two", "__base__", "two"]):
            inside.set()
            other = threading.Thread(target=lambda: seen.append(self.run(model, x)))
            other.start()
            other.join()
        assert inside.is_set() and len(seen) == 1
        assert self._close(seen[0], usual), "another thread's forward must compute the active adapters, unrouted"

    def test_delete_restores_the_model(self) -> None:
        model, x = self.make_model(), self.make_input()
        before = model_fingerprint(model, x)
        adapters = self.add(model, "one")
        self.add(model, "two", seed=1)
        adapters.delete("two")
        assert adapters.names == ["one"] and adapters.active == []
        adapters.delete("one")
        after = model_fingerprint(model, x)
        assert after[0] == before[0], "deleting every adapter must give back the original modules"
        assert torch.equal(after[3], before[3])

    def test_failed_add_leaves_the_model_unchanged(self) -> None:
        model, x = self.make_model(), self.make_input()
        adapters = self.add(model, "existing")
        before = model_fingerprint(model, x)
        bad = self.bad_targets_config
        if bad is None:
            config = copy.deepcopy(self.parse(self.config))
            config.target_modules = ["no_such_module"]
            if hasattr(config, "feedforward_modules") and config.feedforward_modules:
                config.feedforward_modules = ["no_such_module"]
            bad = config
        with pytest.raises(TargetError):
            adapters.add(bad, "bad")
        _assert_same(model_fingerprint(model, x), before)
        assert adapters.names == ["existing"]

    def test_failed_load_leaves_the_model_unchanged(self) -> None:
        model, x = self.make_model(), self.make_input()
        source = self.add(self.make_model())
        state = source.state_dict()
        key = sorted(state)[0]
        broken = {**state, key: torch.zeros(*[s + 1 for s in state[key].shape])}
        adapters = self.add(model, "existing")
        before = model_fingerprint(model, x)
        with pytest.raises(CheckpointError):
            adapters.load(None, "broken", config=source.config("default"), state_dict=broken)
        _assert_same(model_fingerprint(model, x), before)
        missing = dict(list(state.items())[1:])
        with pytest.raises(CheckpointError):
            adapters.load(None, "broken", config=source.config("default"), state_dict=missing)
        _assert_same(model_fingerprint(model, x), before)
        assert adapters.names == ["existing"]

    def test_errors_are_adapterkit_errors(self) -> None:
        model = self.make_model()
        adapters = self.add(model)
        with pytest.raises(AdapterkitError):
            adapters.add(self.config, "default")
        with pytest.raises(AdapterkitError):
            adapters.set_active("nope")
