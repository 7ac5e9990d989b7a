"""Plugin faults are contained: named, chained, rolled back; wrong results are contract errors.

A throwaway plugin (the toy scale method of tests/toy_plugin.py, registered
in-process on a registry beside the installed plugins, as a third party's
would be) misbehaves in one way per test:

* an exception that is not one of adapterkit's own becomes a ``PluginError``
  naming the plugin, the hook and the method, with the original as its
  ``__cause__``; adapterkit's own errors raised by a plugin (``TargetError``)
  pass unchanged; a ``MemoryError`` stays a ``MemoryError``;
* a failed ``inject``/``load_state`` leaves the model exactly as it was, also
  the forward and pre-forward hooks and the module attributes the plugin added;
  a failed ``set_active`` leaves the previous active set working;
* a hook returning the wrong type (``extract_state`` returning ``None`` or
  non-tensor values, ``per_sample`` returning no context manager,
  ``config_to_dict`` returning a list) is a ``PluginError`` naming plugin and hook;
* tensors that share storage (one tensor under two keys, views of one tensor)
  are saved as peft saves them: each key gets its own copy of the values.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from safetensors.torch import load_file
from shared_test_helpers import make_mlp, mlp_input, run
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the toy plugin
import adapterkit
from adapterkit import MethodRegistry, PluginError, TargetError, hookimpl, make_plugin_manager
from toy_plugin import ScaleConfig, ScalePlugin


@attrs.define
class FaultyConfig(ScaleConfig):
    pass


class FaultyPlugin(ScalePlugin):
    """The toy scale method under another name, with one fault switched on at a time (``self.fault``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fault: str | None = None

    @hookimpl
    def adapterkit_register_methods(self, register: Any) -> None:
        register("faulty", FaultyConfig)

    @hookimpl
    def adapterkit_inject(self, model: nn.Module, method: str, name: str, config: Any, empty: bool) -> None:
        super().adapterkit_inject(model, method, name, config, empty)
        if self.fault == "inject":
            # Half-done work of every kind, then a bug.
            model.head.register_forward_hook(lambda module, args, out: out * 3)
            model.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
            model.blocks.marker = "left behind"
            model.embed.scratch = torch.ones(2)
            raise KeyError("boom")
        if self.fault == "inject-typed":
            raise TargetError("faulty: nothing to target here")
        if self.fault == "inject-memory":
            raise MemoryError("no memory left")

    @hookimpl
    def adapterkit_load_state(self, model: nn.Module, method: str, name: str, state_dict: dict) -> None:
        super().adapterkit_load_state(model, method, name, state_dict)
        if self.fault == "load_state":
            raise ValueError("cannot read that")

    @hookimpl
    def adapterkit_set_active(self, model: nn.Module, method: str, names: Any, trainable: Any) -> None:
        if self.fault == "set_active":
            raise RuntimeError("set_active broke")
        super().adapterkit_set_active(model, method, names, trainable)

    @hookimpl
    def adapterkit_extract_state(self, model: nn.Module, method: str, name: str) -> Any:
        state = super().adapterkit_extract_state(model, method, name)
        if self.fault == "extract-none":
            return None
        if self.fault == "extract-not-tensors":
            return {key: value.tolist() for key, value in state.items()}
        if self.fault == "extract-shared":
            # One tensor under two keys, and two views of one tensor.
            tied = state["head.scale"]
            halves = torch.arange(8.0)
            return {**state, "head.scale_tied": tied, "first": halves[:4], "second": halves[4:]}
        return state

    @hookimpl
    def adapterkit_per_sample(self, model: nn.Module, method: str, rows: Any) -> Any:
        return (
            "not a context manager"
            if self.fault == "per_sample"
            else super().adapterkit_per_sample(model, method, rows)
        )

    @hookimpl
    def adapterkit_config_to_dict(self, method: str, config: Any) -> Any:
        return ["not", "a", "dict"] if self.fault == "config_to_dict" else None


SPEC = {"method": "faulty", "target_modules": ["head"], "init": 2.0}


@pytest.fixture
def setup() -> tuple[FaultyPlugin, adapterkit.Adapters]:
    """The faulty plugin registered beside the installed ones, and an MLP with one LoRA adapter attached."""
    pm = make_plugin_manager()
    plugin = FaultyPlugin()
    pm.register(plugin, name="faulty-plugin")
    model = make_mlp()
    adapters = adapterkit.attach(model, MethodRegistry(pm))
    torch.manual_seed(3)
    adapters.add("lora[r=2, target_modules=['embed'], init_lora_weights=False]", "l")
    return plugin, adapters


class State:
    """Everything "exactly as it was" means, hooks and module attributes included."""

    def __init__(self, adapters: adapterkit.Adapters) -> None:
        model = adapters.model
        self.tree = str(model)
        self.modules = [(name, id(m), sorted(vars(m))) for name, m in model.named_modules()]
        self.hooks = [
            (
                name,
                [
                    (key, list(value))
                    for key, value in vars(m).items()
                    if key.endswith("hooks") and isinstance(value, dict)
                ],
            )
            for name, m in model.named_modules()
        ]
        self.params = [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()]
        self.book = (adapters.names, adapters.active, adapters.merged, adapters.enabled)
        self.output = run(model, mlp_input())

    def assert_same(self, adapters: adapterkit.Adapters) -> None:
        now = State(adapters)
        assert now.tree == self.tree
        assert now.modules == self.modules, "modules or module attributes changed"
        assert now.hooks == self.hooks, "hooks were left behind"
        assert [(n, r) for n, _, r in now.params] == [(n, r) for n, _, r in self.params]
        assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(now.params, self.params, strict=True))
        assert now.book == self.book
        assert torch.equal(now.output, self.output), "outputs changed"


