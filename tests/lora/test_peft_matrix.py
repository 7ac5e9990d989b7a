"""peft's custom-model test matrix, LoRA cases (the table and checks: tests/shared/peft_matrix)."""

from __future__ import annotations

import pytest
from peft_matrix import PeftMatrix, RefusedMatrix, cases_for, refused_for


@pytest.mark.parametrize("case", cases_for("lora"))
class TestLoraMatrix(PeftMatrix):
    pass


@pytest.mark.parametrize("case", refused_for("lora"))
class TestLoraRefused(RefusedMatrix):
    pass
