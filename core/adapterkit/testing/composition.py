"""Conformance tests of a plugin living beside other methods (mixed into :class:`~adapterkit.testing.MethodContract`).

A *partner* method is added on the same layers as the plugin, before and after
it: the suite's own native ``contract_partner`` (:mod:`adapterkit.testing.partner`)
always, and LoRA when ``adapterkit-lora`` is installed (and the plugin is not
LoRA). In "offset" form a partner only adds a constant ``c`` to each layer's
output, which gives an exact oracle for any plugin: a partner added after the
plugin adds ``c`` to what the plugin's layer returns; added before, the plugin
sees a base layer whose output is ``c`` higher.

What these tests require of a plugin, beyond the single-method contract:

* it adapts at least one ``nn.Linear`` of :meth:`~MethodContract.make_model`;
* an adapter added while another method wraps a target wraps that wrapper (it
  extends a wrapper of its own only when that one is outermost), keeping it as
  ``base_layer``, so it acts after what was added before;
* it finds its layers through the ownership record (:mod:`adapterkit.layers`),
  at any depth, and never treats modules inside other methods' wrappers as targets;
* its merge folds into the ``Linear`` at the bottom of the stack (or it declines merging);
* with ``per_sample``, rows naming other methods' adapters get its base output;
* it works on a bfloat16 model, and (when ``adapterkit-dispatch`` is installed)
  on a model with layers offloaded to the CPU and to disk.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import nn

from ..errors import UnsupportedOperationError
from ..layers import innermost, positions
from ..model import BASE, Adapters, attach
from ..registry import MethodRegistry, make_plugin_manager
from .partner import NAME as NATIVE_PARTNER
from .partner import PartnerPlugin

if TYPE_CHECKING:  # pragma: no cover
    from .contract import MethodContract

__all__ = ["CompositionContract", "composed_registry"]


@functools.lru_cache(maxsize=None)
def composed_registry(registry: MethodRegistry) -> MethodRegistry:
    """``registry``'s plugins plus the suite's partner method (a new registry; ``registry`` is left as it is)."""
    pm = make_plugin_manager(load_entry_points=False)
    for name, plugin in registry.plugin_manager.list_name_plugin():
        if plugin is not None:
            pm.register(plugin, name=name)
    pm.distributions.update(getattr(registry.plugin_manager, "distributions", {}))
    if NATIVE_PARTNER not in registry.methods:
        pm.register(PartnerPlugin(), name=NATIVE_PARTNER)
    return MethodRegistry(pm)


def _pattern(paths: list[str]) -> str:
    return "|".join(re.escape(path) for path in paths)


class CompositionContract:
    """The plugin beside partner methods on the same layers; see the module docstring."""

    # -- partners --------------------------------------------------------------------------------------------
    def pytest_generate_tests(self: MethodContract, metafunc: Any) -> None:
        if "partner" in metafunc.fixturenames:
            metafunc.parametrize("partner", self.partners())

    def partners(self: MethodContract) -> list[str]:
        """The partner methods: the suite's native one, and LoRA when installed and the plugin is not LoRA."""
        own = self._registry().method_for_config(self.parse(self.config)).name
        found = [NATIVE_PARTNER] if own != NATIVE_PARTNER else []
        if own != "lora" and importlib.util.find_spec("adapterkit_lora") is not None:
            found.append("lora")
        return found

    def _composed(self: MethodContract) -> MethodRegistry:
        return composed_registry(self._registry())

    def _own_paths(self: MethodContract) -> list[str]:
        """The logical paths of the ``nn.Linear`` layers the plugin's config adapts in :meth:`make_model`."""
        model = self.make_model()
        adapters = attach(model, self._composed())
        adapters.add(self.config, "probe")
        own = adapters.method("probe").name
        paths = [layer.path for layer in adapters.layers() if own in layer.methods and isinstance(layer.base, nn.Linear)]
        assert paths, "the composition tests need the plugin to adapt at least one nn.Linear of make_model()"
        return paths

    def _partner_spec(self: MethodContract, partner: str, paths: list[str]) -> str:
        if partner == NATIVE_PARTNER:
            return f"{NATIVE_PARTNER}[target_modules={_pattern(paths)!r}, r=2]"
        return f"lora[r=2, lora_alpha=2, lora_bias=True, target_modules={_pattern(paths)!r}]"

    def _add_with(self, adapters: Adapters, spec: Any, name: str, seed: int, offset_only: bool = False) -> None:
        """Add an adapter and move every new trainable parameter off its initialisation (``offset_only``: a
        partner's low-rank part stays zero, so it only offsets its layers' outputs)."""
        before = {id(p) for p in adapters.model.parameters()}
        adapters.add(spec, name)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in adapters.model.named_parameters():
                if id(param) in before or not param.requires_grad:
                    continue
                low_rank = param_name.endswith((f"lora_b.{name}", f"lora_B.{name}.weight"))
                if offset_only and low_rank:
                    param.zero_()
                else:
                    param.add_(torch.randn(param.shape, generator=generator).to(param) * 0.3)

    def _offsets(self, adapters: Adapters, partner: str, name: str) -> dict[str, torch.Tensor]:
        """Per layer path, the constant the offset-only partner adapter adds to the layer's output."""
        state = adapters.state_dict(name, prefix="")
        suffix = ".offset" if partner == NATIVE_PARTNER else ".lora_B.bias"
        return {key.removesuffix(suffix): value for key, value in state.items() if key.endswith(suffix)}

    def _with_offsets(self: MethodContract, model: nn.Module, offsets: dict[str, torch.Tensor], outer: bool) -> nn.Module:
        """``model`` with ``c`` added to the output of each offset layer: of its outermost module, or of the base layer."""
        found = {path: module for path, _, _, module in positions(model)}
        for path, value in offsets.items():
            module = found[path] if outer else innermost(found[path])
            module.register_forward_hook(lambda _m, _i, out, c=value: out + c.to(out))
        return model

    def _alone(self: MethodContract, config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
        model = self.make_model()
        attach(model, self._composed()).load(None, "alone", config=config, state_dict=state)
        return model

    # -- the tests -----------------------------------------------------------------------------------------
    def test_beside_a_partner_in_both_orders(self: MethodContract, partner: str) -> None:
        paths, x = self._own_paths(), self.make_input()
        for plugin_first in (True, False):
            model = self.make_model()
            adapters = attach(model, self._composed())
            steps = [("p", self.config, 1, False), ("q", self._partner_spec(partner, paths), 2, True)]
            for name, spec, seed, offset_only in steps if plugin_first else steps[::-1]:
                self._add_with(adapters, spec, name, seed, offset_only)
            own = adapters.method("p").name
            stacks = {layer.path: layer.methods for layer in adapters.layers()}
            for path in paths:
                want = (own, partner) if plugin_first else (partner, own)
                assert stacks[path] == want, (
                    f"layer {path!r}: wrappers {stacks[path]}, expected {want} (an adapter added later must wrap "
                    "the layer as it is, on top of other methods' wrappers)"
                )
            state = adapters.state_dict("p")
            alone = self._alone(adapters.config("p"), state)
            assert state.keys() == attach(alone).state_dict("alone").keys(), "keys must be those the adapter has alone"
            offsets = self._offsets(adapters, partner, "q")
            adapters.set_active(["p"])
            assert self._close(self.run(model, x), self.run(alone, x)), "the plugin alone must compute as alone"
            expected = self.run(self._with_offsets(alone, offsets, outer=plugin_first), x)
            for order in (["p", "q"], ["q", "p"]):
                adapters.set_active(order)
                assert self._close(self.run(model, x), expected), (
                    f"{'plugin then ' + partner if plugin_first else partner + ' then plugin'}, active {order}: "
                    "the outputs must be those of applying the adapters in the order they were added"
                )
            with adapters.disabled():
                assert self._close(self.run(model, x), self.run(self.make_model(), x))

    def test_merge_beside_a_partner(self: MethodContract, partner: str) -> None:
        paths, x = self._own_paths(), self.make_input()
        for plugin_first in (True, False):
            model = self.make_model()
            adapters = attach(model, self._composed())
            steps = [("p", self.config, 1), ("q", self._partner_spec(partner, paths), 2)]
            for name, spec, seed in steps if plugin_first else steps[::-1]:
                self._add_with(adapters, spec, name, seed)
            adapters.set_active(["q", "p"])
            before = self.run(model, x)
            if self.supports_merge:
                adapters.merge()
                assert set(adapters.merged) == {"p", "q"}
                assert self._close(self.run(model, x), before, scale=10), "merging both must keep the outputs"
                adapters.unmerge()
                assert self._close(self.run(model, x), before, scale=10)
                continue
            with pytest.raises(UnsupportedOperationError):
                adapters.merge()
            assert adapters.merged == [] and torch.equal(self.run(model, x), before)
            if plugin_first:  # the plugin's active adapter sits between the partner and the weights
                with pytest.raises(UnsupportedOperationError):
                    adapters.merge(["q"])
                assert torch.equal(self.run(model, x), before)
            else:  # the partner folds into the weights below the plugin: exact
                adapters.merge(["q"])
                assert self._close(self.run(model, x), before, scale=10)
                adapters.unmerge()

    def test_per_sample_mixed_with_a_partner(self: MethodContract, partner: str) -> None:
        paths, x = self._own_paths(), self.make_input()[:4]
        model = self.make_model()
        adapters = attach(model, self._composed())
        self._add_with(adapters, self.config, "p", 1)
        self._add_with(adapters, self._partner_spec(partner, paths), "q", 2)
        rows = ["p", "q", BASE, "p"]
        if not self.supports_per_sample:
            with pytest.raises(UnsupportedOperationError), adapters.per_sample(rows):
                self.run(model, x)
            return
        with adapters.per_sample(rows):
            mixed = self.run(model, x)
        for i, row in enumerate(rows):
            adapters.set_active([] if row == BASE else [row])
            assert self._close(self.run(model, x[i : i + 1]), mixed[i : i + 1]), f"row {i} ({row})"

    def test_save_and_load_each_from_a_model_holding_both(self: MethodContract, partner: str, tmp_path: Path) -> None:
        paths, x = self._own_paths(), self.make_input()
        model = self.make_model()
        adapters = attach(model, self._composed())
        self._add_with(adapters, self._partner_spec(partner, paths), "q", 2)
        self._add_with(adapters, self.config, "p", 1)
        adapters.save(tmp_path, ["p", "q"])
        for name in ("p", "q"):
            state = adapters.state_dict(name)
            alone = self._alone(adapters.config(name), state)
            loaded = self.make_model()
            attach(loaded, self._composed()).load(tmp_path / name, name)
            assert self._close(self.run(loaded, x), self.run(alone, x)), f"{name} saved beside another method"
            again = attach(loaded).state_dict(name)
            assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)

    def test_two_of_its_adapters_active_at_once(self: MethodContract, tmp_path: Path) -> None:
        model, x = self.make_model(), self.make_input()
        adapters = attach(model, self._composed())
        self._add_with(adapters, self.config, "a", 1)
        self._add_with(adapters, self.config, "b", 2)
        single = {}
        for name in ("a", "b"):
            adapters.set_active([name])
            single[name] = self.run(model, x)
        adapters.set_active(["a", "b"])
        both = self.run(model, x)
        assert not self._close(both, single["a"]) and not self._close(both, single["b"]), "both must act"
        adapters.save(tmp_path)
        loaded = self.make_model()
        other = attach(loaded, self._composed())
        other.load(tmp_path / "a", "a")
        other.load(tmp_path / "b", "b")
        other.set_active(["a", "b"])
        assert self._close(self.run(loaded, x), both)
        with adapters.disabled():
            assert self._close(self.run(model, x), self.run(self.make_model(), x))

    def test_merge_of_two(self: MethodContract) -> None:
        model, x = self.make_model(), self.make_input()
        adapters = attach(model, self._composed())
        self._add_with(adapters, self.config, "a", 1)
        self._add_with(adapters, self.config, "b", 2)
        adapters.set_active(["b", "a"])
        before = self.run(model, x)
        if not self.supports_merge:
            with pytest.raises(UnsupportedOperationError):
                adapters.merge()
            return
        adapters.merge()
        assert sorted(adapters.merged) == ["a", "b"]
        assert self._close(self.run(model, x), before, scale=10)
        adapters.unmerge()
        assert self._close(self.run(model, x), before, scale=10)

    def test_bfloat16_base(self: MethodContract, tmp_path: Path) -> None:
        model, x = self.make_model().to(torch.bfloat16), self.make_input()
        adapters = attach(model, self._composed())
        self._add_with(adapters, self.config, "default", 1)
        out = self.run(model, x.to(torch.bfloat16) if x.is_floating_point() else x)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
        model.train()
        loss = model(x.to(torch.bfloat16) if x.is_floating_point() else x)
        (loss.logits if hasattr(loss, "logits") else loss).float().pow(2).mean().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g.float()).all() for g in grads)
        model.eval()
        adapters.save(tmp_path)
        loaded = self.make_model().to(torch.bfloat16)
        attach(loaded, self._composed()).load(tmp_path)
        xb = x.to(torch.bfloat16) if x.is_floating_point() else x
        assert torch.equal(self.run(loaded, xb), self.run(model, xb)), "a bfloat16 round trip through files"

    if importlib.util.find_spec("adapterkit_dispatch") is not None:

        def test_cpu_and_disk_offload(self: MethodContract, tmp_path: Path) -> None:
            """Loaded onto a model dispatched with some layers on the CPU and some on disk (adapterkit-dispatch)."""
            model, x = self.make_model(), self.make_input()
            adapters = attach(model, self._composed())
            self._add_with(adapters, self.config, "default", 1)
            expected = self.run(model, x)
            adapters.save(tmp_path / "saved")
            children = [name for name, _ in self.make_model().named_children()]
            device_map = {name: ("disk" if i % 2 else "cpu") for i, name in enumerate(children)}
            offloaded = self.make_model()
            attach(offloaded, self._composed()).load(
                tmp_path / "saved", device_map=device_map, offload_folder=tmp_path / "offload"
            )
            assert self._close(self.run(offloaded, x), expected), "outputs on a CPU/disk-offloaded model"

