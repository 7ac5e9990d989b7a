"""Shared pieces of the training suite: tiny data sets and TrainingArguments that make runs comparable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

VOCAB = 64


def token_rows(rows: int = 16, length: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A causal-LM data set: random token rows that are their own labels."""
    ids = torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids]


def arguments(output_dir: Path, **overrides: Any) -> TrainingArguments:
    """CPU, no reporting, no progress bars; plain AdamW at a constant rate, no clipping, so a hand loop can match it."""
    options: dict[str, Any] = dict(
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1000,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        learning_rate=1e-2,
        max_grad_norm=0.0,
        weight_decay=0.0,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(str(output_dir), **options)


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x).logits
