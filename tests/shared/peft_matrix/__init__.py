"""peft's custom-model test matrix, run through adapterkit against peft.

Shared by the ``lora``, ``ia3`` and ``adalora`` environments (each imports it
through pytest's ``pythonpath`` setting and collects its own method's cases)::

    @pytest.mark.parametrize("case", cases_for("ia3"))
    class TestIA3Matrix(PeftMatrix): ...
"""

from .cases import CASES, METHODS, REFUSED, Case, RefusedCase, cases_for, refused_for
from .models import MODELS, make_input, make_model
from .suite import PeftMatrix, RefusedMatrix, Snapshot, peft_checkpoint, peft_config, run

__all__ = [
    "CASES", "METHODS", "MODELS", "REFUSED", "Case", "PeftMatrix", "RefusedCase", "RefusedMatrix", "Snapshot",
    "cases_for", "make_input", "make_model", "peft_checkpoint", "peft_config", "refused_for", "run",
]  # fmt: skip
