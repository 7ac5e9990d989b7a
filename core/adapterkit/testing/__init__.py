"""Contract tests any adapter-method plugin can run against itself (needs pytest).

Subclass :class:`MethodContract` in your plugin's test suite, give it a config
for your method, and pytest collects every contract test::

    from adapterkit.testing import MethodContract

    class TestMyMethodContract(MethodContract):
        config = "mymethod[targets=['fc1', 'fc2']]"
        supports_merge = True          # False: merge must raise UnsupportedOperationError
        supports_per_sample = False    # likewise for per_sample

The default model is :class:`ContractModel`, a plain ``nn.Module`` with
``Linear`` layers ``embed``, ``fc1``, ``fc2`` and ``head``; override
:meth:`MethodContract.make_model` and :meth:`MethodContract.make_input` to use
another. Override :attr:`MethodContract.registry` (a callable returning a
:class:`~adapterkit.MethodRegistry`, the same one every time, e.g. wrapped in
``functools.cache``) to test a plugin registered in-process rather than
through its entry point.

The contract exercises, for the method alone: config strings (parse, format
round trip), inject (outputs change, untargeted modules untouched, only adapter
parameters train), set_active, enable/disable, extract_state/load_state round
trip, save/load through files, two adapters side by side, merge/unmerge (or a
clean refusal), per_sample (or a clean refusal), delete (the model is as
before), and atomic failure (targets that match nothing, a checkpoint of the
wrong shape). And beside other methods on the same layers
(:mod:`adapterkit.testing.composition`, which says what it requires of a
plugin): a partner method added before and after it (the suite's native
``contract_partner``, and LoRA when installed), outputs against an exact
oracle, merges, per-sample rows of both methods, saves from a model holding
both; two of its adapters active and merged at once; a bfloat16 base; CPU and
disk offload when ``adapterkit-dispatch`` is installed.

To perturb an adapter off its initialisation the suite adds noise to every
parameter the add created that trains (``requires_grad``).
"""

from __future__ import annotations

from .composition import CompositionContract, composed_registry
from .contract import ContractModel, MethodContract, model_fingerprint
from .partner import PartnerPlugin

__all__ = ["CompositionContract", "ContractModel", "MethodContract", "PartnerPlugin", "composed_registry", "model_fingerprint"]