def test_an_exception_in_a_hook_names_the_plugin_and_is_rolled_back_completely(setup) -> None:
    plugin, adapters = setup
    before = State(adapters)
    plugin.fault = "inject"
    with pytest.raises(PluginError) as info:
        adapters.add(SPEC, "f")
    message = str(info.value)
    assert "'faulty-plugin'" in message and "adapterkit_inject" in message and "'faulty'" in message
    assert "KeyError: 'boom'" in message
    assert isinstance(info.value.__cause__, KeyError), "the original error is the cause"
    before.assert_same(adapters)


def test_a_failed_load_state_is_named_and_rolled_back(setup, tmp_path: Path) -> None:
    plugin, adapters = setup
    adapters.add(SPEC, "f")
    adapters.save(tmp_path, "f")
    adapters.delete("f")
    adapters.set_active("l")
    before = State(adapters)
    plugin.fault = "load_state"
    with pytest.raises(
        PluginError, match=r"'faulty-plugin' failed in adapterkit_load_state for method 'faulty': ValueError"
    ):
        adapters.load(tmp_path / "f", "f")
    before.assert_same(adapters)


def test_adapterkit_errors_from_a_plugin_keep_their_type(setup) -> None:
    plugin, adapters = setup
    before = State(adapters)
    plugin.fault = "inject-typed"
    with pytest.raises(TargetError, match="faulty: nothing to target here") as info:
        adapters.add(SPEC, "f")
    assert type(info.value) is TargetError
    before.assert_same(adapters)
    plugin.fault = "inject-memory"  # not wrapped either, and rolled back as well
    with pytest.raises(MemoryError):
        adapters.add(SPEC, "f")
    before.assert_same(adapters)


def test_a_failed_set_active_keeps_the_previous_active_set(setup) -> None:
    plugin, adapters = setup
    adapters.add(SPEC, "f")
    adapters.set_active(["l", "f"])
    before = State(adapters)
    plugin.fault = "set_active"
    with pytest.raises(PluginError, match=r"adapterkit_set_active.*RuntimeError: set_active broke") as info:
        adapters.set_active(["l"])
    assert isinstance(info.value.__cause__, RuntimeError)
    plugin.fault = None
    assert adapters.active == ["l", "f"]
    before.assert_same(adapters)


@pytest.mark.parametrize(
    ("fault", "act", "problem"),
    [
        ("extract-none", lambda a, tmp: a.state_dict("f"), r"returned NoneType, not a dict of tensors"),
        ("extract-none", lambda a, tmp: a.save(tmp, "f"), r"returned NoneType, not a dict of tensors"),
        (
            "extract-not-tensors",
            lambda a, tmp: a.state_dict("f"),
            r"returned non-tensor values or non-string keys \('head.scale': list\)",
        ),
        ("per_sample", lambda a, tmp: a.per_sample(["f", "l"]).__enter__(), r"returned str, not a context manager"),
        ("config_to_dict", lambda a, tmp: a.save(tmp, "f"), r"returned list, not a dict"),
    ],
)
def test_a_result_of_the_wrong_type_is_a_plugin_error(
    setup, tmp_path: Path, fault: str, act: Any, problem: str
) -> None:
    plugin, adapters = setup
    adapters.add(SPEC, "f")
    adapters.set_active(["l", "f"])
    before = State(adapters)
    plugin.fault = fault
    hook = {"extract": "adapterkit_extract_state", "per_sample": "adapterkit_per_sample"}.get(fault.split("-")[0])
    hook = hook or f"adapterkit_{fault}"
    with pytest.raises(
        PluginError, match=rf"plugin 'faulty-plugin' broke the contract: {hook} for method 'faulty' {problem}"
    ):
        act(adapters, tmp_path / "out")
    plugin.fault = None
    before.assert_same(adapters)
    assert not (tmp_path / "out").exists(), "a refused save wrote files"


def test_tensors_sharing_storage_are_saved_each_with_its_own_copy(setup, tmp_path: Path) -> None:
    plugin, adapters = setup
    adapters.add(SPEC, "f")
    plugin.fault = "extract-shared"
    state = adapters.state_dict("f")
    prefix = "base_model.model."
    assert state[prefix + "head.scale_tied"].data_ptr() == state[prefix + "head.scale"].data_ptr()
    adapters.save(tmp_path, "f")  # safetensors refuses shared tensors; peft clones them before saving
    saved = load_file(tmp_path / "f" / "adapter_model.safetensors")
    assert saved.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(saved[key], value), key
    assert torch.equal(saved[prefix + "second"], torch.arange(4.0, 8.0))
