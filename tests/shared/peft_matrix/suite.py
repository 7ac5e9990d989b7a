"""The checks every case runs, adapterkit against real peft (the oracle).

:class:`PeftMatrix` holds one test per operation; each tox environment
parametrises it with the cases of its own method (``cases_for("ia3")``), so an
environment with only one plugin installed collects only that method's cases.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import adapterkit
import pytest
import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from .cases import Case, RefusedCase
from .models import make_input, make_model

_CONFIGS = {"lora": LoraConfig, "ia3": IA3Config, "adalora": AdaLoraConfig}
# Adapters start away from the identity, so every comparison sees their effect.
_RANDOM_INIT = {"lora": "init_lora_weights", "ia3": "init_ia3_weights", "adalora": "init_lora_weights"}
ROWS = ["a", "__base__", "b", "b", "a", "__base__"]


def peft_config(case: Case | RefusedCase, **overrides: Any) -> Any:
    """A fresh peft config object for the case (randomly initialised adapters)."""
    fields = {_RANDOM_INIT[case.method]: False, **copy.deepcopy(dict(case.config)), **overrides}
    return _CONFIGS[case.method](**fields)


def run(model: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kwargs)


def sgd_step(model: nn.Module, x: torch.Tensor, seed: int = 0) -> None:
    """One training step on whatever is trainable (adapters, and the biases a ``bias`` option trains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing is trainable"
    model.train()
    torch.manual_seed(seed)  # the same dropout masks in peft and adapterkit
    model(x).square().mean().backward()
    with torch.no_grad():
        for param in params:
            param -= 0.1 * param.grad
            param.grad = None
    model.eval()


def peft_checkpoint(case: Case, folder: Path, seed: int = 0, *, train: bool = True, **overrides: Any) -> Path:
    """Save an adapter made and trained by peft itself; returns the folder."""
    model = make_model(case.model)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, peft_config(case, **overrides))
    if train:
        sgd_step(peft_model, make_input(case.model), seed)
    peft_model.save_pretrained(folder)
    return folder


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def assert_close_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert close(ours[key], value), key


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding: the same arithmetic in another order (a sub-batch, a merged weight)."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


