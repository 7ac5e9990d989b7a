"""peft's custom-model test matrix, IA3 cases (the table and checks: tests/shared/peft_matrix)."""

from __future__ import annotations

import pytest
from peft_matrix import PeftMatrix, RefusedMatrix, cases_for, refused_for


@pytest.mark.parametrize("case", cases_for("ia3"))
class TestIA3Matrix(PeftMatrix):
    pass


@pytest.mark.parametrize("case", refused_for("ia3"))
class TestIA3Refused(RefusedMatrix):
    pass
