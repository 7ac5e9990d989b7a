"""A failed add or load raises a typed error and leaves the model exactly as it was."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Fingerprint, llama_input, make_llama, make_mlp, mlp_input
from safetensors.torch import load_file, save_file

import adapterkit
from adapterkit import (
    AdapterExistsError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigValueError,
    StateDictMismatchError,
    TargetError,
    UnsafeCheckpointError,
)

GOOD = "lora[r=4, target_modules=['q_proj', 'v_proj'], init_lora_weights=False]"


@pytest.fixture
def saved(tmp_path):
    model = make_llama()
    adapterkit.attach(model).add(GOOD)
    adapterkit.attach(model).save(tmp_path / "good")
    return tmp_path / "good"


def copy_with(tmp_path, saved, name, *, config=None, tensors=None, raw=None):
    folder = tmp_path / name
    folder.mkdir()
    data = json.loads((saved / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config(data) if config else data))
    weights = load_file(saved / "adapter_model.safetensors")
    if raw is not None:
        (folder / "adapter_model.safetensors").write_bytes(raw((saved / "adapter_model.safetensors").read_bytes()))
    else:
        save_file(tensors(weights) if tensors else weights, folder / "adapter_model.safetensors")
    return folder


def with_existing(model):
    """Failures must also leave an already attached adapter untouched."""
    adapters = adapterkit.attach(model)
    adapters.add("lora[r=2, target_modules=['q_proj', 'k_proj'], init_lora_weights=False]", "existing")
    return adapters


@pytest.mark.parametrize("existing", [False, True], ids=["bare", "with-adapter"])
@pytest.mark.parametrize(
    ("make_bad", "error"),
    [
        (lambda tmp, saved: ("add", "lora[target_modules=['nope']]"), TargetError),
        (lambda tmp, saved: ("add", "lora[target_modules=['rotary_emb']]"), TargetError),
        (lambda tmp, saved: ("add", "lora[r=0, target_modules=['q_proj']]"), ConfigValueError),
        (lambda tmp, saved: ("add", "lora[target_modules=['q_proj'], init_lora_weights='bogus']"), ConfigValueError),
        (lambda tmp, saved: ("load", tmp / "missing"), CheckpointNotFoundError),
        (
            lambda tmp, saved: ("load", copy_with(tmp, saved, "shape", config=lambda c: {**c, "r": 8})),
            StateDictMismatchError,
        ),
        (
            lambda tmp, saved: (
                "load",
                copy_with(tmp, saved, "missing_key", tensors=lambda t: dict(list(t.items())[1:])),
            ),
            StateDictMismatchError,
        ),
        (
            lambda tmp, saved: (
                "load",
                copy_with(tmp, saved, "extra_key", tensors=lambda t: {**t, "base_model.model.extra.lora_A.weight": torch.zeros(1)}),
            ),
            StateDictMismatchError,
        ),
        (lambda tmp, saved: ("load", copy_with(tmp, saved, "truncated", raw=lambda b: b[: len(b) // 2])), CheckpointError),
        (lambda tmp, saved: ("load", copy_with(tmp, saved, "corrupt", raw=lambda b: b"\x00garbage" + b[8:])), CheckpointError),
        (
            lambda tmp, saved: (
                "load",
                copy_with(tmp, saved, "targets", config=lambda c: {**c, "target_modules": ["gate_proj"]}),
            ),
            StateDictMismatchError,
        ),
    ],
    ids=[
        "targets-match-nothing",
        "unsupported-layer",
        "rank-zero",
        "bad-init",
        "missing-folder",
        "shape-mismatch",
        "missing-key",
        "extra-key",
        "truncated-file",
        "corrupt-file",
        "config-disagrees-with-weights",
    ],
)
def test_failure_leaves_model_unchanged(tmp_path, saved, make_bad, error, existing):
    model, x = make_llama(), llama_input()
    adapters = with_existing(model) if existing else adapterkit.attach(model)
    state = (adapters.names, adapters.active)
    before = Fingerprint(model, x)
    operation, argument = make_bad(tmp_path, saved)
    with pytest.raises(error):
        if operation == "add":
            adapters.add(argument, "new")
        else:
            adapters.load(argument, "new")
    before.assert_same(model, x)
    assert (adapters.names, adapters.active) == state
    # And the model still works: the good adapter loads afterwards.
    adapters.load(saved, "new")
    assert adapters.active == ["new"]


def test_duplicate_name_is_an_error_not_an_overwrite(saved):
    model, x = make_llama(), llama_input()
    adapters = adapterkit.attach(model)
    adapters.load(saved)
    before = Fingerprint(model, x)
    with pytest.raises(AdapterExistsError, match="'default' is already attached"):
        adapters.add(GOOD)
    with pytest.raises(AdapterExistsError):
        adapters.load(saved, "default")
    before.assert_same(model, x)


def test_pickle_checkpoint_needs_opt_in(tmp_path, saved):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    torch.save(load_file(saved / "adapter_model.safetensors"), folder / "adapter_model.bin")
    model, x = make_llama(), llama_input()
    adapters = adapterkit.attach(model)
    before = Fingerprint(model, x)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        adapters.load(folder)
    before.assert_same(model, x)
    adapters.load(folder, allow_pickle=True)
    reference = make_llama()
    adapterkit.attach(reference).load(saved)
    assert torch.equal(model(x).logits, reference(x).logits)


def test_failed_add_on_plain_model_leaves_it_unchanged():
    model, x = make_mlp(), mlp_input()
    before = Fingerprint(model, x)
    with pytest.raises(TargetError):
        adapterkit.attach(model).add("lora[target_modules=['blocks.0.1']]")  # a ReLU: unsupported
    before.assert_same(model, x)