class Snapshot:
    """The module tree, parameter values (and, optionally, ``requires_grad``) and the output of a model."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.modules = [(name, id(module)) for name, module in model.named_modules()]
        self.params = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
        self.output = run(model, x)

    def assert_same(self, model: nn.Module, x: torch.Tensor, *, requires_grad: bool = True) -> None:
        assert [(name, id(module)) for name, module in model.named_modules()] == self.modules
        params = dict(model.named_parameters())
        assert sorted(params) == sorted(self.params)
        for name, (value, flag) in self.params.items():
            assert torch.equal(params[name].detach(), value), name
            assert not requires_grad or params[name].requires_grad == flag, name
        assert torch.equal(run(model, x), self.output)


class PeftMatrix:
    """One test per operation; subclasses are parametrised with ``case`` (see :func:`peft_matrix.cases_for`)."""

    # peft's own warnings for configs the table uses on purpose (they say what the refusals say)
    pytestmark = [
        pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape"),  # lora_bias's 1-d bias
        pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed but the targeted layer"),
        pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups > 1"),
        pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False but the target module is `Conv1D`"),
    ]

    def test_peft_checkpoint_loads_with_peft_outputs(self, case: Case, tmp_path: Path) -> None:
        x = make_input(case.model)
        folder = peft_checkpoint(case, tmp_path)
        theirs = PeftModel.from_pretrained(make_model(case.model), folder).eval()

        model = make_model(case.model)
        adapters = adapterkit.attach(model)
        adapters.load(folder)
        assert torch.equal(run(model, x), run(theirs, x))
        assert_same_tensors(adapters.state_dict(), load_file(folder / "adapter_model.safetensors"))

    def test_adapterkit_checkpoint_loads_in_peft(self, case: Case, tmp_path: Path) -> None:
        x = make_input(case.model)
        model = make_model(case.model)
        adapters = adapterkit.attach(model)
        adapters.add(peft_config(case))
        sgd_step(model, x)
        adapters.save(tmp_path)

        theirs = PeftModel.from_pretrained(make_model(case.model), tmp_path).eval()
        assert torch.equal(run(theirs, x), run(model, x))
        saved = load_file(tmp_path / "adapter_model.safetensors")
        assert_same_tensors(saved, get_peft_model_state_dict(theirs))
        assert_same_tensors(saved, adapters.state_dict())
        # adapterkit loads its own checkpoint back
        again = make_model(case.model)
        adapterkit.attach(again).load(tmp_path)
        assert torch.equal(run(again, x), run(model, x))

    def test_add_and_train_like_peft(self, case: Case) -> None:
        """Same seed, same adapter as get_peft_model; the same parameters train, to the same values."""
        x = make_input(case.model)
        model, peft_base = make_model(case.model), make_model(case.model)
        torch.manual_seed(5)
        adapters = adapterkit.attach(model)
        adapters.add(peft_config(case))
        torch.manual_seed(5)
        theirs = get_peft_model(peft_base, peft_config(case)).eval()  # peft leaves new adapters in training mode
        assert_same_tensors(adapters.state_dict(), get_peft_model_state_dict(theirs))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in theirs.base_model.model.named_parameters() if p.requires_grad}
        assert torch.equal(run(model, x), run(theirs, x))

        sgd_step(model, x)
        sgd_step(theirs, x)
        same = assert_same_tensors if case.exact_after_training else assert_close_tensors
        same(model.state_dict(), theirs.base_model.model.state_dict())
        same(adapters.state_dict(), get_peft_model_state_dict(theirs))
        assert (torch.equal if case.exact_after_training else close)(run(model, x), run(theirs, x))

    def test_merge_and_unmerge_like_peft(self, case: Case, tmp_path: Path) -> None:
        x = make_input(case.model)
        folder = peft_checkpoint(case, tmp_path)
        theirs = PeftModel.from_pretrained(make_model(case.model), folder).eval()
        model = make_model(case.model)
        adapters = adapterkit.attach(model)
        adapters.load(folder)

        refused = case.refuses.get("merge")
        if refused is not None:
            with pytest.raises(Exception):  # noqa: B017 - what peft raises is peft's business; it must raise
                theirs.merge_adapter()
            before = Snapshot(model, x)
            with pytest.raises(refused[0]):
                adapters.merge()
            before.assert_same(model, x)
            assert adapters.merged == []
            return
        unmerged = run(model, x)
        adapters.merge()
        theirs.merge_adapter()
        merged = run(model, x)
        assert torch.equal(merged, run(theirs, x))
        assert close(merged, unmerged)
        adapters.unmerge()
        theirs.unmerge_adapter()
        assert torch.equal(run(model, x), run(theirs, x))
        assert close(run(model, x), unmerged)
        assert_same_tensors(model.state_dict(), theirs.base_model.model.state_dict())

    def test_disable_gives_the_base_model(self, case: Case, tmp_path: Path) -> None:
        x = make_input(case.model)
        base = run(make_model(case.model), x)
        folder = peft_checkpoint(case, tmp_path)
        model = make_model(case.model)
        adapters = adapterkit.attach(model)
        adapters.load(folder)
        adapted = run(model, x)
        assert not torch.equal(adapted, base)

        adapters.disable()
        assert torch.equal(run(model, x), base)
        if case.bias == "none":
            # (peft's disable_adapter leaves trained base biases in place, so only here it is the base model too)
            theirs = PeftModel.from_pretrained(make_model(case.model), folder).eval()
            with theirs.disable_adapter():
                assert torch.equal(run(theirs, x), base)
        adapters.enable()
        assert torch.equal(run(model, x), adapted)
        adapters.set_active([])
        assert torch.equal(run(model, x), base)

    def test_per_sample_rows_like_peft(self, case: Case, tmp_path: Path) -> None:
        x = make_input(case.model)
        first = peft_checkpoint(case, tmp_path / "a", seed=1, train=False)
        # peft allows one adapter with a bias option per model
        plain = {"bias": "none"} if case.bias != "none" else {}
        second = peft_checkpoint(case, tmp_path / "b", seed=2, train=False, **plain)
        model = make_model(case.model)
        adapters = adapterkit.attach(model)
        adapters.load(first, "a")
        adapters.load(second, "b")

        refused = case.refuses.get("per_sample")
        if refused is not None:
            before = Snapshot(model, x)
            with pytest.raises(refused[0]), adapters.per_sample(ROWS):
                model(x)
            before.assert_same(model, x)
            return
        with adapters.per_sample(ROWS):
            ours = run(model, x)

        theirs = PeftModel.from_pretrained(make_model(case.model), first, adapter_name="a").eval()
        theirs.load_adapter(second, adapter_name="b")
        expected = torch.empty_like(ours)
        for name in ("a", "b", "__base__"):
            rows = [i for i, row in enumerate(ROWS) if row == name]
            if name == "__base__":
                with theirs.disable_adapter():
                    expected[rows] = run(theirs, x)[rows]
            else:
                theirs.set_adapter(name)
                expected[rows] = run(theirs, x)[rows]
        assert close(ours, expected)
        if case.peft_mixed_batch:
            assert torch.equal(ours, run(theirs, x, adapter_names=ROWS))

    def test_delete_gives_back_the_base_model(self, case: Case) -> None:
        x = make_input(case.model)
        model = make_model(case.model)
        before = Snapshot(model, x)
        adapters = adapterkit.attach(model)
        adapters.add(peft_config(case))
        sgd_step(model, x)  # with a bias option this trains base biases too
        assert not torch.equal(run(model, x), before.output)
        adapters.delete("default")
        # the first adapter froze the base parameters (requires_grad), and that stays
        before.assert_same(model, x, requires_grad=False)


class RefusedMatrix:
    """Configs peft refuses for a model: adapterkit refuses them on add and on load, model unchanged."""

    def test_refused_on_add_and_load(self, case: RefusedCase) -> None:
        with pytest.raises(ValueError):
            get_peft_model(make_model(case.model), peft_config(case))
        x = make_input(case.model)
        model = make_model(case.model)
        adapters = adapterkit.attach(model)
        before = Snapshot(model, x)
        with pytest.raises(case.error):
            adapters.add(peft_config(case))
        before.assert_same(model, x)
        with pytest.raises(case.error):
            adapters.load(None, config=peft_config(case), state_dict={})
        before.assert_same(model, x)
        assert adapters.names == []
