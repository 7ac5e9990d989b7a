"""The conformance suite tested itself: a plugin that composes passes it, ones that break composition fail it."""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ("pytester",)

PLUGINS = '''
import functools

import adapterkit
from adapterkit.layers import owner
from adapterkit.testing import MethodContract
from adapterkit.testing.partner import PartnerLayer, PartnerPlugin


class InsertsBelow(PartnerPlugin):
    """Broken: wraps the model's own Linear, below whatever other methods put there."""

    def _targets(self, model, config):
        targets = []
        for parent, attr, layer in super()._targets(model, config):
            if layer is None:
                module = getattr(parent, attr)
                while owner(module) is not None:  # down to the bottom of the stack
                    parent, attr, module = module, "base_layer", module.base_layer
            targets.append((parent, attr, layer))
        return targets


class ExtendsAnyLayer(PartnerPlugin):
    """Broken: adds its adapters to any PartnerLayer on top of a target, whoever owns it."""

    def _targets(self, model, config):
        targets = []
        for parent, attr, layer in super()._targets(model, config):
            module = getattr(parent, attr)
            targets.append((parent, attr, module if isinstance(module, PartnerLayer) else layer))
        return targets


def contract_for(plugin):
    @functools.cache
    def registry():
        pm = adapterkit.make_plugin_manager(load_entry_points=False)
        pm.register(plugin, name=plugin.name)
        return adapterkit.MethodRegistry(pm)

    class Contract(MethodContract):
        config = f"{plugin.name}[target_modules='fc1|fc2']"
        supports_merge = True
        supports_per_sample = True

    Contract.registry = staticmethod(registry)
    return Contract
'''


def run_contract(pytester: pytest.Pytester, plugin: str) -> pytest.RunResult:
    pytester.makepyfile(plugins=PLUGINS)
    pytester.makepyfile(
        test_it=textwrap.dedent(
            f"""
            from plugins import ExtendsAnyLayer, InsertsBelow, PartnerPlugin, contract_for

            TestContract = contract_for({plugin})
            """
        )
    )
    return pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")


def test_a_plugin_that_composes_passes_every_contract_test(pytester: pytest.Pytester) -> None:
    result = run_contract(pytester, 'PartnerPlugin("good")')
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("passed", 0) >= 20, result.stdout.str()


def test_a_plugin_that_wraps_below_other_methods_fails_the_composition_tests(pytester: pytest.Pytester) -> None:
    result = run_contract(pytester, 'InsertsBelow("below")')
    result.assert_outcomes(failed=1, passed=result.parseoutcomes()["passed"])
    result.stdout.fnmatch_lines(["*test_beside_a_partner_in_both_orders*"])


def test_a_plugin_that_extends_other_methods_layers_fails_the_composition_tests(pytester: pytest.Pytester) -> None:
    result = run_contract(pytester, 'ExtendsAnyLayer("extender")')
    assert result.parseoutcomes().get("failed", 0) >= 1, result.stdout.str()
    result.stdout.fnmatch_lines(["*FAILED*test_beside_a_partner_in_both_orders*"])
