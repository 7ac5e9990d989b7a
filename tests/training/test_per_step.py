"""Per-step method work through one core API (``training_step``, ``regularization``), with no method named:
AdaLoRA under transformers' Trainer matches a hand-written PeftModel + ``update_and_allocate`` loop step for step."""

from __future__ import annotations

from pathlib import Path

import adapterkit
import pytest
import torch
from adapterkit.trainer import Trainer
from conftest import make_llama
from peft import AdaLoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import TrainerCallback
from training_helpers import arguments, token_rows

STEPS = 10
ADALORA = dict(
    init_r=6, target_r=2, total_step=STEPS, tinit=2, tfinal=3, deltaT=1, orth_reg_weight=0.5, lora_dropout=0.0,
    target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
)  # fmt: skip


class Losses(TrainerCallback):
    def __init__(self) -> None:
        self.patterns: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        pattern = adapterkit.attach(model).config("default").rank_pattern
        self.patterns.append({k: list(v) for k, v in (pattern or {}).items()})


def test_adalora_under_trainer_matches_a_hand_written_peft_loop_step_for_step(tmp_path: Path) -> None:
    data = token_rows(rows=8)
    torch.manual_seed(3)
    peft_model = get_peft_model(make_llama(), AdaLoraConfig(**ADALORA))
    start = {k.removeprefix("base_model.model."): v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}

    model = make_llama()  # the training script below names no method: only a config and the Trainer
    adapterkit.attach(model).load(None, config={"method": "adalora", **ADALORA}, state_dict=start, is_trainable=True)
    patterns = Losses()
    trainer = Trainer(
        model=model, args=arguments(tmp_path, max_steps=STEPS, per_device_train_batch_size=8), train_dataset=data,
        callbacks=[patterns],
    )  # fmt: skip
    trainer.train()

    batch = torch.stack([row["input_ids"] for row in data])
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for step in range(STEPS):
        peft_model(input_ids=batch, labels=batch).loss.backward()  # PeftModel adds the orthogonal regularisation
        optimizer.step()
        peft_model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        pattern = peft_model.peft_config["default"].rank_pattern or {}
        # peft keeps "<module>.lora_E.default" keys and tensors while budgeting, saved keys and lists afterwards
        expected = {k.removesuffix(".default"): [bool(b) for b in torch.as_tensor(v).view(-1)] for k, v in pattern.items()}
        assert patterns.patterns[step] == expected, f"rank pattern differs after step {step}"

    ours, theirs = adapterkit.attach(model).state_dict(), get_peft_model_state_dict(peft_model)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)


def test_training_step_and_regularization_skip_methods_without_per_step_work() -> None:
    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.add('lora[r=2, target_modules=["q_proj"]]')
    adapters.training_step(0)  # LoRA has no per-step work: nothing happens, nothing is named
    assert torch.equal(adapters.regularization(), torch.zeros(()))
    with pytest.raises(adapterkit.ArgumentValueError, match="global_step"):
        adapters.training_step(-1)
    with pytest.raises(ValueError):
        adapters.training_step(True)


def test_regularization_is_the_adalora_term_and_only_for_adapters_being_trained() -> None:
    from adapterkit_adalora import orthogonal_regularization

    model = make_llama()
    adapters = adapterkit.attach(model)
    adapters.add(
        'adalora[init_r=4, target_r=2, total_step=4, tinit=1, tfinal=1, orth_reg_weight=0.3, target_modules=["q_proj"]]'
    )
    assert torch.equal(adapters.regularization(), orthogonal_regularization(model))
    assert adapters.regularization().requires_grad
    with adapters.disabled():
        assert torch.equal(adapters.regularization(), torch.zeros(()))
