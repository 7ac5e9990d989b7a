"""Fixtures of the reliability suite: the fake Hub (tests/lora/hub_server.py) and the shared model helpers.

Test modules across the suite do ``from conftest import make_llama, ...``, but
conftest files outside packages are all imported under the one module name
``conftest``, and the last one loaded wins (pytest loads this file at start-up
whenever ``tests/reliability`` is named on the command line; another folder's
conftest may win over it). So:

* this file loads ``tests/conftest.py`` once more, as the module
  ``shared_test_helpers``; the reliability tests import their helpers from
  there, whatever ``conftest`` currently is;
* it re-exports those helpers, so that ``from conftest import ...`` keeps
  working in the other test folders when this file is the last ``conftest``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS / "lora") not in sys.path:
    sys.path.insert(0, str(TESTS / "lora"))  # hub_server


def _load_shared() -> types.ModuleType:
    if "shared_test_helpers" in sys.modules:
        return sys.modules["shared_test_helpers"]
    spec = importlib.util.spec_from_file_location("shared_test_helpers", TESTS / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["shared_test_helpers"] = module
    spec.loader.exec_module(module)
    return module


_shared = _load_shared()
Fingerprint = _shared.Fingerprint
MLP = _shared.MLP
TINY_LLAMA = _shared.TINY_LLAMA
llama_input = _shared.llama_input
make_llama = _shared.make_llama
make_mlp = _shared.make_mlp
mlp_input = _shared.mlp_input
run = _shared.run
llama = _shared.llama
mlp = _shared.mlp

from hub_server import serving_as_the_hub  # noqa: E402  (needs the sys.path entry above)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The models here are tiny: one intra-op thread is fastest, and on a shared machine far faster
    (spinning thread pools turn a 2 ms forward into most of a second). Restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A running FakeHub that huggingface_hub uses as the Hub (as in tests/lora/test_hub.py): no token, online."""
    with serving_as_the_hub(monkeypatch, tmp_path) as server:
        yield server
